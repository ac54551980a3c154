"""A run as people and clients see it (GetRun): built purely from its stored events and manifest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from engine_service.domain import (
    CANCELED,
    COMPLETED,
    FAILED,
    ErrorRecord,
    RunCompleted,
    RunManifest,
    RunStarted,
    StepAttemptFailed,
    StepAttemptStarted,
    StepCompleted,
    StoredEvent,
)
from engine_service.domain.plan import topological_order

RUNNING = "running"
PENDING = "pending"
RETRYING = "retrying"
_ABANDONED = ErrorRecord("attempt_abandoned", "engine", True, "the engine stopped during this attempt")


@dataclass
class AttemptView:
    """One attempt of one step, timed by when the engine decided its events."""

    attempt: int
    status: str = RUNNING
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ErrorRecord | None = None


@dataclass
class StepView:
    """A step and its attempts."""

    step_id: str
    op_id: str
    op_version: str
    status: str = PENDING
    attempts: list[AttemptView] = field(default_factory=list)
    last_error: ErrorRecord | None = None


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


def build_run_view(run_id: str, events: Sequence[StoredEvent], manifest: RunManifest | None) -> RunView:
    """The view of a run from its events (and its manifest, for the step list)."""
    view = RunView(run_id=run_id)
    steps: dict[str, StepView] = {}
    if manifest is not None:
        view.input, view.has_input = manifest.input, True
        for spec in topological_order(manifest.pipeline.steps):
            steps[spec.step_id] = StepView(spec.step_id, spec.op_id, spec.op_version)
    for stored in events:
        view.head_seq = stored.seq
        when = decided_at(stored)
        view.updated_at = when or view.updated_at
        event = stored.event
        match event:
            case RunStarted():
                view.op_id, view.manifest_id = event.op_id, event.manifest_id
                view.parent_run_id, view.parent_fact_key = event.parent_run_id, event.parent_fact_key
                view.created_at = when
            case StepAttemptStarted():
                step = steps.setdefault(event.step_id, StepView(event.step_id, "", ""))
                for earlier in step.attempts:
                    if earlier.status == RUNNING:  # an orphan: its engine stopped inside it
                        earlier.status, earlier.error = FAILED, _ABANDONED
                step.attempts.append(AttemptView(event.attempt, RUNNING, when))
                step.status = RUNNING
            case StepAttemptFailed():
                step = steps.setdefault(event.step_id, StepView(event.step_id, "", ""))
                attempt = _attempt(step, event.attempt, when)
                attempt.status, attempt.finished_at, attempt.error = FAILED, when, event.error
                step.status, step.last_error = RETRYING, event.error
            case StepCompleted():
                step = steps.setdefault(event.step_id, StepView(event.step_id, "", ""))
                attempt = _attempt(step, event.attempt, when)
                attempt.status, attempt.finished_at = COMPLETED, when
                step.status = COMPLETED
            case RunCompleted():
                view.status = event.status
                view.completed_at = when
                view.final_snapshot_id = event.final_snapshot_id
                view.reason, view.error = event.reason, event.error
                if event.status in (FAILED, CANCELED):
                    for step in steps.values():
                        if step.status in (RETRYING, RUNNING):
                            step.status = FAILED
    view.steps = list(steps.values())
    return view


def decided_at(stored: StoredEvent) -> datetime | None:
    """When the engine decided the event (its `at_us`), else when the store committed it."""
    at_us = getattr(stored.event, "at_us", 0)
    if at_us:
        return datetime.fromtimestamp(at_us / 1_000_000, tz=UTC)
    return stored.recorded_at


def _attempt(step: StepView, number: int, when: datetime | None) -> AttemptView:
    for attempt in step.attempts:
        if attempt.attempt == number:
            return attempt
    attempt = AttemptView(number, RUNNING, when)
    step.attempts.append(attempt)
    return attempt
