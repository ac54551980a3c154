"""The engine: starts, resumes, watches and lists runs; one driver task per run it drives.

The engine holds no state of its own beyond the driver tasks it is running: every decision comes
from the run's stream in the store. `Engine.drivers` is the per-run task registry (at most one
task per run, children included) that Terminalize and child runs use: cancelling a run's task
cancels its running op and parks the run (nothing is appended); Terminalize then appends.

Several engines may share a store: a run is driven only by the engine holding its lease
(engine_service.leases). A new run's lease is implicit in its RunStarted (written only if the run
lives longer than ttl/3); resuming one (an await, a retried start, recovery) takes the lease first
and only then reads the history. Every engine scans for active runs whose holder stopped or whose
heartbeat expired (`scan_forever`) and takes them over; a drained engine hands its runs over at
once after parking them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import logging
import os
import random
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from engine_service.child_runs import ChildRuns, ChildRunTransport
from engine_service.domain import (
    CANCELED,
    COMPLETED,
    FAILED,
    BuildProvenance,
    Plan,
    RunCompleted,
    RunHistory,
    RunManifest,
    RunStarted,
    StoredEvent,
    corrupt_event_error,
    decode_event,
    encode_event,
    fold,
    next_action,
    resolve_plan,
)
from engine_service.domain.canonical import artifact_id_for_bytes, canonical_json_bytes, parse_json_bytes
from engine_service.domain.child_runs import AWAIT_NAMESPACE, SPAWN_NAMESPACE
from engine_service.domain.context import SNAPSHOT_ARTIFACT_KIND
from engine_service.domain.manifest import MANIFEST_ARTIFACT_KIND
from engine_service.domain.transports import TransportRegistry
from engine_service.leases import Lease, Leases
from engine_service.run_driver import RunDriver, RunEnvironment, now_us, run_stream_id
from engine_service.run_view import PENDING, RUNNING, ChildView, LedgerView, RunView, build_run_view
from engine_service.store_client import StreamEvent, StreamSummary
from engine_service.terminalization import TerminalizeResult, ledger_stream_id, read_ledger, terminalize
from keel_core.errors import ErrorCategory, KeelError, not_found

log = logging.getLogger(__name__)
V = TypeVar("V")

RUN_STREAM_PREFIX = "run:"
DEFAULT_LEASE_TTL = 10.0
# How many runs one scan tries to take over at once.
SCAN_CONCURRENCY = 16


def default_engine_id() -> str:
    """hostname-pid-random: unique per engine process."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


# A driver stopping with these is a routine hand-over (logged at INFO), by what happened.
_HANDED_OVER = {
    "lease_lost": "this engine may no longer write to it (its lease was lost or not trusted)",
    "sequence_conflict": "another engine appended to the run first (it took the run over)",
}
_STATUS_OF_LABEL = {"completed": COMPLETED, "failed": FAILED, "canceled": CANCELED}


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


class RecentArtifacts(Generic[V]):
    """A small LRU of decoded content-addressed artifacts (an id always names the same content)."""

    def __init__(self, capacity: int) -> None:
        self._items: collections.OrderedDict[str, V] = collections.OrderedDict()
        self._capacity = capacity

    def get(self, artifact_id: str) -> V | None:
        """The item, if held."""
        item = self._items.get(artifact_id)
        if item is not None:
            self._items.move_to_end(artifact_id)
        return item

    def put(self, artifact_id: str, item: V) -> None:
        """Hold the item, dropping the least recently used beyond capacity."""
        self._items[artifact_id] = item
        self._items.move_to_end(artifact_id)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)


