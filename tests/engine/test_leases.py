"""Run leases with real processes: two engines on one store, one driver per run, takeover, fencing.

Each run's only step (`test.gated_calls`) makes a recorded call, waits for the test's gate file,
and makes another: the test changes which engine drives the runs while every op waits at the
gate, then opens it. The counting transport's fsynced log shows each fact was called once.

The cost tests (in-process engines, `keel.sleep_in_process` runs) count what lease upkeep writes to the store:
one lease event per run that changes hands, heartbeats per engine over time, whatever the number
of runs, and one liveness read per holder engine per takeover scan.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from engine_service import EngineConfig, EngineServingHandle, start_engine
from engine_service.domain.streams import ENGINE_STOPPED
from engine_service.runtime.heartbeat import Heartbeat, fence, read_engine_record
from engine_service.store.grpc_client import StoreClient
from engine_service.store.port import AppendResult
from keel_core.errors import KeelError
from keel_core.json_values import to_value
from store_service.server import StoreConfig, start_store
from tests.engine.conftest import Cluster as InProcessCluster
from tests.engine.conftest import gate, start_test_engine
from tests.engine.crash_ops import read_io_log
from tests.engine.processes import ServiceProcess, eventually, start_engine_process, start_store_process
from tests.engine.test_engine_rpcs import expect_error

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

    async def engine_events(self, name: str) -> list[tuple[str, int]]:
        """(event type, session) of every event in engine `name`'s liveness record."""
        page = await self.store.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"engine:engine-{name}"))
        return [(e.type, json.loads(e.payload)["session"]) for e in page.events]

    async def recorded_by(self, run_ids: list[str], engine_id: str) -> bool:
        """Whether each run's lease stream holds a LeaseAcquired of `engine_id` (past its implicit lease)."""
        for run_id in run_ids:
            if ("LeaseAcquired", engine_id) not in await self.lease_events(run_id):
                return False
        return True

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


@pytest.mark.parametrize("recorded", [False, True], ids=["as-it-comes", "recorded-leases"])
async def test_a_drained_engine_releases_its_runs_and_the_other_takes_them_at_once(
    engines: TwoEngines, recorded: bool
) -> None:
    cluster = engines
    started = await start_waiting_runs(cluster, per_engine=2)
    if recorded:  # past ttl/3 each run's lease is in the store: EngineStopped alone hands them over
        await eventually(
            lambda: cluster.recorded_by(started["a"], "engine-a"),
            "a's leases recorded",
            within=WAIT,
            poll=0.05,
        )
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
        # Handed over, not expired: right before b's acquisition comes a's release of an implicit
        # lease, or a's recorded lease, which a's EngineStopped freed (b's log says why it took it).
        if events[taken - 1] == ("LeaseReleased", "engine-a"):
            assert not recorded
        else:
            assert events[taken - 1] == ("LeaseAcquired", "engine-a"), events
            assert f"took over run {run_id} from engine engine-a (its engine stopped)" in cluster.log_of("b")
    if recorded:
        # One EngineStopped for all of a's runs, after its heartbeats (none of them per run).
        kinds = [kind for kind, _ in await cluster.engine_events("a")]
        assert kinds[-1] == "EngineStopped" and kinds.count("EngineStopped") == 1, kinds
    await finish_and_check(cluster, cluster.stubs["b"], [r for runs in started.values() for r in runs])


