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
- Outages: every driver error passes through `errors.translate_error`; a lost or
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
import functools
import logging
import uuid
import zlib
from collections.abc import AsyncIterable, Mapping, Sequence
from typing import Any, Literal, cast

import asyncpg

from keel_core.errors import unavailable
from store_service.artifact_chunks import ChunkedUpload, split_chunks
from store_service.backend import (
    AppendResult,
    ArtifactPut,
    EventPage,
    ExpectedKind,
    StoredEvent,
    TrimResult,
    page_of,
    sequence_conflict,
    trim_past_head,
)
from store_service.group_commit import AppendJob, AppendOutcome, WriteQueue
from store_service.postgres.errors import LOST_RACE, database_errors, is_lost_connection, translate_error
from store_service.postgres.listener import PostgresListener
from store_service.postgres.schema import check_schema_name, migrate
from store_service.sql_backend import Row, SqlStoreBackend, store_closed

log = logging.getLogger(__name__)

Durability = Literal["full", "normal"]
Record = asyncpg.Record

DEFAULT_SCHEMA = "keel"
# A group stops growing at this many appends or bytes: bounds one transaction's work and latency.
MAX_GROUP_APPENDS = 512
MAX_GROUP_BYTES = 8 * 1024 * 1024
# A group whose events collided with another replica's is retried this often before giving up.
CAS_RETRIES = 4
_KIND_CODES = {ExpectedKind.EXACT: 0, ExpectedKind.NO_STREAM: 1, ExpectedKind.ANY: 2}

