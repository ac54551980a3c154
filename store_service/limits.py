"""StoreService's input limits and the checks that enforce them, on plain values (no protobuf).

Every check raises an INVALID_ARGUMENT KeelError whose code is the ErrorInfo reason and whose
message says what to change. They run before anything touches the backend, so bad input never
writes anything. The exception is the operator's artifact cap (RESOURCE_EXHAUSTED): a PutArtifact
is checked as its chunks stream in, and the backend discards whatever it had staged of it.
"""

from __future__ import annotations

from keel_core.errors import ErrorCategory, KeelError, invalid_argument
from store_service.backend import ARTIFACT_ID_PATTERN, StreamStatus

MAX_STREAM_ID_CHARS = 200
MAX_BATCH_EVENTS = 1000
MAX_EVENT_TYPE_CHARS = 128
MAX_EVENT_PAYLOAD_BYTES = 1024 * 1024
MAX_ARTIFACT_KIND_CHARS = 64
MAX_INLINE_ARTIFACT_BYTES = 8 * 1024 * 1024
MAX_INLINE_ARTIFACTS = 16
# The operator's cap on one artifact's size, however it arrives (--max-artifact-bytes); 0 = no cap.
DEFAULT_MAX_ARTIFACT_BYTES = 1024 * 1024 * 1024
MAX_ARTIFACT_BYTES_FLAG = "--max-artifact-bytes"
DEFAULT_READ_LIMIT = 1000
MAX_READ_LIMIT = 10_000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

_LABELS = frozenset(s.value for s in StreamStatus if s is not StreamStatus.UNSPECIFIED)


def _has_control_chars(text: str) -> bool:
    # isprintable() runs in C and printable text has no control characters; only the rare
    # non-printable-but-allowed text (e.g. with a non-ASCII space) takes the per-character scan.
    if text.isprintable():
        return False
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)


def check_stream_id(stream_id: str) -> str:
    """A stream id is 1 to 200 characters without control characters."""
    if not stream_id or len(stream_id) > MAX_STREAM_ID_CHARS or _has_control_chars(stream_id):
        raise invalid_argument(
            "invalid_stream_id",
            f"stream_id must be 1 to {MAX_STREAM_ID_CHARS} characters without control characters "
            f"(got {len(stream_id)} characters)",
        )
    return stream_id


MAX_APPEND_KEY_CHARS = 128


def check_append_key(key: str) -> str | None:
    """An append key is 1 to 128 printable ASCII characters; empty is none (None)."""
    if not key:
        return None
    if len(key) > MAX_APPEND_KEY_CHARS:
        found = f"got {len(key)} characters"
    elif not (key.isascii() and key.isprintable()):
        found = "got a character that is not printable ASCII"
    else:
        return key
    raise invalid_argument(
        "invalid_append_key",
        f"append_key must be 1 to {MAX_APPEND_KEY_CHARS} printable ASCII characters, "
        f"such as a UUID ({found})",
    )


MAX_ATTRIBUTES = 128
MAX_ATTRIBUTE_KEY_CHARS = 512
MAX_ATTRIBUTE_VALUE_CHARS = 1024


def check_attributes(attributes: dict[str, str], what: str = "attributes") -> dict[str, str]:
    """At most 64 attributes; keys 1 to 128 and values up to 1024 characters, no control characters."""
    if len(attributes) > MAX_ATTRIBUTES:
        raise invalid_argument(
            "invalid_attributes", f"{what}: at most {MAX_ATTRIBUTES} attributes (got {len(attributes)})"
        )
    for key, value in attributes.items():
        if (
            not key
            or len(key) > MAX_ATTRIBUTE_KEY_CHARS
            or len(value) > MAX_ATTRIBUTE_VALUE_CHARS
            or _has_control_chars(key + value)
        ):
            raise invalid_argument(
                "invalid_attributes",
                f"{what}: key {key[:40]!r} must be 1 to {MAX_ATTRIBUTE_KEY_CHARS} characters and its value "
                f"at most {MAX_ATTRIBUTE_VALUE_CHARS}, without control characters",
                key=key[:MAX_ATTRIBUTE_KEY_CHARS],
            )
    return attributes


def check_prefix(prefix: str) -> str:
    """A stream id prefix follows the stream id rules, except that it may be empty."""
    if len(prefix) > MAX_STREAM_ID_CHARS or _has_control_chars(prefix):
        raise invalid_argument(
            "invalid_stream_id",
            f"prefix must be at most {MAX_STREAM_ID_CHARS} characters without control characters",
        )
    return prefix


def check_sequence(name: str, value: int) -> int:
    """Sequence numbers are 0 or more."""
    if value < 0:
        raise invalid_argument("invalid_sequence", f"{name} must be 0 or more (got {value})")
    return value


def check_batch_size(count: int) -> None:
    """An append carries 1 to 1000 events."""
    if not 1 <= count <= MAX_BATCH_EVENTS:
        raise invalid_argument(
            "invalid_batch", f"an append needs 1 to {MAX_BATCH_EVENTS} events (got {count})"
        )


