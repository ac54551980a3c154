"""AsyncKeelClient against a real engine and store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from keel_client import (
    AsyncKeelClient,
    InvalidPlan,
    RunAlreadyExists,
    RunNotFound,
    RunStatus,
)

from tests.client.conftest import pipeline, step

TWO_STEPS = pipeline(
    "async-two-steps",
    step("first", "keel.echo", {"n": 2}),
    step("second", "keel.transform", {"fields": {"n": "$context.first.config.n"}}, ("first",)),
)


@pytest.fixture
async def keel(engine_address: str) -> AsyncIterator[AsyncKeelClient]:
    async with AsyncKeelClient(engine_address) as client:
        yield client


async def test_start_watch_and_await_agree(keel: AsyncKeelClient) -> None:
    started = await keel.start_run(TWO_STEPS, input={"who": "ada"})
    events = [event async for event in keel.watch_run(started.run_id)]
    awaited = await keel.await_run(started.run_id)
    assert awaited.done and awaited.run is not None
    assert awaited.run.status is RunStatus.COMPLETED
    assert awaited.run.final_snapshot["second"] == {"n": 2}
    assert events[0].type == "RunStarted" and events[-1].type == "RunCompleted"
    assert events[-1].seq == awaited.run.head_seq
    assert await keel.get_run(started.run_id) == awaited.run


async def test_many_runs_started_concurrently_all_complete(keel: AsyncKeelClient) -> None:
    starts = await asyncio.gather(*(keel.start_run(TWO_STEPS, input={"i": i}) for i in range(8)))
    assert len({started.run_id for started in starts}) == 8
    awaited = await asyncio.gather(*(keel.await_run(started.run_id) for started in starts))
    assert all(a.run is not None and a.run.status is RunStatus.COMPLETED for a in awaited)
    listed = {summary.run_id async for summary in keel.iter_runs(statuses=["completed"])}
    assert {started.run_id for started in starts} <= listed


async def test_breaking_out_of_watch_cancels_the_stream(keel: AsyncKeelClient) -> None:
    started = await keel.start_run(pipeline("async-slow", step("nap", "keel.sleep", {"seconds": 0.3})))
    async for event in keel.watch_run(started.run_id):
        assert event.type == "RunStarted"
        break
    assert (await keel.await_run(started.run_id)).done


async def test_error_classes_follow_the_error_info_reason(keel: AsyncKeelClient) -> None:
    with pytest.raises(RunNotFound):
        await keel.get_run(str(uuid.uuid4()))
    with pytest.raises(InvalidPlan):
        await keel.start_run(pipeline("dup", step("a", "keel.echo"), step("a", "keel.echo")))
    run_id = str(uuid.uuid4())
    await keel.start_run(TWO_STEPS, input=1, run_id=run_id)
    assert not (await keel.start_run(TWO_STEPS, input=1, run_id=run_id)).created
    with pytest.raises(RunAlreadyExists):
        await keel.start_run(TWO_STEPS, input=2, run_id=run_id)


async def test_list_ops_describes_each_op(keel: AsyncKeelClient) -> None:
    ops = await keel.list_ops()
    assert [(op.op_id, op.op_version) for op in ops] == sorted((op.op_id, op.op_version) for op in ops)
    assert all(op.description for op in ops if op.op_id.startswith("keel."))
