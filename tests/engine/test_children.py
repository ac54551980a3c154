"""Child runs over gRPC: the fan-out op, SpawnChild/AwaitChild, idempotent and conflicting spawns."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from typing import Any

import grpc
import pytest
from keel.engine.v1 import engine_pb2
from keel.store.v1 import store_pb2

from engine_service.domain.child_runs import CHILDREN, ChildSpawnRequest
from engine_service.domain.labels import PARENT_ATTRIBUTE
from engine_service.domain.manifest import MANIFEST_ARTIFACT_KIND
from keel_core.json_values import from_value, to_value
from tests.engine.conftest import CLOCK, Cluster
from tests.engine.test_engine_rpcs import all_streams, expect_error


def fan_out(config: dict[str, object]) -> engine_pb2.StartRunRequest:
    """A waited single-op run of keel.fan_out."""
    return engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="keel.fan_out", op_config=to_value(config)), wait=True
    )


async def parent_run(cluster: Cluster) -> str:
    """A finished run to hang RPC-spawned children on."""
    started = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"), wait=True)
    )
    return started.run_id


def spawn(
    parent: str, key: str, op_id: str = "test.tick_once", value: object = 1
) -> engine_pb2.SpawnChildRequest:
    """A SpawnChild request."""
    return engine_pb2.SpawnChildRequest(
        kind="child_run_spawn_v1", parent_run_id=parent, fact_key=key, op_id=op_id, input=to_value(value)
    )


async def run_events(cluster: Cluster, run_id: str) -> list[str]:
    """The event types of a run's stream."""
    page = await cluster.store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run_id}"))
    return [e.type for e in page.events]


async def test_fan_out_spawns_one_child_per_input_and_returns_their_outputs(cluster: Cluster) -> None:
    started = await cluster.stub.StartRun(fan_out({"op_id": "test.tick_once", "inputs": [1, 2, 3]}))
    run = started.run
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED, run.reason
    output = from_value(run.final_snapshot)["main"]
    assert [r["double"] for r in output["results"]] == [2, 4, 6]
    expected = [str(uuid.uuid5(uuid.UUID(run.run_id), f"main.child.{i}")) for i in range(3)]
    assert [c["child_run_id"] for c in output["children"]] == expected
    assert [(c.child_run_id, c.fact_key, c.op_id, c.status) for c in run.children] == [
        (child, f"main.child.{i}", "test.tick_once", engine_pb2.RUN_STATUS_COMPLETED)
        for i, child in enumerate(expected)
    ]
    for i, child in enumerate(expected):
        child_run = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=child))).run
        assert (child_run.parent_run_id, child_run.parent_fact_key) == (run.run_id, f"main.child.{i}")
        assert [call for call in CLOCK.calls if call[0] == child] == [(child, "tick")]


async def test_fan_out_with_count_gives_child_i_input_i(cluster: Cluster) -> None:
    run = (await cluster.stub.StartRun(fan_out({"op_id": "keel.echo", "count": 2}))).run
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED, run.reason
    results = from_value(run.final_snapshot)["main"]["results"]
    assert [r["input"] for r in results] == [0, 1]


async def test_fan_out_reads_back_no_child_this_engine_finished(cluster: Cluster) -> None:
    # The children ended here and are held: their end decides the parent's output without a
    # HeadSeq and a ReadEvents per child (a terminal child never changes, nor goes before its parent).
    assert cluster.engine.engine is not None
    calls = cluster.engine.engine.env.store.calls
    before = dict(calls)
    run = (await cluster.stub.StartRun(fan_out({"op_id": "keel.echo", "count": 5}))).run
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED, run.reason
    assert [r["input"] for r in from_value(run.final_snapshot)["main"]["results"]] == [0, 1, 2, 3, 4]
    assert [c.status for c in run.children] == [engine_pb2.RUN_STATUS_COMPLETED] * 5
    assert calls["ReadEvents"] - before.get("ReadEvents", 0) < 5
    assert calls["HeadSeq"] - before.get("HeadSeq", 0) < 5


