"""InMemoryEventLog: the EventLog port held in one process's memory, for fast engine tests.

It keeps the StoreService's semantics (engine_service.store.port): the head compare-and-swap and
its `sequence_conflict`, labels, listing newest first with page tokens, subscriptions woken by
appends (never polling), content-addressed artifacts and trims. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from engine_service.domain.canonical import artifact_id_for_bytes
from engine_service.domain.streams import ENDED_LABELS, LABEL_PARKED, STATUS_LABELS
from engine_service.store.port import (
    AppendResult,
    ArtifactSummary,
    DueStream,
    LocalAppends,
    StreamEvent,
    StreamSummary,
)
from keel_core.clock import us_of
from keel_core.errors import ErrorCategory, KeelError, invalid_argument, not_found, unavailable


@dataclass
class _Stream:
    """One stream: its kept events, its head (unchanged by trims), label and times."""

    order: int  # creation order: listings are newest first
    created_at: datetime
    updated_at: datetime
    events: list[StreamEvent] = field(default_factory=list)
    head: int = 0
    label: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    due_at_us: int = 0  # the due-time index entry (0: none)
    ended_at: datetime | None = None  # when the label became one of ENDED_LABELS (None: not ended)

    def duration(self, now: datetime) -> timedelta:
        """From creation to the end, or to `now` while the stream has not ended."""
        return (self.ended_at or now) - self.created_at


def _kept(
    stream: _Stream, attributes: Mapping[str, str], after: datetime | None, before: datetime | None
) -> bool:
    """Whether a listing with these attribute and creation-time filters keeps `stream`."""
    if any(stream.attributes.get(key) != value for key, value in attributes.items()):
        return False
    return (after is None or stream.created_at >= after) and (before is None or stream.created_at < before)


def _lasted(duration: timedelta, least: timedelta | None, most: timedelta | None) -> bool:
    """Whether a listing with these duration filters keeps a stream that has lasted `duration`."""
    return (least is None or duration >= least) and (most is None or duration <= most)


def _check_durations(least: timedelta | None, most: timedelta | None) -> None:
    """The StoreService's INVALID_ARGUMENT `invalid_duration` for a negative or empty range."""
    if any(bound is not None and bound < timedelta(0) for bound in (least, most)):
        raise invalid_argument("invalid_duration", "duration filters must be 0 or more")
    if least is not None and most is not None and least > most:
        raise invalid_argument("invalid_duration", f"min duration {least} is more than max duration {most}")


def sequence_conflict(stream_id: str, expected_seq: int | None, head: int) -> KeelError:
    """The StoreService's error for an append whose expected head is not the head."""
    wanted = "no stream" if expected_seq is None else f"head {expected_seq}"
    return KeelError(
        "sequence_conflict",
        f"stream {stream_id!r}: expected {wanted} but the head is {head}; "
        "read the stream and retry against its head",
        category=ErrorCategory.CONFLICT,
        details={"actual_seq": str(head)},  # as ErrorInfo metadata carries it over gRPC
    )


