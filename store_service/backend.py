"""The storage contract every StoreService backend implements, its records, and its errors.

This module is backend-neutral and wire-neutral: it imports neither grpc, protobuf, nor a database
driver. SQLite (`store_service.sqlite`) and PostgreSQL (`store_service.postgres`) implement it, both
on the shared SQL flow of `store_service.sql_backend`, and both must pass the one abstract suite in
`tests/store/backend_suite.py`. Artifact ids are content ids (`keel_core.content`).
"""

from __future__ import annotations

import abc
import base64
import binascii
import enum
from collections.abc import AsyncIterable, AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from keel_core.content import CONTENT_ID_PATTERN
from keel_core.errors import ErrorCategory, KeelError, invalid_argument, not_found

ARTIFACT_ID_PATTERN = CONTENT_ID_PATTERN
# Artifacts are stored and served in chunks of this size (one gRPC message each on the way out).
ARTIFACT_CHUNK_BYTES = 1024 * 1024


class StreamStatus(enum.IntEnum):
    """A stream's lifecycle label; values mirror keel.store.v1.StreamStatus."""

    UNSPECIFIED = 0
    ACTIVE = 1
    COMPLETED = 2
    FAILED = 3
    CANCELED = 4
    PARKED = 5


# The labels that say a stream's subject finished: a stream takes its `ended_at_us` when its label
# becomes one of these, keeps it while the label stays one, and loses it when the label leaves them.
TERMINAL_STATUSES = (StreamStatus.COMPLETED, StreamStatus.FAILED, StreamStatus.CANCELED)


class ExpectedKind(enum.Enum):
    """How an append checks the stream's head."""

    EXACT = "exact"
    NO_STREAM = "no_stream"
    ANY = "any"


@dataclass(frozen=True, slots=True)
class Expected:
    """The head an append requires: an exact sequence, an empty stream, or anything."""

    kind: ExpectedKind
    seq: int = 0

    @classmethod
    def exact(cls, seq: int) -> Expected:
        """The head must be exactly `seq` (0 means the stream is empty)."""
        return cls(ExpectedKind.EXACT, seq)

    @classmethod
    def no_stream(cls) -> Expected:
        """The stream must have no events."""
        return cls(ExpectedKind.NO_STREAM)

    @classmethod
    def any(cls) -> Expected:
        """No check: append after whatever the head is."""
        return cls(ExpectedKind.ANY)

    def admits(self, head: int) -> bool:
        """Whether a stream whose head is `head` satisfies this expectation."""
        if self.kind is ExpectedKind.ANY:
            return True
        if self.kind is ExpectedKind.NO_STREAM:
            return head == 0
        return head == self.seq


# An event to append as a backend takes it: (type name, opaque payload), read by position. The
# servicer makes one for every event of every append, and a plain tuple costs a quarter of what a
# frozen dataclass does to make.
EventPair = tuple[str, bytes]


class NewEvent(NamedTuple):
    """An event to append, with names: a NamedTuple rather than a frozen dataclass like the other
    records, so that a NewEvent is an `EventPair`."""

    type: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class NewArtifact:
    """A small artifact stored in the same transaction as an append."""

    kind: str
    data: bytes


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as committed; `recorded_at_us` is microseconds since the Unix epoch."""

    stream_id: str
    seq: int
    type: str
    payload: bytes
    recorded_at_us: int


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append committed: its first sequence, the new head, and inline artifact ids."""

    first_seq: int
    head_seq: int
    artifact_ids: tuple[str, ...] = ()
    # The heads of the append's `report_heads` streams, in its order, read in its transaction.
    reported_heads: tuple[int, ...] = ()
    # The time its events were recorded with (µs since the epoch, the store's clock; 0: not known).
    recorded_at_us: int = 0
    # The append was a repeat of one committed before under the same `append_key`: nothing was
    # written now, and this is the first one's answer.
    repeated: bool = False


@dataclass(frozen=True, slots=True)
class TrimResult:
    """What a trim did: how many events it deleted, and the stream's (unchanged) head."""

    removed: int
    head_seq: int


