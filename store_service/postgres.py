"""PostgresStoreBackend: the StoreBackend contract on PostgreSQL (asyncpg), safe for many replicas.

Several store processes ("replicas") may share one database; everything that must be atomic is
decided by PostgreSQL, never by a replica's memory:

- Appends: concurrent appends queue per writer (streams are sharded over writers by id) and each
  queue is committed as a group with ONE call of the `append_group` SQL function: one round trip
  and one transaction (one WAL flush) for the whole group. The `(stream_id, seq)` primary key is
  the compare-and-swap between replicas; a group that lost such a race is retried, and then sees
  the winner's head.
- Subscriptions: `append_group` issues `pg_notify` in the append's transaction, so every
  replica's one LISTEN connection hears of each commit as it happens; it wakes the local
  subscribers of that stream, which then read what is new. No polling.
- Outages: every driver error passes through `postgres_errors.translate_error`; a lost or
  refused connection becomes a retryable UNAVAILABLE `store_unavailable`. The pool replaces dead
  connections on the next acquire (reads move to a fresh one by themselves), and the LISTEN
  connection reconnects by itself and then wakes every subscriber to re-read, so nothing
  committed while it was away is missed.

Durability: ``full`` (default) runs with ``synchronous_commit=on``: an acknowledged write is in
PostgreSQL's flushed WAL. ``normal`` runs with ``synchronous_commit=off``: a kill of the store
loses nothing (PostgreSQL has the commit and flushes it within milliseconds), but a crash of
PostgreSQL itself or of its host may lose the last fraction of a second of acknowledged writes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import uuid
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Collection, Sequence
from typing import Any, Literal, TypeVar

import asyncpg

from keel_core.errors import ErrorCategory, KeelError, unavailable
from store_service.backend import (
    ARTIFACT_CHUNK_BYTES,
    FIRST_PAGE_POSITION,
    AppendResult,
    ArtifactDownload,
    ArtifactInfo,
    ArtifactPut,
    EventPage,
    Expected,
    ExpectedKind,
    NewArtifact,
    NewEvent,
    StoreBackend,
    StoredEvent,
    StreamHead,
    StreamInfo,
    StreamPage,
    StreamStatus,
    TrimResult,
    artifact_id_of,
    artifact_not_found,
    decode_page_token,
    empty_batch,
    encode_page_token,
    page_of,
    sequence_conflict,
    trim_past_head,
)
from store_service.postgres_errors import LOST_RACE, database_errors, is_lost_connection, translate_error
from store_service.postgres_listener import RECONNECT_MAX_S, RECONNECT_MIN_S, PostgresListener
from store_service.postgres_schema import check_schema_name, migrate
from store_service.stream_wakeups import StreamWakeups

log = logging.getLogger(__name__)

Durability = Literal["full", "normal"]
T = TypeVar("T")
Record = asyncpg.Record

DEFAULT_SCHEMA = "keel"
# A group stops growing at this many appends or bytes: bounds one transaction's work and latency.
MAX_GROUP_APPENDS = 512
MAX_GROUP_BYTES = 8 * 1024 * 1024
# A group whose events collided with another replica's is retried this often before giving up.
CAS_RETRIES = 4
_TOKEN_PREFIX = b"pg-streams:v1:"
_KIND_CODES = {ExpectedKind.EXACT: 0, ExpectedKind.NO_STREAM: 1, ExpectedKind.ANY: 2}

_APPEND_GROUP = (
    "SELECT out_first, out_head, out_conflict FROM append_group("
    "$1::text[], $2::int2[], $3::int8[], $4::int4[], $5::int2[], $6::int4[], $7::text[], $8::bytea[], "
    "$9::int4[], $10::text[], $11::text[], $12::int8[], $13::int4[], $14::bytea[], $15::text)"
)
# One statement, one snapshot: the head and the events always agree.
_READ = (
    "SELECT h.head_seq, e.seq, e.type, e.payload, e.recorded_at_us "
    "FROM (SELECT coalesce((SELECT head_seq FROM streams WHERE stream_id = $1), 0) AS head_seq) AS h "
    "LEFT JOIN LATERAL (SELECT seq, type, payload, recorded_at_us FROM events "
    "WHERE stream_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3) AS e ON true"
)
# One statement, one snapshot: events below before_seq go only if before_seq <= head + 1 (an unknown
# stream's head is NULL: nothing goes). Appends compare-and-swap the streams row, which a trim does
# not touch, so an append racing a trim still lands exactly after the true head.
_TRIM = (
    "WITH h AS (SELECT head_seq FROM streams WHERE stream_id = $1), "
    "d AS (DELETE FROM events WHERE stream_id = $1 AND seq < $2 "
    "AND $2 <= (SELECT head_seq FROM h) + 1 RETURNING 1) "
    "SELECT coalesce((SELECT head_seq FROM h), 0), (SELECT count(*) FROM d)"
)
_INSERT_CHUNK = "INSERT INTO artifact_chunks (blob_id, idx, data) VALUES ($1, $2, $3)"
_NOW_US = "(extract(epoch FROM statement_timestamp()) * 1000000)::int8"
_INSERT_ARTIFACT = (
    "INSERT INTO artifacts (artifact_id, kind, size, blob_id, created_at_us) "
    f"VALUES ($1, $2, $3, $4, {_NOW_US}) ON CONFLICT (artifact_id) DO NOTHING RETURNING true"
)
# The artifact row and its last chunk in one statement; no chunk is written if it already exists.
_PUBLISH_WITH_CHUNK = (
    "WITH published AS ("
    "INSERT INTO artifacts (artifact_id, kind, size, blob_id, created_at_us) "
    f"VALUES ($1, $2, $3, $4, {_NOW_US}) ON CONFLICT (artifact_id) DO NOTHING RETURNING blob_id) "
    "INSERT INTO artifact_chunks (blob_id, idx, data) SELECT blob_id, $5, $6 FROM published RETURNING true"
)

# A read tries this many pooled connections before reporting the database unavailable.
READ_ATTEMPTS = 3


def _chunked(data: bytes) -> list[bytes]:
    return [data[i : i + ARTIFACT_CHUNK_BYTES] for i in range(0, len(data), ARTIFACT_CHUNK_BYTES)]


async def _fetch_on(
    conn: asyncpg.pool.PoolConnectionProxy[Record], query: str, args: tuple[object, ...]
) -> list[Record]:
    try:
        return await conn.fetch(query, *args)
    except asyncpg.InternalClientError:
        # The protocol's state is unknown now: never hand this connection to anyone again.
        conn.terminate()
        raise


async def _keep_session(_conn: asyncpg.Connection[Record]) -> None:
    """Pool reset hook: our sessions carry no state to reset, so skip the extra round trip."""


class _AppendJob:
    """One caller's append waiting for its writer; its future gets the caller's own outcome."""

    __slots__ = ("artifact_ids", "artifacts", "events", "expected", "future", "size", "status", "stream_id")

    def __init__(
        self,
        stream_id: str,
        expected: Expected,
        events: Sequence[NewEvent],
        status: StreamStatus | None,
        artifacts: Sequence[NewArtifact],
        future: asyncio.Future[AppendResult],
    ) -> None:
        self.stream_id = stream_id
        self.expected = expected
        self.events = events
        self.status = status
        self.artifacts = artifacts
        self.artifact_ids = tuple(artifact_id_of(a.data) for a in artifacts)
        self.size = sum(len(e.payload) for e in events) + sum(len(a.data) for a in artifacts)
        self.future = future


def _resolve(future: asyncio.Future[T], outcome: T | BaseException) -> None:
    # A caller cancelled while queued has no one to tell; its append may still have committed.
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _group_arguments(group: Sequence[_AppendJob], channel: str) -> list[Any]:
    """The `append_group` call's parallel arrays for `group`, in order."""
    stream_ids, kinds, expected, counts, statuses = [], [], [], [], []
    owners_of_events: list[int] = []
    types: list[str] = []
    payloads: list[bytes] = []
    owners, art_ids, art_kinds, art_sizes, art_chunks = [], [], [], [], []
    chunk_data: list[bytes] = []
    for number, job in enumerate(group, start=1):
        stream_ids.append(job.stream_id)
        kinds.append(_KIND_CODES[job.expected.kind])
        expected.append(job.expected.seq)
        counts.append(len(job.events))
        statuses.append(None if job.status is None else int(job.status))
        owners_of_events.extend([number] * len(job.events))
        types.extend(event.type for event in job.events)
        payloads.extend(event.payload for event in job.events)
        for artifact, artifact_id in zip(job.artifacts, job.artifact_ids, strict=True):
            chunks = _chunked(artifact.data)
            owners.append(number)
            art_ids.append(artifact_id)
            art_kinds.append(artifact.kind)
            art_sizes.append(len(artifact.data))
            art_chunks.append(len(chunks))
            chunk_data.extend(chunks)
    return [
        stream_ids,
        kinds,
        expected,
        counts,
        statuses,
        owners_of_events,
        types,
        payloads,
        owners,
        art_ids,
        art_kinds,
        art_sizes,
        art_chunks,
        chunk_data,
        channel,
    ]


