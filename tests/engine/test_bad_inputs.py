"""Inputs that used to end in INTERNAL or UNKNOWN: each gets a status with a reason, and writes nothing."""

from __future__ import annotations

import math
import uuid

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from keel.engine.v1 import engine_pb2
from keel.store.v1 import store_pb2

from engine_service.domain.facts import MAX_FACT_KEY_CHARS
from engine_service.domain.secrets import looks_like_secret
from keel_core.json_rules import MAX_JSON_DEPTH
from keel_core.json_values import to_value
from tests.engine.conftest import Cluster
from tests.engine.test_children import parent_run, spawn
from tests.engine.test_engine_rpcs import all_streams, expect_error, pipeline, step

ECHO = engine_pb2.SingleOp(op_id="keel.echo")


def _number(value: float) -> struct_pb2.Value:
    return struct_pb2.Value(number_value=value)


def _nested_list(levels: int) -> struct_pb2.Value:
    """[[...[1]...]] with `levels` arrays, built from messages (to_value would refuse it)."""
    value = _number(1)
    for _ in range(levels):
        outer = struct_pb2.Value()
        outer.list_value.values.add().CopyFrom(value)
        value = outer
    return value


def _with_nan_inside(value: float) -> struct_pb2.Value:
    outer = struct_pb2.Value()
    outer.struct_value.fields["a"].list_value.values.add().CopyFrom(_number(value))
    return outer


NON_FINITE_STARTS = [
    ("NaN input", engine_pb2.StartRunRequest(op=ECHO, input=_number(math.nan)), "input"),
    ("Infinity input", engine_pb2.StartRunRequest(op=ECHO, input=_number(math.inf)), "input"),
    (
        "nested -Infinity input",
        engine_pb2.StartRunRequest(op=ECHO, input=_with_nan_inside(-math.inf)),
        "input.a[0]",
    ),
    (
        "NaN op_config",
        engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo", op_config=_number(math.nan))),
        "op.op_config",
    ),
    (
        "NaN step op_config",
        engine_pb2.StartRunRequest(
            pipeline=engine_pb2.Pipeline(
                pipeline_id="p",
                steps=[engine_pb2.Step(step_id="a", op_id="keel.echo", op_config=_number(math.nan))],
            )
        ),
        "steps[0].op_config",
    ),
    (
        "NaN initial_context",
        engine_pb2.StartRunRequest(op=ECHO, initial_context=_with_nan_inside(math.nan)),
        "initial_context.a[0]",
    ),
]


@pytest.mark.parametrize(
    ("name", "request_", "where"), NON_FINITE_STARTS, ids=[s[0] for s in NON_FINITE_STARTS]
)
async def test_nan_and_infinity_in_a_start_are_invalid_json_and_write_nothing(
    cluster: Cluster, name: str, request_: engine_pb2.StartRunRequest, where: str
) -> None:
    message = await expect_error(
        cluster.stub.StartRun(request_), grpc.StatusCode.INVALID_ARGUMENT, "invalid_json"
    )
    assert message.startswith(f"{where}: ") and "not a JSON number" in message
    assert await all_streams(cluster) == []


@pytest.mark.parametrize("field", ["input", "op_config", "initial_context"])
async def test_nan_in_a_spawn_is_invalid_json_and_writes_nothing(cluster: Cluster, field: str) -> None:
    parent = await parent_run(cluster)
    before = await all_streams(cluster)
    request = spawn(parent, "child")
    getattr(request, field).CopyFrom(_with_nan_inside(math.nan))
    message = await expect_error(
        cluster.stub.SpawnChild(request), grpc.StatusCode.INVALID_ARGUMENT, "invalid_json"
    )
    assert message.startswith(f"{field}.a[0]: ")
    assert await all_streams(cluster) == before