async def test_fan_out_lists_its_children_once_for_its_check_and_its_end(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wait's "not yet" check and the end's reading used to list the children twice in a row.
    # However many times the wait is checked (children may still run at first), each check lists
    # the children once.
    assert cluster.engine.engine is not None
    env = cluster.engine.engine.env
    listings: list[Mapping[str, str]] = []
    checks = 0
    list_streams, resolve = env.store.list_streams, env.wait_resolvers[CHILDREN]

    async def listing(**arguments: Any) -> Any:
        if PARENT_ATTRIBUTE in (arguments.get("attributes") or {}):
            listings.append(arguments["attributes"])
        return await list_streams(**arguments)

    async def checking(run_id: str, waiting: Any) -> Any:
        nonlocal checks
        checks += 1
        return await resolve(run_id, waiting)

    monkeypatch.setattr(env.store, "list_streams", listing)
    monkeypatch.setitem(env.wait_resolvers, CHILDREN, checking)
    run = (await cluster.stub.StartRun(fan_out({"op_id": "keel.echo", "count": 3}))).run
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED, run.reason
    assert [r["input"] for r in from_value(run.final_snapshot)["main"]["results"]] == [0, 1, 2]
    assert checks >= 1
    assert listings == [{PARENT_ATTRIBUTE: run.run_id}] * checks


async def test_fan_out_of_a_failing_child_fails_the_parent_with_child_run_failed(cluster: Cluster) -> None:
    config = {"op_id": "keel.fail_n_times", "op_config": {"n": 1, "retryable": False}, "count": 1}
    run = (await cluster.stub.StartRun(fan_out(config))).run
    assert run.status == engine_pb2.RUN_STATUS_FAILED
    assert run.error.code == "child_run_failed"
    assert run.children[0].status == engine_pb2.RUN_STATUS_FAILED


async def test_spawn_child_then_await_child_returns_the_final_snapshot(cluster: Cluster) -> None:
    parent = await parent_run(cluster)
    spawned = await cluster.stub.SpawnChild(spawn(parent, "one", value=21))
    assert spawned.parent_run_id == parent
    assert spawned.child_run_id == str(uuid.uuid5(uuid.UUID(parent), "one"))
    awaited = await cluster.stub.AwaitChild(
        engine_pb2.AwaitChildRequest(
            kind="child_run_await_v1",
            child_run_id=spawned.child_run_id,
            child_manifest_id=spawned.child_manifest_id,
        )
    )
    assert awaited.status == engine_pb2.RUN_STATUS_COMPLETED
    assert from_value(awaited.final_snapshot)["main"]["double"] == 42
    again = await cluster.stub.SpawnChild(spawn(parent, "one", value=21))
    assert (again.child_run_id, again.child_manifest_id) == (spawned.child_run_id, spawned.child_manifest_id)
    assert (await run_events(cluster, spawned.child_run_id)).count("RunStarted") == 1


async def test_concurrent_spawns_of_one_fact_key_return_the_same_child(cluster: Cluster) -> None:
    parent = await parent_run(cluster)
    answers = await asyncio.gather(*(cluster.stub.SpawnChild(spawn(parent, "same")) for _ in range(6)))
    assert len({(a.child_run_id, a.child_manifest_id) for a in answers}) == 1
    child = answers[0].child_run_id
    await cluster.stub.AwaitChild(engine_pb2.AwaitChildRequest(child_run_id=child))
    events = await run_events(cluster, child)
    assert events.count("RunStarted") == 1
    assert events.count("FactRecorded") == 1
    assert [call for call in CLOCK.calls if call[0] == child] == [(child, "tick")]


async def test_same_fact_key_with_another_op_is_child_run_conflict(cluster: Cluster) -> None:
    parent = await parent_run(cluster)
    await cluster.stub.SpawnChild(spawn(parent, "k"))
    message = await expect_error(
        cluster.stub.SpawnChild(spawn(parent, "k", op_id="keel.echo")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "child_run_conflict",
    )
    assert "fact key 'k'" in message
    # Nothing written: the parent still links one child, running the first op.
    links = await cluster.store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"children:{parent}"))
    assert [e.type for e in links.events] == ["ChildLinked"]
    listed = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=parent))).run.children
    assert [(c.fact_key, c.op_id) for c in listed] == [("k", "test.tick_once")]


