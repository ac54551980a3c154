"""Pipelines and plans: steps with dependencies, resolved against the ops, in a deterministic order.

Steps whose dependencies are complete run at once, up to the pipeline's `max_parallel` (0: no
limit); a step sees the outputs of its `ancestors` (its dependencies, directly or transitively)
and of no other step. A plan's order is topological with ties broken by declaration order
(Kahn's algorithm that always takes the earliest-declared ready step), so the same pipeline always
lists its steps in the same order. Everything wrong with a pipeline is `invalid_plan`, naming the
step concerned.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine_service.domain.canonical import canonical_json_bytes
from engine_service.domain.tasks import NO_TIMEOUTS, StepTimeouts, check_queue_name
from keel_core.errors import KeelError, invalid_argument

MAX_ID_CHARS = 128
MAX_STEPS = 1000
DEFAULT_VERSION = "1"


class OpCatalog(Protocol):
    """What plan resolution needs from the op registry."""

    def has_op(self, op_id: str, op_version: str) -> bool:
        """True when (op_id, op_version) is registered."""
        ...


@dataclass(frozen=True)
class StepSpec:
    """One declared step of a pipeline."""

    step_id: str
    op_id: str
    op_version: str = DEFAULT_VERSION
    op_config: Any = None
    depends_on: tuple[str, ...] = ()
    # Set: a remote step, executed by a worker polling this queue (not looked up in the engine's ops).
    task_queue: str = ""
    timeouts: StepTimeouts = NO_TIMEOUTS

    def to_json(self) -> dict[str, Any]:
        """The step as manifest JSON (queue and timeouts only when set: older manifests keep their id)."""
        data: dict[str, Any] = {
            "step_id": self.step_id,
            "op_id": self.op_id,
            "op_version": self.op_version,
            "op_config": self.op_config,
            "depends_on": list(self.depends_on),
        }
        if self.task_queue:
            data["task_queue"] = self.task_queue
        if timeouts := self.timeouts.to_json():
            data["timeouts"] = timeouts
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> StepSpec:
        """A step read back from manifest JSON."""
        return StepSpec(
            step_id=str(data["step_id"]),
            op_id=str(data["op_id"]),
            op_version=str(data.get("op_version") or DEFAULT_VERSION),
            op_config=data.get("op_config"),
            depends_on=tuple(str(dep) for dep in data.get("depends_on", ())),
            task_queue=str(data.get("task_queue") or ""),
            timeouts=StepTimeouts.from_json(data.get("timeouts")),
        )


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline as declared: its id (the run's op id), version and steps."""

    pipeline_id: str
    pipeline_version: str
    steps: tuple[StepSpec, ...]
    max_parallel: int = 0

    def to_json(self) -> dict[str, Any]:
        """The pipeline as manifest JSON (`max_parallel` only when set: older manifests keep their id)."""
        data: dict[str, Any] = {
            "pipeline_id": self.pipeline_id,
            "pipeline_version": self.pipeline_version,
            "steps": [step.to_json() for step in self.steps],
        }
        if self.max_parallel:
            data["max_parallel"] = self.max_parallel
        return data

    def canonical_bytes(self) -> bytes:
        """The pipeline as canonical JSON bytes (encoded once: a pipeline is never changed)."""
        return self._canonical_bytes

    @functools.cached_property
    def _canonical_bytes(self) -> bytes:
        return canonical_json_bytes(self.to_json())

    def ordered_steps(self) -> tuple[StepSpec, ...]:
        """`topological_order(steps)`, ordered once (a pipeline object serves every run started
        with it: engine_service.wire.messages); a cycle is `invalid_plan` at every call."""
        return self._ordered_steps

    @functools.cached_property
    def _ordered_steps(self) -> tuple[StepSpec, ...]:
        return topological_order(self.steps)

    def ancestors(self) -> Mapping[str, frozenset[str]]:
        """`ancestors_of(ordered_steps())`, found once: every plan of the pipeline shares it, and
        only reads it (a dict, not a read-only proxy: a pipeline stays copyable)."""
        return self._ancestors

    @functools.cached_property
    def _ancestors(self) -> Mapping[str, frozenset[str]]:
        return ancestors_of(self.ordered_steps())

    @staticmethod
    def from_json(data: dict[str, Any]) -> PipelineSpec:
        """A pipeline read back from manifest JSON."""
        return PipelineSpec(
            pipeline_id=str(data["pipeline_id"]),
            pipeline_version=str(data.get("pipeline_version") or DEFAULT_VERSION),
            steps=tuple(StepSpec.from_json(step) for step in data["steps"]),
            max_parallel=int(data.get("max_parallel") or 0),
        )


def single_op_pipeline(
    op_id: str,
    op_version: str,
    op_config: Any,
    task_queue: str = "",
    timeouts: StepTimeouts = NO_TIMEOUTS,
) -> PipelineSpec:
    """The one-step pipeline (step id `main`) that runs a single op (on a worker of `task_queue` if set)."""
    version = op_version or DEFAULT_VERSION
    step = StepSpec("main", op_id, version, op_config, task_queue=task_queue, timeouts=timeouts)
    return PipelineSpec(op_id, version, (step,))


