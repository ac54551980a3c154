"""EngineService RPCs against a real in-process store and engine."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2

from engine_service import EngineConfig, start_engine
from engine_service.domain.run_config import parse_run_id
from keel_core.json_values import from_value, to_value
from keel_core.status import from_rpc_error
from tests.engine.conftest import ATTEMPT_TIMES, CLOCK, Cluster, gate

FAST_RETRY = engine_pb2.RunConfig(
    retry_policy=engine_pb2.RetryPolicy(
        max_attempts=3, initial_backoff=duration_pb2.Duration(nanos=5_000_000)
    )
)


def step(step_id: str, op_id: str, config: Any = None, depends_on: tuple[str, ...] = ()) -> engine_pb2.Step:
    """A pipeline step message."""
    message = engine_pb2.Step(step_id=step_id, op_id=op_id, depends_on=list(depends_on))
    if config is not None:
        message.op_config.CopyFrom(to_value(config))
    return message


def pipeline(*steps: engine_pb2.Step, pipeline_id: str = "p") -> engine_pb2.Pipeline:
    """A pipeline message."""
    return engine_pb2.Pipeline(pipeline_id=pipeline_id, steps=list(steps))


async def all_streams(cluster: Cluster) -> list[str]:
    """Every stream the store holds; a run's lease stream is counted as part of its run."""
    page = await cluster.store_stub.ListStreams(store_pb2.ListStreamsRequest(page_size=1000))
    names = [s.stream_id for s in page.streams]
    runs = {name.removeprefix("run:") for name in names if name.startswith("run:")}
    return [n for n in names if not (n.startswith("lease:") and n.removeprefix("lease:") in runs)]


