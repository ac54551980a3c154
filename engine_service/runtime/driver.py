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
so a long op shows as running; a resumed driver appends its first StepAttemptStarted before the op
runs (a claim: an engine still driving the run elsewhere fences one of the two off before any work).

Leases. A driver holds its run's lease (engine_service.runtime.leases) and confirms it is still valid
before every append and right before every transport call; once lost, the driver appends nothing
more (a resumed driver's claim, fenced by the run's sequence, refuses a former holder's late
appends), with one exception: an answer it holds.

Facts: engine_service.runtime.run_io (answers recorded before the op sees them).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from engine_service.domain import (
    AlreadyTerminal,
    CompleteRun,
    ErrorRecord,
    FactRecorded,
    KernelEvent,
    Plan,
    RunCompleted,
    RunHistory,
    RunManifest,
    RunStarted,
    RunStep,
    StepAttemptFailed,
    StepAttemptStarted,
    StepCompleted,
    StepContext,
    StoredEvent,
    canonical_json_bytes,
    encode_event,
    next_action,
    with_step_output,
)
from engine_service.domain.canonical import artifact_id_for_bytes, parse_json_bytes
from engine_service.domain.context import SNAPSHOT_ARTIFACT_KIND
from engine_service.domain.events import stamped
from engine_service.domain.ops import OpDefinition
from engine_service.domain.streams import RUN_ACTIVE_LABEL, RUN_COMPLETED, run_label, run_stream_id
from engine_service.failpoints import (
    AFTER_OP_RETURNED,
    AFTER_STEP_ATTEMPT_STARTED,
    BEFORE_RUN_COMPLETED,
)
from engine_service.runtime.environment import PARK_FLUSH_SECONDS, RunEnvironment
from engine_service.runtime.leases import Lease
from engine_service.runtime.run_io import RunFacts, RunIo, io_error
from engine_service.store.port import FOREVER
from keel_core.clock import now_us
from keel_core.errors import KeelError
from keel_core.json_rules import check_json
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


