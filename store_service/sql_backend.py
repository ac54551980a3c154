"""SqlStoreBackend: the StoreBackend flow that SQLite and PostgreSQL share, with small dialect hooks.

Written once here: the group-commit writers (appends queue per writer and are committed as one
group per transaction), catch-up-then-wait subscriptions (never polling), stream listing with
page tokens, the head lookup and chunked artifact downloads. Shared SQL is written with `?`
placeholders; a dialect rewrites them if its driver wants others (`_placeholders`). Each
dialect supplies what really differs: connections, the group commit transaction itself, reads
and trims, artifact uploads, and how its driver's errors translate.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any

from keel_core.clock import now_us
from keel_core.errors import ErrorCategory, KeelError, unavailable
from store_service.backend import (
    ARTIFACT_ID_PATTERN,
    FIRST_PAGE_POSITION,
    AppendResult,
    ArtifactDownload,
    ArtifactInfo,
    ArtifactPage,
    DuePage,
    DueStream,
    EventPair,
    Expected,
    NewArtifact,
    StoreBackend,
    StoredArtifact,
    StoredEvent,
    StreamHead,
    StreamInfo,
    StreamPage,
    StreamStatus,
    artifact_not_found,
    decode_page_token,
    empty_batch,
    encode_page_token,
    invalid_page_token,
)
from store_service.group_commit import AppendJob, AppendOutcome, WriteQueue, WriteTask, resolve
from store_service.stream_wakeups import StreamWakeups

log = logging.getLogger(__name__)

Row = Sequence[Any]
# How long a subscriber waits before re-reading while the database is unavailable: quick at first
# (a terminated session), slower while it stays down.
OUTAGE_RETRY_MIN_S = 0.05
OUTAGE_RETRY_MAX_S = 2.0
# An artifact stored again renews its stored time at most this often (renewing on every repeat would
# write a row for every append that carries a popular manifest); tests set 0.
RENEW_AFTER_US = 60_000_000
# Events one catch-up read of a subscription fetches.
SUBSCRIBE_PAGE = 1000


def _duration_filters(
    now: int, min_duration_us: int | None, max_duration_us: int | None
) -> list[tuple[str, list[Any]]]:
    """WHERE conditions keeping streams whose duration (creation to end, or to `now` while the
    stream has not ended) is in [`min_duration_us`, `max_duration_us`] (None: unbounded)."""
    # ended_at_us is 0 exactly while the label is not terminal (see the dialects' appends).
    duration = "(CASE WHEN s.ended_at_us > 0 THEN s.ended_at_us ELSE ? END) - s.created_at_us"
    conditions: list[tuple[str, list[Any]]] = []
    if min_duration_us is not None:
        conditions.append((f"{duration} >= ?", [now, min_duration_us]))
    if max_duration_us is not None:
        conditions.append((f"{duration} <= ?", [now, max_duration_us]))
    return conditions


def store_closed() -> KeelError:
    """The error of a call to a backend that is not open, or closed or closing."""
    return unavailable("store_unavailable", "the store is closed or shutting down; retry elsewhere or later")


class SqlStoreBackend(StoreBackend, abc.ABC):
    """The shared flow of the SQL backends; subclasses implement the dialect hooks below."""

    # Prefix of this backend's page tokens, so a token from another backend is refused.
    TOKEN_PREFIX: bytes = b""

    def __init__(self, *, writers: int, max_group_appends: int, max_group_bytes: int) -> None:
        self._queues = [WriteQueue(max_group_appends, max_group_bytes) for _ in range(writers)]
        self._writer_tasks: list[asyncio.Task[None]] = []
        self._wakeups = StreamWakeups()
        # Every subscriber's armed wake-up, so that `_wake_everyone` can make them all re-read.
        self._waiting: set[asyncio.Event] = set()
        self._closing = False
        # Bytes stored again renew the artifact's stored time if older than this (store_service.backend).
        self.renew_after_us = RENEW_AFTER_US
        # "Now" for the duration of a stream not yet ended (ListStreams' duration filters); tests set it.
        self.now_us = now_us

    # -- dialect hooks -----------------------------------------------------------------------

    @abc.abstractmethod
    async def _open_database(self) -> None:
        """Create or migrate the schema and open the connections."""

    @abc.abstractmethod
    async def _close_database(self) -> None:
        """Close the connections (every writer has stopped by now)."""

    @abc.abstractmethod
    async def _select(self, sql: str, params: Sequence[Any]) -> Sequence[Row]:
        """Run a read (SQL with `?` placeholders) and return its rows; errors translated."""

    @abc.abstractmethod
    async def _commit_group(self, group: list[AppendJob]) -> list[AppendOutcome]:
        """Commit a group of appends in one transaction: each job's result or its own conflict."""

    @abc.abstractmethod
    def _translate(self, error: Exception) -> BaseException:
        """The error callers should see for a driver error (a KeelError when it is understood)."""

    @abc.abstractmethod
    async def nudge_due(self, stream_id: str, due_at_us: int) -> bool:
        """If the stream is PARKED, make its due time at most `due_at_us` (one statement)."""

    @abc.abstractmethod
    def _status_filter(self, statuses: list[int]) -> tuple[str, list[Any]]:
        """A WHERE condition (with `?` placeholders) keeping streams whose status is in `statuses`."""

    @abc.abstractmethod
    def _prefix_filter(self, prefix: str) -> tuple[str, list[Any]]:
        """A WHERE condition (with `?` placeholders) keeping stream ids that start with `prefix`."""

    def _queue_for(self, stream_id: str) -> WriteQueue:
        """The writer queue a stream's appends go to (always the same one for a stream)."""
        return self._queues[0]

    async def _before_take(self, queue: WriteQueue) -> None:
        """Called when something is queued, before the writer takes it (a dialect may wait here)."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the database, then start one writer task per queue."""
        await self._open_database()
        self._writer_tasks = [
            asyncio.create_task(self._write_loop(queue), name=f"{type(self).__name__}-writer-{number}")
            for number, queue in enumerate(self._queues)
        ]

    async def close(self) -> None:
        """Commit what is queued, end subscriptions, then close the database."""
        if self._closing:
            return
        self._closing = True
        self._wakeups.close()
        self._wake_everyone()
        for queue in self._queues:
            queue.put(None)
        await asyncio.gather(*self._writer_tasks, return_exceptions=True)
        await self._close_database()

    def _check_open(self) -> None:
        if self._closing or not self._writer_tasks:
            raise store_closed()

    def _wake_everyone(self) -> None:
        """Make every subscriber re-read its stream (after wake-ups may have been missed)."""
        for event in self._waiting:
            event.set()

    async def _rows(self, sql: str, *params: Any) -> Sequence[Row]:
        self._check_open()
        return await self._select(sql, params)

    # -- the writers -------------------------------------------------------------------------

    def _enqueue(self, queue: WriteQueue, job: AppendJob | WriteTask) -> None:
        self._check_open()
        queue.put(job)

    async def _write_loop(self, queue: WriteQueue) -> None:
        """Commit whatever is queued (appends as groups, tasks alone) until the closing mark."""
        while True:
            await queue.wait()
            await self._before_take(queue)
            taken = queue.take()
            if taken is None:
                return
            if not isinstance(taken, list):
                await taken()
                continue
            try:
                outcomes = await self._commit_group(taken)
            except Exception as exc:
                # Never let the writer die: every later append on this queue would hang.
                error = self._translate(exc)
                if error is exc:
                    log.exception("a group of %d appends failed to commit", len(taken))
                else:
                    log.warning("a group of %d appends failed to commit: %s", len(taken), error)
                for job in taken:
                    resolve(job.future, error)
                continue
            for job, outcome in zip(taken, outcomes, strict=True):
                resolve(job.future, outcome)
                if not isinstance(outcome, BaseException) and not outcome.repeated:
                    # Local subscribers learn of the commit at once (a repeat committed nothing).
                    self._wakeups.notify(job.stream_id)

    # -- events ------------------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        expected: Expected,
        events: Sequence[EventPair],
        *,
        status: StreamStatus | None = None,
        artifacts: Sequence[NewArtifact] = (),
        attributes: Mapping[str, str] | None = None,
        due_at_us: int | None = None,
        nudges: Mapping[str, int] | None = None,
        report_heads: Sequence[str] = (),
        append_key: str | None = None,
    ) -> AppendResult:
        """Queue the append for its writer's next group commit and wait for its own outcome."""
        if not events:
            raise empty_batch()
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        job = AppendJob(
            stream_id,
            expected,
            events,
            status,
            artifacts,
            future,
            attributes,
            due_at_us,
            nudges,
            report_heads,
            append_key,
        )
        self._enqueue(self._queue_for(stream_id), job)
        return await future

    async def head(self, stream_id: str) -> StreamHead:
        """The head and label from the streams table (0, UNSPECIFIED for an unknown stream)."""
        rows = await self._rows("SELECT head_seq, status FROM streams WHERE stream_id = ?", stream_id)
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
        attributes: Mapping[str, str] | None = None,
        created_after_us: int = 0,
        created_before_us: int = 0,
        min_duration_us: int | None = None,
        max_duration_us: int | None = None,
    ) -> StreamPage:
        """Newest first by creation order; the token carries the last row's creation order.

        With attributes the walk is driven by the first one's (key, value, sid) index, so a
        page costs the rows it returns (plus those the other filters drop), never a full scan.
        The duration filters are such other filters: no index can hold a duration that grows.
        """
        before = decode_page_token(self.TOKEN_PREFIX, page_token) if page_token else FIRST_PAGE_POSITION
        wanted = sorted((attributes or {}).items())
        if wanted:
            (key, value), others = wanted[0], wanted[1:]
            source = "stream_attributes a JOIN streams s ON s.sid = a.sid"
            where = ["a.key = ?", "a.value = ?", "a.sid < ?"]
            params: list[Any] = [key, value, before]
            order = "a.sid"
        else:
            others, source, where, params, order = [], "streams s", ["s.sid < ?"], [before], "s.sid"
        also = "EXISTS (SELECT 1 FROM stream_attributes x WHERE x.sid = s.sid AND x.key = ? AND x.value = ?)"
        conditions: list[tuple[str, list[Any]]] = [(also, [k, v]) for k, v in others]
        if statuses:
            conditions.append(self._status_filter([int(s) for s in statuses]))
        if prefix:
            conditions.append(self._prefix_filter(prefix))
        if created_after_us:
            conditions.append(("s.created_at_us >= ?", [created_after_us]))
        if created_before_us:
            conditions.append(("s.created_at_us < ?", [created_before_us]))
        if min_duration_us is not None or max_duration_us is not None:
            conditions.extend(_duration_filters(self.now_us(), min_duration_us, max_duration_us))
        for sql, values in conditions:
            where.append(sql)
            params.extend(values)
        rows = await self._rows(
            "SELECT s.sid, s.stream_id, s.head_seq, s.status, s.created_at_us, s.updated_at_us, "
            "s.ended_at_us "
            f"FROM {source} WHERE {' AND '.join(where)} ORDER BY {order} DESC LIMIT ?",
            *params,
            page_size + 1,
        )
        more = len(rows) > page_size
        rows = rows[:page_size]
        found = await self._attributes_of([int(r[0]) for r in rows])
        streams = tuple(
            StreamInfo(
                str(r[1]),
                int(r[2]),
                StreamStatus(int(r[3])),
                int(r[4]),
                int(r[5]),
                found.get(int(r[0]), {}),
                int(r[6]),
            )
            for r in rows
        )
        token = encode_page_token(self.TOKEN_PREFIX, int(rows[-1][0])) if more and rows else ""
        return StreamPage(streams, token)

    async def list_due(self, before_us: int, *, prefix: str = "", limit: int = 100) -> DuePage:
        """Walk the (due_at_us, stream_id) index from the earliest due time; one row past `limit`.

        The row after the due ones tells the earliest due time left out, so the caller can sleep
        until then without another query.
        """
        where, params = "", []
        if prefix:
            condition, values = self._prefix_filter(prefix)
            where, params = f"WHERE {condition.replace('stream_id', 'd.stream_id')}", values
        rows = await self._rows(
            "SELECT d.stream_id, d.due_at_us, s.head_seq FROM stream_due d "
            f"JOIN streams s ON s.stream_id = d.stream_id {where} "
            "ORDER BY d.due_at_us, d.stream_id LIMIT ?",
            *params,
            limit + 1,
        )
        due = [DueStream(str(r[0]), int(r[1]), int(r[2])) for r in rows if int(r[1]) <= before_us][:limit]
        later = rows[len(due)] if len(rows) > len(due) else None
        return DuePage(tuple(due), int(later[1]) if later is not None else 0)

    async def _attributes_of(self, sids: list[int]) -> dict[int, dict[str, str]]:
        """The attributes of the streams `sids` (by the primary key (sid, key)), by sid."""
        if not sids:
            return {}
        rows = await self._rows(
            f"SELECT sid, key, value FROM stream_attributes WHERE sid IN ({','.join('?' * len(sids))})", *sids
        )
        found: dict[int, dict[str, str]] = {}
        for sid, key, value in rows:
            found.setdefault(int(sid), {})[str(key)] = str(value)
        return found

    async def subscribe(self, stream_id: str, after_seq: int) -> AsyncIterator[StoredEvent]:
        """Catch up from the database, then sleep until a commit to this stream wakes us."""
        seq = after_seq
        outage_delay = OUTAGE_RETRY_MIN_S
        while not self._wakeups.closed:
            # Arm before reading: a commit landing between the read and the wait still wakes us.
            wake = self._wakeups.arm(stream_id)
            self._waiting.add(wake)
            try:
                try:
                    page = await self.read(stream_id, seq + 1, SUBSCRIBE_PAGE)
                except KeelError as error:
                    if self._wakeups.closed:
                        return  # the backend closed under the read: end like any closing wait
                    if error.category is not ErrorCategory.UNAVAILABLE:
                        raise
                    # Nothing can commit while the database is away; try again after a back-off
                    # or as soon as the dialect learns it is back (which wakes everyone).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), outage_delay)
                    outage_delay = min(outage_delay * 2, OUTAGE_RETRY_MAX_S)
                    continue
                outage_delay = OUTAGE_RETRY_MIN_S
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

    async def list_artifacts(self, stored_before_us: int, page_size: int, page_token: str) -> ArtifactPage:
        """Artifacts last stored before `stored_before_us`, oldest first (by stored time, then id).

        No index serves this order: a page reads the artifacts table (a collection's rare pass).
        """
        after_us, after_id = self._artifact_position(page_token)
        rows = await self._rows(
            "SELECT artifact_id, kind, size, created_at_us FROM artifacts WHERE created_at_us < ? "
            "AND (created_at_us > ? OR (created_at_us = ? AND artifact_id > ?)) "
            "ORDER BY created_at_us, artifact_id LIMIT ?",
            stored_before_us,
            after_us,
            after_us,
            after_id,
            page_size + 1,
        )
        more = len(rows) > page_size
        found = tuple(StoredArtifact(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows[:page_size])
        token = ""
        if more and found:
            last = found[-1]
            token = base64.urlsafe_b64encode(
                self.TOKEN_PREFIX + b"artifacts:" + f"{last.stored_at_us}:{last.artifact_id}".encode()
            ).decode()
        return ArtifactPage(found, token)

    def _artifact_position(self, token: str) -> tuple[int, str]:
        """(stored time, id) a ListArtifacts token continues after; (-1, "") for the first page."""
        if not token:
            return -1, ""
        prefix = self.TOKEN_PREFIX + b"artifacts:"
        try:
            raw = base64.urlsafe_b64decode(token.encode())
            if not raw.startswith(prefix):
                raise ValueError("not ours")
            stored, _, artifact_id = raw[len(prefix) :].decode().partition(":")
            if not stored.isdigit() or len(stored) > 19 or not ARTIFACT_ID_PATTERN.fullmatch(artifact_id):
                raise ValueError("malformed")
        except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
            raise invalid_page_token(token) from exc
        return int(stored), artifact_id

    async def _artifact_row(self, artifact_id: str) -> tuple[ArtifactInfo, object] | None:
        rows = await self._rows(
            "SELECT kind, size, blob_id FROM artifacts WHERE artifact_id = ?", artifact_id
        )
        if not rows:
            return None
        kind, size, blob_id = rows[0]
        return ArtifactInfo(artifact_id, str(kind), int(size)), blob_id

    async def _chunks(self, blob_id: object) -> AsyncIterator[bytes]:
        # One row per round trip: memory stays at one chunk however large the artifact is.
        for index in itertools.count():
            rows = await self._rows(
                "SELECT data FROM artifact_chunks WHERE blob_id = ? AND idx = ?", blob_id, index
            )
            if not rows:
                return
            yield bytes(rows[0][0])


__all__ = ["OUTAGE_RETRY_MAX_S", "OUTAGE_RETRY_MIN_S", "Row", "SqlStoreBackend", "store_closed"]