@pytest.mark.parametrize("recorded", [False, True], ids=["as-it-comes", "recorded-lease"])
async def test_a_stale_engine_whose_lease_was_taken_never_appends_to_the_run_again(
    engines: TwoEngines, recorded: bool
) -> None:
    cluster = engines
    started = await start_waiting_runs(cluster, per_engine=1)
    (run_id,) = started["a"]
    if recorded:  # its lease then holds through a's heartbeats, which stop with the process
        await eventually(
            lambda: cluster.recorded_by([run_id], "engine-a"), "a's lease recorded", within=WAIT, poll=0.05
        )
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
    lease_before = await cluster.lease_events(run_id)
    engine_before = await cluster.engine_events("a")
    # Whether a had recorded its lease before b took it (an append a sent before the pause has
    # landed by now: b's acquisition is after it, or it would have been refused).
    was_recorded = lease_before[0] == ("LeaseAcquired", "engine-a")
    assert was_recorded or not recorded
    stale.process.send_signal(signal.SIGCONT)
    # a learns it lost the run and stops its driver; nothing it decided after the takeover
    # reaches the run.
    await eventually(
        lambda: f"lost the lease on run {run_id}" in cluster.log_of("a"), "a notices", within=WAIT, poll=0.05
    )
    if was_recorded:
        # b fenced a's expired session off in a's engine record before taking the run: a's next
        # heartbeat was an append after its last one, which the store refused (b wrote since).
        why = "sequence_conflict: engine engine-b fenced its session off, its heartbeat expired"
        assert (await cluster.engine_events("a"))[-1][0] == "EngineFenced"
    else:
        # Its recording of its implicit lease was an append to a new lease stream: the store
        # refused it (b wrote it first).
        why = "sequence_conflict"
    assert f"lost the lease on run {run_id} ({why})" in cluster.log_of("a")
    assert [e.seq for e in await cluster.run_events(run_id)] == before
    await finish_and_check(cluster, cluster.stubs["a"], [r for runs in started.values() for r in runs])
    events = await cluster.run_events(run_id)
    attempts = [json.loads(e.payload).get("attempt") for e in events if e.type == "StepAttemptStarted"]
    completed = [json.loads(e.payload).get("attempt") for e in events if e.type == "StepCompleted"]
    assert completed == [attempts[-1]]  # the run was finished by b's attempt, not a's
    # Refused, not written: a's lease on the run never changed after b's takeover, nor (once
    # fenced) a's engine record.
    assert await cluster.lease_events(run_id) == lease_before
    if was_recorded:
        assert await cluster.engine_events("a") == engine_before


async def _held_by(cluster: TwoEngines, run_id: str, engine_id: str) -> bool:
    return await cluster.holder(run_id) == engine_id


async def _attempts_started(cluster: TwoEngines, run_id: str, count: int) -> bool:
    events = await cluster.run_events(run_id)
    return [e.type for e in events].count("StepAttemptStarted") >= count


async def test_concurrent_resumptions_of_one_run_write_its_lease_once(cluster: InProcessCluster) -> None:
    # A scan and an await may resume one run at once: the second must not rewrite a lease the
    # first just took (that would fence off the first one's driver in the middle of its op).
    # An engine without the background scan, so that only these resumptions happen.
    handle = await start_test_engine(
        cluster.store_address, checkpoint_linger=cluster.checkpoint_linger, recover_on_start=False
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


COST_TTL = 2.0


@pytest.fixture
async def store_address(tmp_path: Path) -> AsyncIterator[str]:
    """A store in this process over a fresh SQLite data dir."""
    store = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store")))
    try:
        yield f"127.0.0.1:{store.port}"
    finally:
        await store.drain(0.5)


async def _sleepy_engine(store_address: str, engine_id: str, *, scan: bool = True) -> EngineServingHandle:
    return await start_engine(
        EngineConfig(
            listen="127.0.0.1:0",
            store=store_address,
            failpoints="",
            engine_id=engine_id,
            lease_ttl=COST_TTL,
            recover_on_start=scan,
        )
    )


def _sleep_run(seconds: float) -> engine_pb2.StartRunRequest:
    return engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="keel.sleep_in_process", op_config=to_value({"seconds": seconds}))
    )


async def _streams(store: StoreServiceAsyncStub, prefix: str) -> dict[str, list[store_pb2.RecordedEvent]]:
    """Every stream whose id starts with `prefix`, with all its events."""
    out: dict[str, list[store_pb2.RecordedEvent]] = {}
    token = ""
    while True:
        page = await store.ListStreams(
            store_pb2.ListStreamsRequest(prefix=prefix, page_size=500, page_token=token)
        )
        for info in page.streams:
            read = await store.ReadEvents(store_pb2.ReadEventsRequest(stream_id=info.stream_id))
            out[info.stream_id] = list(read.events)
        token = page.next_page_token
        if not token:
            return out