def op_error_record(error: BaseException) -> ErrorRecord:
    """How an op's exception is recorded in StepAttemptFailed."""
    if isinstance(error, KeelError):
        details = dict(error.details)
        try:
            canonical_json_bytes(details)
        except KeelError:
            details = {key: repr(value) for key, value in details.items()}
        return ErrorRecord(error.code, error.category.value, error.retryable, error.message, details)
    return ErrorRecord("op_failed", "op", True, f"{type(error).__name__}: {error}")


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
        self._lingering: asyncio.Task[None] | None = None
        self._flush_error: BaseException | None = None
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
        self.facts = RunFacts(self)

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
        """Run to a terminal event, make it durable, and return it."""
        bind_log_fields(run_id=self.run_id)  # drive() runs as its own task: names the run in its lines
        try:
            while True:
                if self._flush_error is not None:
                    raise self._flush_error
                if self._refused is not None:
                    raise self._refused
                action = next_action(self.history, self.plan, self.manifest.run_config)
                match action:
                    case AlreadyTerminal():
                        await self.flush()
                        return action.terminal
                    case CompleteRun():
                        await self._complete(action)
                    case RunStep():
                        await self.run_step(action)
        except asyncio.CancelledError:
            await self._flush_when_parked()
            raise
        finally:
            if self._lingering is not None:
                self._lingering.cancel()

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
    ) -> None:
        """Decide the run's RunStarted (its manifest and initial snapshot inline), the first event.

        `attributes` index the run stream (pipeline, lineage, labels): set by the same append.

        `durable_now`: append it before returning (a sequence conflict means the run exists);
        otherwise it travels in the driver's first batch, lingering like any decided event.
        """
        self._pending_attributes = dict(attributes)
        self.record([started], label=RUN_ACTIVE_LABEL, artifacts=artifacts, linger=not durable_now)
        if durable_now:
            await self.flush()

    def record(
        self,
        events: Sequence[KernelEvent],
        *,
        label: str | None = None,
        artifacts: Sequence[tuple[str, bytes]] = (),
        linger: bool = True,
    ) -> None:
        """Decide `events` (stamped with the time now): fold them in now, append them with the next flush.

        `label`: the run stream's status label the append sets; `linger`: start the linger timer
        (a caller that flushes at once needs none).
        """
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
            self._lingering = asyncio.create_task(self._flush_after_linger())

    async def _complete(self, action: CompleteRun) -> None:
        """Decide RunCompleted (flushing first when `before_run_completed` is armed)."""
        if self.env.failpoints.is_armed(BEFORE_RUN_COMPLETED):
            await self.flush()
            self.env.failpoints.hit(BEFORE_RUN_COMPLETED)
        terminal = RunCompleted(
            action.status, action.final_snapshot_id, action.reason, action.error, has_ledger=self.has_ledger
        )
        self.record([terminal], label=run_label(action.status))

    async def _settled(self) -> None:
        """An attempt settled: without write-behind, append it now (with RunCompleted if that is next)."""
        if self.checkpoint_linger > 0:
            return
        follow = next_action(self.history, self.plan, self.manifest.run_config)
        if isinstance(follow, CompleteRun) and not self.env.failpoints.is_armed(BEFORE_RUN_COMPLETED):
            await self._complete(follow)
        await self.flush()

    def _pending_artifact_bytes(self) -> int:
        return sum(len(data) for _, data in self._pending_artifacts)

    async def _flush_after_linger(self) -> None:
        await asyncio.sleep(self.checkpoint_linger or VISIBLE_WITHIN)
        self._lingering = None
        try:
            await self.flush()
        except Exception as error:  # the driver raises it at its next decision
            if self._flush_error is None and self._refused is None:
                self._flush_error = error

    async def flush(self) -> None:
        """Make every pending event durable (one append), retrying until the store takes it.

        A batch holding an I/O call's answer (FactRecorded) is appended even when the lease is no
        longer trusted: the append is a compare-and-swap at the head this driver wrote, so it lands
        only when nobody else appended to the run since; a conflict means someone did.
        """
        async with self._lock:
            if self._flush_error is not None:
                raise self._flush_error
            if not self._pending:
                return
            answer = any(isinstance(event, FactRecorded) for event in self._pending)
            if not answer and self._refused is not None:
                raise self._refused
            if self.lease is not None and not answer:
                await self.confirm_lease()
            elif self.lease is not None and (self._refused is not None or not self.lease.is_valid()):
                log.info(
                    "run %s: lease no longer trusted; recording the answer it holds if nobody wrote since",
                    self.run_id,
                )
            batch, artifacts, label = self._pending, self._pending_artifacts, self._pending_label
            attributes = self._pending_attributes
            self._pending, self._pending_artifacts, self._pending_label = [], [], None
            self._pending_attributes = {}
            patience = FOREVER
            if self.durable_seq == 0 and self._first_append_patience is not None:
                patience = self._first_append_patience  # nothing acknowledged yet: fail rather than hang
            try:
                await self.env.store.append(
                    self.stream_id,
                    [encode_event(event) for event in batch],
                    expected_seq=self.durable_seq if self.durable_seq else None,
                    status=label,
                    artifacts=artifacts,
                    patience=patience,
                    attributes=attributes or None,
                )
            except BaseException as error:
                # Nothing after a failed append may be appended: it would leave a gap in the run.
                self._flush_error = (
                    error if isinstance(error, Exception) else KeelError("driver_stopped", "parked")
                )
                raise
            self.durable_seq += len(batch)

    async def confirm_lease(self) -> None:
        """Raise `lease_lost` unless the run's lease is held and valid (the driver then stops for good)."""
        assert self.lease is not None
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
        base = await self.snapshot(action.base_snapshot_id)
        self.record([StepAttemptStarted(action.step_id, action.attempt, action.base_snapshot_id)])
        started_seq = self.history.head_seq  # the attempt's fencing value for transports
        if self._claim_first or self.env.failpoints.is_armed(AFTER_STEP_ATTEMPT_STARTED, action.step_id):
            self._claim_first = False
            await self.flush()
            self.env.failpoints.hit(AFTER_STEP_ATTEMPT_STARTED, action.step_id)
        io = RunIo(self.facts, action.step_id, action.attempt, started_seq)
        ctx = StepContext(self.run_id, action.step_id, action.attempt, self.manifest.input, base, io)
        definition = self.env.ops.get(step.op_id, step.op_version)
        try:
            output = await self._call_op(definition, ctx, step.op_config)
            check_json(output, "output")  # what is stored must go back out on the wire
            snapshot = with_step_output(base, action.step_id, output)
            snapshot_bytes = canonical_json_bytes(snapshot)
            if len(snapshot_bytes) > MAX_SNAPSHOT_BYTES:
                raise io_error(
                    "snapshot_too_large",
                    f"the context after step {action.step_id!r} is {len(snapshot_bytes)} bytes of JSON; "
                    f"the limit is {MAX_SNAPSHOT_BYTES} (store large data elsewhere and keep a reference)",
                )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if isinstance(error, KeelError) and error.code == "invalid_json":
                error = io_error(
                    "op_output_invalid",
                    f"op {step.op_id!r} returned a value that is not JSON: {error.message}",
                )
            self.record([StepAttemptFailed(action.step_id, action.attempt, op_error_record(error))])
            await self._settled()
            return
        self.env.failpoints.hit(AFTER_OP_RETURNED, action.step_id)
        snapshot_id = artifact_id_for_bytes(snapshot_bytes)
        self._snapshots[snapshot_id] = snapshot
        if (
            self._pending_artifact_bytes() + len(snapshot_bytes) > MAX_BATCH_ARTIFACT_BYTES
            or len(self._pending_artifacts) >= MAX_BATCH_ARTIFACTS
        ):
            await self.flush()  # keep one batch within what one append may carry
        self.record(
            [StepCompleted(action.step_id, action.attempt, snapshot_id)],
            artifacts=[(SNAPSHOT_ARTIFACT_KIND, snapshot_bytes)],
        )
        await self._settled()

    async def _call_op(self, definition: OpDefinition, ctx: StepContext, op_config: Any) -> Any:
        """Run the op; a run terminalized elsewhere meanwhile (another engine) cancels it."""
        driver_task = asyncio.current_task()
        watcher = asyncio.create_task(self._cancel_on_foreign_terminal(driver_task))
        try:
            return await definition.function(
                ctx, copy.deepcopy(op_config), copy.deepcopy(self.manifest.input)
            )
        finally:
            watcher.cancel()

    async def _cancel_on_foreign_terminal(self, driver_task: asyncio.Task[Any] | None) -> None:
        # Only ops still running after a moment watch the stream: short ones cost a timer, not a stream.
        await asyncio.sleep(self.checkpoint_linger or VISIBLE_WITHIN)
        if driver_task is None:
            return
        try:
            subscription = self.env.store.subscribe(self.stream_id, after_seq=self.durable_seq)
            async with contextlib.aclosing(subscription):
                async for event in subscription:
                    # This driver appends no RunCompleted while its op runs: this one is someone else's.
                    if event.type == RUN_COMPLETED:
                        log.info("run %s was terminalized elsewhere: cancelling its running op", self.run_id)
                        driver_task.cancel()
                        return
        except KeelError as error:  # best effort: the op's next append is fenced off anyway
            log.debug("run %s: watching for a foreign terminal event failed: %s", self.run_id, error.message)