@dataclass(frozen=True)
class Plan:
    """A pipeline resolved against the ops: its steps in execution order."""

    op_id: str
    steps: tuple[StepSpec, ...]
    max_parallel: int = 0  # 0: every ready step runs at once
    # step id -> the steps it depends on, directly or transitively (what its context holds)
    ancestors: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def step(self, step_id: str) -> StepSpec:
        """The step with this id."""
        for step in self.steps:
            if step.step_id == step_id:
                return step
        raise KeyError(step_id)

    @property
    def step_ids(self) -> tuple[str, ...]:
        """The step ids in execution order."""
        return tuple(step.step_id for step in self.steps)


def invalid_plan(message: str, step_id: str | None = None) -> KeelError:
    """An `invalid_plan` error, naming the offending step when there is one."""
    details = {"step_id": step_id} if step_id is not None else {}
    return invalid_argument("invalid_plan", message, **details)


def _check_id(kind: str, value: str, step_id: str | None) -> None:
    if not value or len(value) > MAX_ID_CHARS:
        raise invalid_plan(f"{kind} must be 1 to {MAX_ID_CHARS} characters, got {value!r}", step_id)


def resolve_plan(pipeline: PipelineSpec, catalog: OpCatalog) -> Plan:
    """Check a pipeline against the ops and order its steps; anything wrong is `invalid_plan`."""
    _check_id("pipeline_id", pipeline.pipeline_id, None)
    if not pipeline.steps:
        raise invalid_plan("a pipeline needs at least one step")
    if pipeline.max_parallel < 0:
        raise invalid_plan(
            f"max_parallel must be 0 (no limit) or a positive number of steps, got {pipeline.max_parallel}"
        )
    if len(pipeline.steps) > MAX_STEPS:
        raise invalid_plan(f"a pipeline has at most {MAX_STEPS} steps, got {len(pipeline.steps)}")
    seen: set[str] = set()
    for step in pipeline.steps:
        _check_id("step_id", step.step_id, step.step_id or None)
        if step.step_id in seen:
            raise invalid_plan(f"step id {step.step_id!r} is declared twice", step.step_id)
        seen.add(step.step_id)
    for step in pipeline.steps:
        _check_id("op_id", step.op_id, step.step_id)
        for dep in step.depends_on:
            if dep not in seen:
                raise invalid_plan(f"step {step.step_id!r} depends on unknown step {dep!r}", step.step_id)
            if dep == step.step_id:
                raise invalid_plan(f"step {step.step_id!r} depends on itself", step.step_id)
        _check_execution(step)
        if step.task_queue:
            continue  # a worker of the queue runs it: the engine's ops are not asked
        if not catalog.has_op(step.op_id, step.op_version):
            raise invalid_plan(
                f"step {step.step_id!r} uses op {step.op_id!r} version {step.op_version!r}, "
                "which this engine does not have (see ListOps)",
                step.step_id,
            )
    return Plan(pipeline.pipeline_id, pipeline.ordered_steps(), pipeline.max_parallel, pipeline.ancestors())


def _check_execution(step: StepSpec) -> None:
    """The step's task queue (when set) and timeouts must make sense: `invalid_plan` otherwise."""
    if step.task_queue:
        try:
            check_queue_name(step.task_queue, f"step {step.step_id!r}: task_queue")
        except KeelError as error:
            raise invalid_plan(error.message, step.step_id) from None
    limits = step.timeouts
    for name, value in (
        ("start_to_close_timeout", limits.start_to_close_ms),
        ("heartbeat_timeout", limits.heartbeat_ms),
        ("schedule_to_start_timeout", limits.schedule_to_start_ms),
    ):
        if value < 0:
            raise invalid_plan(f"step {step.step_id!r}: {name} must not be negative", step.step_id)
    if not step.task_queue and (limits.heartbeat_ms or limits.schedule_to_start_ms):
        raise invalid_plan(
            f"step {step.step_id!r}: heartbeat_timeout and schedule_to_start_timeout apply to remote steps "
            "only (set task_queue, or use start_to_close_timeout)",
            step.step_id,
        )


def ancestors_of(ordered: Sequence[StepSpec]) -> dict[str, frozenset[str]]:
    """Step id -> every step it depends on, directly or transitively (`ordered`: dependencies first)."""
    ancestors: dict[str, frozenset[str]] = {}
    for step in ordered:
        found = set(step.depends_on)
        for dep in step.depends_on:
            found |= ancestors[dep]
        ancestors[step.step_id] = frozenset(found)
    return ancestors


def topological_order(steps: Sequence[StepSpec]) -> tuple[StepSpec, ...]:
    """Steps ordered so dependencies come first, ties by declaration order; a cycle is `invalid_plan`."""
    remaining = list(steps)
    done: set[str] = set()
    ordered: list[StepSpec] = []
    while remaining:
        ready = next((step for step in remaining if all(dep in done for dep in step.depends_on)), None)
        if ready is None:
            culprit = remaining[0].step_id
            raise invalid_plan(f"steps form a dependency cycle through step {culprit!r}", culprit)
        ordered.append(ready)
        done.add(ready.step_id)
        remaining.remove(ready)
    return tuple(ordered)
