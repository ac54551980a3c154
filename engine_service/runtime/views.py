"""Runs as people and clients see them: GetRun's view, ListRuns' summaries, WatchRun's events.

`build_run_view` is pure (a run's stored events and manifest in, a RunView out); `RunViews` reads
what it needs from the event log (the run, its children stream and failure ledger, its children's
statuses) so that the wire layer maps domain values only and never sees a stream id.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from engine_service.domain import (
    CANCELED,
    COMPLETED,
    FAILED,
    CorruptEvent,
    ErrorRecord,
    FactRecorded,
    RunCompleted,
    RunManifest,
    RunStarted,
    StepAttemptFailed,
    StepAttemptStarted,
    StepCompleted,
    StoredEvent,
    corrupt_event_error,
)
from engine_service.domain.child_runs import ChildLink
from engine_service.domain.events import (
    ParkStep,
    SignalAwaited,
    StepWaiting,
    decode_event,
    event_type_and_json,
)
from engine_service.domain.labels import (
    LINEAGE_ATTRIBUTE,
    PARENT_ATTRIBUTE,
    PIPELINE_ATTRIBUTE,
    RERUN_OF_ATTRIBUTE,
    label_filter,
    labels_of,
)
from engine_service.domain.streams import (
    RUN_LIVE_LABELS,
    RUN_STREAM_PREFIX,
    run_id_of_stream,
    run_label,
    run_status_of_label,
    run_stream_id,
)
from engine_service.domain.waits import SIGNAL
from engine_service.runtime.reader import RunReader, stored_events
from engine_service.store.port import EventLog
from keel_core.errors import KeelError, not_found
from keel_core.json_rules import check_json

RUNNING = "running"
MAX_RERUNS_SHOWN = 100
PENDING = "pending"
RETRYING = "retrying"
WAITING = "waiting"
_ABANDONED = ErrorRecord("attempt_abandoned", "engine", True, "the engine stopped during this attempt")


@dataclass
class AttemptView:
    """One attempt of one step, timed by when the engine decided its events."""

    attempt: int
    status: str = RUNNING
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ErrorRecord | None = None
    task_queue: str = ""  # a remote attempt: its queue
    worker_id: str = ""  # and the worker that ran it (known once it ended)
    wait: ParkStep | None = None  # what it waits for, while it waits


@dataclass(frozen=True)
class SignalWaitView:
    """What a running attempt waits for: a signal `name`, until `timeout_at` (None: for ever)."""

    name: str
    fact_key: str
    since: datetime | None
    timeout_at: datetime | None


@dataclass
class StepView:
    """A step and its attempts."""

    step_id: str
    op_id: str
    op_version: str
    status: str = PENDING
    attempts: list[AttemptView] = field(default_factory=list)
    last_error: ErrorRecord | None = None
    task_queue: str = ""
    reused_from_run_id: str = ""  # a rerun reused this step of that run: no attempt ran here
    depends_on: tuple[str, ...] = ()
    # Its output, once completed (`has_output`): what the latest checkpoint holds under its id.
    output: Any = None
    has_output: bool = False
    waiting_for_signal: SignalWaitView | None = None


@dataclass(frozen=True)
class ChildView:
    """A child of the run, as the run's children stream links it, with its current status.

    `status` is PENDING for a child linked but not started (its spawn was interrupted).
    """

    child_run_id: str
    fact_key: str
    op_id: str
    status: str
    parent_close_policy: str


@dataclass(frozen=True)
class LedgerView:
    """An entry of the run's failure ledger."""

    step_id: str
    reason: str
    recorded_at: datetime | None


@dataclass(frozen=True)
class RunSummary:
    """A run in a ListRuns page: its status (RUNNING or terminal) and its stream's times and head."""

    run_id: str
    status: str
    created_at: datetime | None
    updated_at: datetime | None
    head_seq: int
    pipeline_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    parent_run_id: str = ""


@dataclass(frozen=True)
class RunFilter:
    """What ListRuns keeps besides statuses (empty or None: no filter on that)."""

    pipeline_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    started_after: datetime | None = None
    started_before: datetime | None = None
    lineage: str = ""  # "", TOP_LEVEL or CHILD (engine_service.domain.labels)
    parent_run_id: str = ""
    # How long a run has lasted: to its end once terminal, until now while running.
    min_duration: timedelta | None = None
    max_duration: timedelta | None = None

    def attributes(self) -> dict[str, str]:
        """The store attribute filter this stands for (matched through the store's index)."""
        wanted = label_filter(self.labels)
        if self.pipeline_id:
            wanted[PIPELINE_ATTRIBUTE] = self.pipeline_id
        if self.lineage:
            wanted[LINEAGE_ATTRIBUTE] = self.lineage
        if self.parent_run_id:
            wanted[PARENT_ATTRIBUTE] = self.parent_run_id
        return wanted


