"""The wire form of KeelError: a status whose reason survives however long the message is."""

from __future__ import annotations

from pathlib import Path

import grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from keel_core.errors import ErrorCategory, KeelError
from keel_core.status import MAX_MESSAGE_CHARS, from_rpc_error, to_rpc_status
from store_service.server import StoreConfig, start_store


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
