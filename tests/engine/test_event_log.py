"""The EventLog port's contract, one suite for both implementations: the gRPC StoreClient against
a real StoreService (SQLite), and the InMemoryEventLog that the fast engine tests use.

What the engine relies on is pinned here, so that a test passing on the in-memory log says
something about the real store too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from engine_service.domain.canonical import artifact_id_for_bytes
from engine_service.domain.streams import LABEL_ACTIVE, LABEL_CANCELED, LABEL_COMPLETED
from engine_service.store import EventLog, InMemoryEventLog, StreamEvent
from engine_service.store.grpc_client import StoreClient
from keel_core.errors import ErrorCategory, KeelError
from store_service.server import StoreConfig, start_store

WAIT = 10.0


@pytest.fixture(params=["memory", "grpc"])
async def log(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[EventLog]:
    """An empty event log of each implementation."""
    if request.param == "memory":
        memory = InMemoryEventLog()
        yield memory
        await memory.close()
        return
    store = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store")))
    client = StoreClient(f"127.0.0.1:{store.port}")
    try:
        yield client
    finally:
        await client.close()
        await store.drain(0.5)


async def test_append_checks_the_head_and_a_conflict_writes_nothing(log: EventLog) -> None:
    first = await log.append("s:1", [("A", b"1"), ("B", b"2")], expected_seq=None, status=LABEL_ACTIVE)
    assert (first.first_seq, first.head_seq) == (1, 2)
    for expected in (None, 1, 3):
        with pytest.raises(KeelError) as caught:
            await log.append("s:1", [("C", b"3")], expected_seq=expected)
        assert caught.value.code == "sequence_conflict"
        assert caught.value.category is ErrorCategory.CONFLICT
        assert caught.value.details["actual_seq"] == "2"  # ErrorInfo metadata: strings
    assert await log.head("s:1") == (2, LABEL_ACTIVE)
    assert [(e.seq, e.type, e.payload) for e in await log.read("s:1")] == [(1, "A", b"1"), (2, "B", b"2")]


async def test_an_append_needs_at_least_one_event(log: EventLog) -> None:
    with pytest.raises(KeelError) as caught:
        await log.append("s:empty", [], expected_seq=None)
    assert caught.value.code == "invalid_batch" and caught.value.category is ErrorCategory.INVALID_ARGUMENT
    assert await log.head("s:empty") == (0, "")


async def test_expected_any_appends_at_whatever_the_head_is(log: EventLog) -> None:
    await log.append("s:any", [("A", b"")], expected_seq=None, expected_any=True)
    landed = await log.append("s:any", [("B", b"")], expected_seq=None, expected_any=True)
    assert (landed.first_seq, landed.head_seq) == (2, 2)


async def test_a_stream_without_events_has_head_zero_and_no_label(log: EventLog) -> None:
    assert await log.head("s:none") == (0, "")
    assert await log.read("s:none") == []


async def test_labels_change_with_appends_that_name_one(log: EventLog) -> None:
    await log.append("s:l", [("A", b"")], expected_seq=None, status=LABEL_ACTIVE)
    await log.append("s:l", [("B", b"")], expected_seq=1)
    assert await log.head("s:l") == (2, LABEL_ACTIVE)
    await log.append("s:l", [("C", b"")], expected_seq=2, status=LABEL_COMPLETED)
    assert await log.head("s:l") == (3, LABEL_COMPLETED)


async def test_read_pages_from_a_sequence_with_a_limit(log: EventLog) -> None:
    await log.append("s:r", [(f"E{i}", b"") for i in range(5)], expected_seq=None)
    assert [e.seq for e in await log.read("s:r", from_seq=3)] == [3, 4, 5]
    assert [e.seq for e in await log.read("s:r", from_seq=2, limit=2)] == [2, 3]


async def test_inline_artifacts_are_content_addressed(log: EventLog) -> None:
    data = b'{"a":1}'
    landed = await log.append("s:a", [("A", b"")], expected_seq=None, artifacts=[("snapshot", data)])
    assert landed.artifact_ids == (artifact_id_for_bytes(data),)
    assert await log.get_artifact(artifact_id_for_bytes(data)) == data
    assert await log.put_artifact("snapshot", data) == artifact_id_for_bytes(data)
    assert await log.has_artifact(artifact_id_for_bytes(data))
    missing = artifact_id_for_bytes(b"never stored")
    assert not await log.has_artifact(missing)
    with pytest.raises(KeelError) as caught:
        await log.get_artifact(missing)
    assert caught.value.code == "artifact_not_found" and caught.value.category is ErrorCategory.NOT_FOUND


async def test_list_streams_by_prefix_and_label_newest_first_in_pages(log: EventLog) -> None:
    for n in range(5):
        await log.append(f"p:{n}", [("A", b"")], expected_seq=None, status=LABEL_ACTIVE)
    await log.append("p:5", [("A", b"")], expected_seq=None, status=LABEL_CANCELED)
    await log.append("q:0", [("A", b"")], expected_seq=None, status=LABEL_ACTIVE)
    listed: list[str] = []
    token = ""
    while True:
        page, token = await log.list_streams(
            prefix="p:", statuses=[LABEL_ACTIVE], page_size=2, page_token=token
        )
        assert len(page) <= 2
        listed.extend(s.stream_id for s in page)
        if not token:
            break
    assert listed == [f"p:{n}" for n in reversed(range(5))]
    everything, _ = await log.list_streams(prefix="p:", page_size=100)
    assert everything[0].stream_id == "p:5" and len(everything) == 6


async def test_attributes_land_with_the_append_and_filter_listings(log: EventLog) -> None:
    await log.append("a:0", [("A", b"")], expected_seq=None, attributes={"k": "x", "j": "1"})
    await log.append("a:1", [("A", b"")], expected_seq=None, attributes={"k": "x"})
    await log.append("a:2", [("A", b"")], expected_seq=None, attributes={"k": "y"})
    with pytest.raises(KeelError):
        await log.append("a:2", [("B", b"")], expected_seq=0, attributes={"k": "lost"})
    page, _ = await log.list_streams(prefix="a:", attributes={"k": "x"})
    assert [(s.stream_id, s.attributes) for s in page] == [("a:1", {"k": "x"}), ("a:0", {"k": "x", "j": "1"})]
    page, _ = await log.list_streams(prefix="a:", attributes={"k": "x", "j": "1"})
    assert [s.stream_id for s in page] == ["a:0"]
    page, _ = await log.list_streams(prefix="a:", attributes={"k": "lost"})
    assert page == []
    cut = (await log.list_streams(prefix="a:2"))[0][0].created_at
    assert cut is not None
    later, _ = await log.list_streams(prefix="a:", created_after=cut)
    earlier, _ = await log.list_streams(prefix="a:", created_before=cut)
    assert "a:2" in [s.stream_id for s in later]
    assert "a:2" not in [s.stream_id for s in earlier]


async def test_a_streams_end_is_kept_by_later_appends_and_bounds_its_duration(log: EventLog) -> None:
    await log.append("e:done", [("A", b"")], expected_seq=None, status=LABEL_COMPLETED)
    await log.append("e:live", [("A", b"")], expected_seq=None, status=LABEL_ACTIVE)
    await log.append("e:done", [("B", b"")], expected_seq=1)  # the label stays completed
    found = {s.stream_id: s for s in (await log.list_streams(prefix="e:"))[0]}
    done, live = found["e:done"], found["e:live"]
    assert done.ended_at is not None and done.ended_at == done.created_at  # created finished
    assert done.updated_at is not None and done.updated_at > done.ended_at
    assert live.ended_at is None
    # "e:done" lasted nothing at all, whenever it is asked; nothing here has lasted a day yet.
    instant, _ = await log.list_streams(prefix="e:", max_duration=timedelta(0))
    assert "e:done" in [s.stream_id for s in instant]
    day = timedelta(days=1)
    assert (await log.list_streams(prefix="e:", min_duration=day))[0] == []
    every, _ = await log.list_streams(prefix="e:", min_duration=timedelta(0), max_duration=day)
    assert [s.stream_id for s in every] == ["e:live", "e:done"]
    for least, most in ((timedelta(seconds=-1), None), (day, timedelta(0))):
        with pytest.raises(KeelError) as caught:
            await log.list_streams(prefix="e:", min_duration=least, max_duration=most)
        assert caught.value.code == "invalid_duration"
    await log.append("e:done", [("C", b"")], expected_seq=2, status=LABEL_ACTIVE)
    assert (await log.list_streams(prefix="e:done"))[0][0].ended_at is None  # reopened


async def test_subscribe_replays_then_wakes_on_each_append(log: EventLog) -> None:
    await log.append("s:w", [("A", b"1")], expected_seq=None)
    seen: list[StreamEvent] = []
    one, two = asyncio.Event(), asyncio.Event()

    async def follow() -> None:
        subscription = log.subscribe("s:w", after_seq=0)
        async with contextlib.aclosing(subscription):
            async for event in subscription:
                seen.append(event)
                if len(seen) == 1:
                    one.set()
                if len(seen) == 2:
                    two.set()
                if len(seen) == 3:
                    return

    following = asyncio.create_task(follow())
    await asyncio.wait_for(one.wait(), WAIT)
    await log.append("s:w", [("B", b"2")], expected_seq=1)
    await asyncio.wait_for(two.wait(), WAIT)
    await log.append("s:w", [("C", b"3")], expected_seq=2)
    await asyncio.wait_for(following, WAIT)
    assert [(e.seq, e.type) for e in seen] == [(1, "A"), (2, "B"), (3, "C")]


async def test_trim_drops_older_events_and_keeps_the_head(log: EventLog) -> None:
    await log.append("s:t", [(f"E{i}", b"") for i in range(5)], expected_seq=None, status=LABEL_ACTIVE)
    assert await log.trim("s:t", 4) == 3
    assert [e.seq for e in await log.read("s:t")] == [4, 5]
    assert await log.head("s:t") == (5, LABEL_ACTIVE)
    await log.append("s:t", [("F", b"")], expected_seq=5)  # the compare-and-swap still needs the head
    with pytest.raises(KeelError) as caught:
        await log.trim("s:t", 8)
    assert caught.value.code == "invalid_sequence"
