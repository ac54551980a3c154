"""Durability end to end: kill -9 a real store-service, restart it, find every acknowledged write."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from keel.store.v1 import store_pb2, store_pb2_grpc

from tests.store.store_process import StoreProcess

pb = store_pb2


@pytest.fixture
def processes() -> Iterator[list[StoreProcess]]:
    """Processes started by the test; any still alive at the end is killed."""
    started: list[StoreProcess] = []
    yield started
    for process in started:
        process.close()


async def _put(stub: store_pb2_grpc.StoreServiceAsyncStub, data: bytes) -> str:
    async def requests() -> AsyncIterator[store_pb2.PutArtifactRequest]:
        for i in range(0, len(data), 1024 * 1024):
            yield pb.PutArtifactRequest(kind="blob" if i == 0 else "", data=data[i : i + 1024 * 1024])

    response = await stub.PutArtifact(requests())
    return response.artifact_id


async def test_acknowledged_appends_and_artifacts_survive_sigkill(
    tmp_path: Path, processes: list[StoreProcess]
) -> None:
    data_dir = tmp_path / "data"
    first = StoreProcess(data_dir)
    processes.append(first)
    acknowledged: dict[str, list[tuple[int, str, bytes]]] = {}
    stop = asyncio.Event()
    enough = asyncio.Event()
    artifact = os.urandom(3 * 1024 * 1024 + 5)

    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        artifact_id = await _put(stub, artifact)

        async def writer(stream: str) -> None:
            head = 0
            mine = acknowledged.setdefault(stream, [])
            while not stop.is_set():
                payload = json.dumps({"stream": stream, "n": head}).encode()
                try:
                    result = await stub.AppendEvents(
                        pb.AppendEventsRequest(
                            stream_id=stream,
                            expected_kind=pb.EXPECTED_KIND_EXACT,
                            expected_seq=head,
                            events=[pb.EventData(type="Tick", payload=payload)],
                            status=pb.STREAM_STATUS_ACTIVE,
                        )
                    )
                except grpc.aio.AioRpcError:
                    return  # the store died under us: this append was never acknowledged
                assert result.first_seq == head + 1
                head = result.head_seq
                mine.append((head, "Tick", payload))
                if sum(len(v) for v in acknowledged.values()) >= 400:
                    enough.set()

        writers = [asyncio.create_task(writer(f"stream-{i}")) for i in range(16)]
        await asyncio.wait_for(enough.wait(), 60)
        first.kill()  # mid-flight: appends are still being sent when the process dies
        stop.set()
        await asyncio.gather(*writers)

    total = sum(len(v) for v in acknowledged.values())
    assert total >= 400
    second = StoreProcess(data_dir)
    processes.append(second)
    async with grpc.aio.insecure_channel(second.address) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        for stream, acked in acknowledged.items():
            page = await stub.ReadEvents(pb.ReadEventsRequest(stream_id=stream, limit=10_000))
            stored = [(e.seq, e.type, e.payload) for e in page.events]
            # Every acknowledged event is there, in place; at most the one in-flight append may
            # have committed without its acknowledgement reaching us.
            assert stored[: len(acked)] == acked
            assert len(stored) - len(acked) in (0, 1)
        parts = [p async for p in stub.GetArtifact(pb.GetArtifactRequest(artifact_id=artifact_id))]
        got = b"".join(p.data for p in parts)
        assert hashlib.sha256(got).hexdigest() == artifact_id.removeprefix("sha256:")
        assert got == artifact
        listed = await stub.ListStreams(pb.ListStreamsRequest(statuses=[pb.STREAM_STATUS_ACTIVE]))
        assert len(listed.streams) == len(acknowledged)
    assert second.terminate() == 0


async def test_sigterm_drains_and_exits_zero(tmp_path: Path, processes: list[StoreProcess]) -> None:
    store = StoreProcess(tmp_path / "data")
    processes.append(store)
    async with grpc.aio.insecure_channel(store.address) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        await stub.AppendEvents(
            pb.AppendEventsRequest(
                stream_id="s", expected_kind=pb.EXPECTED_KIND_NO_STREAM, events=[pb.EventData(type="A")]
            )
        )
        subscription = stub.SubscribeEvents(pb.SubscribeEventsRequest(stream_id="s"))
        first = await subscription.read()
        assert isinstance(first, pb.SubscribeEventsResponse) and first.event.seq == 1
        assert store.terminate() == 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await subscription.read()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    log = store.stderr_text()
    assert "draining" in log and "stopped" in log
    restarted = StoreProcess(tmp_path / "data")
    processes.append(restarted)
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        head = await store_pb2_grpc.StoreServiceStub(channel).HeadSeq(pb.HeadSeqRequest(stream_id="s"))
        assert head.head_seq == 1
    assert restarted.terminate() == 0


async def test_acknowledged_appends_of_batches_survive_sigkill(
    tmp_path: Path, processes: list[StoreProcess]
) -> None:
    """Batches of appends to many streams, killed mid-flight: every append a batch acknowledged is
    stored, in place; of a batch whose answer was lost, each append committed whole or not at all."""
    data_dir = tmp_path / "data"
    first = StoreProcess(data_dir)
    processes.append(first)
    acknowledged: dict[str, list[tuple[int, str, bytes]]] = {}
    stop = asyncio.Event()
    enough = asyncio.Event()

    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)

        async def batcher(number: int) -> None:
            streams = [f"batcher-{number}-stream-{i}" for i in range(8)]
            heads = dict.fromkeys(streams, 0)
            while not stop.is_set():
                payloads = {s: json.dumps({"stream": s, "n": heads[s]}).encode() for s in streams}
                request = pb.AppendEventsBatchRequest(
                    appends=[
                        pb.AppendEventsRequest(
                            stream_id=s,
                            expected_kind=pb.EXPECTED_KIND_EXACT,
                            expected_seq=heads[s],
                            events=[pb.EventData(type="Tick", payload=payloads[s])] * 2,
                        )
                        for s in streams
                    ]
                )
                try:
                    answer = await stub.AppendEventsBatch(request)
                except grpc.aio.AioRpcError:
                    return  # the store died under us: this batch was never acknowledged
                for s, outcome in zip(streams, answer.outcomes, strict=True):
                    assert outcome.WhichOneof("outcome") == "appended", outcome
                    assert outcome.appended.first_seq == heads[s] + 1
                    heads[s] = outcome.appended.head_seq
                    acknowledged.setdefault(s, []).extend(
                        [(heads[s] - 1, "Tick", payloads[s]), (heads[s], "Tick", payloads[s])]
                    )
                if sum(len(v) for v in acknowledged.values()) >= 2000:
                    enough.set()

        batchers = [asyncio.create_task(batcher(n)) for n in range(8)]
        await asyncio.wait_for(enough.wait(), 120)
        first.kill()  # mid-flight: batches are still being sent when the process dies
        stop.set()
        await asyncio.gather(*batchers)

    second = StoreProcess(data_dir)
    processes.append(second)
    async with grpc.aio.insecure_channel(second.address) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        for stream, acked in acknowledged.items():
            page = await stub.ReadEvents(pb.ReadEventsRequest(stream_id=stream, limit=10_000))
            stored = [(e.seq, e.type, e.payload) for e in page.events]
            assert stored[: len(acked)] == acked
            # The one batch in flight may have committed unacknowledged: its whole append, not half.
            assert len(stored) - len(acked) in (0, 2)
    assert second.terminate() == 0
