"""Protobuf messages <-> engine domain values (the only module of the engine that knows both)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from keel.engine.v1 import engine_pb2

from engine_service.domain import (
    CANCELED,
    COMPLETED,
    FAILED,
    BuildProvenance,
    ErrorRecord,
    PipelineSpec,
    RunConfig,
    RunManifest,
    StepSpec,
    StoredEvent,
    canonical_json_bytes,
    make_run_config,
    parse_run_id,
    single_op_pipeline,
)
from engine_service.domain.child_runs import (
    AWAIT_KIND,
    CLOSE_ABANDON,
    CLOSE_CANCEL,
    SPAWN_KIND,
    ChildAwaitRequest,
    ChildSpawnRequest,
    request_invalid,
)
from engine_service.domain.events import event_type_and_json
from engine_service.domain.labels import CHILD, TOP_LEVEL, check_labels
from engine_service.domain.run_config import LIVE, REPLAY
from engine_service.domain.signals import (
    MAX_START_SIGNALS,
    Signal,
    check_signal_id,
    check_signal_name,
    check_signal_payload,
    start_signal_id,
)
from engine_service.domain.tasks import StepTimeouts
from engine_service.runtime.views import (
    PENDING,
    RETRYING,
    RUNNING,
    WAITING,
    AttemptView,
    RunFilter,
    RunSummary,
    RunView,
    StepView,
)
from keel_core.errors import KeelError, invalid_argument
from keel_core.json_values import from_value, set_value, to_struct
from keel_core.recent import Recent

MAX_INPUT_BYTES = 1024 * 1024
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

RUN_STATUS = {
    RUNNING: engine_pb2.RUN_STATUS_RUNNING,
    COMPLETED: engine_pb2.RUN_STATUS_COMPLETED,
    FAILED: engine_pb2.RUN_STATUS_FAILED,
    CANCELED: engine_pb2.RUN_STATUS_CANCELED,
    PENDING: engine_pb2.RUN_STATUS_PENDING,  # a child recorded on its parent, not started
}
# The statuses ListRuns filters by (a PENDING child is not a run of its own yet).
LISTED_STATUS: dict[int, str] = {
    engine_pb2.RUN_STATUS_RUNNING: RUNNING,
    engine_pb2.RUN_STATUS_COMPLETED: COMPLETED,
    engine_pb2.RUN_STATUS_FAILED: FAILED,
    engine_pb2.RUN_STATUS_CANCELED: CANCELED,
}


def listed_status(status: int) -> str:
    """The run status a ListRuns status filter stands for; INVALID_ARGUMENT for any other status.

    RUN_STATUS_PENDING is refused: a pending run is a child its parent linked but never started,
    so it has no run stream for ListRuns to list (GetRun of the parent shows it among `children`).
    """
    listed = LISTED_STATUS.get(status)
    if listed is not None:
        return listed
    accepted = ", ".join(engine_pb2.RunStatus.Name(s) for s in LISTED_STATUS)  # type: ignore[arg-type]
    if status == engine_pb2.RUN_STATUS_PENDING:
        why = (
            "RUN_STATUS_PENDING cannot filter ListRuns: a pending run is a child its parent linked "
            "but never started, and has no run stream to list (GetRun of the parent shows it)"
        )
    else:
        why = f"unknown run status {status} in statuses"
    raise invalid_argument("invalid_argument", f"{why}; accepted statuses: {accepted}", status=status)


STEP_STATUS = {
    PENDING: engine_pb2.STEP_STATUS_PENDING,
    RUNNING: engine_pb2.STEP_STATUS_RUNNING,
    RETRYING: engine_pb2.STEP_STATUS_RETRYING,
    COMPLETED: engine_pb2.STEP_STATUS_COMPLETED,
    FAILED: engine_pb2.STEP_STATUS_FAILED,
    WAITING: engine_pb2.STEP_STATUS_WAITING,
}


def _json(value: Any, field: str, *, default: Any = None) -> Any:
    # INVALID_ARGUMENT `invalid_json` naming the place (`input.a[3]`) when keel_core.json_rules refuses it.
    return from_value(value, default=default, path=field)


def _size_checked(data: Any, field: str, limit: int = MAX_INPUT_BYTES) -> Any:
    size = len(canonical_json_bytes(data))
    if size > limit:
        raise _too_large(field, size, limit)
    return data


def _too_large(field: str, size: int, limit: int) -> KeelError:
    return invalid_argument(
        "input_too_large", f"{field} is {size} bytes of JSON; the limit is {limit}", size=size, limit=limit
    )


# google.protobuf.Duration's documented range: about 10,000 years, nanos within one second.
MAX_DURATION_SECONDS = 315_576_000_000


def seconds_from(duration: duration_pb2.Duration, field: str, reason: str = "invalid_argument") -> float:
    """A non-negative google.protobuf.Duration in seconds; INVALID_ARGUMENT `reason` otherwise."""
    if duration.seconds < 0 or duration.nanos < 0:
        raise _invalid_duration(field, "must not be negative", reason)
    if duration.seconds > MAX_DURATION_SECONDS or duration.nanos > 999_999_999:
        raise _invalid_duration(
            field,
            f"is beyond google.protobuf.Duration's range (seconds at most {MAX_DURATION_SECONDS}, "
            "nanos at most 999999999)",
            reason,
        )
    return duration.seconds + duration.nanos / 1e9


def _invalid_duration(field: str, why: str, reason: str = "invalid_argument") -> KeelError:
    return invalid_argument(reason, f"{field} {why}", field=field)


def _ms(duration: duration_pb2.Duration, field: str) -> int:
    seconds_from(duration, field)
    return duration.seconds * 1000 + duration.nanos // 1_000_000


def step_timeouts(
    message: engine_pb2.Step | engine_pb2.SingleOp | engine_pb2.SpawnChildRequest, where: str
) -> StepTimeouts:
    """A step's timeouts (unset fields: none); a negative or out-of-range duration is INVALID_ARGUMENT."""
    values = []
    for name in ("start_to_close_timeout", "heartbeat_timeout", "schedule_to_start_timeout"):
        duration = getattr(message, name)
        if not message.HasField(name):
            values.append(0)
            continue
        ms = _ms(duration, f"{where}.{name}")
        if ms == 0 and (duration.seconds or duration.nanos):
            ms = 1  # below a millisecond: the shortest timeout there is, not none
        values.append(ms)
    return StepTimeouts(*values)


