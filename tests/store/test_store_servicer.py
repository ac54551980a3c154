"""StoreService over a real in-process grpc.aio server: every RPC, the bad-input table, big artifacts."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from keel.store.v1 import store_pb2, store_pb2_grpc

from keel_core.status import from_rpc_error
from store_service.server import StoreConfig, StoreServingHandle, start_store
from store_service.sqlite import SqliteStoreBackend
from tests.engine.processes import eventually
from tests.store.conftest import error_info
from tests.store.postgres_schemas import fresh_schema

if TYPE_CHECKING:
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

pb = store_pb2
MiB = 1024 * 1024


def ev(type_name: str, payload: bytes = b"{}") -> store_pb2.EventData:
    """One EventData."""
    return pb.EventData(type=type_name, payload=payload)


def append_request(
    stream_id: str = "s", kind: int = pb.EXPECTED_KIND_NO_STREAM, seq: int = 0, **fields: Any
) -> store_pb2.AppendEventsRequest:
    """An AppendEventsRequest with one event unless `events` is given."""
    fields.setdefault("events", [ev("Happened")])
    return pb.AppendEventsRequest(stream_id=stream_id, expected_kind=kind, expected_seq=seq, **fields)  # type: ignore[arg-type]


async def put_requests(kind: str, chunks: list[bytes]) -> AsyncIterator[store_pb2.PutArtifactRequest]:
    """A PutArtifact request stream: kind on the first message."""
    yield pb.PutArtifactRequest(kind=kind, data=chunks[0] if chunks else b"")
    for chunk in chunks[1:]:
        yield pb.PutArtifactRequest(data=chunk)


def sha(data: bytes) -> str:
    """The content address of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_append_read_head_round_trip(stub: StoreServiceAsyncStub) -> None:
    first = await stub.AppendEvents(
        append_request("run-1", events=[ev("A", b"1"), ev("B", b"2")], status=pb.STREAM_STATUS_ACTIVE)
    )
    assert (first.first_seq, first.head_seq) == (1, 2)
    second = await stub.AppendEvents(append_request("run-1", pb.EXPECTED_KIND_EXACT, 2, events=[ev("C")]))
    assert (second.first_seq, second.head_seq) == (3, 3)
    page = await stub.ReadEvents(pb.ReadEventsRequest(stream_id="run-1", from_seq=2, limit=1))
    assert [(e.seq, e.type, e.payload) for e in page.events] == [(2, "B", b"2")]
    assert (page.next_seq, page.head_seq) == (3, 3)
    assert page.events[0].stream_id == "run-1"
    assert page.events[0].recorded_at.seconds > 1_700_000_000
    everything = await stub.ReadEvents(pb.ReadEventsRequest(stream_id="run-1"))
    # Each append answers the time its events were recorded with, to the microsecond.
    recorded = [e.recorded_at.seconds * 1_000_000 + e.recorded_at.nanos // 1000 for e in everything.events]
    assert recorded == [first.recorded_at_us, first.recorded_at_us, second.recorded_at_us]
    assert [e.type for e in everything.events] == ["A", "B", "C"] and everything.next_seq == 0
    head = await stub.HeadSeq(pb.HeadSeqRequest(stream_id="run-1"))
    assert (head.head_seq, head.status) == (3, pb.STREAM_STATUS_ACTIVE)
    missing = await stub.HeadSeq(pb.HeadSeqRequest(stream_id="nobody"))
    assert (missing.head_seq, missing.status) == (0, pb.STREAM_STATUS_UNSPECIFIED)


async def test_an_append_answers_with_the_heads_it_asks_for(stub: StoreServiceAsyncStub) -> None:
    await stub.AppendEvents(append_request("kids"))
    answer = await stub.AppendEvents(append_request("run", report_heads=["kids", "nobody"]))
    assert list(answer.reported_heads) == [1, 0]
    [event] = (await stub.ReadEvents(pb.ReadEventsRequest(stream_id="run"))).events
    assert answer.recorded_at_us == event.recorded_at.seconds * 1_000_000 + event.recorded_at.nanos // 1000
    assert list((await stub.AppendEvents(append_request("other"))).reported_heads) == []


async def test_any_expectation_appends_at_head(stub: StoreServiceAsyncStub) -> None:
    await stub.AppendEvents(append_request("s", pb.EXPECTED_KIND_ANY))
    again = await stub.AppendEvents(append_request("s", pb.EXPECTED_KIND_ANY))
    assert again.first_seq == 2


async def test_conflict_is_aborted_with_actual_seq_in_error_info(stub: StoreServiceAsyncStub) -> None:
    await stub.AppendEvents(append_request("s", events=[ev("A"), ev("B")]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(append_request("s", pb.EXPECTED_KIND_EXACT, 1))
    assert caught.value.code() == grpc.StatusCode.ABORTED
    info = error_info(caught.value)
    assert info.reason == "sequence_conflict"
    assert info.metadata["actual_seq"] == "2"
    assert info.metadata["category"] == "conflict"
    assert "head is 2" in (caught.value.details() or "")
    assert from_rpc_error(caught.value).details["actual_seq"] == "2"
    head = await stub.HeadSeq(pb.HeadSeqRequest(stream_id="s"))
    assert head.head_seq == 2


@pytest.fixture(params=["sqlite", "postgres"])
async def either_stub(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreServiceAsyncStub]:
    """A stub of a real StoreService on SQLite, then on PostgreSQL (a schema of its own)."""
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "sqlite":
            config = StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data")
        else:
            dsn = request.getfixturevalue("postgres_dsn")
            schema = await stack.enter_async_context(fresh_schema(dsn))
            config = StoreConfig(listen="127.0.0.1:0", backend="postgres", dsn=dsn, pg_schema=schema)
        handle = await start_store(config)
        stack.push_async_callback(handle.drain, 1.0)
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}"))
        yield store_pb2_grpc.StoreServiceStub(channel)


async def test_a_batch_gives_each_append_its_own_outcome(either_stub: StoreServiceAsyncStub) -> None:
    stub = either_stub
    await stub.AppendEvents(append_request("taken", events=[ev("A"), ev("B")]))
    answer = await stub.AppendEventsBatch(
        pb.AppendEventsBatchRequest(
            appends=[
                append_request(
                    "fresh", events=[ev("A", b"1"), ev("B", b"2")], status=pb.STREAM_STATUS_ACTIVE
                ),
                append_request("taken", pb.EXPECTED_KIND_EXACT, 1),  # its head is 2
                append_request("bad\nid"),
                append_request("fresh", pb.EXPECTED_KIND_EXACT, 2, events=[ev("C")]),  # after the first
                append_request(
                    "kin", artifacts=[pb.InlineArtifact(kind="blob", data=b"bytes")], report_heads=["fresh"]
                ),
            ]
        )
    )
    outcomes = list(answer.outcomes)
    assert [o.WhichOneof("outcome") for o in outcomes] == [
        "appended",
        "failure",
        "failure",
        "appended",
        "appended",
    ]
    assert (outcomes[0].appended.first_seq, outcomes[0].appended.head_seq) == (1, 2)
    conflict = outcomes[1].failure
    assert (conflict.code, conflict.reason) == (grpc.StatusCode.ABORTED.value[0], "sequence_conflict")
    assert conflict.metadata["actual_seq"] == "2" and conflict.metadata["category"] == "conflict"
    assert "head is 2" in conflict.message
    refused = outcomes[2].failure
    assert (refused.code, refused.reason) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "invalid_stream_id")
    assert (outcomes[3].appended.first_seq, outcomes[3].appended.head_seq) == (3, 3)
    assert list(outcomes[4].appended.artifact_ids) == [sha(b"bytes")]
    assert list(outcomes[4].appended.reported_heads) == [3]
    # The failures wrote nothing; the others committed whole.
    fresh = await stub.ReadEvents(pb.ReadEventsRequest(stream_id="fresh"))
    assert [(e.seq, e.type, e.payload) for e in fresh.events] == [
        (1, "A", b"1"),
        (2, "B", b"2"),
        (3, "C", b"{}"),
    ]
    assert (await stub.HeadSeq(pb.HeadSeqRequest(stream_id="taken"))).head_seq == 2
    listed = await stub.ListStreams(pb.ListStreamsRequest())
    assert sorted(s.stream_id for s in listed.streams) == ["fresh", "kin", "taken"]


def open_append_stream(stub: StoreServiceAsyncStub) -> Any:
    """An AppendEventsStream call that the test writes and reads itself (no request iterator)."""
    return stub.AppendEventsStream()  # type: ignore[call-arg]  # the stubs' types know only iterators


async def test_an_append_stream_answers_each_batch_in_turn_with_its_own_outcomes(
    either_stub: StoreServiceAsyncStub,
) -> None:
    stub = either_stub
    await stub.AppendEvents(append_request("taken", events=[ev("A"), ev("B")]))
    call = open_append_stream(stub)
    await call.write(
        pb.AppendEventsStreamRequest(
            appends=[
                append_request("fresh", events=[ev("A", b"1")]),
                append_request("taken", pb.EXPECTED_KIND_EXACT, 1),  # its head is 2: a conflict
                append_request("bad\nid"),
            ]
        )
    )
    first = await call.read()
    assert isinstance(first, pb.AppendEventsStreamResponse)
    assert [o.WhichOneof("outcome") for o in first.outcomes] == ["appended", "failure", "failure"]
    assert (first.outcomes[0].appended.first_seq, first.outcomes[0].appended.head_seq) == (1, 1)
    assert (first.outcomes[1].failure.reason, first.outcomes[1].failure.metadata["actual_seq"]) == (
        "sequence_conflict",
        "2",
    )
    assert first.outcomes[2].failure.reason == "invalid_stream_id"
    # The next request on the same call sees what the one before committed.
    await call.write(
        pb.AppendEventsStreamRequest(
            appends=[
                append_request("fresh", pb.EXPECTED_KIND_EXACT, 1, events=[ev("B", b"2")]),
                append_request("taken", pb.EXPECTED_KIND_EXACT, 2, events=[ev("C")]),
            ]
        )
    )
    second = await call.read()
    assert isinstance(second, pb.AppendEventsStreamResponse)
    assert [(o.appended.first_seq, o.appended.head_seq) for o in second.outcomes] == [(2, 2), (3, 3)]
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]  # the client is done: it ends OK
    assert await call.code() == grpc.StatusCode.OK
    fresh = await stub.ReadEvents(pb.ReadEventsRequest(stream_id="fresh"))
    assert [(e.seq, e.type, e.payload) for e in fresh.events] == [(1, "A", b"1"), (2, "B", b"2")]
    taken = await stub.ReadEvents(pb.ReadEventsRequest(stream_id="taken"))
    assert [e.type for e in taken.events] == ["A", "B", "C"]


