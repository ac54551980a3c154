"""`next_action(history, plan, run_config, running) -> Action`: the resume rules of DESIGN.md, as data.

1. no events: `run_not_found`;  2. terminal: nothing to do;
3. RunStarted.op_id must equal the plan's op id (`invalid_plan` otherwise);
4. a step whose last attempt failed and is not retryable or has used up its attempts: complete
   the run `failed`, after recording every other open attempt as canceled (`branch_canceled`);
5. every step completed: complete the run `completed` with the last checkpoint;
6. otherwise the *ready* steps, up to `plan.max_parallel` running at once (0: no limit): a step is
   ready when its dependencies are complete and it is neither completed nor `running` (attempted
   by the caller now). An orphan attempt (open in the history, not running: its engine died) runs
   again as attempt+1 from its base snapshot, orphans first; but the orphan of a *remote* step
   (one with a task queue) is adopted: its task lives in the store and a worker may be executing
   it, so the caller waits for that task's outcome (creating the task if the crash came first); a
   failed step is retried as attempt+1 after its backoff; any other step starts from the last
   checkpoint. An empty set means "wait for a running step to settle".

Waits (engine_service.domain.waits), decided only when the caller passes `now_us`:

- an attempt that waits (StepWaiting) is open but never an orphan: its op is not rerun;
- a wait whose due time has come is settled first (`SettleWaits`);
- a retry's backoff counts from the recorded failure time, so a restart waits only what is left;
- when nothing runs and nothing can start sooner than `PARK_AFTER_US` from now (every open attempt
  waits, or only retries with a long backoff are left), the run parks (`ParkRun`) until the
  earliest due time (0: none, only a wake-up ends the wait); otherwise `RunSteps.wake_at_us` says
  when the caller must decide again although no running step settled.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

from engine_service.domain.events import COMPLETED, FAILED, ErrorRecord, RunCompleted
from engine_service.domain.history import OpenAttempt, RunHistory, StepFailure, WaitingAttempt
from engine_service.domain.plan import Plan, invalid_plan
from engine_service.domain.run_config import RunConfig
from engine_service.domain.waits import PARK_AFTER_US, RECHECK_AFTER_US
from keel_core.errors import not_found

# The error of an attempt stopped because a sibling branch failed the run (never retried).
BRANCH_CANCELED = "branch_canceled"
# The error of a run (and of its attempts still open) that passed its execution_timeout.
RUN_TIMEOUT = "run_timeout"


@dataclass(frozen=True)
class AlreadyTerminal:
    """The run is terminal: nothing to write."""

    terminal: RunCompleted


@dataclass(frozen=True)
class RunStep:
    """Run `attempt` of `step_id` from `base_snapshot_id`, after waiting `delay_ms`."""

    step_id: str
    attempt: int
    base_snapshot_id: str
    delay_ms: int = 0
    due_at_us: int = 0  # with a delay: the absolute time it ends (a retry's recorded failure + backoff)
    # A remote step's open attempt taken over as it is (no new StepAttemptStarted): wait for its task.
    adopt: bool = False


@dataclass(frozen=True)
class RunSteps:
    """Start these attempts now, each on its own; none: wait until a running step settles.

    `wake_at_us`: decide again at this time even if no step settled (a wait falls due); 0: never.
    """

    steps: tuple[RunStep, ...]
    wake_at_us: int = 0


@dataclass(frozen=True)
class SettleWaits:
    """These waiting attempts are due: record what their due time means (complete or fail)."""

    waits: tuple[WaitingAttempt, ...]


@dataclass(frozen=True)
class ParkRun:
    """Nothing can go on before `due_at_us` (0: before a wake-up): park the run until then."""

    due_at_us: int


@dataclass(frozen=True)
class CompleteRun:
    """Append RunCompleted with this status and final snapshot.

    `cancel`: open attempts of other branches, recorded as failed with `branch_canceled` first
    (the caller stops the ones it is running before it records anything).
    """

    status: str
    final_snapshot_id: str
    error: ErrorRecord | None = None
    reason: str = ""
    cancel: tuple[OpenAttempt, ...] = ()
    # What the canceled attempts record (None: `branch_canceled`, a sibling failed the run).
    cancel_error: ErrorRecord | None = None


Action = AlreadyTerminal | RunSteps | CompleteRun | SettleWaits | ParkRun


def next_action(
    history: RunHistory,
    plan: Plan,
    run_config: RunConfig,
    running: Set[str] = frozenset(),
    now_us: int | None = None,
) -> Action:
    """What the engine does next for this run; `running`: the steps it is attempting right now.

    `now_us`: the time now, for waits and backoffs (None: waits never fall due, backoffs are whole).
    """
    if history.started is None:
        raise not_found("run_not_found", "the run has no events")
    if history.terminal is not None:
        return AlreadyTerminal(history.terminal)
    if history.started.op_id != plan.op_id:
        raise invalid_plan(
            f"RunStarted.op_id {history.started.op_id!r} does not match the manifest's op id {plan.op_id!r}"
        )
    failed = _failed_for_good(history, plan, run_config)
    if failed is not None:
        return failed
    if len(history.completed_steps) == len(plan.steps):
        return CompleteRun(COMPLETED, history.last_checkpoint)
    deadline = run_deadline_us(history, run_config)
    if now_us is not None and deadline and now_us >= deadline:
        return _timed_out(history, plan, run_config)
    if now_us is not None:
        due = tuple(
            w
            for s, w in history.waiting.items()
            if s not in running and w.wait.until_us and w.wait.until_us <= now_us
        )
        if due:
            return SettleWaits(due)
    ready = _ready_steps(history, plan, run_config, running, now_us)
    if plan.max_parallel:
        # A waiting attempt is open too: it counts against max_parallel like a running one.
        ready = ready[: max(0, plan.max_parallel - len(set(running) | set(history.waiting)))]
    if now_us is None:
        return RunSteps(tuple(ready))
    return _run_or_park(history, tuple(ready), running, now_us, deadline)


def run_deadline_us(history: RunHistory, run_config: RunConfig) -> int:
    """When the run times out: its recorded start plus `execution_timeout` (0: never)."""
    started = history.started
    if not run_config.execution_timeout_ms or started is None or not started.at_us:
        return 0
    return started.at_us + run_config.execution_timeout_ms * 1000


def _timed_out(history: RunHistory, plan: Plan, run_config: RunConfig) -> CompleteRun:
    """The run's `failed` completion at its deadline; every open attempt is recorded as timed out."""
    seconds = run_config.execution_timeout_ms / 1000
    error = ErrorRecord(
        RUN_TIMEOUT,
        "timeout",
        False,
        f"the run did not finish within its execution_timeout of {seconds:g}s",
        {"execution_timeout_ms": run_config.execution_timeout_ms},
    )
    return CompleteRun(
        FAILED,
        history.last_checkpoint,
        error=error,
        reason=f"{RUN_TIMEOUT}: {error.message}",
        cancel=tuple(history.open_attempts[s] for s in plan.step_ids if s in history.open_attempts),
        cancel_error=error,
    )


