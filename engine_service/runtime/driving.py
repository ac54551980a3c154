"""Driving runs: each RunDriver runs as the registry's task for its run, and its end is settled here.

When a driver ends, its run is no longer driven here: the lease is dropped (a recorded one stays
this session's until the scan takes the run up again), a finished run's final snapshot and events
are kept for its views, and a stop is logged by what it means: parked (cancelled), handed over
(another engine took the run, or this one may no longer write to it), or failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from engine_service.domain import Plan, RunCompleted, RunHistory, RunManifest, StoredEvent
from engine_service.domain.decision import RUN_TIMEOUT
from engine_service.runtime.driver import RunDriver, RunParkedOut
from engine_service.runtime.environment import RunEnvironment
from engine_service.runtime.leases import Lease, Leases
from engine_service.runtime.reader import RunReader
from engine_service.runtime.registry import RunRegistry
from keel_core.errors import ErrorCategory, KeelError

log = logging.getLogger(__name__)

# A driver stopping with these is a routine hand-over (logged at INFO), by what happened.
# A driver that ended so hands an unapplied wake-up on (any other failure is left to the scans:
# waking it at once would re-drive a run that fails the same way in a tight loop).
_PASSING = (ErrorCategory.UNAVAILABLE, ErrorCategory.DEADLINE_EXCEEDED)


def _hands_on(task: asyncio.Task[RunCompleted]) -> bool:
    """The driver ended unfinished in a way after which its run may be woken at once: it parked,
    was stopped, handed the run over, or its store did not answer."""
    if task.cancelled():
        return True
    error = task.exception()
    if isinstance(error, RunParkedOut):
        return True
    return isinstance(error, KeelError) and (error.code in _HANDED_OVER or error.category in _PASSING)


_HANDED_OVER = {
    "lease_lost": "this engine may no longer write to it (its lease was lost or not trusted)",
    "sequence_conflict": "another engine appended to the run first (it took the run over)",
}


class Drivers:
    """Makes an engine's RunDrivers and drives each as the registry's task for its run."""

    def __init__(
        self,
        env: RunEnvironment,
        registry: RunRegistry,
        reader: RunReader,
        leases: Leases,
        *,
        checkpoint_linger: float,
    ) -> None:
        self._env = env
        self._registry = registry
        self._reader = reader
        self._leases = leases
        self._checkpoint_linger = checkpoint_linger
        # Told (run id, due time) when a driver parks its run (the engine's Waker).
        self.on_parked: Callable[[str, int], None] | None = None
        # Told the run id when a driver ended (parked, stopped) with a wake-up it did not apply.
        self.on_poked_after_park: Callable[[str], None] | None = None
        # Told the parent run id when a child run's driver ended it (the parent may wait for it).
        self.on_terminal: Callable[[str], None] | None = None
        # Told the run id when a driver ended its run failed with `run_timeout` (its children close).
        self.on_timed_out: Callable[[str], None] | None = None

    def new(
        self,
        run_id: str,
        manifest: RunManifest,
        plan: Plan,
        history: RunHistory,
        *,
        lease: Lease | None,
        claim: bool = False,
        has_ledger: bool = False,
        events: Sequence[StoredEvent] | None = None,
    ) -> RunDriver:
        """A driver of the run (not driving yet): `claim` its stream first when resumed."""
        return RunDriver(
            self._env,
            run_id,
            manifest,
            plan,
            history,
            checkpoint_linger=self._checkpoint_linger,
            first_append_patience=self._env.store.patience,
            claim_first=claim,
            has_ledger=has_ledger,
            lease=lease,
            events=events,
        )

    def spawn(self, driver: RunDriver) -> asyncio.Task[RunCompleted]:
        """Drive the run as a task of the registry (the run's one driver here)."""
        driver.on_parked = self.on_parked
        task = asyncio.create_task(driver.drive(), name=f"run {driver.run_id}")
        self._registry.drivers[driver.run_id] = task
        self._registry.pokes[driver.run_id] = driver.poke
        # Its stream's creation time is held while it is the run's driver here (until `_done`).
        driver.on_created = self._reader.note_created
        if driver.created_at_us is not None:  # created by a start's append before it was spawned
            self._reader.note_created(driver.run_id, driver.created_at_us)
        task.add_done_callback(lambda done: self._done(driver, done))
        return task

    def _done(self, driver: RunDriver, task: asyncio.Task[RunCompleted]) -> None:
        run_id = driver.run_id
        driver.on_created = None  # an append of its still in flight may land later: not held then
        if self._registry.drivers.get(run_id) is task:
            del self._registry.drivers[run_id]
            self._registry.pokes.pop(run_id, None)
            self._reader.stopped_driving(run_id)
            parked = not task.cancelled() and isinstance(task.exception(), RunParkedOut)
            started = driver.history.started
            self._leases.drop(
                run_id,
                run_exists=driver.durable_seq > 0,
                ended=driver.history.is_terminal and driver.durable_seq == driver.history.head_seq,
                # A RunStarted without its time (an older event) cannot name its run: not remembered.
                parked_start_us=started.at_us if parked and started is not None and started.at_us else None,
                created_at_us=driver.created_at_us,
            )
        if not task.cancelled():
            # A cancelled parent's spawns are still needed to close its children.
            self._registry.forget_spawns(run_id)
        if not task.cancelled() and task.exception() is None:
            final_id = task.result().final_snapshot_id
            final = driver.known_snapshot(final_id)
            if final is not None:
                self._reader.remember_final_snapshot(final_id, final)
            if driver.events is not None and driver.history.is_terminal:
                links = self._reader.links_appended(run_id, driver.children_head_at_end)
                self._reader.remember_finished(run_id, driver.events, driver.history, links=links)
            started = driver.history.started
            if self.on_terminal is not None and started is not None and started.parent_run_id:
                self.on_terminal(started.parent_run_id)
            why = task.result().error
            if self.on_timed_out is not None and why is not None and why.code == RUN_TIMEOUT:
                self.on_timed_out(run_id)
        if driver.unapplied_wake and _hands_on(task) and self.on_poked_after_park is not None:
            # A wake-up came that this driver did not apply (it parked, lost its lease, its store
            # failed, it was stopped): apply it now, here or through the store's index, or it
            # waits for the run's re-check.
            self.on_poked_after_park(run_id)
        if task.cancelled():
            log.info("run %s parked", run_id)
        elif isinstance(error := task.exception(), RunParkedOut):
            log.info("run %s parked (due at %s µs): nothing drives it until then", run_id, error.due_at_us)
        elif error is not None:
            if isinstance(error, KeelError) and error.code in _HANDED_OVER:
                # Routine: the run resumes wherever its lease goes next (perhaps here again).
                what = _HANDED_OVER[error.code]
                log.info("run %s: stopped driving it here: %s (%s: %s)", run_id, what, error.code, error)
            else:
                log.error("run %s stopped: %r", run_id, error)
