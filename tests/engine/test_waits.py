"""Runs that wait: durable timers park the run, fire once at their recorded time, survive restarts.

Times are judged on what the stream records (StepAttemptStarted, StepWaiting's fire time,
StepCompleted), never on wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from engine_service.domain.waits import PARK_AFTER_US
from tests.engine.conftest import Cluster
from tests.engine.processes import ServiceProcess, eventually, start_engine_process, start_store_process
from tests.engine.test_engine_rpcs import pipeline, step
from tests.engine.test_terminalize import terminalize

WAIT = 60.0


async def run_events(store_stub: Any, run_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The run's events as (type, payload JSON)."""
    page = await store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run_id}"))
    return [(e.type, json.loads(e.payload)) for e in page.events]


def only(events: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    """The payloads of the events of one type."""
    return [data for name, data in events if name == kind]


def sleep_run(seconds: float, run_id: str = "") -> engine_pb2.StartRunRequest:
    """A run of one durable sleep followed by an echo."""
    steps = pipeline(
        step("nap", "keel.sleep", {"seconds": seconds}), step("after", "keel.echo", None, ("nap",))
    )
    return engine_pb2.StartRunRequest(pipeline=steps, run_id=run_id)


def check_fired_once_at_its_time(events: list[tuple[str, dict[str, Any]]], seconds: float) -> None:
    """One attempt of `nap`, whose recorded fire time is its start + `seconds`, completed at or after it."""
    [started] = [e for e in only(events, "StepAttemptStarted") if e["step_id"] == "nap"]
    [waiting] = only(events, "StepWaiting")
    [completed] = [e for e in only(events, "StepCompleted") if e["step_id"] == "nap"]
    until = waiting["wait"]["until_us"]
    assert waiting["wait"]["kind"] == "timer" and started["attempt"] == waiting["attempt"] == 0
    # The op computed the fire time between the attempt's start and the StepWaiting record.
    assert started["at_us"] + int(seconds * 1e6) <= until <= waiting["at_us"] + int(seconds * 1e6)
    assert completed["at_us"] >= until and completed["attempt"] == 0


async def test_a_long_sleep_parks_the_run_and_fires_once_at_its_recorded_time(cluster: Cluster) -> None:
    started = await cluster.stub.StartRun(sleep_run(1.5))
    run_id = started.run_id
    stream = f"run:{run_id}"

    async def parked() -> bool:
        head = await cluster.store_stub.HeadSeq(store_pb2.HeadSeqRequest(stream_id=stream))
        return head.status == store_pb2.STREAM_STATUS_PARKED

    await eventually(parked, "the run parked", within=WAIT, poll=0.05)
    due = await cluster.store_stub.ListDue(store_pb2.ListDueRequest(before_us=2**62, prefix="run:"))
    assert [d.stream_id for d in due.due] == [stream]
    listed = await cluster.stub.ListRuns(engine_pb2.ListRunsRequest(statuses=[engine_pb2.RUN_STATUS_RUNNING]))
    assert [r.run_id for r in listed.runs] == [run_id]  # a parked run is still a running run
    assert cluster.engine.engine is not None
    assert run_id not in cluster.engine.engine.drivers  # no coroutine holds it
    awaited = await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=WAIT)
    assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED
    events = await run_events(cluster.store_stub, run_id)
    check_fired_once_at_its_time(events, 1.5)
    [parked_event] = only(events, "RunParked")
    assert parked_event["due_at_us"] == only(events, "StepWaiting")[0]["wait"]["until_us"]
    assert len(only(events, "RunResumed")) == 1
    assert [n for n, _ in events].index("RunResumed") > [n for n, _ in events].index("RunParked")
    due = await cluster.store_stub.ListDue(store_pb2.ListDueRequest(before_us=2**62, prefix="run:"))
    assert list(due.due) == []  # resuming cleared the due-time index entry


async def test_a_short_sleep_waits_in_the_driver_without_parking(cluster: Cluster) -> None:
    seconds = PARK_AFTER_US / 1e6 / 4
    request = sleep_run(seconds)
    request.wait = True
    run = (await cluster.stub.StartRun(request, timeout=WAIT)).run
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    events = await run_events(cluster.store_stub, run.run_id)
    check_fired_once_at_its_time(events, seconds)
    assert only(events, "RunParked") == []


async def test_canceling_a_parked_run_ends_it_and_its_timer(cluster: Cluster) -> None:
    run_id = (await cluster.stub.StartRun(sleep_run(300))).run_id

    async def parked() -> bool:
        due = await cluster.store_stub.ListDue(store_pb2.ListDueRequest(before_us=2**62, prefix="run:"))
        return [d.stream_id for d in due.due] == [f"run:{run_id}"]

    await eventually(parked, "the run parked", within=WAIT, poll=0.05)
    outcome = await cluster.stub.Terminalize(terminalize(run_id, reason="no more waiting"))
    assert outcome.status == engine_pb2.RUN_STATUS_CANCELED
    due = await cluster.store_stub.ListDue(store_pb2.ListDueRequest(before_us=2**62, prefix="run:"))
    assert list(due.due) == []
    head = await cluster.store_stub.HeadSeq(store_pb2.HeadSeqRequest(stream_id=f"run:{run_id}"))
    assert head.status == store_pb2.STREAM_STATUS_CANCELED


