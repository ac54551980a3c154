"""Remote step attempts ("tasks"): the task stream's events, its fold, claims and tokens. Pure.

A step with a `task_queue` runs in a worker, not in the engine. Once its StepAttemptStarted is
durable, the driving engine creates the attempt's task stream, `task:<run>:<attempt>:<step>`, with
TaskScheduled as event 1 (an append expecting no stream: one attempt is never issued twice). Then:

    TaskScheduled      the attempt's op, config, timeouts, and what the worker needs (`body`)
    TaskClaimed        a worker took it (compare-and-swap at seq 1: one worker wins); the claim's
                       seq is its fencing value and is named by the task token
    TaskHeartbeat      the claim's worker is alive: its lease now ends at `lease_deadline_us`
    TaskReleased       the claim was given up before its worker was heard from: its PollTask ended
                       first (cancelled, or timed out as the claim was written), or its lease ran
                       out with no heartbeat, fact or outcome under it (a paused worker's long poll
                       that claimed a task it never saw). The task is pending again and the attempt
                       goes on; after a lease ran out, that worker's older polls do not get it again
    TaskFactRecorded   an I/O answer the worker recorded (RecordFact)
    TaskCompleted      the worker's output              } the outcome: at most one, the last
    TaskFailed         the worker's error               } event; any writer appends it with a
    TaskExpired        a timeout, or the run ended      } compare-and-swap at the head it read

Only the engine holding the run's lease copies the outcome (and the facts) into the run stream.
The fold (`fold_task`) is total over any prefix and everything decided about a task comes from it:
whether a token's claim is current (`check_claim`), which deadline comes next (`next_deadline`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from engine_service.domain import streams
from engine_service.domain.canonical import canonical_json_bytes
from engine_service.domain.events import ErrorRecord, FactRecorded
from keel_core.errors import ErrorCategory, KeelError, invalid_argument

TASK_FORMAT_VERSION = 1
MAX_QUEUE_CHARS = 128
_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# Codes of an attempt that a timeout or a lost claim ended (all retryable, as the retry policy says).
STEP_TIMEOUT = "step_timeout"
TASK_LEASE_EXPIRED = "task_lease_expired"
SCHEDULE_TO_START_TIMEOUT = "schedule_to_start_timeout"
# A task of a run that ended (canceled, failed elsewhere): closed so that no worker takes it.
RUN_ENDED = "run_ended"

# Task stream attributes: the queue's index (ListStreams finds the pending tasks of a queue).
QUEUE_ATTRIBUTE = "queue"
STATE_ATTRIBUTE = "state"
OP_ATTRIBUTE = "op"
OP_DESCRIPTIONS_ATTRIBUTE = "op_descriptions"  # on a worker: what its ops do (encode_op_descriptions)
PENDING = "pending"
CLAIMED = "claimed"


def check_queue_name(name: str, what: str = "task_queue") -> str:
    """`name` when it is a valid queue name; INVALID_ARGUMENT `invalid_task_queue` otherwise."""
    if not name or len(name) > MAX_QUEUE_CHARS or _QUEUE_NAME.fullmatch(name) is None:
        raise invalid_argument(
            "invalid_task_queue",
            f"{what} must be 1 to {MAX_QUEUE_CHARS} characters of [A-Za-z0-9._-] starting with a letter "
            f"or digit, got {name[:MAX_QUEUE_CHARS]!r}",
        )
    return name


def op_key(op_id: str, op_version: str) -> str:
    """How a task's op is indexed: `op_id@version`."""
    return f"{op_id}@{op_version}"


MAX_OP_DESCRIPTIONS_CHARS = 1000  # one stream attribute (the store takes 1024 characters)


def encode_op_descriptions(descriptions: Mapping[str, str]) -> str:
    """A worker's op descriptions (by `op_key`) as one attribute value: JSON in printable ASCII, the
    ops that do not fit in MAX_OP_DESCRIPTIONS_CHARS left out; "" when there is none."""
    kept: dict[str, str] = {}
    for key, description in descriptions.items():
        if not description:
            continue
        candidate = {**kept, key: " ".join(description.split())[:200]}
        if len(json.dumps(candidate, ensure_ascii=True)) > MAX_OP_DESCRIPTIONS_CHARS:
            break
        kept = candidate
    return json.dumps(kept, ensure_ascii=True, separators=(",", ":")) if kept else ""


def decode_op_descriptions(text: str) -> dict[str, str]:
    """The descriptions `encode_op_descriptions` wrote ({} for anything else)."""
    try:
        decoded = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(decoded, dict):
        return {}
    return {k: v for k, v in decoded.items() if isinstance(k, str) and isinstance(v, str)}


