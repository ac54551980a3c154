"""The store's cap on one artifact's size (--max-artifact-bytes), through a real StoreService.

Each test runs on SQLite and on PostgreSQL, and looks at the tables on a connection of its own to
check that a refused upload left nothing behind: no artifact row and no chunk row.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from keel.store.v1 import store_pb2, store_pb2_grpc

from store_service.server import StoreConfig, start_store
from store_service.sqlite import DATABASE_FILE
from tests.store.conftest import CLIENT_OPTIONS, error_info
from tests.store.postgres_schemas import fresh_schema, postgres_artifact_rows
from tests.store.store_process import StoreProcess

if TYPE_CHECKING:
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

pb = store_pb2
KiB = 1024
MiB = 1024 * KiB
# Guards against a hang only (an upload the store would wait out to its end); never a measurement.
HANG_GUARD_S = 60


def sha(data: bytes) -> str:
    """The content address of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class CappedStore:
    """A running store with a cap, a stub on it, and a way to count its artifact and chunk rows."""

    stub: StoreServiceAsyncStub
    count_rows: Callable[[], Awaitable[tuple[int, int]]]


OpenStore = Callable[[int], Awaitable[CappedStore]]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_name(request: pytest.FixtureRequest) -> str:
    """Which backend the store runs on; PostgreSQL's DSN is resolved here, outside the event loop."""
    if request.param == "postgres":
        request.getfixturevalue("postgres_dsn")
    return str(request.param)


