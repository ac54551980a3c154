"""Keel workers in Python: execute the steps of Keel runs whose `task_queue` names your queue.

    from keel_client.worker import Worker, op

    @op("charge", version="1")
    async def charge(ctx, op_config, input):
        order = input["order"]
        receipt = await ctx.io.call("payments", {"amount": input["amount"]}, fact_key=f"charge:{order}")
        return {"receipt": receipt}

    Worker("127.0.0.1:7070", "payments", ops=[charge], transports={"payments": call_payments}).run()

An op has the shape of an in-process op: `async (ctx, op_config, input) -> JSON`, where `ctx` holds
`run_id`, `step_id`, `attempt`, `input`, `context` (what the step sees), `io` and `cancelled`. An op
may also be a plain `def`: it runs in a thread of the worker's own, so blocking it does not stop the
heartbeats; it calls `ctx.io.call_blocking` and watches `ctx.cancelled`. I/O goes through
`ctx.io.call(namespace, request, fact_key)`: an answer already recorded in the run is returned
without calling; otherwise the worker's transport for `namespace` is called and its answer recorded
(RecordFact) before the op sees it, so a retried attempt (on this worker or another) never repeats it.

The worker polls with up to `concurrency` tasks at once, heartbeats every task it runs (at a third
of the step's heartbeat timeout, and at least every `heartbeat_every` seconds, which is also how a
cancel of the run reaches it: the op is cancelled), and on SIGTERM stops polling, lets running
tasks finish for `shutdown_grace` seconds, then hands the rest back (FailTask, retryable
`worker_shutdown`). A claim that is no longer current (`task_stale`) ends the task here quietly:
another worker or a timeout decided it. See docs/workers.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import copy
import functools
import inspect
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from keel.engine.v1 import engine_pb2
from keel.worker.v1 import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from keel.worker.v1.worker_pb2_grpc import WorkerServiceAsyncStub

from keel_client.channel import TlsConfig, call_metadata, channel_options
from keel_client.errors import KeelClientError, error_from_rpc
from keel_core.json_values import from_value, to_value

log = logging.getLogger("keel_client.worker")

# An op: `async def` (runs on the worker's event loop), or a plain function (runs in a thread of the
# worker's own, so a blocking op does not stop the heartbeats that keep its claim).
OpFunction = Callable[["TaskContext", Any, Any], Awaitable[Any]] | Callable[["TaskContext", Any, Any], Any]
DEFAULT_POLL_WAIT = 20.0
# How often a plain op's io.call_blocking looks whether its op was stopped while it waits.
BLOCKING_CALL_LOOK = 0.5
# Unary calls other than PollTask give up after this long (and are retried while UNAVAILABLE).
CALL_DEADLINE = 30.0


@dataclass(frozen=True)
class CallInfo:
    """What a transport is told about a call besides its request: enough to deduplicate it remotely."""

    namespace: str
    fact_key: str
    run_id: str
    step_id: str
    attempt: int
    fencing: int


Transport = Callable[[Any, CallInfo], Awaitable[Any]]


@dataclass(frozen=True)
class WorkerOp:
    """An op a worker executes: `@op` attaches one to the function."""

    op_id: str
    version: str
    description: str
    function: OpFunction

    @property
    def blocking(self) -> bool:
        """A plain function, run in a thread (an `async def` op runs on the event loop)."""
        function = self.function  # as called: a sync adapter of an async function is sync
        return not (
            inspect.iscoroutinefunction(function)
            or inspect.iscoroutinefunction(type(function).__call__)  # an object with `async __call__`
        )


def op(op_id: str, *, version: str = "1", description: str = "") -> Callable[[OpFunction], OpFunction]:
    """Declare a function `(ctx, op_config, input) -> JSON` as the op `op_id` at `version`.

    An `async def` op runs on the worker's event loop and must not block it; a plain `def` op runs
    in a thread of its own, uses `ctx.io.call_blocking`, and looks at `ctx.cancelled` to stop early
    when its run is canceled or its claim is lost.
    """

    def declare(function: OpFunction) -> OpFunction:
        summary = description or next(iter((function.__doc__ or "").strip().splitlines()), "")
        function.__keel_op__ = WorkerOp(op_id, version, summary, function)  # type: ignore[union-attr]
        return function

    return declare


def _worker_op(item: OpFunction | WorkerOp) -> WorkerOp:
    if isinstance(item, WorkerOp):
        return item
    declared = getattr(item, "__keel_op__", None)
    if not isinstance(declared, WorkerOp):
        raise TypeError(f"{item!r} is not an op: decorate it with @keel_client.worker.op(...)")
    return declared


class OpFailure(Exception):
    """Raise from an op to fail its attempt with a code of your own; `retryable` decides a retry."""

    def __init__(self, code: str, message: str, *, retryable: bool = True, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.details = details


class TaskIo:
    """`ctx.io`: calls become facts of the run, recorded before the op sees their answer."""

    def __init__(
        self,
        running: _RunningTask,
        transports: Mapping[str, Transport],
        loop: asyncio.AbstractEventLoop,
        stopped: threading.Event,
    ) -> None:
        self._task = running
        self._transports = transports
        self._loop = loop
        self._stopped = stopped  # the op's ctx.cancelled

    def call_blocking(self, namespace: str, request: Any, fact_key: str) -> Any:
        """`call` from a plain (`def`) op's thread: waits for the answer, recorded first."""
        with contextlib.suppress(RuntimeError):  # no running loop in this thread: as it should be
            if asyncio.get_running_loop() is self._loop:
                raise OpFailure(
                    "blocking_call_on_event_loop",
                    f"io.call_blocking({namespace!r}) was called on the worker's event loop, which it "
                    "would block for ever: an async op awaits ctx.io.call(...) instead",
                    retryable=False,
                )
        self._refuse_if_stopped(namespace)
        try:
            answer = asyncio.run_coroutine_threadsafe(self.call(namespace, request, fact_key), self._loop)
        except RuntimeError:  # the loop is closed: the worker is gone
            raise self._stopped_error(namespace) from None
        while True:  # never for ever: the worker may stop (its loop with it) while this waits
            try:
                return answer.result(timeout=BLOCKING_CALL_LOOK)
            except concurrent.futures.TimeoutError:
                if self._stopped.is_set() or not self._loop.is_running():  # a closed loop runs no more
                    if not self._loop.is_closed():
                        answer.cancel()
                    raise self._stopped_error(namespace) from None

    def _refuse_if_stopped(self, namespace: str) -> None:
        if self._stopped.is_set():
            raise self._stopped_error(namespace)

    def _stopped_error(self, namespace: str) -> OpFailure:
        return OpFailure(
            "task_stopped",
            f"io.call({namespace!r}) after the worker stopped this op (its run was canceled, its claim "
            "was lost or the worker shut down): nothing was called",
            retryable=True,
        )

    async def call(self, namespace: str, request: Any, fact_key: str) -> Any:
        """The recorded answer for `fact_key`; else the transport's, recorded first (RecordFact)."""
        if not fact_key:
            raise OpFailure("missing_fact_key", f"io.call({namespace!r}) needs a fact key", retryable=False)
        facts = self._task.facts
        if fact_key in facts:
            return copy.deepcopy(facts[fact_key])
        if self._task.task.replay:
            raise OpFailure(
                "replay_fact_missing",
                f"replay: the replayed run recorded no fact {fact_key!r} (a replay makes no new calls)",
                retryable=False,
            )
        transport = self._transports.get(namespace)
        if transport is None:
            raise OpFailure(
                "unknown_namespace", f"this worker has no transport for {namespace!r}", retryable=False
            )
        task = self._task.task
        info = CallInfo(namespace, fact_key, task.run_id, task.step_id, task.attempt, task.fencing)
        # A plain op's thread outlives its stop: once stopped, it calls nothing more (another
        # attempt may be running the same call).
        self._refuse_if_stopped(namespace)
        answer = await transport(copy.deepcopy(request), info)
        recorded = await self._task.record(namespace, fact_key, answer)
        facts[fact_key] = recorded
        return copy.deepcopy(recorded)