def _run_or_park(
    history: RunHistory, ready: tuple[RunStep, ...], running: Set[str], now_us: int, deadline: int
) -> Action:
    """Run what is ready; park when nothing runs and nothing can start within PARK_AFTER_US.

    The run's deadline is one more due time: a running driver wakes for it, a parked run is due then.
    """
    timers = [w.wait.until_us for w in history.waiting.values() if w.wait.until_us]
    if deadline:
        timers.append(deadline)
    wake_at = min(timers, default=0)
    if running or not (history.waiting or ready):
        return RunSteps(ready, wake_at if running or ready else 0)
    starts = [max(now_us, step.due_at_us or now_us + step.delay_ms * 1000) for step in ready]
    # A wait only a resolver ends is looked at again after RECHECK_AFTER_US (a lost wake-up).
    rechecks = [now_us + RECHECK_AFTER_US for w in history.waiting.values() if not w.wait.until_us]
    earliest = min([*timers, *starts, *rechecks], default=0)
    if earliest and earliest - now_us < PARK_AFTER_US:
        return RunSteps(ready, wake_at)
    return ParkRun(earliest)


def _failed_for_good(history: RunHistory, plan: Plan, run_config: RunConfig) -> CompleteRun | None:
    """The run's `failed` completion when a step may not be tried again (a canceled branch last)."""
    policy = run_config.retry_policy
    exhausted: list[tuple[str, StepFailure]] = []
    for step_id in plan.step_ids:
        failure = history.last_failure.get(step_id)
        if step_id in history.completed_steps or failure is None:
            continue
        if failure.attempt != history.last_attempt.get(step_id):
            continue  # a later attempt started: it is open or running
        if not failure.error.retryable or failure.attempt + 1 >= policy.max_attempts:
            exhausted.append((step_id, failure))
    if not exhausted:
        return None
    step_id, failure = min(exhausted, key=lambda found: found[1].error.code == BRANCH_CANCELED)
    why = "not retryable" if not failure.error.retryable else f"{policy.max_attempts} attempts used"
    return CompleteRun(
        FAILED,
        history.last_checkpoint,
        error=failure.error,
        reason=f"step {step_id!r} failed ({why}): {failure.error.message}",
        cancel=tuple(history.open_attempts[s] for s in plan.step_ids if s in history.open_attempts),
    )


def _ready_steps(
    history: RunHistory, plan: Plan, run_config: RunConfig, running: Set[str], now_us: int | None
) -> list[RunStep]:
    """Every step that may start now, orphans first, then in plan order (a waiting one never)."""
    orphans: list[RunStep] = []
    fresh: list[RunStep] = []
    for step in plan.steps:
        step_id = step.step_id
        if step_id in history.completed_steps or step_id in running or step_id in history.waiting:
            continue
        if not all(dep in history.completed_steps for dep in step.depends_on):
            continue
        orphan = history.open_attempts.get(step_id)
        failure = history.last_failure.get(step_id)
        if orphan is not None and step.task_queue:
            orphans.append(RunStep(step_id, orphan.attempt, orphan.base_snapshot_id, adopt=True))
        elif orphan is not None:
            orphans.append(RunStep(step_id, orphan.attempt + 1, orphan.base_snapshot_id))
        elif failure is not None:
            retry = failure.attempt + 1
            delay = run_config.retry_policy.backoff_ms(retry)
            due_at = 0
            if now_us is not None and failure.at_us:
                due_at = failure.at_us + delay * 1000
                # Rounded up: a retry never starts before its due time (floor could start it 1 ms early).
                delay = max(0, -((now_us - due_at) // 1000))
            fresh.append(RunStep(step_id, retry, failure.base_snapshot_id, delay, due_at))
        else:
            attempt = history.last_attempt.get(step_id, -1) + 1
            fresh.append(RunStep(step_id, attempt, history.last_checkpoint))
    return orphans + fresh