@dataclass(frozen=True)
class StepTimeouts:
    """A step's timeouts in milliseconds (0: none)."""

    start_to_close_ms: int = 0
    heartbeat_ms: int = 0
    schedule_to_start_ms: int = 0

    def to_json(self) -> dict[str, int]:
        """The timeouts that are set, as JSON."""
        out = {
            "start_to_close_ms": self.start_to_close_ms,
            "heartbeat_ms": self.heartbeat_ms,
            "schedule_to_start_ms": self.schedule_to_start_ms,
        }
        return {key: value for key, value in out.items() if value}

    @staticmethod
    def from_json(data: Mapping[str, Any] | None) -> StepTimeouts:
        """Timeouts read back from JSON (absent: none)."""
        data = data or {}
        return StepTimeouts(
            int(data.get("start_to_close_ms") or 0),
            int(data.get("heartbeat_ms") or 0),
            int(data.get("schedule_to_start_ms") or 0),
        )


NO_TIMEOUTS = StepTimeouts()


# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskScheduled:
    """Event 1: the attempt to execute. `body`: {op_config, input, context?, facts} (inline or artifact)."""

    run_id: str
    step_id: str
    attempt: int
    task_queue: str
    op_id: str
    op_version: str
    timeouts: StepTimeouts
    fencing: int  # the seq of the attempt's StepAttemptStarted
    at_us: int
    body: dict[str, Any] | None = None
    body_artifact_id: str = ""
    context_artifact_id: str = ""  # a context too large for the body


@dataclass(frozen=True)
class TaskClaimed:
    """A worker took the task; the claim is this event's seq."""

    worker_id: str
    at_us: int
    lease_deadline_us: int = 0  # 0: the claim does not expire
    # The claim's heartbeat timeout, decided once by the claiming engine (the step's, else that
    # engine's default): whichever engine serves a heartbeat renews the lease by it. 0: none.
    heartbeat_ms: int = 0


@dataclass(frozen=True)
class TaskHeartbeat:
    """The claim's worker heartbeated: its lease ends later."""

    claim: int
    lease_deadline_us: int
    at_us: int


@dataclass(frozen=True)
class TaskReleased:
    """The claim was given up unused: the task waits for a worker again.

    `exclude`: the claim's lease ran out unheard (its worker is paused, or its poll's answer was
    lost): polls `worker_id` made before this release are not given the task again.
    """

    claim: int
    worker_id: str
    at_us: int
    exclude: bool = False


@dataclass(frozen=True)
class TaskFactRecorded:
    """An I/O answer the claim's worker recorded."""

    claim: int
    namespace: str
    fact_key: str
    response: Any
    at_us: int


@dataclass(frozen=True)
class TaskCompleted:
    """The claim's worker finished: the step's output."""

    claim: int
    output: Any
    at_us: int


@dataclass(frozen=True)
class TaskFailed:
    """The claim's worker failed the attempt."""

    claim: int
    error: ErrorRecord
    at_us: int


@dataclass(frozen=True)
class TaskExpired:
    """The engine ended the task: a timeout (or lost claim), or the run ended."""

    error: ErrorRecord
    at_us: int


TaskEvent = (
    TaskScheduled
    | TaskClaimed
    | TaskHeartbeat
    | TaskReleased
    | TaskFactRecorded
    | TaskCompleted
    | TaskFailed
    | TaskExpired
)
TaskOutcome = TaskCompleted | TaskFailed | TaskExpired

_NAMES: dict[type[Any], str] = {
    TaskScheduled: streams.TASK_SCHEDULED,
    TaskClaimed: streams.TASK_CLAIMED,
    TaskHeartbeat: streams.TASK_HEARTBEAT,
    TaskReleased: streams.TASK_RELEASED,
    TaskFactRecorded: streams.TASK_FACT_RECORDED,
    TaskCompleted: streams.TASK_COMPLETED,
    TaskFailed: streams.TASK_FAILED,
    TaskExpired: streams.TASK_EXPIRED,
}


