"""What the client returns: frozen dataclasses and enums mirroring EngineService's messages, protobuf-free."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

E = TypeVar("E", bound=enum.StrEnum)


class RunStatus(enum.StrEnum):
    """A run's status."""

    UNSPECIFIED = "unspecified"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    # Only a child in `Run.children`: its spawn is recorded on the parent, it has not started.
    PENDING = "pending"

    @property
    def is_terminal(self) -> bool:
        """True for completed, failed and canceled: the run never changes again."""
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED)


class StepStatus(enum.StrEnum):
    """A step's (or a step attempt's) status."""

    UNSPECIFIED = "unspecified"
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    WAITING = "waiting"


class ExecutionMode(enum.StrEnum):
    """How a run performs I/O: live calls recorded as facts, or replay of recorded facts only."""

    LIVE = "live"
    REPLAY = "replay"


class ParentClosePolicy(enum.StrEnum):
    """What happens to a child run when its parent is canceled."""

    CANCEL = "cancel"
    ABANDON = "abandon"


class TerminalTarget(enum.StrEnum):
    """The terminal status Terminalize moves a run to."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


class TerminalizeOutcome(enum.StrEnum):
    """What Terminalize did: moved the run now, or found it already terminal."""

    UNSPECIFIED = "unspecified"
    TRANSITIONED = "transitioned"
    NOOP = "noop"


# Each enum's prefix in keel/engine/v1/engine.proto: `failed` is also accepted as RUN_STATUS_FAILED.
_PROTO_PREFIX: dict[type[enum.StrEnum], str] = {
    RunStatus: "RUN_STATUS_",
    StepStatus: "STEP_STATUS_",
    ExecutionMode: "EXECUTION_MODE_",
    ParentClosePolicy: "PARENT_CLOSE_POLICY_",
    TerminalTarget: "TERMINAL_TARGET_",
    TerminalizeOutcome: "TERMINALIZE_OUTCOME_",
}


def proto_name(member: enum.StrEnum) -> str:
    """The member's name in engine.proto: RunStatus.FAILED is RUN_STATUS_FAILED."""
    return _PROTO_PREFIX[type(member)] + member.name


def parse_enum(kind: type[E], value: E | str) -> E:
    """`value` as a member of `kind`, given as the member, its value or its proto name, in any case.

    `failed`, `FAILED`, `RUN_STATUS_FAILED` and `run_status_failed` all give RunStatus.FAILED; the
    one place where the client and the CLI read an enum from text. ValueError lists what is accepted.
    """
    if isinstance(value, kind):
        return value
    text = str(value).strip().lower()
    prefix = _PROTO_PREFIX[kind].lower()
    if text.startswith(prefix):
        text = text[len(prefix) :]
    for member in kind:
        if member.value == text:
            return member
    accepted = [member for member in kind if member.value != "unspecified"]
    raise ValueError(
        f"{value!r} is not a {kind.__name__}: expected one of {', '.join(accepted)} "
        f"(or its proto name, like {proto_name(accepted[0])})"
    )


@dataclass(frozen=True)
class RetryPolicy:
    """How failed step attempts are retried; zero/None fields take the engine's defaults."""

    max_attempts: int = 0
    initial_backoff: float | None = None  # seconds
    max_backoff: float | None = None  # seconds
    multiplier: float = 0.0


@dataclass(frozen=True)
class RunConfig:
    """How a run executes (part of its manifest)."""

    execution_mode: ExecutionMode = ExecutionMode.LIVE
    retry_policy: RetryPolicy | None = None
    replay_of_run_id: str = ""


@dataclass(frozen=True)
class ErrorDetail:
    """A structured error recorded by the engine (a failed attempt, a failed run)."""

    code: str
    category: str
    retryable: bool
    message: str
    details: Any = None


@dataclass(frozen=True)
class StepWait:
    """What a waiting attempt waits for: its kind (`timer`, `children`, `signal`, ...), when it ends
    by itself (None: only something else ends it) and kind-specific facts."""

    kind: str
    until: datetime | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class StepAttempt:
    """One attempt of one step."""

    attempt: int
    status: StepStatus
    started_at: datetime | None
    finished_at: datetime | None
    error: ErrorDetail | None
    # A remote attempt (its step has a task queue): the queue, and the worker that ran it.
    task_queue: str = ""
    worker_id: str = ""
    wait: StepWait | None = None  # set while the attempt waits (status WAITING)


