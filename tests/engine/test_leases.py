"""Run leases with real processes: two engines on one store, one driver per run, takeover, fencing.

Each run's only step (`test.gated_calls`) makes a recorded call, waits for the test's gate file,
and makes another: the test changes which engine drives the runs while every op waits at the
gate, then opens it. The counting transport's fsynced log shows each fact was called once.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from engine_service import EngineConfig, start_engine
from engine_service.store_client import AppendResult
from keel_core.json_values import to_value
from tests.engine.conftest import TEST_OPS, TEST_TRANSPORTS, gate
from tests.engine.conftest import Cluster as InProcessCluster
from tests.engine.crash_ops import read_io_log
from tests.engine.processes import ServiceProcess, eventually, start_engine_process, start_store_process

if TYPE_CHECKING:
    from keel.engine.v1.engine_pb2_grpc import EngineServiceAsyncStub
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

pytestmark = pytest.mark.slow

TTL = 2.0
WAIT = 60.0  # a bound on waiting for something that must happen, never a timing claim
KEYS = ("gated-before", "gated-after")


def gated_run(order: int) -> engine_pb2.StartRunRequest:
    """A one-step run that waits at the gate between its two recorded calls."""
    pipeline = engine_pb2.Pipeline(
        pipeline_id="gated", steps=[engine_pb2.Step(step_id="gated", op_id="test.gated_calls")]
    )
    return engine_pb2.StartRunRequest(pipeline=pipeline, input=to_value({"order": order}))


@pytest.fixture
async def store_process(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    """A store subprocess over a fresh data dir."""
    process = await start_store_process(tmp_path / "store")
    yield process
    await process.kill()


class TwoEngines:
    """Two engines (a and b) on one store, with their stubs, logs and the shared gate."""

    def __init__(self, store: ServiceProcess, tmp_path: Path) -> None:
        self.store_address = store.address
        self.tmp_path = tmp_path
        self.io_log = str(tmp_path / "io.log")
        self.gate = str(tmp_path / "gate")
        self.engines: dict[str, ServiceProcess] = {}
        self.channels: list[grpc.aio.Channel] = []
        self.stubs: dict[str, EngineServiceAsyncStub] = {}
        channel = grpc.aio.insecure_channel(store.address)
        self.channels.append(channel)
        self.store: StoreServiceAsyncStub = store_pb2_grpc.StoreServiceStub(channel)

    async def start(self, name: str) -> None:
        """Start engine `name` (its engine id is `engine-<name>`)."""
        engine = await start_engine_process(
            self.store_address,
            io_log=self.io_log,
            engine_id=f"engine-{name}",
            lease_ttl=TTL,
            gate=self.gate,
            log_path=str(self.tmp_path / f"engine-{name}.log"),
        )
        self.engines[name] = engine
        channel = grpc.aio.insecure_channel(engine.address)
        self.channels.append(channel)
        self.stubs[name] = engine_pb2_grpc.EngineServiceStub(channel)

    def log_of(self, name: str) -> str:
        """Engine `name`'s log lines so far."""
        return (self.tmp_path / f"engine-{name}.log").read_text(encoding="utf-8")

    async def lease_events(self, run_id: str) -> list[tuple[str, str]]:
        """(event type, engine id) of every event in the run's lease stream."""
        page = await self.store.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"lease:{run_id}"))
        return [(e.type, json.loads(e.payload)["engine_id"]) for e in page.events]

    async def holder(self, run_id: str) -> str:
        """The engine id in the run's last lease event ("" when released or never leased)."""
        events = await self.lease_events(run_id)
        return events[-1][1] if events and events[-1][0] == "LeaseAcquired" else ""

    async def run_events(self, run_id: str) -> list[store_pb2.RecordedEvent]:
        """The run stream's events."""
        page = await self.store.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run_id}"))
        return list(page.events)

    def open_gate(self) -> None:
        """Let every waiting op make its second call."""
        Path(self.gate).touch()

    async def close(self) -> None:
        """Kill what is left and close the channels."""
        for engine in self.engines.values():
            if engine.process.returncode is None:
                engine.process.send_signal(signal.SIGCONT)  # a stopped process must be able to die
            await engine.kill()
        for channel in self.channels:
            await channel.close(None)


@pytest.fixture
async def engines(store_process: ServiceProcess, tmp_path: Path) -> AsyncIterator[TwoEngines]:
    """Engines a and b on the store."""
    made = TwoEngines(store_process, tmp_path)
    try:
        await made.start("a")
        await made.start("b")
        yield made
    finally:
        await made.close()


