"""The engine's Prometheus metrics and the step log context (RPC metrics come from keel_core.metrics).

Runs started and finished are counted from what this engine made durable (RunStarted and
RunCompleted events its appends committed), so a run is counted once however it got there
(StartRun, resume, terminalize, a child run). Step durations and retries are measured around the
op call itself, which also binds run_id, step_id and attempt for every log line the op's attempt
produces (its I/O included).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine_service.domain import RunCompleted, StepContext, decode_event
from engine_service.domain.ops import OpDefinition, OpFunction, OpRegistry
from engine_service.domain.streams import (
    RUN_COMPLETED,
    RUN_STARTED,
    RUN_STREAM_PREFIX,
    TASK_COMPLETED,
    TASK_EXPIRED,
    TASK_FAILED,
    TASK_STREAM_PREFIX,
    TERMINAL_STATUSES,
    run_id_of_stream,
)
from engine_service.domain.tasks import TaskExpired, TaskFailed, TaskScheduled, decode_task_event
from keel_core.logs import log_context
from keel_core.metrics import REGISTRY

log = logging.getLogger("engine_service.runs")

RUNS_STARTED = Counter(
    "keel_engine_runs_started",
    "Runs started: RunStarted events this engine made durable.",
    registry=REGISTRY,
)
RUNS_FINISHED = Counter(
    "keel_engine_runs_finished",
    "Runs finished, by terminal status (completed, failed, canceled): RunCompleted events this "
    "engine made durable.",
    ["status"],
    registry=REGISTRY,
)
STEP_SECONDS = Histogram(
    "keel_engine_step_duration_seconds",
    "Time one step attempt's op took, by op id and outcome (completed, failed, cancelled).",
    ["op", "outcome"],
    registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
STEP_RETRIES = Counter(
    "keel_engine_step_retries",
    "Step attempts after a step's first (attempt > 0), by op id.",
    ["op"],
    registry=REGISTRY,
)
LEASE_TAKEOVERS = Counter(
    "keel_engine_lease_takeovers",
    "Runs this engine took over from another engine whose lease had expired or been released.",
    registry=REGISTRY,
)
TASK_OUTCOMES = Counter(
    "keel_engine_task_outcomes",
    "Remote step attempts (tasks) ended, by outcome (completed, failed: the worker said so; expired: "
    "the engine ended it) and code (the failure's or expiry's code: step_timeout, task_lease_expired, "
    "schedule_to_start_timeout, run_ended, ...; empty when completed). Counted by the engine whose "
    "append ended the task.",
    ["outcome", "code"],
    registry=REGISTRY,
)
TASK_SCHEDULE_TO_START = Histogram(
    "keel_engine_task_schedule_to_start_seconds",
    "Time from a task's creation to its claim by a worker, by task queue (claims this engine made).",
    ["queue"],
    registry=REGISTRY,
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300),
)
TASK_BACKLOG = Gauge(
    "keel_engine_task_backlog",
    "Tasks waiting for a worker, by task queue (from the store's index, refreshed every "
    "QUEUE_REFRESH_SECONDS while metrics are served).",
    ["queue"],
    registry=REGISTRY,
)
TASKS_RUNNING = Gauge(
    "keel_engine_tasks_running",
    "Tasks claimed by a worker and not ended, by task queue (refreshed like keel_engine_task_backlog).",
    ["queue"],
    registry=REGISTRY,
)
QUEUE_REFRESH_SECONDS = 5.0
_TASK_OUTCOMES = {TASK_COMPLETED: "completed", TASK_FAILED: "failed", TASK_EXPIRED: "expired"}

RETENTION_RUNS_DELETED = Counter(
    "keel_engine_retention_runs_deleted",
    "Runs this engine deleted (DeleteRun or --retention), each with every stream it owned.",
    registry=REGISTRY,
)
RETENTION_STREAMS_DELETED = Counter(
    "keel_engine_retention_streams_deleted",
    "Streams this engine deleted with the runs that owned them.",
    registry=REGISTRY,
)
RETENTION_ARTIFACTS_DELETED = Counter(
    "keel_engine_retention_artifacts_deleted",
    "Artifacts this engine's collections deleted (no stream mentioned them; not stored again since).",
    registry=REGISTRY,
)
for _status in TERMINAL_STATUSES:
    RUNS_FINISHED.labels(_status)  # present at 0 from the start, so rates work from the first scrape


class DrivesRuns(Protocol):
    """Something driving runs: one task per run in `drivers` (the Engine)."""

    @property
    def drivers(self) -> Mapping[str, Any]:
        """Run id -> the task driving it."""
        ...


_ENGINES: weakref.WeakSet[Any] = weakref.WeakSet()


class _RunsInFlight(Collector):
    """`keel_engine_runs_in_flight`, read from the engines at scrape time (never drifts)."""

    def collect(self) -> Iterator[Metric]:
        """One gauge: runs with a driver in this process."""
        driven = sum(len(engine.drivers) for engine in list(_ENGINES))
        yield GaugeMetricFamily(
            "keel_engine_runs_in_flight",
            "Runs this engine process is driving now (started or resumed, not yet finished or parked).",
            value=driven,
        )


REGISTRY.register(_RunsInFlight())


def track_engine(engine: DrivesRuns) -> None:
    """Count `engine`'s runs in `keel_engine_runs_in_flight` for as long as it exists."""
    _ENGINES.add(engine)


