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
from keel_core.json_values import from_struct, from_value, to_value
from tests.engine.conftest import Cluster
from tests.engine.processes import ServiceProcess, eventually, start_engine_process, start_store_process
from tests.engine.test_engine_rpcs import expect_error, pipeline, step
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
    # no coroutine holds it (the driver ends right after RunParked lands and one last look)
    drivers = cluster.engine.engine.drivers
    await eventually(lambda: run_id not in drivers, "the driver ended", within=WAIT, poll=0.02)
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


# -- what GetRun shows --------------------------------------------------------------------------


async def until_parked(cluster: Cluster, run_id: str) -> None:
    """Wait until the run is parked (its stream labelled so)."""

    async def parked() -> bool:
        head = await cluster.store_stub.HeadSeq(store_pb2.HeadSeqRequest(stream_id=f"run:{run_id}"))
        return head.status == store_pb2.STREAM_STATUS_PARKED

    await eventually(parked, "the run parked", within=WAIT, poll=0.05)


async def test_get_run_shows_a_waiting_step_and_its_timer(cluster: Cluster) -> None:
    run_id = (await cluster.stub.StartRun(sleep_run(300))).run_id
    await until_parked(cluster, run_id)
    run = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
    assert run.status == engine_pb2.RUN_STATUS_RUNNING
    nap = next(s for s in run.steps if s.step_id == "nap")
    assert nap.status == engine_pb2.STEP_STATUS_WAITING
    [attempt] = nap.attempts
    assert attempt.status == engine_pb2.STEP_STATUS_WAITING and attempt.wait.kind == "timer"
    [waiting] = only(await run_events(cluster.store_stub, run_id), "StepWaiting")
    assert attempt.wait.until.ToMicroseconds() == waiting["wait"]["until_us"]
    await cluster.stub.Terminalize(terminalize(run_id, reason="done looking"))
    run = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
    nap = next(s for s in run.steps if s.step_id == "nap")
    assert nap.status == engine_pb2.STEP_STATUS_FAILED  # a cancel cut the wait


# -- run deadlines -------------------------------------------------------------------------------


def with_deadline(request: engine_pb2.StartRunRequest, seconds: float) -> engine_pb2.StartRunRequest:
    """The request with `run_config.execution_timeout` set."""
    request.run_config.execution_timeout.FromMicroseconds(int(seconds * 1e6))
    return request


def check_timed_out_once(
    run: engine_pb2.Run, events: list[tuple[str, dict[str, Any]]], seconds: float
) -> None:
    """Failed `run_timeout`, one terminal event, decided at or after the recorded start + `seconds`."""
    assert run.status == engine_pb2.RUN_STATUS_FAILED and run.error.code == "run_timeout", run.reason
    assert run.reason.startswith("run_timeout")
    [started] = only(events, "RunStarted")
    [completed] = only(events, "RunCompleted")
    assert completed["at_us"] >= started["at_us"] + int(seconds * 1e6)
    assert completed["error"]["code"] == "run_timeout"


async def test_a_run_deadline_reached_during_a_step_cancels_its_op_and_fails_the_run(
    cluster: Cluster,
) -> None:
    steps = pipeline(step("busy", "keel.sleep_in_process", {"seconds": 300}))
    request = with_deadline(engine_pb2.StartRunRequest(pipeline=steps, wait=True), 0.5)
    run = (await cluster.stub.StartRun(request, timeout=WAIT)).run
    events = await run_events(cluster.store_stub, run.run_id)
    check_timed_out_once(run, events, 0.5)
    [failed] = only(events, "StepAttemptFailed")
    assert failed["step_id"] == "busy" and failed["error"]["code"] == "run_timeout"


async def test_a_run_deadline_reached_while_parked_on_a_timer_fails_the_run_once(cluster: Cluster) -> None:
    request = with_deadline(sleep_run(300), 1.5)
    run_id = (await cluster.stub.StartRun(request)).run_id
    await until_parked(cluster, run_id)
    [parked] = only(await run_events(cluster.store_stub, run_id), "RunParked")
    [started] = only(await run_events(cluster.store_stub, run_id), "RunStarted")
    assert parked["due_at_us"] == started["at_us"] + 1_500_000  # the deadline, before the timer
    awaited = await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=WAIT)
    assert awaited.done
    events = await run_events(cluster.store_stub, run_id)
    check_timed_out_once(awaited.run, events, 1.5)
    due = await cluster.store_stub.ListDue(store_pb2.ListDueRequest(before_us=2**62, prefix="run:"))
    assert list(due.due) == []


async def test_a_run_that_times_out_cancels_its_children_whose_policy_is_cancel(cluster: Cluster) -> None:
    config = {"op_id": "keel.sleep", "op_config": {"seconds": 300}, "count": 2}
    request = engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="keel.fan_out", op_config=to_value(config)), wait=True
    )
    run = (await cluster.stub.StartRun(with_deadline(request, 1.5), timeout=WAIT)).run
    check_timed_out_once(run, await run_events(cluster.store_stub, run.run_id), 1.5)

    async def children_canceled() -> bool:
        got = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run.run_id))).run
        return [c.status for c in got.children] == [engine_pb2.RUN_STATUS_CANCELED] * 2

    await eventually(children_canceled, "the children were canceled", within=WAIT, poll=0.1)


