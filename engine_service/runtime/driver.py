"""The run driver: executes `next_action` until the run is terminal, appending what happened.

Round trips (write-behind). The driver *decides* events at once (folding them into `history`) and
appends them in batches: a batch goes to the store when durability is needed, or at the latest
`checkpoint_linger` seconds after its first event (default 200 ms). Checkpoint snapshots travel
inline with their StepCompleted. Durability is needed

- before a *live* transport call (so a side effect can only be in flight while the stream shows
  its attempt running), and for FactRecorded, which is durable before the op sees the answer;
- at the end: RunCompleted is durable before anyone is told the run finished;
- for RunStarted when the client does not wait (StartRun returns once RunStarted is durable).
- before sleeping a retry's backoff (so the failed attempt is visible while the step waits).

So a run of ops that do no I/O, started with `wait`, is one append: RunStarted, every step's
StepAttemptStarted/StepCompleted (+ snapshots), and RunCompleted. This is correct because nothing
outside the engine has seen any of it: if the engine dies before the batch is durable, the stream
ends at its last durable event and resume (DESIGN.md rules 4-6) runs the missing steps again from
the last durable checkpoint; ops are deterministic apart from their I/O, and I/O goes through
facts, which are always durable before use, so no recorded side effect is repeated. The cost is
re-running at most `checkpoint_linger` worth of completed steps after a crash. A failed append
stops the driver (a later batch must never land after a gap). Failpoints keep their meaning:
arming `after_step_attempt_started` or `before_run_completed` flushes before they fire. Events of
one batch share the store's commit time, so each carries `at_us`, the time the driver decided it;
views time steps by that. A timer flushes pending events within the linger even while an op runs,
so a long op shows as running; a resumed driver appends its first StepAttemptStarted (or a woken
one its RunResumed) before any op runs (a claim: an engine still driving the run elsewhere fences
one of the two off before any work).

Leases. A driver holds its run's lease (engine_service.runtime.leases) and confirms it is still valid
before every append and right before every transport call; once lost, the driver appends nothing
more (a resumed driver's claim, fenced by the run's sequence, refuses a former holder's late
appends), with one exception: an answer it holds.

Facts: engine_service.runtime.run_io (answers recorded before the op sees them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from engine_service.domain import (
    AlreadyTerminal,
    CompleteRun,
    FactRecorded,
    KernelEvent,
    Plan,
    RunCompleted,
    RunHistory,
    RunManifest,
    RunStarted,
    RunStep,
    RunSteps,
    StepAttemptFailed,
    StepAttemptStarted,
    StepCompleted,
    StepContext,
    StoredEvent,
    canonical_json_bytes,
    encode_event,
    next_action,
    step_context,
    with_step_output,
)
from engine_service.domain.canonical import artifact_id_for_bytes, json_copy, parse_json_bytes
from engine_service.domain.child_runs import CHILDREN, parent_nudge
from engine_service.domain.context import SNAPSHOT_ARTIFACT_KIND
from engine_service.domain.decision import ParkRun, SettleWaits
from engine_service.domain.events import ErrorRecord, ParkStep, RunParked, RunResumed, StepWaiting, stamped
from engine_service.domain.history import WaitingAttempt
from engine_service.domain.ops import OpDefinition
from engine_service.domain.plan import StepSpec
from engine_service.domain.streams import (
    RUN_ACTIVE_LABEL,
    RUN_COMPLETED,
    RUN_PARKED_LABEL,
    children_stream_id,
    run_label,
    run_stream_id,
)
from engine_service.domain.tasks import TaskState
from engine_service.domain.waits import SIGNAL, TASK, TASK_RECHECK_US, TIMER, WaitOutcome, due_outcome
from engine_service.failpoints import (
    AFTER_CHILD_COMPLETED,
    AFTER_CHILD_RUN_ENDED,
    AFTER_OP_RETURNED,
    AFTER_RUN_PARKED,
    AFTER_STEP_ATTEMPT_STARTED,
    BEFORE_RUN_COMPLETED,
)
from engine_service.runtime.environment import PARK_FLUSH_SECONDS, RunEnvironment, WaitResolver
from engine_service.runtime.futures import retrieved, run_telling
from engine_service.runtime.leases import Lease
from engine_service.runtime.remote_steps import RemoteWaiting, run_remote_attempt
from engine_service.runtime.run_io import AttemptOf, RunFacts, RunIo, io_error
from engine_service.runtime.signal_waits import AttemptSignals, RunSignalWaits
from engine_service.runtime.step_errors import branch_canceled, op_cancelled, op_error_record, step_timeout
from engine_service.store.port import FOREVER
from keel_core import tracing
from keel_core.clock import now_us
from keel_core.errors import KeelError
from keel_core.json_rules import MAX_JSON_DEPTH, check_json, nests_too_deeply
from keel_core.logs import bind_log_fields

log = logging.getLogger(__name__)
# A checkpoint travels inline in one append (gRPC messages are capped at 16 MiB).
MAX_SNAPSHOT_BYTES = 8 * 1024 * 1024
MAX_BATCH_ARTIFACT_BYTES = 12 * 1024 * 1024
# The store takes at most 16 inline artifacts per append, and events of at most 1 MiB each.
MAX_BATCH_ARTIFACTS = 16
# Without write-behind (linger 0) attempts settle with their own append; one still running after
# this long is appended on its own, so that a long op shows as running.
VISIBLE_WITHIN = 0.2
# A driver running steps in its own task gives the loop a turn once it has held it this long
# (seconds): a pipeline of quick steps runs several to a turn, a long one still lets the rest in.
INLINE_TURN = 0.001
# Waits whose end is decided without a write anywhere (a timer's due time; a signal's resolver
# reads the run's inbox): a run woken from them defers its claim to its next append.
_PURE_WAITS = frozenset({TIMER, SIGNAL})


# Driver tasks this engine stopped (park, drain, terminalize, a lease lost, a foreign terminal
# event). Known by name, not by the task's cancel count: on Python 3.11 and 3.12 an op's TaskGroup
# whose child failed leaves the task running it (the driver's, for an inline step) counted as
# cancelling for good.
_STOPPED: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


def stop_driving(task: asyncio.Task[Any]) -> None:
    """Cancel a driver's task as a stop: the run's op is cancelled and the driver ends. Every stop
    goes through here: a plain cancel of a driver's task is taken for its op cancelling itself."""
    _STOPPED.add(task)
    task.cancel()