# The fourth column is the time append_group recorded the events with (the same expression, the
# same statement: statement_timestamp() is when the statement arrived); the fifth, for a repeat of
# an append committed before under the same key, that one's time (0 otherwise).
_APPEND_GROUP = (
    "SELECT out_first, out_head, out_conflict, {now}, out_repeat_at FROM append_group("
    "$1::text[], $2::int2[], $3::int8[], $4::int4[], $5::int2[], $6::int4[], $7::text[], $8::bytea[], "
    "$9::int4[], $10::text[], $11::text[], $12::int8[], $13::int4[], $14::bytea[], $15::text, $16::text[], "
    "$17::int4[])"
)
# A group carrying artifacts first renews the stored time of those already stored (an artifact
# collection deletes only what was not stored again since it looked: store_service.backend), at
# most once a minute per artifact. `ready` reads the UPDATE to its end and append_group takes an
# argument from it, so the renewal happens before the append, in the same statement: a collection
# deleting the artifact meanwhile either commits first (append_group then stores it anew) or finds
# it renewed.
_APPEND_GROUP_RENEWING = (
    "WITH renewed AS (UPDATE artifacts SET created_at_us = {now} WHERE artifact_id = ANY($10::text[]) "
    "AND created_at_us < {now} - $18::int8 RETURNING 1), ready AS (SELECT count(*) AS n FROM renewed) "
    "SELECT g.out_first, g.out_head, g.out_conflict, {now}, g.out_repeat_at "
    "FROM ready CROSS JOIN LATERAL append_group("
    "$1::text[], $2::int2[], $3::int8[], $4::int4[], $5::int2[], $6::int4[], $7::text[], $8::bytea[], "
    "$9::int4[], $10::text[], $11::text[], $12::int8[], $13::int4[], $14::bytea[], "
    "CASE WHEN ready.n >= 0 THEN $15::text END, $16::text[], $17::int4[]) AS g"
)
# Attributes of the appends of a group that committed, keyed by the streams rows just written.
_SET_ATTRIBUTES = (
    "INSERT INTO stream_attributes (sid, key, value) "
    "SELECT s.sid, u.key, u.value "
    "FROM unnest($1::text[], $2::text[], $3::text[]) AS u(stream_id, key, value) "
    "JOIN streams s ON s.stream_id = u.stream_id "
    "ON CONFLICT (sid, key) DO UPDATE SET value = excluded.value"
)
# Due times of the appends of a group that committed: set (upsert) or cleared (0 deletes).
_SET_DUE = (
    "INSERT INTO stream_due (stream_id, due_at_us) "
    "SELECT u.stream_id, u.due_at_us FROM unnest($1::text[], $2::int8[]) AS u(stream_id, due_at_us) "
    "WHERE u.due_at_us > 0 "
    "ON CONFLICT (stream_id) DO UPDATE SET due_at_us = excluded.due_at_us"
)
_CLEAR_DUE = "DELETE FROM stream_due WHERE stream_id = ANY($1::text[])"
# Only a PARKED stream's due time moves (status 5). The stream's row is share-locked first: a
# concurrent append to it (a RunResumed clearing its due time) is waited for and its status read
# again, so a nudge never leaves a due time on a stream that is no longer parked.
_NUDGE_DUE = (
    "WITH s AS (SELECT stream_id FROM streams WHERE stream_id = $1 AND status = 5 FOR SHARE), "
    "n AS (INSERT INTO stream_due (stream_id, due_at_us) SELECT stream_id, $2 FROM s "
    "ON CONFLICT (stream_id) DO UPDATE SET due_at_us = LEAST(stream_due.due_at_us, excluded.due_at_us) "
    "RETURNING 1) "
    "SELECT EXISTS (SELECT 1 FROM s)"
)
# An append's nudges, in its group's transaction: the PARKED ones among these streams become due by
# their time. A stream some other transaction is appending to right now is skipped (SKIP LOCKED):
# waiting for it could deadlock with a group that nudges this group's streams, and that append is
# the stream's own writer (a RunResumed: it is no longer parked; a RunParked: its driver looks at
# its waits once more after it lands, and the nudging engine wakes it too).
_NUDGE_MANY = (
    "WITH parked AS (SELECT s.stream_id, u.due_at_us "
    "FROM unnest($1::text[], $2::int8[]) AS u(stream_id, due_at_us) "
    "JOIN streams s ON s.stream_id = u.stream_id WHERE s.status = 5 "
    "ORDER BY s.stream_id FOR SHARE OF s SKIP LOCKED) "
    "INSERT INTO stream_due (stream_id, due_at_us) SELECT stream_id, due_at_us FROM parked "
    "ON CONFLICT (stream_id) DO UPDATE SET due_at_us = LEAST(stream_due.due_at_us, excluded.due_at_us)"
)
# The heads an append group reports (AppendJob.report_heads): the streams that have any.
_HEADS_OF = "SELECT stream_id, head_seq FROM streams WHERE stream_id = ANY($1::text[])"
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
_APPEND_GROUP = _APPEND_GROUP.format(now=_NOW_US)
_APPEND_GROUP_RENEWING = _APPEND_GROUP_RENEWING.format(now=_NOW_US)
# A put of bytes already stored renews them before it publishes (see _APPEND_GROUP_RENEWING).
_STALE = f"created_at_us < {_NOW_US} - $2"
_RENEW_ARTIFACT = f"UPDATE artifacts SET created_at_us = {_NOW_US} WHERE artifact_id = $1 AND {_STALE}"
# Deletes: whole streams (attributes first: they reference the streams rows), and artifacts not
# renewed since the collection's cut-off, with their chunks, each in one transaction.
_DELETE_STREAM_ATTRIBUTES = (
    "DELETE FROM stream_attributes WHERE sid IN (SELECT sid FROM streams WHERE stream_id = ANY($1::text[]))"
)
_DELETE_STREAM_EVENTS = "DELETE FROM events WHERE stream_id = ANY($1::text[])"
_DELETE_STREAM_ROWS = (
    "WITH d AS (DELETE FROM streams WHERE stream_id = ANY($1::text[]) RETURNING 1) SELECT count(*) FROM d"
)
_DELETE_ARTIFACTS = (
    "WITH d AS (DELETE FROM artifacts WHERE artifact_id = ANY($1::text[]) AND created_at_us < $2 "
    "RETURNING artifact_id, blob_id), "
    "c AS (DELETE FROM artifact_chunks WHERE blob_id IN (SELECT blob_id FROM d)) "
    "SELECT artifact_id FROM d"
)
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


@functools.lru_cache(maxsize=256)
def numbered(sql: str) -> str:
    """`sql` with its `?` placeholders numbered as asyncpg wants them (`$1`, `$2`, ...)."""
    first, *rest = sql.split("?")
    return first + "".join(f"${number}{part}" for number, part in enumerate(rest, start=1))