@dataclass(frozen=True, slots=True)
class EventPage:
    """A forward page of a stream: the events, where to read next (0 at the head), the head."""

    events: tuple[StoredEvent, ...]
    next_seq: int
    head_seq: int


# ListStreams pages walk a backend's creation order downwards from here (the first page).
FIRST_PAGE_POSITION = 2**63 - 1


def encode_page_token(prefix: bytes, position: int) -> str:
    """An opaque ListStreams page token: the backend's prefix and the creation order to go below."""
    return base64.urlsafe_b64encode(prefix + str(position).encode()).decode()


def decode_page_token(prefix: bytes, token: str) -> int:
    """The position in a token `encode_page_token` made with this prefix, else `invalid_page_token`."""
    try:
        raw = base64.urlsafe_b64decode(token.encode())
    except (binascii.Error, ValueError) as exc:
        raise invalid_page_token(token) from exc
    digits = raw[len(prefix) :]
    # A position fits 19 digits: the length check first, as int() refuses over 4300 digits.
    if not raw.startswith(prefix) or not digits.isdigit() or len(digits) > len(str(FIRST_PAGE_POSITION)):
        raise invalid_page_token(token)
    if not 0 < int(digits) <= FIRST_PAGE_POSITION:
        raise invalid_page_token(token)
    return int(digits)


# A page of events stops once this many payload bytes are in it (it always holds at least one
# event), so that a page of large events still fits one gRPC message (16 MiB).
READ_PAGE_BYTES = 8 * 1024 * 1024


def page_of(events: Sequence[StoredEvent], head: int) -> EventPage:
    """A page of `events` (in order) cut at READ_PAGE_BYTES, with where to read next."""
    total = 0
    kept = len(events)
    for index, event in enumerate(events):
        if index and total + len(event.payload) > READ_PAGE_BYTES:
            kept = index
            break
        total += len(event.payload)
    page = tuple(events[:kept])
    last = page[-1].seq if page else head
    return EventPage(page, last + 1 if last < head else 0, head)


@dataclass(frozen=True, slots=True)
class DueStream:
    """A stream in the due-time index: its id, due time (µs since the epoch) and head."""

    stream_id: str
    due_at_us: int
    head_seq: int


@dataclass(frozen=True, slots=True)
class DuePage:
    """Due streams, earliest first, and the earliest due time of a stream not listed (0: none)."""

    due: tuple[DueStream, ...]
    next_due_at_us: int


@dataclass(frozen=True, slots=True)
class StreamHead:
    """A stream's head sequence (0 when it has no events) and its status label."""

    head_seq: int
    status: StreamStatus


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One stream in a listing; times are microseconds since the Unix epoch."""

    stream_id: str
    head_seq: int
    status: StreamStatus
    created_at_us: int
    updated_at_us: int
    attributes: Mapping[str, str] = field(default_factory=dict)
    # When the label became terminal (TERMINAL_STATUSES); 0 while it is not. Unlike updated_at_us,
    # later appends to a finished stream leave it alone, so a finished stream's duration is fixed.
    ended_at_us: int = 0


@dataclass(frozen=True, slots=True)
class StreamPage:
    """A page of streams, newest first, and the opaque token for the next page ("" at the end)."""

    streams: tuple[StreamInfo, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    """A stored artifact's id (`sha256:<hex>`), kind and size in bytes."""

    artifact_id: str
    kind: str
    size: int


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    """An artifact in a ListArtifacts page: its info and when it was last stored (microseconds)."""

    artifact_id: str
    kind: str
    size: int
    stored_at_us: int


