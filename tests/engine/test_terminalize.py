"""Terminalize: exactly once, cancel in every phase of a run, children by policy, the failure ledger."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2

from engine_service.domain import (
    RunConfig,
    RunManifest,
    RunStarted,
    StepAttemptStarted,
    StepCompleted,
    canonical_json_bytes,
    encode_event,
    single_op_pipeline,
)
from engine_service.domain.canonical import artifact_id_for_bytes
from engine_service.domain.child_runs import CHILD_BUILD, ChildLink, ChildSpawnRequest
from engine_service.domain.manifest import MANIFEST_ARTIFACT_KIND
from engine_service.domain.plan import PipelineSpec, StepSpec
from engine_service.domain.streams import children_stream_id
from keel_core.errors import ErrorCategory, KeelError
from keel_core.json_values import to_value
from keel_core.serving import ServingHandle, start_server
from store_service.backend import AppendResult, EventPair, Expected, NewArtifact, StreamStatus
from store_service.sqlite import SqliteStoreBackend
from store_service.wire import StoreServicer, register
from tests.engine.conftest import Cluster, gate, start_test_engine
from tests.engine.test_engine_rpcs import expect_error

if TYPE_CHECKING:
    from keel.engine.v1.engine_pb2_grpc import EngineServiceAsyncStub
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

CANCEL = engine_pb2.TERMINAL_TARGET_CANCELED


def terminalize(run_id: str, target: int = CANCEL, reason: str = "") -> engine_pb2.TerminalizeRequest:
    """A Terminalize request."""
    return engine_pb2.TerminalizeRequest(run_id=run_id, target=target, reason=reason)  # type: ignore[arg-type]


async def event_types(store_stub: StoreServiceAsyncStub, run_id: str) -> list[str]:
    """The event types of a run's stream."""
    page = await store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run_id}"))
    return [e.type for e in page.events]


def gated(gate_name: str, *, wait: bool = False) -> engine_pb2.StartRunRequest:
    """A run of one `test.gated` step."""
    return engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="test.gated", op_config=to_value({"gate": gate_name})), wait=wait
    )


async def write_stream_by_hand(cluster: Cluster, events: Sequence[object], manifest: RunManifest) -> str:
    """A run whose stream holds exactly `events` (after RunStarted) and that no engine drives."""
    run_id = str(uuid.uuid4())
    manifest_bytes = manifest.canonical_bytes()
    snapshot = canonical_json_bytes({})
    started = RunStarted(
        manifest.op_id, artifact_id_for_bytes(manifest_bytes), artifact_id_for_bytes(snapshot)
    )
    await cluster.store_stub.AppendEvents(
        store_pb2.AppendEventsRequest(
            stream_id=f"run:{run_id}",
            expected_kind=store_pb2.EXPECTED_KIND_NO_STREAM,
            events=[store_pb2.EventData(type=t, payload=p) for t, p in map(encode_event, [started, *events])],  # type: ignore[arg-type]
            status=store_pb2.STREAM_STATUS_ACTIVE,
            artifacts=[
                store_pb2.InlineArtifact(kind="manifest", data=manifest_bytes),
                store_pb2.InlineArtifact(kind="snapshot", data=snapshot),
            ],
        )
    )
    return run_id


async def test_terminalize_transitions_once_then_is_noop(cluster: Cluster) -> None:
    name = f"once-{uuid.uuid4()}"
    door = gate(name)
    run_id = (await cluster.stub.StartRun(gated(name))).run_id
    await door.wait_for(1)
    first = await cluster.stub.Terminalize(terminalize(run_id))
    assert (first.outcome, first.status) == (
        engine_pb2.TERMINALIZE_OUTCOME_TRANSITIONED,
        engine_pb2.RUN_STATUS_CANCELED,
    )
    assert door.cancelled == [run_id]  # the running op was cancelled, not left to finish
    again = await cluster.stub.Terminalize(terminalize(run_id, engine_pb2.TERMINAL_TARGET_COMPLETED))
    assert (again.outcome, again.status) == (
        engine_pb2.TERMINALIZE_OUTCOME_NOOP,
        engine_pb2.RUN_STATUS_CANCELED,
    )
    types = await event_types(cluster.store_stub, run_id)
    assert types[-1] == "RunCompleted" and types.count("RunCompleted") == 1
    assert "StepCompleted" not in types
    run = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
    assert run.status == engine_pb2.RUN_STATUS_CANCELED