async def test_long_runs_cost_one_lease_event_each_and_heartbeats_grow_with_time_not_with_runs(
    store_address: str,
) -> None:
    runs = 50
    handle = await _sleepy_engine(store_address, "engine-solo")
    engine_channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
    store_channel = grpc.aio.insecure_channel(store_address)
    stub = engine_pb2_grpc.EngineServiceStub(engine_channel)
    store = store_pb2_grpc.StoreServiceStub(store_channel)
    try:
        began = time.monotonic()
        # Each run sleeps three ttls: under per-run renewals that was >= 6 lease appends per run.
        started = await asyncio.gather(*(stub.StartRun(_sleep_run(3 * COST_TTL)) for _ in range(runs)))
        for response in started:
            awaited = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=response.run_id), timeout=WAIT)
            assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED, awaited.run.reason
        leases = await _streams(store, "lease:")
        records = await _streams(store, "engine:")
        elapsed = time.monotonic() - began
    finally:
        await engine_channel.close(None)
        await store_channel.close(None)
        await handle.drain(0.5)
    # Every run outlived ttl/3, so its lease was recorded: once, and never renewed.
    assert set(leases) == {f"lease:{response.run_id}" for response in started}
    for events in leases.values():
        assert [(e.type, json.loads(e.payload)["engine_id"]) for e in events] == [
            ("LeaseAcquired", "engine-solo")
        ]
    # One liveness record for the engine. Its heartbeats are at least ttl/4 apart (each is sent
    # only once the last is ttl/4 old), so their number is bounded by the time the runs took,
    # whatever the number of runs.
    assert list(records) == ["engine:engine-solo"]
    beats = records["engine:engine-solo"]
    assert beats and {e.type for e in beats} == {"EngineHeartbeat"}
    assert len(beats) <= elapsed / (COST_TTL / 4) + 1, (len(beats), elapsed)
    assert len(beats) + len(leases) < runs * 3  # what per-run renewals wrote at the least


async def test_a_takeover_scan_reads_each_holder_engines_heartbeat_once_not_each_run(
    store_address: str,
) -> None:
    runs = 30
    holder = await _sleepy_engine(store_address, "engine-a")
    taker = await _sleepy_engine(store_address, "engine-b", scan=False)  # scans only when the test says
    assert holder.engine is not None and taker.engine is not None
    scanner = taker.engine
    engine_channel = grpc.aio.insecure_channel(f"127.0.0.1:{holder.port}")
    store_channel = grpc.aio.insecure_channel(store_address)
    stub = engine_pb2_grpc.EngineServiceStub(engine_channel)
    store = store_pb2_grpc.StoreServiceStub(store_channel)
    holder_running = True
    try:
        started = await asyncio.gather(*(stub.StartRun(_sleep_run(600)) for _ in range(runs)))
        run_ids = [response.run_id for response in started]

        async def all_recorded() -> bool:
            return len(await _streams(store, "lease:")) == runs

        await eventually(all_recorded, "a's leases recorded (each run ttl/3 old)", within=WAIT, poll=0.1)

        async def scanner_knows_every_holder() -> bool:
            assert await scanner.recover() == 0  # a's leases hold: nothing to take
            return all(run_id in scanner.leases._holders for run_id in run_ids)

        await eventually(scanner_knows_every_holder, "b's scans read every lease", within=WAIT, poll=0.1)
        before = collections.Counter(scanner.env.store.calls)
        assert await scanner.recover() == 0
        calls = scanner.env.store.calls - before
        # A scan lists the active runs and the released leases, then reads engine-a's liveness
        # record once (its head, its last event) for all 30 runs a holds: no read per run.
        assert calls == {"ListStreams": 2, "HeadSeq": 1, "ReadEvents": 1}, calls

        await holder.drain(0.5)  # parks a's runs and hands them all over with one EngineStopped
        holder_running = False
        record = (await _streams(store, "engine:engine-a"))["engine:engine-a"]
        assert [e.type for e in record][-1] == "EngineStopped"
        assert {e.type for e in record[:-1]} == {"EngineHeartbeat"}
        # Taken at once: a stopped engine's leases need no expiry.
        assert await scanner.recover() == runs
        leases = await _streams(store, "lease:")
        for run_id in run_ids:
            assert [(e.type, json.loads(e.payload)["engine_id"]) for e in leases[f"lease:{run_id}"]] == [
                ("LeaseAcquired", "engine-a"),
                ("LeaseAcquired", "engine-b"),
            ]
    finally:
        await engine_channel.close(None)
        await store_channel.close(None)
        if holder_running:
            await holder.drain(0.5)
        await taker.drain(0.5)