def calls_of(io_log: str) -> collections.Counter[tuple[str, str]]:
    """How often each (run, fact key) reached the counting transport."""
    return collections.Counter(read_io_log(io_log))


async def start_waiting_runs(cluster: TwoEngines, per_engine: int) -> dict[str, list[str]]:
    """Start runs through each engine and wait until every op waits at the gate."""
    started: dict[str, list[str]] = {name: [] for name in cluster.stubs}
    for order in range(per_engine):
        for name, stub in cluster.stubs.items():
            response = await stub.StartRun(gated_run(order))
            started[name].append(response.run_id)
    every = [run_id for runs in started.values() for run_id in runs]
    await eventually(
        lambda: all(calls_of(cluster.io_log)[(r, "gated-before")] for r in every),
        "every op at the gate",
        within=WAIT,
        poll=0.05,
    )
    return started


async def finish_and_check(cluster: TwoEngines, stub: EngineServiceAsyncStub, run_ids: list[str]) -> None:
    """Open the gate; every run completes, each fact was called once and each step completed once."""
    cluster.open_gate()
    for run_id in run_ids:
        awaited = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=WAIT)
        assert awaited.done, run_id
        assert awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED, awaited.run.reason
    calls = calls_of(cluster.io_log)
    assert calls == {(run_id, key): 1 for run_id in run_ids for key in KEYS}
    for run_id in run_ids:
        events = await cluster.run_events(run_id)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert [e.type for e in events].count("StepCompleted") == 1
        assert [e.type for e in events].count("FactRecorded") == 2
        assert [e.type for e in events][-1] == "RunCompleted"


async def test_each_run_is_driven_by_the_engine_that_started_it_and_only_that_one(
    engines: TwoEngines,
) -> None:
    cluster = engines
    started = await start_waiting_runs(cluster, per_engine=3)
    # Both engines scan for free runs all along: none was taken from its live holder.
    await asyncio.sleep(TTL)  # long enough for scans to have happened; the assertions hold at any time
    for name, run_ids in started.items():
        for run_id in run_ids:
            assert set(await cluster.lease_events(run_id)) == {("LeaseAcquired", f"engine-{name}")}
    await finish_and_check(cluster, cluster.stubs["b"], [r for runs in started.values() for r in runs])


async def test_a_killed_engines_runs_are_taken_over_and_complete_with_each_fact_called_once(
    engines: TwoEngines,
) -> None:
    cluster = engines
    started = await start_waiting_runs(cluster, per_engine=3)
    await cluster.engines["a"].kill()
    for run_id in started["a"]:
        await eventually(
            functools.partial(_held_by, cluster, run_id, "engine-b"),
            f"b takes over {run_id}",
            within=WAIT,
            poll=0.05,
        )
        # a's lease events (none if it died before its implicit lease needed writing), then b's.
        holders = [engine for kind, engine in await cluster.lease_events(run_id) if kind == "LeaseAcquired"]
        assert holders == sorted(holders) and holders[-1] == "engine-b", holders
        assert f"took over run {run_id}" in cluster.log_of("b")
    await finish_and_check(cluster, cluster.stubs["b"], [r for runs in started.values() for r in runs])


async def test_a_drained_engine_releases_its_runs_and_the_other_takes_them_at_once(
    engines: TwoEngines,
) -> None:
    cluster = engines
    started = await start_waiting_runs(cluster, per_engine=2)
    assert await cluster.engines["a"].terminate() == 0
    for run_id in started["a"]:
        await eventually(
            functools.partial(_held_by, cluster, run_id, "engine-b"),
            f"b takes over {run_id}",
            within=WAIT,
            poll=0.05,
        )
        events = await cluster.lease_events(run_id)
        taken = events.index(("LeaseAcquired", "engine-b"))
        # Handed over, not expired: a's release comes right before b's acquisition.
        assert events[taken - 1] == ("LeaseReleased", "engine-a")
    await finish_and_check(cluster, cluster.stubs["b"], [r for runs in started.values() for r in runs])