async def test_concurrent_terminalizes_transition_the_run_exactly_once(cluster: Cluster) -> None:
    name = f"racing-{uuid.uuid4()}"
    door = gate(name)
    run_id = (await cluster.stub.StartRun(gated(name))).run_id
    await door.wait_for(1)
    answers = await asyncio.gather(*(cluster.stub.Terminalize(terminalize(run_id)) for _ in range(5)))
    outcomes = sorted(a.outcome for a in answers)
    assert outcomes == [
        engine_pb2.TERMINALIZE_OUTCOME_TRANSITIONED,
        *[engine_pb2.TERMINALIZE_OUTCOME_NOOP] * 4,
    ]
    assert (await event_types(cluster.store_stub, run_id)).count("RunCompleted") == 1


async def test_a_foreign_end_cancels_an_op_that_recorded_answers_then_idles(cluster: Cluster) -> None:
    # The watch for a foreign end pauses at the op's own appends (each is fenced by the sequence)
    # and looks again: an op that went quiet after its answers is still cancelled where it runs.
    name = f"after-calls-{uuid.uuid4()}"
    door = gate(name)
    config = {"gate": name, "calls": 30}
    request = engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="test.calls_then_gated", op_config=to_value(config))
    )
    run_id = (await cluster.stub.StartRun(request)).run_id
    await door.wait_for(1)
    other = await start_test_engine(cluster.store_address, recover_on_start=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{other.port}")
    try:
        answer = await engine_pb2_grpc.EngineServiceStub(channel).Terminalize(terminalize(run_id))
        assert answer.outcome == engine_pb2.TERMINALIZE_OUTCOME_TRANSITIONED
        await door.left.wait()
        assert door.cancelled == [run_id]
    finally:
        await channel.close(grace=None)
        await other.drain(0.5)
    types = await event_types(cluster.store_stub, run_id)
    assert types.count("FactRecorded") == 30 and types[-1] == "RunCompleted"


async def test_cancel_through_another_engine_cancels_the_op_where_it_runs(cluster: Cluster) -> None:
    name = f"elsewhere-{uuid.uuid4()}"
    door = gate(name)
    run_id = (await cluster.stub.StartRun(gated(name))).run_id
    await door.wait_for(1)
    other = await start_test_engine(cluster.store_address, recover_on_start=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{other.port}")
    try:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        answer = await stub.Terminalize(terminalize(run_id))
        assert answer.outcome == engine_pb2.TERMINALIZE_OUTCOME_TRANSITIONED
        await door.left.wait()  # the engine driving the run saw the foreign RunCompleted
        assert door.cancelled == [run_id]
    finally:
        await channel.close(grace=None)
        await other.drain(0.5)
    assert cluster.engine.engine is not None
    driver = cluster.engine.engine.drivers.get(run_id)
    if driver is not None:
        await asyncio.wait({driver})  # it stops, and is not left running
    assert run_id not in cluster.engine.engine.drivers
    types = await event_types(cluster.store_stub, run_id)
    assert types[-1] == "RunCompleted" and "StepCompleted" not in types


@pytest.mark.parametrize("shape", ["two branches", "after a short step"])
async def test_a_foreign_end_cancels_every_op_running_long(cluster: Cluster, shape: str) -> None:
    # One watch serves all of a driver's ops: two parallel branches waiting at their gates both
    # stop; so does an op that began after a short step's op had armed the watch's timer.
    name = f"long-ops-{uuid.uuid4()}"
    door = gate(name)
    config = to_value({"gate": name})
    if shape == "two branches":
        steps = [engine_pb2.Step(step_id=s, op_id="test.gated", op_config=config) for s in ("a", "b")]
    else:
        steps = [
            engine_pb2.Step(step_id="a", op_id="keel.echo"),
            engine_pb2.Step(step_id="b", op_id="test.gated", op_config=config, depends_on=["a"]),
        ]
    request = engine_pb2.StartRunRequest(pipeline=engine_pb2.Pipeline(pipeline_id="long", steps=steps))
    run_id = (await cluster.stub.StartRun(request)).run_id
    gated_ops = 2 if shape == "two branches" else 1
    await door.wait_for(gated_ops)
    other = await start_test_engine(cluster.store_address, recover_on_start=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{other.port}")
    try:
        answer = await engine_pb2_grpc.EngineServiceStub(channel).Terminalize(terminalize(run_id))
        assert answer.outcome == engine_pb2.TERMINALIZE_OUTCOME_TRANSITIONED
        while len(door.cancelled) < gated_ops:
            door.left.clear()
            await door.left.wait()
        assert door.cancelled == [run_id] * gated_ops
    finally:
        await channel.close(grace=None)
        await other.drain(0.5)
    types = await event_types(cluster.store_stub, run_id)
    assert types[-1] == "RunCompleted" and types.count("RunCompleted") == 1


async def test_terminalize_of_a_finished_run_is_noop_with_its_status(cluster: Cluster) -> None:
    run_id = (
        await cluster.stub.StartRun(
            engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"), wait=True)
        )
    ).run_id
    answer = await cluster.stub.Terminalize(terminalize(run_id, engine_pb2.TERMINAL_TARGET_FAILED, "late"))
    assert (answer.outcome, answer.status) == (
        engine_pb2.TERMINALIZE_OUTCOME_NOOP,
        engine_pb2.RUN_STATUS_COMPLETED,
    )


async def test_terminalize_failed_records_the_reason(cluster: Cluster) -> None:
    name = f"failed-{uuid.uuid4()}"
    run_id = (await cluster.stub.StartRun(gated(name))).run_id
    answer = await cluster.stub.Terminalize(
        terminalize(run_id, engine_pb2.TERMINAL_TARGET_FAILED, "operator said so")
    )
    assert answer.status == engine_pb2.RUN_STATUS_FAILED
    run = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
    assert (run.status, run.reason) == (engine_pb2.RUN_STATUS_FAILED, "operator said so")


async def test_terminalize_bad_requests(cluster: Cluster) -> None:
    await expect_error(
        cluster.stub.Terminalize(terminalize(str(uuid.uuid4()))), grpc.StatusCode.NOT_FOUND, "run_not_found"
    )
    run_id = (await cluster.stub.StartRun(gated(f"bad-{uuid.uuid4()}"))).run_id
    await expect_error(
        cluster.stub.Terminalize(terminalize(run_id, engine_pb2.TERMINAL_TARGET_UNSPECIFIED)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_argument",
    )
    await expect_error(
        cluster.stub.Terminalize(terminalize(run_id, engine_pb2.TERMINAL_TARGET_FAILED)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_argument",
    )
    assert "RunCompleted" not in await event_types(cluster.store_stub, run_id)


@pytest.mark.parametrize("cluster", [0.2], indirect=True)
async def test_cancel_before_start_appends_only_the_terminal_event(cluster: Cluster) -> None:
    manifest = RunManifest(single_op_pipeline("keel.echo", "1", None), None, {}, RunConfig(), CHILD_BUILD)
    run_id = await write_stream_by_hand(cluster, [], manifest)
    answer = await cluster.stub.Terminalize(terminalize(run_id))
    assert answer.outcome == engine_pb2.TERMINALIZE_OUTCOME_TRANSITIONED
    assert await event_types(cluster.store_stub, run_id) == ["RunStarted", "RunCompleted"]


@pytest.mark.parametrize("cluster", [0.2], indirect=True)
async def test_cancel_between_steps_starts_no_further_step(cluster: Cluster) -> None:
    pipeline = PipelineSpec(
        "two", "1", (StepSpec("a", "keel.echo", "1", None), StepSpec("b", "keel.echo", "1", None, ("a",)))
    )
    manifest = RunManifest(pipeline, None, {}, RunConfig(), CHILD_BUILD)
    snapshot_id = artifact_id_for_bytes(canonical_json_bytes({}))
    run_id = await write_stream_by_hand(
        cluster, [StepAttemptStarted("a", 0, snapshot_id), StepCompleted("a", 0, snapshot_id)], manifest
    )
    await cluster.stub.Terminalize(terminalize(run_id))
    await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id))  # must not resume it
    assert await event_types(cluster.store_stub, run_id) == [
        "RunStarted",
        "StepAttemptStarted",
        "StepCompleted",
        "RunCompleted",
    ]


@pytest.mark.parametrize("policy", ["cancel", "abandon"])
async def test_cancel_while_awaiting_children_handles_them_by_policy(cluster: Cluster, policy: str) -> None:
    name = f"children-{uuid.uuid4()}"
    door = gate(name)
    config = {"op_id": "test.gated", "op_config": {"gate": name}, "count": 2, "parent_close_policy": policy}
    parent = (
        await cluster.stub.StartRun(
            engine_pb2.StartRunRequest(
                op=engine_pb2.SingleOp(op_id="keel.fan_out", op_config=to_value(config))
            )
        )
    ).run_id
    await door.wait_for(2)
    await spawn_facts(cluster, parent, 2)
    children = sorted(door.runs)
    await cluster.stub.Terminalize(terminalize(parent))
    run = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=parent))).run
    assert run.status == engine_pb2.RUN_STATUS_CANCELED
    assert sorted(c.child_run_id for c in run.children) == children
    if policy == "cancel":
        assert sorted(door.cancelled) == children
        assert {c.status for c in run.children} == {engine_pb2.RUN_STATUS_CANCELED}
    else:
        assert door.cancelled == []
        door.opened.set()
        for child in children:
            done = await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=child))
            assert done.run.status == engine_pb2.RUN_STATUS_COMPLETED


