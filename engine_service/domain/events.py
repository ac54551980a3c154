"""The run's event stream: kernel events as versioned JSON payloads.

Every payload is a JSON object with `"v": 1`. Readers accept any version they know and ignore
fields they do not, so older streams stay readable; an event type this engine does not know is
decoded as `UnknownEvent` and skipped by the fold (issue 4 adds child/ledger events). Any store
client can append to a run stream, so an event of a known type (or one that is not a JSON object
at all) that does not decode is read as a `CorruptEvent`, never raised: see history.fold for what
the fold makes of it, and `corrupt_event_error` for what callers answer.

    RunStarted          {v, op_id, manifest_id, initial_snapshot_id, parent_run_id?, parent_fact_key?, at_us?,
                         labels?, rerun_of_run_id?, rerun_from_step_id?, trace_context?}
    StepAttemptStarted  {v, step_id, attempt, base_snapshot_id, at_us?}
    FactRecorded        {v, step_id, attempt, fact_key, namespace, response}
    StepAttemptFailed   {v, step_id, attempt, error: {code, category, retryable, message, details?}, at_us?,
                         worker_id?}
    StepCompleted       {v, step_id, attempt, snapshot_id, at_us?, worker_id?, reused_from_run_id?}
    RunCompleted        {v, status: completed|failed|canceled, final_snapshot_id, reason?, error?, at_us?,
                         has_ledger?}
    StepWaiting         {v, step_id, attempt, wait: {kind, until_us?, output?, error?, detail?}, at_us?}
    RunParked           {v, due_at_us, at_us?}       (nothing drives the run until due_at_us or a wake-up)
    RunResumed          {v, reason, at_us?}          (an engine took the parked run up again)
    SignalAwaited       {v, step_id, attempt, fact_key, name, deadline_us?, at_us?}

StepWaiting, RunParked and RunResumed are described in engine_service.domain.waits.

`worker_id` names the worker that ran a remote attempt (engine_service.domain.tasks).
`at_us` is when the engine decided the event (microseconds since the epoch). Events travel in
batches that share the store's commit time, so views take their timings from `at_us` and fall
back to the commit time for streams written before it existed (0 = absent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine_service.domain import streams
from engine_service.domain.canonical import canonical_json_bytes
from engine_service.domain.frozen import with_changes
from engine_service.domain.streams import CANCELED as CANCELED
from engine_service.domain.streams import COMPLETED as COMPLETED
from engine_service.domain.streams import FAILED as FAILED
from engine_service.domain.streams import TERMINAL_STATUSES as TERMINAL_STATUSES
from keel_core.errors import ErrorCategory, KeelError
from keel_core.json_rules import check_json

EVENT_FORMAT_VERSION = 1


# An event must fit the store's 1 MiB per-event limit whatever an op raised: messages and reasons
# are recorded up to this many characters, longer ones cut with a marker.
MAX_RECORDED_TEXT = 8192
# An error's details (an op's OpError(**details) holds what it chose, a response body say) are
# recorded whole up to MAX_RECORDED_TEXT characters of JSON; past that, at most this many of them,
# each value whose JSON is longer than MAX_DETAIL_CHARS cut to that as text.
MAX_DETAILS = 64
MAX_DETAIL_CHARS = 1024
_MAX_DETAIL_KEY_CHARS = 128


def bounded_text(text: str, limit: int = MAX_RECORDED_TEXT) -> str:
    """`text`, cut to `limit` characters with a marker when longer."""
    if len(text) <= limit:
        return text
    return text[: limit - 40] + f"… ({len(text)} characters, truncated)"


def bounded_details(details: dict[str, Any]) -> dict[str, Any]:
    """`details` as they are when small; else their first MAX_DETAILS, long values cut as text."""
    if len(canonical_json_bytes(details)) <= MAX_RECORDED_TEXT:
        return details
    out: dict[str, Any] = {}
    for key, value in list(details.items())[:MAX_DETAILS]:
        text = value if isinstance(value, str) else canonical_json_bytes(value).decode("utf-8")
        kept = value if len(text) <= MAX_DETAIL_CHARS else bounded_text(text, MAX_DETAIL_CHARS)
        out[bounded_text(key, _MAX_DETAIL_KEY_CHARS)] = kept
    if len(details) > MAX_DETAILS:
        out["details_left_out"] = len(details) - MAX_DETAILS
    return out


@dataclass(frozen=True)
class ErrorRecord:
    """A recorded failure: stable code, category, whether a retry may help, and a message."""

    code: str
    category: str
    retryable: bool
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The error as event JSON."""
        out: dict[str, Any] = {
            "code": bounded_text(self.code),
            "category": self.category,
            "retryable": self.retryable,
            "message": bounded_text(self.message),
        }
        if self.details:
            out["details"] = bounded_details(self.details)
        return out

    @staticmethod
    def from_json(data: dict[str, Any]) -> ErrorRecord:
        """An error read back from event JSON (its details obey keel_core.json_rules: they are shown)."""
        details = dict(data.get("details") or {})
        check_json(details, "error.details")
        return ErrorRecord(
            code=str(data.get("code", "unknown")),
            category=str(data.get("category", "unknown")),
            retryable=bool(data.get("retryable", False)),
            message=str(data.get("message", "")),
            details=details,
        )