async def test_a_request_refused_as_a_whole_ends_the_append_stream_and_writes_nothing(
    stub: StoreServiceAsyncStub,
) -> None:
    call = open_append_stream(stub)
    await call.write(pb.AppendEventsStreamRequest(appends=[append_request("before")]))
    answered = await call.read()
    assert isinstance(answered, pb.AppendEventsStreamResponse)
    assert answered.outcomes[0].WhichOneof("outcome") == "appended"
    await call.write(pb.AppendEventsStreamRequest(appends=[append_request(f"s{i}") for i in range(257)]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info.reason == "invalid_batch" and "256" in (caught.value.details() or "")
    listed = await stub.ListStreams(pb.ListStreamsRequest())
    assert [s.stream_id for s in listed.streams] == ["before"]


async def test_an_append_stream_its_client_cancels_between_requests_leaves_nothing_behind(
    store: StoreServingHandle, stub: StoreServiceAsyncStub
) -> None:
    assert store.servicer is not None
    call = open_append_stream(stub)
    await call.write(pb.AppendEventsStreamRequest(appends=[append_request("s")]))
    assert isinstance(await call.read(), pb.AppendEventsStreamResponse)
    listed = store.servicer._idle_append_streams
    assert len(listed) == 1  # waiting for the next request
    call.cancel()

    await eventually(lambda: not listed, "the cancelled stream's task no longer listed", within=60, poll=0.01)


async def test_drain_ends_an_idle_append_stream_with_unavailable(tmp_path: Any) -> None:
    handle = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        call = open_append_stream(stub)
        await call.write(pb.AppendEventsStreamRequest(appends=[append_request("s")]))
        assert isinstance(await call.read(), pb.AppendEventsStreamResponse)
        # Left open, the call would hold the drain for its grace, then be cancelled: CANCELLED.
        await handle.drain(grace=60.0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        # The store's own ending, not the server's cancel of a call still running at the end of grace.
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value).reason == "store_shutting_down"


async def test_trim_stream_drops_old_events_and_keeps_the_head(stub: StoreServiceAsyncStub) -> None:
    events = [ev(f"E{i}") for i in range(1, 7)]
    await stub.AppendEvents(append_request("engine:e", events=events, status=pb.STREAM_STATUS_ACTIVE))
    trimmed = await stub.TrimStream(pb.TrimStreamRequest(stream_id="engine:e", before_seq=5))
    assert (trimmed.removed, trimmed.head_seq) == (4, 6)
    page = await stub.ReadEvents(pb.ReadEventsRequest(stream_id="engine:e", from_seq=1))
    assert [e.seq for e in page.events] == [5, 6] and (page.next_seq, page.head_seq) == (0, 6)
    head = await stub.HeadSeq(pb.HeadSeqRequest(stream_id="engine:e"))
    assert (head.head_seq, head.status) == (6, pb.STREAM_STATUS_ACTIVE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(append_request("engine:e", pb.EXPECTED_KIND_EXACT, 4))
    assert error_info(caught.value).metadata["actual_seq"] == "6"
    after = await stub.AppendEvents(append_request("engine:e", pb.EXPECTED_KIND_EXACT, 6))
    assert after.first_seq == 7
    for request, reason in (
        (pb.TrimStreamRequest(stream_id="engine:e", before_seq=9), "invalid_sequence"),
        (pb.TrimStreamRequest(stream_id="engine:e", before_seq=-1), "invalid_sequence"),
        (pb.TrimStreamRequest(stream_id="", before_seq=1), "invalid_stream_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.TrimStream(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == reason
    assert error_info(caught.value).metadata["category"] == "invalid_argument"
    page = await stub.ReadEvents(pb.ReadEventsRequest(stream_id="engine:e"))
    assert [e.seq for e in page.events] == [5, 6, 7]
    unknown = await stub.TrimStream(pb.TrimStreamRequest(stream_id="nobody", before_seq=1))
    assert (unknown.removed, unknown.head_seq) == (0, 0)


async def test_list_streams_filters_and_pages(stub: StoreServiceAsyncStub) -> None:
    statuses = [pb.STREAM_STATUS_ACTIVE, pb.STREAM_STATUS_COMPLETED, pb.STREAM_STATUS_ACTIVE]
    for i, status in enumerate(statuses):
        await stub.AppendEvents(append_request(f"run-{i}", status=status))
    await stub.AppendEvents(append_request("misc"))
    active = await stub.ListStreams(pb.ListStreamsRequest(statuses=[pb.STREAM_STATUS_ACTIVE]))
    assert [s.stream_id for s in active.streams] == ["run-2", "run-0"]
    assert active.streams[0].status == pb.STREAM_STATUS_ACTIVE
    assert active.streams[0].created_at.seconds > 0 and active.streams[0].updated_at.seconds > 0
    first = await stub.ListStreams(pb.ListStreamsRequest(prefix="run-", page_size=2))
    assert [s.stream_id for s in first.streams] == ["run-2", "run-1"] and first.next_page_token
    rest = await stub.ListStreams(
        pb.ListStreamsRequest(prefix="run-", page_size=2, page_token=first.next_page_token)
    )
    assert [s.stream_id for s in rest.streams] == ["run-0"] and rest.next_page_token == ""


async def test_list_streams_by_duration_and_the_end_of_finished_streams(stub: StoreServiceAsyncStub) -> None:
    await stub.AppendEvents(append_request("done", status=pb.STREAM_STATUS_COMPLETED))
    await stub.AppendEvents(append_request("live", status=pb.STREAM_STATUS_ACTIVE))
    listed = {s.stream_id: s for s in (await stub.ListStreams(pb.ListStreamsRequest())).streams}
    assert listed["done"].ended_at == listed["done"].created_at
    assert not listed["live"].HasField("ended_at")
    # "done" ended as it was created (duration 0); "live" has run for as long as it has so far.
    instant = await stub.ListStreams(pb.ListStreamsRequest(max_duration_us=0))
    assert [s.stream_id for s in instant.streams] == ["done"]
    long = await stub.ListStreams(pb.ListStreamsRequest(min_duration_us=10**15))
    assert list(long.streams) == []
    every = await stub.ListStreams(pb.ListStreamsRequest(min_duration_us=0, max_duration_us=10**15))
    assert [s.stream_id for s in every.streams] == ["live", "done"]


async def test_due_times_travel_with_appends_and_list_due_finds_them(stub: StoreServiceAsyncStub) -> None:
    await stub.AppendEvents(append_request("run:a", due_at_us=200, status=pb.STREAM_STATUS_PARKED))
    await stub.AppendEvents(append_request("run:b", due_at_us=100))
    await stub.AppendEvents(append_request("run:c"))
    listed = await stub.ListDue(pb.ListDueRequest(before_us=150, prefix="run:"))
    assert [(d.stream_id, d.due_at_us, d.head_seq) for d in listed.due] == [("run:b", 100, 1)]
    assert listed.next_due_at_us == 200
    await stub.AppendEvents(append_request("run:b", kind=pb.EXPECTED_KIND_EXACT, seq=1, due_at_us=0))
    listed = await stub.ListDue(pb.ListDueRequest(before_us=10**15))
    assert [d.stream_id for d in listed.due] == ["run:a"]
    head = await stub.HeadSeq(pb.HeadSeqRequest(stream_id="run:a"))
    assert head.status == pb.STREAM_STATUS_PARKED


async def test_subscribe_streams_existing_then_live_until_cancelled(stub: StoreServiceAsyncStub) -> None:
    await stub.AppendEvents(append_request("feed", events=[ev("A"), ev("B")]))
    call = stub.SubscribeEvents(pb.SubscribeEventsRequest(stream_id="feed", after_seq=1))
    first = await asyncio.wait_for(call.read(), 10)
    assert isinstance(first, pb.SubscribeEventsResponse) and first.event.type == "B"
    await stub.AppendEvents(append_request("feed", pb.EXPECTED_KIND_EXACT, 2, events=[ev("C")]))
    live = await asyncio.wait_for(call.read(), 10)
    assert isinstance(live, pb.SubscribeEventsResponse) and (live.event.seq, live.event.type) == (3, "C")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call.read()
    assert call.cancelled()


async def test_drain_ends_subscriptions_with_unavailable(tmp_path: Any) -> None:
    from store_service.server import StoreConfig, start_store

    handle = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        call = stub.SubscribeEvents(pb.SubscribeEventsRequest(stream_id="quiet"))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(handle.drain(grace=5.0), 4.0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value).reason == "store_shutting_down"


async def test_artifact_put_has_get_and_repeat(stub: StoreServiceAsyncStub) -> None:
    data = os.urandom(3 * MiB + 17)
    chunks = [data[i : i + 700_000] for i in range(0, len(data), 700_000)]
    put = await stub.PutArtifact(put_requests("snapshot", chunks))
    assert (put.artifact_id, put.size, put.created) == (sha(data), len(data), True)
    again = await stub.PutArtifact(put_requests("snapshot", [data]))
    assert (again.artifact_id, again.created) == (sha(data), False)
    has = await stub.HasArtifact(pb.HasArtifactRequest(artifact_id=put.artifact_id))
    assert (has.exists, has.size) == (True, len(data))
    parts = [r async for r in stub.GetArtifact(pb.GetArtifactRequest(artifact_id=put.artifact_id))]
    assert isinstance(parts[0], pb.GetArtifactResponse)
    assert (parts[0].kind, parts[0].size) == ("snapshot", len(data))
    assert len(parts) == 4 and all(len(p.data) <= MiB for p in parts)
    assert b"".join(p.data for p in parts) == data
    absent = await stub.HasArtifact(pb.HasArtifactRequest(artifact_id=sha(b"absent")))
    assert (absent.exists, absent.size) == (False, 0)


async def test_empty_artifact_round_trips_as_one_message(stub: StoreServiceAsyncStub) -> None:
    put = await stub.PutArtifact(put_requests("empty", []))
    assert (put.artifact_id, put.size) == (sha(b""), 0)
    parts = [r async for r in stub.GetArtifact(pb.GetArtifactRequest(artifact_id=put.artifact_id))]
    assert [(p.kind, p.size, p.data) for p in parts] == [("empty", 0, b"")]


async def test_inline_artifacts_come_back_by_id(stub: StoreServiceAsyncStub) -> None:
    result = await stub.AppendEvents(
        append_request("run", artifacts=[pb.InlineArtifact(kind="snapshot", data=b"state")])
    )
    assert list(result.artifact_ids) == [sha(b"state")]
    parts = [r async for r in stub.GetArtifact(pb.GetArtifactRequest(artifact_id=sha(b"state")))]
    assert b"".join(p.data for p in parts) == b"state"


async def test_missing_artifact_is_not_found(stub: StoreServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.GetArtifact(pb.GetArtifactRequest(artifact_id=sha(b"nope"))):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "artifact_not_found"


async def test_hundred_mib_artifact_round_trips_over_grpc(stub: StoreServiceAsyncStub) -> None:
    block = os.urandom(MiB)
    sent = hashlib.sha256()

    async def requests() -> AsyncIterator[store_pb2.PutArtifactRequest]:
        for i in range(100):
            chunk = i.to_bytes(4, "big") + block[4:]
            sent.update(chunk)
            yield pb.PutArtifactRequest(kind="model" if i == 0 else "", data=chunk)

    put = await stub.PutArtifact(requests())
    assert (put.artifact_id, put.size, put.created) == ("sha256:" + sent.hexdigest(), 100 * MiB, True)
    received = hashlib.sha256()
    size = 0
    messages = 0
    async for part in stub.GetArtifact(pb.GetArtifactRequest(artifact_id=put.artifact_id)):
        assert isinstance(part, pb.GetArtifactResponse)
        received.update(part.data)
        size += len(part.data)
        messages += 1
    assert (size, "sha256:" + received.hexdigest()) == (100 * MiB, put.artifact_id)
    assert messages == 100


async def test_an_append_repeated_under_its_key_answers_as_the_first_alone_or_in_a_batch(
    stub: StoreServiceAsyncStub,
) -> None:
    key = "0f1e2d3c-any-printable-ascii"
    first = await stub.AppendEvents(append_request("hints", pb.EXPECTED_KIND_ANY, append_key=key))
    again = await stub.AppendEvents(append_request("hints", pb.EXPECTED_KIND_ANY, append_key=key))
    batch = await stub.AppendEventsBatch(
        pb.AppendEventsBatchRequest(
            appends=[
                append_request("hints", pb.EXPECTED_KIND_ANY, append_key=key),
                append_request("hints", pb.EXPECTED_KIND_ANY, append_key="another"),
            ]
        )
    )
    repeat_in_batch, fresh = (outcome.appended for outcome in batch.outcomes)
    assert (first.first_seq, first.repeated) == (1, False)
    for repeat in (again, repeat_in_batch):
        assert (repeat.first_seq, repeat.head_seq, repeat.repeated) == (1, 1, True)
        assert repeat.recorded_at_us == first.recorded_at_us
    assert (fresh.first_seq, fresh.repeated) == (2, False)
    assert (await stub.HeadSeq(pb.HeadSeqRequest(stream_id="hints"))).head_seq == 2


# -- bad input: status code, ErrorInfo reason, and nothing written ------------------------------

Call = Callable[["StoreServiceAsyncStub"], Awaitable[Any]]


def _append(**kwargs: Any) -> Call:
    return lambda stub: stub.AppendEvents(append_request(**kwargs))


async def _drain_stream(call: Any) -> None:
    async for _ in call:
        pass


BAD_INPUT: list[tuple[str, Call, grpc.StatusCode, str]] = [
    ("empty stream id", _append(stream_id=""), grpc.StatusCode.INVALID_ARGUMENT, "invalid_stream_id"),
    (
        "oversized stream id",
        _append(stream_id="x" * 201),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_stream_id",
    ),
    (
        "control char in stream id",
        _append(stream_id="a\nb"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_stream_id",
    ),
    (
        "negative expected seq",
        _append(kind=pb.EXPECTED_KIND_EXACT, seq=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_sequence",
    ),
    (
        "expected kind unset",
        _append(kind=pb.EXPECTED_KIND_UNSPECIFIED),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_expected",
    ),
    ("unknown expected kind", _append(kind=99), grpc.StatusCode.INVALID_ARGUMENT, "invalid_expected"),
    (
        "oversized append key",
        _append(append_key="k" * 129),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_append_key",
    ),
    (
        "append key not printable ASCII",
        _append(append_key="k\u00e9y"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_append_key",
    ),
    ("empty batch", _append(events=[]), grpc.StatusCode.INVALID_ARGUMENT, "invalid_batch"),
    (
        "AppendEventsBatch of no appends",
        lambda stub: stub.AppendEventsBatch(pb.AppendEventsBatchRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_batch",
    ),
    (
        "AppendEventsBatch of 257 appends",
        lambda stub: stub.AppendEventsBatch(
            pb.AppendEventsBatchRequest(appends=[append_request(f"s{i}") for i in range(257)])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_batch",
    ),
    (
        "oversized batch",
        _append(events=[ev("E")] * 1001),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_batch",
    ),
    (
        "oversized event",
        _append(events=[ev("Ok"), ev("Big", b"x" * (MiB + 1))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "event_too_large",
    ),
    ("empty event type", _append(events=[ev("")]), grpc.StatusCode.INVALID_ARGUMENT, "invalid_event_type"),
    (
        "oversized event type",
        _append(events=[ev("T" * 129)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_event_type",
    ),
    ("unknown status", _append(status=42), grpc.StatusCode.INVALID_ARGUMENT, "invalid_status"),
    ("negative due time", _append(due_at_us=-1), grpc.StatusCode.INVALID_ARGUMENT, "invalid_due_at"),
    (
        "list due without a time",
        lambda stub: stub.ListDue(pb.ListDueRequest(before_us=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_due_at",
    ),
    (
        "nudge without a time",
        lambda stub: stub.NudgeDue(pb.NudgeDueRequest(stream_id="s", due_at_us=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_due_at",
    ),
    (
        "nudge without a stream",
        lambda stub: stub.NudgeDue(pb.NudgeDueRequest(stream_id="", due_at_us=5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_stream_id",
    ),
    (
        "append nudging a stream without a time",
        _append(nudges=[pb.DueNudge(stream_id="parent", due_at_us=0)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_due_at",
    ),
    (
        "append reporting the head of a stream without an id",
        _append(report_heads=[""]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_stream_id",
    ),
    (
        "append reporting too many heads",
        _append(report_heads=[f"p{i}" for i in range(17)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_report_heads",
    ),
    (
        "append nudging a stream without an id",
        _append(nudges=[pb.DueNudge(stream_id="", due_at_us=5)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_stream_id",
    ),
    (
        "append nudging too many streams",
        _append(nudges=[pb.DueNudge(stream_id=f"p{i}", due_at_us=5) for i in range(17)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_nudges",
    ),
    (
        "list due limit too big",
        lambda stub: stub.ListDue(pb.ListDueRequest(before_us=1, limit=1001)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_limit",
    ),
    (
        "inline artifact without kind",
        _append(artifacts=[pb.InlineArtifact(kind="", data=b"x")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_artifact_kind",
    ),
    (
        "oversized inline artifact",
        _append(artifacts=[pb.InlineArtifact(kind="k", data=b"x" * (8 * MiB + 1))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "artifact_too_large",
    ),
    (
        "negative from_seq",
        lambda stub: stub.ReadEvents(pb.ReadEventsRequest(stream_id="s", from_seq=-5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_sequence",
    ),
    (
        "read limit too big",
        lambda stub: stub.ReadEvents(pb.ReadEventsRequest(stream_id="s", limit=10_001)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_limit",
    ),
    (
        "head of empty stream id",
        lambda stub: stub.HeadSeq(pb.HeadSeqRequest(stream_id="")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_stream_id",
    ),
    (
        "status filter unspecified",
        lambda stub: stub.ListStreams(pb.ListStreamsRequest(statuses=[pb.STREAM_STATUS_UNSPECIFIED])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_status",
    ),
    (
        "unknown status filter",
        lambda stub: stub.ListStreams(pb.ListStreamsRequest(statuses=[pb.STREAM_STATUS_ACTIVE, 9])),  # type: ignore[list-item]
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_status",
    ),
    (
        "page size too big",
        lambda stub: stub.ListStreams(pb.ListStreamsRequest(page_size=1001)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_page_size",
    ),
    (
        "negative min duration",
        lambda stub: stub.ListStreams(pb.ListStreamsRequest(min_duration_us=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_duration",
    ),
    (
        "negative max duration",
        lambda stub: stub.ListStreams(pb.ListStreamsRequest(max_duration_us=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_duration",
    ),
    (
        "min duration past max",
        lambda stub: stub.ListStreams(pb.ListStreamsRequest(min_duration_us=2, max_duration_us=1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_duration",
    ),
    (
        "foreign page token",
        lambda stub: stub.ListStreams(pb.ListStreamsRequest(page_token="not-ours")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_page_token",
    ),
    (
        "negative after_seq",
        lambda stub: _drain_stream(
            stub.SubscribeEvents(pb.SubscribeEventsRequest(stream_id="s", after_seq=-1))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_sequence",
    ),
    (
        "malformed artifact id on get",
        lambda stub: _drain_stream(stub.GetArtifact(pb.GetArtifactRequest(artifact_id="sha256:XYZ"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_artifact_id",
    ),
    (
        "malformed artifact id on has",
        lambda stub: stub.HasArtifact(pb.HasArtifactRequest(artifact_id="md5:" + "0" * 32)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_artifact_id",
    ),
    (
        "uppercase artifact id",
        lambda stub: stub.HasArtifact(pb.HasArtifactRequest(artifact_id="sha256:" + "A" * 64)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_artifact_id",
    ),
    (
        "put without kind",
        lambda stub: stub.PutArtifact(put_requests("", [b"orphan bytes"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_artifact_kind",
    ),
    (
        "put with no message at all",
        lambda stub: stub.PutArtifact(_no_requests()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_artifact_kind",
    ),
]


async def _no_requests() -> AsyncIterator[store_pb2.PutArtifactRequest]:
    return
    yield  # an async generator that sends nothing


@pytest.mark.parametrize(
    ("call", "code", "reason"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
async def test_bad_input_is_rejected_with_reason_and_writes_nothing(
    stub: StoreServiceAsyncStub, store: StoreServingHandle, call: Call, code: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stub)
    assert caught.value.code() == code
    info = error_info(caught.value)
    assert info.reason == reason
    assert info.metadata["category"] == "invalid_argument"
    assert caught.value.details()  # a message a person can act on
    listed = await stub.ListStreams(pb.ListStreamsRequest())
    assert list(listed.streams) == []
    for artifact in (b"x", b"orphan bytes", b"x" * (8 * MiB + 1)):
        has = await stub.HasArtifact(pb.HasArtifactRequest(artifact_id=sha(artifact)))
        assert not has.exists


@pytest.mark.parametrize(
    ("events", "named"),
    [
        ([ev("Ok"), ev("Ok"), ev("Bad\x01"), ev("Big", b"x" * (MiB + 1))], "events[2].type"),
        ([ev("Ok"), ev("Big", b"x" * (MiB + 1)), ev("")], "events[1].payload"),
        ([ev("Ok"), ev("Ok", b"x" * (MiB + 1))], "events[1].payload"),
        ([ev("Ok")] * 9 + [ev("Tab\tin the last")], "events[9].type"),
        ([ev("Step\u00a0Done")] * 3 + [ev("")], "events[3].type"),
    ],
    ids=[
        "bad type first",
        "big payload first",
        "a known type with a big payload",
        "a control character in the last of ten",
        "an empty type after allowed unprintable ones",
    ],
)
async def test_a_refused_event_is_named_by_its_index_among_valid_ones(
    stub: StoreServiceAsyncStub, events: list[store_pb2.EventData], named: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(append_request("s", events=events))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(named)


async def test_event_types_allowed_but_not_printable_are_stored_as_sent(stub: StoreServiceAsyncStub) -> None:
    """A non-ASCII space or a line separator is not printable but not a control character either:
    such types, among plain ones, are appended and read back as they were sent."""
    types = ["Ok", "Step\u00a0Done", "T" * 128, "Line\u2028Break", "Ok"]
    await stub.AppendEvents(append_request("s", events=[ev(t, t.encode()) for t in types]))
    read = await stub.ReadEvents(pb.ReadEventsRequest(stream_id="s", from_seq=1))
    assert [(e.type, e.payload) for e in read.events] == [(t, t.encode()) for t in types]


async def test_read_events_pages_a_stream_larger_than_one_message(stub: StoreServiceAsyncStub) -> None:
    """20 events of 1 MiB exceed the 16 MiB message limit: ReadEvents pages instead of failing."""
    payload = b"x" * (1024 * 1024)
    for _ in range(4):
        await stub.AppendEvents(append_request("huge", pb.EXPECTED_KIND_ANY, events=[ev("Big", payload)] * 5))
    seqs: list[int] = []
    next_seq = 1
    while next_seq:
        page = await stub.ReadEvents(pb.ReadEventsRequest(stream_id="huge", from_seq=next_seq))
        seqs += [event.seq for event in page.events]
        next_seq = page.next_seq
    assert seqs == list(range(1, 21))


async def test_cancelled_subscriptions_leave_nothing_waiting(
    store: StoreServingHandle, stub: StoreServiceAsyncStub
) -> None:
    """A client that cancels while the store waits for the next event leaks no task or wake-up."""
    await stub.AppendEvents(append_request("quiet"))
    for _ in range(20):
        call = stub.SubscribeEvents(pb.SubscribeEventsRequest(stream_id="quiet"))
        first = await call.read()
        assert isinstance(first, pb.SubscribeEventsResponse) and first.event.seq == 1
        call.cancel()
    assert isinstance(store.backend, SqliteStoreBackend)
    wakeups = store.backend._wakeups
    for _ in range(200):  # the server notices each cancellation on its own schedule
        if not wakeups.armed_count("quiet"):
            break
        await asyncio.sleep(0.01)
    assert wakeups.armed_count("quiet") == 0
