"""Keel's stream vocabulary: every store stream the engine writes, its event type names and labels.

Streams (one prefix each; the rest of the id is a run id or an engine id):

    run:<run id>           the run's history: the kernel events of engine_service.domain.events
    children:<run id>      the run's child links (ChildLinked), written before a child starts
    ledger:<run id>        the run's failure ledger (FailureLedgerEntry): divergences kept for a person
    lease:<run id>         who drives the run (LeaseAcquired, LeaseReleased)
    engine:<engine id>     an engine's liveness record (EngineHeartbeat, EngineStopped, EngineFenced)
    task:<run>:<attempt>:<step>  a remote step attempt (engine_service.domain.tasks): TaskScheduled,
                           TaskClaimed, TaskHeartbeat, TaskReleased, TaskFactRecorded, then
                           TaskCompleted, TaskFailed or TaskExpired; labelled active until its
                           outcome, then completed/failed/canceled
    queue:<task queue>     wake-up hints for a queue's pollers (TaskEnqueued, naming a task stream)
    worker:<worker id>     a worker's last poll (WorkerSeen) with its queue and ops as attributes
    signals:<run id>       the run's inbox: signals sent to it (SignalSent), written by SignalRun and
                           StartRun.signals, never by the run's driver (engine_service.domain.signals)
    signal-wakeups         one stream for every engine: a SignalWoken per signal sent, naming the run,
                           so that each engine learns of new signals through one subscription
    retention:<run id>     a run tree being deleted (RunTreeDeletion: its run ids, root first), until
                           every run of it is gone (engine_service.domain.retention)

The streams a run owns are declared in ONE place, `RUN_OWNED_PREFIXES` and `RUN_OWNED_FAMILIES`
below: retention deletes a run by deleting every one of them. A new per-run stream (a signal
inbox, wake-ups, ...) adds its prefix there.

Status labels. The store knows five labels (keel.store.v1.StreamStatus: active, completed,
failed, canceled, parked), and lists streams by them. A run stream's label is its run status. Lease and
engine streams reuse the same four labels with their own meanings (a released lease is listed as
"canceled", a fenced engine as "failed"): a label of their own would need a new StreamStatus value,
which stores written today and engines reading them do not know. So each use has its own constant,
named for what it means, and no code compares a lease or engine label with a run status.
"""

from __future__ import annotations

# --- stream ids --------------------------------------------------------------------------------

RUN_STREAM_PREFIX = "run:"
CHILDREN_STREAM_PREFIX = "children:"
LEDGER_STREAM_PREFIX = "ledger:"
LEASE_STREAM_PREFIX = "lease:"
ENGINE_STREAM_PREFIX = "engine:"
TASK_STREAM_PREFIX = "task:"
QUEUE_STREAM_PREFIX = "queue:"
WORKER_STREAM_PREFIX = "worker:"
SIGNALS_STREAM_PREFIX = "signals:"
SIGNAL_WAKEUPS_STREAM = "signal-wakeups"
RETENTION_STREAM_PREFIX = "retention:"

# The streams a run owns, deleted with it (engine_service.runtime.retention). A prefix here names
# the stream `<prefix><run id>`; a family names every stream `<prefix><run id>:<anything>` (found
# with one ListStreams by that prefix). Add every new per-run stream here.
RUN_OWNED_PREFIXES = (
    RUN_STREAM_PREFIX,
    CHILDREN_STREAM_PREFIX,
    LEDGER_STREAM_PREFIX,
    LEASE_STREAM_PREFIX,
    SIGNALS_STREAM_PREFIX,
)
RUN_OWNED_FAMILIES = (TASK_STREAM_PREFIX,)


def run_owned_stream_ids(run_id: str) -> list[str]:
    """The streams `<prefix><run id>` a run owns (its run stream first)."""
    return [f"{prefix}{run_id}" for prefix in RUN_OWNED_PREFIXES]


def run_owned_family_prefixes(run_id: str) -> list[str]:
    """The id prefixes of the stream families a run owns (each listed, then deleted with the run)."""
    return [f"{prefix}{run_id}:" for prefix in RUN_OWNED_FAMILIES]


def retention_stream_id(run_id: str) -> str:
    """The stream recording the deletion of the run tree rooted at `run_id`."""
    return f"{RETENTION_STREAM_PREFIX}{run_id}"


def run_stream_id(run_id: str) -> str:
    """The stream holding a run's events."""
    return f"{RUN_STREAM_PREFIX}{run_id}"


def run_id_of_stream(stream_id: str) -> str:
    """The run id of a `run:` stream id."""
    return stream_id.removeprefix(RUN_STREAM_PREFIX)


def children_stream_id(parent_run_id: str) -> str:
    """The stream holding a run's child links."""
    return f"{CHILDREN_STREAM_PREFIX}{parent_run_id}"


def ledger_stream_id(run_id: str) -> str:
    """The stream holding a run's failure ledger."""
    return f"{LEDGER_STREAM_PREFIX}{run_id}"


def lease_stream_id(run_id: str) -> str:
    """The stream holding a run's lease."""
    return f"{LEASE_STREAM_PREFIX}{run_id}"


def run_id_of_lease_stream(stream_id: str) -> str:
    """The run id of a `lease:` stream id."""
    return stream_id.removeprefix(LEASE_STREAM_PREFIX)


def signals_stream_id(run_id: str) -> str:
    """The stream holding a run's inbox of signals."""
    return f"{SIGNALS_STREAM_PREFIX}{run_id}"


def engine_stream_id(engine_id: str) -> str:
    """The stream holding an engine's liveness record."""
    return f"{ENGINE_STREAM_PREFIX}{engine_id}"