async def test_a_stale_engine_whose_lease_was_taken_never_appends_to_the_run_again(
    engines: TwoEngines,
) -> None:
    cluster = engines
    started = await start_waiting_runs(cluster, per_engine=1)
    (run_id,) = started["a"]
    stale = cluster.engines["a"]
    stale.process.send_signal(signal.SIGSTOP)
    await eventually(
        lambda: _held_by(cluster, run_id, "engine-b"),
        "b takes over the paused engine's run",
        within=WAIT,
        poll=0.05,
    )
    # b has claimed the run stream: its resumed attempt is there, a's op still waits at the gate.
    await eventually(
        lambda: _attempts_started(cluster, run_id, 2),
        "b's claim (a second attempt) in the run stream",
        within=WAIT,
        poll=0.05,
    )
    before = [e.seq for e in await cluster.run_events(run_id)]
    stale.process.send_signal(signal.SIGCONT)
    # a learns it lost the run (its renewal is refused, or its lease ran out locally) and stops
    # its driver; nothing it decided after the takeover reaches the run.
    await eventually(
        lambda: f"lost the lease on run {run_id}" in cluster.log_of("a"), "a notices", within=WAIT, poll=0.05
    )
    # Its renewal was an append after its last lease event: the store refused it (b wrote since).
    assert f"lost the lease on run {run_id} (sequence_conflict)" in cluster.log_of("a")
    assert [e.seq for e in await cluster.run_events(run_id)] == before
    await finish_and_check(cluster, cluster.stubs["a"], [r for runs in started.values() for r in runs])
    events = await cluster.run_events(run_id)
    attempts = [json.loads(e.payload).get("attempt") for e in events if e.type == "StepAttemptStarted"]
    completed = [json.loads(e.payload).get("attempt") for e in events if e.type == "StepCompleted"]
    assert completed == [attempts[-1]]  # the run was finished by b's attempt, not a's


async def _held_by(cluster: TwoEngines, run_id: str, engine_id: str) -> bool:
    return await cluster.holder(run_id) == engine_id


async def _attempts_started(cluster: TwoEngines, run_id: str, count: int) -> bool:
    events = await cluster.run_events(run_id)
    return [e.type for e in events].count("StepAttemptStarted") >= count


async def test_concurrent_resumptions_of_one_run_write_its_lease_once(cluster: InProcessCluster) -> None:
    # A scan and an await may resume one run at once: the second must not rewrite a lease the
    # first just took (that would fence off the first one's driver in the middle of its op).
    # An engine without the background scan, so that only these resumptions happen.
    handle = await start_engine(
        EngineConfig(
            listen="127.0.0.1:0",
            store=cluster.store_address,
            failpoints="",
            ops=TEST_OPS,
            transports=TEST_TRANSPORTS,
            checkpoint_linger=cluster.checkpoint_linger,
            recover_on_start=False,
        )
    )
    assert handle.engine is not None
    engine = handle.engine
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
    try:
        name = f"resume-once-{cluster.checkpoint_linger}"  # gates are per process: one per variant
        door = gate(name)
        run = await engine_pb2_grpc.EngineServiceStub(channel).StartRun(
            engine_pb2.StartRunRequest(
                op=engine_pb2.SingleOp(op_id="test.gated", op_config=to_value({"gate": name}))
            )
        )
        await door.wait_for(1)
        await engine.stop_driver(run.run_id)  # parked; the lease's last event is still this engine's
        head_before = len(await _lease_stream(cluster, run.run_id))
        # The first resumption's lease append commits, and its answer is held back: the window in
        # which a second resumption would find the lease "ours" and write it again.
        store = engine.leases.store
        real_append = store.append
        committed, answer = asyncio.Event(), asyncio.Event()

        async def answer_late(stream_id: str, *args: Any, **kwargs: Any) -> AppendResult:
            result = await real_append(stream_id, *args, **kwargs)
            if stream_id.startswith("lease:"):
                committed.set()
                await answer.wait()
            return result

        store.append = answer_late  # type: ignore[method-assign]
        try:
            first = asyncio.create_task(engine.resume_run(run.run_id))
            await asyncio.wait_for(committed.wait(), WAIT)
            others = [asyncio.create_task(engine.resume_run(run.run_id)) for _ in range(2)]
            await asyncio.sleep(0.2)  # lets the others reach the store (ordering only, nothing timed)
            answer.set()
            resumed = [await first, *[await other for other in others]]
        finally:
            store.append = real_append  # type: ignore[method-assign]
        assert resumed == [True, False, False]
        events = await _lease_stream(cluster, run.run_id)
        assert len(events) == head_before + 1
        assert engine.leases.held[run.run_id].seq == events[-1].seq  # the driver's lease is the head
        await door.wait_for(2)
        door.opened.set()
        assert await engine.await_run(run.run_id, WAIT)
    finally:
        await channel.close(None)
        await handle.drain(0.5)


async def _lease_stream(cluster: InProcessCluster, run_id: str) -> list[store_pb2.RecordedEvent]:
    page = await cluster.store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"lease:{run_id}"))
    return list(page.events)
