"""Rerun from a step, as data: what the first append of a rerun holds.

`RerunRun{run_id, from_step_id}` starts a new run of a terminal run's manifest that executes
`from_step_id` and its descendants again and reuses every other step the old run completed: the
new run's first append is its RunStarted (naming the old run and the step), then for each reused
step, in plan order, the old run's FactRecorded events of that step (selected by step id) and a
StepCompleted marked `reused_from_run_id`. One checkpoint serves every reused step: the initial
context plus the reused steps' outputs, taken from the old run's last checkpoint (a step completes
once, so its output is the same in every later checkpoint). A step the old run did not complete is
not reused, whatever its place in the plan. Children that reused steps spawned are linked to the
new run (their ids are in the copied spawn facts), so none of them runs again.

Everything is decided before anything is written, and the run stream is written in ONE append: a
rerun either exists with all its reused steps or does not exist at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine_service.domain.canonical import artifact_id_for_bytes, canonical_json_bytes
from engine_service.domain.child_runs import SPAWN_NAMESPACE
from engine_service.domain.context import SNAPSHOT_ARTIFACT_KIND, with_step_output
from engine_service.domain.events import FactRecorded, KernelEvent, RunStarted, StepCompleted, encode_event
from engine_service.domain.history import RunHistory
from engine_service.domain.labels import RERUN_OF_ATTRIBUTE, run_attributes
from engine_service.domain.manifest import MANIFEST_ARTIFACT_KIND, RunStart
from engine_service.domain.plan import Plan
from keel_core.errors import ErrorCategory, KeelError, not_found

# What one append may carry: the store's MAX_BATCH_EVENTS, and payloads well within a gRPC message.
MAX_RERUN_EVENTS = 1000
MAX_RERUN_BYTES = 12 * 1024 * 1024


@dataclass(frozen=True)
class RerunStart:
    """The first append of a rerun (RunStarted, then the reused steps' events), and what it reuses."""

    start: RunStart
    reused_steps: tuple[str, ...]
    # The children reused steps spawned (their child run ids): linked to the new run too.
    reused_children: frozenset[str]


def descendants(plan: Plan, step_id: str) -> frozenset[str]:
    """The steps that depend on `step_id`, directly or transitively."""
    return frozenset(s for s, ancestors in plan.ancestors.items() if step_id in ancestors)


def reused_steps(plan: Plan, old: RunHistory, from_step_id: str) -> tuple[str, ...]:
    """The steps a rerun from `from_step_id` reuses, in plan order: completed, and not rerun."""
    rerun = descendants(plan, from_step_id) | {from_step_id}
    return tuple(s for s in plan.step_ids if s not in rerun and s in old.completed_steps)


def check_rerun(plan: Plan, old: RunHistory, run_id: str, from_step_id: str) -> None:
    """`run_not_terminal` (FAILED_PRECONDITION) or `step_not_found` (NOT_FOUND) when a rerun cannot be."""
    if old.terminal is None:
        raise KeelError(
            "run_not_terminal",
            f"run {run_id} has not ended; rerun it once it is completed, failed or canceled "
            "(or terminalize it first)",
            category=ErrorCategory.FAILED_PRECONDITION,
            details={"run_id": run_id},
        )
    if from_step_id not in plan.step_ids:
        raise not_found(
            "step_not_found",
            f"run {run_id} has no step {from_step_id!r} (its steps: {', '.join(plan.step_ids)})",
            run_id=run_id,
            step_id=from_step_id,
        )


def rerun_start(
    plan: Plan,
    old: RunHistory,
    old_run_id: str,
    old_checkpoint: Mapping[str, Any],
    initial_context: Mapping[str, Any],
    from_step_id: str,
    *,
    at_us: int,
    manifest_bytes: bytes = b"",
    trace_context: Mapping[str, str] | None = None,
) -> RerunStart:
    """The first append of a rerun of `old_run_id` from `from_step_id` (checked by `check_rerun`).

    `old_checkpoint`: the old run's last checkpoint (it holds every completed step's output).
    `manifest_bytes`: the manifest's canonical bytes. The manifest and the initial snapshot the new
    run shares with the old one travel in its first append again (a no-op for the store's content,
    which renews their stored time: an artifact collection running meanwhile keeps them).
    """
    started = old.started
    assert started is not None
    check_rerun(plan, old, old_run_id, from_step_id)
    reused = reused_steps(plan, old, from_step_id)
    checkpoint: dict[str, Any] = dict(initial_context)
    for step_id in reused:
        checkpoint = with_step_output(checkpoint, step_id, old_checkpoint.get(step_id))
    snapshot = canonical_json_bytes(checkpoint)
    snapshot_id = artifact_id_for_bytes(snapshot)
    first = RunStarted(
        started.op_id,
        started.manifest_id,
        started.initial_snapshot_id,
        at_us=at_us,
        labels=dict(started.labels),
        rerun_of_run_id=old_run_id,
        rerun_from_step_id=from_step_id,
        trace_context=dict(trace_context or {}),
    )
    events: list[KernelEvent] = []
    children: set[str] = set()
    wanted = set(reused)
    facts_by_step: dict[str, list[FactRecorded]] = {}
    for fact in old.facts.values():  # in the order they were recorded
        if fact.step_id in wanted:
            facts_by_step.setdefault(fact.step_id, []).append(fact)
            if fact.namespace == SPAWN_NAMESPACE and isinstance(fact.response, dict):
                children.add(str(fact.response.get("child_run_id", "")))
    for step_id in reused:
        events.extend(facts_by_step.get(step_id, ()))
        attempt = old.last_attempt.get(step_id, 0)
        events.append(StepCompleted(step_id, attempt, snapshot_id, at_us, reused_from_run_id=old_run_id))
    size = len(snapshot) + sum(len(encode_event(event)[1]) for event in events)
    if len(events) + 1 > MAX_RERUN_EVENTS or size > MAX_RERUN_BYTES:
        raise KeelError(
            "rerun_too_large",
            f"a rerun of run {old_run_id} from step {from_step_id!r} would copy {len(events)} events "
            f"({size} bytes: its reused steps and their facts); one append holds at most "
            f"{MAX_RERUN_EVENTS} events and {MAX_RERUN_BYTES} bytes",
            category=ErrorCategory.FAILED_PRECONDITION,
            details={"run_id": old_run_id, "events": len(events), "bytes": size},
        )
    attributes = run_attributes(started.op_id, "", started.labels)
    attributes[RERUN_OF_ATTRIBUTE] = old_run_id
    artifacts = [(SNAPSHOT_ARTIFACT_KIND, snapshot)]
    initial = canonical_json_bytes(dict(initial_context))
    if artifact_id_for_bytes(initial) == started.initial_snapshot_id:
        artifacts.append((SNAPSHOT_ARTIFACT_KIND, initial))
    if manifest_bytes and artifact_id_for_bytes(manifest_bytes) == started.manifest_id:
        artifacts.append((MANIFEST_ARTIFACT_KIND, manifest_bytes))
    start = RunStart(
        first,
        started.manifest_id,
        started.initial_snapshot_id,
        artifacts,
        attributes,
        copied=tuple(events),
    )
    return RerunStart(start, reused, frozenset(children - {""}))


def is_same_rerun(started: RunStarted | None, old_run_id: str, from_step_id: str) -> bool:
    """Whether a run's RunStarted says it is the rerun of `old_run_id` from `from_step_id`."""
    return (
        started is not None
        and started.rerun_of_run_id == old_run_id
        and started.rerun_from_step_id == from_step_id
    )