def task_stream_id(run_id: str, step_id: str, attempt: int) -> str:
    """The stream of one remote step attempt (the step id last: it may hold any character)."""
    return f"{TASK_STREAM_PREFIX}{run_id}:{attempt}:{step_id}"


def queue_stream_id(task_queue: str) -> str:
    """The stream of a task queue's wake-up hints."""
    return f"{QUEUE_STREAM_PREFIX}{task_queue}"


def worker_stream_id(worker_id: str) -> str:
    """The stream recording when a worker last polled."""
    return f"{WORKER_STREAM_PREFIX}{worker_id}"


# --- event type names --------------------------------------------------------------------------

# run:<run id>
RUN_STARTED = "RunStarted"
STEP_ATTEMPT_STARTED = "StepAttemptStarted"
FACT_RECORDED = "FactRecorded"
STEP_ATTEMPT_FAILED = "StepAttemptFailed"
STEP_COMPLETED = "StepCompleted"
RUN_COMPLETED = "RunCompleted"
STEP_WAITING = "StepWaiting"
RUN_PARKED = "RunParked"
RUN_RESUMED = "RunResumed"
SIGNAL_AWAITED = "SignalAwaited"
# signals:<run id>
SIGNAL_SENT = "SignalSent"
# signal-wakeups
SIGNAL_WOKEN = "SignalWoken"
# children:<run id>
CHILD_LINKED = "ChildLinked"
# ledger:<run id>
FAILURE_LEDGER_ENTRY = "FailureLedgerEntry"
# lease:<run id>
LEASE_ACQUIRED = "LeaseAcquired"
LEASE_RELEASED = "LeaseReleased"
# engine:<engine id>
ENGINE_HEARTBEAT = "EngineHeartbeat"
ENGINE_STOPPED = "EngineStopped"
ENGINE_FENCED = "EngineFenced"
# task:<run>:<attempt>:<step>
TASK_SCHEDULED = "TaskScheduled"
TASK_CLAIMED = "TaskClaimed"
TASK_HEARTBEAT = "TaskHeartbeat"
TASK_RELEASED = "TaskReleased"
TASK_FACT_RECORDED = "TaskFactRecorded"
TASK_COMPLETED = "TaskCompleted"
TASK_FAILED = "TaskFailed"
TASK_EXPIRED = "TaskExpired"
# queue:<task queue>
TASK_ENQUEUED = "TaskEnqueued"
# worker:<worker id>
WORKER_SEEN = "WorkerSeen"

# --- run statuses (RunCompleted.status) ----------------------------------------------------------

COMPLETED = "completed"
FAILED = "failed"
CANCELED = "canceled"
TERMINAL_STATUSES = (COMPLETED, FAILED, CANCELED)

# --- the store's status labels ----------------------------------------------------------------

LABEL_ACTIVE = "active"
LABEL_COMPLETED = "completed"
LABEL_FAILED = "failed"
LABEL_CANCELED = "canceled"
LABEL_PARKED = "parked"
STATUS_LABELS = (LABEL_ACTIVE, LABEL_COMPLETED, LABEL_FAILED, LABEL_CANCELED, LABEL_PARKED)
# The labels that end a stream: the store keeps when a stream's label became one of them (its end,
# StreamSummary.ended_at) while the label stays one, and the stream's duration stops there.
ENDED_LABELS = (LABEL_COMPLETED, LABEL_FAILED, LABEL_CANCELED)
# The labels of terminal run streams (every terminal status's label).
TERMINAL_RUN_LABELS = ENDED_LABELS

# run:<run id>: active until its RunCompleted, then labelled with the run's terminal status; parked
# while nothing drives it until a due time or a wake-up (RunParked .. RunResumed, see
# engine_service.runtime.parking): recovery scans list only active runs, so they skip it.
RUN_ACTIVE_LABEL = LABEL_ACTIVE
RUN_PARKED_LABEL = LABEL_PARKED
# The labels of a run that is not terminal yet (listing "running" runs lists both).
RUN_LIVE_LABELS = (RUN_ACTIVE_LABEL, RUN_PARKED_LABEL)
_RUN_LABELS = {COMPLETED: LABEL_COMPLETED, FAILED: LABEL_FAILED, CANCELED: LABEL_CANCELED}
_RUN_STATUSES = {label: status for status, label in _RUN_LABELS.items()}

# lease:<run id>: held by some engine, or released (an implicit lease handed over at a shutdown,
# listed so that scans find it with one ListStreams) until someone takes it.
LEASE_HELD_LABEL = LABEL_ACTIVE
LEASE_RELEASED_LABEL = LABEL_CANCELED

# engine:<engine id>: heartbeating, stopped (a graceful shutdown), or fenced off by another engine
# whose takeover found its heartbeat expired (until it heartbeats again).
ENGINE_BEATING_LABEL = LABEL_ACTIVE
ENGINE_STOPPED_LABEL = LABEL_CANCELED
ENGINE_FENCED_LABEL = LABEL_FAILED

# task:...: waiting for or held by a worker until its outcome, then labelled like a run with it
# (completed, failed; an expired task, timed out or closed because its run ended, is "canceled").
TASK_OPEN_LABEL = LABEL_ACTIVE
TASK_COMPLETED_LABEL = LABEL_COMPLETED
TASK_FAILED_LABEL = LABEL_FAILED
TASK_EXPIRED_LABEL = LABEL_CANCELED


def run_label(status: str) -> str:
    """The label of a run stream whose run ended with terminal `status`."""
    return _RUN_LABELS[status]


def run_status_of_label(label: str) -> str | None:
    """The terminal status a run stream's label says (None: the run is not terminal)."""
    return _RUN_STATUSES.get(label)