class PostgresStoreBackend(StoreBackend):
    """The store on PostgreSQL: group commit, a database-enforced CAS, LISTEN/NOTIFY wake-ups."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        durability: Durability = "full",
        min_connections: int = 2,
        max_connections: int = 10,
        writers: int = 2,
        command_timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', got {durability!r}")
        if not 1 <= writers < max_connections:
            raise ValueError(f"writers must be between 1 and max_connections - 1, got {writers}")
        self.dsn = dsn
        self.schema = check_schema_name(schema)
        self.durability: Durability = durability
        self.channel = f"keel_store_events.{schema}"
        self._min_connections = max(1, min(min_connections, max_connections))
        self._max_connections = max_connections
        self._command_timeout_s = command_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._pool: asyncpg.Pool[Record] | None = None
        self._queues = [collections.deque[_AppendJob | None]() for _ in range(writers)]
        self._queued = [asyncio.Event() for _ in range(writers)]
        self._writer_tasks: list[asyncio.Task[None]] = []
        self._wakeups = StreamWakeups()
        self._listener = PostgresListener(
            self._connect, self.channel, self._wakeups.notify, self._wake_everyone
        )
        # Every subscriber's armed wake-up, so a re-established LISTEN can wake them all.
        self._waiting: set[asyncio.Event] = set()
        # Uploads hold a connection for their whole transaction; leave the rest for everyone else.
        self._uploads = asyncio.Semaphore(max(1, max_connections // 3))
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------

    def _server_settings(self) -> dict[str, str]:
        return {
            "search_path": self.schema,
            "synchronous_commit": "on" if self.durability == "full" else "off",
            # Operators (and tests) can tell which store's connections are which.
            "application_name": f"keel-store:{self.schema}"[:63],
        }

    async def _connect(self) -> asyncpg.Connection[Record]:
        return await asyncpg.connect(
            self.dsn,
            timeout=self._connect_timeout_s,
            command_timeout=self._command_timeout_s,
            server_settings=self._server_settings(),
        )

    async def open(self) -> None:
        """Migrate the schema, open the pool and the LISTEN connection, start the writers."""
        with database_errors():
            conn = await self._connect()
            try:
                applied = await migrate(conn, self.schema)
            finally:
                await conn.close()
            if applied:
                log.info("migrated schema %s: applied versions %s", self.schema, applied)
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._min_connections,
                max_size=self._max_connections,
                timeout=self._connect_timeout_s,
                command_timeout=self._command_timeout_s,
                max_inactive_connection_lifetime=300.0,
                reset=_keep_session,
                server_settings=self._server_settings(),
            )
            try:
                await self._listener.start()
            except BaseException:
                self._pool.terminate()
                raise
        self._writer_tasks = [
            asyncio.create_task(self._write_loop(shard), name=f"pg-store-writer-{shard}")
            for shard in range(len(self._queues))
        ]

    async def close(self) -> None:
        """Commit what is queued, end subscriptions, close the LISTEN connection and the pool."""
        if self._closing:
            return
        self._closing = True
        self._wakeups.close()
        self._wake_everyone()
        for queue, queued in zip(self._queues, self._queued, strict=True):
            queue.append(None)
            queued.set()
        await asyncio.gather(*self._writer_tasks, return_exceptions=True)
        await self._listener.stop()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), timeout=5.0)
            except TimeoutError:
                log.warning("pool did not close in 5 s (connections still in use); terminating it")
                self._pool.terminate()

    @property
    def pool(self) -> asyncpg.Pool[Record]:
        """The connection pool (open only)."""
        if self._pool is None:
            raise RuntimeError("PostgresStoreBackend used before open()")
        return self._pool

    async def _fetch(self, query: str, *args: object) -> list[Record]:
        """Run a write (or anything not safe to repeat) once; driver errors translated."""
        with database_errors():
            async with self.pool.acquire(timeout=self._connect_timeout_s) as conn:
                return await _fetch_on(conn, query, args)

    async def _query(self, query: str, *args: object) -> list[Record]:
        """Run a read; if the pooled connection turns out to be dead, repeat it on a fresh one.

        After a server restart or a terminated session every idle pooled connection is dead, and
        the pool learns it only when one is used. A read is safe to repeat; an append is not (it
        may have committed before the connection died), so appends surface the failure instead.
        """
        for _ in range(READ_ATTEMPTS - 1):
            try:
                async with self.pool.acquire(timeout=self._connect_timeout_s) as conn:
                    return await _fetch_on(conn, query, args)
            except Exception as error:
                if not is_lost_connection(error):
                    raise translate_error(error) from error
                log.info("pooled connection was dead (%s); repeating the read on another", error)
        return await self._fetch(query, *args)

    # -- LISTEN/NOTIFY -----------------------------------------------------------------------

    def _wake_everyone(self) -> None:
        # After the LISTEN connection was away, notifications may have been missed: re-read all.
        for event in self._waiting:
            event.set()

    # -- the writers -------------------------------------------------------------------------

    def _shard(self, stream_id: str) -> int:
        # One stream always goes through one writer, so groups in flight at once never collide.
        return zlib.crc32(stream_id.encode()) % len(self._queues)

    async def _write_loop(self, shard: int) -> None:
        """Commit whatever is queued on this shard as one group, until the closing sentinel."""
        queue, queued = self._queues[shard], self._queued[shard]
        while True:
            if not queue:
                queued.clear()
                await queued.wait()
            group: list[_AppendJob] = []
            size = 0
            while queue and queue[0] is not None and len(group) < MAX_GROUP_APPENDS:
                if group and size + queue[0].size > MAX_GROUP_BYTES:
                    break
                job = queue.popleft()
                assert job is not None
                group.append(job)
                size += job.size
            if group:
                # Stream order: every replica then locks stream rows in the same order, so two
                # groups never deadlock. The sort is stable, so one stream's appends keep theirs.
                group.sort(key=lambda job: job.stream_id)
                try:
                    await self._commit_group(group)
                except Exception as error:
                    # Never let the writer die: every later append on this shard would hang.
                    log.exception("append group of %d failed unexpectedly", len(group))
                    for job in group:
                        _resolve(job.future, error)
                continue
            if queue and queue[0] is None:
                return

    async def _commit_group(self, group: list[_AppendJob]) -> None:
        """Commit `group` with one call; retry when another replica won a sequence under us."""
        for attempt in range(CAS_RETRIES):
            try:
                async with self.pool.acquire(timeout=self._connect_timeout_s) as conn:
                    rows = await _fetch_on(conn, _APPEND_GROUP, tuple(_group_arguments(group, self.channel)))
            except LOST_RACE as error:
                # Another replica committed (or locked) events or a new stream row of one of these
                # streams after our head read, and the whole transaction was rolled back. A retry
                # reads the new heads: the loser now gets its sequence_conflict, the rest commit.
                log.info("append group lost a race to another writer (attempt %d): %s", attempt + 1, error)
                continue
            except Exception as error:
                translated = translate_error(error)
                if translated is error:
                    log.exception("append group of %d failed", len(group))
                for job in group:
                    _resolve(job.future, translated)
                return
            self._settle(group, rows)
            return
        if len(group) > 1:
            for job in group:
                await self._commit_group([job])
            return
        _resolve(
            group[0].future,
            unavailable(
                "store_contention",
                f"stream {group[0].stream_id!r} is being appended to by other writers too fast to win; retry",
            ),
        )

    def _settle(self, group: list[_AppendJob], rows: list[Record]) -> None:
        for job, row in zip(group, rows, strict=True):
            first, head, conflict = int(row[0]), int(row[1]), bool(row[2])
            if conflict:
                _resolve(job.future, sequence_conflict(job.stream_id, job.expected, head))
                continue
            _resolve(job.future, AppendResult(first, head, job.artifact_ids))
            # Local subscribers need not wait for the NOTIFY's round trip through the server.
            self._wakeups.notify(job.stream_id)

    # -- events ------------------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        expected: Expected,
        events: Sequence[NewEvent],
        *,
        status: StreamStatus | None = None,
        artifacts: Sequence[NewArtifact] = (),
    ) -> AppendResult:
        """Queue the append for its writer's next group commit and wait for its own outcome."""
        if not events:
            raise empty_batch()
        if self._closing or not self._writer_tasks:
            raise RuntimeError("PostgresStoreBackend is closed or not open")
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        shard = self._shard(stream_id)
        self._queues[shard].append(_AppendJob(stream_id, expected, events, status, artifacts, future))
        self._queued[shard].set()
        return await future

    async def read(self, stream_id: str, from_seq: int, limit: int) -> EventPage:
        """A forward page and the head, from one snapshot (one statement)."""
        start = max(1, from_seq)
        rows = await self._query(_READ, stream_id, start, max(0, limit))
        head = int(rows[0][0])
        events = [
            StoredEvent(stream_id, int(r[1]), str(r[2]), bytes(r[3]), int(r[4]))
            for r in rows
            if r[1] is not None
        ]
        return page_of(events, head)

    async def trim(self, stream_id: str, before_seq: int) -> TrimResult:
        """Delete events below `before_seq` with one statement (safe to repeat on a fresh connection)."""
        rows = await self._query(_TRIM, stream_id, before_seq)
        head, removed = int(rows[0][0]), int(rows[0][1])
        if before_seq > head + 1:
            raise trim_past_head(stream_id, before_seq, head)
        return TrimResult(removed, head)

    async def head(self, stream_id: str) -> StreamHead:
        """The head and label from the streams table (0, UNSPECIFIED for an unknown stream)."""
        rows = await self._query("SELECT head_seq, status FROM streams WHERE stream_id = $1", stream_id)
        if not rows:
            return StreamHead(0, StreamStatus.UNSPECIFIED)
        return StreamHead(int(rows[0][0]), StreamStatus(int(rows[0][1])))

    async def list_streams(
        self,
        *,
        statuses: Collection[StreamStatus] = (),
        prefix: str = "",
        page_size: int = 100,
        page_token: str = "",
    ) -> StreamPage:
        """Newest first by creation order; the token carries the last row's creation order."""
        before = decode_page_token(_TOKEN_PREFIX, page_token) if page_token else FIRST_PAGE_POSITION
        where = ["sid < $1"]
        params: list[Any] = [before]
        if statuses:
            params.append([int(s) for s in statuses])
            where.append(f"status = ANY(${len(params)}::int2[])")
        if prefix:
            params.append(prefix)
            where.append(f"starts_with(stream_id, ${len(params)})")
        params.append(page_size + 1)
        rows = await self._query(
            "SELECT sid, stream_id, head_seq, status, created_at_us, updated_at_us FROM streams "
            f"WHERE {' AND '.join(where)} ORDER BY sid DESC LIMIT ${len(params)}",
            *params,
        )
        more = len(rows) > page_size
        rows = rows[:page_size]
        streams = tuple(
            StreamInfo(str(r[1]), int(r[2]), StreamStatus(int(r[3])), int(r[4]), int(r[5])) for r in rows
        )
        return StreamPage(
            streams, encode_page_token(_TOKEN_PREFIX, int(rows[-1][0])) if more and rows else ""
        )

    async def subscribe(self, stream_id: str, after_seq: int) -> AsyncIterator[StoredEvent]:
        """Catch up from the database, then sleep until a NOTIFY (from any replica) wakes us."""
        seq = after_seq
        outage_delay = RECONNECT_MIN_S
        while not self._wakeups.closed:
            # Arm before reading: a commit landing between the read and the wait still wakes us.
            wake = self._wakeups.arm(stream_id)
            self._waiting.add(wake)
            try:
                try:
                    page = await self.read(stream_id, seq + 1, 1000)
                except KeelError as error:
                    if error.category is not ErrorCategory.UNAVAILABLE:
                        raise
                    # Nothing can commit while the database is away; try again after a back-off
                    # or as soon as the LISTEN connection is back (which wakes us).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), outage_delay)
                    outage_delay = min(outage_delay * 2, RECONNECT_MAX_S)
                    continue
                outage_delay = RECONNECT_MIN_S
                if not page.events:
                    await wake.wait()
                    continue
            finally:
                self._waiting.discard(wake)
                self._wakeups.disarm(stream_id, wake)
            for event in page.events:
                yield event
                seq = event.seq

    # -- artifacts ---------------------------------------------------------------------------

    async def put_artifact(self, kind: str, chunks: AsyncIterable[bytes]) -> ArtifactPut:
        """Hash while writing chunk rows in one transaction; publish, or roll back if stored already.

        A failed or abandoned upload rolls back, so it leaves no chunk behind. Memory stays at
        about one chunk whatever the artifact's size.
        """
        async with self._uploads:
            with database_errors():
                async with self.pool.acquire(timeout=self._connect_timeout_s) as conn:
                    return await self._upload(conn, kind, chunks)

    async def _upload(
        self, conn: asyncpg.pool.PoolConnectionProxy[Record], kind: str, chunks: AsyncIterable[bytes]
    ) -> ArtifactPut:
        blob_id = uuid.uuid4()
        hasher = hashlib.sha256()
        size = 0
        index = 0
        pending = bytearray()
        transaction = conn.transaction()
        started = False
        try:
            async for chunk in chunks:
                hasher.update(chunk)
                size += len(chunk)
                pending += chunk
                while len(pending) > ARTIFACT_CHUNK_BYTES:
                    if not started:
                        await transaction.start()
                        started = True
                    await conn.execute(_INSERT_CHUNK, blob_id, index, bytes(pending[:ARTIFACT_CHUNK_BYTES]))
                    del pending[:ARTIFACT_CHUNK_BYTES]
                    index += 1
            artifact_id = "sha256:" + hasher.hexdigest()
            if pending:
                published = await conn.fetchval(
                    _PUBLISH_WITH_CHUNK, artifact_id, kind, size, blob_id, index, bytes(pending)
                )
            else:
                published = await conn.fetchval(_INSERT_ARTIFACT, artifact_id, kind, size, blob_id)
            created = bool(published)
        except BaseException:
            if started:
                await transaction.rollback()
            raise
        if started:
            # A repeat of stored bytes: drop the chunks we staged instead of keeping a copy.
            await (transaction.commit() if created else transaction.rollback())
        return ArtifactPut(artifact_id, size, created)

    async def get_artifact(self, artifact_id: str) -> ArtifactDownload:
        """Look the artifact up now (NOT_FOUND before any byte), then stream its chunk rows."""
        row = await self._artifact_row(artifact_id)
        if row is None:
            raise artifact_not_found(artifact_id)
        info, blob_id = row
        return ArtifactDownload(info, self._chunks(blob_id))

    async def has_artifact(self, artifact_id: str) -> ArtifactInfo | None:
        """The artifact's info, or None."""
        row = await self._artifact_row(artifact_id)
        return None if row is None else row[0]

    async def _artifact_row(self, artifact_id: str) -> tuple[ArtifactInfo, uuid.UUID] | None:
        rows = await self._query(
            "SELECT kind, size, blob_id FROM artifacts WHERE artifact_id = $1", artifact_id
        )
        if not rows:
            return None
        kind, size, blob_id = rows[0]
        return ArtifactInfo(artifact_id, str(kind), int(size)), blob_id

    async def _chunks(self, blob_id: uuid.UUID) -> AsyncIterator[bytes]:
        # One row per round trip: memory stays at one chunk however large the artifact is.
        index = 0
        while True:
            rows = await self._query(
                "SELECT data FROM artifact_chunks WHERE blob_id = $1 AND idx = $2", blob_id, index
            )
            if not rows:
                return
            yield bytes(rows[0][0])
            index += 1


__all__ = ["DEFAULT_SCHEMA", "Durability", "PostgresStoreBackend", "artifact_id_of"]
