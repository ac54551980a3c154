"""`next_action(history, plan, run_config) -> Action`: the resume rules of DESIGN.md, as data.

1. no events: `run_not_found`;  2. terminal: nothing to do;
3. RunStarted.op_id must equal the plan's op id (`invalid_plan` otherwise);
4. an orphan attempt: run that step again as attempt+1 from the orphan's base snapshot;
5. the first step in plan order not completed; if its last attempt failed and is not retryable or
   the attempts are used up: complete the run `failed`; else retry it as attempt+1 after the backoff;
6. no step left: complete the run `completed` with the last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine_service.domain.events import COMPLETED, FAILED, ErrorRecord, RunCompleted
from engine_service.domain.history import RunHistory
from engine_service.domain.plan import Plan, invalid_plan
from engine_service.domain.run_config import RunConfig
from keel_core.errors import not_found


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


@dataclass(frozen=True)
class CompleteRun:
    """Append RunCompleted with this status and final snapshot."""

    status: str
    final_snapshot_id: str
    error: ErrorRecord | None = None
    reason: str = ""


Action = AlreadyTerminal | RunStep | CompleteRun


def next_action(history: RunHistory, plan: Plan, run_config: RunConfig) -> Action:
    """What the engine does next for this run."""
    if history.started is None:
        raise not_found("run_not_found", "the run has no events")
    if history.terminal is not None:
        return AlreadyTerminal(history.terminal)
    if history.started.op_id != plan.op_id:
        raise invalid_plan(
            f"RunStarted.op_id {history.started.op_id!r} does not match the manifest's op id {plan.op_id!r}"
        )
    orphan = history.open_attempt
    if orphan is not None and orphan.step_id not in history.completed_steps:
        return RunStep(orphan.step_id, orphan.attempt + 1, orphan.base_snapshot_id)
    for step_id in plan.step_ids:
        if step_id in history.completed_steps:
            continue
        failure = history.last_failure.get(step_id)
        if failure is None:
            attempt = history.last_attempt.get(step_id, -1) + 1
            return RunStep(step_id, attempt, history.last_checkpoint)
        policy = run_config.retry_policy
        retry = failure.attempt + 1
        if not failure.error.retryable or retry >= policy.max_attempts:
            why = "not retryable" if not failure.error.retryable else f"{policy.max_attempts} attempts used"
            return CompleteRun(
                FAILED,
                history.last_checkpoint,
                error=failure.error,
                reason=f"step {step_id!r} failed ({why}): {failure.error.message}",
            )
        return RunStep(step_id, retry, failure.base_snapshot_id, policy.backoff_ms(retry))
    return CompleteRun(COMPLETED, history.last_checkpoint)