async def expect_error(call: Any, code: grpc.StatusCode, reason: str) -> str:
    """Await `call`, which must fail with `code` and ErrorInfo `reason`; returns the message."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert from_rpc_error(caught.value).code == reason, caught.value.details()
    return caught.value.details() or ""


async def test_pipeline_runs_in_topological_order_and_threads_the_context(cluster: Cluster) -> None:
    request = engine_pb2.StartRunRequest(
        pipeline=pipeline(
            step(
                "shape", "keel.transform", {"fields": {"a": "$context.first.input.x", "lit": 5}}, ("first",)
            ),
            step("first", "keel.echo", {"k": "v"}),
        ),
        input=to_value({"x": 41}),
        initial_context=to_value({"seed": True}),
        wait=True,
    )
    response = await cluster.stub.StartRun(request)
    run = response.run
    assert response.created and run.status == engine_pb2.RUN_STATUS_COMPLETED
    assert [s.step_id for s in run.steps] == ["first", "shape"]
    assert from_value(run.final_snapshot) == {
        "seed": True,
        "first": {"input": {"x": 41}, "config": {"k": "v"}},
        "shape": {"a": 41, "lit": 5},
    }
    assert run.manifest_id == response.manifest_id and run.manifest_id.startswith("sha256:")
    assert run.created_at.seconds and run.completed_at.seconds
    assert all(s.status == engine_pb2.STEP_STATUS_COMPLETED for s in run.steps)


async def test_single_op_run_is_a_one_step_pipeline_named_main(cluster: Cluster) -> None:
    request = engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="keel.echo"), input=to_value(3), wait=True
    )
    run = (await cluster.stub.StartRun(request)).run
    assert run.op_id == "keel.echo"
    assert [s.step_id for s in run.steps] == ["main"]
    assert from_value(run.final_snapshot) == {"main": {"input": 3, "config": None}}


async def test_runs_started_and_rerun_without_an_id_get_uuid7s_in_creation_order(cluster: Cluster) -> None:
    def after_the_millisecond_of(run_id: str) -> None:
        # Ids made in one millisecond differ in random bits only: order is promised across them.
        while time.time_ns() // 1_000_000 <= uuid.UUID(run_id).int >> 80:
            pass  # at most a millisecond

    start = engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="keel.echo"), input=to_value(1), wait=True
    )
    first = await cluster.stub.StartRun(start)
    after_the_millisecond_of(first.run_id)
    second = await cluster.stub.StartRun(start)
    after_the_millisecond_of(second.run_id)
    rerun = await cluster.stub.RerunRun(engine_pb2.RerunRunRequest(run_id=first.run_id, from_step_id="main"))
    ids = [first.run_id, second.run_id, rerun.run_id]
    assert [uuid.UUID(run_id).version for run_id in ids] == [7, 7, 7]
    assert [parse_run_id(run_id) for run_id in ids] == ids  # canonical: any client may send them back
    assert first.run_id < second.run_id < rerun.run_id  # as text, as the store's indexes sort them


async def test_start_with_client_run_id_is_idempotent_for_the_same_manifest(cluster: Cluster) -> None:
    run_id = str(uuid.uuid4())
    request = engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="keel.echo"), input=to_value(1), run_id=run_id
    )
    first = await cluster.stub.StartRun(request)
    second = await cluster.stub.StartRun(request)
    assert first.created and not second.created
    assert first.run_id == second.run_id == run_id and first.manifest_id == second.manifest_id
    other = engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="keel.echo"), input=to_value(2), run_id=run_id
    )
    await expect_error(cluster.stub.StartRun(other), grpc.StatusCode.ALREADY_EXISTS, "run_already_exists")
    assert await all_streams(cluster) == [f"run:{run_id}"]


async def test_retryable_failures_are_retried_until_the_op_succeeds(cluster: Cluster) -> None:
    request = engine_pb2.StartRunRequest(
        pipeline=pipeline(step("flaky", "keel.fail_n_times", {"n": 2})), run_config=FAST_RETRY, wait=True
    )
    run = (await cluster.stub.StartRun(request)).run
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    (flaky,) = run.steps
    assert [a.status for a in flaky.attempts] == [
        engine_pb2.STEP_STATUS_FAILED,
        engine_pb2.STEP_STATUS_FAILED,
        engine_pb2.STEP_STATUS_COMPLETED,
    ]
    assert flaky.attempts[0].error.code == "flaky" and flaky.attempts[0].error.retryable
    assert from_value(run.final_snapshot) == {"flaky": {"attempt": 2}}


async def test_exhausted_retries_fail_the_run_with_the_last_error(cluster: Cluster) -> None:
    request = engine_pb2.StartRunRequest(
        pipeline=pipeline(step("ok", "keel.echo"), step("flaky", "keel.fail_n_times", {"n": 9}, ("ok",))),
        run_config=FAST_RETRY,
        wait=True,
    )
    run = (await cluster.stub.StartRun(request)).run
    assert run.status == engine_pb2.RUN_STATUS_FAILED
    assert run.error.code == "flaky" and "attempt 2" in run.error.message
    assert "3 attempts used" in run.reason
    flaky = run.steps[1]
    assert flaky.status == engine_pb2.STEP_STATUS_FAILED and len(flaky.attempts) == 3
    assert flaky.last_error.code == "flaky"
    assert from_value(run.final_snapshot) == {"ok": {"input": None, "config": None}}


async def test_non_retryable_failure_fails_at_once(cluster: Cluster) -> None:
    request = engine_pb2.StartRunRequest(
        pipeline=pipeline(step("bad", "keel.fail_n_times", {"n": 1, "retryable": False, "code": "nope"})),
        run_config=FAST_RETRY,
        wait=True,
    )
    run = (await cluster.stub.StartRun(request)).run
    assert run.status == engine_pb2.RUN_STATUS_FAILED and run.error.code == "nope"
    assert len(run.steps[0].attempts) == 1


async def test_replay_serves_recorded_facts_and_fails_on_a_missing_one(cluster: Cluster) -> None:
    clock = step("now", "keel.io_call", {"namespace": "keel.clock", "fact_key": "now"})
    original = (
        await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=pipeline(clock), wait=True))
    ).run
    await asyncio.sleep(0.01)
    replay_config = engine_pb2.RunConfig(
        execution_mode=engine_pb2.EXECUTION_MODE_REPLAY, replay_of_run_id=original.run_id
    )
    replay = (
        await cluster.stub.StartRun(
            engine_pb2.StartRunRequest(pipeline=pipeline(clock), run_config=replay_config, wait=True)
        )
    ).run
    assert replay.status == engine_pb2.RUN_STATUS_COMPLETED
    assert from_value(replay.final_snapshot) == from_value(original.final_snapshot)
    other = step("now", "keel.io_call", {"namespace": "keel.clock", "fact_key": "later"})
    missing = (
        await cluster.stub.StartRun(
            engine_pb2.StartRunRequest(pipeline=pipeline(other), run_config=replay_config, wait=True)
        )
    ).run
    assert missing.status == engine_pb2.RUN_STATUS_FAILED and missing.error.code == "replay_fact_missing"


async def test_io_call_without_a_fact_key_is_missing_fact_key(cluster: Cluster) -> None:
    call = step("io", "keel.io_call", {"namespace": "keel.echo", "request": 1})
    run = (await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=pipeline(call), wait=True))).run
    assert run.status == engine_pb2.RUN_STATUS_FAILED and run.error.code == "missing_fact_key"


async def test_secret_looking_fact_key_is_refused_and_never_persisted(cluster: Cluster) -> None:
    secret = "password=hunter2-very-secret"
    call = step("io", "keel.io_call", {"namespace": "keel.echo", "request": 1, "fact_key": secret})
    # The key sits in the op config (the manifest) here, so check the event stream, not artifacts.
    run = (await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=pipeline(call), wait=True))).run
    assert run.status == engine_pb2.RUN_STATUS_FAILED and run.error.code == "secrets_detected"
    events = await cluster.store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run.run_id}"))
    assert [e.type for e in events.events] == [
        "RunStarted",
        "StepAttemptStarted",
        "StepAttemptFailed",
        "RunCompleted",
    ]
    assert all(b"hunter2" not in e.payload for e in events.events)


async def test_await_run_times_out_then_returns_the_finished_run(cluster: Cluster) -> None:
    # The step waits at a gate until the short await has timed out (a timed nap could end first on
    # a loaded machine).
    name = f"await-times-out-{cluster.checkpoint_linger}"  # gates are per process: one per variant
    held = step("held", "test.gated", {"gate": name})
    started = await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=pipeline(held)))
    assert started.run.status == engine_pb2.RUN_STATUS_RUNNING
    short = await cluster.stub.AwaitRun(
        engine_pb2.AwaitRunRequest(run_id=started.run_id, timeout=duration_pb2.Duration(nanos=50_000_000))
    )
    assert not short.done and short.run.status == engine_pb2.RUN_STATUS_RUNNING
    gate(name).opened.set()
    full = await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=started.run_id), timeout=30)
    assert full.done and full.run.status == engine_pb2.RUN_STATUS_COMPLETED


async def test_watch_run_streams_events_as_they_happen_and_ends_after_the_terminal_one(
    cluster: Cluster,
) -> None:
    steps = pipeline(step("nap", "keel.sleep", {"seconds": 0.2}), step("echo", "keel.echo", None, ("nap",)))
    started = await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=steps))
    seen = [m.event async for m in cluster.stub.WatchRun(engine_pb2.WatchRunRequest(run_id=started.run_id))]
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert seen[0].type == "RunStarted" and seen[-1].type == "RunCompleted"
    assert from_value(to_value(dict(seen[-1].data.items()))) is not None
    assert seen[-1].data["status"] == "completed"
    after = [
        m.event
        async for m in cluster.stub.WatchRun(
            engine_pb2.WatchRunRequest(run_id=started.run_id, after_seq=seen[-1].seq)
        )
    ]
    assert after == []


async def test_list_runs_filters_by_status_and_pages(cluster: Cluster) -> None:
    ok = engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"), wait=True)
    bad = engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="keel.fail_n_times", op_config=to_value({"n": 1, "retryable": False})),
        wait=True,
    )
    completed = [(await cluster.stub.StartRun(ok)).run_id for _ in range(3)]
    failed = (await cluster.stub.StartRun(bad)).run_id
    page = await cluster.stub.ListRuns(engine_pb2.ListRunsRequest(statuses=[engine_pb2.RUN_STATUS_FAILED]))
    assert [r.run_id for r in page.runs] == [failed]
    seen: list[str] = []
    token = ""
    while True:
        page = await cluster.stub.ListRuns(
            engine_pb2.ListRunsRequest(
                statuses=[engine_pb2.RUN_STATUS_COMPLETED], page_size=2, page_token=token
            )
        )
        seen += [r.run_id for r in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(completed)
    everything = await cluster.stub.ListRuns(engine_pb2.ListRunsRequest())
    assert len(everything.runs) == 4


async def test_list_ops_names_the_built_in_ops(cluster: Cluster) -> None:
    ops = {(o.op_id, o.op_version) for o in (await cluster.stub.ListOps(engine_pb2.ListOpsRequest())).ops}
    for op_id in ("keel.echo", "keel.transform", "keel.sleep", "keel.fail_n_times", "keel.io_call"):
        assert (op_id, "1") in ops


async def test_resume_of_a_terminal_run_writes_nothing(cluster: Cluster) -> None:
    run = (
        await cluster.stub.StartRun(
            engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"), wait=True)
        )
    ).run
    resumed = await cluster.stub.ResumeRun(engine_pb2.ResumeRunRequest(run_id=run.run_id))
    assert not resumed.resumed and resumed.run.head_seq == run.head_seq
    assert resumed.run.status == engine_pb2.RUN_STATUS_COMPLETED


async def test_parked_run_is_resumed_by_the_next_engine_on_start_up(cluster: Cluster, tmp_path: Path) -> None:
    first = await start_engine(EngineConfig(listen="127.0.0.1:0", store=cluster.store_address, failpoints=""))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{first.port}")
    steps = pipeline(step("echo", "keel.echo"), step("nap", "keel.sleep", {"seconds": 0.3}, ("echo",)))
    started = await engine_pb2_grpc.EngineServiceStub(channel).StartRun(
        engine_pb2.StartRunRequest(pipeline=steps)
    )
    await channel.close(grace=None)
    await first.drain(0)  # parks the run mid-step
    # The fixture's engine started before this run existed; a new one recovers it on start-up.
    second = await start_engine(
        EngineConfig(listen="127.0.0.1:0", store=cluster.store_address, failpoints="")
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{second.port}")
    try:
        awaited = await engine_pb2_grpc.EngineServiceStub(channel).AwaitRun(
            engine_pb2.AwaitRunRequest(run_id=started.run_id), timeout=30
        )
        assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED
    finally:
        await channel.close(grace=None)
        await second.drain(0.5)


BAD_STARTS: list[tuple[str, engine_pb2.StartRunRequest, str]] = [
    ("no target", engine_pb2.StartRunRequest(), "invalid_argument"),
    ("no steps", engine_pb2.StartRunRequest(pipeline=pipeline()), "invalid_plan"),
    ("empty step id", engine_pb2.StartRunRequest(pipeline=pipeline(step("", "keel.echo"))), "invalid_plan"),
    (
        "no pipeline id",
        engine_pb2.StartRunRequest(pipeline=pipeline(step("a", "keel.echo"), pipeline_id="")),
        "invalid_plan",
    ),
    (
        "cycle",
        engine_pb2.StartRunRequest(
            pipeline=pipeline(step("a", "keel.echo", None, ("b",)), step("b", "keel.echo", None, ("a",)))
        ),
        "invalid_plan",
    ),
    (
        "unknown dependency",
        engine_pb2.StartRunRequest(pipeline=pipeline(step("a", "keel.echo", None, ("zz",)))),
        "invalid_plan",
    ),
    (
        "duplicate step",
        engine_pb2.StartRunRequest(pipeline=pipeline(step("a", "keel.echo"), step("a", "keel.echo"))),
        "invalid_plan",
    ),
    ("unknown op", engine_pb2.StartRunRequest(pipeline=pipeline(step("a", "no.such.op"))), "invalid_plan"),
    (
        "unknown single op",
        engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="no.such.op")),
        "invalid_plan",
    ),
    (
        "unknown op version",
        engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo", op_version="7")),
        "invalid_plan",
    ),
    (
        "non-object context",
        engine_pb2.StartRunRequest(
            op=engine_pb2.SingleOp(op_id="keel.echo"), initial_context=to_value([1, 2])
        ),
        "invalid_argument",
    ),
    (
        "oversized input",
        engine_pb2.StartRunRequest(
            op=engine_pb2.SingleOp(op_id="keel.echo"), input=to_value("x" * (1024 * 1024 + 1))
        ),
        "input_too_large",
    ),
    (
        "bad run id",
        engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"), run_id="run-1"),
        "invalid_run_id",
    ),
    (
        "replay without a run",
        engine_pb2.StartRunRequest(
            op=engine_pb2.SingleOp(op_id="keel.echo"),
            run_config=engine_pb2.RunConfig(execution_mode=engine_pb2.EXECUTION_MODE_REPLAY),
        ),
        "invalid_argument",
    ),
    (
        "backoffs upside down",
        engine_pb2.StartRunRequest(
            op=engine_pb2.SingleOp(op_id="keel.echo"),
            run_config=engine_pb2.RunConfig(
                retry_policy=engine_pb2.RetryPolicy(
                    initial_backoff=duration_pb2.Duration(seconds=5),
                    max_backoff=duration_pb2.Duration(seconds=1),
                )
            ),
        ),
        "invalid_argument",
    ),
]


@pytest.mark.parametrize(("name", "request_", "reason"), BAD_STARTS, ids=[b[0] for b in BAD_STARTS])
async def test_bad_start_is_invalid_argument_and_writes_nothing(
    cluster: Cluster, name: str, request_: engine_pb2.StartRunRequest, reason: str
) -> None:
    message = await expect_error(cluster.stub.StartRun(request_), grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert message
    assert await all_streams(cluster) == []


async def test_invalid_plan_names_the_offending_step(cluster: Cluster) -> None:
    request = engine_pb2.StartRunRequest(
        pipeline=pipeline(step("a", "keel.echo"), step("b", "no.such.op", None, ("a",)))
    )
    message = await expect_error(
        cluster.stub.StartRun(request), grpc.StatusCode.INVALID_ARGUMENT, "invalid_plan"
    )
    assert "'b'" in message and "no.such.op" in message


async def test_replay_of_an_unknown_run_is_not_found_and_writes_nothing(cluster: Cluster) -> None:
    config = engine_pb2.RunConfig(
        execution_mode=engine_pb2.EXECUTION_MODE_REPLAY, replay_of_run_id=str(uuid.uuid4())
    )
    request = engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"), run_config=config)
    await expect_error(cluster.stub.StartRun(request), grpc.StatusCode.NOT_FOUND, "run_not_found")
    assert await all_streams(cluster) == []


async def test_run_rpcs_refuse_unknown_and_malformed_run_ids(cluster: Cluster) -> None:
    unknown = str(uuid.uuid4())
    stub = cluster.stub
    for make in (
        lambda run_id: stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id)),
        lambda run_id: stub.ResumeRun(engine_pb2.ResumeRunRequest(run_id=run_id)),
        lambda run_id: stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id)),
    ):
        await expect_error(make(unknown), grpc.StatusCode.NOT_FOUND, "run_not_found")
        await expect_error(make("not-a-uuid"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_run_id")
        await expect_error(make(""), grpc.StatusCode.INVALID_ARGUMENT, "invalid_run_id")
    for run_id, code, reason in (
        (unknown, grpc.StatusCode.NOT_FOUND, "run_not_found"),
        ("nope", grpc.StatusCode.INVALID_ARGUMENT, "invalid_run_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.WatchRun(engine_pb2.WatchRunRequest(run_id=run_id)):
                pass
        assert caught.value.code() == code and from_rpc_error(caught.value).code == reason
    await expect_error(
        stub.ListRuns(engine_pb2.ListRunsRequest(page_size=5000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_argument",
    )
    await expect_error(
        stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=unknown, timeout=duration_pb2.Duration(seconds=-1))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_argument",
    )
    assert await all_streams(cluster) == []


async def test_empty_child_and_terminalize_requests_are_invalid_argument(cluster: Cluster) -> None:
    for call, reason in (
        (cluster.stub.SpawnChild(engine_pb2.SpawnChildRequest()), "child_run_request_invalid"),
        (cluster.stub.AwaitChild(engine_pb2.AwaitChildRequest()), "child_run_request_invalid"),
        (cluster.stub.Terminalize(engine_pb2.TerminalizeRequest()), "invalid_run_id"),
    ):
        await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, reason)


async def test_unreachable_store_is_unavailable_store_unavailable() -> None:
    engine = await start_engine(
        EngineConfig(listen="127.0.0.1:0", store="127.0.0.1:1", failpoints="", store_patience=0.3)
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}")
    stub = engine_pb2_grpc.EngineServiceStub(channel)
    try:
        message = await expect_error(
            stub.StartRun(engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"))),
            grpc.StatusCode.UNAVAILABLE,
            "store_unavailable",
        )
        assert "127.0.0.1:1" in message
        # With `wait`, RunStarted travels with the run's first batch; it still fails the same way.
        await expect_error(
            stub.StartRun(engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"), wait=True)),
            grpc.StatusCode.UNAVAILABLE,
            "store_unavailable",
        )
        await expect_error(
            stub.GetRun(engine_pb2.GetRunRequest(run_id=str(uuid.uuid4()))),
            grpc.StatusCode.UNAVAILABLE,
            "store_unavailable",
        )
    finally:
        await channel.close(grace=None)
        await engine.drain(0)


THREE_STEPS = pipeline(
    step("a", "keel.echo"),
    step("b", "keel.transform", {"fields": {"x": "$input"}}, ("a",)),
    step("c", "keel.transform", {"fields": {"y": "$context.b.x"}}, ("b",)),
)


@pytest.mark.parametrize("wait", [False, True])
async def test_concurrent_starts_of_one_client_chosen_run_id_start_it_once(
    cluster: Cluster, wait: bool
) -> None:
    # A client that retries (or hedges) its StartRun while the first one is still in flight.
    run_id = str(uuid.uuid4())
    request = engine_pb2.StartRunRequest(
        run_id=run_id, pipeline=pipeline(step("nap", "keel.sleep", {"seconds": 0.2})), wait=wait
    )
    answers = await asyncio.gather(*(cluster.stub.StartRun(request) for _ in range(8)))
    assert sorted(a.created for a in answers) == [False] * 7 + [True]
    awaited = await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=30)
    assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED
    events = await cluster.store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run_id}"))
    assert [e.type for e in events.events].count("StepAttemptStarted") == 1


async def test_a_start_overtaken_by_a_retry_of_it_still_drives_the_run(cluster: Cluster) -> None:
    # The first start's append is held back (a slow network), so a retry of it would reach the store
    # first: the engine serializes starts of one run id, so the run is started and driven once.
    assert cluster.engine.engine is not None
    store = cluster.engine.engine.env.store
    run_id = str(uuid.uuid4())
    original = store.append
    held_back = asyncio.Event()

    async def slow_first_append(stream_id: str, events: Any, **kwargs: Any) -> Any:
        if stream_id == f"run:{run_id}" and not held_back.is_set():
            held_back.set()
            await asyncio.sleep(0.3)
        return await original(stream_id, events, **kwargs)

    store.append = slow_first_append  # type: ignore[method-assign]
    try:
        request = engine_pb2.StartRunRequest(run_id=run_id, pipeline=pipeline(step("e", "keel.echo")))
        first = asyncio.ensure_future(cluster.stub.StartRun(request))
        await held_back.wait()
        answers = [await cluster.stub.StartRun(request), await first]
    finally:
        store.append = original  # type: ignore[method-assign]
    assert sorted(a.created for a in answers) == [False, True]
    awaited = await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=30)
    assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED


async def test_a_finished_run_looks_the_same_from_the_engine_that_ran_it_and_from_the_store(
    cluster: Cluster,
) -> None:
    flaky = step("flaky", "keel.fail_n_times", {"n": 1}, ("c",))
    steps = pipeline(*THREE_STEPS.steps, flaky, pipeline_id="with-a-retry")
    request = engine_pb2.StartRunRequest(pipeline=steps, input=to_value(1), wait=True)
    request.run_config.retry_policy.initial_backoff.FromMilliseconds(1)
    ran = (await cluster.stub.StartRun(request)).run
    assert ran.status == engine_pb2.RUN_STATUS_COMPLETED, ran.reason
    assert [len(s.attempts) for s in ran.steps] == [1, 1, 1, 2]
    # Another engine on the same store has never held this run: it reads everything back.
    other = await start_engine(EngineConfig(listen="127.0.0.1:0", store=cluster.store_address, failpoints=""))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{other.port}")
    try:
        read_back = await engine_pb2_grpc.EngineServiceStub(channel).GetRun(
            engine_pb2.GetRunRequest(run_id=ran.run_id)
        )
    finally:
        await channel.close(grace=None)
        await other.drain(0.5)
    held = await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=ran.run_id))
    assert held.run == read_back.run == ran


async def test_waited_run_of_three_steps_costs_one_append_or_one_per_step(cluster: Cluster) -> None:
    assert cluster.engine.engine is not None
    calls = cluster.engine.engine.env.store.calls
    before = dict(calls)
    run = (
        await cluster.stub.StartRun(
            engine_pb2.StartRunRequest(pipeline=THREE_STEPS, input=to_value(1), wait=True)
        )
    ).run
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    # ListStreams is the background takeover scan's (every ttl/3), not the run's.
    spent = {
        method: count - before.get(method, 0)
        for method, count in calls.items()
        if count != before.get(method, 0) and method != "ListStreams"
    }
    # Write-behind: everything in one append. Without it: RunStarted, then one per step, the last
    # one carrying RunCompleted. Nothing else answers with the run: the engine holds every event of
    # a run it started and finished (a terminal stream never changes), the append of RunCompleted
    # reported its children stream's head (0: no child was linked before the run ended), and a run
    # without a failure ledger says so in RunCompleted, so the ledger is not read. A run this
    # short never writes its lease (engine_service.runtime.leases: a new run's is implicit). The
    # answer is the run as of its terminal event, which no deletion and no rerun can precede (both
    # need a terminal run): no HeadSeq checks that it still exists, and its reruns are not listed
    # (GetRun does both).
    # Each append travels as one request on the engine's open AppendEventsStream.
    appends = 1 if cluster.checkpoint_linger > 0 else 4
    assert spent == {"AppendEvents": appends, "AppendEventsStream": appends}
    events = await cluster.store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run.run_id}"))
    assert [e.type for e in events.events] == [
        "RunStarted",
        *["StepAttemptStarted", "StepCompleted"] * 3,
        "RunCompleted",
    ]
    streams = await cluster.store_stub.ListStreams(store_pb2.ListStreamsRequest(prefix="run:"))
    assert [s.status for s in streams.streams] == [store_pb2.STREAM_STATUS_COMPLETED]


async def test_unwaited_start_makes_run_started_durable_before_answering(cluster: Cluster) -> None:
    steps = pipeline(step("nap", "keel.sleep_in_process", {"seconds": 30}))  # parked by the fixture's drain
    started = await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=steps))
    head = await cluster.store_stub.HeadSeq(store_pb2.HeadSeqRequest(stream_id=f"run:{started.run_id}"))
    assert head.head_seq >= 1 and head.status == store_pb2.STREAM_STATUS_ACTIVE
    assert started.run.status == engine_pb2.RUN_STATUS_RUNNING


async def test_recorded_fact_is_served_to_retries_without_calling_the_transport_again(
    cluster: Cluster,
) -> None:
    # Step 1 records a clock fact and fails (retryably) twice; every attempt must see the same time.
    steps = pipeline(step("clock", "test.clock_then_fail", None))
    assert cluster.engine.engine is not None
    run = (
        await cluster.stub.StartRun(
            engine_pb2.StartRunRequest(pipeline=steps, run_config=FAST_RETRY, wait=True)
        )
    ).run
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    output = from_value(run.final_snapshot)["clock"]
    assert output["attempt"] == 2
    assert output["seen"] == [output["seen"][0]] * 3
    assert CLOCK.calls.count((run.run_id, "clock")) == 1


async def test_retries_wait_the_backoff_of_the_retry_policy_between_attempts(cluster: Cluster) -> None:
    policy = engine_pb2.RetryPolicy(
        max_attempts=3, initial_backoff=duration_pb2.Duration(nanos=100_000_000), multiplier=2.0
    )
    request = engine_pb2.StartRunRequest(
        pipeline=pipeline(step("flaky", "test.timed_flaky")),
        run_config=engine_pb2.RunConfig(retry_policy=policy),
        wait=True,
    )
    run = (await cluster.stub.StartRun(request)).run
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    first, second, third = ATTEMPT_TIMES[run.run_id]
    # asyncio.sleep never returns early: these are lower bounds (100 ms, then 200 ms), not speeds.
    assert second - first >= 0.1
    assert third - second >= 0.2
