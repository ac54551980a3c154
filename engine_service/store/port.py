"""The EventLog port: what the engine needs of an event store, and the records it answers with.

The engine's runtime depends on this Protocol only. `engine_service.store.grpc_client.StoreClient`
implements it over the StoreService; `engine_service.store.memory.InMemoryEventLog` implements it
in one process, with the same semantics, for fast tests.

Semantics every implementation keeps (those of the StoreService, keel.store.v1):

- `append` is atomic and checks the head first: `expected_seq` N appends only at head N, None only
  to a stream without events, and `expected_any` anywhere. A mismatch raises KeelError
  `sequence_conflict` (CONFLICT, details {"actual_seq": head}) and writes nothing. Inline artifacts
  are stored in the same append, under their content id (`sha256:<hex>`); `status` labels the stream
  with one of engine_service.domain.streams.STATUS_LABELS; `attributes` set (or overwrite) the stream's
  attributes with the same append, and only if it lands.
- `read` returns events from `from_seq` on, in order (skipping events a trim deleted); `head`
  returns the head sequence and label ("" when the stream has none; 0 for a stream with no events).
- `subscribe` yields the events after `after_seq`, then each new one as its append commits.
- `list_streams` pages streams with an id prefix and a label, newest first; it also keeps only the
  streams that carry every given attribute with exactly its value, those created in
  [`created_after`, `created_before`), and those whose duration is in [`min_duration`,
  `max_duration`]: from creation to `ended_at` (when the label became one of ENDED_LABELS; later
  appends keep it) or to now while the stream has not ended. Each listed stream comes with its
  attributes.
- artifacts are content-addressed: `put_artifact` of the same bytes twice stores them once,
  `get_artifact` of an unknown id raises `artifact_not_found` (NOT_FOUND).
- `trim` deletes a stream's events below `before_seq`; head and label stay.
- the due-time index: an append may set (`due_at_us` > 0) or clear (0) the stream's due time with
  the same append, and only if it lands; `list_due` finds the streams due by a time, earliest first;
  `nudge_due` moves a *parked* stream's due time earlier (a wake-up from elsewhere).
- `delete_streams` deletes whole streams in one transaction; `list_artifacts`/`delete_artifacts`
  serve an artifact collection: an artifact whose bytes were stored again after the cut-off stays.

`patience` (seconds, FOREVER to wait for good) bounds how long a call waits for an unreachable
store; an implementation that is always reachable ignores it.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

FOREVER = math.inf
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamEvent:
    """An event as the store holds it."""

    seq: int
    type: str
    payload: bytes
    recorded_at: datetime | None


class LocalAppends:
    """Events this process appended, handed at once to whoever here watches their stream: what an
    engine wrote itself need not come back to it through a store subscription.

    Published once the append is known to have committed, in the order the answers arrive (a watcher
    tells a gap or a repeat by the sequence numbers). An append by anyone else is not seen here.
    """

    def __init__(self) -> None:
        self._watchers: dict[str, list[Callable[[StreamEvent], None]]] = {}

    def watch(self, stream_id: str, deliver: Callable[[StreamEvent], None]) -> Callable[[], None]:
        """Hand every event appended here to `stream_id` from now on to `deliver`; returns the undo."""
        self._watchers.setdefault(stream_id, []).append(deliver)

        def unwatch() -> None:
            watching = self._watchers.get(stream_id, [])
            if deliver in watching:
                watching.remove(deliver)
            if not watching:
                self._watchers.pop(stream_id, None)

        return unwatch

    def published(self, stream_id: str, first_seq: int, events: Sequence[tuple[str, bytes]]) -> None:
        """`events` were appended to `stream_id` from `first_seq` on (a dictionary look when unwatched)."""
        watching = self._watchers.get(stream_id)
        if not watching:
            return
        stored = [
            StreamEvent(seq, name, bytes(payload), None)
            for seq, (name, payload) in enumerate(events, first_seq)
        ]
        for deliver in list(watching):
            for event in stored:
                try:
                    deliver(event)
                except Exception:  # a watcher's bug must not turn a committed append into a failure
                    log.exception("a watcher of %s failed", stream_id)


@dataclass(frozen=True)
class AppendResult:
    """Where an append landed."""

    first_seq: int
    head_seq: int
    artifact_ids: tuple[str, ...]
    # The heads of the append's `report_heads` streams, read in its transaction (None: not known,
    # as when a retried append found its first try committed).
    reported_heads: tuple[int, ...] | None = None
    # The time the store recorded the events with, by its clock (µs since the epoch; None: not
    # known, as from a store older than the field). A stream's first append: its creation time.
    recorded_at_us: int | None = None


@dataclass(frozen=True)
class DueStream:
    """A stream in the store's due-time index: its id, due time (µs since the epoch) and head."""

    stream_id: str
    due_at_us: int
    head_seq: int