def encode_task_event(event: TaskEvent) -> tuple[str, bytes]:
    """The event's type name and canonical JSON payload."""
    data: dict[str, Any] = {"v": TASK_FORMAT_VERSION}
    match event:
        case TaskScheduled():
            data |= {
                "run_id": event.run_id,
                "step_id": event.step_id,
                "attempt": event.attempt,
                "task_queue": event.task_queue,
                "op_id": event.op_id,
                "op_version": event.op_version,
                "timeouts": event.timeouts.to_json(),
                "fencing": event.fencing,
                "at_us": event.at_us,
            }
            if event.body is not None:
                data["body"] = event.body
            if event.body_artifact_id:
                data["body_artifact_id"] = event.body_artifact_id
            if event.context_artifact_id:
                data["context_artifact_id"] = event.context_artifact_id
        case TaskClaimed():
            data |= {"worker_id": event.worker_id, "at_us": event.at_us}
            if event.lease_deadline_us:
                data["lease_deadline_us"] = event.lease_deadline_us
            if event.heartbeat_ms:
                data["heartbeat_ms"] = event.heartbeat_ms
        case TaskHeartbeat():
            data |= {"claim": event.claim, "lease_deadline_us": event.lease_deadline_us, "at_us": event.at_us}
        case TaskReleased():
            data |= {"claim": event.claim, "worker_id": event.worker_id, "at_us": event.at_us}
            if event.exclude:
                data["exclude"] = True
        case TaskFactRecorded():
            data |= {
                "claim": event.claim,
                "namespace": event.namespace,
                "fact_key": event.fact_key,
                "response": event.response,
                "at_us": event.at_us,
            }
        case TaskCompleted():
            data |= {"claim": event.claim, "output": event.output, "at_us": event.at_us}
        case TaskFailed():
            data |= {"claim": event.claim, "error": event.error.to_json(), "at_us": event.at_us}
        case TaskExpired():
            data |= {"error": event.error.to_json(), "at_us": event.at_us}
    return _NAMES[type(event)], canonical_json_bytes(data)


def decode_task_event(type_name: str, payload: bytes) -> TaskEvent | None:
    """A task event from the store (None: a type this engine does not know, or a corrupt payload)."""
    try:
        data = json.loads(payload.decode("utf-8"))
        return _from_json(type_name, data) if isinstance(data, dict) else None
    except (ValueError, TypeError, KeyError, AttributeError, KeelError):
        return None


def _from_json(type_name: str, d: dict[str, Any]) -> TaskEvent | None:
    at = int(d.get("at_us") or 0)
    match type_name:
        case streams.TASK_SCHEDULED:
            body = d.get("body")
            return TaskScheduled(
                str(d["run_id"]),
                str(d["step_id"]),
                int(d["attempt"]),
                str(d["task_queue"]),
                str(d["op_id"]),
                str(d["op_version"]),
                StepTimeouts.from_json(d.get("timeouts")),
                int(d.get("fencing") or 0),
                at,
                dict(body) if isinstance(body, dict) else None,
                str(d.get("body_artifact_id", "")),
                str(d.get("context_artifact_id", "")),
            )
        case streams.TASK_CLAIMED:
            return TaskClaimed(
                str(d["worker_id"]), at, int(d.get("lease_deadline_us") or 0), int(d.get("heartbeat_ms") or 0)
            )
        case streams.TASK_HEARTBEAT:
            return TaskHeartbeat(int(d["claim"]), int(d["lease_deadline_us"]), at)
        case streams.TASK_RELEASED:
            return TaskReleased(int(d["claim"]), str(d.get("worker_id", "")), at, d.get("exclude") is True)
        case streams.TASK_FACT_RECORDED:
            return TaskFactRecorded(
                int(d["claim"]), str(d["namespace"]), str(d["fact_key"]), d.get("response"), at
            )
        case streams.TASK_COMPLETED:
            return TaskCompleted(int(d["claim"]), d.get("output"), at)
        case streams.TASK_FAILED:
            return TaskFailed(int(d["claim"]), ErrorRecord.from_json(dict(d["error"])), at)
        case streams.TASK_EXPIRED:
            return TaskExpired(ErrorRecord.from_json(dict(d["error"])), at)
    return None


# --- the fold ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskState:
    """A task as its stream tells it."""

    head_seq: int = 0
    scheduled: TaskScheduled | None = None
    claim: int = 0  # the seq of TaskClaimed; 0 while unclaimed
    worker_id: str = ""
    claimed_at_us: int = 0
    lease_deadline_us: int = 0  # 0: no expiry
    claim_heartbeat_ms: int = 0  # the claim's heartbeat timeout as its TaskClaimed recorded it
    heard: bool = False  # the claim's worker heartbeated or recorded a fact
    # worker id -> when a claim of it ran out unheard: its polls from before then are stale
    released_workers: Mapping[str, int] = field(default_factory=dict)
    facts: Mapping[str, TaskFactRecorded] = field(default_factory=dict)
    outcome: TaskOutcome | None = None

    def extend(self, events: Iterable[TaskEvent | None]) -> TaskState:
        """This state with more events folded in (each following head_seq, in order)."""
        state = self
        for event in events:
            state = _apply(replace(state, head_seq=state.head_seq + 1), event)
        return state


