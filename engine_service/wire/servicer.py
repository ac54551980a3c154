"""EngineService over gRPC: a thin translator between messages and the Engine.

Every handler validates its whole request before the first write, and turns KeelError into a gRPC
status with google.rpc.ErrorInfo (reason = error code).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, NoReturn, TypeVar

import grpc
from keel.engine.v1 import engine_pb2, engine_pb2_grpc

from engine_service.domain import parse_run_id
from engine_service.domain.events import FAILED
from engine_service.domain.labels import check_labels
from engine_service.domain.tasks import op_key
from engine_service.runtime.kernel import Engine
from engine_service.wire import messages
from keel_core import tracing
from keel_core.errors import KeelError, invalid_argument
from keel_core.json_values import to_value
from keel_core.servicer_errors import translated
from keel_core.serving import add_servicer
from keel_core.status import abort_with

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


async def _fail(context: Context, error: KeelError) -> NoReturn:
    await abort_with(context, error)
    raise AssertionError("abort_with returned")  # pragma: no cover - abort always raises


def _remaining(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, remaining - 0.05)


class EngineServicer(engine_pb2_grpc.EngineServiceServicer):
    """The EngineService RPCs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def _fill_run(self, run: engine_pb2.Run, run_id: str, *, just_ended: bool = False) -> None:
        """An answer's Run field, filled in place (a Run given to a constructor is copied)."""
        messages.fill_run(run, await self.engine.views.run_view(run_id, just_ended=just_ended))

    @translated
    async def StartRun(
        self, request: engine_pb2.StartRunRequest, context: Context
    ) -> engine_pb2.StartRunResponse:
        """Validate everything, append RunStarted, drive the run (and wait for it if asked)."""
        run_id = parse_run_id(request.run_id) if request.run_id else None
        manifest = messages.manifest_from(request, self.engine.build)
        labels = check_labels(request.labels)
        signals = messages.start_signals_from(request)
        outcome = await self.engine.start_run(
            manifest,
            run_id,
            wait=request.wait,
            wait_seconds=_remaining(context),
            labels=labels,
            signals=signals,
            trace_context=tracing.carrier_of(context.invocation_metadata()),
        )
        response = engine_pb2.StartRunResponse(
            run_id=outcome.run_id, manifest_id=outcome.manifest_id, created=outcome.created
        )
        await self._fill_run(response.run, outcome.run_id, just_ended=outcome.ended_here)
        return response

    @translated
    async def ResumeRun(
        self, request: engine_pb2.ResumeRunRequest, context: Context
    ) -> engine_pb2.ResumeRunResponse:
        """Drive a run nobody here drives."""
        run_id = parse_run_id(request.run_id)
        resumed = await self.engine.resume_run(run_id)
        response = engine_pb2.ResumeRunResponse(resumed=resumed)
        await self._fill_run(response.run, run_id)
        return response

    @translated
    async def GetRun(self, request: engine_pb2.GetRunRequest, context: Context) -> engine_pb2.GetRunResponse:
        """The run as it stands."""
        response = engine_pb2.GetRunResponse()
        await self._fill_run(response.run, parse_run_id(request.run_id))
        return response

    @translated
    async def ListRuns(
        self, request: engine_pb2.ListRunsRequest, context: Context
    ) -> engine_pb2.ListRunsResponse:
        """A page of runs, newest first, optionally by status, pipeline, labels, start time, lineage."""
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            raise invalid_argument("invalid_argument", f"page_size must be 0..{MAX_PAGE_SIZE}")
        statuses = [messages.listed_status(status) for status in request.statuses]
        where = messages.run_filter(request)
        runs, token = await self.engine.views.list_runs(
            statuses, request.page_size or DEFAULT_PAGE_SIZE, request.page_token, where
        )
        return engine_pb2.ListRunsResponse(
            runs=[messages.run_summary(r) for r in runs], next_page_token=token
        )

    @translated
    async def AwaitRun(
        self, request: engine_pb2.AwaitRunRequest, context: Context
    ) -> engine_pb2.AwaitRunResponse:
        """Wait (without polling) until the run is terminal or the timeout passes."""
        run_id = parse_run_id(request.run_id)
        timeout = _remaining(context)
        if request.HasField("timeout"):
            asked = messages.seconds_from(request.timeout, "timeout")
            timeout = asked if timeout is None else min(asked, timeout)
        done = await self.engine.await_run(run_id, timeout)
        response = engine_pb2.AwaitRunResponse(done=done)
        await self._fill_run(response.run, run_id)
        return response

    async def WatchRun(
        self, request: engine_pb2.WatchRunRequest, context: Context
    ) -> AsyncIterator[engine_pb2.WatchRunResponse]:
        """The run's events after `after_seq` as they are appended; ends after RunCompleted."""
        try:
            run_id = parse_run_id(request.run_id)
            if request.after_seq < 0:
                raise invalid_argument("invalid_argument", "after_seq must not be negative")
        except KeelError as error:
            await _fail(context, error)
        events = self.engine.views.watch_run(run_id, request.after_seq)
        try:
            async for event in events:
                yield engine_pb2.WatchRunResponse(event=messages.run_event(event))
        except KeelError as error:
            await _fail(context, error)
        finally:
            await events.aclose()

    @translated
    async def RerunRun(
        self, request: engine_pb2.RerunRunRequest, context: Context
    ) -> engine_pb2.RerunRunResponse:
        """A new run of a terminal run that executes a step and its descendants again, reusing the rest."""
        run_id = parse_run_id(request.run_id)
        run_id_new = parse_run_id(request.run_id_new, field="run_id_new") if request.run_id_new else None
        if not request.from_step_id:
            raise invalid_argument("invalid_argument", "from_step_id is required")
        new_id, created = await self.engine.reruns.rerun(
            run_id, request.from_step_id, run_id_new, tracing.carrier_of(context.invocation_metadata())
        )
        response = engine_pb2.RerunRunResponse(run_id=new_id, created=created)
        await self._fill_run(response.run, new_id)
        return response

    @translated
    async def DeleteRun(
        self, request: engine_pb2.DeleteRunRequest, context: Context
    ) -> engine_pb2.DeleteRunResponse:
        """Delete a terminal run with its whole tree."""
        deleted = await self.engine.retention.delete_run(parse_run_id(request.run_id))
        return engine_pb2.DeleteRunResponse(deleted_run_ids=deleted.runs, deleted_streams=deleted.streams)

    @translated
    async def ListOps(
        self, request: engine_pb2.ListOpsRequest, context: Context
    ) -> engine_pb2.ListOpsResponse:
        """The ops this engine can run, then the ops workers polling a queue declared (with the queue)."""
        remote: dict[tuple[str, str, str], str] = {}
        for seen in await self.engine.tasks.workers_seen():
            for op_id, version in seen.ops:
                described = seen.descriptions.get(op_key(op_id, version), "")
                remote[(op_id, version, seen.task_queue)] = (
                    remote.get((op_id, version, seen.task_queue)) or described
                )
        local = [(d.op_id, d.op_version, "", d.description) for d in self.engine.env.ops.all()]
        listed = sorted(
            [*local, *((op_id, version, queue, d) for (op_id, version, queue), d in remote.items())]
        )
        return engine_pb2.ListOpsResponse(
            ops=[
                engine_pb2.OpInfo(op_id=op_id, op_version=version, task_queue=queue, description=description)
                for op_id, version, queue, description in listed
            ]
        )

    @translated
    async def SignalRun(
        self, request: engine_pb2.SignalRunRequest, context: Context
    ) -> engine_pb2.SignalRunResponse:
        """Put a signal in the run's inbox (once per signal id); a wait of the run consumes it."""
        run_id = parse_run_id(request.run_id)
        signal = messages.signal_from(request, new_id=str(uuid.uuid4()))
        sent = await self.engine.signal_run(run_id, signal)
        return engine_pb2.SignalRunResponse(
            signal_id=sent.signal_id, created=sent.created, inbox_seq=sent.inbox_seq
        )

    @translated
    async def SpawnChild(
        self, request: engine_pb2.SpawnChildRequest, context: Context
    ) -> engine_pb2.SpawnChildResponse:
        """Start (or find) the child `fact_key` of a parent run; it runs in the background."""
        spawned = await self.engine.children.spawn(messages.spawn_request_from(request))
        return engine_pb2.SpawnChildResponse(
            parent_run_id=spawned.parent_run_id,
            child_run_id=spawned.child_run_id,
            child_manifest_id=spawned.child_manifest_id,
        )

    @translated
    async def AwaitChild(
        self, request: engine_pb2.AwaitChildRequest, context: Context
    ) -> engine_pb2.AwaitChildResponse:
        """Wait until the child is terminal (joining, resuming or starting it) and return its result."""
        outcome = await self.engine.children.await_child(messages.await_request_from(request))
        response = engine_pb2.AwaitChildResponse(
            child_run_id=outcome.child_run_id,
            status=messages.RUN_STATUS[outcome.status],
            final_snapshot_id=outcome.final_snapshot_id,
        )
        if outcome.final_snapshot_id:
            response.final_snapshot.CopyFrom(to_value(outcome.final_snapshot))
        return response

    @translated
    async def Terminalize(
        self, request: engine_pb2.TerminalizeRequest, context: Context
    ) -> engine_pb2.TerminalizeResponse:
        """Move a run to a terminal status: TRANSITIONED once, NOOP when it already is terminal."""
        run_id = parse_run_id(request.run_id)
        status = messages.TERMINAL_TARGETS.get(request.target)
        if status is None:
            raise invalid_argument(
                "invalid_argument", "target must be TERMINAL_TARGET_COMPLETED, _FAILED or _CANCELED"
            )
        if status == FAILED and not request.reason.strip():
            raise invalid_argument("invalid_argument", "a reason is required to terminalize a run as failed")
        result = await self.engine.terminalizer.terminalize(run_id, status, request.reason)
        return engine_pb2.TerminalizeResponse(
            outcome=engine_pb2.TERMINALIZE_OUTCOME_TRANSITIONED
            if result.transitioned
            else engine_pb2.TERMINALIZE_OUTCOME_NOOP,
            status=messages.RUN_STATUS[result.status],
        )


def register(server: grpc.aio.Server, servicer: EngineServicer) -> list[str]:
    """Add the EngineService to `server`; returns its full name for health and reflection."""
    add_servicer(engine_pb2_grpc.add_EngineServiceServicer_to_server, servicer, server)
    return [engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name]
