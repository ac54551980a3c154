"""The kernel: starts and resumes runs, and wires the engine's parts together.

The engine holds no state of its own beyond the driver tasks it is running (its RunRegistry):
every decision comes from the run's stream in the event log. Each part depends only on those
below it: the registry and reader at the bottom, then leases, drivers (runtime.driving), awaits
(runtime.awaiting), Terminalize, child runs (which reach the kernel through the narrow RunKernel
Protocol), recovery and views.

Starting a run has one path to its first append: a driver decides RunStarted (manifest and initial
snapshot inline), and either appends it at once (StartRun returns once it is durable; a client's
retried start meets `sequence_conflict` and finds its run) or, when the client waits and the
engine chose the run id, lets it travel in the driver's first batch with the steps after it.

Several engines may share a store: a run is driven only by the engine holding its lease
(engine_service.runtime.leases). A new run's lease is implicit in its RunStarted (written only if
the run lives longer than ttl/3); resuming one (an await, a retried start, recovery) takes the
lease first and only then reads the history, except a run this engine parked, whose history is
read first and whose lease is then taken from what the engine remembers (`Leases.take_known`:
held again, or taken with "the lease stream must be new", so no former holder's write can have
been missed). Every engine scans for active runs whose holder
stopped or whose heartbeat expired (engine_service.runtime.recovery) and takes them over; a
drained engine hands its runs over at once after parking them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from engine_service.domain import (
    BuildProvenance,
    Plan,
    RunCompleted,
    RunHistory,
    RunManifest,
    StoredEvent,
    artifact_id_for_bytes,
    next_action,
    resolve_plan,
)
from engine_service.domain.child_runs import AWAIT_NAMESPACE, CHILDREN, SPAWN_NAMESPACE
from engine_service.domain.manifest import RunStart, run_start
from engine_service.domain.signals import Signal
from engine_service.domain.streams import RUN_PARKED_LABEL, run_status_of_label, run_stream_id
from engine_service.domain.tasks import DEFAULT_TASK_HEARTBEAT_MS
from engine_service.domain.transports import TransportRegistry
from engine_service.domain.waits import TASK
from engine_service.failpoints import AFTER_SIGNAL_SENT
from engine_service.runtime.awaiting import RunAwaits, until_done
from engine_service.runtime.children import ChildRuns, ChildRunTransport
from engine_service.runtime.driver import RunDriver, RunParkedOut, stop_driving
from engine_service.runtime.driving import Drivers
from engine_service.runtime.environment import RunEnvironment, Signals
from engine_service.runtime.leases import Lease, Leases
from engine_service.runtime.parking import Waker
from engine_service.runtime.reader import RunReader
from engine_service.runtime.recovery import Recovery
from engine_service.runtime.registry import KeyedLocks, RunRegistry
from engine_service.runtime.remote_steps import task_wait_resolver
from engine_service.runtime.rerun import Reruns
from engine_service.runtime.retention import Retention
from engine_service.runtime.signals import SentSignal, SignalInbox, SignalWakeups
from engine_service.runtime.task_service import TaskService
from engine_service.runtime.task_waker import TaskWaker
from engine_service.runtime.terminalize import Terminalizer
from engine_service.runtime.views import RunViews
from keel_core import tracing
from keel_core.clock import now_us
from keel_core.errors import ErrorCategory, KeelError, not_found
from keel_core.ids import new_run_id
from keel_core.recent import Recent

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 10.0
# How long a wake-up is tried again while the store does not answer (then the run's re-check finds it).
WAKE_PATIENCE = 60.0


def default_engine_id() -> str:
    """hostname-pid-random: unique per engine process."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def build_provenance() -> BuildProvenance:
    """This engine build: Keel's version, Python's, and a hash of the installed distributions."""
    try:
        keel_version = importlib.metadata.version("keel")
    except importlib.metadata.PackageNotFoundError:
        keel_version = "unknown"
    names = sorted(
        f"{dist.metadata['Name']}=={dist.version}".lower()
        for dist in importlib.metadata.distributions()
        if dist.metadata["Name"]
    )
    dependency_hash = artifact_id_for_bytes("\n".join(sorted(set(names))).encode())
    python = ".".join(str(part) for part in sys.version_info[:3])
    return BuildProvenance(keel_version, python, dependency_hash)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


@dataclass(frozen=True)
class StartOutcome:
    """What StartRun did."""

    run_id: str
    manifest_id: str
    created: bool
    # This call's driver ended the run (it waited, the run is terminal and its events are held).
    ended_here: bool = False


