"""Failpoints: named places where the engine kills itself (SIGKILL), for crash tests.

Set `KEEL_FAILPOINTS` to a comma-separated list of `NAME` or `NAME:STEP_ID` (the latter fires only
for that step). Each failpoint fires at most once per process, which is enough: the process dies.

- `after_step_attempt_started`: StepAttemptStarted is durable (arming it makes the driver append
  StepAttemptStarted on its own, before the op runs, instead of deferring it);
- `after_fact_recorded`: a FactRecorded is durable, before the op sees the answer;
- `after_op_returned`: the op returned its output, before StepCompleted is appended;
- `before_run_completed`: every step is settled, before RunCompleted is appended (arming it makes
  RunCompleted its own append instead of travelling with the last StepCompleted).
- `after_child_spawn_recorded`: a parent's spawn fact (`machine.child_run.spawn`) is durable;
- `before_child_started`: a spawn stored the child's manifest and has not appended its RunStarted;
- `after_child_completed`: an await saw its child terminal, before the parent records the answer
  (for a step parked on its children, `keel.fan_out`: they all ended, before the step settles);
- `after_child_await_recorded`: a parent's await fact (`machine.child_run.await`) is durable.
- `retention_after_run_deleted`: retention deleted one run of a tree (root first), before the next.
- `after_run_parked`: a run's RunParked is durable (the driver has not ended yet).
- `after_child_run_ended`: a child run's terminal event is durable, before its engine wakes the
  parent (the append's nudge of the parent's due time is all that wakes it then).
- `after_signal_sent`: SignalRun's inbox append is durable, before its engine wakes the run (the
  append's nudge of a parked run's due time is all that wakes it then).

`pause_before_transport_call` does not kill: it stops the process (SIGSTOP; a test sends SIGCONT)
once its StepAttemptStarted is durable, before the last lease check and the transport call.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV_VAR = "KEEL_FAILPOINTS"
AFTER_STEP_ATTEMPT_STARTED = "after_step_attempt_started"
AFTER_FACT_RECORDED = "after_fact_recorded"
AFTER_OP_RETURNED = "after_op_returned"
BEFORE_RUN_COMPLETED = "before_run_completed"
AFTER_CHILD_SPAWN_RECORDED = "after_child_spawn_recorded"
BEFORE_CHILD_STARTED = "before_child_started"
AFTER_CHILD_COMPLETED = "after_child_completed"
AFTER_CHILD_AWAIT_RECORDED = "after_child_await_recorded"
AFTER_RUN_PARKED = "after_run_parked"
AFTER_CHILD_RUN_ENDED = "after_child_run_ended"
AFTER_SIGNAL_SENT = "after_signal_sent"
PAUSE_BEFORE_TRANSPORT_CALL = "pause_before_transport_call"
RETENTION_AFTER_RUN_DELETED = "retention_after_run_deleted"
# Pausing failpoints stop the process instead of killing it, once per process.
PAUSES = (PAUSE_BEFORE_TRANSPORT_CALL,)
_paused: set[tuple[str, str]] = set()
NAMES = (
    AFTER_STEP_ATTEMPT_STARTED,
    AFTER_FACT_RECORDED,
    AFTER_OP_RETURNED,
    BEFORE_RUN_COMPLETED,
    AFTER_CHILD_SPAWN_RECORDED,
    BEFORE_CHILD_STARTED,
    AFTER_CHILD_COMPLETED,
    AFTER_CHILD_AWAIT_RECORDED,
    AFTER_RUN_PARKED,
    AFTER_SIGNAL_SENT,
    AFTER_CHILD_RUN_ENDED,
    PAUSE_BEFORE_TRANSPORT_CALL,
    RETENTION_AFTER_RUN_DELETED,
)


@dataclass(frozen=True)
class Failpoints:
    """The armed failpoints: name -> step filter ("" = any step)."""

    armed: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def parse(text: str) -> Failpoints:
        """Failpoints from `NAME[:STEP],...`; an unknown name is an error (a typo would test nothing)."""
        armed = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            name, _, step = item.partition(":")
            if name not in NAMES:
                raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(NAMES)}")
            armed.append((name, step))
        return Failpoints(tuple(armed))

    @staticmethod
    def from_env() -> Failpoints:
        """Failpoints from KEEL_FAILPOINTS."""
        return Failpoints.parse(os.environ.get(ENV_VAR, ""))

    def is_armed(self, name: str, step_id: str = "") -> bool:
        """True when `name` would fire for `step_id`."""
        if not self.armed:  # the service's case: asked several times per run
            return False
        return any(armed == name and (not step or step == step_id) for armed, step in self.armed)

    def hit(self, name: str, step_id: str = "") -> None:
        """Kill this process now if `name` is armed for `step_id` (stop it, once, if `name` pauses)."""
        if name in PAUSES:
            if self.is_armed(name, step_id) and (name, step_id) not in _paused:
                _paused.add((name, step_id))
                log.warning("failpoint %s hit (step %r): stopping the process", name, step_id)
                os.kill(os.getpid(), signal.SIGSTOP)
            return
        if self.is_armed(name, step_id):
            log.error("failpoint %s hit (step %r): killing the process", name, step_id)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