class HeartbeatDropping(StoreClient):
    """A client of the real store whose next heartbeat append fails unanswered (and uncommitted)."""

    drop_next_heartbeat = False

    async def append(self, stream_id: str, events: Any, **kwargs: Any) -> AppendResult:
        """Fail once for an engine record when armed; else append."""
        if self.drop_next_heartbeat and stream_id.startswith("engine:"):
            self.drop_next_heartbeat = False
            raise KeelError("store_unavailable", "injected: the store did not answer", retryable=True)
        return await super().append(stream_id, events, **kwargs)


async def test_a_fenced_engine_whose_next_heartbeat_fails_starts_a_new_session_later(
    store_address: str,
) -> None:
    # Found in review: the fence names the old session while the engine already tried a new one;
    # that must end the old session, not fence the engine off for good.
    store = HeartbeatDropping(store_address)
    taker = StoreClient(store_address)
    try:
        holder = Heartbeat(store, "engine-x", 60.0, on_leases_lost=lambda session, why: None)
        first = await holder.ensure()
        seen = await read_engine_record(taker, "engine-x")
        assert seen is not None and await fence(taker, seen, "engine-y")
        with pytest.raises(KeelError, match="fenced its session off"):
            await holder.beat()
        store.drop_next_heartbeat = True
        with pytest.raises(KeelError, match="did not answer"):
            await holder.beat()  # the new session's first heartbeat does not land
        assert await holder.ensure() > first and not holder.fenced
    finally:
        await store.close()
        await taker.close()


async def test_a_late_heartbeat_and_a_takers_fence_cannot_both_land(store_address: str) -> None:
    # The race a per-run renewal and a takeover used to run on each lease stream, run once per
    # engine on its liveness record. (A taker fences only once the heartbeat it read expired; here
    # it fences at once, with a ttl nothing in the test waits for, to show the compare-and-swap.)
    store = StoreClient(store_address)
    ended: list[tuple[int, str]] = []
    try:
        holder = Heartbeat(
            store, "engine-x", 60.0, on_leases_lost=lambda session, why: ended.append((session, why))
        )
        session = await holder.ensure()
        seen = await read_engine_record(store, "engine-x")
        assert seen is not None and seen.session == session
        # The holder's next heartbeat lands first: the taker's fence after the one it read is refused.
        await holder.beat()
        assert not await fence(store, seen, "engine-y")
        assert holder.trusts(session) and not ended
        # The taker fences after the latest heartbeat: the holder's next one is refused, and its
        # session (every lease taken in it) is over at once; the heartbeat after starts a new one.
        latest = await read_engine_record(store, "engine-x")
        assert latest is not None and await fence(store, latest, "engine-y")
        with pytest.raises(KeelError, match="engine engine-y fenced its session off"):
            await holder.beat()
        assert [s for s, _ in ended] == [session] and not holder.trusts(session)
        assert await holder.ensure() > session and not holder.fenced
        # A second process under the same engine id takes the record over: the first one is fenced
        # off for good (it may drive nothing more), not merely its session.
        twin = Heartbeat(store, "engine-x", 60.0, on_leases_lost=lambda session, why: None)
        twin_session = await twin.ensure()
        with pytest.raises(KeelError, match="engine ids must differ"):
            await holder.beat()
        assert holder.fenced and not holder.trusts(holder.session)
        # A drained engine's last word: its session is over at once, no expiry to wait for.
        await twin.stop()
        stopped = await read_engine_record(store, "engine-x")
        assert stopped is not None and (stopped.kind, stopped.session) == (ENGINE_STOPPED, twin_session)
    finally:
        await store.close()