@dataclass
class RunView:
    """A run's status, steps, timestamps and result."""

    run_id: str
    op_id: str = ""
    manifest_id: str = ""
    status: str = RUNNING
    parent_run_id: str = ""
    parent_fact_key: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    completed_at: datetime | None = None
    steps: list[StepView] = field(default_factory=list)
    final_snapshot_id: str = ""
    final_snapshot: Any = None
    reason: str = ""
    error: ErrorRecord | None = None
    head_seq: int = 0
    children: list[ChildView] = field(default_factory=list)
    failure_ledger: list[LedgerView] = field(default_factory=list)
    # The run's input, from its manifest; `has_input` is False when the manifest is unknown.
    input: Any = None
    has_input: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    # A rerun: the run it reran, from which step; and the reruns of this run, oldest first.
    rerun_of_run_id: str = ""
    rerun_from_step_id: str = ""
    reruns: list[str] = field(default_factory=list)


def build_run_view(run_id: str, events: Sequence[StoredEvent], manifest: RunManifest | None) -> RunView:
    """The view of a run from its events (and its manifest, for the step list)."""
    view = RunView(run_id=run_id)
    steps: dict[str, StepView] = {}
    if manifest is not None:
        view.input, view.has_input = manifest.input, True
        for spec in manifest.pipeline.ordered_steps():
            steps[spec.step_id] = StepView(
                spec.step_id,
                spec.op_id,
                spec.op_version,
                task_queue=spec.task_queue,
                depends_on=tuple(spec.depends_on),
            )
    for stored in events:
        view.head_seq = stored.seq
        when = decided_at(stored)
        view.updated_at = when or view.updated_at
        event = stored.event
        match event:
            case RunStarted():
                view.op_id, view.manifest_id = event.op_id, event.manifest_id
                view.parent_run_id, view.parent_fact_key = event.parent_run_id, event.parent_fact_key
                view.labels = dict(event.labels)
                view.rerun_of_run_id, view.rerun_from_step_id = (
                    event.rerun_of_run_id,
                    event.rerun_from_step_id,
                )
                view.created_at = when
            case StepAttemptStarted():
                step = steps.setdefault(event.step_id, StepView(event.step_id, "", ""))
                step.waiting_for_signal = None
                for earlier in step.attempts:
                    if earlier.status == RUNNING:  # an orphan: its engine stopped inside it
                        earlier.status, earlier.error = FAILED, _ABANDONED
                step.attempts.append(AttemptView(event.attempt, RUNNING, when, task_queue=step.task_queue))
                step.status = RUNNING
            case SignalAwaited():
                step = steps.setdefault(event.step_id, StepView(event.step_id, "", ""))
                timeout_at = _from_us(event.deadline_us) if event.deadline_us else None
                step.waiting_for_signal = SignalWaitView(event.name, event.fact_key, when, timeout_at)
            case FactRecorded():
                waited = steps.get(event.step_id)
                waiting = waited.waiting_for_signal if waited is not None else None
                if waited is not None and waiting is not None and waiting.fact_key == event.fact_key:
                    waited.waiting_for_signal = None
            case StepWaiting():
                step = steps.setdefault(event.step_id, StepView(event.step_id, "", ""))
                attempt = _attempt(step, event.attempt, when)
                attempt.status, attempt.wait = WAITING, event.wait
                step.status = WAITING
                if event.wait.kind == SIGNAL:  # keel.wait_signal, parked: what SignalAwaited told
                    step.waiting_for_signal = _signal_wait_of(event.wait, when)
            case StepAttemptFailed():
                step = steps.setdefault(event.step_id, StepView(event.step_id, "", ""))
                step.waiting_for_signal = None
                attempt = _attempt(step, event.attempt, when)
                attempt.status, attempt.finished_at, attempt.error = FAILED, when, event.error
                attempt.wait = None
                attempt.worker_id = event.worker_id
                step.status, step.last_error = RETRYING, event.error
            case StepCompleted():
                step = steps.setdefault(event.step_id, StepView(event.step_id, "", ""))
                step.waiting_for_signal = None
                attempt = _attempt(step, event.attempt, when)
                attempt.status, attempt.finished_at, attempt.worker_id = COMPLETED, when, event.worker_id
                attempt.wait = None
                step.status = COMPLETED
                step.reused_from_run_id = event.reused_from_run_id
            case RunCompleted():
                view.status = event.status
                view.completed_at = when
                view.final_snapshot_id = event.final_snapshot_id
                view.reason, view.error = event.reason, event.error
                for step in steps.values():
                    step.waiting_for_signal = None
                if event.status in (FAILED, CANCELED):
                    for step in steps.values():
                        if step.status in (RETRYING, RUNNING, WAITING):
                            step.status = FAILED
    view.steps = list(steps.values())
    return view


