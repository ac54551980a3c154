"""AsyncKeelClient against a real engine and store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from keel_client import (
    AsyncKeelClient,
    InvalidArgumentError,
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


async def test_labels_on_start_and_every_list_filter(keel: AsyncKeelClient) -> None:
    team = f"py-{uuid.uuid4().hex[:12]}"
    first = await keel.start_run(op="keel.echo", labels={"team": team, "env": "prod"}, wait=True)
    second = await keel.start_run(op="keel.echo", labels={"team": team, "env": "dev"}, wait=True)
    run = await keel.get_run(first.run_id)
    assert dict(run.labels) == {"team": team, "env": "prod"}

    async def ids(**filters: Any) -> list[str]:
        return [s.run_id async for s in keel.iter_runs(page_size=1, **filters)]

    assert await ids(labels={"team": team}) == [second.run_id, first.run_id]
    assert await ids(labels={"team": team, "env": "prod"}) == [first.run_id]
    assert await ids(labels={"team": team}, pipeline_id="keel.echo", top_level=True) == [
        second.run_id,
        first.run_id,
    ]
    assert await ids(labels={"team": team}, top_level=False) == []
    started = (await keel.get_run(second.run_id)).created_at
    assert started is not None
    assert await ids(labels={"team": team}, started_after=started) == [second.run_id]
    assert await ids(labels={"team": team}, started_before=started) == [first.run_id]
    page = await keel.list_runs(labels={"team": team}, page_size=10)
    summary = page.runs[0]
    assert (summary.pipeline_id, dict(summary.labels), summary.parent_run_id) == (
        "keel.echo",
        {"team": team, "env": "dev"},
        None,
    )
    with pytest.raises(InvalidArgumentError) as caught:
        await keel.start_run(op="keel.echo", labels={"team": "not ok"})
    assert caught.value.code == "invalid_labels"


async def test_list_runs_by_duration_reaches_the_engine(keel: AsyncKeelClient) -> None:
    team = f"py-{uuid.uuid4().hex[:12]}"
    echoed = await keel.start_run(op="keel.echo", labels={"team": team}, wait=True)

    async def ids(**filters: Any) -> list[str]:
        return [s.run_id async for s in keel.iter_runs(labels={"team": team}, **filters)]

    # The echo run ended long before a day had passed, and its duration stopped there.
    day = timedelta(days=1)
    assert await ids(min_duration=timedelta(0), max_duration=day) == [echoed.run_id]
    assert await ids(min_duration=day) == []
    for least, most in ((timedelta(seconds=-1), None), (day, timedelta(0))):
        with pytest.raises(InvalidArgumentError) as caught:
            await keel.list_runs(min_duration=least, max_duration=most)
        assert caught.value.code == "invalid_duration"
