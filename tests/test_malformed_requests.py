"""Undecodable request bytes on every RPC of both services: INVALID_ARGUMENT `malformed_request`.

The bytes go out through a channel's raw multicallables (no serializer), so they reach the server
exactly as sent. Each call must fail with ErrorInfo, write nothing, and log no traceback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from keel.engine.v1 import engine_pb2
from keel.store.v1 import store_pb2, store_pb2_grpc

from engine_service import EngineConfig, start_engine
from engine_service.domain import artifact_id_for_bytes
from keel_core.status import from_rpc_error
from store_service.server import StoreConfig, start_store

if TYPE_CHECKING:
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

# Field 1, length-delimited, with a length far beyond the bytes sent: no message decodes it.
GARBAGE = b"\x0a\xff\xff\xff\xff\x0f"
ENGINE_METHODS = list(engine_pb2.DESCRIPTOR.services_by_name["EngineService"].methods)
STORE_METHODS = list(store_pb2.DESCRIPTOR.services_by_name["StoreService"].methods)


def _raw_call(channel: grpc.aio.Channel, method: MethodDescriptor, messages: list[bytes]) -> Any:
    """The call of `method` with `messages` as raw request bytes (one, or a stream of them)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.client_streaming:
        requests = iter(messages)
        if method.server_streaming:
            return channel.stream_stream(path, None, None)(requests)
        return channel.stream_unary(path, None, None)(requests)
    if method.server_streaming:
        return channel.unary_stream(path, None, None)(messages[0])
    return channel.unary_unary(path, None, None)(messages[0])


async def _outcome(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if isinstance(call, grpc.aio.UnaryStreamCall | grpc.aio.StreamStreamCall):
            async for _ in call:
                pass
        else:
            await call
    return caught.value


async def _streams(store: StoreServiceAsyncStub) -> dict[str, int]:
    """Every stream but the engines' heartbeat records (which move on their own), with its head."""
    page = await store.ListStreams(store_pb2.ListStreamsRequest(page_size=1000))
    return {s.stream_id: s.head_seq for s in page.streams if not s.stream_id.startswith("engine")}


@pytest.fixture
async def channels(tmp_path: Path) -> AsyncIterator[tuple[grpc.aio.Channel, grpc.aio.Channel]]:
    """(engine channel, store channel) to a real store and engine in this process."""
    store = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "store"))
    engine = await start_engine(
        EngineConfig(listen="127.0.0.1:0", store=f"127.0.0.1:{store.port}", failpoints="")
    )
    engine_channel = grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}")
    store_channel = grpc.aio.insecure_channel(f"127.0.0.1:{store.port}")
    try:
        yield engine_channel, store_channel
    finally:
        await engine_channel.close(grace=None)
        await store_channel.close(grace=None)
        await engine.drain(0.5)
        await store.drain(0.5)


def _assert_malformed(error: grpc.aio.AioRpcError, method: MethodDescriptor) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, error.details())
    info = from_rpc_error(error)  # rebuilt from the ErrorInfo: its reason, not the status code name
    assert info.code == "malformed_request", (method.name, error.details())
    assert info.details["message_type"] == method.input_type.full_name
    assert method.input_type.full_name in (error.details() or "")


async def test_garbage_bytes_on_every_rpc_of_both_services_are_malformed_request(
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    engine_channel, store_channel = channels
    store: StoreServiceAsyncStub = store_pb2_grpc.StoreServiceStub(store_channel)
    before = await _streams(store)
    caplog.set_level(logging.DEBUG)
    for channel, methods in ((engine_channel, ENGINE_METHODS), (store_channel, STORE_METHODS)):
        for method in methods:
            _assert_malformed(await _outcome(_raw_call(channel, method, [GARBAGE])), method)
    assert await _streams(store) == before
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


async def test_a_garbage_message_after_good_ones_in_a_request_stream_is_malformed_request(
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    _, store_channel = channels
    put = store_pb2.DESCRIPTOR.services_by_name["StoreService"].methods_by_name["PutArtifact"]
    first = store_pb2.PutArtifactRequest(kind="blob", data=b"abc").SerializeToString()
    caplog.set_level(logging.DEBUG)
    _assert_malformed(await _outcome(_raw_call(store_channel, put, [first, GARBAGE])), put)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    # The upload was abandoned: the first chunk alone was not stored as an artifact.
    store: StoreServiceAsyncStub = store_pb2_grpc.StoreServiceStub(store_channel)
    found = await store.HasArtifact(store_pb2.HasArtifactRequest(artifact_id=artifact_id_for_bytes(b"abc")))
    assert not found.exists


async def test_health_and_reflection_refuse_garbage_too(
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel],
) -> None:
    engine_channel, _ = channels
    error = await _outcome(engine_channel.unary_unary("/grpc.health.v1.Health/Check", None, None)(GARBAGE))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(error).code == "malformed_request"
