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
    """An AppendEventsStream call: its write fails with `write_error` (its read with `read_error`),
    or its read answers each request with one outcome per append, marked with `mark` (as head_seq),
    once `release` is set. `ended` is the status of a call already over when it is written to."""

    def __init__(
        self,
        mark: int,
        write_error: BaseException | None = None,
        read_error: BaseException | None = None,
        ended: grpc.StatusCode | None = None,
        answers_first: int = 0,
    ) -> None:
        self.mark = mark
        self.answers_first = answers_first  # requests answered before `read_error` applies
        self.write_error = write_error
        self.read_error = read_error
        self.ended = ended
        self.written: list[store_pb2.AppendEventsStreamRequest] = []
        self.wrote = asyncio.Event()  # a request was written
        self.release = asyncio.Event()
        self.release.set()
        self.was_cancelled = asyncio.Event()

    def done(self) -> bool:
        return self.was_cancelled.is_set() or self.ended is not None

    def cancel(self) -> bool:
        self.was_cancelled.set()
        return True

    async def code(self) -> grpc.StatusCode:
        return self.ended or grpc.StatusCode.CANCELLED

    async def details(self) -> str:
        return "Method not found!" if self.ended == grpc.StatusCode.UNIMPLEMENTED else ""

    async def write(self, request: store_pb2.AppendEventsStreamRequest) -> None:
        if self.write_error is not None:
            raise self.write_error
        self.written.append(request)
        self.wrote.set()

    async def read(self) -> store_pb2.AppendEventsStreamResponse:
        if self.read_error is not None and len(self.written) > self.answers_first:
            raise self.read_error
        await self.release.wait()
        answer = store_pb2.AppendEventsResponse(first_seq=self.mark, head_seq=self.mark)
        appended = store_pb2.AppendOutcome(appended=answer)
        return store_pb2.AppendEventsStreamResponse(outcomes=[appended] * len(self.written[-1].appends))


class StreamStub:
    """Opens the given calls in turn; answers AppendEventsBatch calls with head_seq 99, and
    AppendEvents calls with 98."""

    def __init__(self, *calls: FakeStreamCall) -> None:
        self.calls = list(calls)
        self.opened = 0
        self.batch_calls = 0
        self.unary_calls = 0

    async def AppendEvents(self, request: store_pb2.AppendEventsRequest, **_: float) -> Any:
        self.unary_calls += 1
        return store_pb2.AppendEventsResponse(first_seq=98, head_seq=98)

    async def AppendEventsBatch(self, request: store_pb2.AppendEventsBatchRequest, **_: float) -> Any:
        self.batch_calls += 1
        answer = store_pb2.AppendEventsResponse(first_seq=99, head_seq=99)
        return store_pb2.AppendEventsBatchResponse(
            outcomes=[store_pb2.AppendOutcome(appended=answer) for _ in request.appends]
        )

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
        FakeStreamCall(1, write_error=rpc_error(grpc.StatusCode.INTERNAL, "Internal error from Core")),
        # The same through interceptors (a token, tracing): their task sends the write, and the
        # error comes out of the read.
        FakeStreamCall(1, read_error=rpc_error(grpc.StatusCode.INTERNAL, "Internal error from Core")),
        # Written to a call already over.
        FakeStreamCall(1, write_error=asyncio.InvalidStateError("RPC already finished")),
        # Cancelled by the other end (a server stopped past its grace, a proxy's idle timeout).
        FakeStreamCall(1, read_error=rpc_error(grpc.StatusCode.CANCELLED, "Cancelled")),
    ],
    ids=["internal-from-core", "internal-from-core-on-read", "call-over", "cancelled-by-peer"],
)
async def test_a_batch_whose_stream_broke_fails_unavailable_and_the_next_opens_a_new_one(
    broken: FakeStreamCall,
) -> None:
    broken_call, fresh_call = broken, FakeStreamCall(2)
    stub = StreamStub(broken_call, fresh_call)
    batcher = _AppendBatcher(stub, collections.Counter())  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await batcher.append(append_request("run:a"), 60)
    # UNAVAILABLE is what the caller's retry loop retries (a step's recorded answer is kept).
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert broken_call.was_cancelled.is_set()
    answer = await batcher.append(append_request("run:a"), 60)
    assert answer.head_seq == 2 and stub.opened == 2