async def test_a_negative_execution_timeout_is_invalid_and_writes_nothing(cluster: Cluster) -> None:
    request = sleep_run(1)
    request.run_config.execution_timeout.seconds = -1
    await expect_error(cluster.stub.StartRun(request), grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument")
    page = await cluster.store_stub.ListStreams(store_pb2.ListStreamsRequest(page_size=10))
    assert list(page.streams) == []


# -- keel.fan_out parks on its children ---------------------------------------------------------


async def test_fan_out_parks_on_its_children_and_completes_when_they_all_ended(cluster: Cluster) -> None:
    config = {"op_id": "keel.sleep", "op_config": {"seconds": 1.5}, "count": 3}
    request = engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="keel.fan_out", op_config=to_value(config))
    )
    run_id = (await cluster.stub.StartRun(request)).run_id
    await until_parked(cluster, run_id)
    run = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
    [main] = run.steps
    assert main.status == engine_pb2.STEP_STATUS_WAITING
    wait = main.attempts[-1].wait
    children = [str(uuid.uuid5(uuid.UUID(run_id), f"main.child.{i}")) for i in range(3)]
    assert wait.kind == "children" and from_struct(wait.detail)["children"] == children
    assert cluster.engine.engine is not None
    # no coroutine waits for the children (the driver ends right after RunParked lands and one last look)
    drivers = cluster.engine.engine.drivers
    await eventually(lambda: run_id not in drivers, "the driver ended", within=WAIT, poll=0.02)
    awaited = await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=WAIT)
    assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED, awaited.run.reason
    output = from_value(awaited.run.final_snapshot)["main"]
    assert output["results"] == [{"slept": 1.5}] * 3
    assert [c["child_run_id"] for c in output["children"]] == children
    events = await run_events(cluster.store_stub, run_id)
    assert not [f for f in only(events, "FactRecorded") if ".await." in f["fact_key"]]
    [completed] = only(events, "StepCompleted")
    assert completed["attempt"] == 0


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


Events = list[tuple[str, dict[str, Any]]]


async def _fan_out_through_a_failpoint(
    tmp_path: Path, failpoint: str, children: int, seconds: float, *, died_within: float
) -> tuple[Events, engine_pb2.AwaitRunResponse, Events]:
    """A keel.fan_out of `children` runs of keel.sleep_in_process(`seconds`) (their op sleeps: they
    never park) started on an engine SIGKILLed at `failpoint`, then awaited on a fresh engine: the
    run's events when the engine died, the await's answer, and its events at the end."""
    store = await start_store_process(tmp_path / "store")
    doomed = await start_engine_process(store.address, failpoints=failpoint)
    survivor: ServiceProcess | None = None
    run_id = str(uuid.uuid4())
    config = {"op_id": "keel.sleep_in_process", "op_config": {"seconds": seconds}, "count": children}
    request = engine_pb2.StartRunRequest(
        run_id=run_id, op=engine_pb2.SingleOp(op_id="keel.fan_out", op_config=to_value(config))
    )
    store_channel = grpc.aio.insecure_channel(store.address)
    store_stub = store_pb2_grpc.StoreServiceStub(store_channel)
    try:
        channel = grpc.aio.insecure_channel(doomed.address)
        with contextlib.suppress(grpc.aio.AioRpcError):  # the engine may die before it answers
            await engine_pb2_grpc.EngineServiceStub(channel).StartRun(request, timeout=30)
        await channel.close(grace=None)
        assert await asyncio.wait_for(doomed.process.wait(), died_within) == -9, "the failpoint did not fire"
        at_the_kill = await run_events(store_stub, run_id)
        survivor = await start_engine_process(store.address)
        [awaited] = await _await_on(survivor, [run_id])
        return at_the_kill, awaited, await run_events(store_stub, run_id)
    finally:
        await store_channel.close(grace=None)
        if survivor is not None:
            await survivor.kill()
        await doomed.kill()
        await store.kill()


@pytest.mark.slow
async def test_a_fan_out_parent_killed_right_after_it_parked_completes_on_the_next_engine(
    tmp_path: Path,
) -> None:
    # Children that sleep in their op never park: the one run that parks is the parent.
    _, awaited, events = await _fan_out_through_a_failpoint(
        tmp_path, "after_run_parked", 2, 1.5, died_within=30
    )
    assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED, awaited.run.reason
    assert from_value(awaited.run.final_snapshot)["main"]["results"] == [{"slept": 1.5}] * 2
    assert len(only(events, "StepWaiting")) == 1 and len(only(events, "StepCompleted")) == 1


async def test_a_parent_whose_childs_engine_died_right_after_the_child_ended_is_woken_at_once(
    tmp_path: Path,
) -> None:
    """The child's terminal append makes its parked parent due in the same transaction: the engine
    dying before it wakes the parent loses nothing (without it, the parent waits its 5-minute
    re-check, far beyond this test's patience)."""
    # Its child sleeps in its op past PARK_AFTER_US: the parent parks before the child ends.
    at_the_kill, awaited, events = await _fan_out_through_a_failpoint(
        tmp_path, "after_child_run_ended", 1, 3, died_within=60
    )
    assert [name for name, _ in at_the_kill][-1] == "RunParked"  # the child ended, the parent is parked
    assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED, awaited.run.reason
    assert len(only(events, "StepWaiting")) == 1 and len(only(events, "StepCompleted")) == 1


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