async def test_json_nested_past_the_depth_limit_is_invalid_json_and_writes_nothing(cluster: Cluster) -> None:
    await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(op=ECHO, input=_nested_list(MAX_JSON_DEPTH), wait=True)
    )
    before = await all_streams(cluster)
    message = await expect_error(
        cluster.stub.StartRun(engine_pb2.StartRunRequest(op=ECHO, input=_nested_list(MAX_JSON_DEPTH + 1))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_json",
    )
    assert f"nests deeper than {MAX_JSON_DEPTH} levels" in message
    assert await all_streams(cluster) == before


def _varint(number: int) -> bytes:
    out = b""
    while number > 0x7F:
        out += bytes([number & 0x7F | 0x80])
        number >>= 7
    return out + bytes([number])


def _field(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _varint(len(body)) + body


def _list_value_bytes(levels: int) -> bytes:
    """A google.protobuf.Value of `levels` nested lists, encoded by hand (protobuf will not build it)."""
    value = b"\x11" + bytes(8)  # number_value = 0.0
    for _ in range(levels):
        value = _field(0x32, _field(0x0A, value))  # Value.list_value { values: value }
    return value


async def test_json_nested_hundreds_of_levels_deep_is_refused_and_writes_nothing(cluster: Cluster) -> None:
    start = engine_pb2.StartRunRequest(op=ECHO).SerializeToString() + _field(0x1A, _list_value_bytes(300))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.engine.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/keel.engine.v1.EngineService/StartRun", None, None)(start)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nests past protobuf's 100 levels" in (caught.value.details() or "")
    assert await all_streams(cluster) == []


@pytest.mark.parametrize(
    "wait",
    [
        duration_pb2.Duration(seconds=10**12),
        duration_pb2.Duration(seconds=315_576_000_001),
        duration_pb2.Duration(seconds=1, nanos=2_000_000_000),
        duration_pb2.Duration(seconds=-1),
    ],
    ids=["1e12 s", "one past the range", "nanos past a second", "negative"],
)
async def test_await_run_timeout_outside_durations_range_is_invalid_argument(
    cluster: Cluster, wait: duration_pb2.Duration
) -> None:
    run = await cluster.stub.StartRun(engine_pb2.StartRunRequest(op=ECHO, wait=True))
    before = await all_streams(cluster)
    message = await expect_error(
        cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run.run_id, timeout=wait)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_argument",
    )
    assert message.startswith("timeout ")
    assert await all_streams(cluster) == before


async def test_retry_backoff_beyond_durations_range_and_a_nan_multiplier_are_invalid_argument(
    cluster: Cluster,
) -> None:
    for policy in (
        engine_pb2.RetryPolicy(max_backoff=duration_pb2.Duration(seconds=10**13)),
        engine_pb2.RetryPolicy(multiplier=math.nan),
        engine_pb2.RetryPolicy(multiplier=math.inf),
    ):
        request = engine_pb2.StartRunRequest(op=ECHO, run_config=engine_pb2.RunConfig(retry_policy=policy))
        await expect_error(
            cluster.stub.StartRun(request), grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"
        )
    assert await all_streams(cluster) == []


SECRET_KEYS = [
    "DB_PASSWORD=hunter2-very-secret",
    "STRIPE_API_KEY=hunter2-very-secret",
    "client_secret=hunter2-very-secret",
    "app.private_key: hunter2-very-secret",
    "password=hunter2-very-secret",
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_underscore_joined_credential_names_look_like_secrets(key: str) -> None:
    assert looks_like_secret(key)


@pytest.mark.parametrize("key", ["fetch_user:42", "password_reset_email:42", "secretary-of-state", "page:2"])
def test_ordinary_fact_keys_do_not_look_like_secrets(key: str) -> None:
    assert not looks_like_secret(key)


@pytest.mark.parametrize(
    ("key", "reason"),
    [*((key, "secrets_detected") for key in SECRET_KEYS), ("k" * 5000, "fact_key_too_long")],
    ids=[*SECRET_KEYS, "5000 characters"],
)
async def test_bad_fact_keys_of_a_spawn_are_refused_and_write_nothing(
    cluster: Cluster, key: str, reason: str
) -> None:
    parent = await parent_run(cluster)
    before = await all_streams(cluster)
    message = await expect_error(
        cluster.stub.SpawnChild(spawn(parent, key)), grpc.StatusCode.INVALID_ARGUMENT, reason
    )
    assert "hunter2" not in message and key not in message
    assert await all_streams(cluster) == before


@pytest.mark.parametrize(
    ("key", "reason"),
    [*((key, "secrets_detected") for key in SECRET_KEYS), ("k" * 5000, "fact_key_too_long")],
    ids=[*SECRET_KEYS, "5000 characters"],
)
async def test_bad_fact_keys_of_an_io_call_fail_the_run_and_are_never_recorded(
    cluster: Cluster, key: str, reason: str
) -> None:
    call = step("io", "keel.io_call", {"namespace": "keel.echo", "request": 1, "fact_key": key})
    run = (await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=pipeline(call), wait=True))).run
    assert run.status == engine_pb2.RUN_STATUS_FAILED and run.error.code == reason
    assert run.error.category == "invalid_argument"
    events = await cluster.store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run.run_id}"))
    assert [e.type for e in events.events] == [
        "RunStarted",
        "StepAttemptStarted",
        "StepAttemptFailed",
        "RunCompleted",
    ]
    assert all(b"hunter2" not in e.payload and key.encode() not in e.payload for e in events.events)


