"""Plain Python to EngineService requests, and responses to the client's dataclasses: the protobuf seam."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf import duration_pb2, json_format, timestamp_pb2
from keel.engine.v1 import engine_pb2
from keel.worker.v1 import worker_pb2

from keel_client.errors import invalid_request
from keel_client.models import (
    AwaitedRun,
    ChildResult,
    ChildRun,
    DeletedRuns,
    E,
    ErrorDetail,
    ExecutionMode,
    FailureLedgerEntry,
    OpInfo,
    ParentClosePolicy,
    PipelineSpec,
    QueueInfo,
    QueueWorker,
    RerunResult,
    ResumedRun,
    RetryPolicy,
    Run,
    RunConfig,
    RunEvent,
    RunFilter,
    RunPage,
    RunStatus,
    RunSummary,
    SentSignal,
    Signal,
    SignalWait,
    SpawnedChild,
    StartedRun,
    StepAttempt,
    StepState,
    StepStatus,
    StepWait,
    TerminalizeOutcome,
    TerminalizeResult,
    TerminalTarget,
    parse_enum,
)
from keel_core.errors import KeelError
from keel_core.ids import new_run_id
from keel_core.json_values import from_struct, from_value, to_value

_RUN_STATUS = {
    engine_pb2.RUN_STATUS_UNSPECIFIED: RunStatus.UNSPECIFIED,
    engine_pb2.RUN_STATUS_RUNNING: RunStatus.RUNNING,
    engine_pb2.RUN_STATUS_COMPLETED: RunStatus.COMPLETED,
    engine_pb2.RUN_STATUS_FAILED: RunStatus.FAILED,
    engine_pb2.RUN_STATUS_CANCELED: RunStatus.CANCELED,
    engine_pb2.RUN_STATUS_PENDING: RunStatus.PENDING,
}
_RUN_STATUS_WIRE = {status: wire for wire, status in _RUN_STATUS.items()}
_STEP_STATUS = {
    engine_pb2.STEP_STATUS_UNSPECIFIED: StepStatus.UNSPECIFIED,
    engine_pb2.STEP_STATUS_PENDING: StepStatus.PENDING,
    engine_pb2.STEP_STATUS_RUNNING: StepStatus.RUNNING,
    engine_pb2.STEP_STATUS_RETRYING: StepStatus.RETRYING,
    engine_pb2.STEP_STATUS_COMPLETED: StepStatus.COMPLETED,
    engine_pb2.STEP_STATUS_FAILED: StepStatus.FAILED,
    engine_pb2.STEP_STATUS_WAITING: StepStatus.WAITING,
}
_EXECUTION_MODE = {
    ExecutionMode.LIVE: engine_pb2.EXECUTION_MODE_LIVE,
    ExecutionMode.REPLAY: engine_pb2.EXECUTION_MODE_REPLAY,
}
_PARENT_CLOSE = {
    ParentClosePolicy.CANCEL: engine_pb2.PARENT_CLOSE_POLICY_CANCEL,
    ParentClosePolicy.ABANDON: engine_pb2.PARENT_CLOSE_POLICY_ABANDON,
}
_POLICY_OF_WIRE = {wire: policy for policy, wire in _PARENT_CLOSE.items()}
_TARGET = {
    TerminalTarget.COMPLETED: engine_pb2.TERMINAL_TARGET_COMPLETED,
    TerminalTarget.FAILED: engine_pb2.TERMINAL_TARGET_FAILED,
    TerminalTarget.CANCELED: engine_pb2.TERMINAL_TARGET_CANCELED,
}
_OUTCOME = {
    engine_pb2.TERMINALIZE_OUTCOME_UNSPECIFIED: TerminalizeOutcome.UNSPECIFIED,
    engine_pb2.TERMINALIZE_OUTCOME_TRANSITIONED: TerminalizeOutcome.TRANSITIONED,
    engine_pb2.TERMINALIZE_OUTCOME_NOOP: TerminalizeOutcome.NOOP,
}

PipelineLike = Mapping[str, Any] | PipelineSpec
RunConfigLike = RunConfig | Mapping[str, Any]


# ---- requests ------------------------------------------------------------------------------------


def _enum(kind: type[E], value: E | str, what: str) -> E:
    # parse_enum's ValueError as the client's InvalidArgument, naming the field.
    try:
        return parse_enum(kind, value)
    except ValueError as error:
        raise invalid_request(f"{what}: {error}") from None


def json_value(data: Any, what: str) -> Any:
    """`data` as a google.protobuf.Value, or a client-side InvalidArgument naming `what`."""
    try:
        return to_value(data)
    except KeelError as error:
        raise invalid_request(f"{what}: {error.message}") from None
    except (json_format.ParseError, TypeError, ValueError) as error:
        raise invalid_request(f"{what} is not JSON: {error}") from None


def pipeline_message(pipeline: PipelineLike) -> engine_pb2.Pipeline:
    """A Pipeline from a PipelineSpec or a dict shaped like the proto (snake_case or camelCase names)."""
    data = pipeline.to_dict() if isinstance(pipeline, PipelineSpec) else pipeline
    if not isinstance(data, Mapping):
        raise invalid_request(f"pipeline must be an object with `pipeline_id` and `steps`, not {data!r:.80}")
    json_value(dict(data), "pipeline")  # refuses non-JSON values and inexact integers, naming the path
    message = engine_pb2.Pipeline()
    try:
        json_format.ParseDict(_drop_nulls(data), message)
    except json_format.ParseError as error:
        raise invalid_request(f"pipeline does not match keel.engine.v1.Pipeline: {error}") from None
    return message


def _drop_nulls(data: Mapping[str, Any]) -> dict[str, Any]:
    # `op_config: null` and `op_version: null` in YAML mean "not set"; ParseDict would refuse a null string.
    out: dict[str, Any] = {}
    for key, item in data.items():
        if item is None:
            continue
        if key == "steps" and isinstance(item, list):
            item = [_drop_nulls(step) if isinstance(step, Mapping) else step for step in item]
        out[key] = item
    return out


def _duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def run_config_message(config: RunConfigLike | None) -> engine_pb2.RunConfig | None:
    """A RunConfig from the dataclass or a dict of its fields (None: the engine's defaults)."""
    if config is None:
        return None
    if isinstance(config, Mapping):
        config = _run_config_from_dict(config)
    message = engine_pb2.RunConfig(
        execution_mode=_EXECUTION_MODE[
            _enum(ExecutionMode, config.execution_mode, "run_config.execution_mode")
        ],
        replay_of_run_id=config.replay_of_run_id,
    )
    policy = config.retry_policy
    if policy is not None:
        message.retry_policy.max_attempts = policy.max_attempts
        message.retry_policy.multiplier = policy.multiplier
        for name, seconds in (
            ("initial_backoff", policy.initial_backoff),
            ("max_backoff", policy.max_backoff),
        ):
            duration = _duration(seconds)
            if duration is not None:
                getattr(message.retry_policy, name).CopyFrom(duration)
    return message


def _run_config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    unknown = set(data) - {"execution_mode", "retry_policy", "replay_of_run_id"}
    if unknown:
        raise invalid_request(f"run_config has unknown fields: {', '.join(sorted(unknown))}")
    policy_data = data.get("retry_policy")
    policy = None
    if policy_data is not None:
        try:
            policy = RetryPolicy(**policy_data)
        except TypeError as error:
            raise invalid_request(f"run_config.retry_policy: {error}") from None
    mode = _enum(ExecutionMode, str(data.get("execution_mode", "live")), "run_config.execution_mode")
    return RunConfig(
        execution_mode=mode, retry_policy=policy, replay_of_run_id=str(data.get("replay_of_run_id", ""))
    )


def start_run_request(
    pipeline: PipelineLike | None,
    *,
    op: str | None,
    op_version: str,
    op_config: Any,
    input: Any,
    context: Mapping[str, Any] | None,
    run_config: RunConfigLike | None,
    run_id: str | None,
    wait: bool,
    labels: Mapping[str, str] | None = None,
    signals: Iterable[Signal | Mapping[str, Any]] = (),
) -> engine_pb2.StartRunRequest:
    """A StartRunRequest; a run id is picked here if the caller gives none: a retried start is idempotent."""
    if (pipeline is None) == (op is None):
        raise invalid_request("start_run needs exactly one of `pipeline` or `op`")
    request = engine_pb2.StartRunRequest(run_id=run_id or new_run_id(), wait=wait, labels=labels or {})
    if pipeline is not None:
        request.pipeline.CopyFrom(pipeline_message(pipeline))
    else:
        request.op.op_id = str(op)
        request.op.op_version = op_version
        if op_config is not None:
            request.op.op_config.CopyFrom(json_value(op_config, "op_config"))
    if input is not None:
        request.input.CopyFrom(json_value(input, "input"))
    if context is not None:
        if not isinstance(context, Mapping):
            raise invalid_request(f"context must be a JSON object, not {type(context).__name__}")
        request.initial_context.CopyFrom(json_value(dict(context), "context"))
    config = run_config_message(run_config)
    if config is not None:
        request.run_config.CopyFrom(config)
    for index, given in enumerate(signals):
        request.signals.append(signal_input(given, f"signals[{index}]"))
    return request


def signal_input(given: Signal | Mapping[str, Any], field: str) -> engine_pb2.SignalInput:
    """A SignalInput from a Signal or a dict {name, payload?, signal_id?}."""
    if isinstance(given, Mapping):
        unknown = set(given) - {"name", "payload", "signal_id"}
        if unknown or not isinstance(given.get("name"), str):
            raise invalid_request(f"{field} must be a Signal or a dict with a name (and payload, signal_id)")
        given = Signal(given["name"], given.get("payload"), str(given.get("signal_id") or ""))
    message = engine_pb2.SignalInput(name=given.name, signal_id=given.signal_id)
    message.payload.CopyFrom(json_value(given.payload, f"{field}.payload"))
    return message


def signal_run_request(
    run_id: str, name: str, payload: Any, signal_id: str | None
) -> engine_pb2.SignalRunRequest:
    """A SignalRunRequest; a signal id is picked here if none is given: a retried call is idempotent."""
    request = engine_pb2.SignalRunRequest(run_id=run_id, name=name, signal_id=signal_id or str(uuid.uuid4()))
    request.payload.CopyFrom(json_value(payload, "payload"))
    return request


def sent_signal(message: engine_pb2.SignalRunResponse) -> SentSignal:
    """A SentSignal from SignalRun's response."""
    return SentSignal(signal_id=message.signal_id, created=message.created, inbox_seq=message.inbox_seq)


def spawn_child_request(
    parent_run_id: str,
    fact_key: str,
    op: str,
    *,
    op_version: str,
    op_config: Any,
    input: Any,
    context: Mapping[str, Any] | None,
    run_config: RunConfigLike | None,
    parent_close_policy: ParentClosePolicy,
    task_queue: str = "",
) -> engine_pb2.SpawnChildRequest:
    """A SpawnChildRequest of kind `child_run_spawn_v1`."""
    request = engine_pb2.SpawnChildRequest(
        kind="child_run_spawn_v1",
        parent_run_id=parent_run_id,
        fact_key=fact_key,
        op_id=op,
        op_version=op_version,
        task_queue=task_queue,
        parent_close_policy=_PARENT_CLOSE[
            _enum(ParentClosePolicy, parent_close_policy, "parent_close_policy")
        ],
    )
    if op_config is not None:
        request.op_config.CopyFrom(json_value(op_config, "op_config"))
    if input is not None:
        request.input.CopyFrom(json_value(input, "input"))
    if context is not None:
        request.initial_context.CopyFrom(json_value(dict(context), "context"))
    config = run_config_message(run_config)
    if config is not None:
        request.run_config.CopyFrom(config)
    return request


def terminalize_request(
    run_id: str, target: TerminalTarget | str, reason: str
) -> engine_pb2.TerminalizeRequest:
    """A TerminalizeRequest; `target` is completed, failed or canceled."""
    wire_target = _TARGET[_enum(TerminalTarget, target, "target")]
    return engine_pb2.TerminalizeRequest(run_id=run_id, target=wire_target, reason=reason)


def list_runs_request(
    statuses: Iterable[RunStatus | str],
    page_size: int,
    page_token: str | None,
    where: RunFilter | None = None,
) -> engine_pb2.ListRunsRequest:
    """A ListRunsRequest filtered by statuses (names such as "running") and `where`."""
    wire: list[engine_pb2.RunStatus.ValueType] = []
    for status in statuses:
        try:
            chosen = parse_enum(RunStatus, status)
        except ValueError:
            chosen = RunStatus.UNSPECIFIED
        if chosen in (RunStatus.UNSPECIFIED, RunStatus.PENDING):  # not a status a stored run has
            raise invalid_request(
                f"unknown run status {status!r}: expected running, completed, failed or canceled "
                "(or RUN_STATUS_RUNNING, ...)"
            )
        wire.append(_RUN_STATUS_WIRE[chosen])
    request = engine_pb2.ListRunsRequest(statuses=wire, page_size=page_size, page_token=page_token or "")
    if where is not None:
        _apply_filter(request, where)
    return request


_LINEAGE = {True: engine_pb2.RUN_LINEAGE_TOP_LEVEL, False: engine_pb2.RUN_LINEAGE_CHILDREN}


def _apply_filter(request: engine_pb2.ListRunsRequest, where: RunFilter) -> None:
    request.pipeline_id = where.pipeline_id
    request.labels.update(where.labels)
    if where.started_after is not None:
        request.started_after.CopyFrom(_timestamp(where.started_after))
    if where.started_before is not None:
        request.started_before.CopyFrom(_timestamp(where.started_before))
    if where.top_level is not None:
        request.lineage = _LINEAGE[where.top_level]
    request.parent_run_id = where.parent_run_id
    if where.min_duration is not None:
        request.min_duration.FromTimedelta(where.min_duration)
    if where.max_duration is not None:
        request.max_duration.FromTimedelta(where.max_duration)


def _timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    """A Timestamp of `when` (a naive datetime is taken as UTC)."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when if when.tzinfo is not None else when.replace(tzinfo=UTC))
    return stamp


def await_run_request(run_id: str, timeout: float | None) -> engine_pb2.AwaitRunRequest:
    """An AwaitRunRequest waiting at most `timeout` seconds (None: until the call's deadline)."""
    request = engine_pb2.AwaitRunRequest(run_id=run_id)
    duration = _duration(timeout)
    if duration is not None:
        request.timeout.CopyFrom(duration)
    return request


# ---- responses -----------------------------------------------------------------------------------


def _wait(attempt: engine_pb2.StepAttempt) -> StepWait | None:
    if not attempt.HasField("wait"):
        return None
    detail = from_struct(attempt.wait.detail) if attempt.wait.HasField("detail") else {}
    return StepWait(attempt.wait.kind, _time(attempt.wait, "until"), dict(detail))


def _time(message: Any, field_name: str) -> datetime | None:
    if not message.HasField(field_name):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field_name)
    return stamp.ToDatetime(tzinfo=UTC)


def error_detail(message: Any, field_name: str) -> ErrorDetail | None:
    """The ErrorDetail in `message.field_name`, or None when unset."""
    if not message.HasField(field_name):
        return None
    detail: engine_pb2.ErrorDetail = getattr(message, field_name)
    return ErrorDetail(
        code=detail.code,
        category=detail.category,
        retryable=detail.retryable,
        message=detail.message,
        details=from_value(detail.details),
    )


def run(message: engine_pb2.Run) -> Run:
    """A Run from its message."""
    return Run(
        run_id=message.run_id,
        op_id=message.op_id,
        manifest_id=message.manifest_id,
        status=_RUN_STATUS.get(message.status, RunStatus.UNSPECIFIED),
        parent_run_id=message.parent_run_id or None,
        parent_fact_key=message.parent_fact_key or None,
        created_at=_time(message, "created_at"),
        updated_at=_time(message, "updated_at"),
        completed_at=_time(message, "completed_at"),
        steps=tuple(_step(step) for step in message.steps),
        children=tuple(
            ChildRun(
                child_run_id=child.child_run_id,
                fact_key=child.fact_key,
                op_id=child.op_id,
                status=_RUN_STATUS.get(child.status, RunStatus.UNSPECIFIED),
                parent_close_policy=_POLICY_OF_WIRE.get(child.parent_close_policy, ParentClosePolicy.CANCEL),
            )
            for child in message.children
        ),
        failure_ledger=tuple(
            FailureLedgerEntry(
                step_id=entry.step_id, reason=entry.reason, recorded_at=_time(entry, "recorded_at")
            )
            for entry in message.failure_ledger
        ),
        final_snapshot_id=message.final_snapshot_id or None,
        final_snapshot=from_value(message.final_snapshot),
        reason=message.reason or None,
        error=error_detail(message, "error"),
        head_seq=message.head_seq,
        input=from_value(message.input) if message.HasField("input") else None,
        labels=dict(message.labels),
        rerun_of_run_id=message.rerun_of_run_id or None,
        rerun_from_step_id=message.rerun_from_step_id or None,
        reruns=tuple(message.reruns),
    )


def optional_run(holder: Any) -> Run | None:
    """The `run` field of a response, or None when the engine left it unset."""
    return run(holder.run) if holder.HasField("run") else None


def _step(message: engine_pb2.StepState) -> StepState:
    return StepState(
        step_id=message.step_id,
        op_id=message.op_id,
        op_version=message.op_version,
        status=_STEP_STATUS.get(message.status, StepStatus.UNSPECIFIED),
        attempts=tuple(
            StepAttempt(
                attempt=attempt.attempt,
                status=_STEP_STATUS.get(attempt.status, StepStatus.UNSPECIFIED),
                started_at=_time(attempt, "started_at"),
                finished_at=_time(attempt, "finished_at"),
                error=error_detail(attempt, "error"),
                task_queue=attempt.task_queue,
                worker_id=attempt.worker_id,
                wait=_wait(attempt),
            )
            for attempt in message.attempts
        ),
        last_error=error_detail(message, "last_error"),
        reused_from_run_id=message.reused_from_run_id or None,
        depends_on=tuple(message.depends_on),
        output=from_value(message.output) if message.HasField("output") else None,
        has_output=message.HasField("output"),
        waiting_for_signal=_signal_wait(message),
    )


def _signal_wait(message: engine_pb2.StepState) -> SignalWait | None:
    if not message.HasField("waiting_for_signal"):
        return None
    wait = message.waiting_for_signal
    return SignalWait(
        name=wait.name,
        fact_key=wait.fact_key,
        since=_time(wait, "since"),
        timeout_at=_time(wait, "timeout_at"),
    )


def started_run(message: engine_pb2.StartRunResponse) -> StartedRun:
    """A StartedRun from StartRun's response."""
    return StartedRun(
        run_id=message.run_id,
        manifest_id=message.manifest_id,
        created=message.created,
        run=optional_run(message),
    )


def deleted_runs(message: engine_pb2.DeleteRunResponse) -> DeletedRuns:
    """DeletedRuns from DeleteRun's response."""
    return DeletedRuns(run_ids=tuple(message.deleted_run_ids), streams=message.deleted_streams)


def rerun_result(message: engine_pb2.RerunRunResponse) -> RerunResult:
    """A RerunResult from RerunRun's response."""
    return RerunResult(run_id=message.run_id, created=message.created, run=optional_run(message))


def resumed_run(message: engine_pb2.ResumeRunResponse) -> ResumedRun:
    """A ResumedRun from ResumeRun's response."""
    return ResumedRun(run=optional_run(message), resumed=message.resumed)


def awaited_run(message: engine_pb2.AwaitRunResponse) -> AwaitedRun:
    """An AwaitedRun from AwaitRun's response."""
    return AwaitedRun(run=optional_run(message), done=message.done)


def spawned_child(message: engine_pb2.SpawnChildResponse) -> SpawnedChild:
    """A SpawnedChild from SpawnChild's response."""
    return SpawnedChild(
        parent_run_id=message.parent_run_id,
        child_run_id=message.child_run_id,
        child_manifest_id=message.child_manifest_id,
    )


def child_result(message: engine_pb2.AwaitChildResponse) -> ChildResult:
    """A ChildResult from AwaitChild's response."""
    return ChildResult(
        child_run_id=message.child_run_id,
        status=_RUN_STATUS.get(message.status, RunStatus.UNSPECIFIED),
        final_snapshot_id=message.final_snapshot_id or None,
        final_snapshot=from_value(message.final_snapshot),
    )


def terminalize_result(message: engine_pb2.TerminalizeResponse) -> TerminalizeResult:
    """A TerminalizeResult from Terminalize's response."""
    return TerminalizeResult(
        outcome=_OUTCOME.get(message.outcome, TerminalizeOutcome.UNSPECIFIED),
        status=_RUN_STATUS.get(message.status, RunStatus.UNSPECIFIED),
    )


def run_page(message: engine_pb2.ListRunsResponse) -> RunPage:
    """A RunPage from ListRuns' response."""
    return RunPage(
        runs=tuple(
            RunSummary(
                run_id=summary.run_id,
                status=_RUN_STATUS.get(summary.status, RunStatus.UNSPECIFIED),
                created_at=_time(summary, "created_at"),
                updated_at=_time(summary, "updated_at"),
                head_seq=summary.head_seq,
                pipeline_id=summary.pipeline_id,
                labels=dict(summary.labels),
                parent_run_id=summary.parent_run_id or None,
            )
            for summary in message.runs
        ),
        next_page_token=message.next_page_token or None,
    )


def run_event(message: engine_pb2.WatchRunResponse) -> RunEvent:
    """A RunEvent from one WatchRun message."""
    event = message.event
    return RunEvent(
        seq=event.seq, type=event.type, data=from_struct(event.data), recorded_at=_time(event, "recorded_at")
    )


def op_infos(message: engine_pb2.ListOpsResponse) -> tuple[OpInfo, ...]:
    """The ops of ListOps' response."""
    return tuple(
        OpInfo(op_id=op.op_id, op_version=op.op_version, description=op.description, task_queue=op.task_queue)
        for op in message.ops
    )


def queue_infos(message: worker_pb2.ListQueuesResponse) -> tuple[QueueInfo, ...]:
    """The queues of ListQueues' response."""
    return tuple(
        QueueInfo(
            task_queue=queue.task_queue,
            backlog=queue.backlog,
            running=queue.running,
            workers=tuple(
                QueueWorker(
                    worker_id=worker.worker_id,
                    last_seen=_time(worker, "last_seen"),
                    ops=tuple(f"{op.op_id}@{op.op_version or '1'}" for op in worker.ops),
                )
                for worker in queue.workers
            ),
        )
        for queue in message.queues
    )