@pytest.mark.parametrize(
    ("request_change", "code", "reason"),
    [
        ({"fact_key": ""}, grpc.StatusCode.INVALID_ARGUMENT, "missing_fact_key"),
        ({"fact_key": "password=hunter2"}, grpc.StatusCode.INVALID_ARGUMENT, "secrets_detected"),
        ({"kind": "child_run_spawn_v2"}, grpc.StatusCode.INVALID_ARGUMENT, "child_run_request_invalid"),
        ({"op_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "child_run_request_invalid"),
        ({"op_id": "no.such.op"}, grpc.StatusCode.INVALID_ARGUMENT, "invalid_plan"),
        ({"parent_run_id": str(uuid.uuid4())}, grpc.StatusCode.NOT_FOUND, "run_not_found"),
    ],
)
async def test_bad_spawns_are_refused_before_anything_is_written(
    cluster: Cluster, request_change: dict[str, str], code: grpc.StatusCode, reason: str
) -> None:
    parent = await parent_run(cluster)
    before = await all_streams(cluster)
    request = spawn(parent, "fine")
    for name, value in request_change.items():
        setattr(request, name, value)
    message = await expect_error(cluster.stub.SpawnChild(request), code, reason)
    assert "hunter2" not in message
    assert await all_streams(cluster) == before


async def test_await_child_of_a_wrong_kind_is_child_run_request_invalid(cluster: Cluster) -> None:
    request = engine_pb2.AwaitChildRequest(kind="child_run_await_v0", child_run_id=str(uuid.uuid4()))
    await expect_error(
        cluster.stub.AwaitChild(request), grpc.StatusCode.INVALID_ARGUMENT, "child_run_request_invalid"
    )


async def test_await_child_starts_a_child_that_was_never_started(cluster: Cluster) -> None:
    parent = await parent_run(cluster)
    request = ChildSpawnRequest(parent, "stored-only", "test.tick_once", input=5)
    manifest_bytes = request.manifest().canonical_bytes()
    put = await cluster.store_stub.PutArtifact(
        iter([store_pb2.PutArtifactRequest(kind=MANIFEST_ARTIFACT_KIND, data=manifest_bytes)])
    )
    awaited = await cluster.stub.AwaitChild(
        engine_pb2.AwaitChildRequest(child_run_id=request.child_run_id, child_manifest_id=put.artifact_id)
    )
    assert awaited.status == engine_pb2.RUN_STATUS_COMPLETED
    assert from_value(awaited.final_snapshot)["main"]["double"] == 10


def io_call_run(namespace: str, request: object, fact_key: str) -> engine_pb2.StartRunRequest:
    """A waited run whose op makes one io call."""
    config = {"namespace": namespace, "request": request, "fact_key": fact_key}
    return engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="keel.io_call", op_config=to_value(config)), wait=True
    )


@pytest.mark.parametrize(
    ("namespace", "request_body", "fact_key", "code"),
    [
        (
            "machine.child_run.spawn",
            {"kind": "child_run_spawn_v0", "op_id": "keel.echo"},
            "c",
            "child_run_request_invalid",
        ),
        ("machine.child_run.spawn", ["not", "an", "object"], "c", "child_run_request_invalid"),
        (
            "machine.child_run.await",
            {"kind": "child_run_await_v1", "child_run_id": "nope"},
            "a",
            "child_run_request_invalid",
        ),
        (
            "machine.child_run.spawn",
            {"kind": "child_run_spawn_v1", "op_id": "keel.echo"},
            "",
            "missing_fact_key",
        ),
        (
            "machine.child_run.spawn",
            {"kind": "child_run_spawn_v1", "op_id": "keel.echo"},
            "password=x1",
            "secrets_detected",
        ),
    ],
)
async def test_in_run_child_calls_are_checked_like_the_rpcs(
    cluster: Cluster, namespace: str, request_body: object, fact_key: str, code: str
) -> None:
    before = await all_streams(cluster)
    run = (await cluster.stub.StartRun(io_call_run(namespace, request_body, fact_key))).run
    assert run.status == engine_pb2.RUN_STATUS_FAILED
    assert run.error.code == code
    assert [s for s in await all_streams(cluster) if s not in before] == [f"run:{run.run_id}"]


async def test_in_run_spawn_and_rpc_spawn_name_the_same_child(cluster: Cluster) -> None:
    body = {"kind": "child_run_spawn_v1", "op_id": "test.tick_once", "input": 4}
    run = (await cluster.stub.StartRun(io_call_run("machine.child_run.spawn", body, "kid"))).run
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED, run.reason
    spawned = from_value(run.final_snapshot)["main"]["response"]
    assert spawned["child_run_id"] == str(uuid.uuid5(uuid.UUID(run.run_id), "kid"))
    again = await cluster.stub.SpawnChild(spawn(run.run_id, "kid", value=4))
    assert (again.child_run_id, again.child_manifest_id) == (
        spawned["child_run_id"],
        spawned["child_manifest_id"],
    )
    awaited = await cluster.stub.AwaitChild(engine_pb2.AwaitChildRequest(child_run_id=again.child_run_id))
    assert from_value(awaited.final_snapshot)["main"]["double"] == 8