@dataclass(frozen=True)
class RunStarted:
    """Event 1 of every run."""

    op_id: str
    manifest_id: str
    initial_snapshot_id: str
    parent_run_id: str = ""
    parent_fact_key: str = ""
    at_us: int = 0
    # StartRun's labels (engine_service.domain.labels), kept here so that GetRun shows them.
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    # A rerun (RerunRun): the run it reran and the step it reran from (engine_service.domain.rerun).
    rerun_of_run_id: str = ""
    rerun_from_step_id: str = ""
    # The W3C trace context (traceparent, tracestate) of the client that started the run, so that
    # every engine that drives it continues the client's trace.
    trace_context: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class StepAttemptStarted:
    """An attempt of a step began from a base snapshot."""

    step_id: str
    attempt: int
    base_snapshot_id: str
    at_us: int = 0


@dataclass(frozen=True)
class FactRecorded:
    """The answer of an I/O call, recorded before the op saw it."""

    step_id: str
    attempt: int
    fact_key: str
    namespace: str
    response: Any


@dataclass(frozen=True)
class StepAttemptFailed:
    """An attempt of a step failed; `error.retryable` decides whether it is tried again."""

    step_id: str
    attempt: int
    error: ErrorRecord
    at_us: int = 0
    worker_id: str = ""  # the worker that ran a remote attempt


@dataclass(frozen=True)
class StepCompleted:
    """An attempt of a step completed; `snapshot_id` is the new checkpoint."""

    step_id: str
    attempt: int
    snapshot_id: str
    at_us: int = 0
    worker_id: str = ""  # the worker that ran a remote attempt
    # Set on a step a rerun reused: the run whose output it copied (no attempt ran in this run).
    reused_from_run_id: str = ""


@dataclass(frozen=True)
class RunCompleted:
    """The run reached a terminal status; always the last event."""

    status: str
    final_snapshot_id: str
    reason: str = ""
    error: ErrorRecord | None = None
    at_us: int = 0
    # The run has a failure ledger (kept in a second stream); readers skip that read otherwise.
    has_ledger: bool = False