class RunParkedOut(Exception):
    """How a driver ends when its run parked (RunParked is durable): nothing drives it until it is due."""

    def __init__(self, run_id: str, due_at_us: int) -> None:
        super().__init__(f"run {run_id} parked until {due_at_us or 'a wake-up'}")
        self.run_id = run_id
        self.due_at_us = due_at_us


def _not_json(op_id: str, refused: KeelError) -> KeelError:
    """What an op's output that is not JSON (`refused` by check_json) fails its attempt with."""
    return io_error("op_output_invalid", f"op {op_id!r} returned a value that is not JSON: {refused.message}")


def _wait_refused(op_id: str, refused: KeelError) -> KeelError:
    """What a parked step's wait that StepWaiting cannot hold (`refused` by check_json) fails with."""
    if not nests_too_deeply(refused):
        return _not_json(op_id, refused)
    why = (
        f"op {op_id!r} parked its step with a wait that nests too deeply to be recorded: StepWaiting "
        "holds the wait one level down and the wait its output one more (its error's details two more), "
        f"so a parked step's output nests at most {MAX_JSON_DEPTH - 2} levels: {refused.message}"
    )
    return io_error("op_output_invalid", why)


class RunDriver:
    """Drives one run from its history to a terminal event. One per run per engine.

    `history` is what the driver has decided, durable or not; `durable_seq` is how much of it the
    store holds. Events past `durable_seq` are pending and are appended by `flush` (on demand, or
    by the linger timer `checkpoint_linger` seconds after the first pending event, even while an
    op runs: a long op's StepAttemptStarted becomes visible within the linger).
    """

    def __init__(
        self,
        env: RunEnvironment,
        run_id: str,
        manifest: RunManifest,
        plan: Plan,
        history: RunHistory,
        *,
        durable_seq: int | None = None,
        checkpoint_linger: float = 0.2,
        first_append_patience: float | None = None,
        claim_first: bool = False,
        has_ledger: bool = False,
        lease: Lease | None = None,
        events: Sequence[StoredEvent] | None = None,
    ) -> None:
        self.env = env
        self.run_id = run_id
        self.stream_id = run_stream_id(run_id)
        self.manifest = manifest
        self.plan = plan
        self.history = history
        self.durable_seq = history.head_seq if durable_seq is None else durable_seq
        self.checkpoint_linger = checkpoint_linger
        self._first_append_patience = first_append_patience
        self._snapshots: dict[str, dict[str, Any]] = {}
        self._pending: list[KernelEvent] = []
        self._pending_artifacts: list[tuple[str, bytes]] = []
        self._pending_label: str | None = None
        # The run stream's index entries, set by the first append (the one holding RunStarted).
        self._pending_attributes: dict[str, str] = {}
        self._lock = asyncio.Lock()
        # The linger timer: once it fires, what is pending is appended (no task until it does).
        self._lingering: asyncio.TimerHandle | None = None
        self._flush_error: BaseException | None = None
        # The head of the run's children stream as its terminal append committed (None: unknown).
        self.children_head_at_end: int | None = None
        # Set once the lease was refused: from then on only a batch holding an answer is appended
        # (kept apart from _flush_error, after which nothing may be appended at all).
        self._refused: KeelError | None = None
        # A resumed run is claimed (its first StepAttemptStarted appended) before any op runs, so an
        # engine that still drives it elsewhere fences this driver off before it does any work.
        self._claim_first = claim_first
        self.has_ledger = has_ledger
        # Checked before every append and transport call: an engine that lost the run writes nothing.
        self.lease = lease
        # Every event of the run so far, when this driver started it (None for a resumed run, whose
        # earlier events it never held): a finished run's view then needs no read of its stream.
        self.events: list[StoredEvent] | None = None if events is None else list(events)
        # They reach the driver through a weak proxy: a finished run's objects are then freed as soon
        # as the last reference goes, not left to the cycle collector (a cost that grew with the load).
        # Ops reach them only while their attempt runs, which holds the driver; a task an op leaves
        # behind that calls on them after the driver is gone gets ReferenceError.
        this = weakref.proxy(self)
        self.facts = RunFacts(this)
        self.signal_waits = RunSignalWaits(this, self.facts)
        self._steps: dict[str, asyncio.Task[None]] = {}  # step id -> the task running its attempt
        self._step_actions: dict[str, RunStep] = {}  # step id -> the attempt its task runs
        self._flushes: set[asyncio.Future[None]] = set()
        # The append that has not yet taken the lock (nor so its events): a flush meanwhile joins it.
        self._gathering: asyncio.Future[None] | None = None
        self._drive_task: asyncio.Task[Any] | None = None
        self._turn_at = 0.0  # time.monotonic() of the loop's last turn while driving (INLINE_TURN)
        # The run stream's due time the next append sets (None: leave it; 0: clear it).
        self._pending_due: int | None = None
        # Waits are offered to their kind's resolver at the start and after each poke (wake_run).
        self._check_waits = True
        # A poke came since the driver last waited; the wait that a poke ends, while one is on.
        self._poked = False
        self._poke_waiter: asyncio.Future[None] | None = None
        # A wake-up (poke) came that the waits were not offered to their resolvers for since.
        self.unapplied_wake = False
        # Watchers of the tasks of this run's waiting remote attempts (they poke it on an outcome).
        self._watchers: set[asyncio.Task[None]] = set()
        # The ops running now (token -> when each began, by the loop's clock), and how the driver
        # watches for a foreign terminal event while one runs long (_op_began).
        self._ops_running: dict[object, float] = {}
        self._op_watch_after = checkpoint_linger or VISIBLE_WITHIN
        self._op_timer: asyncio.TimerHandle | None = None
        self._op_watch: asyncio.Task[None] | None = None
        # Told the due time of a run this driver parked (the engine's Waker); set by the kernel.
        self.on_parked: Any = None
        # When this driver's append created the run stream, by the store's clock (None: it did not,
        # or the store did not say); told to `on_created` once set, if that is set by then.
        self.created_at_us: int | None = None
        self.on_created: Callable[[str, int], None] | None = None

    def remember_snapshot(self, snapshot_id: str, context: dict[str, Any]) -> None:
        """Cache a snapshot this engine wrote, so it need not be read back."""
        self._snapshots[snapshot_id] = context

    def known_snapshot(self, snapshot_id: str) -> dict[str, Any] | None:
        """A snapshot this driver holds in memory, if it does."""
        return self._snapshots.get(snapshot_id)

    async def snapshot(self, snapshot_id: str) -> dict[str, Any]:
        """A context snapshot, from the cache or the store."""
        if snapshot_id not in self._snapshots:
            data = await self.env.store.get_artifact(snapshot_id, patience=FOREVER)
            self._snapshots[snapshot_id] = dict(parse_json_bytes(data))
        return self._snapshots[snapshot_id]

    async def drive(self) -> RunCompleted:
        """`_drive` inside the run's span (keel.run), under the trace context RunStarted keeps."""
        started = self.history.started
        parent = dict(started.trace_context) if started is not None else {}
        attributes: dict[str, str | int | bool] = {
            "keel.run_id": self.run_id,
            "keel.op_id": self.plan.op_id,
            "keel.resumed": self.events is None,
        }
        with tracing.span("keel.run", parent=parent or None, attributes=attributes) as span:
            completed = await self._drive()
            tracing.set_attribute(span, "keel.status", completed.status)
            if completed.error is not None:
                tracing.set_error(span, completed.error.code, completed.error.message)
            return completed

    async def _drive(self) -> RunCompleted:
        """Run to a terminal event, make it durable, and return it.

        Every ready step runs as its own task (one per attempt); they all decide their events
        through `record`, so the run keeps one writer: this driver's batches.
        """
        bind_log_fields(run_id=self.run_id)  # drive() runs as its own task: names the run in its lines
        self._drive_task = asyncio.current_task()
        self._turn_at = time.monotonic()  # a task's first step starts at a turn of the loop
        try:
            await self._resume_parked()
            while True:
                if self._flush_error is not None:
                    raise self._flush_error
                if self._refused is not None:
                    raise self._refused
                running = frozenset(self._steps)
                if await self._resolve_waits(running):
                    continue
                action = next_action(self.history, self.plan, self.manifest.run_config, running, now_us())
                match action:
                    case AlreadyTerminal():
                        await self._flush_between_steps()
                        if self.history.started is not None and self.history.started.parent_run_id:
                            self.env.failpoints.hit(AFTER_CHILD_RUN_ENDED)
                        if self._steps:  # settled (the terminal event says so): they end their flush
                            await asyncio.gather(*self._steps.values(), return_exceptions=True)
                        return action.terminal
                    case CompleteRun() if self._steps:
                        await self._stop_branches()  # a branch failed the run: the others stop first
                    case CompleteRun():
                        await self._complete(action)
                    case SettleWaits():
                        for waiting in action.waits:
                            await self._settle_due(waiting)
                    case ParkRun():
                        await self._park(action.due_at_us)
                    case RunSteps() if self._runs_inline(action):
                        await self._inline_step(action.steps[0])
                    case RunSteps():
                        for step in action.steps:
                            self._start_step(step)
                        await self._until_a_step_settles(action.wake_at_us)
        except BaseException as error:
            await self._stop_branches()
            if isinstance(error, asyncio.CancelledError):
                await self._cancel_flushes()  # a park stops an append in flight, as it always did
                await self._flush_when_parked()
            raise
        finally:
            if self._lingering is not None:
                self._lingering.cancel()
            if self._op_timer is not None:
                self._op_timer.cancel()
                self._op_timer = None
            if self._op_watch is not None:
                self._op_watch.cancel()
            for watcher in list(self._watchers):
                watcher.cancel()
            # The task's exception (RunParkedOut, say) holds these frames, and so this driver:
            # without this, task and driver would be a cycle left to the collector.
            self._drive_task = None

    def _runs_inline(self, action: RunSteps) -> bool:
        """Whether the attempt runs in the driver's own task: a lone local step, nothing else running
        or waiting and no due time, so that only its end can change what is decided next (a poke
        meanwhile has no wait to offer). A sequential pipeline's steps then cost no task, no wait and
        no wake-up each; a cancel of the driver (a park, a terminalize) reaches the op directly."""
        if len(action.steps) != 1 or self._steps or action.wake_at_us or self.history.waiting:
            return False
        step = action.steps[0]
        return not step.delay_ms and not step.adopt and not self.plan.step(step.step_id).task_queue

    async def _inline_step(self, action: RunStep) -> None:
        """Run the attempt in the driver's task, ending as a step task's end would end the driver.

        A stop of the driver ends it even when the op swallowed the cancel; an op that raised
        CancelledError of its own (nobody stopped the run) fails its attempt, retryably. Then the
        loop gets a turn once the driver has held it for INLINE_TURN since its last one, rather than
        after every step: what a turn lets in (a poke, a stop, other runs' work) waits at most about
        that long, and a pipeline of quick steps takes no extra turn of the loop per step.
        """
        driver = asyncio.current_task()
        assert driver is not None
        cancels = driver.cancelling()
        try:
            await self._traced_step(action)
        except asyncio.CancelledError:
            if driver in _STOPPED:
                raise
            self._cancelled_itself(action)
        if driver in _STOPPED:
            raise asyncio.CancelledError
        self._poked = False  # the loop decides again now, offering the waits first
        self._check_waits = True
        # A cancel that came during the step and is no stop (the op's own, left pending) is taken
        # here, at the turn, as the op's: it must not land in the next step's op.
        if driver.cancelling() > cancels or time.monotonic() - self._turn_at >= INLINE_TURN:
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                if driver in _STOPPED:
                    raise
                self._cancelled_itself(action)
            self._turn_at = time.monotonic()

    def _cancelled_itself(self, action: RunStep) -> None:
        """The attempt's op raised CancelledError with no stop behind it: the attempt fails
        (retryably), so the retry policy bounds how often it runs again. Only the attempt that ran,
        while it is open and not waiting; a remote step's is left open (its task may run on)."""
        step_id = action.step_id
        log.warning("run %s: step %s's op raised CancelledError of its own", self.run_id, step_id)
        open_ = self.history.open_attempts.get(step_id)
        if (
            open_ is not None
            and open_.attempt == action.attempt
            and step_id not in self.history.completed_steps
            and step_id not in self.history.waiting
            and not self.plan.step(step_id).task_queue
        ):
            self.record([StepAttemptFailed(step_id, action.attempt, op_cancelled(step_id))])

    def _start_step(self, action: RunStep) -> None:
        self._step_actions[action.step_id] = action
        self._steps[action.step_id] = asyncio.create_task(
            self._traced_step(action), name=f"run {self.run_id} step {action.step_id}"
        )

    async def _traced_step(self, action: RunStep) -> None:
        """`run_step` inside the attempt's span (keel.step), a child of the run's span."""
        attributes: dict[str, str | int | bool] = {
            "keel.run_id": self.run_id,
            "keel.step_id": action.step_id,
            "keel.attempt": action.attempt,
        }
        with tracing.span("keel.step", attributes=attributes) as span:
            await self.run_step(action)
            failure = self.history.last_failure.get(action.step_id)
            if failure is not None and failure.attempt == action.attempt:
                tracing.set_error(span, failure.error.code, failure.error.message)

    def poke(self) -> None:
        """Something may have ended a wait (engine_service.runtime.parking): decide again soon."""
        self._check_waits = True
        self.unapplied_wake = True
        self._poked = True
        if self._poke_waiter is not None and not self._poke_waiter.done():
            self._poke_waiter.set_result(None)

    async def _until_a_step_settles(self, wake_at_us: int = 0) -> None:
        """Wait until a running step ended, a wait falls due (`wake_at_us`) or the driver is poked;
        a step that raised (not an op's failure) stops the run."""
        if not self._steps and not wake_at_us:
            raise RuntimeError(f"run {self.run_id}: the decision left nothing to run or wait for")
        timeout = max(0.0, (wake_at_us - now_us()) / 1e6) if wake_at_us else None
        if not self._poked:  # a future, not a task: this wait is made once or more per step
            self._poke_waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait(
                    {*self._steps.values(), self._poke_waiter},
                    timeout=timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                self._poke_waiter.cancel()
                self._poke_waiter = None
        self._poked = False
        # A settled step may be what another step waits for (its children, say): ask again.
        self._check_waits = True
        for step_id, task in list(self._steps.items()):
            if task.done():
                del self._steps[step_id]
                action = self._step_actions.pop(step_id)
                if task.cancelled():  # the driver cancels its step tasks only once they are gone
                    self._cancelled_itself(action)
                elif (error := task.exception()) is not None:
                    raise error

    async def _stop_branches(self) -> None:
        """Cancel every running step and wait until each stopped (nothing of theirs is decided after)."""
        tasks = list(self._steps.values())
        self._steps.clear()
        self._step_actions.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _resume_parked(self) -> None:
        """A parked run taken up again: RunResumed (label active, due time cleared) is this driver's
        claim, appended at the head it read before anything else is written for the run.

        When the run waits only for signals and timers, whose resolvers write nothing (a signal's
        reads the run's inbox), the claim travels with the wait's outcome (the consumed signal, the
        completed step) instead of going alone first: one append fewer per wake-up. Nothing is done
        for the run meanwhile that another engine could see; an op runs only once the claim is
        durable (`run_step`), and the linger timer appends it should nothing else follow.
        """
        if self.history.parked is None:
            return
        pure = all(waiting.wait.kind in _PURE_WAITS for waiting in self.history.waiting.values())
        self.record([RunResumed("woken")], label=RUN_ACTIVE_LABEL, due_at_us=0, linger=pure)
        if not pure:
            await self.flush()  # the claim lands alone first (`_flush` notes it landed)

    async def _park(self, due_at_us: int) -> None:
        """Park the run: RunParked, its label and its due-time index entry in one append; then end.

        A poke that came since the waits were last offered to their resolvers (a task's outcome,
        say, whose engine called wake_run while this driver still lived) is not lost: before the
        append the driver decides again instead; during it, it resumes at once (RunResumed). A poke
        after that finds the driver ending: the registry wakes the run again (runtime.driving).
        """
        if self.poked_since_check:
            return
        self.record([RunParked(due_at_us)], label=RUN_PARKED_LABEL, due_at_us=due_at_us, linger=False)
        await self._flush_between_steps()
        self.env.failpoints.hit(AFTER_RUN_PARKED)
        if self.poked_since_check or await self._a_wait_is_over():
            # A wake-up came while it parked, or what ends a wait happened before the park landed
            # (its wake-up found the run still active): go on at once instead. Marked as poked
            # first: should this append fail (the lease lost), the run stays parked with its wait
            # over, and the driver's end applies the wake-up (runtime.driving).
            self._check_waits = self.unapplied_wake = True
            self.record([RunResumed("woken")], label=RUN_ACTIVE_LABEL, due_at_us=0, linger=False)
            await self._flush_between_steps()
            return
        if self.on_parked is not None:
            self.on_parked(self.run_id, due_at_us)
        raise RunParkedOut(self.run_id, due_at_us)

    def lease_in_doubt(self) -> bool:
        """Whether this engine can no longer vouch for the run's lease: lost, its trust ran out, or
        refused here once (the driver is stopping for that, though the lease may be trusted again)."""
        return self.lease is not None and (self._refused is not None or not self.lease.is_valid())

    @property
    def poked_since_check(self) -> bool:
        """A poke came after the waits were last offered to their resolvers."""
        return self._check_waits

    def _resolver(self, kind: str) -> WaitResolver | None:
        """What may end a wait of `kind` early: the engine's resolver for it, or, for a signal, this
        run's own (it decides from the history this driver holds: runtime.signal_waits)."""
        if kind == SIGNAL:
            return self.signal_waits.resolve
        return self.env.wait_resolvers.get(kind)

    async def _a_wait_is_over(self) -> bool:
        """Whether a resolver says one of the run's waits is over (asked, not recorded)."""
        for waiting in self.history.waiting.values():
            resolver = self._resolver(waiting.wait.kind)
            if resolver is not None and await resolver(self.run_id, waiting) is not None:
                return True
        return False

    async def _resolve_waits(self, running: frozenset[str]) -> bool:
        """Offer each waiting attempt to its kind's resolver (once, and again after a poke); True
        when one settled."""
        if not self._check_waits:
            return False
        self._check_waits = self.unapplied_wake = False
        settled = False
        for waiting in list(self.history.waiting.values()):
            resolver = self._resolver(waiting.wait.kind)
            if resolver is None or waiting.step_id in running:
                continue
            outcome = await resolver(self.run_id, waiting)
            if outcome is not None and self.history.waiting.get(waiting.step_id) == waiting:
                if waiting.wait.kind == CHILDREN:
                    self.env.failpoints.hit(AFTER_CHILD_COMPLETED)
                await self._settle_wait(waiting, outcome)
                settled = True
        return settled

    async def _settle_due(self, waiting: WaitingAttempt) -> None:
        """A wait's due time came. A remote task's is a re-check (its own deadlines end it): its
        resolver says whether it ended, else the attempt waits on, due for the next re-check. A
        signal's is its timeout: a signal in the inbox by then is still consumed (its wake-up may
        be on its way), else the attempt fails `signal_timeout`."""
        if waiting.wait.kind not in (TASK, SIGNAL):
            await self._settle_wait(waiting, due_outcome(waiting.wait))
            return
        resolver = self._resolver(waiting.wait.kind)
        outcome = None if resolver is None else await resolver(self.run_id, waiting)
        if outcome is not None and self.history.waiting.get(waiting.step_id) == waiting:
            await self._settle_wait(waiting, outcome)
            return
        if self.history.waiting.get(waiting.step_id) != waiting:
            return  # settled meanwhile (a poke's resolver)
        if waiting.wait.kind == SIGNAL:
            await self._settle_wait(waiting, due_outcome(waiting.wait))
            return
        again = replace(waiting.wait, until_us=now_us() + TASK_RECHECK_US)
        self.record([StepWaiting(waiting.step_id, waiting.attempt, again)])

    async def _settle_wait(self, waiting: WaitingAttempt, outcome: WaitOutcome) -> None:
        """Record how a waiting attempt ended: StepCompleted with the outcome's output, or failed
        (after the facts it brings that the run does not hold yet: a remote task's)."""
        facts = [fact for fact in outcome.facts if fact.fact_key not in self.history.facts]
        if facts:
            self.record(facts)
        worker = outcome.worker_id
        if outcome.error is not None:
            self.record(
                [StepAttemptFailed(waiting.step_id, waiting.attempt, outcome.error, worker_id=worker)]
            )
            await self._settled(waiting.step_id)
            return
        action = RunStep(waiting.step_id, waiting.attempt, waiting.base_snapshot_id)
        await self._complete_step(action, outcome.output, worker_id=worker)

    async def _flush_when_parked(self) -> None:
        """Keep what was decided before a park (drain or cancel): a short, bounded last flush."""
        if not self._pending or self._flush_error is not None or self._lock.locked():
            return
        try:
            await asyncio.wait_for(self.flush(), PARK_FLUSH_SECONDS)
        except (Exception, asyncio.CancelledError):  # best effort: resume reruns whatever is lost
            log.warning("run %s parked with %d decided event(s) not flushed", self.run_id, len(self._pending))

    async def begin(
        self,
        started: RunStarted,
        artifacts: Sequence[tuple[str, bytes]],
        attributes: Mapping[str, str],
        *,
        durable_now: bool,
        copied: Sequence[KernelEvent] = (),
    ) -> None:
        """Decide the run's RunStarted (its manifest and initial snapshot inline), the first event.

        `attributes` index the run stream (pipeline, lineage, labels): set by the same append;
        `copied`: events decided with it, in the same append (a rerun's reused steps).

        `durable_now`: append it before returning (a sequence conflict means the run exists);
        otherwise it travels in the driver's first batch, lingering like any decided event.
        """
        self._pending_attributes = dict(attributes)
        self.record([started, *copied], label=RUN_ACTIVE_LABEL, artifacts=artifacts, linger=not durable_now)
        if durable_now:
            await self.flush()

    def record(
        self,
        events: Sequence[KernelEvent],
        *,
        label: str | None = None,
        artifacts: Sequence[tuple[str, bytes]] = (),
        linger: bool = True,
        due_at_us: int | None = None,
    ) -> None:
        """Decide `events` (stamped with the time now): fold them in now, append them with the next flush.

        `label`: the run stream's status label the append sets; `linger`: start the linger timer
        (a caller that flushes at once needs none); `due_at_us`: the run stream's due time the
        append sets (0 clears it).
        """
        if due_at_us is not None:
            self._pending_due = due_at_us
        now = now_us()
        events = [stamped(event, now) for event in events]
        self._pending.extend(events)
        self._pending_artifacts.extend(artifacts)
        self._pending_label = label or self._pending_label
        if self.events is not None:
            base = self.history.head_seq
            self.events.extend(StoredEvent(base + i, event) for i, event in enumerate(events, 1))
        self.history = self.history.extend(events)
        if linger and self._lingering is None:
            # A timer, not the next event, bounds how long a decision stays invisible: an op may
            # run for hours after its StepAttemptStarted was decided.
            delay = self.checkpoint_linger or VISIBLE_WITHIN
            self._lingering = asyncio.get_running_loop().call_later(delay, self._linger_over)

    async def _complete(self, action: CompleteRun) -> None:
        """Decide RunCompleted (flushing first when `before_run_completed` is armed).

        Open attempts of other branches (stopped by now) are recorded as canceled in the same batch.
        """
        if self.env.failpoints.is_armed(BEFORE_RUN_COMPLETED):
            await self.flush()
            self.env.failpoints.hit(BEFORE_RUN_COMPLETED)
        why = action.cancel_error or branch_canceled(action.reason)
        canceled = [StepAttemptFailed(open_.step_id, open_.attempt, why) for open_ in action.cancel]
        terminal = RunCompleted(
            action.status, action.final_snapshot_id, action.reason, action.error, has_ledger=self.has_ledger
        )
        self.record([*canceled, terminal], label=run_label(action.status))

    async def _settled(self, step_id: str) -> None:
        """An attempt settled: without write-behind, append it now (with RunCompleted if that is next)."""
        if self.checkpoint_linger > 0:
            return
        others = frozenset(self._steps) - {step_id}
        follow = next_action(self.history, self.plan, self.manifest.run_config, others)
        if (
            isinstance(follow, CompleteRun)
            and not others
            and not follow.cancel
            and not self.env.failpoints.is_armed(BEFORE_RUN_COMPLETED)
        ):
            await self._complete(follow)
        await self.flush()

    def _pending_artifact_bytes(self) -> int:
        return sum(len(data) for _, data in self._pending_artifacts)

    def _linger_over(self) -> None:
        """The linger timer fired: what is pending goes out (a flush nobody awaits; a failure is
        raised by the driver at its next decision)."""
        self._lingering = None
        if self._pending or self._flush_error is not None:
            self._start_flush().add_done_callback(self._lingered_flush_done)

    def _lingered_flush_done(self, flushing: asyncio.Future[None]) -> None:
        if flushing.cancelled():
            return
        error = flushing.exception()
        if error is not None and self._flush_error is None and self._refused is None:
            self._flush_error = error

    async def flush(self) -> None:
        """Make every pending event durable (one append), retrying until the store takes it.

        A batch holding an I/O call's answer (FactRecorded) is appended even when the lease is no
        longer trusted: the append is a compare-and-swap at the head this driver wrote, so it lands
        only when nobody else appended to the run since; a conflict means someone did.

        The append runs on its own: a caller cancelled meanwhile (a branch stopped because another
        failed the run) leaves it to finish, so the run's one writer never loses track of its head.
        Only parking the whole driver cancels an append in flight (`_cancel_flushes`); the driver's
        own flushes between steps need no shield (`_flush_between_steps`).

        Callers wait together: one that finds an append not yet under way joins it (it takes what
        is pending when it starts), and one with nothing new to append waits for the appends in
        flight, not for the lock, which would wake its waiters one turn of the loop apart. So the
        concurrent I/O calls of one step (keel.fan_out's spawns) go on at the same time, and their
        links make one append.
        """
        if not self._pending and self._flush_error is None:
            for in_flight in list(self._flushes):
                await asyncio.shield(in_flight)
            return
        await asyncio.shield(self._start_flush())

    def flushing(self) -> asyncio.Future[None]:
        """`flush` as a future, for a caller that waits for it shielded and never cancels it: the
        append that takes what is pending itself (no task to wait for it), or, with nothing pending,
        a task waiting for the appends in flight."""
        if not self._pending and self._flush_error is None:
            waiting = asyncio.ensure_future(self.flush())
            waiting.add_done_callback(retrieved)  # its caller may have stopped waiting for it
            return waiting
        return self._start_flush()

    async def _flush_between_steps(self) -> None:
        """`flush` from the driver's own loop (the run's end, a park): with no step running and no
        other append under way, the append runs in the driver's task, a task and a shield less.

        There, any cancel of the driver's task ends the driver (`_drive`), which cancels its
        appends in flight however they run; a flush during a step stays shielded, so that a cancel
        the op caused is the op's and the append lands.
        """
        if not self._pending or self._flush_error is not None or self._flushes or self._steps:
            await self.flush()
            return
        here: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes.add(here)  # a flush meanwhile with nothing new to append waits for this one
        try:
            await run_telling(here, self._flush())  # a failure is kept as _flush_error too
        finally:
            self._flushes.discard(here)

    def _start_flush(self) -> asyncio.Future[None]:
        """The append that will take what is pending: the one not yet under way, else a new one."""
        gathering = self._gathering
        if gathering is None or gathering.done():  # done: cancelled before it took the lock
            gathering = self._gathering = asyncio.ensure_future(self._flush())
            self._flushes.add(gathering)
            gathering.add_done_callback(self._flushed)
        return gathering

    def _flushed(self, flushing: asyncio.Future[None]) -> None:
        self._flushes.discard(flushing)
        if self._gathering is flushing:
            self._gathering = None
        if not flushing.cancelled():
            flushing.exception()  # kept as _flush_error: the driver raises it at its next decision

    async def _cancel_flushes(self) -> None:
        flushes = list(self._flushes)
        for flushing in flushes:
            flushing.cancel()
        if flushes:
            await asyncio.gather(*flushes, return_exceptions=True)

    async def _flush(self) -> None:
        async with self._lock:
            self._gathering = None  # what is recorded from now on goes with the next append
            if self._flush_error is not None:
                raise self._flush_error
            if not self._pending:
                return
            answer = any(isinstance(event, FactRecorded) for event in self._pending)
            if not answer and self._refused is not None:
                raise self._refused
            # A claim (a resumed driver's first append) needs the lease, whatever travels with it.
            if self.lease is not None and (not answer or self._claim_first):
                await self.confirm_lease()
            elif self.lease_in_doubt():
                log.info(
                    "run %s: lease no longer trusted; recording the answer it holds if nobody wrote since",
                    self.run_id,
                )
            batch, artifacts, label = self._pending, self._pending_artifacts, self._pending_label
            attributes, due_at_us = self._pending_attributes, self._pending_due
            self._pending, self._pending_artifacts, self._pending_label = [], [], None
            self._pending_attributes, self._pending_due = {}, None
            patience = FOREVER
            if self.durable_seq == 0 and self._first_append_patience is not None:
                patience = self._first_append_patience  # nothing acknowledged yet: fail rather than hang
            terminal = self.history.is_terminal
            try:
                appended = await self.env.store.append(
                    self.stream_id,
                    [encode_event(event) for event in batch],
                    expected_seq=self.durable_seq if self.durable_seq else None,
                    status=label,
                    artifacts=artifacts,
                    patience=patience,
                    attributes=attributes or None,
                    due_at_us=due_at_us,
                    nudges=parent_nudge(self.history.started, now_us()) if terminal else None,
                    # Whether a child was linked before the run ended: its answer needs no read then.
                    report_heads=(children_stream_id(self.run_id),) if terminal else (),
                )
            except BaseException as error:
                # Nothing after a failed append may be appended: it would leave a gap in the run.
                self._flush_error = (
                    error if isinstance(error, Exception) else KeelError("driver_stopped", "parked")
                )
                raise
            self.durable_seq += len(batch)
            self._claim_first = False  # the run is this driver's: its first append landed
            if appended.first_seq == 1 and appended.recorded_at_us:
                self.created_at_us = appended.recorded_at_us
                if self.on_created is not None:
                    self.on_created(self.run_id, appended.recorded_at_us)
            if terminal and appended.reported_heads:
                self.children_head_at_end = appended.reported_heads[0]

    async def confirm_lease(self) -> None:
        """Raise `lease_lost` unless the run's lease is held and valid (the driver then stops for good).

        Once refused, always refused: a branch still running while the driver stops must start no
        new call, even should the lease be trusted again meanwhile (its record landed late, say).
        """
        assert self.lease is not None
        if self._refused is not None:
            raise self._refused
        try:
            await self.lease.confirm()
        except KeelError as error:
            # This engine lost the run: it never appends to it again, but for an answer it holds
            # (an I/O call of the op still in flight when a concurrent one was refused).
            self._refused = error
            raise

    async def run_step(self, action: RunStep) -> None:
        """One attempt of one step, recorded as completed or failed."""
        if action.delay_ms:
            # A failure is news worth an append: watchers see the step retrying during the backoff.
            await self.flush()
            await asyncio.sleep(action.delay_ms / 1000)
        step = self.plan.step(action.step_id)
        seen = await self._context_of(action)
        if not action.adopt:  # an adopted remote attempt is open already: its task decides it
            self.record([StepAttemptStarted(action.step_id, action.attempt, action.base_snapshot_id)])
        started_seq = self.history.head_seq  # the attempt's fencing value for transports
        if self._claim_first or self.env.failpoints.is_armed(AFTER_STEP_ATTEMPT_STARTED, action.step_id):
            await self.flush()  # every branch's op waits until the claim is durable
            self._claim_first = False
            self.env.failpoints.hit(AFTER_STEP_ATTEMPT_STARTED, action.step_id)
        if step.task_queue:
            await self._run_remote(action, step, seen, started_seq)
            return
        io = RunIo(self.facts, action.step_id, action.attempt, started_seq)
        signals = AttemptSignals(self.signal_waits, AttemptOf(action.step_id, action.attempt, started_seq))
        ctx = StepContext(self.run_id, action.step_id, action.attempt, self.manifest.input, seen, io, signals)
        definition = self.env.ops.get(step.op_id, step.op_version)
        try:
            output = await self._timed_op(definition, ctx, step)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if self._refused is not None and isinstance(error, KeelError) and error.code == "lease_lost":
                # Not the step's failure: this engine may no longer write to the run, and a failure
                # decided now could still be appended with an answer held meanwhile. The driver
                # stops; whoever holds the lease next resumes the attempt.
                raise
            if isinstance(error, KeelError) and error.code == "invalid_json":
                error = _not_json(step.op_id, error)
            await self._fail(action, error)
            return
        if isinstance(output, ParkStep):  # (a completed output is checked in _complete_step)
            try:
                # What is stored must go back out on the wire: StepWaiting holds the wait one level down.
                check_json(output.to_json(), "wait", within=1)
            except KeelError as refused:
                await self._fail(action, _wait_refused(step.op_id, refused))
                return
        self.env.failpoints.hit(AFTER_OP_RETURNED, action.step_id)
        if isinstance(output, ParkStep):
            # The attempt waits, holding no coroutine: the decision settles or parks it.
            self.record([StepWaiting(action.step_id, action.attempt, output)])
            await self._settled(action.step_id)
            return
        await self._complete_step(action, output)

    async def _timed_op(self, definition: OpDefinition, ctx: StepContext, step: StepSpec) -> Any:
        """Run the op; past the step's start-to-close timeout it is cancelled and fails `step_timeout`."""
        limit_ms = step.timeouts.start_to_close_ms
        if not limit_ms:
            return await self._call_op(definition, ctx, step.op_config)
        timer = asyncio.timeout(limit_ms / 1000)
        try:
            async with timer:
                return await self._call_op(definition, ctx, step.op_config)
        except TimeoutError:
            if not timer.expired():
                raise
            raise step_timeout(step.step_id, limit_ms) from None
        except asyncio.CancelledError:
            # The timeout's cancel, let through as CancelledError when an op's TaskGroup left the
            # task counted as cancelling (Python 3.11, 3.12): still the step's timeout, unless a stop.
            if timer.expired() and asyncio.current_task() not in _STOPPED:
                raise step_timeout(step.step_id, limit_ms) from None
            raise

    async def _run_remote(self, action: RunStep, step: StepSpec, seen: dict[str, Any], fencing: int) -> None:
        """A remote attempt: its task is created once the attempt is durable, and its outcome copied here."""
        await self.flush()  # a task exists only for an attempt whose StepAttemptStarted is durable
        outcome = await run_remote_attempt(self, action, step, seen, fencing)
        if isinstance(outcome, RemoteWaiting):
            # Still running: the attempt waits without a coroutine (the run may park); the engine
            # that ends the task wakes the run. While this driver lives, it watches the task too.
            wait = ParkStep(
                TASK,
                until_us=now_us() + TASK_RECHECK_US,  # a re-check, in case its wake-up was lost
                detail={"task": outcome.stream_id, "queue": step.task_queue},
            )
            self.record([StepWaiting(action.step_id, action.attempt, wait)])
            self._watch_task(outcome.stream_id, outcome.state)
            await self._settled(action.step_id)
            return
        if outcome.facts:
            self.record(outcome.facts)
        if outcome.error is not None:
            await self._fail(action, outcome.error, worker_id=outcome.worker_id)
        else:
            await self._complete_step(action, outcome.output, worker_id=outcome.worker_id)

    def _watch_task(self, stream_id: str, state: TaskState) -> None:
        watcher = asyncio.create_task(self._poke_on_outcome(stream_id, state), name=f"watch {stream_id}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _poke_on_outcome(self, stream_id: str, state: TaskState) -> None:
        try:
            await self.env.tasks.outcome(stream_id, state)
        except KeelError as error:  # the wake-up from whoever ends the task still comes
            log.info("run %s: watching task %s failed: %s", self.run_id, stream_id, error.message)
            return
        self.poke()

    async def _context_of(self, action: RunStep) -> dict[str, Any]:
        """What the attempt sees: the initial context plus its ancestors' outputs (from its base)."""
        assert self.history.started is not None
        initial = await self.snapshot(self.history.started.initial_snapshot_id)
        base = await self.snapshot(action.base_snapshot_id)
        return step_context(initial, base, self.plan.ancestors.get(action.step_id, frozenset()))

    async def _fail(
        self, action: RunStep, error: BaseException | ErrorRecord, *, worker_id: str = ""
    ) -> None:
        record = error if isinstance(error, ErrorRecord) else op_error_record(error)
        self.record([StepAttemptFailed(action.step_id, action.attempt, record, worker_id=worker_id)])
        await self._settled(action.step_id)

    async def _complete_step(self, action: RunStep, output: Any, *, worker_id: str = "") -> None:
        """Record StepCompleted with the checkpoint after it: the latest checkpoint plus its output.

        No await between reading the latest checkpoint and recording: a sibling completing in
        between would otherwise be left out of the checkpoint.
        """
        try:
            # What is stored must go back out on the wire, and the context holds the output one level
            # down and goes out as one value (an answer's final snapshot, a remote step's context):
            # the output must keep the JSON rule there, nesting one level less than a value may.
            check_json(output, "output", within=1)
        except KeelError as refused:
            await self._fail(action, self._output_refused(action, refused), worker_id=worker_id)
            return
        while True:
            latest_id = self.history.last_checkpoint
            latest = await self.snapshot(latest_id)
            if latest_id != self.history.last_checkpoint:
                continue  # a sibling completed while the checkpoint was read
            snapshot = with_step_output(latest, action.step_id, output)
            snapshot_bytes = canonical_json_bytes(snapshot)
            if len(snapshot_bytes) > MAX_SNAPSHOT_BYTES:
                error = io_error(
                    "snapshot_too_large",
                    f"the context after step {action.step_id!r} is {len(snapshot_bytes)} bytes of JSON; "
                    f"the limit is {MAX_SNAPSHOT_BYTES} (store large data elsewhere and keep a reference)",
                )
                await self._fail(action, error, worker_id=worker_id)
                return
            if (
                self._pending_artifact_bytes() + len(snapshot_bytes) <= MAX_BATCH_ARTIFACT_BYTES
                and len(self._pending_artifacts) < MAX_BATCH_ARTIFACTS
            ):
                break
            await self.flush()  # keep one batch within what one append may carry
        snapshot_id = artifact_id_for_bytes(snapshot_bytes)
        self._snapshots[snapshot_id] = snapshot
        self.record(
            [StepCompleted(action.step_id, action.attempt, snapshot_id, worker_id=worker_id)],
            artifacts=[(SNAPSHOT_ARTIFACT_KIND, snapshot_bytes)],
        )
        await self._settled(action.step_id)

    def _output_refused(self, action: RunStep, refused: KeelError) -> KeelError:
        """Why an output the context cannot hold fails its step: not JSON, or too deep for the context."""
        if not nests_too_deeply(refused):
            return _not_json(self.plan.step(action.step_id).op_id, refused)
        why = (
            f"step {action.step_id!r}'s output cannot be kept in the run's context, which holds it one "
            f"level down (an output nests at most {MAX_JSON_DEPTH - 1} levels): {refused.message}"
        )
        return io_error("op_output_invalid", why)

    async def _call_op(self, definition: OpDefinition, ctx: StepContext, op_config: Any) -> Any:
        """Run the op; a run terminalized elsewhere meanwhile (another engine) cancels it."""
        token = self._op_began()
        try:
            return await definition.function(
                ctx,
                json_copy(op_config),
                json_copy(self.manifest.input),  # both are JSON
            )
        finally:
            self._op_ended(token)

    # The whole run stops (every branch) when another engine ends it while an op runs, as when
    # Terminalize cancels it here. Only while an op has run for a moment does the driver watch the
    # stream, with one watch for all its ops; short ops cost a timer per run, not a task each.

    def _op_began(self) -> object:
        loop = asyncio.get_running_loop()
        token = object()
        self._ops_running[token] = loop.time()
        if self._op_timer is None and not self._watching_ops():
            self._op_timer = loop.call_later(self._op_watch_after, self._watch_long_ops)
        return token

    def _op_ended(self, token: object) -> None:
        del self._ops_running[token]
        if not self._ops_running and self._op_watch is not None:
            self._op_watch.cancel()
            self._op_watch = None

    def _watching_ops(self) -> bool:
        """Whether the watch is on. One that has ended (its subscription failed, say) does not
        count: the next op's timer starts another."""
        return self._op_watch is not None and not self._op_watch.done()

    def _watch_long_ops(self) -> None:
        """The op timer fired: watch the stream once the oldest op still running has run for the
        moment, or look again when it will have."""
        self._op_timer = None
        if not self._ops_running or self._drive_task is None or self._watching_ops():
            return
        loop = asyncio.get_running_loop()
        oldest = next(iter(self._ops_running.values()))  # in the order they began
        if loop.time() < oldest + self._op_watch_after:
            self._op_timer = loop.call_at(oldest + self._op_watch_after, self._watch_long_ops)
            return
        self._op_watch = loop.create_task(self._cancel_on_foreign_terminal(self._drive_task))

    async def _watch_once(self, driver_task: asyncio.Task[Any], after_seq: int) -> int:
        """Watch the run's stream after `after_seq`: the first event's seq, or 0 once a foreign
        RunCompleted cancelled the op (or the subscription ended)."""
        subscription = self.env.store.subscribe(self.stream_id, after_seq=after_seq)
        async with contextlib.aclosing(subscription):
            async for event in subscription:
                # This driver appends no RunCompleted while its op runs: this one is someone else's.
                if event.type == RUN_COMPLETED:
                    log.info("run %s was terminalized elsewhere: cancelling its running op", self.run_id)
                    stop_driving(driver_task)
                    return 0
                return event.seq
        return 0

    async def _cancel_on_foreign_terminal(self, driver_task: asyncio.Task[Any]) -> None:
        pause = self.checkpoint_linger or VISIBLE_WITHIN
        seen = 0
        try:
            # An op that records answers appends again and again: each append is fenced by the
            # stream's sequence (a foreign end stops the op there), so the watch pauses at the
            # first event it sees rather than stream every fact back, and looks again after the
            # pause, from past what it saw and what this driver wrote.
            while True:
                seen = await self._watch_once(driver_task, max(seen, self.durable_seq))
                if seen == 0:
                    return
                await asyncio.sleep(pause)
        except KeelError as error:  # best effort: the op's next append is fenced off anyway
            log.debug("run %s: watching for a foreign terminal event failed: %s", self.run_id, error.message)
