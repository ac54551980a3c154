"""AsyncKeelClient: EngineService over grpc.aio, one coroutine per RPC, typed results and typed errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import grpc
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.worker.v1 import worker_pb2, worker_pb2_grpc

from keel_client import wire
from keel_client.channel import DEFAULT_DEADLINE, WATCH_RECONNECTS, TlsConfig, call_metadata, channel_options
from keel_client.errors import error_from_rpc
from keel_client.models import (
    AwaitedRun,
    ChildResult,
    DeletedRuns,
    OpInfo,
    ParentClosePolicy,
    QueueInfo,
    RerunResult,
    ResumedRun,
    Run,
    RunEvent,
    RunFilter,
    RunPage,
    RunStatus,
    RunSummary,
    SentSignal,
    Signal,
    SpawnedChild,
    StartedRun,
    TerminalizeResult,
    TerminalTarget,
)
from keel_core.ids import new_run_id


class AsyncKeelClient:
    """An asyncio client of EngineService.

    Example::

        async with AsyncKeelClient("127.0.0.1:7070") as keel:
            pipeline = {"pipeline_id": "hello", "steps": [{"step_id": "a", "op_id": "echo"}]}
            started = await keel.start_run(pipeline)
            run = await keel.await_run(started.run_id)
            print(run.status, run.final_snapshot)

    Every call has a deadline (`deadline` seconds, default 30, overridable per call) except those
    that wait for a run (`await_run`, `watch_run`, `start_run(wait=True)`), which wait as long as
    they are told to. UNAVAILABLE is retried by gRPC itself (see keel_client.channel); failures
    raise a subclass of KeelClientError chosen by the ErrorInfo reason.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:7070",
        *,
        deadline: float = DEFAULT_DEADLINE,
        retries: bool = True,
        tls: TlsConfig | None = None,
        token: str | None = None,
    ) -> None:
        options = channel_options(retries)
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, tls.credentials(), options=options)
        self._stub = engine_pb2_grpc.EngineServiceStub(self._channel)
        self._workers = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self._deadline = deadline
        self._metadata = call_metadata(token)
        self.target = target

    async def __aenter__(self) -> AsyncKeelClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close(grace=None)

    async def _unary(self, method: Any, request: Any, deadline: float | None) -> Any:
        try:
            return await method(request, timeout=deadline, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None

    async def start_run(
        self,
        pipeline: wire.PipelineLike | None = None,
        *,
        op: str | None = None,
        op_version: str = "",
        op_config: Any = None,
        input: Any = None,
        context: Mapping[str, Any] | None = None,
        run_config: wire.RunConfigLike | None = None,
        run_id: str | None = None,
        wait: bool = False,
        deadline: float | None = None,
        labels: Mapping[str, str] | None = None,
        signals: Iterable[Signal | Mapping[str, Any]] = (),
    ) -> StartedRun:
        """Start a run of a pipeline (a dict shaped like the proto Pipeline) or of a single `op`.

        Without `run_id` the client picks one (a UUIDv7, `keel_core.ids`), so that a retried start
        cannot create two runs; with one, starting again with the same pipeline and input returns the
        existing run (`created` False) and a different one raises RunAlreadyExists. With `wait` the
        call returns once the run is terminal (no deadline unless `deadline` is given). `labels`
        (Kubernetes label rules) are recorded with the start; `list_runs(labels=...)` finds the run
        by them.
        `signals` (`Signal`s or dicts {name, payload, signal_id?}) are in the run's inbox before it
        starts; for a run that exists already they are delivered to it, each once.

        Example::

            started = await keel.start_run(
                {"pipeline_id": "greet", "steps": [{"step_id": "hello", "op_id": "echo"}]},
                input={"name": "Ada"},
                context={"tenant": "acme"},
            )
            print(started.run_id, started.created)
        """
        request = wire.start_run_request(
            pipeline,
            op=op,
            op_version=op_version,
            op_config=op_config,
            input=input,
            context=context,
            run_config=run_config,
            run_id=run_id,
            wait=wait,
            labels=labels,
            signals=signals,
        )
        deadline = deadline if deadline is not None or wait else self._deadline
        return wire.started_run(await self._unary(self._stub.StartRun, request, deadline))

    async def signal_run(
        self,
        run_id: str,
        name: str,
        payload: Any = None,
        *,
        signal_id: str | None = None,
        deadline: float | None = None,
    ) -> SentSignal:
        """Send the signal `name` with a JSON `payload` to a run; a wait of the run consumes it.

        Without `signal_id` the client picks a uuid4, so that a retried call delivers the signal
        once; sending an id the run holds already answers `created` False and delivers nothing.
        A run that has ended raises RunTerminal, an unknown one RunNotFound.

        Example::

            sent = await keel.signal_run(run_id, "approval", {"approved_by": "ada"})
            print(sent.signal_id, sent.created)
        """
        request = wire.signal_run_request(run_id, name, payload, signal_id)
        return wire.sent_signal(await self._unary(self._stub.SignalRun, request, deadline or self._deadline))

    async def resume_run(self, run_id: str, *, deadline: float | None = None) -> ResumedRun:
        """Make this engine drive a run nobody drives (a terminal run is returned as it is).

        Example::

            resumed = await keel.resume_run(run_id)
            print(resumed.resumed, resumed.run.status)
        """
        request = engine_pb2.ResumeRunRequest(run_id=run_id)
        return wire.resumed_run(await self._unary(self._stub.ResumeRun, request, deadline or self._deadline))

    async def spawn_child(
        self,
        parent_run_id: str,
        fact_key: str,
        op: str,
        *,
        op_version: str = "",
        op_config: Any = None,
        input: Any = None,
        context: Mapping[str, Any] | None = None,
        run_config: wire.RunConfigLike | None = None,
        parent_close_policy: ParentClosePolicy = ParentClosePolicy.CANCEL,
        deadline: float | None = None,
        task_queue: str = "",
    ) -> SpawnedChild:
        """Spawn a child run of `parent_run_id` named by `fact_key`; spawning twice yields the same child.

        `task_queue`: the child's op runs on a worker polling that queue (docs/workers.md).

        Example::

            child = await keel.spawn_child(parent_run_id, "invoice-42", "echo", input={"amount": 42})
            result = await keel.await_child(child.child_run_id, child.child_manifest_id)
        """
        request = wire.spawn_child_request(
            parent_run_id,
            fact_key,
            op,
            op_version=op_version,
            op_config=op_config,
            input=input,
            context=context,
            run_config=run_config,
            parent_close_policy=parent_close_policy,
            task_queue=task_queue,
        )
        return wire.spawned_child(
            await self._unary(self._stub.SpawnChild, request, deadline or self._deadline)
        )

    async def await_child(
        self,
        child_run_id: str,
        child_manifest_id: str = "",
        *,
        parent_run_id: str = "",
        deadline: float | None = None,
    ) -> ChildResult:
        """Wait for a child run to finish (starting or resuming it if need be); no deadline by default.

        A child whose spawn was interrupted before it started is started from the spawn its parent
        recorded when `parent_run_id` is given (else from `child_manifest_id`).

        Example::

            result = await keel.await_child(child.child_run_id, child.child_manifest_id)
            print(result.status, result.final_snapshot)
        """
        request = engine_pb2.AwaitChildRequest(
            kind="child_run_await_v1",
            child_run_id=child_run_id,
            child_manifest_id=child_manifest_id,
            parent_run_id=parent_run_id,
        )
        return wire.child_result(await self._unary(self._stub.AwaitChild, request, deadline))

    async def terminalize(
        self, run_id: str, target: TerminalTarget | str, *, reason: str = "", deadline: float | None = None
    ) -> TerminalizeResult:
        """Move a run to `target` (completed, failed, canceled) exactly once: TRANSITIONED, else NOOP.

        Example::

            result = await keel.terminalize(run_id, "canceled", reason="superseded by a newer run")
            print(result.outcome, result.status)
        """
        request = wire.terminalize_request(run_id, target, reason)
        return wire.terminalize_result(
            await self._unary(self._stub.Terminalize, request, deadline or self._deadline)
        )

    async def cancel(
        self, run_id: str, *, reason: str = "", deadline: float | None = None
    ) -> TerminalizeResult:
        """Cancel a run (Terminalize with target canceled).

        Example::

            await keel.cancel(run_id)
        """
        return await self.terminalize(run_id, TerminalTarget.CANCELED, reason=reason, deadline=deadline)

    async def rerun_run(
        self,
        run_id: str,
        from_step_id: str,
        *,
        run_id_new: str | None = None,
        deadline: float | None = None,
    ) -> RerunResult:
        """Start a new run of a terminal run that executes `from_step_id` and the steps depending on it
        again and reuses every other step the run completed (outputs, facts, children).

        Without `run_id_new` the client picks one (a UUIDv7), so that a retried call cannot create two
        reruns; rerunning again with the same id and request returns the same run (`created` False).

        Example::

            rerun = await keel.rerun_run(failed_run_id, "charge")
            print(rerun.run_id, (await keel.await_run(rerun.run_id)).status)
        """
        request = engine_pb2.RerunRunRequest(
            run_id=run_id, from_step_id=from_step_id, run_id_new=run_id_new or new_run_id()
        )
        return wire.rerun_result(await self._unary(self._stub.RerunRun, request, deadline or self._deadline))

    async def delete_run(self, run_id: str, *, deadline: float | None = None) -> DeletedRuns:
        """Delete a terminal top-level run now, with the runs it spawned and every stream they own.

        Refused (nothing deleted) for a run that has not ended or has a running child
        (FailedPreconditionError `run_not_terminal`), a child of an existing run (`run_has_parent`),
        a run whose children a rerun reuses (`run_has_reruns`), or when the store takes no deletes
        (PermissionDeniedError `deletes_not_allowed`).

        Example::

            deleted = await keel.delete_run(run_id)
            print(deleted.run_ids, deleted.streams)
        """
        request = engine_pb2.DeleteRunRequest(run_id=run_id)
        return wire.deleted_runs(await self._unary(self._stub.DeleteRun, request, deadline or self._deadline))

    async def get_run(self, run_id: str, *, deadline: float | None = None) -> Run:
        """The run with its steps, attempts, children, failure ledger and (when terminal) final snapshot.

        Example::

            run = await keel.get_run(run_id)
            for step in run.steps:
                print(step.step_id, step.status, len(step.attempts))
        """
        response = await self._unary(
            self._stub.GetRun, engine_pb2.GetRunRequest(run_id=run_id), deadline or self._deadline
        )
        return wire.run(response.run)

    async def list_runs(
        self,
        *,
        statuses: Iterable[RunStatus | str] = (),
        page_size: int = 0,
        page_token: str | None = None,
        deadline: float | None = None,
        pipeline_id: str = "",
        labels: Mapping[str, str] | None = None,
        started_after: datetime | None = None,
        started_before: datetime | None = None,
        top_level: bool | None = None,
        parent_run_id: str = "",
        min_duration: timedelta | None = None,
        max_duration: timedelta | None = None,
    ) -> RunPage:
        """One page of runs, newest first, optionally only those with the given statuses, of
        `pipeline_id`, carrying every one of `labels`, started in [started_after, started_before),
        top-level (`top_level=True`) or children (`top_level=False`), spawned by `parent_run_id`,
        and that lasted from `min_duration` to `max_duration` (both included; a terminal run from
        its start to its end, a running one until now). A negative duration, or a min above the
        max, fails with KeelError `invalid_duration`.

        Example::

            page = await keel.list_runs(statuses=["running"], labels={"team": "billing"}, page_size=20)
            for summary in page.runs:
                print(summary.run_id, summary.status, summary.pipeline_id, summary.labels)
        """
        where = RunFilter(
            pipeline_id,
            dict(labels or {}),
            started_after,
            started_before,
            top_level,
            parent_run_id,
            min_duration,
            max_duration,
        )
        request = wire.list_runs_request(statuses, page_size, page_token, where)
        return wire.run_page(await self._unary(self._stub.ListRuns, request, deadline or self._deadline))

    async def iter_runs(
        self,
        *,
        statuses: Iterable[RunStatus | str] = (),
        limit: int | None = None,
        page_size: int = 100,
        pipeline_id: str = "",
        labels: Mapping[str, str] | None = None,
        started_after: datetime | None = None,
        started_before: datetime | None = None,
        top_level: bool | None = None,
        parent_run_id: str = "",
        min_duration: timedelta | None = None,
        max_duration: timedelta | None = None,
    ) -> AsyncIterator[RunSummary]:
        """Every run (or the first `limit`), newest first, fetching pages as needed; the filters
        are those of `list_runs`.

        Example::

            async for summary in keel.iter_runs(statuses=["failed"], limit=10):
                print(summary.run_id)
        """
        wanted = tuple(statuses)
        token: str | None = None
        seen = 0
        while True:
            page = await self.list_runs(
                statuses=wanted,
                page_size=page_size,
                page_token=token,
                pipeline_id=pipeline_id,
                labels=labels,
                started_after=started_after,
                started_before=started_before,
                top_level=top_level,
                parent_run_id=parent_run_id,
                min_duration=min_duration,
                max_duration=max_duration,
            )
            for summary in page.runs:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield summary
            token = page.next_page_token
            if token is None:
                return

    async def await_run(self, run_id: str, *, max_wait: float | None = None) -> AwaitedRun:
        """Block until the run is terminal or `max_wait` seconds pass (None: no limit), without polling.

        Example::

            awaited = await keel.await_run(run_id, max_wait=60)
            if awaited.done:
                print(awaited.run.status, awaited.run.final_snapshot)
        """
        request = wire.await_run_request(run_id, max_wait)
        # The call's deadline leaves the engine time to answer "not done" after its own timeout.
        deadline = None if max_wait is None else max_wait + self._deadline
        return wire.awaited_run(await self._unary(self._stub.AwaitRun, request, deadline))

    async def watch_run(
        self, run_id: str, *, after_seq: int = 0, deadline: float | None = None
    ) -> AsyncIterator[RunEvent]:
        """The run's events as they happen, after `after_seq`; ends after the terminal event.

        A stream broken by UNAVAILABLE is resumed after the last delivered event, so no event is
        missed or repeated. To cancel the stream as soon as you leave the loop early, iterate
        inside `contextlib.aclosing(keel.watch_run(...))`.

        Example::

            async for event in keel.watch_run(run_id):
                print(event.seq, event.type, event.data)
        """
        deadline_at = None if deadline is None else time.monotonic() + deadline
        last_seq = after_seq
        reconnects = 0
        while True:
            remaining = None if deadline_at is None else max(0.0, deadline_at - time.monotonic())
            request = engine_pb2.WatchRunRequest(run_id=run_id, after_seq=last_seq)
            call = self._stub.WatchRun(request, timeout=remaining, metadata=self._metadata)
            try:
                async for message in call:
                    event = wire.run_event(message)
                    last_seq = event.seq
                    reconnects = 0
                    yield event
                return
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or reconnects >= WATCH_RECONNECTS:
                    raise error_from_rpc(error) from None
                reconnects += 1
                await asyncio.sleep(min(2.0, 0.1 * 2**reconnects))
            finally:
                call.cancel()

    async def list_ops(self, *, deadline: float | None = None) -> tuple[OpInfo, ...]:
        """The ops this engine can run, sorted by id and version.

        Example::

            for op in await keel.list_ops():
                print(op.op_id, op.op_version, op.description)
        """
        response = await self._unary(
            self._stub.ListOps, engine_pb2.ListOpsRequest(), deadline or self._deadline
        )
        return wire.op_infos(response)

    async def list_queues(self, *, deadline: float | None = None) -> tuple[QueueInfo, ...]:
        """The task queues (keel.worker.v1.WorkerService.ListQueues): backlog, running, recent workers.

        Example::

            for queue in await keel.list_queues():
                print(queue.task_queue, queue.backlog, queue.running, [w.worker_id for w in queue.workers])
        """
        response = await self._unary(
            self._workers.ListQueues, worker_pb2.ListQueuesRequest(), deadline or self._deadline
        )
        return wire.queue_infos(response)
