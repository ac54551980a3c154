"""The wire form of KeelError: a status whose reason survives however long the message is."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from keel.store.v1 import store_pb2, store_pb2_grpc

from keel_core.errors import ErrorCategory, KeelError
from keel_core.servicer_errors import translated, translated_stream
from keel_core.status import MAX_MESSAGE_CHARS, from_rpc_error, to_rpc_status
from store_service.server import StoreConfig, start_store

Context = grpc.aio.ServicerContext[Any, Any]


def test_long_message_and_details_are_bounded_and_keep_the_reason() -> None:
    error = KeelError(
        "op_failed", "boom " * 10_000, category=ErrorCategory.FAILED_PRECONDITION, details={"x": "y" * 9000}
    )
    status = to_rpc_status(error)
    assert len(status.message) <= MAX_MESSAGE_CHARS
    assert status.message.endswith("(truncated)")
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]


async def test_a_huge_bad_request_still_gets_its_status_and_reason(tmp_path: Path) -> None:
    """A message quoting a 1 MB bad value must not turn into RESOURCE_EXHAUSTED on the client."""
    handle = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            try:
                await stub.HeadSeq(store_pb2.HeadSeqRequest(stream_id="s" * 1_000_000))
            except grpc.aio.AioRpcError as failure:
                assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert from_rpc_error(failure).code == "invalid_stream_id"
            else:
                raise AssertionError("an oversized stream id was accepted")
    finally:
        await handle.drain(grace=1.0)


class _Flaky:
    """A servicer whose handlers fail in the ways the decorators must translate."""

    @translated
    async def Refuse(self, request: bytes, context: Context) -> bytes:
        raise KeelError("no_way", "refused", category=ErrorCategory.FAILED_PRECONDITION, details={"k": "v"})

    @translated
    async def Crash(self, request: bytes, context: Context) -> bytes:
        raise ValueError("a bug")

    @translated_stream
    async def Trickle(self, request: bytes, context: Context) -> AsyncIterator[bytes]:
        yield b"first"
        raise KeelError("gone", "the source went away", category=ErrorCategory.UNAVAILABLE)


def _same(data: bytes) -> bytes:
    return data


async def _serve(servicer: _Flaky) -> tuple[grpc.aio.Server, int]:
    handlers = {
        "Refuse": grpc.unary_unary_rpc_method_handler(servicer.Refuse, _same, _same),
        "Crash": grpc.unary_unary_rpc_method_handler(servicer.Crash, _same, _same),
        "Trickle": grpc.unary_stream_rpc_method_handler(servicer.Trickle, _same, _same),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Flaky", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_translated_handlers_answer_with_the_errors_status_and_reason() -> None:
    server, port = await _serve(_Flaky())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary("/test.Flaky/Refuse", _same, _same)(b"")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            error = from_rpc_error(refused.value)
            assert (error.code, error.details) == ("no_way", {"k": "v"})

            with pytest.raises(grpc.aio.AioRpcError) as crashed:
                await channel.unary_unary("/test.Flaky/Crash", _same, _same)(b"")
            assert crashed.value.code() == grpc.StatusCode.INTERNAL
            assert from_rpc_error(crashed.value).code == "internal"
            assert "Crash failed: ValueError: a bug" in (crashed.value.details() or "")

            received: list[bytes] = []
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                async for message in channel.unary_stream("/test.Flaky/Trickle", _same, _same)(b""):
                    received.append(message)
            assert received == [b"first"]
            assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
            assert from_rpc_error(gone.value).code == "gone"
    finally:
        await server.stop(None)