async def test_a_fact_key_of_the_longest_length_is_accepted(cluster: Cluster) -> None:
    parent = await parent_run(cluster)
    spawned = await cluster.stub.SpawnChild(spawn(parent, "k" * MAX_FACT_KEY_CHARS))
    assert spawned.child_run_id


async def test_list_runs_by_pending_names_the_accepted_statuses(cluster: Cluster) -> None:
    await cluster.stub.StartRun(engine_pb2.StartRunRequest(op=ECHO, wait=True))
    for status in (engine_pb2.RUN_STATUS_PENDING, engine_pb2.RUN_STATUS_UNSPECIFIED, 99):
        message = await expect_error(
            cluster.stub.ListRuns(engine_pb2.ListRunsRequest(statuses=[status])),  # type: ignore[list-item]
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_argument",
        )
        accepted = "RUN_STATUS_RUNNING, RUN_STATUS_COMPLETED, RUN_STATUS_FAILED, RUN_STATUS_CANCELED"
        assert f"accepted statuses: {accepted}" in message
    message = await expect_error(
        cluster.stub.ListRuns(engine_pb2.ListRunsRequest(statuses=[engine_pb2.RUN_STATUS_PENDING])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_argument",
    )
    assert "never started" in message


async def test_an_op_output_nested_too_deeply_fails_the_attempt_and_getrun_still_answers(
    cluster: Cluster,
) -> None:
    run = (
        await cluster.stub.StartRun(
            engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="test.deep_output"), wait=True)
        )
    ).run
    assert run.status == engine_pb2.RUN_STATUS_FAILED
    assert run.error.code == "op_output_invalid" and "nests deeper" in run.error.message
    got = await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run.run_id))
    assert got.run.status == engine_pb2.RUN_STATUS_FAILED


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH])
async def test_an_output_the_context_cannot_hold_fails_the_step_and_the_run_still_answers(
    cluster: Cluster, depth: int
) -> None:
    # The run's context holds a step's output one level down and goes out as one value (the final
    # snapshot of every answer): an output as deep as a value may be fails its step, where the run
    # used to complete with an answer that could not be sent (invalid_json on StartRun and GetRun).
    config = to_value({"depth": depth})
    request = engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="test.nested_output", op_config=config), wait=True
    )
    run = (await cluster.stub.StartRun(request)).run
    got = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run.run_id))).run
    if depth < MAX_JSON_DEPTH:
        assert run.status == got.status == engine_pb2.RUN_STATUS_COMPLETED
        assert run.steps[0].output == got.steps[0].output == _nested_list(depth)
    else:
        assert run.status == got.status == engine_pb2.RUN_STATUS_FAILED
        assert run.error.code == "op_output_invalid"
        assert "cannot be kept in the run's context" in run.error.message
        assert f"an output nests at most {MAX_JSON_DEPTH - 1} levels" in run.error.message
        assert not run.error.retryable and len(run.steps[0].attempts) == 1
        assert f"nests deeper than {MAX_JSON_DEPTH - 1} levels" in run.error.message


async def test_a_transport_answer_that_breaks_the_json_rule_fails_the_attempt(cluster: Cluster) -> None:
    answer_too_big = {"namespace": "test.big_int", "request": None, "fact_key": "n"}
    run = (
        await cluster.stub.StartRun(
            engine_pb2.StartRunRequest(
                op=engine_pb2.SingleOp(op_id="keel.io_call", op_config=to_value(answer_too_big)), wait=True
            )
        )
    ).run
    assert run.status == engine_pb2.RUN_STATUS_FAILED
    assert run.error.code == "transport_response_invalid" and "2**53" in run.error.message
    # GetRun shows it: nothing stored breaks the wire.
    got = await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run.run_id))
    assert got.run.status == engine_pb2.RUN_STATUS_FAILED
    assert uuid.UUID(got.run.run_id)