@dataclass
class TaskContext:
    """What an op sees: the run, step and attempt, the run's input, the step's context, and `io`."""

    run_id: str
    step_id: str
    attempt: int
    input: Any
    context: Mapping[str, Any]
    io: TaskIo
    task_queue: str
    worker_id: str
    # Set when the worker stops the op (its run was canceled, its claim lost, the worker shut
    # down): a plain (`def`) op cannot be interrupted in its thread, so it looks at this to stop.
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _RunningTask:
    task: worker_pb2.Task
    worker: Worker
    facts: dict[str, Any] = field(default_factory=dict)
    cancel_requested: bool = False
    stale: bool = False

    async def record(self, namespace: str, fact_key: str, response: Any) -> Any:
        request = worker_pb2.RecordFactRequest(
            task_token=self.task.task_token,
            namespace=namespace,
            fact_key=fact_key,
            response=to_value(response),
        )
        answer = await self.worker._call("RecordFact", request)
        return from_value(answer.response)


async def _in_a_thread(call: Callable[[], Any], name: str) -> Any:
    """`call()` in a daemon thread of its own (a stopped op that runs on holds no worker slot and
    does not keep the process alive); an awaitable it returns (a sync wrapper of an async op) is
    awaited here, on the loop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():
            return  # the op was stopped meanwhile: its late answer goes nowhere
        if error is None:
            done.set_result(result)
        elif isinstance(error, Exception) and not isinstance(error, StopIteration):
            done.set_exception(error)
        else:  # what a future cannot hold (StopIteration, KeyboardInterrupt...): as a coroutine would
            failure = RuntimeError(f"the op raised {error!r}")
            failure.__cause__ = error
            done.set_exception(failure)

    def run() -> None:
        result, error = None, None
        try:
            result = context.run(call)
        except BaseException as raised:  # reaches the op's attempt as its failure
            error = raised
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is gone
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    result = await done
    if inspect.isawaitable(result):
        result = await result
    return result


class _Stale(Exception):
    """The claim is no longer current: stop, write nothing more."""


class Worker:
    """Polls `task_queue` of the engine at `address` and executes the tasks of `ops`."""

    def __init__(
        self,
        address: str,
        task_queue: str,
        ops: Iterable[OpFunction | WorkerOp],
        *,
        transports: Mapping[str, Transport] | None = None,
        concurrency: int = 10,
        worker_id: str | None = None,
        token: str | None = None,
        tls: TlsConfig | None = None,
        poll_wait: float = DEFAULT_POLL_WAIT,
        heartbeat_every: float = 10.0,
        shutdown_grace: float = 30.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.address = address
        self.task_queue = task_queue
        self.ops = {(o.op_id, o.version): o for o in map(_worker_op, ops)}
        if not self.ops:
            raise ValueError("a worker needs at least one op")
        self.transports = dict(transports or {})
        self.concurrency = concurrency
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.poll_wait = poll_wait
        self.heartbeat_every = heartbeat_every
        self.shutdown_grace = shutdown_grace
        self._metadata = call_metadata(token)
        self._tls = tls
        self._channel: grpc.aio.Channel | None = None
        self._stub: WorkerServiceAsyncStub | None = None
        self._stopping: asyncio.Event | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self.completed = 0  # tasks this worker completed (for tests and logs)
        self.heartbeats = 0  # HeartbeatTask calls answered (for tests and logs)

    # --- running -----------------------------------------------------------------------------------

    def run(self) -> None:
        """Run until SIGTERM or SIGINT (blocking), then shut down gracefully."""
        asyncio.run(self.serve(handle_signals=True))

    async def serve(self, *, handle_signals: bool = False) -> None:
        """Poll and execute until `stop()` (or, with `handle_signals`, SIGTERM/SIGINT)."""
        self._stopping = asyncio.Event()
        if handle_signals:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(signum, self.stop)
        target = self.address
        options = channel_options(retries=False)
        self._channel = (
            grpc.aio.secure_channel(target, self._tls.credentials(), options=options)
            if self._tls is not None
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        pollers = [
            asyncio.create_task(self._poll_loop(), name=f"poller {i}") for i in range(self.concurrency)
        ]
        try:
            await self._stopping.wait()
        finally:
            for poller in pollers:
                poller.cancel()
            await asyncio.gather(*pollers, return_exceptions=True)
            await self._finish_running()
            await self._channel.close(grace=None)

    def stop(self) -> None:
        """Stop polling; running tasks get `shutdown_grace` seconds, then are handed back."""
        if self._stopping is not None:
            self._stopping.set()

    async def _finish_running(self) -> None:
        running = list(self._running.values())
        if not running:
            return
        log.info(
            "worker %s: waiting up to %.0f s for %d task(s)",
            self.worker_id,
            self.shutdown_grace,
            len(running),
        )
        _, late = await asyncio.wait(running, timeout=self.shutdown_grace)
        for task in late:
            task.cancel()  # each hands its task back (FailTask, retryable worker_shutdown)
        await asyncio.gather(*late, return_exceptions=True)

    async def _poll_loop(self) -> None:
        assert self._stopping is not None
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                task = await self._poll()
                backoff = 0.1
            except KeelClientError as error:
                if not error.retryable and error.grpc_status not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    log.error("worker %s: PollTask refused: %s", self.worker_id, error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if task is None:
                continue
            execution = asyncio.create_task(self._execute(task), name=f"task {task.run_id}/{task.step_id}")
            self._running[task.task_token] = execution
            try:
                await asyncio.shield(execution)
            except asyncio.CancelledError:
                if not execution.done():
                    raise  # stopping: _finish_running takes it from here
            finally:
                if execution.done():
                    self._running.pop(task.task_token, None)

    async def _poll(self) -> worker_pb2.Task | None:
        assert self._stub is not None
        request = worker_pb2.PollTaskRequest(
            task_queue=self.task_queue,
            worker_id=self.worker_id,
            ops=[
                worker_pb2.OpRef(op_id=o.op_id, op_version=o.version, description=o.description)
                for o in self.ops.values()
            ],
        )
        request.wait.FromMilliseconds(int(self.poll_wait * 1000))
        try:
            response = await self._stub.PollTask(
                request, timeout=self.poll_wait + 10, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        return response.task if response.HasField("task") else None

    async def _call(self, method: str, request: Any) -> Any:
        """A unary WorkerService call, retried while UNAVAILABLE; `task_stale` raises _Stale."""
        assert self._stub is not None
        delay = 0.1
        deadline = time.monotonic() + CALL_DEADLINE
        while True:
            try:
                return await getattr(self._stub, method)(
                    request, timeout=CALL_DEADLINE, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as rpc_error:
                error = error_from_rpc(rpc_error)
                if error.code == "task_stale":
                    raise _Stale(error.message) from None
                retry = error.retryable or rpc_error.code() == grpc.StatusCode.UNAVAILABLE
                if not retry or time.monotonic() + delay > deadline:
                    raise error from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # --- one task ----------------------------------------------------------------------------------

    async def _execute(self, task: worker_pb2.Task) -> None:
        running = _RunningTask(task, self, {f.fact_key: from_value(f.response) for f in task.facts})
        worker_op = self.ops.get((task.op_id, task.op_version))
        op_task: asyncio.Future[Any] | None = None
        try:
            if worker_op is None:
                raise OpFailure(
                    "unknown_op", f"worker {self.worker_id} has no op {task.op_id}@{task.op_version}"
                )
            context = await self._context_of(task)
            stopped = threading.Event()
            ctx = TaskContext(
                task.run_id,
                task.step_id,
                task.attempt,
                from_value(task.input),
                context,
                TaskIo(running, self.transports, asyncio.get_running_loop(), stopped),
                task.task_queue,
                self.worker_id,
                stopped,
            )
            op_task = self._start_op(worker_op, ctx, from_value(task.op_config))
            await self._run_with_heartbeats(running, op_task)
            output = op_task.result()
            await self._call(
                "CompleteTask",
                worker_pb2.CompleteTaskRequest(task_token=task.task_token, output=to_value(output)),
            )
            self.completed += 1
        except _Stale as stale:
            log.info("task %s/%s attempt %d is stale: %s", task.run_id, task.step_id, task.attempt, stale)
        except asyncio.CancelledError:
            if op_task is not None:
                op_task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._fail(
                    task, "worker_shutdown", f"worker {self.worker_id} shut down", retryable=True
                )
            raise
        except Exception as error:  # the op's failure (or its output's) fails the attempt
            with contextlib.suppress(_Stale):
                await self._fail_with(task, error)
        finally:
            if op_task is not None and not op_task.done():
                op_task.cancel()

    def _start_op(self, worker_op: WorkerOp, ctx: TaskContext, op_config: Any) -> asyncio.Future[Any]:
        """The op running: on the event loop, or (a plain function) in one of the worker's threads."""
        running: asyncio.Future[Any]
        if worker_op.blocking:
            call = functools.partial(worker_op.function, ctx, op_config, ctx.input)
            running = asyncio.ensure_future(_in_a_thread(call, f"keel-op {ctx.run_id}/{ctx.step_id}"))
        else:
            running = asyncio.ensure_future(worker_op.function(ctx, op_config, ctx.input))
        # Cancelling the task does not stop a thread: the op is told (ctx.cancelled), and stops itself.
        running.add_done_callback(lambda done: ctx.cancelled.set() if done.cancelled() else None)
        return running

    async def _run_with_heartbeats(self, running: _RunningTask, op_task: asyncio.Future[Any]) -> None:
        """Wait for the op, heartbeating; a cancel of the run or a stale claim cancels it."""
        task = running.task
        every = self.heartbeat_every
        if task.HasField("heartbeat_timeout"):
            every = min(every, max(0.05, task.heartbeat_timeout.ToMilliseconds() / 3000))
        while True:
            done, _ = await asyncio.wait({op_task}, timeout=every)
            if done:
                return
            try:
                beat = await self._call(
                    "HeartbeatTask", worker_pb2.HeartbeatTaskRequest(task_token=task.task_token)
                )
            except BaseException:  # stale, or no engine to beat to: stop the op before failing its task
                op_task.cancel()
                raise
            self.heartbeats += 1
            if beat.cancel_requested:
                op_task.cancel()
                raise _Stale("the run asked the task to stop")

    async def _context_of(self, task: worker_pb2.Task) -> dict[str, Any]:
        if not task.context_artifact_id:
            context = from_value(task.context)
            return context if isinstance(context, dict) else {}
        assert self._stub is not None
        chunks: list[bytes] = []
        call = self._stub.GetArtifact(
            worker_pb2.GetArtifactRequest(task_token=task.task_token, artifact_id=task.context_artifact_id),
            timeout=CALL_DEADLINE,
            metadata=self._metadata,
        )
        try:
            async for chunk in call:
                chunks.append(chunk.data)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        return dict(json.loads(b"".join(chunks)))

    async def _fail_with(self, task: worker_pb2.Task, error: Exception) -> None:
        if isinstance(error, OpFailure):
            await self._fail(
                task, error.code, error.message, retryable=error.retryable, details=error.details
            )
        elif isinstance(error, KeelClientError):
            await self._fail(task, error.code, error.message, retryable=error.retryable)
        else:
            await self._fail(task, "op_failed", f"{type(error).__name__}: {error}", retryable=True)

    async def _fail(
        self,
        task: worker_pb2.Task,
        code: str,
        message: str,
        *,
        retryable: bool,
        details: dict[str, Any] | None = None,
    ) -> None:
        detail = engine_pb2.ErrorDetail(code=code, category="op", retryable=retryable, message=message)
        if details:
            detail.details.CopyFrom(to_value(details))
        await self._call("FailTask", worker_pb2.FailTaskRequest(task_token=task.task_token, error=detail))


__all__ = ["CallInfo", "OpFailure", "TaskContext", "Transport", "Worker", "WorkerOp", "op"]