async def test_children_spawned_through_the_rpc_are_listed_and_closed_by_their_policy(
    cluster: Cluster,
) -> None:
    parent_gate, children_gate = f"parent-{uuid.uuid4()}", f"children-{uuid.uuid4()}"
    parent = (await cluster.stub.StartRun(gated(parent_gate))).run_id
    door = gate(children_gate)
    spawned = {}
    for key, policy in (
        ("doomed", engine_pb2.PARENT_CLOSE_POLICY_CANCEL),
        ("kept", engine_pb2.PARENT_CLOSE_POLICY_ABANDON),
    ):
        request = engine_pb2.SpawnChildRequest(
            parent_run_id=parent,
            fact_key=key,
            op_id="test.gated",
            op_config=to_value({"gate": children_gate}),
            parent_close_policy=policy,
        )
        spawned[key] = (await cluster.stub.SpawnChild(request)).child_run_id
    await door.wait_for(2)
    listed = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=parent))).run.children
    assert [(c.fact_key, c.child_run_id, c.op_id, c.status, c.parent_close_policy) for c in listed] == [
        (
            "doomed",
            spawned["doomed"],
            "test.gated",
            engine_pb2.RUN_STATUS_RUNNING,
            engine_pb2.PARENT_CLOSE_POLICY_CANCEL,
        ),
        (
            "kept",
            spawned["kept"],
            "test.gated",
            engine_pb2.RUN_STATUS_RUNNING,
            engine_pb2.PARENT_CLOSE_POLICY_ABANDON,
        ),
    ]
    await cluster.stub.Terminalize(terminalize(parent))
    assert door.cancelled == [spawned["doomed"]]
    listed = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=parent))).run.children
    assert [c.status for c in listed] == [engine_pb2.RUN_STATUS_CANCELED, engine_pb2.RUN_STATUS_RUNNING]
    door.opened.set()
    kept = await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=spawned["kept"]))
    assert kept.run.status == engine_pb2.RUN_STATUS_COMPLETED


