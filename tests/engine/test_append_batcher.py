"""The store client's append batcher on its own, over stubs that record what they were sent: which
caller's context a lone append's RPC runs in (its trace), what a many-run batch runs in, and how a
batch on the append stream fails: retried when gRPC says the call broke, final when the store said
no, and never answered with another batch's answer."""

from __future__ import annotations

import asyncio
import collections
import contextvars
from typing import Any

import grpc
import pytest
from keel.store.v1 import store_pb2

from engine_service.store.grpc_client import _AppendBatcher
from keel_core.errors import ErrorCategory, KeelError
from keel_core.status import from_rpc_error, to_rpc_status

caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="none")


class RecordingStub:
    """Answers appends when released; records the caller context each RPC was made in."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # (method, caller)
        self.release = asyncio.Event()
        self.called = asyncio.Event()

    async def AppendEvents(self, request: store_pb2.AppendEventsRequest, **_: float) -> Any:
        self.seen.append(("AppendEvents", caller.get()))
        self.called.set()
        await self.release.wait()
        return store_pb2.AppendEventsResponse(first_seq=1, head_seq=1)

    async def AppendEventsBatch(self, request: store_pb2.AppendEventsBatchRequest, **_: float) -> Any:
        self.seen.append(("AppendEventsBatch", caller.get()))
        self.called.set()
        await self.release.wait()
        answer = store_pb2.AppendEventsResponse(first_seq=1, head_seq=1)
        return store_pb2.AppendEventsBatchResponse(
            outcomes=[store_pb2.AppendOutcome(appended=answer) for _ in request.appends]
        )


async def test_each_append_is_sent_in_its_own_callers_context_and_a_batch_in_none() -> None:
    stub = RecordingStub()
    batcher = _AppendBatcher(stub, collections.Counter())  # type: ignore[arg-type]
    # A lone append goes as its own call (not on the append stream) when tracing is on, or to a
    # store without the stream: this one.
    batcher.streaming = False

    async def append_as(name: str) -> store_pb2.AppendEventsResponse:
        caller.set(name)
        return await batcher.append(store_pb2.AppendEventsRequest(stream_id=f"run:{name}"), 60)

    first = asyncio.ensure_future(append_as("a"))
    await stub.called.wait()
    second = asyncio.ensure_future(append_as("b"))  # queued behind a's: sent when a's comes back
    await asyncio.sleep(0)
    stub.release.set()
    await asyncio.gather(first, second)
    # b's append used to leave from a's task, in a's context: its span went to a's run.
    assert stub.seen == [("AppendEvents", "a"), ("AppendEvents", "b")]

    stub.release.clear()
    stub.called.clear()
    held = asyncio.ensure_future(append_as("c"))
    await stub.called.wait()
    together = [asyncio.ensure_future(append_as(name)) for name in ("d", "e")]
    await asyncio.sleep(0)
    stub.release.set()
    await asyncio.gather(held, *together)
    assert stub.seen[2:] == [("AppendEvents", "c"), ("AppendEventsBatch", "none")]


async def test_an_answer_that_comes_in_the_turn_the_time_runs_out_is_the_answer() -> None:
    # The answer is settled in the same loop turn as the try's timeout fires: the append used to
    # raise a bare TimeoutError (neither its answer nor an RPC error its caller retries).
    stub = RecordingStub()
    batcher = _AppendBatcher(stub, collections.Counter())  # type: ignore[arg-type]
    answer = store_pb2.AppendEventsResponse(first_seq=7, head_seq=7)
    # With no time at all, the timeout fires on the loop's next turn; the answer comes just before.
    append = asyncio.ensure_future(batcher.append(store_pb2.AppendEventsRequest(stream_id="run:a"), 0))
    asyncio.get_running_loop().call_soon(lambda: batcher._waiting[0].answer.set_result(answer))
    assert await append == answer
    assert stub.seen == []  # answered before it was sent


class FakeStreamCall:
    """An AppendEventsStream call: its write fails with `write_error`, or its read answers each request
    with one outcome per append, marked with `mark` (as head_seq), once `release` is set."""

    def __init__(self, mark: int, write_error: BaseException | None = None) -> None:
        self.mark = mark
        self.write_error = write_error
        self.written: list[store_pb2.AppendEventsStreamRequest] = []
        self.release = asyncio.Event()
        self.release.set()
        self.was_cancelled = asyncio.Event()

    def done(self) -> bool:
        return self.was_cancelled.is_set()

    def cancel(self) -> bool:
        self.was_cancelled.set()
        return True

    async def write(self, request: store_pb2.AppendEventsStreamRequest) -> None:
        if self.write_error is not None:
            raise self.write_error
        self.written.append(request)

    async def read(self) -> store_pb2.AppendEventsStreamResponse:
        await self.release.wait()
        answer = store_pb2.AppendEventsResponse(first_seq=self.mark, head_seq=self.mark)
        appended = store_pb2.AppendOutcome(appended=answer)
        return store_pb2.AppendEventsStreamResponse(outcomes=[appended] * len(self.written[-1].appends))


class StreamStub:
    """Opens the given calls in turn."""

    def __init__(self, *calls: FakeStreamCall) -> None:
        self.calls = list(calls)
        self.opened = 0

    def AppendEventsStream(self) -> FakeStreamCall:
        call = self.calls[self.opened]
        self.opened += 1
        return call


def rpc_error(
    code: grpc.StatusCode, details: str, trailing: grpc.aio.Metadata | None = None
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing or grpc.aio.Metadata(), details, "")


def the_stores(error: KeelError) -> grpc.aio.AioRpcError:
    """A status as the store sends it: its ErrorInfo in the trailing metadata."""
    status = to_rpc_status(error)
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    code = next(code for code in grpc.StatusCode if code.value[0] == status.code)
    return rpc_error(code, status.message, trailing)


def append_request(stream_id: str) -> store_pb2.AppendEventsRequest:
    return store_pb2.AppendEventsRequest(stream_id=stream_id)


@pytest.mark.parametrize(
    "broken",
    [
        # Written to a stream whose store had just died, before gRPC knew the call was over.
        rpc_error(grpc.StatusCode.INTERNAL, "Internal error from Core"),
        # Written to a call already over.
        asyncio.InvalidStateError("RPC already finished"),
        # Cancelled by the other end (a server stopped past its grace, a proxy's idle timeout).
        rpc_error(grpc.StatusCode.CANCELLED, "Cancelled"),
    ],
    ids=["internal-from-core", "call-over", "cancelled-by-peer"],
)
async def test_a_batch_whose_stream_broke_fails_unavailable_and_the_next_opens_a_new_one(
    broken: BaseException,
) -> None:
    broken_call, fresh_call = FakeStreamCall(1, write_error=broken), FakeStreamCall(2)
    stub = StreamStub(broken_call, fresh_call)
    batcher = _AppendBatcher(stub, collections.Counter())  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await batcher.append(append_request("run:a"), 60)
    # UNAVAILABLE is what the caller's retry loop retries (a step's recorded answer is kept).
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert broken_call.was_cancelled.is_set()
    answer = await batcher.append(append_request("run:a"), 60)
    assert answer.head_seq == 2 and stub.opened == 2


async def test_the_stores_own_status_on_the_stream_stays_the_appends_own() -> None:
    # The store's statuses carry ErrorInfo; an INTERNAL of the store's is not a broken call.
    refusal = KeelError(
        "store_read_only", "read-only for maintenance", category=ErrorCategory.FAILED_PRECONDITION
    )
    internal = KeelError("internal", "the store failed", category=ErrorCategory.INTERNAL)
    for error in (refusal, internal):
        stub = StreamStub(FakeStreamCall(1, write_error=the_stores(error)))
        batcher = _AppendBatcher(stub, collections.Counter())  # type: ignore[arg-type]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await batcher.append(append_request("run:a"), 60)
        assert (from_rpc_error(caught.value).code, caught.value.details()) == (error.code, error.message)


async def test_an_answer_that_came_too_late_is_never_taken_for_the_next_batchs() -> None:
    late, fresh = FakeStreamCall(1), FakeStreamCall(2)
    late.release.clear()  # the store holds the first batch's answer
    stub = StreamStub(late, fresh)
    batcher = _AppendBatcher(stub, collections.Counter())  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await batcher.append(append_request("run:a"), 0.05)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(late.was_cancelled.wait(), 60)  # the batch's own deadline ended its call
    late.release.set()  # its answer comes now, on the call given up
    answer = await batcher.append(append_request("run:b"), 60)
    assert answer.head_seq == 2  # the new call's answer, to its own request
    assert [len(request.appends) for request in fresh.written] == [1] and stub.opened == 2
