"""The client's pieces that need no engine: request building, error classes, JSON output, retry config.

The retry tests serve a deliberately unhealthy EngineService (it answers UNAVAILABLE a set number of
times) from a real grpc.aio server: they pin the client's retry behaviour, not the engine's.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel_client import (
    AsyncKeelClient,
    InvalidArgument,
    KeelClient,
    KeelClientError,
    NotFoundError,
    PipelineSpec,
    RunNotFound,
    StepSpec,
    StoreUnavailable,
    UnavailableError,
    UnimplementedError,
    error_class,
    to_json_data,
    wire,
)
from keel_client.channel import SERVICE_CONFIG

from keel_core.errors import ErrorCategory, KeelError
from keel_core.json_values import from_value
from keel_core.serving import start_server
from keel_core.status import abort_with


def test_pipeline_dict_becomes_the_proto_pipeline() -> None:
    message = wire.pipeline_message(
        {
            "pipeline_id": "p",
            "steps": [
                {"step_id": "a", "op_id": "keel.echo", "op_config": {"k": [1, 2.5, None]}},
                {
                    "stepId": "b",
                    "opId": "keel.sleep",
                    "opVersion": "2",
                    "dependsOn": ["a"],
                    "op_config": None,
                },
            ],
        }
    )
    assert message.pipeline_id == "p"
    assert [step.step_id for step in message.steps] == ["a", "b"]
    assert from_value(message.steps[0].op_config) == {"k": [1, 2.5, None]}
    assert list(message.steps[1].depends_on) == ["a"]
    assert message.steps[1].op_version == "2"
    assert not message.steps[1].HasField("op_config")


def test_pipeline_spec_and_dict_build_the_same_message() -> None:
    spec = PipelineSpec(
        "p", [StepSpec("a", "keel.echo", op_config={"x": 1}), StepSpec("b", "x", depends_on=["a"])]
    )
    assert wire.pipeline_message(spec) == wire.pipeline_message(spec.to_dict())


@pytest.mark.parametrize(
    ("pipeline", "fragment"),
    [
        ({"pipeline_id": "p", "steps": [{"step_id": "a", "unknown": 1}]}, "unknown"),
        ({"pipeline_id": "p", "steps": "nope"}, "Pipeline"),
        (["not", "an", "object"], "object"),
        ({"pipeline_id": "p", "steps": [{"step_id": "a", "op_config": {"n": 2**60}}]}, "2**53"),
    ],
)
def test_malformed_pipeline_is_an_invalid_argument_naming_the_problem(pipeline: Any, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        wire.pipeline_message(pipeline)
    assert fragment in caught.value.message


def test_start_run_request_picks_a_fresh_run_id_only_when_none_is_given() -> None:
    def request(run_id: str | None) -> engine_pb2.StartRunRequest:
        return wire.start_run_request(
            None, op="keel.echo", op_version="", op_config=None, input=None, context=None,
            run_config=None, run_id=run_id, wait=False,
        )  # fmt: skip

    assert request("given").run_id == "given"
    picked = {request(None).run_id for _ in range(3)}
    assert len(picked) == 3
    assert {uuid.UUID(run_id).version for run_id in picked} == {7}  # keel_core.ids: in creation order


def test_start_run_request_refuses_both_or_neither_target() -> None:
    with pytest.raises(InvalidArgument, match="exactly one"):
        wire.start_run_request(
            None, op=None, op_version="", op_config=None, input=None, context=None,
            run_config=None, run_id=None, wait=False,
        )  # fmt: skip


def test_run_config_dict_sets_retry_policy_durations() -> None:
    config = wire.run_config_message(
        {
            "execution_mode": "replay",
            "replay_of_run_id": "r",
            "retry_policy": {"max_attempts": 4, "initial_backoff": 0.25},
        }
    )
    assert config is not None
    assert config.execution_mode == engine_pb2.EXECUTION_MODE_REPLAY
    assert config.retry_policy.max_attempts == 4
    assert config.retry_policy.initial_backoff.ToNanoseconds() == 250_000_000
    assert not config.retry_policy.HasField("max_backoff")
    with pytest.raises(InvalidArgument, match="unknown fields"):
        wire.run_config_message({"retries": 3})


def test_error_class_prefers_the_reason_then_the_status_code() -> None:
    assert error_class("run_not_found", grpc.StatusCode.NOT_FOUND) is RunNotFound
    assert error_class("something_new", grpc.StatusCode.NOT_FOUND) is NotFoundError
    assert error_class("something_new", grpc.StatusCode.UNIMPLEMENTED) is UnimplementedError
    assert error_class("something_new", None) is KeelClientError
    assert issubclass(StoreUnavailable, UnavailableError)


def test_to_json_data_gives_plain_json() -> None:
    run = wire.run(engine_pb2.Run(run_id="r", status=engine_pb2.RUN_STATUS_COMPLETED, head_seq=3))
    data = to_json_data(run)
    assert json.loads(json.dumps(data)) == data
    assert data["status"] == "completed" and data["steps"] == [] and data["created_at"] is None
    assert to_json_data(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"


def test_service_config_retries_only_unavailable_for_the_engine_service() -> None:
    (method,) = SERVICE_CONFIG["methodConfig"]
    assert method["name"] == [{"service": "keel.engine.v1.EngineService"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


# ---- retries against a real server that is unavailable a set number of times --------------------


@dataclass
class Flaky:
    """How many more ListOps calls fail, and with what."""

    failures_left: int
    error: KeelError
    calls: int = 0
    run_ids: list[str] = field(default_factory=list)


class FlakyEngine(engine_pb2_grpc.EngineServiceServicer):
    """Answers ListOps with UNAVAILABLE `failures_left` times, then with one op."""

    def __init__(self, flaky: Flaky) -> None:
        self.flaky = flaky

    async def ListOps(self, request: Any, context: Any) -> engine_pb2.ListOpsResponse:
        self.flaky.calls += 1
        if self.flaky.failures_left > 0:
            self.flaky.failures_left -= 1
            await abort_with(context, self.flaky.error)
        return engine_pb2.ListOpsResponse(ops=[engine_pb2.OpInfo(op_id="keel.echo", op_version="1")])

    async def StartRun(
        self, request: engine_pb2.StartRunRequest, context: Any
    ) -> engine_pb2.StartRunResponse:
        self.flaky.calls += 1
        self.flaky.run_ids.append(request.run_id)
        if self.flaky.failures_left > 0:
            self.flaky.failures_left -= 1
            await abort_with(context, self.flaky.error)
        return engine_pb2.StartRunResponse(run_id=request.run_id, manifest_id="sha256:m", created=True)


STORE_DOWN = KeelError(
    "store_unavailable", "store at x is down", category=ErrorCategory.UNAVAILABLE, retryable=True
)


@pytest.fixture
async def flaky_engine() -> AsyncIterator[tuple[Flaky, str]]:
    flaky = Flaky(failures_left=0, error=STORE_DOWN)

    def register(server: grpc.aio.Server) -> list[str]:
        # Only ListOps is served; the other RPCs answer UNIMPLEMENTED, as the base class does.
        engine_pb2_grpc.add_EngineServiceServicer_to_server(FlakyEngine(flaky), server)  # type: ignore[abstract]
        return [engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name]

    handle = await start_server("127.0.0.1:0", register)
    try:
        yield flaky, f"127.0.0.1:{handle.port}"
    finally:
        await handle.drain(0)


async def test_async_client_retries_unavailable_until_it_succeeds(flaky_engine: tuple[Flaky, str]) -> None:
    flaky, address = flaky_engine
    flaky.failures_left = 2
    async with AsyncKeelClient(address) as keel:
        ops = await keel.list_ops()
    assert [op.op_id for op in ops] == ["keel.echo"]
    assert flaky.calls == 3


async def test_sync_client_retries_unavailable_until_it_succeeds(flaky_engine: tuple[Flaky, str]) -> None:
    flaky, address = flaky_engine
    flaky.failures_left = 3

    def call() -> int:
        with KeelClient(address) as keel:
            return len(keel.list_ops())

    assert await asyncio.to_thread(call) == 1
    assert flaky.calls == 4


async def test_retries_give_up_with_the_typed_error(flaky_engine: tuple[Flaky, str]) -> None:
    flaky, address = flaky_engine
    flaky.failures_left = 100
    async with AsyncKeelClient(address) as keel:
        with pytest.raises(StoreUnavailable) as caught:
            await keel.list_ops()
    assert caught.value.retryable
    assert caught.value.message == "store at x is down"
    assert flaky.calls == 5


async def test_without_retries_the_first_unavailable_is_raised(flaky_engine: tuple[Flaky, str]) -> None:
    flaky, address = flaky_engine
    flaky.failures_left = 1
    async with AsyncKeelClient(address, retries=False) as keel:
        with pytest.raises(StoreUnavailable):
            await keel.list_ops()
    assert flaky.calls == 1


async def test_an_unimplemented_rpc_raises_unimplemented(flaky_engine: tuple[Flaky, str]) -> None:
    _, address = flaky_engine
    async with AsyncKeelClient(address) as keel:
        with pytest.raises(UnimplementedError):
            await keel.get_run("r")


async def test_a_retried_start_sends_the_same_client_chosen_run_id(flaky_engine: tuple[Flaky, str]) -> None:
    flaky, address = flaky_engine
    flaky.failures_left = 2
    async with AsyncKeelClient(address) as keel:
        started = await keel.start_run(op="keel.echo")
    assert flaky.calls == 3
    assert flaky.run_ids == [started.run_id] * 3