async def test_an_internal_error_read_without_the_stores_word_stays_final() -> None:
    # Not a broken connection (that one has gRPC's own words): a fault outside the store's handler,
    # final as it would be on a unary call.
    fault = rpc_error(grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2")
    stub = StreamStub(FakeStreamCall(1, read_error=fault))
    batcher = _AppendBatcher(stub, collections.Counter())  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await batcher.append(append_request("run:a"), 60)
    assert caught.value.code() == grpc.StatusCode.INTERNAL


async def test_streams_that_keep_breaking_give_way_to_a_call_per_batch() -> None:
    # A proxy on the way that cuts every bidirectional call, say: a unary call still gets through.
    cut = [FakeStreamCall(i, read_error=rpc_error(grpc.StatusCode.CANCELLED, "Cancelled")) for i in range(5)]
    stub = StreamStub(*cut)
    batcher = _AppendBatcher(stub, collections.Counter())  # type: ignore[arg-type]
    for _ in cut:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await batcher.append(append_request("run:a"), 60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # A lone append now goes as its own AppendEvents, a batch as an AppendEventsBatch call.
    answer = await batcher.append(append_request("run:a"), 60)
    assert (answer.head_seq, stub.unary_calls, stub.opened) == (98, 1, 5)
    together = await asyncio.gather(*(batcher.append(append_request(f"run:{i}"), 60) for i in "bc"))
    assert [each.head_seq for each in together] == [99, 99] and stub.batch_calls == 1


async def test_an_answer_between_broken_streams_starts_the_count_again() -> None:
    def cut(mark: int, answers_first: int = 0) -> FakeStreamCall:
        cancelled = rpc_error(grpc.StatusCode.CANCELLED, "Cancelled")
        return FakeStreamCall(mark, read_error=cancelled, answers_first=answers_first)

    # Four cut; one that answers once and is cut at its next request (the fifth break, but one
    # after an answer: the first of a new count); three more cut; then one that answers.
    stub = StreamStub(
        *(cut(i) for i in range(4)), cut(50, 1), *(cut(i) for i in range(3)), FakeStreamCall(60)
    )
    batcher = _AppendBatcher(stub, collections.Counter())  # type: ignore[arg-type]
    heads = []
    for _ in range(10):
        try:
            heads.append((await batcher.append(append_request("run:a"), 60)).head_seq)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert heads == [50, 60] and batcher.streaming and stub.opened == 9


async def test_a_write_to_a_call_an_older_store_ended_unimplemented_falls_back_to_batch_calls() -> None:
    stub = StreamStub(
        FakeStreamCall(
            1,
            write_error=asyncio.InvalidStateError("RPC already finished"),
            ended=grpc.StatusCode.UNIMPLEMENTED,
        )
    )
    batcher = _AppendBatcher(stub, collections.Counter())  # type: ignore[arg-type]
    answer = await batcher.append(append_request("run:a"), 60)
    assert (answer.head_seq, stub.batch_calls) == (99, 1)
    assert not batcher.streaming


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


async def test_an_append_whose_time_runs_out_in_the_queue_fails_and_is_never_sent() -> None:
    call = FakeStreamCall(1)
    call.release.clear()  # the store holds the first batch's answer: the next appends queue
    stub = StreamStub(call)
    batcher = _AppendBatcher(stub, collections.Counter())  # type: ignore[arg-type]
    first = asyncio.ensure_future(batcher.append(append_request("run:a"), 60))
    await asyncio.wait_for(call.wrote.wait(), 60)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        # (wait_for: should the try's timer not fire, the test fails rather than hangs)
        await asyncio.wait_for(batcher.append(append_request("run:late"), 0.01), 60)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    cancelled = asyncio.ensure_future(batcher.append(append_request("run:gone"), 60))
    kept = asyncio.ensure_future(batcher.append(append_request("run:b"), 60))
    await asyncio.sleep(0)
    cancelled.cancel()  # its caller stopped waiting while it was queued
    call.release.set()
    assert (await first).head_seq == 1 and (await kept).head_seq == 1
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    sent = [[append.stream_id for append in request.appends] for request in call.written]
    assert sent == [["run:a"], ["run:b"]]  # neither the late append nor the cancelled one left