@pytest.fixture
async def open_store(
    backend_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[OpenStore]:
    """Starts a StoreService on 127.0.0.1:0 with the given cap; everything is stopped after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(cap: int) -> CappedStore:
            if backend_name == "postgres":
                dsn: str = request.getfixturevalue("postgres_dsn")
                schema = await stack.enter_async_context(fresh_schema(dsn))
                config = StoreConfig(
                    listen="127.0.0.1:0",
                    backend="postgres",
                    dsn=dsn,
                    pg_schema=schema,
                    max_artifact_bytes=cap,
                )
                count_rows = _postgres_counter(dsn, schema)
            else:
                data_dir = tmp_path / "data"
                config = StoreConfig(listen="127.0.0.1:0", data_dir=data_dir, max_artifact_bytes=cap)
                count_rows = _sqlite_counter(data_dir / DATABASE_FILE)
            handle = await start_store(config)
            stack.push_async_callback(handle.drain, 1.0)
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}", options=CLIENT_OPTIONS)
            )
            return CappedStore(store_pb2_grpc.StoreServiceStub(channel), count_rows)

        yield start


def _sqlite_counter(path: Path) -> Callable[[], Awaitable[tuple[int, int]]]:
    async def count() -> tuple[int, int]:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            artifacts = conn.execute("SELECT count(*) FROM artifacts").fetchone()[0]
            chunks = conn.execute("SELECT count(*) FROM artifact_chunks").fetchone()[0]
        return int(artifacts), int(chunks)

    return count


def _postgres_counter(dsn: str, schema: str) -> Callable[[], Awaitable[tuple[int, int]]]:
    async def count() -> tuple[int, int]:
        return await postgres_artifact_rows(dsn, schema)

    return count


async def put(stub: StoreServiceAsyncStub, data: bytes, chunk: int) -> store_pb2.PutArtifactResponse:
    """PutArtifact of `data` in messages of `chunk` bytes (kind on the first)."""

    async def requests() -> AsyncIterator[store_pb2.PutArtifactRequest]:
        for start in range(0, len(data), chunk):
            yield pb.PutArtifactRequest(kind="blob" if start == 0 else "", data=data[start : start + chunk])

    return await stub.PutArtifact(requests())


def assert_refused(error: grpc.aio.AioRpcError, cap: int, seen: int) -> None:
    """RESOURCE_EXHAUSTED `artifact_too_large`, with the cap, the bytes seen and the flag to raise it."""
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    info = error_info(error)
    assert info.reason == "artifact_too_large"
    assert info.metadata["category"] == "resource_exhausted"
    assert info.metadata["retryable"] == "false"
    assert (info.metadata["max_artifact_bytes"], info.metadata["seen_bytes"]) == (str(cap), str(seen))
    message = error.details() or ""
    for fact in (f"{cap} bytes", f"{seen} bytes", "--max-artifact-bytes", "KEEL_STORE_MAX_ARTIFACT_BYTES"):
        assert fact in message, f"{fact!r} missing from {message!r}"


REFUSALS = [
    # 3 MiB against a 1 MiB cap: refused at 1.25 MiB, before any backend has written a chunk.
    pytest.param(1 * MiB, 256 * KiB, 3 * MiB, id="1MiB-cap-3MiB-in-256KiB"),
    # 9 MiB against a 5 MiB cap: both backends have written chunk rows by the time it is refused
    # (SQLite commits staged chunks every 4 MiB; PostgreSQL inserts each 1 MiB in the upload's
    # transaction), so this is the case where something must be taken back.
    pytest.param(5 * MiB, 1 * MiB, 9 * MiB, id="5MiB-cap-9MiB-in-1MiB"),
]


@pytest.mark.parametrize(("cap", "chunk", "total"), REFUSALS)
async def test_upload_past_the_cap_is_refused_at_once_and_leaves_nothing(
    open_store: OpenStore, cap: int, chunk: int, total: int
) -> None:
    store = await open_store(cap)
    data = os.urandom(total)
    passing = (cap // chunk + 1) * chunk  # the running total of the first message past the cap
    call_ended = asyncio.Event()
    sent = 0

    async def requests() -> AsyncIterator[store_pb2.PutArtifactRequest]:
        nonlocal sent
        for start in range(0, total, chunk):
            if start == passing:
                # Everything up to the first message past the cap is sent; the rest only once the
                # call has ended. A store that read the whole upload before refusing would hang here.
                await call_ended.wait()
                return
            sent = start + chunk
            yield pb.PutArtifactRequest(kind="blob" if start == 0 else "", data=data[start : start + chunk])

    call = store.stub.PutArtifact(requests())
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call, HANG_GUARD_S)
    finally:
        call_ended.set()
    assert sent == passing < total
    assert_refused(caught.value, cap, passing)
    has = await store.stub.HasArtifact(pb.HasArtifactRequest(artifact_id=sha(data)))
    assert not has.exists
    assert await store.count_rows() == (0, 0)
    # The store goes on serving: an upload of exactly the cap is stored.
    small = os.urandom(cap)
    stored = await put(store.stub, small, chunk)
    assert (stored.artifact_id, stored.size, stored.created) == (sha(small), cap, True)
    artifacts, _ = await store.count_rows()
    assert artifacts == 1


async def test_upload_exactly_at_the_cap_is_stored_and_one_byte_more_is_not(open_store: OpenStore) -> None:
    cap = 1 * MiB
    store = await open_store(cap)
    at_cap = os.urandom(cap)
    stored = await put(store.stub, at_cap, 256 * KiB)
    assert (stored.artifact_id, stored.size, stored.created) == (sha(at_cap), cap, True)
    got = [m async for m in store.stub.GetArtifact(pb.GetArtifactRequest(artifact_id=sha(at_cap)))]
    assert b"".join(m.data for m in got) == at_cap
    assert await store.count_rows() == (1, 1)

    over = os.urandom(cap + 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await put(store.stub, over, 256 * KiB)
    assert_refused(caught.value, cap, cap + 1)
    assert await store.count_rows() == (1, 1)


async def test_inline_artifact_past_the_cap_is_refused_by_the_same_rule(open_store: OpenStore) -> None:
    cap = 1 * MiB
    store = await open_store(cap)
    over = os.urandom(cap + 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await store.stub.AppendEvents(
            pb.AppendEventsRequest(
                stream_id="run",
                expected_kind=pb.EXPECTED_KIND_NO_STREAM,
                events=[pb.EventData(type="Checkpoint", payload=b"{}")],
                artifacts=[
                    pb.InlineArtifact(kind="ok", data=b"small"),
                    pb.InlineArtifact(kind="big", data=over),
                ],
            )
        )
    assert_refused(caught.value, cap, cap + 1)
    assert "artifacts[1]" in (caught.value.details() or "")
    head = await store.stub.HeadSeq(pb.HeadSeqRequest(stream_id="run"))
    assert head.head_seq == 0
    assert await store.count_rows() == (0, 0)

    at_cap = os.urandom(cap)
    appended = await store.stub.AppendEvents(
        pb.AppendEventsRequest(
            stream_id="run",
            expected_kind=pb.EXPECTED_KIND_NO_STREAM,
            events=[pb.EventData(type="Checkpoint", payload=b"{}")],
            artifacts=[pb.InlineArtifact(kind="big", data=at_cap)],
        )
    )
    assert list(appended.artifact_ids) == [sha(at_cap)]
    assert await store.count_rows() == (1, 1)


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
async def test_zero_means_no_cap(open_store: OpenStore) -> None:
    store = await open_store(0)
    data = os.urandom(3 * MiB)
    stored = await put(store.stub, data, 256 * KiB)
    assert (stored.size, stored.created) == (len(data), True)


def test_store_service_reads_the_cap_from_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real command: KEEL_STORE_MAX_ARTIFACT_BYTES reaches the running store."""
    monkeypatch.setenv("KEEL_STORE_MAX_ARTIFACT_BYTES", str(MiB))
    process = StoreProcess(tmp_path / "data")
    try:

        async def over_the_cap() -> grpc.aio.AioRpcError:
            async with grpc.aio.insecure_channel(process.address) as channel:
                stub = store_pb2_grpc.StoreServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await put(stub, os.urandom(2 * MiB), 512 * KiB)
                return caught.value

        error = asyncio.run(over_the_cap())
        assert_refused(error, MiB, MiB + 512 * KiB)
        assert process.terminate() == 0
    finally:
        process.close()
