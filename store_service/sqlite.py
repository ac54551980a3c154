"""SqliteStoreBackend: the StoreBackend contract on one SQLite file (WAL mode).

Writes go through ONE writer (`SqliteWriter`, a sqlite3 connection on its own thread) fed by one
task. Appends that arrive while the previous transaction commits queue up and are then committed
together: one call on the writer thread, one `BEGIN IMMEDIATE`, one head lookup for the whole
group, one multi-row INSERT per table, one `COMMIT` (one fsync). When the event loop is
saturated, the writer also waits a few milliseconds for more appends to join (see `_gather`).
Each append is still checked against its own stream's head (as updated by earlier appends of
the group), so one caller's conflict never fails another. Reads use separate aiosqlite
connections and, thanks to WAL, never wait for the writer. Subscribers are woken in-process
after each commit, never by polling.

Durability:
- ``full`` (default): ``synchronous=FULL``; the WAL is fsynced at every commit, so an
  acknowledged append or artifact survives a process kill *and* an OS crash or power loss.
- ``normal``: ``synchronous=NORMAL``; commits are not fsynced (the WAL is synced only at
  checkpoints). An acknowledged write survives a kill of the store process, but the last
  transactions may be lost on power loss or an OS crash. Faster where fsync is slow.

One store process per data directory: the writer assumes it is the only one appending (the
unique key on (stream_id, seq) still refuses anything that would break the sequence).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import itertools
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

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
)
from store_service.sqlite_writer import AppendRequest, ChunkRow, Durability, SqliteWriter
from store_service.stream_wakeups import StreamWakeups

log = logging.getLogger(__name__)

DATABASE_FILE = "keel-store.sqlite3"
T = TypeVar("T")

# Appends committed in one transaction at most; bounds the work (and latency) of one group.
MAX_GROUP_APPENDS = 1024
# Group gathering under load (see `_gather`): a yield of the event loop that takes longer than
# BUSY_TURN_S means the loop is saturated; then the writer waits for more appends in quanta of
# GATHER_QUANTUM_S (asyncio timers have ~1 ms resolution), GATHER_QUANTA of them at most.
BUSY_TURN_S = 0.0005
GATHER_QUANTUM_S = 0.001
GATHER_QUANTA = 4
# An artifact upload is staged in transactions of about this many bytes.
STAGE_BYTES = 4 * ARTIFACT_CHUNK_BYTES
_TOKEN_PREFIX = b"sqlite-streams:v1:"


class _AppendJob:
    """One caller's append waiting for the writer; its future gets the caller's own outcome."""

    __slots__ = ("future", "request")

    def __init__(self, request: AppendRequest, future: asyncio.Future[AppendResult]) -> None:
        self.request = request
        self.future = future


class _WriteJob:
    """Any other write (artifact staging and publishing), run alone on the writer thread."""

    __slots__ = ("future", "run")

    def __init__(self, run: Callable[[SqliteWriter], Any], future: asyncio.Future[Any] | None) -> None:
        self.run = run
        self.future = future


def _resolve(future: asyncio.Future[T] | None, outcome: T | BaseException) -> None:
    # A caller cancelled while queued has no one to tell; its write may still have happened.
    if future is None or future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def translate(error: sqlite3.Error) -> KeelError:
    """The one place SQLite driver errors become KeelErrors.

    OperationalError is the database being busy, locked, out of space or unreadable: the
    request itself was fine, so it is UNAVAILABLE and retryable. Anything else is a store fault.
    """
    if isinstance(error, sqlite3.OperationalError):
        return unavailable("store_unavailable", f"the store's database cannot serve this now: {error}")
    return KeelError("store_failed", f"the store's database failed: {error}", category=ErrorCategory.INTERNAL)


class SqliteStoreBackend(StoreBackend):
    """The store on one SQLite file in WAL mode, with group commit and in-process wake-ups."""

    def __init__(self, path: str | Path, *, durability: Durability = "full", readers: int = 2) -> None:
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', got {durability!r}")
        self.path = Path(path)
        self.durability: Durability = durability
        self._reader_count = max(1, readers)
        # One thread, so the sqlite3 connection is always used from the thread that made it.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keel-sqlite-writer")
        self._writer: SqliteWriter | None = None
        self._readers: list[aiosqlite.Connection] = []
        self._next_reader: Callable[[], aiosqlite.Connection] = self._no_reader
        self._queue: collections.deque[_AppendJob | _WriteJob | None] = collections.deque()
        self._queued = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._wakeups = StreamWakeups()
        self._closing = False

    @classmethod
    def in_directory(cls, data_dir: str | Path, *, durability: Durability = "full") -> SqliteStoreBackend:
        """A backend on `data_dir/keel-store.sqlite3` (the directory is created on open)."""
        return cls(Path(data_dir) / DATABASE_FILE, durability=durability)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the file and schema, start the writer task, open the read connections."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._on_writer_thread(partial(SqliteWriter, self.path, self.durability))
        for _ in range(self._reader_count):
            reader = await aiosqlite.connect(self.path, isolation_level=None)
            # WAL readers can meet a brief lock while the writer checkpoints; wait, don't fail.
            await reader.execute("PRAGMA busy_timeout=5000")
            await reader.execute("PRAGMA query_only=1")
            self._readers.append(reader)
        self._next_reader = itertools.cycle(self._readers).__next__
        self._writer_task = asyncio.create_task(self._write_loop(), name="sqlite-store-writer")

    async def close(self) -> None:
        """Commit everything queued, end subscriptions, close the connections."""
        if self._closing:
            return
        self._closing = True
        self._wakeups.close()
        if self._writer_task is not None:
            self._queue.append(None)
            self._queued.set()
            await self._writer_task
        for reader in self._readers:
            await reader.close()
        self._readers.clear()
        if self._writer is not None:
            await self._on_writer_thread(self._writer.close)
            self._writer = None
        self._thread.shutdown(wait=True)

    @staticmethod
    def _no_reader() -> aiosqlite.Connection:
        raise RuntimeError("SqliteStoreBackend used before open()")

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        """Run a read on the next read connection; driver errors become KeelErrors."""
        try:
            return list(await self._next_reader().execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise translate(exc) from exc

    async def synchronous(self) -> int:
        """The writer's PRAGMA synchronous (2 = FULL, 1 = NORMAL), for checks and diagnostics."""
        return await self._write(SqliteWriter.synchronous)

    # -- the writer --------------------------------------------------------------------------

    async def _on_writer_thread(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    def _enqueue(self, job: _AppendJob | _WriteJob) -> None:
        if self._closing or self._writer_task is None:
            raise unavailable(
                "store_unavailable", "the store is closed or shutting down; retry elsewhere or later"
            )
        self._queue.append(job)
        self._queued.set()

    async def _write(self, run: Callable[[SqliteWriter], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._enqueue(_WriteJob(run, future))
        return await future

    async def _write_loop(self) -> None:
        """Take whatever is queued: consecutive appends form one group, anything else runs alone."""
        writer = self._writer
        assert writer is not None
        while True:
            if not self._queue:
                self._queued.clear()
                await self._queued.wait()
            await self._gather()
            group: list[_AppendJob] = []
            while self._queue and len(group) < MAX_GROUP_APPENDS and isinstance(self._queue[0], _AppendJob):
                group.append(self._queue.popleft())  # type: ignore[arg-type]
            if group:
                await self._commit_group(writer, group)
                continue
            job = self._queue.popleft()
            if job is None:
                return
            assert isinstance(job, _WriteJob)
            try:
                result = await self._on_writer_thread(partial(job.run, writer))
            except sqlite3.Error as exc:
                _resolve(job.future, translate(exc))
            except Exception as exc:
                _resolve(job.future, exc)
            else:
                _resolve(job.future, result)

    async def _gather(self) -> None:
        """Let appends that are already on their way join the next group; wait only under load.

        Every commit costs an fsync and two thread hand-offs whatever its size. With few callers
        it is better to commit at once and overlap the commit with their round trips. But when
        the event loop is saturated (one turn of it took over BUSY_TURN_S: many requests were
        being parsed), CPU per append is what bounds throughput, and bigger groups cut it: the
        writer then waits one quantum at a time while more appends keep arriving, up to
        GATHER_QUANTA quanta (4 ms). The same idea as PostgreSQL's commit_delay/commit_siblings.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(0)
        if loop.time() - started < BUSY_TURN_S:
            return
        for _ in range(GATHER_QUANTA):
            queued = len(self._queue)
            await asyncio.sleep(GATHER_QUANTUM_S)
            if len(self._queue) == queued or len(self._queue) >= MAX_GROUP_APPENDS:
                return

    async def _commit_group(self, writer: SqliteWriter, group: list[_AppendJob]) -> None:
        requests = [job.request for job in group]
        try:
            outcomes = await self._on_writer_thread(partial(writer.commit_appends, requests))
        except Exception as exc:
            log.exception("a group of %d appends failed to commit", len(group))
            error = translate(exc) if isinstance(exc, sqlite3.Error) else exc
            for job in group:
                _resolve(job.future, error)
            return
        for job, outcome in zip(group, outcomes, strict=True):
            _resolve(job.future, outcome)
            if not isinstance(outcome, KeelError):
                self._wakeups.notify(job.request.stream_id)

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
        """Queue the append for the next group commit and wait for its own outcome."""
        if not events:
            raise empty_batch()
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._enqueue(_AppendJob(AppendRequest(stream_id, expected, events, status, artifacts), future))
        return await future

    async def read(self, stream_id: str, from_seq: int, limit: int) -> EventPage:
        """A forward page, consistent with the head reported alongside it.

        It starts at the first event at or after `from_seq` that a trim kept.
        """
        start = max(1, from_seq)
        head = (await self.head(stream_id)).head_seq
        if head < start:
            return EventPage((), 0, head)
        # Up to the head read above, so the page never runs ahead of the head it reports.
        rows = await self._fetch(
            "SELECT seq, type, payload, recorded_at_us FROM events "
            "WHERE stream_id = ? AND seq BETWEEN ? AND ? ORDER BY seq LIMIT ?",
            (stream_id, start, head, limit),
        )
        events = [StoredEvent(stream_id, int(r[0]), str(r[1]), bytes(r[2]), int(r[3])) for r in rows]
        return page_of(events, head)

    async def trim(self, stream_id: str, before_seq: int) -> TrimResult:
        """Delete events below `before_seq` on the writer (a write, serialized with appends)."""
        return await self._write(partial(SqliteWriter.trim, stream_id=stream_id, before_seq=before_seq))

    async def head(self, stream_id: str) -> StreamHead:
        """The head and label from the streams table (0, UNSPECIFIED for an unknown stream)."""
        rows = await self._fetch("SELECT head_seq, status FROM streams WHERE stream_id = ?", (stream_id,))
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
        where = ["sid < ?"]
        params: list[Any] = [before]
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            params.extend(int(s) for s in statuses)
        if prefix:
            where.append("substr(stream_id, 1, ?) = ?")
            params.extend([len(prefix), prefix])
        params.append(page_size + 1)
        rows = await self._fetch(
            "SELECT sid, stream_id, head_seq, status, created_at_us, updated_at_us FROM streams "
            f"WHERE {' AND '.join(where)} ORDER BY sid DESC LIMIT ?",
            params,
        )
        more = len(rows) > page_size
        rows = rows[:page_size]
        streams = tuple(
            StreamInfo(str(r[1]), int(r[2]), StreamStatus(int(r[3])), int(r[4]), int(r[5])) for r in rows
        )
        token = encode_page_token(_TOKEN_PREFIX, int(rows[-1][0])) if more else ""
        return StreamPage(streams, token)

    async def subscribe(self, stream_id: str, after_seq: int) -> AsyncIterator[StoredEvent]:
        """Catch up from the database, then sleep until a commit to this stream wakes us."""
        seq = after_seq
        while not self._wakeups.closed:
            # Arm before reading: a commit landing between the read and the wait still wakes us.
            wake = self._wakeups.arm(stream_id)
            try:
                page = await self.read(stream_id, seq + 1, 1000)
                if not page.events:
                    await wake.wait()
                    continue
            finally:
                self._wakeups.disarm(stream_id, wake)
            for event in page.events:
                yield event
                seq = event.seq

    # -- artifacts ---------------------------------------------------------------------------

    async def put_artifact(self, kind: str, chunks: AsyncIterable[bytes]) -> ArtifactPut:
        """Stage the bytes in chunk rows while hashing, then publish (or drop) in one transaction."""
        blob_id = uuid.uuid4().hex
        hasher = hashlib.sha256()
        size = index = 0
        staged = False
        pending = bytearray()
        rows: list[ChunkRow] = []
        try:
            async for chunk in chunks:
                hasher.update(chunk)
                size += len(chunk)
                pending += chunk
                while len(pending) >= ARTIFACT_CHUNK_BYTES:
                    rows.append((blob_id, index, bytes(pending[:ARTIFACT_CHUNK_BYTES])))
                    del pending[:ARTIFACT_CHUNK_BYTES]
                    index += 1
                if len(rows) * ARTIFACT_CHUNK_BYTES >= STAGE_BYTES:
                    staged = True
                    await self._write(partial(SqliteWriter.stage, rows=rows))
                    rows = []
            if pending:
                rows.append((blob_id, index, bytes(pending)))
            artifact_id = "sha256:" + hasher.hexdigest()
            created = await self._write(
                partial(
                    SqliteWriter.publish,
                    rows=rows,
                    artifact_id=artifact_id,
                    kind=kind,
                    size=size,
                    blob_id=blob_id,
                )
            )
        except Exception:
            # The upload failed or was refused (the source raised): drop what was staged before
            # saying so, so that whoever hears of the failure finds nothing of it stored.
            if staged and not self._closing:
                await self._drop_staged(blob_id)
            raise
        except BaseException:
            # Cancelled: nothing more may be awaited here, so the clean-up is queued. Best effort;
            # open() also sweeps chunks left by an interrupted upload.
            if staged and not self._closing:
                self._enqueue(_WriteJob(partial(SqliteWriter.drop_blob, blob_id=blob_id), None))
            raise
        return ArtifactPut(artifact_id, size, created)

    async def _drop_staged(self, blob_id: str) -> None:
        try:
            await self._write(partial(SqliteWriter.drop_blob, blob_id=blob_id))
        except Exception:
            # The database failed too; the caller hears of the first failure, and open() sweeps.
            log.warning("could not drop the staged chunks of failed upload %s", blob_id, exc_info=True)

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

    async def _artifact_row(self, artifact_id: str) -> tuple[ArtifactInfo, str] | None:
        rows = await self._fetch(
            "SELECT kind, size, blob_id FROM artifacts WHERE artifact_id = ?", (artifact_id,)
        )
        if not rows:
            return None
        kind, size, blob_id = rows[0]
        return ArtifactInfo(artifact_id, str(kind), int(size)), str(blob_id)

    async def _chunks(self, blob_id: str) -> AsyncIterator[bytes]:
        # One row per round trip: memory stays at one chunk however large the artifact is.
        for index in itertools.count():
            rows = await self._fetch(
                "SELECT data FROM artifact_chunks WHERE blob_id = ? AND idx = ?", (blob_id, index)
            )
            if not rows:
                return
            yield bytes(rows[0][0])


__all__ = ["DATABASE_FILE", "Durability", "SqliteStoreBackend", "artifact_id_of"]
