"""Parked steps: what an attempt waits for, as data (DESIGN.md "Runs that wait").

An op (a built-in such as `keel.sleep`, or any registered op) parks its attempt by returning a
`ParkStep` instead of its output. The driver records it in the run's stream as
`StepWaiting{step_id, attempt, wait}` and from then on the attempt holds no coroutine: it is
*waiting*, not an orphan, so a resumed run never reruns its op. A waiting attempt settles in one
of two ways, each recorded by the engine holding the run, through the run stream's sequence
compare-and-swap (so exactly once):

- its due time (`until_us`, absolute, microseconds since the epoch) passes: the step completes
  with `output`, or fails with `error` when one is given (a wait's timeout);
- something else ends the wait first (a signal, a remote task's outcome): a `WaitResolver`
  registered for the wait's `kind` (engine_service.runtime.parking) answers with a `WaitOutcome`.

When nothing of a run can go on (every open attempt waits, and the earliest due time is more than
`PARK_AFTER_US` away), the decision says `ParkRun`: the driver appends `RunParked{due_at_us}`, labels
the run stream `parked` and sets the store's due-time index entry in that same append, and ends.
The run then costs nothing but that index entry; `RunResumed` (same append: label `active`, due
time cleared) starts the next engine's turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine_service.domain.events import ErrorRecord, FactRecorded, ParkStep

# A wait due sooner than this is waited for in the running driver (a timer, no coroutine per step);
# a later one parks the run.
PARK_AFTER_US = 1_000_000
# A run parked on a wait that only a resolver ends (children, say) is due again after this anyway:
# a wake-up lost to a crash (the engine that saw a child end died before it nudged the parent) is
# then found within it, at the cost of one look per parked run per interval.
RECHECK_AFTER_US = 300_000_000

# Wait kinds Keel writes (a resolver may be registered for others).
TIMER = "timer"
# A signal wait (keel.wait_signal); detail: {"name", "fact_key", "timeout_seconds"?}. Its due time,
# when set, is its timeout; its resolver consumes a signal from the run's inbox.
SIGNAL = "signal"
TASK = "task"  # a remote step's task (engine_service.domain.tasks); detail: {"task": its stream id}
# A task wait's due time is a re-check, not a timeout (the task's own deadlines end it): should the
# wake-up of its outcome be lost (the engine that took it died first), the run looks again by then.
TASK_RECHECK_US = 60_000_000


@dataclass(frozen=True)
class WaitOutcome:
    """How a waiting attempt ends: completed with `output`, or failed with `error`."""

    output: Any = None
    error: ErrorRecord | None = None
    # Facts to record before the outcome (a remote task's), and the worker that ran the attempt.
    facts: tuple[FactRecorded, ...] = ()
    worker_id: str = ""


def due_outcome(wait: ParkStep) -> WaitOutcome:
    """What a wait's due time means for its step."""
    return WaitOutcome(wait.output, wait.error)


__all__ = [
    "PARK_AFTER_US",
    "RECHECK_AFTER_US",
    "SIGNAL",
    "TASK",
    "TASK_RECHECK_US",
    "TIMER",
    "ParkStep",
    "WaitOutcome",
    "due_outcome",
]
