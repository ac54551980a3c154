"""The store client's append batcher on its own, over a stub that records what it was sent: which
caller's context a lone append's RPC runs in (its trace), and what a many-run batch runs in."""

from __future__ import annotations

import asyncio
import collections
import contextvars
from typing import Any

from keel.store.v1 import store_pb2

from engine_service.store.grpc_client import _AppendBatcher

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