def _signal_wait_of(wait: ParkStep, since: datetime | None) -> SignalWaitView:
    """What a parked `signal` wait waits for (StepWaiting's detail, and its deadline)."""
    detail = wait.detail
    timeout_at = _from_us(wait.until_us) if wait.until_us else None
    return SignalWaitView(str(detail.get("name", "")), str(detail.get("fact_key", "")), since, timeout_at)


def set_step_outputs(view: RunView, checkpoint: Any) -> None:
    """Each completed step's output, taken from the run's latest checkpoint (it holds every one)."""
    if not isinstance(checkpoint, dict):
        return
    for step in view.steps:
        if step.status == COMPLETED and step.step_id in checkpoint:
            step.output, step.has_output = checkpoint[step.step_id], True


def decided_at(stored: StoredEvent) -> datetime | None:
    """When the engine decided the event (its `at_us`), else when the store committed it."""
    at_us = getattr(stored.event, "at_us", 0)
    if at_us:
        return _from_us(at_us)
    return stored.recorded_at


def _from_us(at_us: int) -> datetime:
    return datetime.fromtimestamp(at_us / 1_000_000, tz=UTC)


def _attempt(step: StepView, number: int, when: datetime | None) -> AttemptView:
    for attempt in step.attempts:
        if attempt.attempt == number:
            return attempt
    attempt = AttemptView(number, RUNNING, when)
    step.attempts.append(attempt)
    return attempt


def run_status(label: str) -> str:
    """The status of a run whose stream has `label`: its terminal status, else RUNNING."""
    return run_status_of_label(label) or RUNNING