MAX_BATCH_APPENDS = 256


def check_batch_appends(count: int) -> None:
    """An AppendEventsBatch call, or an AppendEventsStream request, carries 1 to 256 appends."""
    if not 1 <= count <= MAX_BATCH_APPENDS:
        raise invalid_argument(
            "invalid_batch",
            f"a batch (AppendEventsBatch, or a request of AppendEventsStream) takes 1 to {MAX_BATCH_APPENDS} "
            f"appends (got {count}); send more as several batches",
        )


def bad_event(index: int, type_name: str, payload_size: int) -> KeelError:
    """The error for the event at `index` whose type or payload is out of limits."""
    if not type_name or len(type_name) > MAX_EVENT_TYPE_CHARS or _has_control_chars(type_name):
        return invalid_argument(
            "invalid_event_type",
            f"events[{index}].type must be 1 to {MAX_EVENT_TYPE_CHARS} characters without control "
            f"characters (got {len(type_name)} characters)",
        )
    return invalid_argument(
        "event_too_large",
        f"events[{index}].payload is {payload_size} bytes; the limit is {MAX_EVENT_PAYLOAD_BYTES} "
        "(store large data as an artifact and put its id in the event)",
    )


def event_is_valid(type_name: str, payload_size: int) -> bool:
    """Whether an event's type and payload size are within limits (the per-event fast path)."""
    if not 0 < len(type_name) <= MAX_EVENT_TYPE_CHARS or payload_size > MAX_EVENT_PAYLOAD_BYTES:
        return False
    return not _has_control_chars(type_name)


def check_status_label(value: int) -> StreamStatus | None:
    """An append's status: 0 means "leave the label", 1..5 set it, anything else is rejected."""
    if value == StreamStatus.UNSPECIFIED:
        return None
    if value not in _LABELS:
        raise invalid_argument("invalid_status", f"status {value} is not a known StreamStatus value")
    return StreamStatus(value)


def check_status_filter(values: list[int]) -> list[StreamStatus]:
    """A ListStreams filter names labels 1..5; UNSPECIFIED and unknown values are rejected."""
    for value in values:
        if value not in _LABELS:
            raise invalid_argument(
                "invalid_status",
                f"statuses may only hold ACTIVE, COMPLETED, FAILED, CANCELED or PARKED (got {value}); "
                "leave it empty to list every stream",
            )
    return [StreamStatus(v) for v in dict.fromkeys(values)]


def check_artifact_kind(kind: str) -> str:
    """An artifact kind is 1 to 64 characters without control characters."""
    if not kind or len(kind) > MAX_ARTIFACT_KIND_CHARS or _has_control_chars(kind):
        raise invalid_argument(
            "invalid_artifact_kind",
            f"artifact kind must be 1 to {MAX_ARTIFACT_KIND_CHARS} characters without control characters",
        )
    return kind


def _bytes_text(count: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count} bytes ({count / size:.4g} {unit})"
    return f"{count} bytes"


def artifact_too_large(what: str, cap: int, seen: int) -> KeelError:
    """The error of an artifact refused by the store's cap; `seen` is the byte count that passed it."""
    return KeelError(
        "artifact_too_large",
        f"{what} passed this store's artifact cap of {_bytes_text(cap)}: it was refused when "
        f"{_bytes_text(seen)} had arrived. Split the data into smaller artifacts, or have the operator raise "
        f"the cap with store-service {MAX_ARTIFACT_BYTES_FLAG} N (env KEEL_STORE_MAX_ARTIFACT_BYTES; "
        "0 = no cap)",
        category=ErrorCategory.RESOURCE_EXHAUSTED,
        details={"max_artifact_bytes": cap, "seen_bytes": seen},
    )


def check_artifact_size(what: str, size: int, cap: int) -> None:
    """`size` bytes of one artifact must not pass `cap` (0 means no cap); else RESOURCE_EXHAUSTED."""
    if cap and size > cap:
        raise artifact_too_large(what, cap, size)


def check_inline_artifacts(sizes: list[int], max_artifact_bytes: int = 0) -> None:
    """An append carries at most 16 inline artifacts of at most 8 MiB each, none over the cap."""
    if len(sizes) > MAX_INLINE_ARTIFACTS:
        raise invalid_argument(
            "invalid_batch", f"an append carries at most {MAX_INLINE_ARTIFACTS} artifacts (got {len(sizes)})"
        )
    for index, size in enumerate(sizes):
        # The operator's cap first: PutArtifact, which the 8 MiB message below suggests, has it too.
        check_artifact_size(f"artifacts[{index}]", size, max_artifact_bytes)
        if size > MAX_INLINE_ARTIFACT_BYTES:
            raise invalid_argument(
                "artifact_too_large",
                f"artifacts[{index}] is {size} bytes; inline artifacts are limited to "
                f"{MAX_INLINE_ARTIFACT_BYTES} bytes (use PutArtifact for larger ones)",
            )