@dataclass(frozen=True, slots=True)
class ArtifactPage:
    """A page of artifacts, oldest first, and the opaque token for the next page ("" at the end)."""

    artifacts: tuple[StoredArtifact, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class ArtifactPut:
    """The outcome of a put: the artifact's id and size, and False if it already existed."""

    artifact_id: str
    size: int
    created: bool


@dataclass(frozen=True, slots=True)
class ArtifactDownload:
    """An artifact's info and an async iterator over its bytes, in order."""

    info: ArtifactInfo
    chunks: AsyncIterator[bytes]


class StoreBackend(abc.ABC):
    """The durable store behind StoreService: per-stream event logs and content-addressed artifacts.

    Every method is safe to call concurrently. An append or put returns only once durable (as
    durable as the backend's configured durability promises).
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate the schema and start background work; call once before use."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish queued writes, end subscriptions, and release connections."""

    @abc.abstractmethod
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
        """Append `events` atomically if the head admits `expected`; set `status`; store `artifacts`;
        set the stream's `attributes` (a key it has already gets the new value); set the stream's
        due time to `due_at_us` (None keeps it, 0 clears it) in the due-time index; in the same
        transaction, make each PARKED stream of `nudges` (stream id -> due time) due by its time,
        as `nudge_due` does, and read the heads of the `report_heads` streams (after the events,
        so a stream appended to in the same group shows them) into `AppendResult.reported_heads`.

        Raises `sequence_conflict` (CONFLICT, details {"actual_seq": head}) on a head mismatch,
        and writes nothing in that case: no event, label, artifact, attribute, due time or nudge.

        An `append_key` makes the append idempotent: if the stream still holds an append committed
        under the same key (its first event is kept with it), this one writes nothing and answers as
        that one did (`repeated`, its sequences and recorded time; heads are reported as they are
        now), whatever `expected` says. The key is checked before the head.
        """

    @abc.abstractmethod
    async def read(self, stream_id: str, from_seq: int, limit: int) -> EventPage:
        """Read up to `limit` events with seq >= `from_seq`, in order.

        Events a trim deleted are skipped: the page starts at the first kept event at or after
        `from_seq`.
        """

    @abc.abstractmethod
    async def trim(self, stream_id: str, before_seq: int) -> TrimResult:
        """Delete the stream's events with seq < `before_seq`; the head and label stay as they are.

        Appends keep their compare-and-swap against the true head (an append after a trim still
        needs it), and a trim never races an append into a lost or duplicated sequence number. An
        unknown stream is an empty one (head 0). Raises `invalid_sequence` (INVALID_ARGUMENT,
        details {"head_seq": head}) when `before_seq` > head + 1, and deletes nothing then.
        """

    @abc.abstractmethod
    async def head(self, stream_id: str) -> StreamHead:
        """The stream's head sequence and status label (0 and UNSPECIFIED if it has no events)."""

    @abc.abstractmethod
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
        """Streams whose label is in `statuses` (all when empty), id starts with `prefix`, that have
        every one of `attributes` with exactly its value, that were created in
        [`created_after_us`, `created_before_us`) (0: unbounded), and whose duration is in
        [`min_duration_us`, `max_duration_us`] (None: unbounded); each with its attributes.

        A stream's duration runs from its creation to its `ended_at_us` once its label is terminal,
        and to now before that.

        Newest (most recently created) first; an attribute filter is answered from an index, never
        by reading every stream. Raises `invalid_page_token` for a token this backend did not issue.
        """

    @abc.abstractmethod
    async def list_due(self, before_us: int, *, prefix: str = "", limit: int = 100) -> DuePage:
        """Streams whose due time is at or before `before_us` and whose id starts with `prefix`,
        earliest first (at most `limit`), and the earliest due time of a matching stream left out.

        Answered from an index on the due time, never by reading every stream.
        """

    @abc.abstractmethod
    async def nudge_due(self, stream_id: str, due_at_us: int) -> bool:
        """If the stream is PARKED, make its due time at most `due_at_us`; whether it is PARKED.

        Atomic with appends: a concurrent append that changes the label or the due time is applied
        wholly before or after it.
        """

    @abc.abstractmethod
    def subscribe(self, stream_id: str, after_seq: int) -> AsyncIterator[StoredEvent]:
        """Yield the events after `after_seq`, then each new one as its append commits.

        Never polls the database for new events. Ends when the consumer stops iterating (or is
        cancelled) or the backend closes.
        """

    @abc.abstractmethod
    async def put_artifact(self, kind: str, chunks: AsyncIterable[bytes]) -> ArtifactPut:
        """Store the concatenated `chunks` under `sha256:<hex>` of them; a repeat is a no-op.

        If `chunks` raises (StoreService refusing an upload past its cap, a broken source), the error
        is re-raised only once nothing of the upload is stored: no artifact, no chunk. A cancelled
        put stores no artifact either; chunks it staged may be dropped after it returns.
        """

    @abc.abstractmethod
    async def get_artifact(self, artifact_id: str) -> ArtifactDownload:
        """The artifact's info and its bytes as chunks; raises `artifact_not_found`."""

    @abc.abstractmethod
    async def has_artifact(self, artifact_id: str) -> ArtifactInfo | None:
        """The artifact's info, or None when it is not stored."""

    # -- deletion (retention) ----------------------------------------------------------------
    #
    # An artifact's stored time is renewed whenever its bytes are stored again (a put, or inline
    # with an append), in the same transaction as that append: an artifact collection that
    # decided an artifact was unreferenced deletes it only if it was not stored again since.

    @abc.abstractmethod
    async def delete_streams(self, stream_ids: Sequence[str]) -> int:
        """Delete these streams (events, head row, label, attributes) in one transaction; returns how
        many existed. Unknown ids are skipped."""

    @abc.abstractmethod
    async def list_artifacts(self, stored_before_us: int, page_size: int, page_token: str) -> ArtifactPage:
        """Artifacts last stored before `stored_before_us`, oldest first, one page at a time."""

    @abc.abstractmethod
    async def delete_artifacts(self, artifact_ids: Sequence[str], stored_before_us: int) -> list[str]:
        """Delete those of `artifact_ids` last stored before `stored_before_us` (with their chunks), in
        one transaction; returns the ids deleted."""


def sequence_conflict(stream_id: str, expected: Expected, actual_seq: int) -> KeelError:
    """The error of an append whose expected head did not match the actual one."""
    wanted = "no stream" if expected.kind is ExpectedKind.NO_STREAM else f"head {expected.seq}"
    return KeelError(
        "sequence_conflict",
        f"stream {stream_id!r}: expected {wanted} but the head is {actual_seq}; "
        "read the stream and retry against its head",
        category=ErrorCategory.CONFLICT,
        details={"actual_seq": actual_seq},
    )


def artifact_not_found(artifact_id: str) -> KeelError:
    """The error of a get for an artifact that is not stored."""
    return not_found("artifact_not_found", f"no artifact {artifact_id!r} is stored", artifact_id=artifact_id)


def invalid_page_token(token: str) -> KeelError:
    """The error of a page token this backend did not issue."""
    return invalid_argument(
        "invalid_page_token",
        f"page_token {token[:40]!r} was not issued by this store; pass the previous next_page_token",
    )


def trim_past_head(stream_id: str, before_seq: int, head_seq: int) -> KeelError:
    """The error of a trim that would delete events the stream does not have yet."""
    return invalid_argument(
        "invalid_sequence",
        f"stream {stream_id!r}: before_seq {before_seq} is past head + 1 ({head_seq + 1}); "
        "a trim deletes only events that exist (read the head first)",
        head_seq=head_seq,
    )


def empty_batch() -> KeelError:
    """The error of an append without events."""
    return invalid_argument("invalid_batch", "an append needs at least one event")


__all__ = [
    "ARTIFACT_CHUNK_BYTES",
    "ARTIFACT_ID_PATTERN",
    "TERMINAL_STATUSES",
    "AppendResult",
    "ArtifactDownload",
    "ArtifactInfo",
    "ArtifactPage",
    "ArtifactPut",
    "DuePage",
    "DueStream",
    "EventPage",
    "EventPair",
    "Expected",
    "ExpectedKind",
    "NewArtifact",
    "NewEvent",
    "StoreBackend",
    "StoredArtifact",
    "StoredEvent",
    "StreamHead",
    "StreamInfo",
    "StreamPage",
    "StreamStatus",
    "TrimResult",
    "artifact_not_found",
    "empty_batch",
    "invalid_page_token",
    "sequence_conflict",
    "trim_past_head",
]