class Engine:
    """Runs on top of an event log, through RunDrivers."""

    def __init__(
        self,
        env: RunEnvironment,
        build: BuildProvenance,
        *,
        checkpoint_linger: float = 0.2,
        engine_id: str | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        task_heartbeat_timeout: float = DEFAULT_TASK_HEARTBEAT_MS / 1000,
        on_takeover: Callable[[], None] | None = None,
    ) -> None:
        self.registry = RunRegistry()
        if env.signals is None:
            env.signals = Signals(SignalInbox(env.store), SignalWakeups(env.store))
        self.signals = env.signals
        # Signals sent through any engine poke this engine's drivers of their runs.
        self.signals.wakeups.on_woken = self._poke_driven
        self.reader = RunReader(env.store)
        self.terminalizer = Terminalizer(env.store, self.registry, self.reader)
        self.env = env
        self.build = build
        self.checkpoint_linger = checkpoint_linger
        self.engine_id = engine_id or default_engine_id()
        self.leases = Leases(
            env.store,
            self.engine_id,
            lease_ttl,
            on_lost=self.registry.cancel_driver,  # parks: its flush finds the lease gone, appends nothing
            on_takeover=on_takeover,
        )
        self.runs = Drivers(env, self.registry, self.reader, self.leases, checkpoint_linger=checkpoint_linger)
        # One per engine: wakes parked runs when due (engine_service.runtime.parking).
        self.waker = Waker(env.store, self.wake_run, self.leases.others.seen_live_for)
        self.runs.on_parked = lambda _run_id, due_at_us: self.waker.nudge(due_at_us)
        self.runs.on_poked_after_park = self.wake_soon
        # A child run that ended wakes its parent (a keel.fan_out step parked on its children).
        self.runs.on_terminal = self._wake_parent
        self.terminalizer.on_terminal = self._wake_parent
        self.runs.on_timed_out = self._close_children_of
        self._closings: set[asyncio.Task[None]] = set()
        self.awaits = RunAwaits(env.store, self.registry, self.reader, self.leases, self.resume_run)
        self.children = ChildRuns(
            env.store,
            env.failpoints,
            self.registry,
            self.reader,
            self.terminalizer,
            kernel=self,
            awaits=self.awaits,
        )
        # keel.fan_out parks on its children: this tells when they all ended (and how).
        env.wait_resolvers.setdefault(CHILDREN, self.children.children_wait_outcome)
        own = TransportRegistry()
        transport = ChildRunTransport(self.children)
        own.register(SPAWN_NAMESPACE, transport)
        own.register(AWAIT_NAMESPACE, transport)
        # The child namespaces are this engine's: the registry is copied, never the shared default.
        env.transports = env.transports.merged(own)
        # Remote steps: the board the drivers schedule tasks on, and WorkerService's side of it.
        self.tasks = TaskService(
            env.tasks,
            patience=env.store.patience,
            default_heartbeat_ms=round(task_heartbeat_timeout * 1000),
        )
        self.terminalizer.tasks = env.tasks
        # Remote attempts that wait parked: their resolver, their deadlines, and their wake-ups.
        env.wait_resolvers[TASK] = task_wait_resolver(env.tasks)
        self.task_waker = TaskWaker(env.tasks, self.wake_run)
        self.tasks.on_ended = self.wake_soon
        self._wakes: set[asyncio.Future[None]] = set()
        self.recovery = Recovery(env.store, self.leases, self.registry, self._resume_scanned)
        self.views = RunViews(env.store, self.reader)
        self.reruns = Reruns(env.store, self.reader, self)
        self.retention = Retention(env.store, self.reader, env.failpoints)
        # Runs found to hold a corrupt event (it never goes away): scans stop taking their lease.
        self._unreadable_runs: Recent[str, KeelError] = Recent(1000)
        # One resumption of a run at a time here, and one start of a run id at a time.
        self._resuming = KeyedLocks()
        self._starts = KeyedLocks()

    @property
    def drivers(self) -> dict[str, asyncio.Task[RunCompleted]]:
        """Run id -> the task driving it here (at most one per run)."""
        return self.registry.drivers

    def plan_for(self, manifest: RunManifest) -> Plan:
        """The manifest's pipeline resolved against this engine's ops (`invalid_plan` if it cannot be)."""
        return resolve_plan(manifest.pipeline, self.env.ops)

    async def start_run(
        self,
        manifest: RunManifest,
        run_id: str | None,
        *,
        wait: bool = False,
        wait_seconds: float | None = None,
        parent: tuple[str, str] | None = None,
        manifest_stored: bool = False,
        labels: Mapping[str, str] | None = None,
        signals: Sequence[Signal] = (),
        trace_context: Mapping[str, str] | None = None,
    ) -> StartOutcome:
        """Record RunStarted (manifest and initial snapshot inline) and drive the run.

        Without `wait` (or with a client-chosen run id, whose start must be checked against the
        store first) RunStarted is durable before this returns. With `wait` and a fresh id, the
        run executes at once and RunStarted travels in the driver's first batch: nothing was
        acknowledged before it, so nothing is lost if the engine dies first. `manifest_stored`:
        the manifest artifact is in the store already (a child's, stored with its link). `labels`
        (checked by the caller) are kept in RunStarted and indexed with the same append. `signals`
        (checked by the caller) are in the run's inbox before it starts; a run that exists with
        this manifest gets those it does not hold yet.
        """
        plan = self.plan_for(manifest)
        await self._check_replayed_run_exists(manifest)
        start = run_start(
            manifest,
            parent=parent,
            manifest_stored=manifest_stored,
            at_us=now_us(),
            labels=labels,
            # The span starting it (an RPC's, or the step spawning a child), else the caller's context.
            trace_context=tracing.current_carrier() or trace_context,
        )
        chosen = run_id or new_run_id()
        if signals:
            await self._send_start_signals(chosen, start.manifest_id, signals, chosen_here=run_id is None)
        deferred = wait and run_id is None and self.checkpoint_linger > 0
        # One start of a run id at a time here: a client's retried (or hedged) start must not win
        # the append while the lease it would drive under is another start's.
        async with self._starts.hold(chosen):
            begun = await self._begin(
                chosen, manifest, plan, start, deferred=deferred, retry=run_id is not None
            )
            if begun is None:
                existing = await self._existing_start(chosen, start.manifest_id)
                # A client retrying its start after a crash expects the run to go on: drive it if
                # nobody here does (another engine driving it too is fenced off by the sequence).
                await self.resume_run(chosen)
        if begun is None:
            if wait:
                await self.await_run(chosen, wait_seconds)
            return existing
        driver, task = begun
        if wait:
            deadline = None if wait_seconds is None else time.monotonic() + wait_seconds
            await until_done(task, wait_seconds)
            if task.done() and not task.cancelled() and isinstance(task.exception(), RunParkedOut):
                await self.await_run(chosen, _left(deadline))  # parked: its wake-up ends it
        if deferred:
            await self._ensure_started(driver, task)
        ended = wait and task.done() and not task.cancelled() and task.exception() is None
        return StartOutcome(chosen, start.manifest_id, True, ended_here=ended)

    async def start_prepared(self, run_id: str, manifest: RunManifest, plan: Plan, start: RunStart) -> bool:
        """Append a first batch decided elsewhere (a rerun's) and drive the run; False if the run exists."""
        async with self._starts.hold(run_id):
            begun = await self._begin(run_id, manifest, plan, start, deferred=False, retry=True)
        return begun is not None

    async def _send_start_signals(
        self, run_id: str, manifest_id: str, signals: Sequence[Signal], *, chosen_here: bool
    ) -> None:
        """StartRun's signals into the run's inbox; a run that exists must have this manifest first."""
        existed = False
        if not chosen_here:
            head, _ = await self.env.store.head(run_stream_id(run_id))
            if head:
                await self._existing_start(run_id, manifest_id)  # run_already_exists: nothing sent
                existed = True
        sent = await self.signals.inbox.send(run_id, signals, run_exists=False)
        if existed and any(one.created for one in sent):
            self.wake_soon(run_id)  # it may be parked on one of them (a new run reads its inbox)

    async def signal_run(self, run_id: str, signal: Signal) -> SentSignal:
        """Put `signal` in the run's inbox (once per signal id) and wake the run: its driver here is
        poked, a parked run is taken up, a run held elsewhere is nudged due (`wake_soon`). A repeat
        wakes nothing: the first one did (and its inbox append made a parked run due, durably)."""
        sent = (await self.signals.inbox.send(run_id, [signal]))[0]
        self.env.failpoints.hit(AFTER_SIGNAL_SENT)
        if sent.created:
            self.wake_soon(run_id, seen_live=True)  # the inbox found it existing, not ended
        return sent

    def _poke_driven(self, run_id: str | None) -> None:
        """A signal was sent to `run_id` (None: to any run): poke its driver here, if it has one, so
        that its signal waits ask their resolver again. A run driven elsewhere is poked there."""
        pokes = list(self.registry.pokes.values()) if run_id is None else []
        if run_id is not None and run_id in self.registry.pokes:
            pokes.append(self.registry.pokes[run_id])
        for poke in pokes:
            poke()

    async def _check_replayed_run_exists(self, manifest: RunManifest) -> None:
        replayed = manifest.run_config.replay_of_run_id
        if replayed:
            head, _ = await self.env.store.head(run_stream_id(replayed))
            if head == 0:
                raise not_found("run_not_found", f"run_config.replay_of_run_id {replayed} does not exist")

    async def _begin(
        self, run_id: str, manifest: RunManifest, plan: Plan, start: RunStart, *, deferred: bool, retry: bool
    ) -> tuple[RunDriver, asyncio.Task[RunCompleted]] | None:
        """The new run's driver, RunStarted decided (durable unless `deferred`), driving it.

        None when the run exists already (its start is being retried: `retry`). The run's
        resumption lock is held from before RunStarted is sent until its driver is registered: an
        AwaitRun (or a scan) finding the run in between would otherwise take the start's lease as
        its own and drive the run a second time here.
        """
        async with self._resuming.hold(run_id):
            return await self._begin_driving(run_id, manifest, plan, start, deferred=deferred, retry=retry)

    async def _begin_driving(
        self, run_id: str, manifest: RunManifest, plan: Plan, start: RunStart, *, deferred: bool, retry: bool
    ) -> tuple[RunDriver, asyncio.Task[RunCompleted]] | None:
        # Implicit until the run outlives ttl/3: no write now. Not when this engine holds the run
        # already (a retried start of a run it drives): that lease is the driver's.
        fresh = run_id not in self.leases.held
        lease = self.leases.start_new(run_id) if fresh else None
        driver = self.runs.new(run_id, manifest, plan, RunHistory(), lease=lease, events=())
        driver.remember_snapshot(start.snapshot_id, dict(manifest.initial_context))
        self.reader.start_linking(run_id)
        try:
            await driver.begin(
                start.started,
                start.artifacts,
                start.attributes,
                durable_now=not deferred,
                copied=start.copied,
            )
        except BaseException as error:
            if fresh:
                self.leases.discard(run_id)
            if not isinstance(error, KeelError) or error.code != "sequence_conflict" or not retry:
                raise
            return None
        assert lease is not None  # the run is new: this start took its lease
        self.leases.forget_known(run_id)  # what is known of an earlier run of the id, if any
        self.reader.remember_manifest(start.manifest_id, manifest)
        return driver, self.runs.spawn(driver)

    async def _ensure_started(self, driver: RunDriver, task: asyncio.Task[RunCompleted]) -> None:
        """After a deferred start's wait: the run exists before it is named, or the caller learns why."""
        if task.done() and not task.cancelled() and driver.durable_seq == 0:
            error = task.exception()
            if error is not None:
                raise error  # never recorded: the caller learns why (store_unavailable, ...)
        if not task.done():
            await driver.flush()  # out of time: the run must exist before it is named

    async def _existing_start(self, run_id: str, manifest_id: str) -> StartOutcome:
        existing = await self.reader.started_manifest_id(run_id)
        if existing != manifest_id:
            existing = existing or "?"
            raise KeelError(
                "run_already_exists",
                f"run {run_id} already exists with a different manifest ({existing}, not {manifest_id}); "
                "use a new run id",
                category=ErrorCategory.ALREADY_EXISTS,
                details={"run_id": run_id, "manifest_id": existing},
            )
        return StartOutcome(run_id, manifest_id, False)

    def wake_soon(self, run_id: str, *, seen_live: bool = False) -> None:
        """Apply a wake-up in the background, surely (`_wake_surely`). `seen_live`: the caller has
        just seen the run exist and not ended (its head need not be read again)."""
        if self.registry.closing:
            return
        poke = self.registry.pokes.get(run_id)
        if poke is not None:  # driven here: what `wake_run` would do first, now and without a task
            poke()
            return
        waking = asyncio.ensure_future(self._wake_surely(run_id, seen_live))
        self._wakes.add(waking)
        waking.add_done_callback(self._wakes.discard)

    async def _wake_surely(self, run_id: str, seen_live: bool = False) -> None:
        """Apply a wake-up here, or make the run due now in the store's index for whichever engine's
        Waker may take it (another engine holds it). A store that does not answer is tried again,
        with backoff, for WAKE_PATIENCE: a wake-up dropped here would leave a parked run waiting for
        its re-check (RECHECK_AFTER_US) although what it waits for is over."""
        delay = 0.05
        deadline = asyncio.get_running_loop().time() + WAKE_PATIENCE
        while not self.registry.closing:
            try:
                if not await self.wake_run(run_id, seen_live=seen_live):
                    # Held elsewhere (or ended): a parked run becomes due now; anything else is left alone.
                    await self.env.store.nudge_due(run_stream_id(run_id), now_us())
                return
            except KeelError as error:
                if error.category not in (ErrorCategory.UNAVAILABLE, ErrorCategory.DEADLINE_EXCEEDED):
                    log.info("run %s not woken: %s", run_id, error.message)  # it will not go away
                    return
                if asyncio.get_running_loop().time() + delay > deadline:
                    log.warning("run %s not woken: %s (its re-check will find it)", run_id, error.message)
                    return
                log.info("run %s not woken yet: %s (trying again)", run_id, error.message)
            seen_live = False  # seen before the first try only: the run may have ended since
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _close_children_of(self, run_id: str) -> None:
        """A run timed out: cancel its children whose policy is `cancel`, as a cancel would."""
        task = asyncio.create_task(
            self.terminalizer.close_children(run_id), name=f"close children of {run_id}"
        )
        self._closings.add(task)
        task.add_done_callback(self._closed_children)

    def _closed_children(self, task: asyncio.Task[None]) -> None:
        self._closings.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.warning("closing the children of a run that timed out failed: %s", error)

    async def wake_run(self, run_id: str, *, seen_live: bool = False) -> bool:
        """Apply a wake-up to a run: its due time came, or something may have ended one of its waits.

        A run driven here has its driver poked (it offers its waits to their resolvers again); a
        parked one is taken up (its lease, then a driver whose first append, RunResumed, is a
        compare-and-swap at the head it read: however many engines and callers try, it is applied
        once). False when another engine holds the run (it applies the wake-up) or it is terminal.
        Safe to call any number of times, from anywhere in the engine. `seen_live`: the caller has
        just seen the run exist and not ended, so the head of a run parked here is not read first
        (its history, read before its lease is taken, says whether it ended since).
        """
        poke = self.registry.pokes.get(run_id)
        if poke is not None:
            poke()
            return True
        async with self._resuming.hold(run_id):
            return await self._resume_run(run_id, None, wake=True, seen_live=seen_live)

    def _wake_parent(self, parent_run_id: str) -> None:
        """A child of `parent_run_id` ended: wake the parent (here, or through the store's index)."""
        if parent_run_id:
            self.wake_soon(parent_run_id)

    async def resume_run(self, run_id: str, *, created_at_us: int | None = None) -> bool:
        """Drive a run nobody drives; False when it is terminal, parked, driven here, or leased by
        another engine (a parked run is taken up by `wake_run` only).

        The lease comes first, then the history (read after it, so no write of a former holder is
        missed); the driver's first append claims the run stream at that history's head. A run this
        engine parked is the exception: its history comes first and names the run, then its lease
        is taken from what the engine remembers (`Leases.take_known`), which no other engine can
        have held meanwhile; a Terminalize in between fails the claim's compare-and-swap. One
        resumption of a run at a time here: a second one (a scan and an await at once) would find
        the lease "ours" and write it again, fencing off the first one's driver mid-op.
        """
        async with self._resuming.hold(run_id):
            return await self._resume_run(run_id, created_at_us)

    async def _resume_scanned(self, run_id: str, created_at_us: int | None) -> bool:
        return await self.resume_run(run_id, created_at_us=created_at_us)

    async def _resume_run(
        self, run_id: str, created_at_us: int | None, *, wake: bool = False, seen_live: bool = False
    ) -> bool:
        if self.registry.busy(run_id):
            return False
        known_start = self.leases.known_start(run_id)
        if not seen_live or known_start is None:
            # No lease for a run that does not exist or has ended (a cheap look before writing one;
            # a run parked here has its history read before any lease is written).
            head, label = await self.env.store.head(run_stream_id(run_id))
            if head == 0:
                raise not_found("run_not_found", f"run {run_id} does not exist", run_id=run_id)
            if run_status_of_label(label) is not None or (label == RUN_PARKED_LABEL and not wake):
                return False
        unreadable = self._unreadable_runs.get(run_id)
        if unreadable is not None:
            raise unreadable
        if known_start is not None:
            # A run parked here: its history first, then, when it is the same run (its id was not
            # deleted and started again since), its lease from what this engine knows, unread.
            history, has_ledger = await self._history_and_ledger(run_id)
            if history.is_terminal:
                self.leases.forget_known(run_id)
                return False
            if history.started is not None and history.started.at_us == known_start:
                lease = await self.leases.take_known(run_id)
                if lease is not None:
                    return await self._resume_leased(run_id, history, lease, has_ledger)
            self.leases.forget_known(run_id)
        lease = await self.leases.acquire(run_id, created_at_us, lambda: self.reader.created_at_us(run_id))
        if lease is None:
            return False
        try:
            history, has_ledger = await self._history_and_ledger(run_id)
        except BaseException:
            if run_id not in self.registry.drivers:
                self.leases.drop(run_id)
            raise
        return await self._resume_leased(run_id, history, lease, has_ledger)

    async def _history_and_ledger(self, run_id: str) -> tuple[RunHistory, bool]:
        """The run's history, and whether it has a failure ledger (read side by side: only a resumed
        run can have one, when a diverged Terminalize left it undriven)."""
        (_, history), has_ledger = await asyncio.gather(
            self._history_to_resume(run_id), self.reader.has_ledger(run_id)
        )
        return history, has_ledger

    async def _resume_leased(self, run_id: str, history: RunHistory, lease: Lease, has_ledger: bool) -> bool:
        """Drive the run whose lease this engine took, from `history`; its lease dropped if not."""
        resumed = False
        try:
            if await self.children.closed_with_parent(run_id, history):
                return False
            resumed = await self._resume_from(run_id, history, lease, has_ledger)
        finally:
            if not resumed and run_id not in self.registry.drivers:
                self.leases.drop(run_id)
        return resumed

    async def _history_to_resume(self, run_id: str) -> tuple[list[StoredEvent], RunHistory]:
        try:
            return await self.reader.read_history(run_id)
        except KeelError as error:
            if error.code == "corrupt_event":
                log.error("run %s cannot be resumed: %s", run_id, error.message)
                self._unreadable_runs.put(run_id, error)
            raise

    async def _resume_from(self, run_id: str, history: RunHistory, lease: Lease, has_ledger: bool) -> bool:
        if history.is_terminal or history.started is None:
            return False
        manifest = await self.reader.manifest(history.started.manifest_id)
        plan = self.plan_for(manifest)
        next_action(history, plan, manifest.run_config)  # rule 3: refuse a run whose op id changed
        if self.registry.busy(run_id):
            return False
        # A former holder's late write is fenced off by this claim (an append at the head read).
        self.runs.spawn(
            self.runs.new(run_id, manifest, plan, history, lease=lease, claim=True, has_ledger=has_ledger)
        )
        return True

    async def recover(self) -> int:
        """Resume every active run nobody holds (and start waking parked runs when due); returns
        how many this engine took on."""
        self.waker.start()
        self.task_waker.start()
        return await self.recovery.recover()

    async def await_run(self, run_id: str, wait_seconds: float | None) -> bool:
        """Wait until the run is terminal (True) or `wait_seconds` pass (False) (runtime.awaiting)."""
        return await self.awaits.await_run(run_id, wait_seconds)

    async def stop_driver(self, run_id: str) -> None:
        """Cancel this engine's driver of the run (its op is cancelled) and wait until it stopped."""
        await self.registry.stop_driver(run_id)

    async def stop(self) -> None:
        """Park every run this engine drives: cancel the drivers; the runs resume on the next start."""
        self.registry.closing = True
        for waking in list(self._wakes):
            waking.cancel()
        await self.waker.stop()
        await self.task_waker.stop()
        self.leases.begin_closing()  # no lease is taken now; close() releases the implicit ones held here
        while self.registry.drivers:
            tasks = list(self.registry.drivers.values())
            for task in tasks:
                stop_driving(task)
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            # A task that finished while another was awaited has its done callback (which takes it
            # out of `drivers`) still queued: awaiting it again would not yield, and this would spin.
            await asyncio.sleep(0)
            # A child start shielded from its parent's cancel may still add a driver: park it too.
            await self.registry.settle_all_spawns()
        await self.signals.wakeups.close()
        await self.leases.close()
        await self.tasks.close()