def run_config_from(message: engine_pb2.RunConfig) -> RunConfig:
    """A validated RunConfig from its message, with defaults for unset fields."""
    if not message.ByteSize():  # most runs ask for the defaults: made once (a RunConfig is immutable)
        return _DEFAULT_RUN_CONFIG
    return _run_config(message)


def _run_config(message: engine_pb2.RunConfig) -> RunConfig:
    mode = {
        engine_pb2.EXECUTION_MODE_UNSPECIFIED: LIVE,
        engine_pb2.EXECUTION_MODE_LIVE: LIVE,
        engine_pb2.EXECUTION_MODE_REPLAY: REPLAY,
    }.get(message.execution_mode)
    if mode is None:
        raise invalid_argument("invalid_argument", f"unknown execution_mode {message.execution_mode}")
    policy = message.retry_policy
    return make_run_config(
        execution_mode=mode,
        max_attempts=policy.max_attempts,
        initial_backoff_ms=_ms(policy.initial_backoff, "initial_backoff")
        if policy.HasField("initial_backoff")
        else None,
        max_backoff_ms=_ms(policy.max_backoff, "max_backoff") if policy.HasField("max_backoff") else None,
        multiplier=policy.multiplier,
        replay_of_run_id=message.replay_of_run_id,
        execution_timeout_ms=_ms(message.execution_timeout, "execution_timeout")
        if message.HasField("execution_timeout")
        else 0,
    )