async def test_a_canceled_parent_takes_no_new_child_its_cancel_would_close(cluster: Cluster) -> None:
    parent = (await cluster.stub.StartRun(gated(f"parent-{uuid.uuid4()}"))).run_id
    await cluster.stub.Terminalize(terminalize(parent))
    request = engine_pb2.SpawnChildRequest(parent_run_id=parent, fact_key="late", op_id="keel.echo")
    before = await cluster.store_stub.ListStreams(store_pb2.ListStreamsRequest(page_size=1000))
    message = await expect_error(
        cluster.stub.SpawnChild(request), grpc.StatusCode.FAILED_PRECONDITION, "parent_run_canceled"
    )
    assert parent in message and "abandon" in message
    after = await cluster.store_stub.ListStreams(store_pb2.ListStreamsRequest(page_size=1000))
    assert [s.stream_id for s in after.streams] == [s.stream_id for s in before.streams]
    # An abandoned child does not depend on its parent's cancel: it may still be spawned.
    request.parent_close_policy = engine_pb2.PARENT_CLOSE_POLICY_ABANDON
    child = (await cluster.stub.SpawnChild(request)).child_run_id
    done = await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=child))
    assert done.run.status == engine_pb2.RUN_STATUS_COMPLETED


async def test_a_child_linked_after_its_parents_cancel_looked_is_recorded_canceled_not_run(
    cluster: Cluster,
) -> None:
    """The spawn side of a spawn/cancel race: the cancel read the links before this one landed.

    Whoever starts a linked child looks at the parent first; a canceled parent means the child is
    recorded canceled and never runs (here through AwaitChild, as after a crash mid-spawn).
    """
    parent = (await cluster.stub.StartRun(gated(f"parent-{uuid.uuid4()}"))).run_id
    await cluster.stub.Terminalize(terminalize(parent))
    child_gate = f"child-{uuid.uuid4()}"
    request = ChildSpawnRequest(parent, "late", "test.gated", op_config={"gate": child_gate})
    manifest = request.manifest().canonical_bytes()
    link = ChildLink(parent, "late", request.child_run_id, artifact_id_for_bytes(manifest), "test.gated")
    event_type, payload = link.encode(at_us=1)
    await cluster.store_stub.AppendEvents(
        store_pb2.AppendEventsRequest(
            stream_id=children_stream_id(parent),
            expected_kind=store_pb2.EXPECTED_KIND_ANY,
            events=[store_pb2.EventData(type=event_type, payload=payload)],
            artifacts=[store_pb2.InlineArtifact(kind=MANIFEST_ARTIFACT_KIND, data=manifest)],
        )
    )
    awaited = await cluster.stub.AwaitChild(
        engine_pb2.AwaitChildRequest(child_run_id=request.child_run_id, parent_run_id=parent)
    )
    assert awaited.status == engine_pb2.RUN_STATUS_CANCELED
    assert await event_types(cluster.store_stub, request.child_run_id) == ["RunStarted", "RunCompleted"]
    assert gate(child_gate).runs == []


