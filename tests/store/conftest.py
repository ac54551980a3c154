"""Fixtures for the store tests: an in-process StoreService, a stub, and ErrorInfo inspection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from keel.store.v1 import store_pb2_grpc

from store_service.server import StoreConfig, StoreServingHandle, start_store

if TYPE_CHECKING:
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

CLIENT_OPTIONS = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StoreServingHandle]:
    """A real StoreService on 127.0.0.1:0 over SQLite in tmp_path, drained after the test."""
    handle = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data"))
    yield handle
    await handle.drain(grace=1.0)


@pytest.fixture
async def stub(store: StoreServingHandle) -> AsyncIterator[StoreServiceAsyncStub]:
    """An async StoreService stub connected to the `store` fixture."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{store.port}", options=CLIENT_OPTIONS) as channel:
        yield store_pb2_grpc.StoreServiceStub(channel)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo in a failed call's status details (fails the test if absent)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status in {error!r}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {error!r}")
