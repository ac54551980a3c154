"""A remote step attempt as the driving engine sees it: schedule its task, wait for its outcome.

The driver calls `run_remote_attempt` once the attempt's StepAttemptStarted is durable (or when it
adopted an orphaned remote attempt after a crash). It waits for the task's outcome in the driver for
up to WAIT_IN_DRIVER_SECONDS (a task done by then costs no park and wake-up); then the attempt *waits*
(StepWaiting of kind `task`, engine_service.domain.waits), holding no coroutine, and the run parks
when nothing else of it runs. Whoever ends the task wakes the run (the engine that took the
worker's outcome, or any engine's TaskWaker when a deadline passed: `Engine.wake_run`), and the
`task` wait resolver (`task_wait_resolver`) says how the wait ended. Either way the driver, the run's
one writer, copies the outcome into the run stream: the facts the worker recorded (FactRecorded),
then StepCompleted with the output or StepAttemptFailed with the worker's error or the timeout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from engine_service.domain import ErrorRecord, FactRecorded, RunHistory, RunManifest, RunStep
from engine_service.domain.history import WaitingAttempt
from engine_service.domain.plan import StepSpec
from engine_service.domain.run_config import REPLAY
from engine_service.domain.streams import task_stream_id
from engine_service.domain.tasks import (
    TaskCompleted,
    TaskFailed,
    TaskScheduled,
    TaskState,
    fact_events,
)
from engine_service.domain.waits import WaitOutcome
from engine_service.runtime.environment import RunEnvironment, WaitResolver
from engine_service.runtime.run_io import RunFacts
from engine_service.runtime.task_board import TaskBoard
from keel_core.clock import now_us
from keel_core.errors import KeelError

log = logging.getLogger(__name__)

# How long the driver waits for a task's outcome itself before the attempt waits parked: longer
# than a timer's PARK_AFTER_US, since a loaded queue's tasks often take a few seconds and parking
# then waking a run costs more store round trips than the wait's coroutine and subscription.
WAIT_IN_DRIVER_SECONDS = 5.0


class RemoteRun(Protocol):
    """What a remote attempt needs of its run's driver."""

    run_id: str
    env: RunEnvironment
    manifest: RunManifest
    history: RunHistory
    facts: RunFacts


@dataclass(frozen=True)
class RemoteOutcome:
    """How a remote attempt ended: facts to copy, then its output or its error, and who ran it."""

    facts: list[FactRecorded]
    output: Any = None
    error: ErrorRecord | None = None
    worker_id: str = ""


async def task_body(run: RemoteRun, step: StepSpec, seen: dict[str, Any]) -> dict[str, Any]:
    """What the worker is handed: op config, the run's input, the context it starts from, the run's facts.

    A replay hands the replayed run's facts instead, and says so: the worker may not call out.
    """
    replay = run.manifest.run_config.execution_mode == REPLAY
    recorded = dict(run.history.facts)
    if replay:
        recorded = {**await run.facts.replayed_facts(), **recorded}
    facts = [
        {"namespace": f.namespace, "fact_key": f.fact_key, "response": f.response} for f in recorded.values()
    ]
    body = {"op_config": step.op_config, "input": run.manifest.input, "context": seen, "facts": facts}
    if replay:
        body["replay"] = True
    return body


@dataclass(frozen=True)
class RemoteWaiting:
    """The task has no outcome yet: the attempt waits for it (`stream_id`, as last seen: `state`)."""

    stream_id: str
    state: TaskState


async def run_remote_attempt(
    run: RemoteRun, action: RunStep, step: StepSpec, seen: dict[str, Any], fencing: int
) -> RemoteOutcome | RemoteWaiting:
    """Create the attempt's task (unless adopted and there) and wait a little for its outcome."""
    board = run.env.tasks
    stream_id = task_stream_id(run.run_id, step.step_id, action.attempt)
    scheduled = TaskScheduled(
        run.run_id,
        step.step_id,
        action.attempt,
        step.task_queue,
        step.op_id,
        step.op_version,
        step.timeouts,
        fencing,
        now_us(),
    )
    body = await task_body(run, step, seen)
    state = await board.schedule(scheduled, body, stream_id, adopted=action.adopt)
    state = await board.outcome(stream_id, state, within=WAIT_IN_DRIVER_SECONDS)
    if state.outcome is None:
        return RemoteWaiting(stream_id, state)
    return remote_outcome(run.history, state)


def task_wait_resolver(board: TaskBoard) -> WaitResolver:
    """The `task` wait resolver: the outcome of the task a waiting attempt names, once it has one."""

    async def resolve(run_id: str, waiting: WaitingAttempt) -> WaitOutcome | None:
        stream_id = str(waiting.wait.detail.get("task", ""))
        try:
            state = await board.read(stream_id)
            if state.scheduled is not None and state.outcome is None:
                state = await board.enforce_deadline(stream_id, state)
        except KeelError as error:  # someone wrote first, or the store is away: asked again later
            log.info("run %s: task %s not resolved yet: %s", run_id, stream_id, error.message)
            return None
        if state.outcome is None:
            return None
        outcome = remote_outcome(RunHistory(), state)
        return WaitOutcome(outcome.output, outcome.error, tuple(outcome.facts), outcome.worker_id)

    return resolve


def remote_outcome(history: RunHistory, state: TaskState) -> RemoteOutcome:
    """A task's outcome as what the run records (facts it does not hold yet first)."""
    facts = [fact for fact in fact_events(state) if fact.fact_key not in history.facts]
    outcome = state.outcome
    match outcome:
        case TaskCompleted():
            # Checked where the run records it (RunDriver._complete_step, as the context holds it):
            # an output a store client wrote past CompleteTask's checks fails the step there.
            return RemoteOutcome(facts, output=outcome.output, worker_id=state.worker_id)
        case TaskFailed():
            return RemoteOutcome(facts, error=outcome.error, worker_id=state.worker_id)
        case None:
            raise AssertionError("a task without an outcome")
        case _:
            return RemoteOutcome(facts, error=outcome.error, worker_id=state.worker_id)