def fold_task(events: Iterable[TaskEvent | None]) -> TaskState:
    """The state of a task from its events (None: an event this engine cannot read, skipped)."""
    return TaskState().extend(events)


def _apply(state: TaskState, event: TaskEvent | None) -> TaskState:
    if state.outcome is not None:
        return state  # the outcome is the last word
    match event:
        case TaskScheduled() if state.scheduled is None:
            return replace(state, scheduled=event)
        case TaskClaimed() if state.claim == 0 and state.scheduled is not None:  # one claim at a time
            return replace(
                state,
                claim=state.head_seq,
                worker_id=event.worker_id,
                claimed_at_us=event.at_us,
                lease_deadline_us=event.lease_deadline_us,
                claim_heartbeat_ms=event.heartbeat_ms,
                heard=False,
            )
        case TaskHeartbeat() if event.claim == state.claim:
            return replace(state, lease_deadline_us=event.lease_deadline_us, heard=True)
        case TaskReleased() if event.claim == state.claim and state.claim:
            released = state.released_workers
            if event.exclude:
                released = {**released, event.worker_id: event.at_us}
            return replace(
                state, claim=0, worker_id="", claimed_at_us=0, lease_deadline_us=0, released_workers=released
            )
        case TaskFactRecorded() if event.claim == state.claim and event.fact_key not in state.facts:
            return replace(state, facts={**state.facts, event.fact_key: event}, heard=True)
        case TaskCompleted() | TaskFailed() if event.claim == state.claim:
            return replace(state, outcome=event)
        case TaskExpired():
            return replace(state, outcome=event)
    return state


def fact_events(state: TaskState) -> list[FactRecorded]:
    """The task's recorded facts as run events (copied into the run stream with its outcome)."""
    assert state.scheduled is not None
    step, attempt = state.scheduled.step_id, state.scheduled.attempt
    return [FactRecorded(step, attempt, f.fact_key, f.namespace, f.response) for f in state.facts.values()]


# --- tokens and claims ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskToken:
    """What a task token names: the task (run, step, attempt) and the claim (a seq of its stream)."""

    run_id: str
    step_id: str
    attempt: int
    claim: int

    @property
    def stream_id(self) -> str:
        """The task's stream."""
        return streams.task_stream_id(self.run_id, self.step_id, self.attempt)

    def encode(self) -> str:
        """The opaque token handed to the worker (URL-safe base64 of JSON)."""
        raw = canonical_json_bytes([self.run_id, self.step_id, self.attempt, self.claim])
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    @staticmethod
    def decode(token: str) -> TaskToken:
        """A token back from its text; INVALID_ARGUMENT `task_token_invalid` when it is not one."""
        if not token or len(token) > 1024:
            raise _bad_token("task_token must be the token PollTask returned")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            run_id, step_id, attempt, claim = json.loads(raw.decode("utf-8"))
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
            raise _bad_token("task_token is not a token PollTask returned") from None
        valid = (
            isinstance(run_id, str)
            and isinstance(step_id, str)
            and isinstance(attempt, int)
            and isinstance(claim, int)
            and 0 < len(run_id) <= 64
            and 0 < len(step_id) <= 128
            and attempt >= 0
            and claim > 1
        )
        if not valid:
            raise _bad_token("task_token is not a token PollTask returned")
        return TaskToken(run_id, step_id, attempt, claim)


def _bad_token(message: str) -> KeelError:
    return invalid_argument("task_token_invalid", message)


def task_stale(why: str) -> KeelError:
    """FAILED_PRECONDITION `task_stale`: the token's claim is not current; nothing was written."""
    return KeelError(
        "task_stale",
        f"this task claim is no longer current ({why}); nothing was written: drop the task",
        category=ErrorCategory.FAILED_PRECONDITION,
    )


def check_claim(state: TaskState, token: TaskToken, now_us: int) -> None:
    """Raise `task_stale` (or `task_not_found`) unless `token` names the task's current, live claim."""
    if state.scheduled is None:
        raise KeelError(
            "task_not_found",
            "the token names a task that does not exist",
            category=ErrorCategory.NOT_FOUND,
        )
    if state.claim != token.claim:
        raise task_stale("the task was never claimed with this token")
    if state.outcome is not None:
        raise task_stale(f"the task has ended: {outcome_summary(state.outcome)}")
    if state.lease_deadline_us and now_us > state.lease_deadline_us:
        raise task_stale("its lease expired without a heartbeat")


