"""SqliteStoreBackend: the StoreBackend contract on one SQLite file (WAL mode).

Writes go through ONE writer (`SqliteWriter`, a sqlite3 connection used on its own thread, and for
a lone caller's appends on the loop's) fed by one task. Appends that arrive while the previous
transaction commits queue up and are then committed together: one call on the writer thread, one
`BEGIN IMMEDIATE`, one head lookup for the whole group, one multi-row INSERT per table, one
`COMMIT` (one fsync). When the event loop is saturated, the writer also waits a few milliseconds
for more appends to join (see `_before_take`). Each append is still checked against its own
stream's head (as updated by earlier appends of the group), so one caller's conflict never fails
another. A lone caller's appends skip the writer thread (see `_commit_group`). Reads use separate
aiosqlite connections and, thanks to WAL, never wait for the writer's transactions (only their
answers may wait while a lone caller's append commits on the loop's thread). Subscribers are woken
in-process after each commit, never by polling.

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
import concurrent.futures
import itertools
import logging
import sqlite3
import sys
import time
from collections.abc import AsyncIterable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from keel_core.errors import ErrorCategory, KeelError, unavailable
from store_service.artifact_chunks import ChunkedUpload
from store_service.backend import (
    ARTIFACT_CHUNK_BYTES,
    ArtifactPut,
    EventPage,
    ExpectedKind,
    StoredEvent,
    TrimResult,
    page_of,
)
from store_service.group_commit import AppendJob, AppendOutcome, WriteQueue, resolve
from store_service.sql_backend import Row, SqlStoreBackend, store_closed
from store_service.sqlite.writer import ChunkRow, Durability, SqliteWriter, new_blob_id

log = logging.getLogger(__name__)

DATABASE_FILE = "keel-store.sqlite3"
T = TypeVar("T")

# Appends committed in one transaction at most; bounds the work (and latency) of one group.
MAX_GROUP_APPENDS = 1024
# Group gathering under load (see `_before_take`): a yield of the event loop that takes longer than
# BUSY_TURN_S means the loop is saturated; then the writer waits for more appends in quanta of
# GATHER_QUANTUM_S (asyncio timers have ~1 ms resolution), GATHER_QUANTA of them at most.
BUSY_TURN_S = 0.0005
GATHER_QUANTUM_S = 0.001
GATHER_QUANTA = 4
# A lone caller (see `_commit_group`): after this many groups of one append to the same stream in a
# row, the next (of at most INLINE_MAX_BYTES) is committed on the event loop's thread while the last
# commit took at most INLINE_MAX_S.
INLINE_AFTER_SINGLES = 4
INLINE_MAX_S = 0.002
INLINE_MAX_BYTES = 64 * 1024
# An artifact upload is staged in transactions of about this many bytes.
STAGE_BYTES = 4 * ARTIFACT_CHUNK_BYTES


def translate(error: sqlite3.Error) -> KeelError:
    """The one place SQLite driver errors become KeelErrors.

    OperationalError is the database being busy, locked, out of space or unreadable: the
    request itself was fine, so it is UNAVAILABLE and retryable. Anything else is a store fault.
    """
    if isinstance(error, sqlite3.OperationalError):
        return unavailable("store_unavailable", f"the store's database cannot serve this now: {error}")
    return KeelError("store_failed", f"the store's database failed: {error}", category=ErrorCategory.INTERNAL)


# A page and its stream's head in one statement (one snapshot): the head row, joined to the page of
# events up to that head (in the subquery, so that its ORDER BY ... LIMIT walks the primary key).
_HEAD_OF = "coalesce((SELECT head_seq FROM streams WHERE stream_id = ?1), 0)"
_READ = (
    "SELECT h.head_seq, e.seq, e.type, e.payload, e.recorded_at_us "
    f"FROM (SELECT {_HEAD_OF} AS head_seq) AS h "
    "LEFT JOIN (SELECT seq, type, payload, recorded_at_us FROM events "
    f"WHERE stream_id = ?1 AND seq >= ?2 AND seq <= {_HEAD_OF} ORDER BY seq LIMIT ?3) AS e ON 1"
)


class SqliteStoreBackend(SqlStoreBackend):
    """The store on one SQLite file in WAL mode, with group commit and in-process wake-ups."""

    TOKEN_PREFIX = b"sqlite-streams:v1:"

    def __init__(self, path: str | Path, *, durability: Durability = "full", readers: int = 2) -> None:
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', got {durability!r}")
        # One writer: a group never waits on another writer's lock; no byte bound on a group.
        super().__init__(writers=1, max_group_appends=MAX_GROUP_APPENDS, max_group_bytes=sys.maxsize)
        self.path = Path(path)
        self.durability: Durability = durability
        self._reader_count = max(1, readers)
        # One thread, so that the writer's calls (here, or on the loop's thread) never overlap.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keel-sqlite-writer")
        self._writer: SqliteWriter | None = None
        self._readers: list[aiosqlite.Connection] = []
        self._next_reader: Callable[[], aiosqlite.Connection] = self._no_reader
        # A lone caller (see `_commit_group`): groups of one append to `_single_stream` in a row.
        self._singles = 0
        self._single_stream: str | None = None
        self._last_commit_s = 0.0  # how long the last group took to commit, hand-off included
        self._loop_idle = False  # whether the loop's last turn before taking a group was short

    @classmethod
    def in_directory(cls, data_dir: str | Path, *, durability: Durability = "full") -> SqliteStoreBackend:
        """A backend on `data_dir/keel-store.sqlite3` (the directory is created on open)."""
        return cls(Path(data_dir) / DATABASE_FILE, durability=durability)

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open_database(self) -> None:
        """Create the file and schema on the writer thread, open the read connections."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._on_writer_thread(
            partial(SqliteWriter, self.path, self.durability, self.renew_after_us)
        )
        for _ in range(self._reader_count):
            reader = await aiosqlite.connect(self.path, isolation_level=None)
            # WAL readers can meet a brief lock while the writer checkpoints; wait, don't fail.
            await reader.execute("PRAGMA busy_timeout=5000")
            await reader.execute("PRAGMA query_only=1")
            self._readers.append(reader)
        self._next_reader = itertools.cycle(self._readers).__next__

    async def _close_database(self) -> None:
        self._next_reader = self._no_reader
        for reader in self._readers:
            await reader.close()
        self._readers.clear()
        if self._writer is not None:
            await self._on_writer_thread(self._writer.close)
            self._writer = None
        self._thread.shutdown(wait=True)

    @staticmethod
    def _no_reader() -> aiosqlite.Connection:
        raise store_closed()

    async def _select(self, sql: str, params: Sequence[Any]) -> Sequence[Row]:
        """Run a read on the next read connection; driver errors become KeelErrors."""
        try:
            return list(await self._next_reader().execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise translate(exc) from exc

    def _translate(self, error: Exception) -> BaseException:
        return translate(error) if isinstance(error, sqlite3.Error) else error

    def _status_filter(self, statuses: list[int]) -> tuple[str, list[Any]]:
        return f"status IN ({','.join('?' * len(statuses))})", list(statuses)

    def _prefix_filter(self, prefix: str) -> tuple[str, list[Any]]:
        return "substr(stream_id, 1, ?) = ?", [len(prefix), prefix]

    async def synchronous(self) -> int:
        """The writer's PRAGMA synchronous (2 = FULL, 1 = NORMAL), for checks and diagnostics."""
        return await self._write(SqliteWriter.synchronous)

    # -- the writer --------------------------------------------------------------------------

    async def _on_writer_thread(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    def _write_task(self, run: Callable[[SqliteWriter], T], future: asyncio.Future[T] | None) -> None:
        """Queue `run(writer)` to run alone on the writer thread, in order with the appends."""

        async def task() -> None:
            assert self._writer is not None
            try:
                result = await self._on_writer_thread(partial(run, self._writer))
            except Exception as exc:
                resolve(future, self._translate(exc))
            else:
                resolve(future, result)

        self._enqueue(self._queues[0], task)

    async def _write(self, run: Callable[[SqliteWriter], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._write_task(run, future)
        return await future

    async def _before_take(self, queue: WriteQueue) -> None:
        """Let appends that are already on their way join the next group; wait only under load.

        Every commit costs an fsync and (but a lone caller's) two thread hand-offs whatever its
        size. With few callers it is better to commit at once and overlap the commit with their
        round trips. But when the event loop is saturated (one turn of it took over BUSY_TURN_S:
        many requests were being parsed), CPU per append is what bounds throughput, and bigger
        groups cut it: the writer then waits one quantum at a time while more appends keep
        arriving, up to GATHER_QUANTA quanta (4 ms). The same idea as PostgreSQL's
        commit_delay/commit_siblings.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(0)
        self._loop_idle = loop.time() - started < BUSY_TURN_S
        if self._loop_idle:
            return
        for _ in range(GATHER_QUANTA):
            queued = len(queue)
            await asyncio.sleep(GATHER_QUANTUM_S)
            if len(queue) == queued or len(queue) >= MAX_GROUP_APPENDS:
                return

    async def _commit_group(self, group: list[AppendJob]) -> list[AppendOutcome]:
        """Commit on the writer thread; a lone caller's append on the loop's own thread.

        Handing a group to the writer thread and its answer back costs two thread switches and
        wake-ups (about 0.15 ms of CPU and of latency on a slow machine), whatever the group's size:
        nothing next to a group's commit under load, but much of a lone caller's append, such as a
        step's calls made one after another, each durable before the next. Such a caller owns its
        stream: its appends expect an exact head. When the last INLINE_AFTER_SINGLES groups were
        each one such append to the same stream, the loop is idle and the last commit took at most
        INLINE_MAX_S, nothing is likely to arrive during the next one, so it runs here, holding the
        loop for it (at most INLINE_MAX_BYTES of events and artifacts). Several callers, even each
        alone in its group, keep the thread, where their requests are read while a commit waits for
        its fsync; so do slow commits (a slow disk; a WAL checkpoint: an inline commit slower than
        INLINE_MAX_S sends the next INLINE_AFTER_SINGLES - 1 groups back to the thread). An append
        that finds the write lock held by another connection (a backup, the sqlite3 shell) does not
        wait for it here, which would stop the loop, but on the thread.
        """
        writer = self._writer
        assert writer is not None
        job = group[0]
        lone = len(group) == 1 and job.expected.kind is ExpectedKind.EXACT and job.size <= INLINE_MAX_BYTES
        stream_id = job.stream_id if lone else None
        streak = self._singles + 1 if stream_id is not None and stream_id == self._single_stream else 0
        self._singles, self._single_stream = streak, stream_id
        started = time.perf_counter()
        if streak >= INLINE_AFTER_SINGLES and self._loop_idle and self._last_commit_s <= INLINE_MAX_S:
            try:
                outcomes = writer.commit_appends_at_once(group)
            finally:
                self._last_commit_s = time.perf_counter() - started
            if outcomes is None or self._last_commit_s > INLINE_MAX_S:
                self._singles = 0  # the write lock held by another connection, or a slow commit
            if outcomes is not None:
                return outcomes
            started = time.perf_counter()
        try:
            return await self._on_writer_thread(partial(writer.commit_appends, group))
        finally:
            self._last_commit_s = time.perf_counter() - started

    # -- events ------------------------------------------------------------------------------

    async def read(self, stream_id: str, from_seq: int, limit: int) -> EventPage:
        """A forward page, consistent with the head reported alongside it.

        It starts at the first event at or after `from_seq` that a trim kept.
        """
        start = max(1, from_seq)
        if limit <= 0:
            return page_of((), (await self.head(stream_id)).head_seq)
        # One statement, one snapshot (and one trip to a reader thread): the head and the events
        # up to it, so the page never runs ahead of the head it reports. No event: one row of head.
        rows = await self._rows(_READ, stream_id, start, limit)
        head = int(rows[0][0])
        events = sorted(  # the join keeps the subquery's order in practice; SQL does not promise it
            (
                StoredEvent(stream_id, int(r[1]), str(r[2]), bytes(r[3]), int(r[4]))
                for r in rows
                if r[1] is not None
            ),
            key=lambda event: event.seq,
        )
        return page_of(events, head)

    async def trim(self, stream_id: str, before_seq: int) -> TrimResult:
        """Delete events below `before_seq` on the writer (a write, serialized with appends)."""
        return await self._write(partial(SqliteWriter.trim, stream_id=stream_id, before_seq=before_seq))

    @property
    def renew_after_us(self) -> int:
        """How old an artifact stored again must be for its stored time to be renewed (the writer's)."""
        return self._renew_after_us

    @renew_after_us.setter
    def renew_after_us(self, value: int) -> None:
        self._renew_after_us = value
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.renew_after_us = value  # read by the writer at its next commit

    async def delete_streams(self, stream_ids: Sequence[str]) -> int:
        """Delete whole streams on the writer (serialized with appends)."""
        if not stream_ids:
            return 0
        return await self._write(partial(SqliteWriter.delete_streams, stream_ids=list(stream_ids)))

    async def nudge_due(self, stream_id: str, due_at_us: int) -> bool:
        """Move a PARKED stream's due time earlier on the writer (serialized with appends)."""
        return await self._write(partial(SqliteWriter.nudge_due, stream_id=stream_id, due_at_us=due_at_us))

    # -- artifacts ---------------------------------------------------------------------------

    async def delete_artifacts(self, artifact_ids: Sequence[str], stored_before_us: int) -> list[str]:
        """Delete unrenewed artifacts on the writer (serialized with appends that renew them)."""
        if not artifact_ids:
            return []
        return await self._write(
            partial(
                SqliteWriter.delete_artifacts,
                artifact_ids=list(artifact_ids),
                stored_before_us=stored_before_us,
            )
        )

    async def put_artifact(self, kind: str, chunks: AsyncIterable[bytes]) -> ArtifactPut:
        """Stage the bytes in chunk rows while hashing, then publish (or drop) in one transaction."""
        blob_id = new_blob_id()
        upload = ChunkedUpload()
        staged = False
        rows: list[ChunkRow] = []
        index = 0
        try:
            async for data in upload.full_chunks(chunks):
                rows.append((blob_id, index, data))
                index += 1
                if len(rows) * ARTIFACT_CHUNK_BYTES >= STAGE_BYTES:
                    staged = True
                    await self._write(partial(SqliteWriter.stage, rows=rows))
                    rows = []
            if upload.last:
                rows.append((blob_id, index, upload.last))
            created = await self._write(
                partial(
                    SqliteWriter.publish,
                    rows=rows,
                    artifact_id=upload.artifact_id,
                    kind=kind,
                    size=upload.size,
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
                self._write_task(partial(SqliteWriter.drop_blob, blob_id=blob_id), None)
            raise
        return ArtifactPut(upload.artifact_id, upload.size, created)

    async def _drop_staged(self, blob_id: str) -> None:
        try:
            await self._write(partial(SqliteWriter.drop_blob, blob_id=blob_id))
        except Exception:
            # The database failed too; the caller hears of the first failure, and open() sweeps.
            log.warning("could not drop the staged chunks of failed upload %s", blob_id, exc_info=True)


__all__ = ["DATABASE_FILE", "Durability", "SqliteStoreBackend", "translate"]