async def _fetch_on(
    conn: asyncpg.pool.PoolConnectionProxy[Record], query: str, args: Sequence[object]
) -> list[Record]:
    try:
        return await conn.fetch(query, *args)
    except asyncpg.InternalClientError:
        # The protocol's state is unknown now: never hand this connection to anyone again.
        conn.terminate()
        raise


async def _keep_session(_conn: asyncpg.Connection[Record]) -> None:
    """Pool reset hook: our sessions carry no state to reset, so skip the extra round trip."""


def _group_arguments(group: Sequence[AppendJob], channel: str) -> list[Any]:
    """The `append_group` call's parallel arrays for `group`, in order."""
    stream_ids, kinds, expected, counts, statuses = [], [], [], [], []
    owners_of_events: list[int] = []
    types: list[str] = []
    payloads: list[bytes] = []
    owners, art_ids, art_kinds, art_sizes, art_chunks = [], [], [], [], []
    chunk_data: list[bytes] = []
    keys: list[str | None] = []
    same: list[int] = []  # per append: the last earlier one with its stream and key (1-based), or 0
    last_keyed: dict[tuple[str, str], int] = {}
    for number, job in enumerate(group, start=1):
        keys.append(job.append_key)
        if job.append_key is None:
            same.append(0)
        else:
            same.append(last_keyed.get((job.stream_id, job.append_key), 0))
            last_keyed[job.stream_id, job.append_key] = number
        stream_ids.append(job.stream_id)
        kinds.append(_KIND_CODES[job.expected.kind])
        expected.append(job.expected.seq)
        counts.append(len(job.events))
        statuses.append(None if job.status is None else int(job.status))
        owners_of_events.extend([number] * len(job.events))
        for type_name, payload in job.events:
            types.append(type_name)
            payloads.append(payload)
        for artifact, artifact_id in zip(job.artifacts, job.artifact_ids, strict=True):
            chunks = split_chunks(artifact.data)
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
        keys,
        same,
    ]


def _contended(job: AppendJob) -> BaseException:
    return unavailable(
        "store_contention",
        f"stream {job.stream_id!r} is being appended to by other writers too fast to win; retry",
    )