_DEFAULT_RUN_CONFIG = _run_config(engine_pb2.RunConfig())

# Clients start the same pipelines again and again: each one parsed and checked is kept by its
# bytes (a PipelineSpec is immutable; ops get copies of its op configs). One that fails is not kept,
# nor one larger than PIPELINE_CACHED_BYTES (at most 256 of those are held: a few MiB in all).
_PIPELINES: Recent[bytes, PipelineSpec] = Recent(256)
PIPELINE_CACHED_BYTES = 16 * 1024


def pipeline_from(request: engine_pb2.StartRunRequest) -> PipelineSpec:
    """The pipeline a StartRun asks for (a single op becomes a one-step pipeline)."""
    target = request.WhichOneof("target")
    if target == "pipeline":
        if request.pipeline.ByteSize() > PIPELINE_CACHED_BYTES:
            return _pipeline(request.pipeline)
        key = request.pipeline.SerializeToString(deterministic=True)
        pipeline = _PIPELINES.get(key)
        if pipeline is None:
            pipeline = _pipeline(request.pipeline)
            _PIPELINES.put(key, pipeline)
        return pipeline
    if target == "op":
        if not request.op.op_id:
            raise invalid_argument("invalid_plan", "op.op_id is required")
        return single_op_pipeline(
            request.op.op_id,
            request.op.op_version,
            _json(request.op.op_config, "op.op_config"),
            request.op.task_queue,
            step_timeouts(request.op, "op"),
        )
    raise invalid_argument("invalid_argument", "StartRun needs a target: `pipeline` or `op`")


def _pipeline(pipeline: engine_pb2.Pipeline) -> PipelineSpec:
    steps = tuple(
        StepSpec(
            step_id=step.step_id,
            op_id=step.op_id,
            op_version=step.op_version or "1",
            op_config=_json(step.op_config, f"steps[{index}].op_config"),
            depends_on=tuple(step.depends_on),
            task_queue=step.task_queue,
            timeouts=step_timeouts(step, f"steps[{index}]"),
        )
        for index, step in enumerate(pipeline.steps)
    )
    return PipelineSpec(
        pipeline.pipeline_id, pipeline.pipeline_version or "1", steps, max_parallel=pipeline.max_parallel
    )


def manifest_from(request: engine_pb2.StartRunRequest, build: BuildProvenance) -> RunManifest:
    """The manifest of a StartRun, fully validated (nothing is written before this succeeds)."""
    pipeline = pipeline_from(request)
    data = _json(request.input, "input")
    context = _json(request.initial_context, "initial_context", default={})
    if not isinstance(context, dict):
        raise invalid_argument(
            "invalid_argument", f"initial_context must be a JSON object, got {type(context).__name__}"
        )
    manifest = RunManifest(pipeline, data, context, run_config_from(request.run_config), build)
    # Encoded once (the manifest keeps its bytes); input and context hold no more than the whole.
    size = len(manifest.canonical_bytes())
    if size > MAX_INPUT_BYTES:
        _size_checked(data, "input")
        _size_checked(context, "initial_context")
    if size > MAX_MANIFEST_BYTES:
        raise _too_large(
            "the run's manifest (pipeline, op configs, input and context)", size, MAX_MANIFEST_BYTES
        )
    return manifest


def signal_from(request: engine_pb2.SignalRunRequest, new_id: str) -> Signal:
    """The signal of a SignalRun, checked (`new_id` when the request names none)."""
    name = check_signal_name(request.name)
    payload = check_signal_payload(_json(request.payload, "payload"))
    return Signal(check_signal_id(request.signal_id) if request.signal_id else new_id, name, payload)