@dataclass(frozen=True)
class ParkStep:
    """What an op returns to park its attempt, and what `StepWaiting` records.

    `kind` names what the attempt waits for (`timer`, `signal`, ...); `until_us` its absolute due
    time (0: none, only a resolver can end the wait); at the due time the step completes with
    `output`, or fails with `error` when it is set. `detail` is kind-specific JSON (a signal's
    name, say), shown by GetRun.
    """

    kind: str
    until_us: int = 0
    output: Any = None
    error: ErrorRecord | None = None
    detail: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        """The wait as event JSON."""
        data: dict[str, Any] = {"kind": self.kind}
        if self.until_us:
            data["until_us"] = self.until_us
        if self.output is not None:
            data["output"] = self.output
        if self.error is not None:
            data["error"] = self.error.to_json()
        if self.detail:
            data["detail"] = dict(self.detail)
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> ParkStep:
        """A wait read back from event JSON."""
        until = data.get("until_us", 0)
        error = data.get("error")
        return ParkStep(
            kind=str(data["kind"]),
            until_us=until if isinstance(until, int) and until > 0 else 0,
            output=data.get("output"),
            error=ErrorRecord.from_json(dict(error)) if error else None,
            detail=dict(data.get("detail") or {}),
        )


@dataclass(frozen=True)
class StepWaiting:
    """An open attempt parked: it waits for `wait` (engine_service.domain.waits.ParkStep)."""

    step_id: str
    attempt: int
    wait: ParkStep
    at_us: int = 0


@dataclass(frozen=True)
class RunParked:
    """Nothing drives the run until `due_at_us` (0: until a wake-up) or a wake-up."""

    due_at_us: int
    at_us: int = 0


@dataclass(frozen=True)
class RunResumed:
    """An engine took the parked run up again (`reason`: due, woken, ...)."""

    reason: str = ""
    at_us: int = 0


@dataclass(frozen=True)
class SignalAwaited:
    """An attempt began waiting for a signal `name` (to be consumed under `fact_key`).

    `deadline_us`: when the wait times out (microseconds since the epoch; 0 = never). A rerun of
    the step after a crash keeps that deadline (engine_service.domain.signals).
    """

    step_id: str
    attempt: int
    fact_key: str
    name: str
    deadline_us: int = 0
    at_us: int = 0


@dataclass(frozen=True)
class UnknownEvent:
    """An event type this engine does not know (kept so that sequence numbers stay aligned)."""

    type: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class CorruptEvent:
    """A stored event this engine cannot decode: `why` says what is wrong with its payload.

    Never written by Keel (encoding one is a bug); read back from a stream someone else appended to.
    """

    type: str
    why: str


KernelEvent = (
    RunStarted
    | StepAttemptStarted
    | FactRecorded
    | StepAttemptFailed
    | StepCompleted
    | RunCompleted
    | StepWaiting
    | RunParked
    | RunResumed
    | SignalAwaited
    | UnknownEvent
    | CorruptEvent
)


@dataclass(frozen=True)
class StoredEvent:
    """An event as read from the store: its sequence number and commit time."""

    seq: int
    event: KernelEvent
    recorded_at: datetime | None = None


def encode_event(event: KernelEvent) -> tuple[str, bytes]:
    """The event's type name and JSON payload bytes."""
    name, data = event_type_and_json(event)
    return name, canonical_json_bytes(data)


def event_type_and_json(event: KernelEvent) -> tuple[str, dict[str, Any]]:
    """The event's type name and payload as JSON data."""
    name, data = _type_and_json(event)
    at_us = getattr(event, "at_us", 0)
    if at_us and not isinstance(event, UnknownEvent):
        data["at_us"] = at_us
    return name, data