class InMemoryEventLog:
    """An EventLog in memory: one per test, shared by every engine of the test."""

    def __init__(self) -> None:
        self.patience = 0.0  # always reachable: nothing to wait for
        self.calls: collections.Counter[str] = collections.Counter()
        self.local = LocalAppends()
        self._streams: dict[str, _Stream] = {}
        self._artifacts: dict[str, bytes] = {}
        self._stored_at: dict[str, datetime] = {}  # when each artifact's bytes were last stored
        self._order = itertools.count(1)
        # Set (and replaced) by every append to the stream: what subscribers wait on.
        self._appended: dict[str, asyncio.Event] = {}
        self._closed = False
        # "Now" for the duration of a stream not ended yet (listings by duration); tests set it.
        self.now: Callable[[], datetime] = lambda: datetime.now(UTC)

    def _open(self, method: str) -> None:
        self.calls[method] += 1
        if self._closed:
            raise unavailable("store_unavailable", "the in-memory event log is closed")

    async def append(
        self,
        stream_id: str,
        events: Sequence[tuple[str, bytes]],
        *,
        expected_seq: int | None,
        status: str | None = None,
        artifacts: Sequence[tuple[str, bytes]] = (),
        patience: float | None = None,
        expected_any: bool = False,
        attributes: Mapping[str, str] | None = None,
        due_at_us: int | None = None,
        nudges: Mapping[str, int] | None = None,
        report_heads: Sequence[str] = (),
    ) -> AppendResult:
        """Append atomically after `expected_seq` (None: no stream yet; `expected_any`: anywhere)."""
        self._open("AppendEvents")
        if due_at_us is not None and due_at_us < 0:
            raise invalid_argument("invalid_due_at", f"due_at_us must be 0 or more (got {due_at_us})")
        if not events:
            raise invalid_argument("invalid_batch", "an append needs at least one event")
        if status is not None and status not in STATUS_LABELS:
            raise invalid_argument("invalid_status", f"unknown status label {status!r}")
        stream = self._streams.get(stream_id)
        head = stream.head if stream is not None else 0
        if not expected_any and head != (expected_seq or 0):
            raise sequence_conflict(stream_id, expected_seq, head)
        now = datetime.now(UTC)
        if stream is None:
            stream = self._streams[stream_id] = _Stream(next(self._order), now, now)
        ids = tuple(self._store_artifact(data) for _, data in artifacts)
        first = stream.head + 1
        for offset, (name, payload) in enumerate(events):
            stream.events.append(StreamEvent(first + offset, name, bytes(payload), now))
        stream.head += len(events)
        stream.updated_at = now
        stream.label = status or stream.label
        if stream.label not in ENDED_LABELS:
            stream.ended_at = None
        elif stream.ended_at is None:
            stream.ended_at = now
        stream.attributes.update(attributes or {})
        if due_at_us is not None:
            stream.due_at_us = due_at_us
        for nudged_id, at in (nudges or {}).items():
            nudged = self._streams.get(nudged_id)
            if nudged is not None and nudged.label == LABEL_PARKED:
                nudged.due_at_us = min(nudged.due_at_us or at, at)
        wake = self._appended.pop(stream_id, None)
        if wake is not None:
            wake.set()
        reported = tuple(self._streams[sid].head if sid in self._streams else 0 for sid in report_heads)
        self.local.published(stream_id, first, events)
        return AppendResult(first, stream.head, ids, reported, us_of(now))

    def _store_artifact(self, data: bytes) -> str:
        artifact_id = artifact_id_for_bytes(data)
        self._artifacts.setdefault(artifact_id, bytes(data))
        self._stored_at[artifact_id] = datetime.now(UTC)
        return artifact_id

    async def read(
        self, stream_id: str, *, from_seq: int = 1, limit: int | None = None, patience: float | None = None
    ) -> list[StreamEvent]:
        """Events of a stream from `from_seq` (all of them, or at most `limit`)."""
        self._open("ReadEvents")
        stream = self._streams.get(stream_id)
        found = [event for event in stream.events if event.seq >= from_seq] if stream else []
        return found if limit is None else found[:limit]

    async def head(self, stream_id: str, *, patience: float | None = None) -> tuple[int, str]:
        """The stream's head sequence and status label ("" when unlabelled)."""
        self._open("HeadSeq")
        stream = self._streams.get(stream_id)
        return (stream.head, stream.label) if stream else (0, "")

    async def subscribe(self, stream_id: str, *, after_seq: int = 0) -> AsyncGenerator[StreamEvent, None]:
        """Events after `after_seq`, then each new one as its append lands; ends when the log closes."""
        self._open("SubscribeEvents")
        seq = after_seq
        while not self._closed:
            stream = self._streams.get(stream_id)
            news = [event for event in stream.events if event.seq > seq] if stream else []
            if not news:
                # No await between the look and the wait: an append cannot slip in between.
                await self._appended.setdefault(stream_id, asyncio.Event()).wait()
                continue
            for event in news:
                seq = event.seq
                yield event

    async def list_streams(
        self,
        *,
        prefix: str,
        statuses: Sequence[str] = (),
        page_size: int = 100,
        page_token: str = "",
        patience: float | None = None,
        attributes: Mapping[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        min_duration: timedelta | None = None,
        max_duration: timedelta | None = None,
    ) -> tuple[list[StreamSummary], str]:
        """A page of streams, newest first; the token names the last stream listed."""
        self._open("ListStreams")
        _check_durations(min_duration, max_duration)
        now = self.now()
        try:
            before = int(page_token) if page_token else None
        except ValueError:
            raise invalid_argument(
                "invalid_page_token", f"page token {page_token!r} was not issued here"
            ) from None
        matching = sorted(
            (
                (stream.order, stream_id, stream)
                for stream_id, stream in self._streams.items()
                if stream_id.startswith(prefix)
                and (not statuses or stream.label in statuses)
                and (before is None or stream.order < before)
                and _kept(stream, attributes or {}, created_after, created_before)
                and _lasted(stream.duration(now), min_duration, max_duration)
            ),
            reverse=True,
        )
        page = matching[: max(1, page_size)]
        more = len(matching) > len(page)
        summaries = [
            StreamSummary(
                stream_id,
                stream.head,
                stream.label,
                stream.created_at,
                stream.updated_at,
                dict(stream.attributes),
                stream.ended_at,
            )
            for _, stream_id, stream in page
        ]
        return summaries, str(page[-1][0]) if more else ""

    async def list_due(
        self, before_us: int, *, prefix: str, limit: int = 100, patience: float | None = None
    ) -> tuple[list[DueStream], int]:
        """Streams due by `before_us`, earliest first, and the next due time after them (0: none)."""
        self._open("ListDue")
        entries = sorted(
            (stream.due_at_us, stream_id, stream.head)
            for stream_id, stream in self._streams.items()
            if stream.due_at_us and stream_id.startswith(prefix)
        )
        due = [DueStream(sid, at, head) for at, sid, head in entries if at <= before_us][:limit]
        return due, entries[len(due)][0] if len(entries) > len(due) else 0

    async def nudge_due(self, stream_id: str, due_at_us: int, *, patience: float | None = None) -> bool:
        """If the stream is parked, make its due time at most `due_at_us`; whether it is parked."""
        self._open("NudgeDue")
        stream = self._streams.get(stream_id)
        if stream is None or stream.label != LABEL_PARKED:
            return False
        stream.due_at_us = min(stream.due_at_us or due_at_us, due_at_us)
        return True

    async def trim(self, stream_id: str, before_seq: int, *, patience: float | None = None) -> int:
        """Delete the stream's events below `before_seq` (at most head + 1); returns how many went."""
        self._open("TrimStream")
        stream = self._streams.get(stream_id)
        head = stream.head if stream else 0
        if before_seq > head + 1:
            raise invalid_argument(
                "invalid_sequence", f"before_seq {before_seq} is past the head {head} + 1", head_seq=str(head)
            )
        if stream is None:
            return 0
        kept = [event for event in stream.events if event.seq >= before_seq]
        removed = len(stream.events) - len(kept)
        stream.events = kept
        return removed

    async def delete_streams(self, stream_ids: Sequence[str], *, patience: float | None = None) -> int:
        """Delete whole streams; how many existed."""
        self._open("DeleteStreams")
        return sum(self._streams.pop(stream_id, None) is not None for stream_id in set(stream_ids))

    async def list_artifacts(
        self,
        stored_before: datetime,
        *,
        page_size: int = 100,
        page_token: str = "",
        patience: float | None = None,
    ) -> tuple[list[ArtifactSummary], str]:
        """Artifacts last stored before `stored_before`, oldest first (the token: how many to skip)."""
        self._open("ListArtifacts")
        skip = int(page_token or 0)
        found = sorted(
            (when, artifact_id) for artifact_id, when in self._stored_at.items() if when < stored_before
        )
        page = found[skip : skip + page_size]
        token = str(skip + page_size) if skip + page_size < len(found) else ""
        summaries = [
            ArtifactSummary(artifact_id, "", len(self._artifacts[artifact_id]), when)
            for when, artifact_id in page
        ]
        return summaries, token

    async def delete_artifacts(
        self, artifact_ids: Sequence[str], stored_before: datetime, *, patience: float | None = None
    ) -> list[str]:
        """Delete those artifacts not stored again since `stored_before`."""
        self._open("DeleteArtifacts")
        gone = [
            a
            for a in dict.fromkeys(artifact_ids)
            if a in self._stored_at and self._stored_at[a] < stored_before
        ]
        for artifact_id in gone:
            del self._artifacts[artifact_id]
            del self._stored_at[artifact_id]
        return gone

    async def put_artifact(self, kind: str, data: bytes, *, patience: float | None = None) -> str:
        """Store `data` under its content id; returns the id."""
        self._open("PutArtifact")
        return self._store_artifact(data)

    async def get_artifact(self, artifact_id: str, *, patience: float | None = None) -> bytes:
        """An artifact's bytes (`artifact_not_found` when missing)."""
        self._open("GetArtifact")
        data = self._artifacts.get(artifact_id)
        if data is None:
            raise not_found(
                "artifact_not_found", f"no artifact {artifact_id!r} is stored", artifact_id=artifact_id
            )
        return data

    async def has_artifact(self, artifact_id: str, *, patience: float | None = None) -> bool:
        """Whether the artifact is stored."""
        self._open("HasArtifact")
        return artifact_id in self._artifacts

    async def close(self) -> None:
        """Close the log: later calls fail `store_unavailable`; subscriptions end."""
        self._closed = True
        for wake in self._appended.values():
            wake.set()
        self._appended.clear()