class RunViews:
    """The views of runs an engine serves, read from its event log."""

    def __init__(self, store: EventLog, reader: RunReader) -> None:
        self.store = store
        self.reader = reader

    async def run_view(self, run_id: str, *, just_ended: bool = False) -> RunView:
        """The run as GetRun shows it (children, failure ledger, final snapshot when terminal).

        `just_ended`: the caller saw this engine end the run (StartRun with `wait`); the view is
        then the run as of its terminal event, which no deletion or rerun can precede (both need a
        terminal run), so neither the deletion check nor the reruns listing is read, nor the
        children stream when the terminal append found it empty or holding only links this engine
        appended.
        """
        # The children stream is read beside the run's (any client may link a child to any run).
        held = self.reader.finished_run(run_id)
        if held is not None and just_ended:
            held_links = self.reader.links_at_end(run_id)
            links = held_links if held_links is not None else await self.reader.links(run_id)
            held_events, history = held
            events = list(held_events)
        elif held is not None:
            # Held here since this engine finished it; another engine's retention may have deleted
            # it, and a client may have started the run id again since: the stored run is then
            # read (its first event, RunStarted, is another's).
            first, links = await asyncio.gather(
                self.store.read(run_stream_id(run_id), limit=1), self.reader.links(run_id)
            )
            if not first:
                self.reader.forget(run_id)
                raise not_found("run_not_found", f"run {run_id} does not exist", run_id=run_id)
            held_events, history = held
            events = list(held_events)
            if decode_event(first[0].type, first[0].payload) != history.started:
                self.reader.forget(run_id)
                events, history = await self.reader.read_history(run_id)
        else:
            (events, history), links = await asyncio.gather(
                self.reader.read_history(run_id), self.reader.links(run_id)
            )
        ledger = []
        if history.terminal is None or history.terminal.has_ledger:
            ledger = await self.reader.ledger(run_id)
        manifest = await self.reader.manifest(history.started.manifest_id) if history.started else None
        view = build_run_view(run_id, events, manifest)
        view.failure_ledger = [LedgerView(e.step_id, e.reason, e.recorded_at) for e in ledger]
        if links:  # most runs have no child: no statuses to gather
            view.children = [
                ChildView(link.child_run_id, link.fact_key, link.op_id, status, link.parent_close_policy)
                for link, status in zip(links, await self._child_statuses(links), strict=True)
            ]
        if view.final_snapshot_id:
            view.final_snapshot = await self.reader.final_snapshot(view.final_snapshot_id)
            set_step_outputs(view, view.final_snapshot)
        elif history.last_checkpoint:
            set_step_outputs(view, await self.reader.final_snapshot(history.last_checkpoint))
        if view.status != RUNNING and not (
            just_ended and held is not None
        ):  # only a terminal run can be rerun
            view.reruns = await self.reruns_of(run_id)
        return view

    async def _child_statuses(self, links: Sequence[ChildLink]) -> list[str]:
        """Each linked child's status: held when this engine finished it (a terminal status never
        changes, and a child is deleted only after its parent), else its stream's label."""
        statuses: list[str | None] = [self._held_status(link.child_run_id) for link in links]
        unknown = [i for i, status in enumerate(statuses) if status is None]
        heads = await asyncio.gather(
            *(self.store.head(run_stream_id(links[i].child_run_id)) for i in unknown)
        )
        for i, (head, label) in zip(unknown, heads, strict=True):
            statuses[i] = run_status(label) if head else PENDING
        return [status or PENDING for status in statuses]

    def _held_status(self, run_id: str) -> str | None:
        """The terminal status of a run this engine finished and still holds (None: not held)."""
        held = self.reader.finished_run(run_id)
        terminal = held[1].terminal if held is not None else None
        return terminal.status if terminal is not None else None

    async def reruns_of(self, run_id: str) -> list[str]:
        """The reruns of a run, oldest first (the first MAX_RERUNS_SHOWN), from the store's index."""
        summaries, _ = await self.store.list_streams(
            prefix=RUN_STREAM_PREFIX, page_size=MAX_RERUNS_SHOWN, attributes={RERUN_OF_ATTRIBUTE: run_id}
        )
        return [run_id_of_stream(s.stream_id) for s in reversed(summaries)]

    async def list_runs(
        self, statuses: Sequence[str], page_size: int, page_token: str, where: RunFilter | None = None
    ) -> tuple[list[RunSummary], str]:
        """A page of runs with one of `statuses` (RUNNING or terminal; all when empty) that `where`
        keeps, newest first: one store listing, its filters answered by the store's indexes."""
        where = where or RunFilter()
        # A running run's stream is active, or parked while it waits.
        labels: list[str] = []
        for status in statuses:
            labels.extend(RUN_LIVE_LABELS if status == RUNNING else (run_label(status),))
        streams, token = await self.store.list_streams(
            prefix=RUN_STREAM_PREFIX,
            statuses=labels,
            page_size=page_size,
            page_token=page_token,
            attributes=where.attributes(),
            created_after=where.started_after,
            created_before=where.started_before,
            min_duration=where.min_duration,
            max_duration=where.max_duration,
        )
        runs = [
            RunSummary(
                run_id_of_stream(s.stream_id),
                run_status(s.status),
                s.created_at,
                s.updated_at,
                s.head_seq,
                s.attributes.get(PIPELINE_ATTRIBUTE, ""),
                labels_of(s.attributes),
                s.attributes.get(PARENT_ATTRIBUTE, ""),
            )
            for s in streams
        ]
        return runs, token

    async def watch_run(self, run_id: str, after_seq: int) -> AsyncGenerator[StoredEvent, None]:
        """The run's events after `after_seq` as they are appended; ends after RunCompleted.

        `run_not_found` before the first event when the run does not exist.
        """
        events, history = await self.reader.read_history(run_id)
        if history.is_terminal and after_seq >= events[-1].seq:
            return
        subscription = self.store.subscribe(run_stream_id(run_id), after_seq=after_seq)
        async with contextlib.aclosing(subscription):
            async for raw in subscription:
                stored = stored_events([raw])[0]
                _check_showable(run_id, stored)
                yield stored
                if isinstance(stored.event, RunCompleted):
                    return


def _check_showable(run_id: str, stored: StoredEvent) -> None:
    """DATA_LOSS `corrupt_event` for an event that cannot be shown: undecodable, or (decoded) beyond
    what JSON on the wire may be (a stray append)."""
    event = stored.event
    if isinstance(event, CorruptEvent):
        raise corrupt_event_error(run_stream_id(run_id), stored.seq, event)
    type_name, data = event_type_and_json(event)
    try:
        check_json(data, f"event {stored.seq}")
    except KeelError as error:
        corrupt = CorruptEvent(type_name, error.message)
        raise corrupt_event_error(run_stream_id(run_id), stored.seq, corrupt) from None
