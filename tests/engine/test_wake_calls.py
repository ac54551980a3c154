"""What waking a parked run asks of the store, counted by the stream each call names; and what a
drained engine hands over of the runs parked on it.

A run parked by this engine is taken up again without reading what the engine knows: its head (the
signal's inbox append has just seen it), and its lease stream, once the run's history (read first)
shows it is the run the engine parked and not one started again under its id: a lease recorded in
the session that still holds or an implicit lease younger than ttl/3 is held again, and a run
created here is taken with "the stream must be new" (read only on a conflict). A run waiting only
for signals or timers claims its stream together with the wait's outcome: RunResumed and the
consumed signal go in one append. Real store and engines in this process on 127.0.0.1:0, except
the last two tests, which use the in-memory log to act at exact points (and run two engines on it).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import duration_pb2
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

import engine_service.builtin_ops
from engine_service import EngineServingHandle
from engine_service.domain import (
    CANCELED,
    DEFAULT_REGISTRY,
    BuildProvenance,
    FactRecorded,
    RunManifest,
    TransportRegistry,
    make_run_config,
    single_op_pipeline,
)
from engine_service.domain.events import decode_event
from engine_service.domain.signals import Signal
from engine_service.domain.streams import RUN_PARKED_LABEL, lease_stream_id, run_stream_id, signals_stream_id
from engine_service.failpoints import Failpoints
from engine_service.runtime.environment import RunEnvironment
from engine_service.runtime.kernel import Engine
from engine_service.store import AppendResult, InMemoryEventLog, StreamEvent
from engine_service.store.grpc_client import StoreClient
from keel_core.json_values import to_value
from store_service.server import StoreConfig, start_store
from tests.engine.conftest import gate, start_test_engine
from tests.engine.processes import eventually
from tests.engine.test_signals import pipeline, wait_step

if TYPE_CHECKING:
    from keel.engine.v1.engine_pb2_grpc import EngineServiceAsyncStub

_ = engine_service.builtin_ops  # keel.wait_signal
WAIT = 60.0  # a bound on waiting for something that must happen, never a timing claim
# Long enough that a run parked at once is still young (under ttl/3) when its signal comes.
LONG_TTL = 600.0
SLEEP = engine_pb2.Step(step_id="s", op_id="keel.sleep_in_process", op_config=to_value({"seconds": 60}))
# Short enough that a run's implicit lease ends within the test, long enough that an engine's
# heartbeat (every ttl/4) keeps its session trusted through a loaded machine's stalls.
SHORT_TTL = 6.0


class StoreCalls:
    """The calls an engine's store client makes while `on`: (method, stream id, event types)."""

    def __init__(self, store: StoreClient) -> None:
        self.on = False
        self.calls: list[tuple[str, str, tuple[str, ...]]] = []
        for method in ("head", "read", "append"):
            setattr(store, method, self._recording(method, getattr(store, method)))

    def _recording(self, method: str, call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def recorded(stream_id: str, *args: Any, **kwargs: Any) -> Any:
            if self.on:
                events: Sequence[tuple[str, bytes]] = args[0] if method == "append" else ()
                self.calls.append((method, stream_id, tuple(kind for kind, _ in events)))
            return await call(stream_id, *args, **kwargs)

        return recorded

    def naming(self, stream_id: str) -> list[tuple[str, tuple[str, ...]]]:
        """(method, event types) of each call naming `stream_id`."""
        return [(method, kinds) for method, stream, kinds in self.calls if stream == stream_id]


class Cluster:
    """A store and engines on it (in this process), each engine with its store calls recorded."""

    def __init__(self, store_address: str) -> None:
        self.store_address = store_address
        self.engines: list[EngineServingHandle] = []
        store_channel = grpc.aio.insecure_channel(store_address)
        self.channels: list[grpc.aio.Channel] = [store_channel]
        self.store = store_pb2_grpc.StoreServiceStub(store_channel)

    async def settled(self, run_id: str, status: int, after_seq: int = 0) -> int:
        """Until the run stream is labelled `status` at a head beyond `after_seq` (read by the test,
        not through an engine); its head then."""
        head = 0

        async def there() -> bool:
            nonlocal head
            reply = await self.store.HeadSeq(store_pb2.HeadSeqRequest(stream_id=run_stream_id(run_id)))
            head = reply.head_seq
            return reply.status == status and reply.head_seq > after_seq

        await eventually(there, f"run {run_id} in status {status} after {after_seq}", within=WAIT, poll=0.01)
        return head

    async def engine(
        self, name: str, ttl: float, **settings: Any
    ) -> tuple[Engine, EngineServiceAsyncStub, StoreCalls]:
        handle = await start_test_engine(self.store_address, engine_id=name, lease_ttl=ttl, **settings)
        self.engines.append(handle)
        assert handle.engine is not None
        # The scan at start lists the active runs and looks at each: one started meanwhile could have
        # its head read by it too, which is not the path a test here counts the calls of.
        scanned = handle.engine.recovery.first_scan_done
        await eventually(scanned.is_set, f"engine {name}'s scan at start ended", within=WAIT, poll=0.01)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
        self.channels.append(channel)
        engine = handle.engine
        assert engine is not None and isinstance(engine.env.store, StoreClient)
        return engine, engine_pb2_grpc.EngineServiceStub(channel), StoreCalls(engine.env.store)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    store = await start_store(
        StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store"), allow_deletes=True)
    )
    cluster = Cluster(f"127.0.0.1:{store.port}")
    try:
        yield cluster
    finally:
        for channel in cluster.channels:
            await channel.close(grace=None)
        for engine in cluster.engines:
            await engine.drain(0.5)
        await store.drain(0.5)


async def park(engine: Engine, stub: EngineServiceAsyncStub, *steps: engine_pb2.Step) -> str:
    """Start a run of `steps` on `engine`; return its id once it is parked and its driver ended."""
    started = await stub.StartRun(engine_pb2.StartRunRequest(pipeline=pipeline(*steps)))
    await parked(engine, started.run_id)
    return started.run_id


async def parked(engine: Engine, run_id: str) -> None:
    async def done() -> bool:
        _, label = await engine.env.store.head(run_stream_id(run_id))
        return label == RUN_PARKED_LABEL and run_id not in engine.drivers

    await eventually(done, f"run {run_id} parked", within=WAIT, poll=0.01)


async def send(stub: EngineServiceAsyncStub, run_id: str, name: str) -> None:
    await stub.SignalRun(
        engine_pb2.SignalRunRequest(run_id=run_id, name=name, payload=to_value(name), signal_id=name)
    )


async def finished(stub: EngineServiceAsyncStub, run_id: str) -> engine_pb2.Run:
    reply = await stub.AwaitRun(
        engine_pb2.AwaitRunRequest(run_id=run_id, timeout=duration_pb2.Duration(seconds=int(WAIT)))
    )
    assert reply.done
    return reply.run


async def test_a_signal_takes_up_a_run_parked_here_with_no_second_head_read_or_lease_call(
    cluster: Cluster,
) -> None:
    # A linger longer than the test: the claim can only travel with what follows, never alone.
    engine, stub, calls = await cluster.engine("one", LONG_TTL, checkpoint_linger=WAIT)
    await engine.waker.stop()  # the signal's own wake-up is counted, not the Waker's look at its nudge
    run_id = await park(engine, stub, wait_step("w", "go"))
    calls.on = True
    await send(stub, run_id, "go")
    await cluster.settled(run_id, store_pb2.STREAM_STATUS_COMPLETED)
    calls.on = False
    # The run stream: the inbox append's look at its head (the only one), its history, one append.
    # Its implicit lease, still young, is held again as it was: nothing read or written there.
    assert [method for method, _ in calls.naming(run_stream_id(run_id))] == ["head", "read", "append"]
    assert calls.naming(lease_stream_id(run_id)) == []
    # The claim went with the wait's outcome: one append, RunResumed first.
    (_, kinds) = calls.naming(run_stream_id(run_id))[2]
    assert kinds[0] == "RunResumed" and "FactRecorded" in kinds and "StepCompleted" in kinds


async def test_a_timer_takes_up_a_run_parked_here_and_claims_it_before_the_next_op(cluster: Cluster) -> None:
    engine, stub, calls = await cluster.engine("one", LONG_TTL, checkpoint_linger=WAIT)
    # Due in 3 s: parked (a wait due within 1 s of its decision would be waited for in memory).
    nap = engine_pb2.Step(step_id="nap", op_id="keel.sleep", op_config=to_value({"seconds": 3}))
    after = engine_pb2.Step(step_id="after", op_id="keel.echo", depends_on=["nap"])
    calls.on = True
    run_id = await park(engine, stub, nap, after)
    calls.calls.clear()
    await cluster.settled(run_id, store_pb2.STREAM_STATUS_COMPLETED)
    calls.on = False
    # The Waker's look at its head, its history, then the claim with the timer's end and the next
    # step's attempt, appended before that step's op ran; then the run's end. No lease call.
    run_calls = calls.naming(run_stream_id(run_id))
    assert [method for method, _ in run_calls] == ["head", "read", "append", "append"]
    claim = run_calls[2][1]
    assert claim[0] == "RunResumed" and "StepCompleted" in claim and claim[-1] == "StepAttemptStarted"
    assert "RunCompleted" in run_calls[3][1]
    assert calls.naming(lease_stream_id(run_id)) == []


async def test_a_run_created_here_is_taken_with_one_lease_append_and_then_with_none(cluster: Cluster) -> None:
    engine, stub, calls = await cluster.engine("one", LONG_TTL)
    await engine.waker.stop()
    steps = (wait_step("a", "first"), wait_step("b", "second", depends_on=("a",)))
    run_id = await park(engine, stub, *steps)
    # As if ttl/3 had passed since it started (its engine's own clock): its implicit lease may have
    # been recorded by then, so it is no longer held again without a write.
    known = engine.leases._known.get(run_id)
    assert known is not None and known.session == 0
    engine.leases._known.put(run_id, replace(known, implicit_until=known.implicit_until - LONG_TTL / 2))
    head = await cluster.settled(run_id, store_pb2.STREAM_STATUS_PARKED)
    calls.on = True
    await send(stub, run_id, "first")
    await cluster.settled(run_id, store_pb2.STREAM_STATUS_PARKED, after_seq=head)
    # Created here and never recorded: one append with "the stream must be new", nothing read.
    assert calls.naming(lease_stream_id(run_id)) == [("append", ("LeaseAcquired",))]
    calls.calls.clear()
    await send(stub, run_id, "second")
    await cluster.settled(run_id, store_pb2.STREAM_STATUS_COMPLETED)
    calls.on = False
    # Its lease is recorded in this engine's session, which still holds: taken again unread.
    assert calls.naming(lease_stream_id(run_id)) == []


async def test_a_run_another_engine_took_meanwhile_is_left_to_it(cluster: Cluster) -> None:
    creator, creator_stub, calls = await cluster.engine("creator", SHORT_TTL)
    other, other_stub, _ = await cluster.engine("other", SHORT_TTL)
    # A run the other engine keeps driving keeps its session alive (heartbeats): the run it takes
    # below stays its own, parked, instead of being free again a ttl later.
    door = f"held-{uuid.uuid4()}"
    held = engine_pb2.Step(step_id="hold", op_id="test.gated", op_config=to_value({"gate": door}))
    await other_stub.StartRun(engine_pb2.StartRunRequest(pipeline=pipeline(held)))
    await gate(door).wait_for(1)
    steps = (wait_step("a", "first"), wait_step("b", "second", depends_on=("a",)))
    run_id = await park(creator, creator_stub, *steps)
    # Once the creator's implicit lease ended, the other engine takes the run (a wake-up with
    # nothing to do: it parks it again) and holds its lease.
    await eventually(lambda: other.wake_run(run_id), "the other engine took the run", within=WAIT, poll=0.2)
    await parked(other, run_id)
    calls.on = True
    await send(creator_stub, run_id, "first")
    await eventually(
        lambda: calls.naming(lease_stream_id(run_id)), "the creator's try", within=WAIT, poll=0.01
    )
    await send(creator_stub, run_id, "second")
    run = await finished(other_stub, run_id)
    calls.on = False
    gate(door).opened.set()
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    assert {step.step_id: step.status for step in run.steps} == {
        "a": engine_pb2.STEP_STATUS_COMPLETED,
        "b": engine_pb2.STEP_STATUS_COMPLETED,
    }
    # The creator tried its "must be new" append, met the other's lease, read it and left the run
    # alone: the other engine woke it (the signal's nudge made it due) and is its only holder.
    lease_calls = calls.naming(lease_stream_id(run_id))
    assert lease_calls[0] == ("append", ("LeaseAcquired",))
    assert len(lease_calls) > 1 and all(method != "append" for method, _ in lease_calls[1:])
    leases = await other.env.store.read(lease_stream_id(run_id))
    assert [(e.type, json.loads(e.payload)["engine_id"]) for e in leases] == [("LeaseAcquired", "other")]


async def test_a_retried_start_of_a_run_parked_here_keeps_what_the_engine_knows_of_it(
    cluster: Cluster,
) -> None:
    engine, stub, calls = await cluster.engine("one", LONG_TTL)
    await engine.waker.stop()
    request = engine_pb2.StartRunRequest(run_id=str(uuid.uuid4()), pipeline=pipeline(wait_step("w", "go")))
    run_id = (await stub.StartRun(request)).run_id
    await parked(engine, run_id)
    # A client retrying its start (the run exists: nothing new is started), then one that starts it
    # again with a signal: the run is still taken up here at once, its lease unread (not once this
    # engine's own implicit lease expired, a ttl after the run started).
    assert (await stub.StartRun(request)).run_id == run_id
    calls.on = True
    signalled = engine_pb2.StartRunRequest()
    signalled.CopyFrom(request)
    signalled.signals.add(name="go", payload=to_value("again"), signal_id="s")
    await stub.StartRun(signalled)
    await cluster.settled(run_id, store_pb2.STREAM_STATUS_COMPLETED)
    calls.on = False
    assert calls.naming(lease_stream_id(run_id)) == []


async def test_a_run_whose_driver_stopped_here_is_taken_up_here_at_once(cluster: Cluster) -> None:
    engine, stub, _ = await cluster.engine("one", LONG_TTL)
    request = engine_pb2.StartRunRequest(pipeline=engine_pb2.Pipeline(pipeline_id="sleepy", steps=[SLEEP]))
    run_id = (await stub.StartRun(request)).run_id
    await eventually(lambda: run_id in engine.drivers, "it is driven here", within=WAIT, poll=0.01)
    await cluster.settled(run_id, store_pb2.STREAM_STATUS_ACTIVE)
    await engine.stop_driver(run_id)
    # Its implicit lease is this engine's: the run stream's creation time, read from the store,
    # names the run this engine created (it is not taken for another engine's, held for a ttl).
    assert await engine.resume_run(run_id)
    assert run_id in engine.drivers


async def lease_events(cluster: Cluster, run_id: str) -> list[tuple[str, str]]:
    """(event type, engine id) of each event of the run's lease stream."""
    page = await cluster.store.ReadEvents(store_pb2.ReadEventsRequest(stream_id=lease_stream_id(run_id)))
    return [(e.type, json.loads(e.payload)["engine_id"]) for e in page.events]


@pytest.mark.parametrize("woken_here", [False, True], ids=["parked", "woken-here-and-parked-again"])
async def test_a_drained_engine_releases_the_runs_parked_on_it_and_another_wakes_them_at_once(
    cluster: Cluster, woken_here: bool
) -> None:
    # A ttl no test outlasts: the implicit lease of a run parked on a, which nothing in the store
    # names, would hold that long unless a's drain hands it over. Woken on a (its implicit lease
    # held again, as a knew it) and parked again, the run is still a's to release.
    a, a_stub, _ = await cluster.engine("a", LONG_TTL)
    _, b_stub, _ = await cluster.engine("b", LONG_TTL)
    steps = [wait_step("first", "early"), wait_step("w", "go")] if woken_here else [wait_step("w", "go")]
    run_id = await park(a, a_stub, *steps)
    if woken_here:
        await send(a_stub, run_id, "early")

        async def first_done() -> bool:
            page = await cluster.store.ReadEvents(
                store_pb2.ReadEventsRequest(stream_id=run_stream_id(run_id))
            )
            done = [json.loads(e.payload)["step_id"] for e in page.events if e.type == "StepCompleted"]
            return done == ["first"]

        await eventually(first_done, "the first wait settled on a", within=WAIT, poll=0.01)
        await parked(a, run_id)
    await cluster.engines[0].drain(0.5)
    assert await lease_events(cluster, run_id) == [("LeaseReleased", "a")]
    await send(b_stub, run_id, "go")
    assert (await finished(b_stub, run_id)).status == engine_pb2.RUN_STATUS_COMPLETED
    assert await lease_events(cluster, run_id) == [("LeaseReleased", "a"), ("LeaseAcquired", "b")]


@pytest.mark.parametrize("started_again", [False, True], ids=["canceled", "deleted-and-started-again"])
async def test_a_drained_engine_leaves_the_lease_of_a_run_parked_on_it_that_ended_elsewhere(
    cluster: Cluster, started_again: bool
) -> None:
    # Terminalize through b takes no lease, and a is not told. A release by a would leave a stray
    # lease stream behind, or hand over the lease of the run b started again under the same id.
    a, a_stub, _ = await cluster.engine("a", LONG_TTL)
    b, b_stub, _ = await cluster.engine("b", LONG_TTL)
    run_id = await park(a, a_stub, wait_step("w", "go"))
    cancel = engine_pb2.TerminalizeRequest(run_id=run_id, target=engine_pb2.TERMINAL_TARGET_CANCELED)
    await b_stub.Terminalize(cancel)
    if started_again:
        await b_stub.DeleteRun(engine_pb2.DeleteRunRequest(run_id=run_id))
        again = engine_pb2.StartRunRequest(pipeline=pipeline(wait_step("w", "go")), run_id=run_id)
        await b_stub.StartRun(again)
        await parked(b, run_id)
    await cluster.engines[0].drain(0.5)
    assert await lease_events(cluster, run_id) == []
    if started_again:  # b's run takes its signal at once: its implicit lease is still b's
        await send(b_stub, run_id, "go")
        assert (await finished(b_stub, run_id)).status == engine_pb2.RUN_STATUS_COMPLETED
        assert await lease_events(cluster, run_id) == []


class LapseAtInboxRead(InMemoryEventLog):
    """An event log that makes a woken run's lease lapse once its signal resolver has read the inbox,
    and notes, for each append to the run holding RunResumed, whether the engine's lease was valid."""

    def __init__(self) -> None:
        super().__init__()
        self.engine: Engine | None = None
        self.run_id = ""
        self.armed = False
        self.claims: list[bool] = []

    async def read(self, stream_id: str, **kwargs: Any) -> list[StreamEvent]:
        events = await super().read(stream_id, **kwargs)
        if self.armed and stream_id == signals_stream_id(self.run_id) and self.engine is not None:
            lease = self.engine.leases.held.get(self.run_id)
            if lease is not None:
                self.armed = False
                lease._born -= LONG_TTL  # its trust ran out (a pause); nobody takes the run over
        return events

    async def append(
        self, stream_id: str, events: Sequence[tuple[str, bytes]], *, expected_seq: int | None, **kw: Any
    ) -> AppendResult:
        if stream_id == run_stream_id(self.run_id) and any(kind == "RunResumed" for kind, _ in events):
            assert self.engine is not None
            lease = self.engine.leases.held.get(self.run_id)
            self.claims.append(lease is not None and lease.is_valid())
        return await super().append(stream_id, events, expected_seq=expected_seq, **kw)


async def test_a_claim_travelling_with_a_consumed_signal_needs_a_valid_lease() -> None:
    log = LapseAtInboxRead()
    env = RunEnvironment(log, DEFAULT_REGISTRY, TransportRegistry(), Failpoints.parse(""))
    # A linger longer than the test: the claim travels with the signal's fact, not alone before it.
    build = BuildProvenance("test", "3", "none")
    engine = Engine(env, build, lease_ttl=LONG_TTL, engine_id="mem", checkpoint_linger=WAIT)
    log.engine = engine
    try:
        log.run_id = str(uuid.uuid4())
        await engine.start_run(signal_manifest(), log.run_id)
        await parked(engine, log.run_id)
        log.armed = True
        await engine.signal_run(log.run_id, Signal("s", "go", "payload"))
        # The batch of the claim and the signal's fact (an answer, which may land through a lapse;
        # the claim may not) waits for a lease; the run is taken again with a write, then ends.
        assert await engine.await_run(log.run_id, WAIT)
        assert not log.armed
        events = [decode_event(e.type, e.payload) for e in await log.read(run_stream_id(log.run_id))]
        assert [e.response["signal_id"] for e in events if isinstance(e, FactRecorded)] == ["s"]
        assert log.claims and all(log.claims)
        # Its implicit lease lapsed, so it was taken again with a write.
        assert [e.type for e in await log.read(lease_stream_id(log.run_id))] == ["LeaseAcquired"]
    finally:
        await engine.stop()


def signal_manifest() -> RunManifest:
    """A run of one `keel.wait_signal` step waiting for `go`."""
    return RunManifest(
        single_op_pipeline("keel.wait_signal", "1", {"name": "go"}),
        None,
        {},
        make_run_config(max_attempts=1),
        BuildProvenance("t", "3", "n"),
    )


def sleeping_manifest() -> RunManifest:
    """A run of one step sleeping in its op for a minute (driven all along)."""
    sleepy = single_op_pipeline("keel.sleep_in_process", "1", {"seconds": 60})
    return replace(signal_manifest(), pipeline=sleepy)


@pytest.mark.parametrize("first", ["parked", "ended", "canceled here", "canceled elsewhere"])
async def test_a_run_started_again_under_the_id_of_a_run_driven_here_is_not_taken_as_that_one(
    first: str,
) -> None:
    log = InMemoryEventLog()

    def engine(name: str) -> Engine:
        env = RunEnvironment(log, DEFAULT_REGISTRY, TransportRegistry(), Failpoints.parse(""))
        return Engine(env, BuildProvenance("test", "3", "none"), lease_ttl=LONG_TTL, engine_id=name)

    here, there = engine("here"), engine("there")
    try:
        run_id = str(uuid.uuid4())
        if first == "parked":
            await here.start_run(signal_manifest(), run_id)
            await parked(here, run_id)
            assert here.leases.known_start(run_id) is not None
            await there.terminalizer.terminalize(run_id, CANCELED, "test")
        elif first == "ended":
            echo = single_op_pipeline("keel.echo", "1", None)
            await here.start_run(replace(signal_manifest(), pipeline=echo), run_id)
            assert await here.await_run(run_id, WAIT)
        else:
            await here.start_run(sleeping_manifest(), run_id)
            assert run_id in here.drivers
            canceling = here if first == "canceled here" else there
            await canceling.terminalizer.terminalize(run_id, CANCELED, "test")
            await eventually(
                lambda: run_id not in here.drivers, "its driver here ended", within=WAIT, poll=0.01
            )
        # The run (ended here or elsewhere) is deleted, and its id started again on the other
        # engine, which drives it (its implicit lease holds).
        await there.retention.delete_run(run_id)
        await there.start_run(sleeping_manifest(), run_id)
        assert run_id in there.drivers
        # Neither a wake-up here nor a recovery scan here takes the new run for the one driven here.
        assert not await here.wake_run(run_id)
        assert await here.recovery.recover() == 0
        assert run_id not in here.drivers and run_id not in here.leases.held
        assert await log.read(lease_stream_id(run_id)) == []
        assert "RunResumed" not in [e.type for e in await log.read(run_stream_id(run_id))]
    finally:
        await here.stop()
        await there.stop()