def _type_and_json(event: KernelEvent) -> tuple[str, dict[str, Any]]:
    v = {"v": EVENT_FORMAT_VERSION}
    match event:
        case RunStarted():
            data: dict[str, Any] = {
                **v,
                "op_id": event.op_id,
                "manifest_id": event.manifest_id,
                "initial_snapshot_id": event.initial_snapshot_id,
            }
            if event.parent_run_id:
                data["parent_run_id"] = event.parent_run_id
                data["parent_fact_key"] = event.parent_fact_key
            if event.labels:
                data["labels"] = dict(event.labels)
            if event.rerun_of_run_id:
                data["rerun_of_run_id"] = event.rerun_of_run_id
                data["rerun_from_step_id"] = event.rerun_from_step_id
            if event.trace_context:
                data["trace_context"] = dict(event.trace_context)
            return streams.RUN_STARTED, data
        case StepAttemptStarted():
            return streams.STEP_ATTEMPT_STARTED, {
                **v,
                "step_id": event.step_id,
                "attempt": event.attempt,
                "base_snapshot_id": event.base_snapshot_id,
            }
        case FactRecorded():
            return streams.FACT_RECORDED, {
                **v,
                "step_id": event.step_id,
                "attempt": event.attempt,
                "fact_key": event.fact_key,
                "namespace": event.namespace,
                "response": event.response,
            }
        case StepAttemptFailed():
            data = {**v, "step_id": event.step_id, "attempt": event.attempt, "error": event.error.to_json()}
            if event.worker_id:
                data["worker_id"] = event.worker_id
            return streams.STEP_ATTEMPT_FAILED, data
        case StepCompleted():
            data = {**v, "step_id": event.step_id, "attempt": event.attempt, "snapshot_id": event.snapshot_id}
            if event.worker_id:
                data["worker_id"] = event.worker_id
            if event.reused_from_run_id:
                data["reused_from_run_id"] = event.reused_from_run_id
            return streams.STEP_COMPLETED, data
        case RunCompleted():
            data = {**v, "status": event.status, "final_snapshot_id": event.final_snapshot_id}
            if event.reason:
                data["reason"] = bounded_text(event.reason)
            if event.error is not None:
                data["error"] = event.error.to_json()
            if event.has_ledger:
                data["has_ledger"] = True
            return streams.RUN_COMPLETED, data
        case StepWaiting():
            return streams.STEP_WAITING, {
                **v,
                "step_id": event.step_id,
                "attempt": event.attempt,
                "wait": event.wait.to_json(),
            }
        case RunParked():
            return streams.RUN_PARKED, {**v, "due_at_us": event.due_at_us}
        case RunResumed():
            return streams.RUN_RESUMED, {**v, "reason": event.reason}
        case SignalAwaited():
            data = {
                **v,
                "step_id": event.step_id,
                "attempt": event.attempt,
                "fact_key": event.fact_key,
                "name": event.name,
            }
            if event.deadline_us:
                data["deadline_us"] = event.deadline_us
            return streams.SIGNAL_AWAITED, data
        case UnknownEvent():
            return event.type, event.payload
        case CorruptEvent():
            raise ValueError(f"a corrupt {event.type} event cannot be written ({event.why})")


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


# One decoder for every event: `json.loads` given `parse_constant` builds a new decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def decode_event(type_name: str, payload: bytes) -> KernelEvent:
    """An event read back from its type name and payload bytes (a `CorruptEvent` when it does not decode)."""
    try:
        text = payload.decode("utf-8")
        if text.startswith("\ufeff"):  # json.loads says so; its decoder alone would not
            raise ValueError("the payload starts with a byte-order mark")
        data = _DECODER.decode(text) if text else {}
        if not isinstance(data, dict):
            raise TypeError(f"the payload is a JSON {type(data).__name__}, not an object")
        return event_from_json(type_name, data)
    except KeelError as error:
        return CorruptEvent(type_name, error.message)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
        why = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        return CorruptEvent(type_name, why or type(error).__name__)


def corrupt_event_error(stream_id: str, seq: int, event: CorruptEvent) -> KeelError:
    """DATA_LOSS `corrupt_event`: the run's history cannot be read past event `seq` of `stream_id`."""
    return KeelError(
        "corrupt_event",
        f"event {seq} ({event.type!r}) of stream {stream_id} cannot be decoded: {event.why}. "
        "The run cannot be shown, resumed or completed; it can be listed, and terminalized as "
        "canceled or failed (Terminalize), which appends its terminal event after this one",
        category=ErrorCategory.DATA_LOSS,
        details={"stream_id": stream_id, "seq": seq, "event_type": event.type},
    )


