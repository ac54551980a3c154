"""A run's waits for signals: `ctx.wait_signal(name, fact_key=..., timeout=...)` inside an op.

A wait first looks for its fact: a signal consumed under `fact_key` earlier in the run (before a
crash, say) is returned again, and nothing else is consumed. Otherwise it records `SignalAwaited`
(what it waits for and until when: GetRun shows it), then consumes the first signal of that name
in the run's inbox that no wait of the run consumed, recording it as a fact before the op sees the
payload. Picking the signal and deciding its fact happen with no await in between, so two waits
of one run never take the same signal; the fact's append is the run stream's compare-and-swap, so
two engines never both record one. With no such signal the wait sleeps until this engine's
wake-up subscription names the run (engine_service.runtime.signals) or its deadline passes, which
fails the attempt with `signal_timeout` (retryable: the retry policy decides).

A rerun after a crash keeps the deadline its orphaned attempt recorded (it waits what is left).
In replay mode the replayed run's fact is served.

`keel.wait_signal` does not wait here: `park` answers a `signal` wait (a ParkStep) that the driver
records as StepWaiting, and `resolve` is that wait's resolver (engine_service.runtime.parking):
it reads the inbox once this engine's wake-up subscription is in place (so a signal sent after the
read is followed by a wake-up it hears) and decides the consumption from the run's history as the
driver holds it, with no await between the decision and the driver recording its fact.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from dataclasses import replace
from typing import Any

from engine_service.domain.events import SignalAwaited
from engine_service.domain.facts import check_fact_key
from engine_service.domain.history import WaitingAttempt
from engine_service.domain.ops import OpError
from engine_service.domain.run_config import REPLAY
from engine_service.domain.signals import (
    SIGNAL_NAMESPACE,
    check_signal_name,
    check_wait_timeout,
    consumed_signal_ids,
    next_signal,
    payload_of,
    signal_park,
    signal_wait_outcome,
    wait_deadline_us,
)
from engine_service.domain.waits import WaitOutcome
from engine_service.runtime.run_io import AttemptOf, RunFacts, RunWriter, io_error
from engine_service.runtime.step_errors import op_error_record
from keel_core.clock import now_us


class RunSignalWaits:
    """The waits for signals of one run being driven."""

    def __init__(self, run: RunWriter, facts: RunFacts) -> None:
        self._run = run
        self._facts = facts

    async def wait(self, attempt: AttemptOf, name: str, fact_key: str, seconds_asked: Any) -> Any:
        """The payload of the signal `name` this wait consumes (or consumed before a crash)."""
        seconds = _checked(name, fact_key, seconds_asked)
        if self._served(fact_key):
            return await self._served_payload(attempt, name, fact_key)
        signals = self._run.env.signals
        if signals is None:
            raise io_error("signals_unavailable", "this engine serves no signals")
        deadline_us = self._begin_wait(attempt, name, fact_key, seconds)
        with signals.wakeups.watching(self._run.run_id) as woken:
            try:
                await asyncio.wait_for(signals.wakeups.ready(), self._left(deadline_us))
            except TimeoutError:
                raise self._timed_out(attempt, name, seconds) from None
            while True:
                woken.clear()
                inbox = await signals.inbox.read(self._run.run_id)
                # No await from here to the fact's decision: no other wait of the run may take it.
                recorded = self._recorded(fact_key)
                if recorded is not None:
                    return copy.deepcopy(payload_of(recorded))
                signal = next_signal(inbox, consumed_signal_ids(self._run.history.facts.values()), name)
                if signal is not None:
                    response = signal.consumed_json()
                    await self._facts.record_answer(attempt, SIGNAL_NAMESPACE, fact_key, response)
                    return copy.deepcopy(signal.payload)
                left = self._left(deadline_us)
                if left is not None and left <= 0:
                    raise self._timed_out(attempt, name, seconds)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), left)

    async def park(self, attempt: AttemptOf, name: str, fact_key: str, seconds_asked: Any) -> Any:
        """The attempt's `signal` wait (a ParkStep), or the payload its fact holds already (a rerun,
        or a replay)."""
        seconds = _checked(name, fact_key, seconds_asked)
        if self._served(fact_key):
            return await self._served_payload(attempt, name, fact_key)
        if self._run.env.signals is None:
            raise io_error("signals_unavailable", "this engine serves no signals")
        timeout = op_error_record(self._timed_out(attempt, name, seconds))
        step_id, number, history = attempt.step_id, attempt.attempt, self._run.history
        return signal_park(history, step_id, number, name, fact_key, seconds, timeout, now_us())

    async def resolve(self, run_id: str, waiting: WaitingAttempt) -> WaitOutcome | None:
        """The `signal` wait's resolver: its outcome once a signal for it is in the inbox, else None."""
        signals = self._run.env.signals
        if signals is None:
            return None
        await signals.wakeups.ready()
        inbox = await signals.inbox.read(run_id)
        # No await from here until the driver records the outcome's fact (see signal_wait_outcome).
        return signal_wait_outcome(self._run.history, inbox, waiting)

    @staticmethod
    def _left(deadline_us: int) -> float | None:
        return (deadline_us - now_us()) / 1_000_000 if deadline_us else None

    @staticmethod
    def _timed_out(attempt: AttemptOf, name: str, seconds: float | None) -> OpError:
        return OpError(
            "signal_timeout",
            f"no signal {name!r} arrived within {seconds or 0:g} s (step {attempt.step_id!r})",
            retryable=True,
            name=name,
        )

    def _served(self, fact_key: str) -> bool:
        """The wait is served from its fact: recorded already (a rerun), or the run replays."""
        return self._recorded(fact_key) is not None or self._run.manifest.run_config.execution_mode == REPLAY

    async def _served_payload(self, attempt: AttemptOf, name: str, fact_key: str) -> Any:
        answer = await self._facts.fact(attempt, SIGNAL_NAMESPACE, {"name": name}, fact_key)
        return answer.get("payload") if isinstance(answer, dict) else None

    def _recorded(self, fact_key: str) -> Any:
        recorded = self._run.history.facts.get(fact_key)
        if recorded is not None and recorded.namespace != SIGNAL_NAMESPACE:
            raise io_error(
                "fact_key_conflict",
                f"wait_signal: fact key {fact_key!r} holds the answer of a {recorded.namespace!r} call",
            )
        return recorded

    def _begin_wait(self, attempt: AttemptOf, name: str, fact_key: str, seconds: float | None) -> int:
        """Record what the attempt waits for (unless it did already); returns the wait's deadline."""
        now = now_us()
        deadline = now + int(seconds * 1_000_000) if seconds is not None else 0
        wait = SignalAwaited(attempt.step_id, attempt.attempt, fact_key, name, deadline, at_us=now)
        wait = replace(wait, deadline_us=wait_deadline_us(self._run.history, wait))
        earlier = self._run.history.signal_waits.get(fact_key)
        if earlier is None or (earlier.attempt, earlier.deadline_us) != (wait.attempt, wait.deadline_us):
            self._run.record([wait])
        return wait.deadline_us


class AttemptSignals:
    """The `signals` handle an op's StepContext gets: waits of its attempt."""

    def __init__(self, waits: RunSignalWaits, attempt: AttemptOf) -> None:
        self._waits = waits
        self._attempt = attempt

    async def wait(self, name: str, fact_key: str, seconds: float | None) -> Any:
        """Wait for the signal `name` (see RunSignalWaits.wait)."""
        return await self._waits.wait(self._attempt, name, fact_key, seconds)

    async def park(self, name: str, fact_key: str, seconds: float | None) -> Any:
        """A `signal` wait to park the attempt on, or the payload consumed already (RunSignalWaits.park)."""
        return await self._waits.park(self._attempt, name, fact_key, seconds)


def _checked(name: str, fact_key: str, seconds_asked: Any) -> float | None:
    """A wait's name, fact key and timeout checked (its timeout in seconds; None: none)."""
    check_signal_name(name, "wait_signal name")
    check_fact_key(fact_key, f"wait_signal({name!r})")
    return check_wait_timeout(seconds_asked, "wait_signal timeout")