async def spawn_facts(cluster: Cluster, run_id: str, count: int) -> None:
    """Until the run's stream holds `count` spawn facts (watched, not polled)."""
    seen = 0
    async for message in cluster.stub.WatchRun(engine_pb2.WatchRunRequest(run_id=run_id)):
        if (
            message.event.type == "FactRecorded"
            and message.event.data["namespace"] == "machine.child_run.spawn"
        ):
            seen += 1
            if seen == count:
                return


# -- the failure ledger, through a real store whose appends fail for chosen event types ----------


class AppendRejectingBackend(SqliteStoreBackend):
    """The SQLite backend, refusing (INTERNAL, nothing written) any append holding a rejected event type."""

    rejected: set[str]
    rejected_streams: set[str]

    async def append(
        self,
        stream_id: str,
        expected: Expected,
        events: Sequence[EventPair],
        *,
        status: StreamStatus | None = None,
        artifacts: Sequence[NewArtifact] = (),
        attributes: Mapping[str, str] | None = None,
        due_at_us: int | None = None,
        nudges: Mapping[str, int] | None = None,
        report_heads: Sequence[str] = (),
        append_key: str | None = None,
    ) -> AppendResult:
        """Refuse, or append as SQLite does."""
        refused = sorted({type_name for type_name, _ in events} & self.rejected)
        if stream_id in self.rejected_streams:
            refused.append(f"any append to {stream_id}")
        if refused:
            raise KeelError(
                "disk_on_fire",
                f"injected fault: {', '.join(refused)} refused",
                category=ErrorCategory.INTERNAL,
            )
        return await super().append(
            stream_id,
            expected,
            events,
            status=status,
            artifacts=artifacts,
            attributes=attributes,
            due_at_us=due_at_us,
            nudges=nudges,
            report_heads=report_heads,
            append_key=append_key,
        )