def event_from_json(type_name: str, data: dict[str, Any]) -> KernelEvent:
    """An event from its type name and payload JSON."""
    match type_name:
        case streams.RUN_STARTED:
            return RunStarted(
                op_id=str(data["op_id"]),
                manifest_id=str(data["manifest_id"]),
                initial_snapshot_id=str(data["initial_snapshot_id"]),
                parent_run_id=str(data.get("parent_run_id", "")),
                parent_fact_key=str(data.get("parent_fact_key", "")),
                at_us=_at_us(data),
                labels={str(k): str(v) for k, v in dict(data.get("labels", {})).items()},
                rerun_of_run_id=str(data.get("rerun_of_run_id", "")),
                rerun_from_step_id=str(data.get("rerun_from_step_id", "")),
                trace_context={str(k): str(v) for k, v in dict(data.get("trace_context", {})).items()},
            )
        case streams.STEP_ATTEMPT_STARTED:
            return StepAttemptStarted(
                str(data["step_id"]), int(data["attempt"]), str(data["base_snapshot_id"]), _at_us(data)
            )
        case streams.FACT_RECORDED:
            return FactRecorded(
                step_id=str(data["step_id"]),
                attempt=int(data["attempt"]),
                fact_key=str(data["fact_key"]),
                namespace=str(data["namespace"]),
                response=data.get("response"),
            )
        case streams.STEP_ATTEMPT_FAILED:
            return StepAttemptFailed(
                str(data["step_id"]),
                int(data["attempt"]),
                ErrorRecord.from_json(dict(data["error"])),
                _at_us(data),
                worker_id=str(data.get("worker_id", "")),
            )
        case streams.STEP_COMPLETED:
            return StepCompleted(
                str(data["step_id"]),
                int(data["attempt"]),
                str(data["snapshot_id"]),
                _at_us(data),
                worker_id=str(data.get("worker_id", "")),
                reused_from_run_id=str(data.get("reused_from_run_id", "")),
            )
        case streams.RUN_COMPLETED:
            error = data.get("error")
            if data["status"] not in TERMINAL_STATUSES:
                raise ValueError(f"status {data['status']!r} is not one of {', '.join(TERMINAL_STATUSES)}")
            return RunCompleted(
                status=str(data["status"]),
                final_snapshot_id=str(data.get("final_snapshot_id", "")),
                reason=str(data.get("reason", "")),
                error=ErrorRecord.from_json(dict(error)) if error else None,
                at_us=_at_us(data),
                has_ledger=data.get("has_ledger") is True,
            )
        case streams.STEP_WAITING:
            return StepWaiting(
                str(data["step_id"]),
                int(data["attempt"]),
                ParkStep.from_json(dict(data["wait"])),
                _at_us(data),
            )
        case streams.RUN_PARKED:
            return RunParked(int(data.get("due_at_us", 0)), _at_us(data))
        case streams.RUN_RESUMED:
            return RunResumed(str(data.get("reason", "")), _at_us(data))
        case streams.SIGNAL_AWAITED:
            return SignalAwaited(
                step_id=str(data["step_id"]),
                attempt=int(data["attempt"]),
                fact_key=str(data["fact_key"]),
                name=str(data["name"]),
                deadline_us=int(data.get("deadline_us", 0)),
                at_us=_at_us(data),
            )
    return UnknownEvent(type_name, dict(data))


def _at_us(data: dict[str, Any]) -> int:
    value = data.get("at_us", 0)
    return value if isinstance(value, int) and value > 0 else 0


def stamped(event: KernelEvent, at_us: int) -> KernelEvent:
    """The event with `at_us` set, unless it has one (or has no such field)."""
    if isinstance(event, FactRecorded | UnknownEvent | CorruptEvent) or event.at_us:
        return event
    return with_changes(event, at_us=at_us)  # replace()'s result; every decided event is stamped