def count_appended(stream_id: str, events: Sequence[tuple[str, bytes]]) -> None:
    """Count the runs an append (now durable) started or finished, and log them; and the tasks it ended."""
    if stream_id.startswith(TASK_STREAM_PREFIX):
        _count_task_outcomes(events)
        return
    if not stream_id.startswith(RUN_STREAM_PREFIX):
        return
    run_id = run_id_of_stream(stream_id)
    for type_name, payload in events:
        if type_name == RUN_STARTED:
            RUNS_STARTED.inc()
            log.info("run started", extra={"run_id": run_id})
        elif type_name == RUN_COMPLETED:
            event = decode_event(type_name, payload)
            status = event.status if isinstance(event, RunCompleted) else "unknown"
            RUNS_FINISHED.labels(status).inc()
            log.info("run finished: %s", status, extra={"run_id": run_id, "status": status})


def _count_task_outcomes(events: Sequence[tuple[str, bytes]]) -> None:
    for type_name, payload in events:
        outcome = _TASK_OUTCOMES.get(type_name)
        if outcome is None:
            continue
        event = decode_task_event(type_name, payload)
        code = event.error.code if isinstance(event, TaskExpired | TaskFailed) else ""
        TASK_OUTCOMES.labels(outcome, code).inc()


def observe_claim(scheduled: TaskScheduled, seconds: float) -> None:
    """A task this engine handed to a worker, `seconds` after it was created."""
    TASK_SCHEDULE_TO_START.labels(scheduled.task_queue).observe(seconds)


class ListsQueues(Protocol):
    """What the queue gauges read: engine_service.runtime.task_service.TaskService."""

    async def list_queues(self) -> Sequence[Any]:
        """Each queue's name, backlog and running count."""
        ...


async def refresh_queue_gauges(tasks: ListsQueues) -> None:
    """Keep keel_engine_task_backlog and keel_engine_tasks_running current (until cancelled)."""
    shown: set[str] = set()
    while True:
        try:
            queues = await tasks.list_queues()
        except Exception as error:  # the store away: the gauges keep their last values
            log.debug("queue gauges not refreshed: %s", error)
        else:
            now = {queue.task_queue for queue in queues}
            for queue in queues:
                TASK_BACKLOG.labels(queue.task_queue).set(queue.backlog)
                TASKS_RUNNING.labels(queue.task_queue).set(queue.running)
            for gone in shown - now:
                TASK_BACKLOG.labels(gone).set(0)
                TASKS_RUNNING.labels(gone).set(0)
            shown |= now
        await asyncio.sleep(QUEUE_REFRESH_SECONDS)


def metered_ops(registry: OpRegistry) -> OpRegistry:
    """The same ops, each call timed, its retries counted, and its log lines given the step context."""
    out = OpRegistry()
    for definition in registry.all():
        out.register(replace(definition, function=_metered(definition)))
    return out


def _since(started: float) -> float:
    return time.perf_counter() - started


def _metered(definition: OpDefinition) -> OpFunction:
    op_id = definition.op_id
    function = definition.function
    seconds: dict[str, Any] = {}  # outcome -> its series, looked up once (a series shows once used)

    async def metered(ctx: StepContext, op_config: Any, input: Any) -> Any:
        with log_context(run_id=ctx.run_id, step_id=ctx.step_id, attempt=ctx.attempt, op_id=op_id):
            if ctx.attempt > 0:
                STEP_RETRIES.labels(op_id).inc()
            log.debug("step attempt started (op %s)", op_id)
            started = time.perf_counter()
            outcome = "failed"
            try:
                output = await function(ctx, op_config, input)
                outcome = "completed"
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            except Exception as error:
                log.warning("step attempt failed after %.3fs (op %s): %s", _since(started), op_id, error)
                raise
            finally:
                if outcome not in seconds:
                    seconds[outcome] = STEP_SECONDS.labels(op_id, outcome)
                seconds[outcome].observe(_since(started))
            log.info("step attempt completed in %.3fs (op %s)", _since(started), op_id)
            return output

    return metered


__all__ = [
    "LEASE_TAKEOVERS",
    "RUNS_FINISHED",
    "RUNS_STARTED",
    "STEP_RETRIES",
    "STEP_SECONDS",
    "TASKS_RUNNING",
    "TASK_BACKLOG",
    "TASK_OUTCOMES",
    "TASK_SCHEDULE_TO_START",
    "count_appended",
    "metered_ops",
    "observe_claim",
    "refresh_queue_gauges",
    "track_engine",
]