async def test_a_failed_attempt_retries_after_its_backoff_counted_from_the_recorded_failure(
    cluster: Cluster,
) -> None:
    """A backoff of 1.2 s (longer than PARK_AFTER_US) parks the run until the retry is due."""
    backoff = Duration(seconds=1, nanos=200_000_000)
    config = engine_pb2.RunConfig(
        retry_policy=engine_pb2.RetryPolicy(max_attempts=2, initial_backoff=backoff, max_backoff=backoff)
    )
    request = engine_pb2.StartRunRequest(
        pipeline=pipeline(step("flaky", "keel.fail_n_times", {"n": 1})), run_config=config, wait=True
    )
    run = (await cluster.stub.StartRun(request, timeout=WAIT)).run
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    events = await run_events(cluster.store_stub, run.run_id)
    [failed] = only(events, "StepAttemptFailed")
    [retry] = [e for e in only(events, "StepAttemptStarted") if e["attempt"] == 1]
    assert retry["at_us"] >= failed["at_us"] + 1_200_000
    [parked] = only(events, "RunParked")
    assert parked["due_at_us"] == failed["at_us"] + 1_200_000


# -- across engine restarts (real processes, SIGKILL) --------------------------------------------


async def _await_on(engine: ServiceProcess, run_ids: list[str]) -> list[engine_pb2.AwaitRunResponse]:
    channel = grpc.aio.insecure_channel(engine.address)
    try:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        return list(
            await asyncio.gather(
                *(stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=r), timeout=WAIT) for r in run_ids)
            )
        )
    finally:
        await channel.close(grace=None)


@pytest.mark.slow
async def test_a_sleep_interrupted_by_a_sigkill_fires_once_at_its_first_recorded_time(tmp_path: Path) -> None:
    """A 3 s sleep, engine SIGKILLed 2 s in, restarted: one attempt, fire time = start + 3 s."""
    store = await start_store_process(tmp_path / "store")
    doomed = await start_engine_process(store.address)
    survivor: ServiceProcess | None = None
    run_id = str(uuid.uuid4())
    store_channel = grpc.aio.insecure_channel(store.address)
    store_stub = store_pb2_grpc.StoreServiceStub(store_channel)
    try:
        channel = grpc.aio.insecure_channel(doomed.address)
        await engine_pb2_grpc.EngineServiceStub(channel).StartRun(sleep_run(3.0, run_id), timeout=30)
        await channel.close(grace=None)

        async def parked() -> bool:
            return bool(only(await run_events(store_stub, run_id), "RunParked"))

        await eventually(parked, "the run parked", within=WAIT, poll=0.05)
        await asyncio.sleep(2.0)  # the kill lands during the sleep (what is asserted is the record)
        await doomed.kill()
        survivor = await start_engine_process(store.address, log_path=str(tmp_path / "survivor.log"))
        [awaited] = await _await_on(survivor, [run_id])
        assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED
        events = await run_events(store_stub, run_id)
        check_fired_once_at_its_time(events, 3.0)
        [nap] = [s for s in awaited.run.steps if s.step_id == "nap"]
        assert [a.attempt for a in nap.attempts] == [0]
    finally:
        await store_channel.close(grace=None)
        if survivor is not None:
            await survivor.kill()
        await doomed.kill()
        await store.kill()


@pytest.mark.slow
async def test_several_parked_runs_fire_after_every_engine_was_restarted(tmp_path: Path) -> None:
    store = await start_store_process(tmp_path / "store")
    first = await start_engine_process(store.address)
    second: ServiceProcess | None = None
    run_ids = [str(uuid.uuid4()) for _ in range(4)]
    store_channel = grpc.aio.insecure_channel(store.address)
    store_stub = store_pb2_grpc.StoreServiceStub(store_channel)
    try:
        channel = grpc.aio.insecure_channel(first.address)
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        for run_id in run_ids:
            await stub.StartRun(sleep_run(2.0, run_id), timeout=30)
        await channel.close(grace=None)

        async def all_parked() -> bool:
            due = await store_stub.ListDue(store_pb2.ListDueRequest(before_us=2**62, prefix="run:"))
            return len(due.due) == len(run_ids)

        await eventually(all_parked, "every run parked", within=WAIT, poll=0.05)
        with contextlib.suppress(Exception):
            assert await first.terminate() == 0  # a graceful stop: nothing of a parked run is lost
        second = await start_engine_process(store.address)
        awaited = await _await_on(second, run_ids)
        assert all(a.done and a.run.status == engine_pb2.RUN_STATUS_COMPLETED for a in awaited)
        for run_id in run_ids:
            check_fired_once_at_its_time(await run_events(store_stub, run_id), 2.0)
    finally:
        await store_channel.close(grace=None)
        if second is not None:
            await second.kill()
        await first.kill()
        await store.kill()