class PostgresStoreBackend(SqlStoreBackend):
    """The store on PostgreSQL: group commit, a database-enforced CAS, LISTEN/NOTIFY wake-ups."""

    TOKEN_PREFIX = b"pg-streams:v1:"

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
        super().__init__(
            writers=writers, max_group_appends=MAX_GROUP_APPENDS, max_group_bytes=MAX_GROUP_BYTES
        )
        self.dsn = dsn
        self.schema = check_schema_name(schema)
        self.durability: Durability = durability
        self.channel = f"keel_store_events.{schema}"
        self._min_connections = max(1, min(min_connections, max_connections))
        self._max_connections = max_connections
        self._command_timeout_s = command_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._pool: asyncpg.Pool[Record] | None = None
        self._listener = PostgresListener(
            self._connect, self.channel, self._wakeups.notify, self._wake_everyone
        )
        # Uploads hold a connection for their whole transaction; leave the rest for everyone else.
        self._uploads = asyncio.Semaphore(max(1, max_connections // 3))

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

    async def _open_database(self) -> None:
        """Migrate the schema, open the pool and the LISTEN connection."""
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

    async def _close_database(self) -> None:
        """Close the LISTEN connection and the pool."""
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
            raise store_closed()
        return self._pool

    def _translate(self, error: Exception) -> BaseException:
        return translate_error(error)

    def _status_filter(self, statuses: list[int]) -> tuple[str, list[Any]]:
        return "status = ANY(?::int2[])", [statuses]

    def _prefix_filter(self, prefix: str) -> tuple[str, list[Any]]:
        return "starts_with(stream_id, ?)", [prefix]

    async def _fetch(self, query: str, args: Sequence[object]) -> list[Record]:
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
        self._check_open()
        for _ in range(READ_ATTEMPTS - 1):
            try:
                async with self.pool.acquire(timeout=self._connect_timeout_s) as conn:
                    return await _fetch_on(conn, query, args)
            except Exception as error:
                if not is_lost_connection(error):
                    raise translate_error(error) from error
                log.info("pooled connection was dead (%s); repeating the read on another", error)
        return await self._fetch(query, args)

    async def _select(self, sql: str, params: Sequence[Any]) -> Sequence[Row]:
        # asyncpg's Record is indexable like a row, though its stubs do not call it a Sequence.
        return cast("Sequence[Row]", await self._query(numbered(sql), *params))

    # -- the writers -------------------------------------------------------------------------

    def _queue_for(self, stream_id: str) -> WriteQueue:
        # One stream always goes through one writer, so groups in flight at once never collide.
        return self._queues[zlib.crc32(stream_id.encode()) % len(self._queues)]

    async def _commit_group(self, group: list[AppendJob]) -> list[AppendOutcome]:
        # Stream order: every replica then locks stream rows in the same order, so two groups
        # never deadlock. The sort is stable, so one stream's appends keep their order.
        ordered = sorted(group, key=lambda job: job.stream_id)
        outcomes = dict(zip(map(id, ordered), await self._commit_ordered(ordered), strict=True))
        return [outcomes[id(job)] for job in group]

    async def _commit_ordered(self, group: list[AppendJob]) -> list[AppendOutcome]:
        """Commit `group` with one call; retry when another replica won a sequence under us."""
        for attempt in range(CAS_RETRIES):
            try:
                async with self.pool.acquire(timeout=self._connect_timeout_s) as conn:
                    rows, heads = await self._append_on(conn, group)
            except LOST_RACE as error:
                # Another replica committed (or locked) events or a new stream row of one of these
                # streams after our head read, and the whole transaction was rolled back. A retry
                # reads the new heads: the loser now gets its sequence_conflict, the rest commit.
                log.info("append group lost a race to another writer (attempt %d): %s", attempt + 1, error)
                continue
            return [self._outcome(job, row, heads) for job, row in zip(group, rows, strict=True)]
        if len(group) == 1:
            return [_contended(group[0])]
        # Still losing as a group: each append on its own, each with its own outcome.
        outcomes: list[AppendOutcome] = []
        for job in group:
            try:
                outcomes.extend(await self._commit_ordered([job]))
            except Exception as error:
                outcomes.append(translate_error(error))
        return outcomes

    async def _append_on(
        self, conn: asyncpg.pool.PoolConnectionProxy[Record], group: list[AppendJob]
    ) -> tuple[list[Record], dict[str, int]]:
        """Call append_group (renewing the stored time of the group's artifacts first, in the same
        statement); if the group sets attributes or due times, set those of the appends that committed
        in the same transaction, and their nudges, and read the heads its appends report (more round
        trips, only for such groups). Returns append_group's rows and the reported heads."""
        call, arguments = _APPEND_GROUP, _group_arguments(group, self.channel)
        if any(job.artifacts for job in group):
            call, arguments = _APPEND_GROUP_RENEWING, [*arguments, self.renew_after_us]
        if not any(
            job.attributes or job.due_at_us is not None or job.nudges or job.report_heads for job in group
        ):
            return await _fetch_on(conn, call, arguments), {}
        async with conn.transaction():
            rows = await _fetch_on(conn, call, arguments)
            reported = {
                sid for job, row in zip(group, rows, strict=True) if not row[2] for sid in job.report_heads
            }
            heads: dict[str, int] = {}
            if reported:
                found = await _fetch_on(conn, _HEADS_OF, [sorted(reported)])
                heads = {str(row[0]): int(row[1]) for row in found}
            # What wrote its events now: not a conflict, nor a repeat (its first try set all this).
            written = [job for job, row in zip(group, rows, strict=True) if not row[2] and not row[4]]
            due: dict[str, int] = {}  # later appends of the group win
            for job in written:
                if job.due_at_us is not None:
                    due[job.stream_id] = job.due_at_us
            if due:
                await _fetch_on(conn, _CLEAR_DUE, [[sid for sid, at in due.items() if at <= 0]])
                await _fetch_on(conn, _SET_DUE, [list(due), list(due.values())])
            nudges: dict[str, int] = {}  # one row per stream for ON CONFLICT: the soonest time
            for job in written:
                for sid, at in job.nudges.items():
                    nudges[sid] = min(at, nudges.get(sid, at))
            if nudges:
                await _fetch_on(conn, _NUDGE_MANY, [list(nudges), list(nudges.values())])
            # Later appends of the group win for a key; one row per (stream, key) for ON CONFLICT.
            chosen: dict[tuple[str, str], str] = {}
            for job in written:
                chosen.update(((job.stream_id, key), value) for key, value in job.attributes.items())
            if chosen:
                await _fetch_on(
                    conn,
                    _SET_ATTRIBUTES,
                    [[k[0] for k in chosen], [k[1] for k in chosen], list(chosen.values())],
                )
        return rows, heads

    @staticmethod
    def _outcome(job: AppendJob, row: Record, heads: Mapping[str, int]) -> AppendOutcome:
        first, head, conflict, repeat_at = int(row[0]), int(row[1]), bool(row[2]), int(row[4])
        if conflict:
            return sequence_conflict(job.stream_id, job.expected, head)
        reported = tuple(heads.get(sid, 0) for sid in job.report_heads)
        if repeat_at:
            return AppendResult(first, head, job.artifact_ids, reported, repeat_at, repeated=True)
        return AppendResult(first, head, job.artifact_ids, reported, int(row[3]))

    # -- events ------------------------------------------------------------------------------

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

    async def delete_streams(self, stream_ids: Sequence[str]) -> int:
        """Delete whole streams in one transaction (attributes, events, head rows)."""
        if not stream_ids:
            return 0
        ids = sorted(set(stream_ids))
        self._check_open()
        with database_errors():
            async with self.pool.acquire(timeout=self._connect_timeout_s) as conn, conn.transaction():
                await conn.execute(_DELETE_STREAM_ATTRIBUTES, ids)
                await conn.execute(_DELETE_STREAM_EVENTS, ids)
                await conn.execute(_CLEAR_DUE, ids)
                return int(await conn.fetchval(_DELETE_STREAM_ROWS, ids))

    async def nudge_due(self, stream_id: str, due_at_us: int) -> bool:
        """One statement (safe to repeat on a fresh connection: moving it earlier again is a no-op)."""
        rows = await self._query(_NUDGE_DUE, stream_id, due_at_us)
        return bool(rows[0][0])

    # -- artifacts ---------------------------------------------------------------------------

    async def delete_artifacts(self, artifact_ids: Sequence[str], stored_before_us: int) -> list[str]:
        """Delete the artifacts not renewed since `stored_before_us`, with their chunks (one statement)."""
        if not artifact_ids:
            return []
        rows = await self._query(_DELETE_ARTIFACTS, sorted(set(artifact_ids)), stored_before_us)
        return [str(row[0]) for row in rows]

    async def put_artifact(self, kind: str, chunks: AsyncIterable[bytes]) -> ArtifactPut:
        """Hash while writing chunk rows in one transaction; publish, or roll back if stored already.

        A failed or abandoned upload rolls back, so it leaves no chunk behind. Memory stays at
        about one chunk whatever the artifact's size.
        """
        self._check_open()
        async with self._uploads:
            with database_errors():
                async with self.pool.acquire(timeout=self._connect_timeout_s) as conn:
                    return await self._upload(conn, kind, chunks)

    async def _upload(
        self, conn: asyncpg.pool.PoolConnectionProxy[Record], kind: str, chunks: AsyncIterable[bytes]
    ) -> ArtifactPut:
        blob_id = uuid.uuid4()
        upload = ChunkedUpload()
        index = 0
        transaction = conn.transaction()
        started = False
        try:
            async for data in upload.full_chunks(chunks):
                if not started:
                    await transaction.start()
                    started = True
                await conn.execute(_INSERT_CHUNK, blob_id, index, data)
                index += 1
            artifact_id = upload.artifact_id
            await conn.execute(_RENEW_ARTIFACT, artifact_id, self.renew_after_us)
            if upload.last:
                published = await conn.fetchval(
                    _PUBLISH_WITH_CHUNK, artifact_id, kind, upload.size, blob_id, index, upload.last
                )
            else:
                published = await conn.fetchval(_INSERT_ARTIFACT, artifact_id, kind, upload.size, blob_id)
            created = bool(published)
        except BaseException:
            if started:
                await transaction.rollback()
            raise
        if started:
            # A repeat of stored bytes: drop the chunks we staged instead of keeping a copy.
            await (transaction.commit() if created else transaction.rollback())
        return ArtifactPut(artifact_id, upload.size, created)


__all__ = ["DEFAULT_SCHEMA", "Durability", "PostgresStoreBackend", "numbered"]