@dataclass(frozen=True)
class SignalWait:
    """What a step's running attempt waits for: the signal `name`, until `timeout_at` (None: for ever)."""

    name: str
    fact_key: str
    since: datetime | None
    timeout_at: datetime | None


@dataclass(frozen=True)
class StepState:
    """A step of a run and what happened to it (`waiting_for_signal` while it waits for one)."""

    step_id: str
    op_id: str
    op_version: str
    status: StepStatus
    attempts: tuple[StepAttempt, ...]
    last_error: ErrorDetail | None
    # Set when a rerun reused this step: the run whose output it copied (no attempt ran here).
    reused_from_run_id: str | None = None
    # The steps it depends on (from the pipeline).
    depends_on: tuple[str, ...] = ()
    # Its output once it completed (`has_output`; None also when an older engine said nothing).
    output: Any = None
    has_output: bool = False
    waiting_for_signal: SignalWait | None = None

    @property
    def last_attempt(self) -> StepAttempt | None:
        """The most recent attempt, or None before the first one."""
        return self.attempts[-1] if self.attempts else None


@dataclass(frozen=True)
class Signal:
    """A signal to send with a start (`start_run(signals=[...])`): a name, a JSON payload, an optional id."""

    name: str
    payload: Any = None
    signal_id: str = ""


@dataclass(frozen=True)
class SentSignal:
    """What `signal_run` answers: the signal's id, its place in the run's inbox, and whether it is new."""

    signal_id: str
    created: bool
    inbox_seq: int


@dataclass(frozen=True)
class ChildRun:
    """A child run of a run."""

    child_run_id: str
    fact_key: str
    op_id: str
    status: RunStatus
    parent_close_policy: ParentClosePolicy = ParentClosePolicy.CANCEL


@dataclass(frozen=True)
class FailureLedgerEntry:
    """A divergence the engine recorded for a person to repair."""

    step_id: str
    reason: str
    recorded_at: datetime | None


@dataclass(frozen=True)
class Run:
    """A run: status, steps with attempts, children, failure ledger, timestamps and final snapshot."""

    run_id: str
    op_id: str
    manifest_id: str
    status: RunStatus
    parent_run_id: str | None
    parent_fact_key: str | None
    created_at: datetime | None
    updated_at: datetime | None
    completed_at: datetime | None
    steps: tuple[StepState, ...]
    children: tuple[ChildRun, ...]
    failure_ledger: tuple[FailureLedgerEntry, ...]
    final_snapshot_id: str | None
    final_snapshot: Any
    reason: str | None
    error: ErrorDetail | None
    head_seq: int
    # The input the run was started with (None also when it had none, or an older engine said nothing).
    input: Any = None
    # The labels it was started with.
    labels: Mapping[str, str] = field(default_factory=dict)
    # For a rerun: the run it reran and the step it reran from; for any run: its reruns, oldest first.
    rerun_of_run_id: str | None = None
    rerun_from_step_id: str | None = None
    reruns: tuple[str, ...] = ()

    @property
    def is_terminal(self) -> bool:
        """True once the run is completed, failed or canceled."""
        return self.status.is_terminal

    def step(self, step_id: str) -> StepState:
        """The step with this id (KeyError if the run has none)."""
        for state in self.steps:
            if state.step_id == step_id:
                return state
        raise KeyError(step_id)


@dataclass(frozen=True)
class RunSummary:
    """A run as ListRuns shows it."""

    run_id: str
    status: RunStatus
    created_at: datetime | None
    updated_at: datetime | None
    head_seq: int
    # Its pipeline (or single op) id, labels, and the run that spawned it (None: top-level).
    pipeline_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None


@dataclass(frozen=True)
class RunFilter:
    """What ListRuns keeps besides statuses: a pipeline id, labels (every one must match), a start
    time range [started_after, started_before), top-level runs (True) or children (False), the
    children of one run (`parent_run_id`), and a duration range [min_duration, max_duration] (a
    terminal run's from its start to its end, a running one's until now)."""

    pipeline_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    started_after: datetime | None = None
    started_before: datetime | None = None
    top_level: bool | None = None
    parent_run_id: str = ""
    min_duration: timedelta | None = None
    max_duration: timedelta | None = None