async def test_an_engine_whose_id_another_process_took_starts_no_run(cluster: InProcessCluster) -> None:
    # Two processes under one engine id: once the engine learns it (its heartbeat is refused by the
    # other's), it stops its runs and refuses new ones, saying why, instead of abandoning them.
    handle = await start_test_engine(cluster.store_address, engine_id="twice", lease_ttl=1.0)
    assert handle.engine is not None
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
    store = StoreClient(cluster.store_address)
    stub = engine_pb2_grpc.EngineServiceStub(channel)
    try:
        name = f"twice-{cluster.checkpoint_linger}"
        gated = engine_pb2.SingleOp(op_id="test.gated", op_config=to_value({"gate": name}))
        await stub.StartRun(engine_pb2.StartRunRequest(op=gated))
        await gate(name).wait_for(1)
        heartbeat = handle.engine.leases.heartbeat
        await eventually(lambda: heartbeat.session != 0, "the engine heartbeats", within=30, poll=0.05)
        await Heartbeat(store, "twice", 1.0, on_leases_lost=lambda session, why: None).ensure()
        await eventually(lambda: heartbeat.fenced, "the engine learns its id is taken", within=30, poll=0.05)
        message = await expect_error(
            stub.StartRun(engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"))),
            grpc.StatusCode.ABORTED,
            "engine_id_in_use",
        )
        assert "engine ids must differ" in message
        # Health checks say so, so that a balancer sends clients to an engine that can drive runs.
        health = health_pb2_grpc.HealthStub(channel)

        async def not_serving() -> bool:
            answers = [
                await health.Check(health_pb2.HealthCheckRequest(service=service))
                for service in ("", "keel.engine.v1.EngineService")
            ]
            return all(a.status == health_pb2.HealthCheckResponse.NOT_SERVING for a in answers)

        await eventually(not_serving, "health checks say NOT_SERVING", within=10, poll=0.05)
    finally:
        await channel.close(grace=None)
        await store.close()
        await handle.drain(0.5)


class TrimFailing(StoreClient):
    """A client of the real store whose trims fail unanswered."""

    async def trim(self, stream_id: str, before_seq: int, *, patience: float | None = None) -> int:
        """Always fail, as a store that does not answer."""
        raise KeelError("store_unavailable", "injected: the store did not answer the trim", retryable=True)


async def test_an_engines_liveness_stream_stays_bounded_however_long_it_heartbeats(
    store_address: str,
) -> None:
    # The engine stream grew by one heartbeat every ttl/4 forever; trimming keeps it bounded while
    # the head (what every compare-and-swap on it is after) and the last event stay.
    every, keep, beats = 5, 3, 40
    store = StoreClient(store_address)
    failing = TrimFailing(store_address)
    try:
        holder = Heartbeat(
            store,
            "engine-t",
            60.0,
            on_leases_lost=lambda session, why: None,
            trim_every=every,
            trim_keep=keep,
        )
        for _ in range(beats):
            await holder.beat()
            await holder.settle_trim()
            events = await store.read("engine:engine-t")
            head, _ = await store.head("engine:engine-t")
            assert len(events) < every + keep, [e.seq for e in events]
            assert events[-1].seq == head and events[-1].type == "EngineHeartbeat"
            record = await read_engine_record(store, "engine-t")
            assert record is not None and record.seq == head and holder.trusts(record.session)
        assert head == beats and events[0].seq > beats - every - keep
        # A taker's fence after the trimmed stream's head still lands, and ends the session.
        assert record is not None and await fence(store, record, "engine-y")
        with pytest.raises(KeelError, match="fenced its session off"):
            await holder.beat()
        # A trim that fails is only logged: the heartbeats go on, the stream just keeps its events.
        other = Heartbeat(
            failing, "engine-u", 60.0, on_leases_lost=lambda session, why: None, trim_every=1, trim_keep=1
        )
        for _ in range(4):
            await other.beat()
            await other.settle_trim()
        assert other.trusts(other.session)
        assert [e.seq for e in await store.read("engine:engine-u")] == [1, 2, 3, 4]
    finally:
        await store.close()
        await failing.close()