@dataclass
class FaultyCluster:
    """An engine over a store whose appends can be refused by event type."""

    backend: AppendRejectingBackend
    stub: EngineServiceAsyncStub


@pytest.fixture
async def faulty(tmp_path: Path) -> AsyncIterator[FaultyCluster]:
    """A real StoreService (gRPC, SQLite) with AppendRejectingBackend, and an engine on it."""
    backend = AppendRejectingBackend.in_directory(tmp_path / "store")
    assert isinstance(backend, AppendRejectingBackend)
    backend.rejected = set()
    backend.rejected_streams = set()
    await backend.open()
    store: ServingHandle = await start_server(
        "127.0.0.1:0", lambda server: register(server, StoreServicer(backend))
    )
    engine = await start_test_engine(f"127.0.0.1:{store.port}")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}")
    try:
        yield FaultyCluster(backend, engine_pb2_grpc.EngineServiceStub(channel))
    finally:
        await channel.close(grace=None)
        await engine.drain(0.5)
        await store.drain(0.5)
        await backend.close()


async def test_failed_terminal_append_goes_to_the_ledger_and_a_retry_transitions_once(
    faulty: FaultyCluster,
) -> None:
    run_id = (await faulty.stub.StartRun(gated(f"ledger-{uuid.uuid4()}"))).run_id
    faulty.backend.rejected = {"RunCompleted"}
    message = await expect_error(
        faulty.stub.Terminalize(terminalize(run_id)), grpc.StatusCode.UNAVAILABLE, "terminal_append_failed"
    )
    assert message.startswith("terminal run status persisted but RunCanceled append failed: ")
    assert "injected fault: RunCompleted refused" in message
    run = (await faulty.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
    assert run.status == engine_pb2.RUN_STATUS_RUNNING
    assert [(e.step_id, e.reason) for e in run.failure_ledger] == [("_run", message)]
    assert run.failure_ledger[0].HasField("recorded_at")

    faulty.backend.rejected = set()
    first = await faulty.stub.Terminalize(terminalize(run_id))
    second = await faulty.stub.Terminalize(terminalize(run_id))
    assert [first.outcome, second.outcome] == [
        engine_pb2.TERMINALIZE_OUTCOME_TRANSITIONED,
        engine_pb2.TERMINALIZE_OUTCOME_NOOP,
    ]
    run = (await faulty.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
    assert run.status == engine_pb2.RUN_STATUS_CANCELED
    assert len(run.failure_ledger) == 1  # the history of the divergence stays


async def test_terminal_append_and_ledger_both_failing_names_both(faulty: FaultyCluster) -> None:
    run_id = (await faulty.stub.StartRun(gated(f"both-{uuid.uuid4()}"))).run_id
    faulty.backend.rejected = {"RunCompleted", "FailureLedgerEntry"}
    message = await expect_error(
        faulty.stub.Terminalize(terminalize(run_id, engine_pb2.TERMINAL_TARGET_FAILED, "stop")),
        grpc.StatusCode.UNAVAILABLE,
        "terminal_append_failed",
    )
    assert "RunFailed append failed: injected fault: RunCompleted refused" in message
    assert "writing the failure ledger also failed: injected fault: FailureLedgerEntry refused" in message
    faulty.backend.rejected = set()
    run = (await faulty.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
    assert (run.status, list(run.failure_ledger)) == (engine_pb2.RUN_STATUS_RUNNING, [])


async def test_a_run_resumed_after_a_divergence_still_shows_its_ledger(faulty: FaultyCluster) -> None:
    name = f"resumed-{uuid.uuid4()}"
    door = gate(name)
    run_id = (await faulty.stub.StartRun(gated(name))).run_id
    await door.wait_for(1)
    faulty.backend.rejected = {"RunCompleted"}
    await expect_error(
        faulty.stub.Terminalize(terminalize(run_id)), grpc.StatusCode.UNAVAILABLE, "terminal_append_failed"
    )
    faulty.backend.rejected = set()
    door.opened.set()
    # Nobody drives the run after the failed Terminalize: awaiting it resumes it to completion.
    done = await faulty.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id))
    assert done.run.status == engine_pb2.RUN_STATUS_COMPLETED
    assert [e.reason.split(":")[0] for e in done.run.failure_ledger] == [
        "terminal run status persisted but RunCanceled append failed"
    ]


@pytest.mark.parametrize("then", ["cancel_again", "resume_child"])
async def test_a_cancel_that_could_not_close_a_child_says_so_and_the_child_is_closed_later(
    faulty: FaultyCluster, then: str
) -> None:
    parent = (await faulty.stub.StartRun(gated(f"parent-{uuid.uuid4()}"))).run_id
    children_gate = f"children-{uuid.uuid4()}"
    door = gate(children_gate)
    child = (
        await faulty.stub.SpawnChild(
            engine_pb2.SpawnChildRequest(
                parent_run_id=parent,
                fact_key="stubborn",
                op_id="test.gated",
                op_config=to_value({"gate": children_gate}),
            )
        )
    ).child_run_id
    await door.wait_for(1)
    faulty.backend.rejected_streams = {f"run:{child}", f"ledger:{child}"}
    message = await expect_error(
        faulty.stub.Terminalize(terminalize(parent)), grpc.StatusCode.UNAVAILABLE, "children_not_closed"
    )
    assert f"run {parent} is canceled, but 1 of its children could not be canceled yet ({child}:" in message
    assert "cancel the run again" in message
    shown = (await faulty.stub.GetRun(engine_pb2.GetRunRequest(run_id=parent))).run
    assert shown.status == engine_pb2.RUN_STATUS_CANCELED
    assert [c.status for c in shown.children] == [engine_pb2.RUN_STATUS_RUNNING]
    faulty.backend.rejected_streams = set()
    if then == "cancel_again":
        again = await faulty.stub.Terminalize(terminalize(parent))
        assert again.outcome == engine_pb2.TERMINALIZE_OUTCOME_NOOP
    else:
        # Nobody cancels again: whoever resumes the child (here an await) closes it instead.
        awaited = await faulty.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=child))
        assert awaited.done
    closed = (await faulty.stub.GetRun(engine_pb2.GetRunRequest(run_id=child))).run
    assert closed.status == engine_pb2.RUN_STATUS_CANCELED
    assert closed.reason == f"parent run {parent} was canceled"
    assert door.runs == [child], "the child's op never ran again"