@dataclass(frozen=True)
class RunPage:
    """One page of ListRuns; pass `next_page_token` to get the next (None on the last page)."""

    runs: tuple[RunSummary, ...]
    next_page_token: str | None


@dataclass(frozen=True)
class RunEvent:
    """One event of a run's stream (`type` such as `StepCompleted`, `data` its fields)."""

    seq: int
    type: str
    data: dict[str, Any]
    recorded_at: datetime | None


@dataclass(frozen=True)
class OpInfo:
    """An op the engine can run."""

    op_id: str
    op_version: str
    description: str
    # Set for an op a worker polling this task queue declared; empty for the engine's own ops.
    task_queue: str = ""


@dataclass(frozen=True)
class QueueWorker:
    """A worker seen polling a task queue recently, with the ops it declared (`op_id@version`)."""

    worker_id: str
    last_seen: datetime | None
    ops: tuple[str, ...]


@dataclass(frozen=True)
class QueueInfo:
    """A task queue: tasks waiting for a worker, tasks running, and the workers seen polling it."""

    task_queue: str
    backlog: int
    running: int
    workers: tuple[QueueWorker, ...]


@dataclass(frozen=True)
class StartedRun:
    """What StartRun answered: the run id, its manifest, whether it was new, and the run as it stands."""

    run_id: str
    manifest_id: str
    created: bool
    run: Run | None


@dataclass(frozen=True)
class DeletedRuns:
    """What DeleteRun answered: the runs deleted (parent before children) and how many streams went."""

    run_ids: tuple[str, ...]
    streams: int


@dataclass(frozen=True)
class RerunResult:
    """What RerunRun answered: the new run's id, whether it was new, and the run as it stands."""

    run_id: str
    created: bool
    run: Run | None


@dataclass(frozen=True)
class ResumedRun:
    """What ResumeRun answered: the run, and whether this engine now drives it."""

    run: Run | None
    resumed: bool


@dataclass(frozen=True)
class AwaitedRun:
    """What AwaitRun answered: the run, and whether it became terminal before the timeout."""

    run: Run | None
    done: bool


@dataclass(frozen=True)
class SpawnedChild:
    """What SpawnChild answered: the parent, the child's id and its manifest id."""

    parent_run_id: str
    child_run_id: str
    child_manifest_id: str


@dataclass(frozen=True)
class ChildResult:
    """What AwaitChild answered: the child's terminal status and final snapshot."""

    child_run_id: str
    status: RunStatus
    final_snapshot_id: str | None
    final_snapshot: Any


@dataclass(frozen=True)
class TerminalizeResult:
    """What Terminalize answered: TRANSITIONED or NOOP, and the run's terminal status."""

    outcome: TerminalizeOutcome
    status: RunStatus


@dataclass(frozen=True)
class StepSpec:
    """One step of a pipeline, for callers who prefer a typed pipeline to a dict."""

    step_id: str
    op_id: str
    op_version: str = ""
    op_config: Any = None
    depends_on: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline of steps, for callers who prefer a typed pipeline to a dict."""

    pipeline_id: str
    steps: Sequence[StepSpec]
    pipeline_version: str = ""
    max_parallel: int = 0  # steps running at once (0: every ready step)

    def to_dict(self) -> dict[str, Any]:
        """The pipeline as the dict StartRun takes (the shape of the proto Pipeline)."""
        return {
            "pipeline_id": self.pipeline_id,
            "pipeline_version": self.pipeline_version,
            "max_parallel": self.max_parallel,
            "steps": [
                {
                    "step_id": step.step_id,
                    "op_id": step.op_id,
                    "op_version": step.op_version,
                    "op_config": step.op_config,
                    "depends_on": list(step.depends_on),
                }
                for step in self.steps
            ],
        }


def to_json_data(value: Any) -> Any:
    """A result of this client as JSON data: dataclasses as dicts, enums as strings, times in ISO 8601."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: to_json_data(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, Mapping):
        return {str(key): to_json_data(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_data(item) for item in value]
    return value