def check_artifact_id(artifact_id: str) -> str:
    """An artifact id is `sha256:` and 64 lowercase hex digits."""
    if ARTIFACT_ID_PATTERN.fullmatch(artifact_id) is None:
        raise invalid_argument(
            "invalid_artifact_id",
            f"artifact_id must be 'sha256:' followed by 64 lowercase hex digits (got {artifact_id[:80]!r})",
        )
    return artifact_id


def read_limit(limit: int) -> int:
    """ReadEvents' limit: 0 means the default of 1000; 1..10000 as given."""
    if not 0 <= limit <= MAX_READ_LIMIT:
        raise invalid_argument("invalid_limit", f"limit must be 0 to {MAX_READ_LIMIT} (got {limit})")
    return limit or DEFAULT_READ_LIMIT


def page_size(size: int) -> int:
    """ListStreams' page size: 0 means the default of 100; 1..1000 as given."""
    if not 0 <= size <= MAX_PAGE_SIZE:
        raise invalid_argument("invalid_page_size", f"page_size must be 0 to {MAX_PAGE_SIZE} (got {size})")
    return size or DEFAULT_PAGE_SIZE


def check_duration_range(min_us: int | None, max_us: int | None) -> tuple[int | None, int | None]:
    """ListStreams' duration filters in µs (None: unbounded): neither negative, min at most max."""
    for name, value in (("min_duration_us", min_us), ("max_duration_us", max_us)):
        if value is not None and value < 0:
            raise invalid_argument(
                "invalid_duration", f"{name} must be 0 or more microseconds (got {value})", field=name
            )
    if min_us is not None and max_us is not None and min_us > max_us:
        raise invalid_argument(
            "invalid_duration",
            f"min_duration_us ({min_us}) is more than max_duration_us ({max_us}): no stream could match",
        )
    return min_us, max_us


def check_due_at(name: str, value: int, *, zero: bool) -> int:
    """A due time in µs since the epoch: more than 0 (or 0 too, when `zero` means "clear")."""
    if value < 0 or (value == 0 and not zero):
        least = "0 (clear) or more" if zero else "more than 0"
        raise invalid_argument(
            "invalid_due_at", f"{name} must be {least}, microseconds since the Unix epoch (got {value})"
        )
    return value


MAX_NUDGES = 16


def check_nudges(nudges: list[tuple[str, int]]) -> dict[str, int]:
    """An append's nudges (stream id, due time), at most 16: each stream id valid, each due time
    more than 0; one per stream (the soonest)."""
    if len(nudges) > MAX_NUDGES:
        raise invalid_argument(
            "invalid_nudges", f"nudges: at most {MAX_NUDGES} streams per append (got {len(nudges)})"
        )
    chosen: dict[str, int] = {}
    for stream_id, due_at_us in nudges:
        check_stream_id(stream_id)
        due = check_due_at("nudges.due_at_us", due_at_us, zero=False)
        chosen[stream_id] = min(due, chosen.get(stream_id, due))
    return chosen


MAX_REPORTED_HEADS = 16


def check_report_heads(stream_ids: list[str]) -> tuple[str, ...]:
    """The streams whose heads an append reports: at most 16, each stream id valid."""
    if len(stream_ids) > MAX_REPORTED_HEADS:
        raise invalid_argument(
            "invalid_report_heads",
            f"report_heads: at most {MAX_REPORTED_HEADS} streams per append (got {len(stream_ids)})",
        )
    return tuple(check_stream_id(stream_id) for stream_id in stream_ids)


def due_limit(limit: int) -> int:
    """ListDue's limit: 0 means the default of 100; 1..1000 as given."""
    if not 0 <= limit <= MAX_PAGE_SIZE:
        raise invalid_argument("invalid_limit", f"limit must be 0 to {MAX_PAGE_SIZE} (got {limit})")
    return limit or DEFAULT_PAGE_SIZE


MAX_DELETE_STREAMS = 100
MAX_DELETE_ARTIFACTS = 1000


def check_delete_streams(stream_ids: list[str]) -> list[str]:
    """1 to MAX_DELETE_STREAMS valid stream ids."""
    if not 1 <= len(stream_ids) <= MAX_DELETE_STREAMS:
        raise invalid_argument(
            "invalid_batch",
            f"DeleteStreams takes 1 to {MAX_DELETE_STREAMS} stream ids (got {len(stream_ids)})",
        )
    return [check_stream_id(stream_id) for stream_id in stream_ids]


def check_delete_artifacts(artifact_ids: list[str]) -> list[str]:
    """At most MAX_DELETE_ARTIFACTS valid artifact ids."""
    if len(artifact_ids) > MAX_DELETE_ARTIFACTS:
        raise invalid_argument(
            "invalid_batch",
            f"DeleteArtifacts takes at most {MAX_DELETE_ARTIFACTS} artifact ids (got {len(artifact_ids)})",
        )
    return [check_artifact_id(artifact_id) for artifact_id in artifact_ids]