def outcome_summary(outcome: TaskOutcome) -> str:
    """One line saying how a task ended."""
    match outcome:
        case TaskCompleted():
            return "completed"
        case TaskFailed():
            return f"failed ({outcome.error.code})"
        case TaskExpired():
            return f"{outcome.error.code}: {outcome.error.message}"


def same_completion(state: TaskState, token: TaskToken, output: Any) -> bool:
    """A repeated CompleteTask: the claim completed already with this very output."""
    outcome = state.outcome
    return (
        isinstance(outcome, TaskCompleted)
        and outcome.claim == token.claim
        and canonical_json_bytes(outcome.output) == canonical_json_bytes(output)
    )


# --- deadlines -----------------------------------------------------------------------------------


def expiry_error(code: str, message: str) -> ErrorRecord:
    """How a timeout or a lost claim is recorded (retryable: the retry policy decides)."""
    return ErrorRecord(code, ErrorCategory.DEADLINE_EXCEEDED.value, True, message)


@dataclass(frozen=True)
class Deadline:
    """When the task must end unless something happens first, and the error it ends with.

    `release`: the claim's lease runs out before its worker was heard from; the claim is then
    released (TaskReleased) rather than the attempt failed.
    """

    at_us: int
    error: ErrorRecord
    release: bool = False


def _heartbeat_text(state: TaskState, limits: StepTimeouts) -> str:
    if limits.heartbeat_ms:
        return f"{limits.heartbeat_ms} ms"
    return f"{claim_heartbeat_ms(state)} ms (the engine's default heartbeat timeout)"


def next_deadline(state: TaskState) -> Deadline | None:
    """The earliest deadline of a task without an outcome (None: it can wait for ever)."""
    scheduled = state.scheduled
    if scheduled is None or state.outcome is not None:
        return None
    limits = scheduled.timeouts
    found: list[Deadline] = []
    if state.claim == 0 and limits.schedule_to_start_ms:
        found.append(
            Deadline(
                scheduled.at_us + limits.schedule_to_start_ms * 1000,
                expiry_error(
                    SCHEDULE_TO_START_TIMEOUT,
                    f"no worker of queue {scheduled.task_queue!r} took the task within "
                    f"{limits.schedule_to_start_ms} ms",
                ),
            )
        )
    if state.claim and state.lease_deadline_us:
        found.append(
            Deadline(
                state.lease_deadline_us,
                expiry_error(
                    TASK_LEASE_EXPIRED,
                    f"worker {state.worker_id!r} sent no heartbeat within {_heartbeat_text(state, limits)}",
                ),
                release=not state.heard,
            )
        )
    if state.claim and limits.start_to_close_ms:
        found.append(
            Deadline(
                state.claimed_at_us + limits.start_to_close_ms * 1000,
                expiry_error(
                    STEP_TIMEOUT,
                    f"worker {state.worker_id!r} did not finish within {limits.start_to_close_ms} ms",
                ),
            )
        )
    return min(found, key=lambda d: d.at_us) if found else None


# A remote step without a heartbeat timeout of its own gets this one (an engine flag changes it):
# a worker that dies holding a task frees it for a retry within a minute, not never. Keel's workers
# heartbeat every running task at least every 10 s.
DEFAULT_TASK_HEARTBEAT_MS = 60_000


def heartbeat_ms_of(timeouts: StepTimeouts, default_ms: int) -> int:
    """The heartbeat timeout a claim of the step gets: the step's own, else the engine's default
    (0: none, the claim never expires while its worker is silent)."""
    return timeouts.heartbeat_ms or default_ms


def lease_deadline_after(state: TaskState, now_us: int) -> int:
    """The lease deadline a heartbeat at `now_us` gives the current claim (0: it has no heartbeat
    timeout): by the timeout its TaskClaimed recorded, whichever engine serves the heartbeat; for a
    claim an older engine made (none recorded), by the step's own."""
    assert state.scheduled is not None
    heartbeat_ms = claim_heartbeat_ms(state)
    return now_us + heartbeat_ms * 1000 if heartbeat_ms else 0


def claim_heartbeat_ms(state: TaskState) -> int:
    """The current claim's heartbeat timeout: as its TaskClaimed recorded it; for a claim an older
    engine made (none recorded), the step's own, else the span its lease was given (an older engine's
    default); 0: the claim never expires."""
    assert state.scheduled is not None
    if state.claim_heartbeat_ms or state.scheduled.timeouts.heartbeat_ms:
        return state.claim_heartbeat_ms or state.scheduled.timeouts.heartbeat_ms
    if state.claim and state.lease_deadline_us > state.claimed_at_us:
        return (state.lease_deadline_us - state.claimed_at_us) // 1000
    return 0