def start_signals_from(request: engine_pb2.StartRunRequest) -> list[Signal]:
    """StartRun's signals, checked; one without an id gets one from its place and content."""
    if len(request.signals) > MAX_START_SIGNALS:
        raise invalid_argument(
            "invalid_signal",
            f"StartRun carries at most {MAX_START_SIGNALS} signals, got {len(request.signals)}",
            field="signals",
        )
    out = []
    for index, given in enumerate(request.signals):
        where = f"signals[{index}]"
        name = check_signal_name(given.name, f"{where}.name")
        payload = check_signal_payload(_json(given.payload, f"{where}.payload"), f"{where}.payload")
        signal_id = given.signal_id or start_signal_id(index, name, payload)
        if given.signal_id:
            check_signal_id(signal_id, f"{where}.signal_id")
        out.append(Signal(signal_id, name, payload))
    return out


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)  # a naive time is UTC, as Timestamp.FromDatetime reads it


def timestamp(when: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp, or None (what Timestamp.FromDatetime gives, in exact integer arithmetic
    and without its per-call calendar work: a run's answer holds a few per step)."""
    if when is None:
        return None
    out = timestamp_pb2.Timestamp()
    _set_time(out, when)
    return out


def _set_time(field: timestamp_pb2.Timestamp, when: datetime | None) -> None:
    """`field` (a message's Timestamp field) set to `when` in place; left unset for None."""
    if when is not None:
        since = when - (_NAIVE_EPOCH if when.tzinfo is None else _EPOCH)
        field.seconds = since.days * 86_400 + since.seconds
        field.nanos = since.microseconds * 1000


def _set_error(field: engine_pb2.ErrorDetail, error: ErrorRecord | None) -> None:
    """`field` (a message's ErrorDetail field) set to `error` in place; left unset for None."""
    if error is None:
        return
    field.code = error.code
    field.category = error.category
    field.retryable = error.retryable
    field.message = error.message
    if error.details:
        set_value(field.details, error.details)


# A run's answer is built in place, field by field: a message given to a constructor or to
# `repeated.append` is copied, and an answer's attempts would be copied twice (into their step,
# and the step into the run).


def _fill_attempt(message: engine_pb2.StepAttempt, attempt: AttemptView) -> None:
    message.attempt = attempt.attempt
    message.status = STEP_STATUS[attempt.status]
    _set_time(message.started_at, attempt.started_at)
    _set_time(message.finished_at, attempt.finished_at)
    _set_error(message.error, attempt.error)
    message.task_queue = attempt.task_queue
    message.worker_id = attempt.worker_id
    if attempt.wait is not None:
        message.wait.kind = attempt.wait.kind
        if attempt.wait.until_us:
            message.wait.until.FromMicroseconds(attempt.wait.until_us)
        if attempt.wait.detail:
            message.wait.detail.CopyFrom(to_struct(attempt.wait.detail))


def _fill_step(
    out: engine_pb2.StepState,
    step: StepView,
    snapshot: dict[str, Any],
    snapshot_value: struct_pb2.Value | None,
) -> None:
    out.step_id = step.step_id
    out.op_id = step.op_id
    out.op_version = step.op_version
    out.status = STEP_STATUS[step.status]
    for attempt in step.attempts:
        _fill_attempt(out.attempts.add(), attempt)
    _set_error(out.last_error, step.last_error)
    out.reused_from_run_id = step.reused_from_run_id
    out.depends_on.extend(step.depends_on)
    if (
        step.has_output
        and snapshot_value is not None
        and step.step_id in snapshot
        and snapshot[step.step_id] is step.output
    ):
        # The output is the final snapshot's entry, converted already: copied, not walked again.
        out.output.CopyFrom(snapshot_value.struct_value.fields[step.step_id])
    elif step.has_output:
        set_value(out.output, step.output)
    waiting = step.waiting_for_signal
    if waiting is not None:
        out.waiting_for_signal.name = waiting.name
        out.waiting_for_signal.fact_key = waiting.fact_key
        _set_time(out.waiting_for_signal.since, waiting.since)
        _set_time(out.waiting_for_signal.timeout_at, waiting.timeout_at)


def run_message(view: RunView) -> engine_pb2.Run:
    """A Run message from a RunView."""
    run = engine_pb2.Run()
    fill_run(run, view)
    return run


def fill_run(run: engine_pb2.Run, view: RunView) -> None:
    """`run` set from a RunView: an answer's empty Run field, filled in place rather than copied in."""
    run.run_id = view.run_id
    run.op_id = view.op_id
    run.manifest_id = view.manifest_id
    run.status = RUN_STATUS[view.status]
    run.parent_run_id = view.parent_run_id
    run.parent_fact_key = view.parent_fact_key
    run.final_snapshot_id = view.final_snapshot_id
    run.reason = view.reason
    run.head_seq = view.head_seq
    if view.labels:
        run.labels.update(view.labels)
    run.rerun_of_run_id = view.rerun_of_run_id
    run.rerun_from_step_id = view.rerun_from_step_id
    if view.reruns:
        run.reruns.extend(view.reruns)
    _set_time(run.created_at, view.created_at)
    _set_time(run.updated_at, view.updated_at)
    _set_time(run.completed_at, view.completed_at)
    _set_error(run.error, view.error)
    snapshot_value = None
    if view.final_snapshot_id:
        snapshot_value = run.final_snapshot
        set_value(snapshot_value, view.final_snapshot)
    snapshot = (
        view.final_snapshot if snapshot_value is not None and isinstance(view.final_snapshot, dict) else {}
    )
    for step in view.steps:
        _fill_step(run.steps.add(), step, snapshot, snapshot_value)
    for c in view.children:
        run.children.add(
            child_run_id=c.child_run_id,
            fact_key=c.fact_key,
            op_id=c.op_id,
            status=RUN_STATUS[c.status],
            parent_close_policy=CLOSE_POLICY_ENUM[c.parent_close_policy],
        )
    for e in view.failure_ledger:
        entry = run.failure_ledger.add(step_id=e.step_id, reason=e.reason)
        _set_time(entry.recorded_at, e.recorded_at)
    if view.has_input:
        set_value(run.input, view.input)


def run_summary(summary: RunSummary) -> engine_pb2.RunSummary:
    """A RunSummary message."""
    return engine_pb2.RunSummary(
        run_id=summary.run_id,
        status=RUN_STATUS[summary.status],
        created_at=timestamp(summary.created_at),
        updated_at=timestamp(summary.updated_at),
        head_seq=summary.head_seq,
        pipeline_id=summary.pipeline_id,
        labels=summary.labels,
        parent_run_id=summary.parent_run_id,
    )


_LINEAGES = {
    engine_pb2.RUN_LINEAGE_UNSPECIFIED: "",
    engine_pb2.RUN_LINEAGE_TOP_LEVEL: TOP_LEVEL,
    engine_pb2.RUN_LINEAGE_CHILDREN: CHILD,
}


def _duration_bounds(request: engine_pb2.ListRunsRequest) -> tuple[timedelta | None, timedelta | None]:
    """ListRuns' min_duration and max_duration (None: unset); INVALID_ARGUMENT `invalid_duration`
    for a negative or out-of-range one, or a min above the max."""
    bounds: list[timedelta | None] = []
    for name in ("min_duration", "max_duration"):
        if not request.HasField(name):
            bounds.append(None)
            continue
        duration = getattr(request, name)
        seconds_from(duration, name, "invalid_duration")
        bounds.append(duration.ToTimedelta())
    least, most = bounds
    if least is not None and most is not None and least > most:
        raise invalid_argument(
            "invalid_duration",
            f"min_duration ({least}) is more than max_duration ({most}): no run could match",
        )
    return least, most


def run_filter(request: engine_pb2.ListRunsRequest) -> RunFilter:
    """The ListRuns filters besides statuses; INVALID_ARGUMENT for bad labels, an unknown lineage, a
    parent run id that is not a UUID or a bad duration range."""
    min_duration, max_duration = _duration_bounds(request)
    if request.lineage not in _LINEAGES:
        raise invalid_argument(
            "invalid_argument",
            f"unknown lineage {request.lineage}; accepted: RUN_LINEAGE_TOP_LEVEL, RUN_LINEAGE_CHILDREN",
        )
    return RunFilter(
        pipeline_id=request.pipeline_id,
        labels=check_labels(request.labels, "labels filter"),
        started_after=request.started_after.ToDatetime(UTC) if request.HasField("started_after") else None,
        started_before=request.started_before.ToDatetime(UTC) if request.HasField("started_before") else None,
        lineage=_LINEAGES[request.lineage],
        parent_run_id=parse_run_id(request.parent_run_id, field="parent_run_id")
        if request.parent_run_id
        else "",
        min_duration=min_duration,
        max_duration=max_duration,
    )


def run_event(event: StoredEvent) -> engine_pb2.RunEvent:
    """A RunEvent message for WatchRun."""
    type_name, data = event_type_and_json(event.event)
    return engine_pb2.RunEvent(
        seq=event.seq, type=type_name, data=to_struct(data), recorded_at=timestamp(event.recorded_at)
    )


TERMINAL_TARGETS = {
    engine_pb2.TERMINAL_TARGET_COMPLETED: COMPLETED,
    engine_pb2.TERMINAL_TARGET_FAILED: FAILED,
    engine_pb2.TERMINAL_TARGET_CANCELED: CANCELED,
}
_CLOSE_POLICIES = {
    engine_pb2.PARENT_CLOSE_POLICY_UNSPECIFIED: CLOSE_CANCEL,
    engine_pb2.PARENT_CLOSE_POLICY_CANCEL: CLOSE_CANCEL,
    engine_pb2.PARENT_CLOSE_POLICY_ABANDON: CLOSE_ABANDON,
}
CLOSE_POLICY_ENUM = {
    CLOSE_CANCEL: engine_pb2.PARENT_CLOSE_POLICY_CANCEL,
    CLOSE_ABANDON: engine_pb2.PARENT_CLOSE_POLICY_ABANDON,
}


def _child_kind(kind: str, expected: str, what: str) -> None:
    if kind not in ("", expected):
        raise request_invalid(f"unsupported child run {what} request kind {kind!r}; expected {expected!r}")


def spawn_request_from(request: engine_pb2.SpawnChildRequest) -> ChildSpawnRequest:
    """A validated ChildSpawnRequest from SpawnChild (fact key checks are the spawn's own)."""
    _child_kind(request.kind, SPAWN_KIND, "spawn")
    if not request.op_id:
        raise request_invalid("op_id (the child's op) is required")
    policy = _CLOSE_POLICIES.get(request.parent_close_policy)
    if policy is None:
        raise request_invalid(f"unknown parent_close_policy {request.parent_close_policy}")
    context = _json(request.initial_context, "initial_context", default={})
    if not isinstance(context, dict):
        raise request_invalid(f"initial_context must be a JSON object, got {type(context).__name__}")
    data = _size_checked(_json(request.input, "input"), "input")
    return ChildSpawnRequest(
        parent_run_id=parse_run_id(request.parent_run_id, field="parent_run_id"),
        fact_key=request.fact_key,
        op_id=request.op_id,
        op_version=request.op_version or "1",
        op_config=_json(request.op_config, "op_config"),
        input=data,
        run_config=run_config_from(request.run_config),
        initial_context=_size_checked(context, "initial_context"),
        parent_close_policy=policy,
        task_queue=request.task_queue,
        timeouts=step_timeouts(request, "SpawnChild"),
    )


def await_request_from(request: engine_pb2.AwaitChildRequest) -> ChildAwaitRequest:
    """A validated ChildAwaitRequest from AwaitChild."""
    _child_kind(request.kind, AWAIT_KIND, "await")
    try:
        run_id = parse_run_id(request.child_run_id, field="child_run_id")
        if request.parent_run_id:
            parse_run_id(request.parent_run_id, field="parent_run_id")
    except KeelError as error:
        raise request_invalid(error.message) from None
    return ChildAwaitRequest(run_id, request.child_manifest_id, request.parent_run_id)