class KeyedLocks:
    """An asyncio.Lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold the lock of `key` for the block."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass(frozen=True)
class StartOutcome:
    """What StartRun did."""

    run_id: str
    manifest_id: str
    created: bool


def stored_events(raw: Sequence[StreamEvent]) -> list[StoredEvent]:
    """Store events decoded into kernel events."""
    return [StoredEvent(e.seq, decode_event(e.type, e.payload), e.recorded_at) for e in raw]


class Engine:
    """Runs on top of a store, through RunDrivers."""

    def __init__(
        self,
        env: RunEnvironment,
        build: BuildProvenance,
        *,
        checkpoint_linger: float = 0.2,
        engine_id: str | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        on_takeover: Callable[[], None] | None = None,
    ) -> None:
        self.children = ChildRuns(self)
        own = TransportRegistry()
        transport = ChildRunTransport(self.children)
        own.register(SPAWN_NAMESPACE, transport)
        own.register(AWAIT_NAMESPACE, transport)
        # The child namespaces are this engine's: the registry is copied, never the shared default.
        env.transports = env.transports.merged(own)
        self.env = env
        self.build = build
        self.checkpoint_linger = checkpoint_linger
        self.drivers: dict[str, asyncio.Task[RunCompleted]] = {}
        # Runs a Terminalize is stopping here: nothing may start driving them meanwhile.
        self.terminalizing: collections.Counter[str] = collections.Counter()
        self._closing = False
        # Content-addressed, so never stale: final snapshots of runs it finished, manifests it used.
        self._final_snapshots: RecentArtifacts[Any] = RecentArtifacts(1000)
        self._manifests: RecentArtifacts[RunManifest] = RecentArtifacts(1000)
        # Every event of runs this engine started and finished: a terminal run's stream never
        # changes again, so its view needs no read of it.
        self._finished_runs: RecentArtifacts[tuple[StoredEvent, ...]] = RecentArtifacts(1000)
        # Runs found to hold a corrupt event (it never goes away): scans stop taking their lease.
        self._unreadable_runs: RecentArtifacts[KeelError] = RecentArtifacts(1000)
        # One resumption of a run at a time, and one start of a client-chosen run id at a time.
        self._resuming = KeyedLocks()
        self._starts = KeyedLocks()
        self.engine_id = engine_id or default_engine_id()
        self.leases = Leases(
            env.store, self.engine_id, lease_ttl, on_lost=self._lease_lost, on_takeover=on_takeover
        )

    def _lease_lost(self, run_id: str) -> None:
        task = self.drivers.get(run_id)
        if task is not None:
            task.cancel()  # parks: its flush finds the lease gone and appends nothing

    def _driver(
        self,
        run_id: str,
        manifest: RunManifest,
        plan: Plan,
        history: RunHistory,
        *,
        lease: Lease,
        claim: bool = False,
        has_ledger: bool = False,
        events: Sequence[StoredEvent] | None = None,
    ) -> RunDriver:
        return RunDriver(
            self.env,
            run_id,
            manifest,
            plan,
            history,
            checkpoint_linger=self.checkpoint_linger,
            first_append_patience=self.env.store.patience,
            claim_first=claim,
            has_ledger=has_ledger,
            lease=lease,
            events=events,
        )

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
    ) -> StartOutcome:
        """Record RunStarted (manifest and initial snapshot inline) and drive the run.

        Without `wait` (or with a client-chosen run id, whose start must be checked against the
        store first) RunStarted is durable before this returns. With `wait` and a fresh id, the
        run executes at once and RunStarted travels in the driver's first batch: nothing was
        acknowledged before it, so nothing is lost if the engine dies first. `manifest_stored`:
        the manifest artifact is in the store already (a child's, stored with its link).
        """
        plan = self.plan_for(manifest)
        if manifest.run_config.replay_of_run_id:
            head, _ = await self.env.store.head(run_stream_id(manifest.run_config.replay_of_run_id))
            if head == 0:
                raise not_found(
                    "run_not_found",
                    f"run_config.replay_of_run_id {manifest.run_config.replay_of_run_id} does not exist",
                )
        chosen = run_id or str(uuid.uuid4())
        manifest_bytes = manifest.canonical_bytes()
        manifest_id = artifact_id_for_bytes(manifest_bytes)
        snapshot_bytes = canonical_json_bytes(manifest.initial_context)
        snapshot_id = artifact_id_for_bytes(snapshot_bytes)
        parent_run_id, parent_fact_key = parent or ("", "")
        started = RunStarted(
            manifest.op_id, manifest_id, snapshot_id, parent_run_id, parent_fact_key, at_us=now_us()
        )
        inline = [(SNAPSHOT_ARTIFACT_KIND, snapshot_bytes)]
        if not manifest_stored:
            inline.insert(0, (MANIFEST_ARTIFACT_KIND, manifest_bytes))
        if wait and run_id is None and self.checkpoint_linger > 0:
            driver = self._driver(
                chosen, manifest, plan, RunHistory(), lease=self.leases.start_new(chosen), events=()
            )
            driver.remember_snapshot(snapshot_id, dict(manifest.initial_context))
            driver.record([started], status="active", artifacts=inline)
            self._manifests.put(manifest_id, manifest)
            task = self._spawn(driver)
            await asyncio.wait({task}, timeout=wait_seconds)
            if task.done() and not task.cancelled() and driver.durable_seq == 0:
                error = task.exception()
                if error is not None:
                    raise error  # never recorded: the caller learns why (store_unavailable, ...)
            if not task.done():
                await driver.flush()  # out of time: the run must exist before it is named
            return StartOutcome(chosen, manifest_id, True)
        # One start of a run id at a time here: a client's retried (or hedged) start must not win
        # the append while the lease it would drive under is another start's.
        driving: asyncio.Task[RunCompleted] | None
        async with self._starts.hold(chosen):
            # Implicit until the run outlives ttl/3: no write now. Not when this engine holds the run
            # already (a retried start of a run it drives): that lease is the driver's.
            fresh = chosen not in self.leases.held
            lease = self.leases.start_new(chosen) if fresh else None
            try:
                await self.env.store.append(
                    run_stream_id(chosen),
                    [encode_event(started)],
                    expected_seq=None,
                    status="active",
                    artifacts=inline,
                )
            except BaseException as error:
                if fresh:
                    self.leases.discard(chosen)
                if not isinstance(error, KeelError) or error.code != "sequence_conflict" or run_id is None:
                    raise
                existing = await self._existing_start(chosen, manifest_id)
                # A client retrying its start after a crash expects the run to go on: drive it if
                # nobody here does (another engine driving it too is fenced off by the sequence).
                await self.resume_run(chosen)
                driving = None
            else:
                self._manifests.put(manifest_id, manifest)
                assert lease is not None  # the append succeeded: the run is new
                driver = self._driver(
                    chosen, manifest, plan, fold([started]), lease=lease, events=[StoredEvent(1, started)]
                )
                driver.remember_snapshot(snapshot_id, dict(manifest.initial_context))
                driving = self._spawn(driver)
        if driving is None:
            if wait:
                await self.await_run(chosen, wait_seconds)
            return existing
        if wait:
            await asyncio.wait({driving}, timeout=wait_seconds)
        return StartOutcome(chosen, manifest_id, True)

    async def started_manifest_id(self, run_id: str) -> str | None:
        """The manifest id the run was started with (None: it was never started)."""
        first = await self.env.store.read(run_stream_id(run_id), limit=1)
        event = decode_event(first[0].type, first[0].payload) if first else None
        if first and not isinstance(event, RunStarted):
            return "?"  # not a run Keel started: matches no manifest
        return event.manifest_id if isinstance(event, RunStarted) else None

    async def _existing_start(self, run_id: str, manifest_id: str) -> StartOutcome:
        existing = await self.started_manifest_id(run_id)
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

    def _spawn(self, driver: RunDriver) -> asyncio.Task[RunCompleted]:
        task = asyncio.create_task(driver.drive(), name=f"run {driver.run_id}")
        self.drivers[driver.run_id] = task
        task.add_done_callback(lambda done: self._driver_done(driver, done))
        return task

    def _driver_done(self, driver: RunDriver, task: asyncio.Task[RunCompleted]) -> None:
        run_id = driver.run_id
        if self.drivers.get(run_id) is task:
            del self.drivers[run_id]
            self.leases.drop(run_id, run_exists=driver.durable_seq > 0)
        if not task.cancelled():
            self.children.forget(run_id)  # a cancelled parent's spawns are still needed to close its children
        if not task.cancelled() and task.exception() is None:
            final_id = task.result().final_snapshot_id
            final = driver.known_snapshot(final_id)
            if final is not None:
                self._final_snapshots.put(final_id, final)
            if driver.events is not None and driver.history.is_terminal:
                self._finished_runs.put(run_id, tuple(driver.events))
        if task.cancelled():
            log.info("run %s parked", run_id)
        elif task.exception() is not None:
            error = task.exception()
            if isinstance(error, KeelError) and error.code in _HANDED_OVER:
                # Routine: the run resumes wherever its lease goes next (perhaps here again).
                what = _HANDED_OVER[error.code]
                log.info("run %s: stopped driving it here: %s (%s: %s)", run_id, what, error.code, error)
            else:
                log.error("run %s stopped: %r", run_id, error)

    async def read_history(
        self, run_id: str, *, corrupt_ok: bool = False
    ) -> tuple[list[StoredEvent], RunHistory]:
        """A run's events and their fold (`run_not_found` if it has none).

        A history with an event that did not decode is DATA_LOSS `corrupt_event` unless `corrupt_ok`
        (Terminalize, which may still cancel or fail the run): nothing shows, resumes or waits for
        a run that cannot be read.
        """
        events = stored_events(await self.env.store.read(run_stream_id(run_id)))
        if not events:
            raise not_found("run_not_found", f"run {run_id} does not exist", run_id=run_id)
        history = fold(e.event for e in events)
        if history.corrupt is not None and not corrupt_ok:
            raise corrupt_event_error(run_stream_id(run_id), history.corrupt_seq, history.corrupt)
        return events, history

    async def manifest(self, manifest_id: str) -> RunManifest:
        """A manifest artifact, read back and checked against its id."""
        known = self._manifests.get(manifest_id)
        if known is None:
            data = await self.env.store.get_artifact(manifest_id)
            try:
                known = RunManifest.from_bytes(data)
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
                raise KeelError(
                    "corrupt_artifact",
                    f"artifact {manifest_id} is not a run manifest ({type(error).__name__}: {error})",
                    category=ErrorCategory.DATA_LOSS,
                    details={"artifact_id": manifest_id},
                ) from None
            self._manifests.put(manifest_id, known)
        return known

    async def resume_run(self, run_id: str, *, created_at_us: int | None = None) -> bool:
        """Drive a run nobody drives; False when it is terminal, driven here, or leased by another engine.

        The lease comes first, then the history (read after it, so no write of a former holder is
        missed); the driver's first append claims the run stream at that history's head. One
        resumption of a run at a time here: a second one (a scan and an await at once) would find
        the lease "ours" and write it again, fencing off the first one's driver mid-op.
        """
        async with self._resuming.hold(run_id):
            return await self._resume_run(run_id, created_at_us)

    async def _resume_run(self, run_id: str, created_at_us: int | None) -> bool:
        if run_id in self.drivers or run_id in self.terminalizing or self._closing:
            return False
        # No lease for a run that does not exist or has ended (a cheap look before writing one).
        head, label = await self.env.store.head(run_stream_id(run_id))
        if head == 0:
            raise not_found("run_not_found", f"run {run_id} does not exist", run_id=run_id)
        if label in _STATUS_OF_LABEL:
            return False
        unreadable = self._unreadable_runs.get(run_id)
        if unreadable is not None:
            raise unreadable
        lease = await self.leases.acquire(run_id, created_at_us, lambda: self._created_at_us(run_id))
        if lease is None:
            return False
        resumed = False
        try:
            _, history = await self._history_to_resume(run_id)
            if await self.children.closed_with_parent(run_id, history):
                return False
            resumed = await self._resume_from(run_id, history, lease)
        finally:
            if not resumed and run_id not in self.drivers:
                self.leases.drop(run_id)
        return resumed

    async def _history_to_resume(self, run_id: str) -> tuple[list[StoredEvent], RunHistory]:
        try:
            return await self.read_history(run_id)
        except KeelError as error:
            if error.code == "corrupt_event":
                log.error("run %s cannot be resumed: %s", run_id, error.message)
                self._unreadable_runs.put(run_id, error)
            raise

    async def _created_at_us(self, run_id: str) -> int | None:
        """When the run stream was created (its first event's commit time, by the store's clock)."""
        first = await self.env.store.read(run_stream_id(run_id), limit=1)
        when = first[0].recorded_at if first else None
        return int(when.timestamp() * 1_000_000) if when else None

    async def _resume_from(self, run_id: str, history: RunHistory, lease: Lease) -> bool:
        if history.is_terminal or history.started is None:
            return False
        manifest = await self.manifest(history.started.manifest_id)
        plan = self.plan_for(manifest)
        next_action(history, plan, manifest.run_config)  # rule 3: refuse a run whose op id changed
        # Only a resumed run can have a failure ledger (a diverged Terminalize leaves it undriven).
        ledger_head, _ = await self.env.store.head(ledger_stream_id(run_id))
        if run_id in self.drivers or run_id in self.terminalizing or self._closing:
            return False
        # A former holder's late write is fenced off by this claim (an append at the head read).
        self._spawn(
            self._driver(run_id, manifest, plan, history, lease=lease, claim=True, has_ledger=ledger_head > 0)
        )
        return True

    async def recover(self) -> int:
        """Resume every active run nobody holds; returns how many this engine took on.

        Cheap when repeated (scans): a run's lease holder is read once and cached, each distinct
        holder engine's liveness record is read once per scan (not once per run), and released
        implicit leases come from one ListStreams (engine_service.leases).
        """
        resumed = 0
        token = ""
        limit = asyncio.Semaphore(SCAN_CONCURRENCY)
        self.leases.begin_scan()
        released = await self.leases.released_runs()
        active: set[str] = set()

        async def resume(run_id: str, created_at_us: int | None) -> bool:
            async with limit:
                try:
                    return await self.resume_run(run_id, created_at_us=created_at_us)
                except KeelError as error:
                    if error.code != "corrupt_event":  # logged once, when found
                        log.error("could not resume run %s: %s", run_id, error.message)
                    return False

        while True:
            page, token = await self.env.store.list_streams(
                prefix=RUN_STREAM_PREFIX,
                statuses=["active"],
                page_size=500,
                page_token=token,
                patience=float("inf"),
            )
            listed = {
                s.stream_id.removeprefix(RUN_STREAM_PREFIX): (
                    int(s.created_at.timestamp() * 1_000_000) if s.created_at else None
                )
                for s in page
            }
            active.update(listed)
            leased = await self.leases.leased_elsewhere(
                {run_id: at for run_id, at in listed.items() if run_id not in self.drivers}
            )
            candidates = [
                (run_id, created_at_us)
                for run_id, created_at_us in listed.items()
                if run_id not in self.drivers
                and run_id not in self.terminalizing
                and (run_id in released or run_id not in leased)
            ]
            resumed += sum(await asyncio.gather(*(resume(*candidate) for candidate in candidates)))
            if not token or self._closing:
                self.leases.forget_seen(active)
                return resumed

    async def scan_forever(self) -> None:
        """Take over runs whose lease expired or was released: at start, then every ttl/3 (jittered).

        ttl/3 rather than ttl/2: a drained engine's runs (freed at once by its EngineStopped, no
        expiry to wait for) are then taken over within ttl/3.
        """
        interval = self.leases.ttl / 3
        first = True
        while not self._closing:
            try:
                resumed = await self.recover()
                if first or resumed:
                    log.info("%s: resumed %d run(s)", "recovery" if first else "scan", resumed)
                first = False
            except KeelError as error:
                log.warning("scanning for runs to take over failed: %s", error.message)
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))

    async def await_run(self, run_id: str, wait_seconds: float | None) -> bool:
        """Wait until the run is terminal (True) or `wait_seconds` pass (False), without polling.

        A run that no engine drives is resumed here first (DESIGN.md: resume on await). A run whose
        lease another engine holds is waited for on the store; should that lease expire first (its
        engine died), this engine takes the run over then.
        """
        deadline = None if wait_seconds is None else time.monotonic() + wait_seconds
        while True:
            task = self.drivers.get(run_id)
            if task is None:
                _, history = await self.read_history(run_id)
                if history.is_terminal:
                    return True
                try:
                    await self.resume_run(run_id)
                except KeelError as error:
                    log.warning("await of run %s could not resume it: %s", run_id, error.message)
                task = self.drivers.get(run_id)
            if task is not None:
                done, _ = await asyncio.wait({task}, timeout=_left(deadline))
                if not done:
                    return False
                if not task.cancelled() and task.exception() is None:
                    return True
                # The driver stopped without finishing (parked, or lost the run to another engine):
                # fall back to the store, which tells the truth either way.
            events, history = await self.read_history(run_id)
            if history.is_terminal:
                return True
            patience = _left(deadline)
            retry_in = self.leases.seen_live_for(run_id)
            if retry_in is not None and (patience is None or retry_in < patience):
                patience = retry_in  # then try to take the run over
            if await self._until_terminal(run_id, events[-1].seq, patience):
                return True
            if retry_in is None or (deadline is not None and time.monotonic() >= deadline):
                return False

    async def _until_terminal(self, run_id: str, after_seq: int, patience: float | None) -> bool:
        """Whether a RunCompleted arrives after `after_seq` within `patience` seconds (None: ever)."""

        async def until_terminal() -> None:
            subscription = self.env.store.subscribe(run_stream_id(run_id), after_seq=after_seq)
            async with contextlib.aclosing(subscription):
                async for event in subscription:
                    if event.type == "RunCompleted":
                        return

        try:
            await asyncio.wait_for(until_terminal(), patience)
        except TimeoutError:
            return False
        return True

    async def terminalize(self, run_id: str, status: str, reason: str = "") -> TerminalizeResult:
        """Move the run to a terminal status once (see engine_service.terminalization)."""
        return await terminalize(self, run_id, status, reason)

    async def await_terminal(self, run_id: str) -> RunCompleted:
        """The run's terminal event, once there is one: from the local driver, else the store."""
        while True:
            task = self.drivers.get(run_id)
            if task is not None:
                await asyncio.wait({task})
                if not task.cancelled() and task.exception() is None:
                    return task.result()
            await self.await_run(run_id, None)
            _, history = await self.read_history(run_id)
            if history.terminal is not None:
                return history.terminal

    async def final_snapshot(self, snapshot_id: str) -> Any:
        """A final snapshot (cached for runs this engine finished)."""
        known = self._final_snapshots.get(snapshot_id)
        if known is None:
            known = parse_json_bytes(await self.env.store.get_artifact(snapshot_id))
            self._final_snapshots.put(snapshot_id, known)
        return known

    async def stop_driver(self, run_id: str) -> None:
        """Cancel this engine's driver of the run (its op is cancelled) and wait until it stopped."""
        task = self.drivers.get(run_id)
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(BaseException):
            await task

    async def run_view(self, run_id: str) -> tuple[RunView, Any]:
        """The run as GetRun shows it (children, failure ledger, final snapshot when terminal)."""
        # The children stream is read beside the run's (any client may link a child to any run).
        finished = self._finished_runs.get(run_id)
        if finished is not None:
            events, history = list(finished), fold(e.event for e in finished)
            links = await self.children.links(run_id)
        else:
            (events, history), links = await asyncio.gather(
                self.read_history(run_id), self.children.links(run_id)
            )
        ledger = []
        if history.terminal is None or history.terminal.has_ledger:
            ledger = await read_ledger(self, run_id)
        manifest = await self.manifest(history.started.manifest_id) if history.started else None
        view = build_run_view(run_id, events, manifest)
        heads = await asyncio.gather(
            *(self.env.store.head(run_stream_id(link.child_run_id)) for link in links)
        )
        view.children = [
            ChildView(
                link.child_run_id,
                link.fact_key,
                link.op_id,
                _STATUS_OF_LABEL.get(label, RUNNING) if head else PENDING,
                link.parent_close_policy,
            )
            for link, (head, label) in zip(links, heads, strict=True)
        ]
        view.failure_ledger = [LedgerView(e.step_id, e.reason, e.recorded_at) for e in ledger]
        if view.final_snapshot_id:
            view.final_snapshot = await self.final_snapshot(view.final_snapshot_id)
        return view, history

    async def list_runs(
        self, statuses: Sequence[str], page_size: int, page_token: str
    ) -> tuple[list[StreamSummary], str]:
        """A page of runs, newest first."""
        return await self.env.store.list_streams(
            prefix=RUN_STREAM_PREFIX, statuses=statuses, page_size=page_size, page_token=page_token
        )

    async def stop(self) -> None:
        """Park every run this engine drives: cancel the drivers; the runs resume on the next start."""
        self._closing = True
        self.leases.begin_closing()  # a parked run's lease is released: another engine takes it at once
        while self.drivers:
            tasks = list(self.drivers.values())
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            # A task that finished while another was awaited has its done callback (which takes it out
            # of `drivers`) still queued: awaiting it again would not yield, and this would spin.
            await asyncio.sleep(0)
            # A child start shielded from its parent's cancel may still add a driver: park it too.
            await self.children.settle_all()
        await self.leases.close()