@dataclass(frozen=True)
class ArtifactSummary:
    """An artifact in a ListArtifacts page: its id, kind, size and when its bytes were last stored."""

    artifact_id: str
    kind: str
    size: int
    stored_at: datetime | None


@dataclass(frozen=True)
class StreamSummary:
    """A stream in a ListStreams page."""

    stream_id: str
    head_seq: int
    status: str
    created_at: datetime | None
    updated_at: datetime | None
    attributes: dict[str, str] = field(default_factory=dict)
    ended_at: datetime | None = None  # when its label became one of ENDED_LABELS (None: it has not)


class EventLog(Protocol):
    """An event store as the engine uses it (see the module docstring for the semantics)."""

    # How long a call waits for an unreachable store unless told otherwise (seconds).
    patience: float
    # Calls made, by StoreService method name: how tests and operators count round trips.
    calls: collections.Counter[str]
    # This process's committed appends, for watchers here (see LocalAppends).
    local: LocalAppends

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
        """Append (type, payload) events atomically after `expected_seq`, with (kind, bytes) artifacts,
        the stream's `attributes` and its due time (`due_at_us`: None keeps it, 0 clears it); in the
        same transaction, each parked stream of `nudges` (stream id -> due time) becomes due by then,
        and the heads of the `report_heads` streams are read (`AppendResult.reported_heads`)."""
        ...

    async def list_due(
        self, before_us: int, *, prefix: str, limit: int = 100, patience: float | None = None
    ) -> tuple[list[DueStream], int]:
        """Streams with `prefix` due by `before_us`, earliest first (at most `limit`), and the
        earliest due time of one not listed (0: none)."""
        ...

    async def read(
        self, stream_id: str, *, from_seq: int = 1, limit: int | None = None, patience: float | None = None
    ) -> list[StreamEvent]:
        """Events of a stream from `from_seq` (all of them, or at most `limit`)."""
        ...

    async def head(self, stream_id: str, *, patience: float | None = None) -> tuple[int, str]:
        """The stream's head sequence and status label ("" when unlabelled)."""
        ...

    def subscribe(self, stream_id: str, *, after_seq: int = 0) -> AsyncGenerator[StreamEvent, None]:
        """Events after `after_seq`, then live ones as they are appended."""
        ...

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
        """A page of streams whose id starts with `prefix`, whose label is in `statuses` (all when
        empty), that carry every one of `attributes`, were created in [`created_after`,
        `created_before`) and whose duration is in [`min_duration`, `max_duration`], newest first,
        and the next page token ("" after the last page)."""
        ...

    async def nudge_due(self, stream_id: str, due_at_us: int, *, patience: float | None = None) -> bool:
        """If the stream is parked, make its due time at most `due_at_us`; whether it is parked."""
        ...

    async def trim(self, stream_id: str, before_seq: int, *, patience: float | None = None) -> int:
        """Delete the stream's events below `before_seq` (at most head + 1); returns how many went."""
        ...

    async def delete_streams(self, stream_ids: Sequence[str], *, patience: float | None = None) -> int:
        """Delete whole streams (events, head, label, attributes) in one transaction; how many existed."""
        ...

    async def list_artifacts(
        self,
        stored_before: datetime,
        *,
        page_size: int = 100,
        page_token: str = "",
        patience: float | None = None,
    ) -> tuple[list[ArtifactSummary], str]:
        """A page of artifacts last stored before `stored_before`, oldest first, and the next token."""
        ...

    async def delete_artifacts(
        self, artifact_ids: Sequence[str], stored_before: datetime, *, patience: float | None = None
    ) -> list[str]:
        """Delete those artifacts not stored again since `stored_before`; returns the ids deleted."""
        ...

    async def put_artifact(self, kind: str, data: bytes, *, patience: float | None = None) -> str:
        """Store `data` under its content id (a repeat stores nothing new); returns the id."""
        ...

    async def get_artifact(self, artifact_id: str, *, patience: float | None = None) -> bytes:
        """An artifact's bytes (`artifact_not_found` when missing)."""
        ...

    async def has_artifact(self, artifact_id: str, *, patience: float | None = None) -> bool:
        """Whether the artifact is stored."""
        ...

    async def close(self) -> None:
        """Release the connection (no call may follow)."""
        ...
