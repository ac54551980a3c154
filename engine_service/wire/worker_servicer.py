"""WorkerService over gRPC: a thin translator between messages and engine_service.runtime.task_service.

Every handler decodes and validates its whole request before the first write, and turns KeelError
into a gRPC status with google.rpc.ErrorInfo (reason = error code).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from keel.worker.v1 import worker_pb2, worker_pb2_grpc

from engine_service.domain import ErrorRecord
from engine_service.domain.tasks import TaskToken, op_key
from engine_service.runtime.task_service import ClaimedTask, TaskService, check_name
from engine_service.wire.messages import seconds_from, timestamp
from keel_core.errors import invalid_argument
from keel_core.json_values import from_value, to_value
from keel_core.servicer_errors import translated, translated_stream
from keel_core.serving import add_servicer

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_POLL_SECONDS = 20.0
MAX_POLL_SECONDS = 60.0
# A long poll answers this long before the caller's deadline, so that the answer arrives in time.
DEADLINE_MARGIN_SECONDS = 0.5
ARTIFACT_CHUNK_BYTES = 1024 * 1024


def _token(text: str) -> TaskToken:
    return TaskToken.decode(text)


def _duration_ms(ms: int) -> duration_pb2.Duration | None:
    if not ms:
        return None
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(ms)
    return duration


def _stamp_us(us: int) -> timestamp_pb2.Timestamp | None:
    if not us:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(us)
    return stamp


def task_message(claimed: ClaimedTask) -> worker_pb2.Task:
    """The Task a worker is handed."""
    scheduled, body = claimed.scheduled, claimed.body
    task = worker_pb2.Task(
        task_token=claimed.token.encode(),
        run_id=scheduled.run_id,
        step_id=scheduled.step_id,
        attempt=scheduled.attempt,
        op_id=scheduled.op_id,
        op_version=scheduled.op_version,
        op_config=to_value(body.get("op_config")),
        input=to_value(body.get("input")),
        context_artifact_id=scheduled.context_artifact_id,
        facts=[
            worker_pb2.Fact(
                namespace=str(fact.get("namespace", "")),
                fact_key=str(fact.get("fact_key", "")),
                response=to_value(fact.get("response")),
            )
            for fact in body.get("facts", ())
        ],
        task_queue=scheduled.task_queue,
        start_to_close_timeout=_duration_ms(scheduled.timeouts.start_to_close_ms),
        heartbeat_timeout=_duration_ms(claimed.heartbeat_ms),
        lease_deadline=_stamp_us(claimed.lease_deadline_us),
        fencing=claimed.token.claim,
        scheduled_at=_stamp_us(scheduled.at_us),
        replay=body.get("replay") is True,
    )
    if not scheduled.context_artifact_id:
        task.context.CopyFrom(to_value(body.get("context") or {}))
    return task


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """The WorkerService RPCs."""

    def __init__(self, tasks: TaskService) -> None:
        self.tasks = tasks

    @translated
    async def PollTask(
        self, request: worker_pb2.PollTaskRequest, context: Context
    ) -> worker_pb2.PollTaskResponse:
        """Claim a task of the queue for the caller, or answer with none before the wait or deadline ends."""
        wait = DEFAULT_POLL_SECONDS
        if request.HasField("wait"):
            wait = min(seconds_from(request.wait, "wait"), MAX_POLL_SECONDS)
        remaining = context.time_remaining()
        if remaining is not None:
            wait = max(0.0, min(wait, remaining - DEADLINE_MARGIN_SECONDS))
        ops = [(op.op_id, op.op_version) for op in request.ops]
        descriptions = {op_key(op.op_id, op.op_version or "1"): op.description for op in request.ops}
        claimed = await self.tasks.poll(request.task_queue, request.worker_id, ops, wait, descriptions)
        if claimed is None:
            return worker_pb2.PollTaskResponse()
        return worker_pb2.PollTaskResponse(task=task_message(claimed))

    @translated
    async def HeartbeatTask(
        self, request: worker_pb2.HeartbeatTaskRequest, context: Context
    ) -> worker_pb2.HeartbeatTaskResponse:
        """Extend the claim; say whether the run asked the task to stop."""
        token = _token(request.task_token)
        from_value(request.details, path="details")  # must be JSON, though it is not recorded
        cancel, deadline = await self.tasks.heartbeat(token)
        return worker_pb2.HeartbeatTaskResponse(cancel_requested=cancel, lease_deadline=_stamp_us(deadline))

    @translated
    async def RecordFact(
        self, request: worker_pb2.RecordFactRequest, context: Context
    ) -> worker_pb2.RecordFactResponse:
        """Record an I/O answer of the task (or return the one recorded under its key)."""
        token = _token(request.task_token)
        response = from_value(request.response, path="response")
        recorded, already = await self.tasks.record_fact(token, request.namespace, request.fact_key, response)
        return worker_pb2.RecordFactResponse(response=to_value(recorded), already_recorded=already)

    @translated
    async def CompleteTask(
        self, request: worker_pb2.CompleteTaskRequest, context: Context
    ) -> worker_pb2.CompleteTaskResponse:
        """End the task with the step's output."""
        token = _token(request.task_token)
        output = from_value(request.output, path="output")
        await self.tasks.complete(token, output)
        return worker_pb2.CompleteTaskResponse()

    @translated
    async def FailTask(
        self, request: worker_pb2.FailTaskRequest, context: Context
    ) -> worker_pb2.FailTaskResponse:
        """End the task as failed."""
        token = _token(request.task_token)
        if not request.HasField("error") or not request.error.code:
            raise invalid_argument(
                "invalid_argument", "error.code is required (a stable code, e.g. `charge_declined`)"
            )
        details = from_value(request.error.details, default={}, path="error.details")
        if not isinstance(details, dict):
            raise invalid_argument("invalid_argument", "error.details must be a JSON object")
        error = ErrorRecord(
            check_name(request.error.code, "error.code"),
            request.error.category or "op",
            request.error.retryable,
            request.error.message,
            details,
        )
        await self.tasks.fail(token, error)
        return worker_pb2.FailTaskResponse()

    @translated_stream
    async def GetArtifact(
        self, request: worker_pb2.GetArtifactRequest, context: Context
    ) -> AsyncIterator[worker_pb2.GetArtifactResponse]:
        """The task's artifact, in chunks."""
        token = _token(request.task_token)
        data = await self.tasks.artifact(token, request.artifact_id)
        for start in range(0, max(len(data), 1), ARTIFACT_CHUNK_BYTES):
            yield worker_pb2.GetArtifactResponse(data=data[start : start + ARTIFACT_CHUNK_BYTES])

    @translated
    async def ListQueues(
        self, request: worker_pb2.ListQueuesRequest, context: Context
    ) -> worker_pb2.ListQueuesResponse:
        """The queues with their backlog, tasks running and recent workers."""
        queues = await self.tasks.list_queues()
        return worker_pb2.ListQueuesResponse(
            queues=[
                worker_pb2.QueueInfo(
                    task_queue=q.task_queue,
                    backlog=q.backlog,
                    running=q.running,
                    workers=[
                        worker_pb2.WorkerInfo(
                            worker_id=w.worker_id,
                            last_seen=timestamp(w.last_seen),
                            ops=[
                                worker_pb2.OpRef(
                                    op_id=o, op_version=v, description=w.descriptions.get(op_key(o, v), "")
                                )
                                for o, v in w.ops
                            ],
                        )
                        for w in q.workers
                    ],
                )
                for q in queues
            ]
        )


def register_workers(server: grpc.aio.Server, servicer: WorkerServicer) -> list[str]:
    """Add the WorkerService to `server`; returns its full name for health and reflection."""
    add_servicer(worker_pb2_grpc.add_WorkerServiceServicer_to_server, servicer, server)
    return [worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name]
