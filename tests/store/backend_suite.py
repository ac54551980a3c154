"""The one abstract test suite of the StoreBackend contract; every backend's test module binds it.

Subclass `StoreBackendSuite` in a module whose name starts with `test_` and implement
`create_backend` and `count_artifact_rows`; every test below then runs against that backend.
Nothing here may depend on a particular backend.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from keel_core.clock import now_us
from keel_core.errors import ErrorCategory, KeelError
from store_service import limits
from store_service.backend import (
    READ_PAGE_BYTES,
    AppendResult,
    Expected,
    NewArtifact,
    NewEvent,
    StoreBackend,
    StoredEvent,
    StreamInfo,
    StreamStatus,
)
from store_service.sql_backend import SqlStoreBackend


def events(*names: str) -> list[NewEvent]:
    """Events whose type and payload are the given names."""
    return [NewEvent(name, name.encode()) for name in names]


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    """`data` cut into pieces of `size` bytes, as an async iterable."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def read_all(backend: StoreBackend, stream_id: str) -> list[StoredEvent]:
    """Every event of a stream, following next_seq."""
    out: list[StoredEvent] = []
    seq = 1
    while True:
        page = await backend.read(stream_id, seq, 100)
        out.extend(page.events)
        if page.next_seq == 0:
            return out
        seq = page.next_seq


async def download(backend: StoreBackend, artifact_id: str) -> bytes:
    """An artifact's bytes, joined."""
    got = await backend.get_artifact(artifact_id)
    return b"".join([chunk async for chunk in got.chunks])


def sha(data: bytes) -> str:
    """The content address of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class StoreBackendSuite(abc.ABC):
    """Behaviour every StoreBackend must show. Bind it with `create_backend`."""

    @abc.abstractmethod
    def create_backend(self, request: pytest.FixtureRequest) -> StoreBackend:
        """An unopened backend over this test's storage; a second call reaches the same storage."""

    @abc.abstractmethod
    async def count_artifact_rows(self, request: pytest.FixtureRequest) -> tuple[int, int]:
        """(artifact rows, artifact chunk rows) in this test's storage, read from its tables directly
        on a connection of the test's own (not through the backend under test)."""

    @pytest.fixture
    async def backend(self, request: pytest.FixtureRequest) -> AsyncIterator[StoreBackend]:
        """An opened backend, closed after the test."""
        backend = self.create_backend(request)
        await backend.open()
        yield backend
        await backend.close()

    # -- compare-and-swap ------------------------------------------------------------------

    async def test_append_to_new_stream_numbers_events_from_one(self, backend: StoreBackend) -> None:
        result = await backend.append("s", Expected.no_stream(), events("a", "b", "c"))
        assert (result.first_seq, result.head_seq) == (1, 3)
        stored = await read_all(backend, "s")
        assert [(e.stream_id, e.seq, e.type, e.payload) for e in stored] == [
            ("s", 1, "a", b"a"),
            ("s", 2, "b", b"b"),
            ("s", 3, "c", b"c"),
        ]
        assert all(e.recorded_at_us > 0 for e in stored)

    async def test_an_append_answers_the_time_its_events_were_recorded_with(
        self, backend: StoreBackend
    ) -> None:
        # Appends of one group, plain, with an artifact and with attributes (each takes its own way
        # through a backend), then a later one: each answers exactly its own events' recorded time,
        # and a stream's first append its creation time.
        names = ("plain", "art", "attr")
        first = await asyncio.gather(
            backend.append("plain", Expected.no_stream(), events("a", "b")),
            backend.append("art", Expected.no_stream(), events("a"), artifacts=[NewArtifact("note", b"x")]),
            backend.append("attr", Expected.no_stream(), events("a"), attributes={"k": "v"}),
        )
        later = await backend.append("plain", Expected.exact(2), events("c"))
        for stream_id, result in zip(names, first, strict=True):
            stored = await read_all(backend, stream_id)
            assert result.recorded_at_us > 0
            assert {e.recorded_at_us for e in stored if e.seq <= result.head_seq} == {result.recorded_at_us}
        assert (await read_all(backend, "plain"))[2].recorded_at_us == later.recorded_at_us
        listed = {s.stream_id: s.created_at_us for s in (await backend.list_streams(page_size=10)).streams}
        assert listed == {sid: result.recorded_at_us for sid, result in zip(names, first, strict=True)}

    async def test_exact_expected_appends_after_matching_head(self, backend: StoreBackend) -> None:
        await backend.append("s", Expected.exact(0), events("a"))
        result = await backend.append("s", Expected.exact(1), events("b", "c"))
        assert (result.first_seq, result.head_seq) == (2, 3)

    async def test_exact_mismatch_is_conflict_with_actual_head_and_writes_nothing(
        self, backend: StoreBackend
    ) -> None:
        await backend.append("s", Expected.no_stream(), events("a", "b"))
        with pytest.raises(KeelError) as caught:
            await backend.append("s", Expected.exact(1), events("x", "y"))
        assert caught.value.code == "sequence_conflict"
        assert caught.value.category is ErrorCategory.CONFLICT
        assert caught.value.details["actual_seq"] == 2
        assert [e.type for e in await read_all(backend, "s")] == ["a", "b"]

    async def test_no_stream_on_existing_stream_is_conflict(self, backend: StoreBackend) -> None:
        await backend.append("s", Expected.any(), events("a"))
        with pytest.raises(KeelError) as caught:
            await backend.append("s", Expected.no_stream(), events("b"))
        assert caught.value.code == "sequence_conflict"
        assert caught.value.details["actual_seq"] == 1

    async def test_exact_on_missing_stream_reports_head_zero(self, backend: StoreBackend) -> None:
        with pytest.raises(KeelError) as caught:
            await backend.append("nope", Expected.exact(4), events("a"))
        assert caught.value.details["actual_seq"] == 0
        assert (await backend.head("nope")).head_seq == 0

    async def test_any_appends_after_whatever_the_head_is(self, backend: StoreBackend) -> None:
        first = await backend.append("s", Expected.any(), events("a", "b"))
        second = await backend.append("s", Expected.any(), events("c"))
        assert (first.first_seq, second.first_seq, second.head_seq) == (1, 3, 3)

    # -- append keys: a retry whose first try committed writes nothing ------------------------

    async def test_a_repeated_append_key_writes_nothing_and_answers_as_the_first(
        self, backend: StoreBackend
    ) -> None:
        first = await backend.append("s", Expected.any(), events("a", "b"), append_key="k1")
        await backend.append("s", Expected.any(), events("other"))
        again = await backend.append("s", Expected.any(), events("a", "b"), append_key="k1")
        assert (again.first_seq, again.head_seq, again.recorded_at_us) == (1, 2, first.recorded_at_us)
        assert again.repeated and not first.repeated
        fresh = await backend.append("s", Expected.any(), events("c"), append_key="k2")
        assert (fresh.first_seq, fresh.repeated) == (4, False)
        assert [e.type for e in await read_all(backend, "s")] == ["a", "b", "other", "c"]

    async def test_a_repeat_answers_whatever_its_expected_head_says(self, backend: StoreBackend) -> None:
        # An exact or new-stream append whose answer was lost meets a moved head on its retry: the
        # key is checked first, so the retry gets its own answer rather than sequence_conflict.
        await backend.append("s", Expected.no_stream(), events("a"), append_key="created")
        await backend.append("s", Expected.exact(1), events("b"), append_key="second")
        await backend.append("s", Expected.exact(2), events("c"))
        created = await backend.append("s", Expected.no_stream(), events("a"), append_key="created")
        second = await backend.append("s", Expected.exact(1), events("b"), append_key="second")
        assert [(r.first_seq, r.repeated) for r in (created, second)] == [(1, True), (2, True)]
        with pytest.raises(KeelError) as caught:
            await backend.append("s", Expected.exact(1), events("d"), append_key="third")
        assert caught.value.code == "sequence_conflict"
        assert [e.type for e in await read_all(backend, "s")] == ["a", "b", "c"]

    async def test_an_append_key_names_one_append_on_one_stream(self, backend: StoreBackend) -> None:
        one = await backend.append("one", Expected.any(), events("a"), append_key="k")
        two = await backend.append("two", Expected.any(), events("a"), append_key="k")
        assert (one.repeated, two.repeated) == (False, False)
        assert [len(await read_all(backend, sid)) for sid in ("one", "two")] == [1, 1]

    async def test_tries_of_one_keyed_append_in_one_group_commit_once(self, backend: StoreBackend) -> None:
        # A retry that reaches the store while its first try still waits for the same group.
        tries = await asyncio.gather(
            *(backend.append("s", Expected.any(), events("once"), append_key="k") for _ in range(5)),
            backend.append("s", Expected.any(), events("unkeyed")),
        )
        assert {(r.first_seq, r.head_seq) for r in tries[:5]} == {(tries[0].first_seq, tries[0].head_seq)}
        assert sum(not r.repeated for r in tries[:5]) == 1
        assert sorted(e.type for e in await read_all(backend, "s")) == ["once", "unkeyed"]

    async def test_a_repeat_sets_no_label_attribute_due_time_or_nudge(self, backend: StoreBackend) -> None:
        parked = StreamStatus.PARKED
        await backend.append("other", Expected.no_stream(), events("a"), status=parked)
        await backend.append(
            "s", Expected.any(), events("a"), append_key="k", attributes={"k": "first"}, due_at_us=500
        )
        await backend.append(
            "s",
            Expected.exact(1),
            events("b"),
            status=StreamStatus.COMPLETED,
            attributes={"k": "later"},
            due_at_us=0,
        )
        again = await backend.append(
            "s",
            Expected.any(),
            events("a"),
            append_key="k",
            status=StreamStatus.ACTIVE,
            attributes={"k": "repeat", "x": "1"},
            due_at_us=700,
            nudges={"other": 50},
        )
        assert again.repeated
        listed = {s.stream_id: s for s in (await backend.list_streams()).streams}
        assert listed["s"].status is StreamStatus.COMPLETED
        assert dict(listed["s"].attributes) == {"k": "later"}
        assert (await backend.list_due(10_000)).due == ()

    async def test_repeats_in_a_group_with_artifacts_leave_every_artifact_whole(
        self, backend: StoreBackend
    ) -> None:
        # A repeat's artifacts are not stored again, and the appends around it in the group (each
        # with artifacts of its own, several chunks long) still store theirs byte for byte.
        big, small, other = os.urandom(3 * 1024 * 1024 + 17), b"small", os.urandom(1024 * 1024 + 3)
        await backend.append(
            "s", Expected.any(), events("a"), append_key="k", artifacts=[NewArtifact("x", big)]
        )
        results = await asyncio.gather(
            backend.append(
                "s", Expected.any(), events("a"), append_key="k", artifacts=[NewArtifact("x", big)]
            ),
            backend.append(
                "s", Expected.any(), events("b"), append_key="k2", artifacts=[NewArtifact("x", small)]
            ),
            backend.append(
                "s", Expected.any(), events("b"), append_key="k2", artifacts=[NewArtifact("x", small)]
            ),
            backend.append("t", Expected.any(), events("c"), artifacts=[NewArtifact("y", other)]),
        )
        assert [(r.first_seq, r.repeated) for r in results] == [(1, True), (2, False), (2, True), (1, False)]
        for data in (big, small, other):
            assert await download(backend, sha(data)) == data
        assert [e.type for e in await read_all(backend, "s")] == ["a", "b"]

    async def test_a_repeat_reports_the_heads_as_they_are_now(self, backend: StoreBackend) -> None:
        await backend.append("children", Expected.any(), events("c1"))
        first = await backend.append(
            "s", Expected.any(), events("a"), append_key="k", report_heads=["children"]
        )
        await backend.append("children", Expected.any(), events("c2"))
        again = await backend.append(
            "s", Expected.any(), events("a"), append_key="k", report_heads=["children"]
        )
        assert (first.reported_heads, again.reported_heads, again.repeated) == ((1,), (2,), True)

    async def test_an_append_key_is_kept_with_its_first_event(self, request: pytest.FixtureRequest) -> None:
        backend = self.create_backend(request)
        await backend.open()
        try:
            await backend.append("s", Expected.any(), events("a", "b"), append_key="k")
        finally:
            await backend.close()
        reopened = self.create_backend(request)
        await reopened.open()
        try:
            assert (await reopened.append("s", Expected.any(), events("a", "b"), append_key="k")).repeated
            # Trimmed away with its first event (a trim keeps the head): the key is forgotten.
            await reopened.trim("s", 2)
            late = await reopened.append("s", Expected.any(), events("a", "b"), append_key="k")
            assert (late.first_seq, late.repeated) == (3, False)
        finally:
            await reopened.close()

    async def test_empty_batch_is_rejected(self, backend: StoreBackend) -> None:
        with pytest.raises(KeelError) as caught:
            await backend.append("s", Expected.any(), [])
        assert caught.value.code == "invalid_batch"

    async def test_conflict_in_one_append_does_not_fail_concurrent_others(
        self, backend: StoreBackend
    ) -> None:
        await backend.append("taken", Expected.no_stream(), events("a"))
        outcomes = await asyncio.gather(
            *(backend.append(f"free-{i}", Expected.no_stream(), events("x")) for i in range(20)),
            backend.append("taken", Expected.no_stream(), events("b")),
            *(backend.append(f"more-{i}", Expected.exact(0), events("y")) for i in range(20)),
            return_exceptions=True,
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(failures) == 1
        assert isinstance(failures[0], KeelError) and failures[0].code == "sequence_conflict"
        assert (await backend.head("free-7")).head_seq == 1
        assert (await backend.head("more-19")).head_seq == 1
        assert [e.type for e in await read_all(backend, "taken")] == ["a"]

    async def test_appends_to_one_stream_in_flight_together_chain_in_order(
        self, backend: StoreBackend
    ) -> None:
        results = await asyncio.gather(
            *(backend.append("chain", Expected.any(), events(f"e{i}")) for i in range(30))
        )
        seqs = sorted(r.first_seq for r in results)
        assert seqs == list(range(1, 31))
        stored = await read_all(backend, "chain")
        by_seq = {r.first_seq: f"e{i}" for i, r in enumerate(results)}
        assert [e.type for e in stored] == [by_seq[e.seq] for e in stored]

    # -- concurrency -----------------------------------------------------------------------

    async def test_many_writers_on_many_streams_lose_nothing(self, backend: StoreBackend) -> None:
        async def writer(stream: str) -> None:
            for n in range(15):
                await backend.append(stream, Expected.exact(n), events(f"{stream}:{n}"))

        streams = [f"stream-{i}" for i in range(40)]
        await asyncio.gather(*(writer(s) for s in streams))
        for stream in streams:
            stored = await read_all(backend, stream)
            assert [e.type for e in stored] == [f"{stream}:{n}" for n in range(15)]
            assert [e.seq for e in stored] == list(range(1, 16))

    async def test_racers_on_one_expected_seq_have_exactly_one_winner(self, backend: StoreBackend) -> None:
        await backend.append("race", Expected.no_stream(), events("start"))
        outcomes = await asyncio.gather(
            *(backend.append("race", Expected.exact(1), events(f"racer-{i}")) for i in range(64)),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if not isinstance(o, BaseException)]
        losers = [o for o in outcomes if isinstance(o, KeelError)]
        assert len(winners) == 1 and len(losers) == 63
        assert all(e.code == "sequence_conflict" and e.details["actual_seq"] == 2 for e in losers)
        assert len(await read_all(backend, "race")) == 2

    async def test_racers_retrying_on_head_neither_lose_duplicate_nor_reorder(
        self, backend: StoreBackend
    ) -> None:
        racers, each = 50, 4

        async def racer(name: str) -> int:
            conflicts = 0
            for n in range(each):
                while True:
                    head = (await backend.head("contended")).head_seq
                    try:
                        await backend.append("contended", Expected.exact(head), events(f"{name}/{n}"))
                        break
                    except KeelError as error:
                        assert error.code == "sequence_conflict"
                        assert error.details["actual_seq"] >= head
                        conflicts += 1
            return conflicts

        conflicts = await asyncio.gather(*(racer(f"r{i}") for i in range(racers)))
        stored = await read_all(backend, "contended")
        assert [e.seq for e in stored] == list(range(1, racers * each + 1))
        types = [e.type for e in stored]
        assert len(set(types)) == racers * each
        for i in range(racers):
            mine = [t for t in types if t.startswith(f"r{i}/")]
            assert mine == [f"r{i}/{n}" for n in range(each)]
        assert sum(conflicts) > 0  # the race really happened

    # -- reading ---------------------------------------------------------------------------

    async def test_read_pages_forward_with_next_seq_and_head(self, backend: StoreBackend) -> None:
        await backend.append("s", Expected.any(), events(*(f"e{i}" for i in range(1, 11))))
        page = await backend.read("s", 0, 4)
        assert [e.seq for e in page.events] == [1, 2, 3, 4]
        assert (page.next_seq, page.head_seq) == (5, 10)
        page = await backend.read("s", 9, 4)
        assert [e.seq for e in page.events] == [9, 10]
        assert (page.next_seq, page.head_seq) == (0, 10)
        page = await backend.read("s", 11, 4)
        assert (page.events, page.next_seq, page.head_seq) == ((), 0, 10)

    async def test_page_of_large_events_stops_at_the_byte_budget(self, backend: StoreBackend) -> None:
        """A page must fit one gRPC message however large its events; the rest follows by next_seq."""
        payload = b"x" * (1024 * 1024)
        count = READ_PAGE_BYTES // len(payload) + 4
        await backend.append("big", Expected.no_stream(), [NewEvent("Big", payload)] * count)
        page = await backend.read("big", 1, 1000)
        assert 0 < len(page.events) < count
        assert sum(len(e.payload) for e in page.events) <= READ_PAGE_BYTES
        assert page.next_seq == len(page.events) + 1 and page.head_seq == count
        assert [e.seq for e in await read_all(backend, "big")] == list(range(1, count + 1))

    async def test_unknown_stream_reads_empty_with_head_zero(self, backend: StoreBackend) -> None:
        page = await backend.read("ghost", 1, 10)
        assert (page.events, page.next_seq, page.head_seq) == ((), 0, 0)
        head = await backend.head("ghost")
        assert (head.head_seq, head.status) == (0, StreamStatus.UNSPECIFIED)

    async def test_payload_bytes_round_trip_exactly(self, backend: StoreBackend) -> None:
        payload = bytes(range(256)) * 40 + b"\x00"
        await backend.append("bin", Expected.any(), [NewEvent("Blob", payload), NewEvent("Empty", b"")])
        stored = await read_all(backend, "bin")
        assert [e.payload for e in stored] == [payload, b""]

    async def test_data_survives_reopening_the_storage(self, request: pytest.FixtureRequest) -> None:
        first = self.create_backend(request)
        await first.open()
        await first.append("kept", Expected.no_stream(), events("a", "b"), status=StreamStatus.ACTIVE)
        put = await first.put_artifact("blob", chunks_of(b"kept bytes", 3))
        await first.close()
        second = self.create_backend(request)
        await second.open()
        try:
            assert [e.type for e in await read_all(second, "kept")] == ["a", "b"]
            assert (await second.head("kept")).status is StreamStatus.ACTIVE
            assert await download(second, put.artifact_id) == b"kept bytes"
        finally:
            await second.close()

    # -- status labels and listing ---------------------------------------------------------

    async def test_status_label_is_set_with_append_and_kept_until_changed(
        self, backend: StoreBackend
    ) -> None:
        await backend.append("run", Expected.no_stream(), events("a"), status=StreamStatus.ACTIVE)
        assert (await backend.head("run")).status is StreamStatus.ACTIVE
        await backend.append("run", Expected.exact(1), events("b"))
        assert (await backend.head("run")).status is StreamStatus.ACTIVE
        await backend.append("run", Expected.exact(2), events("c"), status=StreamStatus.COMPLETED)
        head = await backend.head("run")
        assert (head.head_seq, head.status) == (3, StreamStatus.COMPLETED)

    async def test_conflicting_append_does_not_change_the_label(self, backend: StoreBackend) -> None:
        await backend.append("run", Expected.no_stream(), events("a"), status=StreamStatus.ACTIVE)
        with pytest.raises(KeelError):
            await backend.append("run", Expected.exact(0), events("b"), status=StreamStatus.FAILED)
        assert (await backend.head("run")).status is StreamStatus.ACTIVE

    async def test_list_streams_newest_first_filtered_by_status_and_prefix(
        self, backend: StoreBackend
    ) -> None:
        labels = [StreamStatus.ACTIVE, StreamStatus.COMPLETED, StreamStatus.FAILED, None, StreamStatus.ACTIVE]
        for i, label in enumerate(labels):
            await backend.append(f"run-{i}", Expected.no_stream(), events("x"), status=label)
        await backend.append("other-0", Expected.no_stream(), events("x"), status=StreamStatus.ACTIVE)
        everything = await backend.list_streams()
        assert [s.stream_id for s in everything.streams] == [
            "other-0",
            "run-4",
            "run-3",
            "run-2",
            "run-1",
            "run-0",
        ]
        assert everything.next_page_token == ""
        active = await backend.list_streams(statuses=[StreamStatus.ACTIVE])
        assert [s.stream_id for s in active.streams] == ["other-0", "run-4", "run-0"]
        done = await backend.list_streams(statuses=[StreamStatus.COMPLETED, StreamStatus.FAILED])
        assert [s.stream_id for s in done.streams] == ["run-2", "run-1"]
        prefixed = await backend.list_streams(statuses=[StreamStatus.ACTIVE], prefix="run-")
        assert [s.stream_id for s in prefixed.streams] == ["run-4", "run-0"]
        info = prefixed.streams[0]
        assert (info.head_seq, info.status) == (1, StreamStatus.ACTIVE)
        assert 0 < info.created_at_us <= info.updated_at_us

    async def test_list_streams_pages_cover_every_stream_once(self, backend: StoreBackend) -> None:
        await asyncio.gather(
            *(backend.append(f"p{i:02d}", Expected.no_stream(), events("x")) for i in range(23))
        )
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await backend.list_streams(page_size=5, page_token=token)
            pages += 1
            seen.extend(s.stream_id for s in page.streams)
            token = page.next_page_token
            if not token:
                break
        assert pages == 5
        assert sorted(seen) == [f"p{i:02d}" for i in range(23)]
        assert len(seen) == len(set(seen))

    async def test_updated_stream_keeps_its_place_in_the_listing(self, backend: StoreBackend) -> None:
        await backend.append("old", Expected.no_stream(), events("x"))
        await backend.append("new", Expected.no_stream(), events("x"))
        await backend.append("old", Expected.exact(1), events("y"), status=StreamStatus.COMPLETED)
        listed = await backend.list_streams()
        assert [s.stream_id for s in listed.streams] == ["new", "old"]
        assert listed.streams[1].head_seq == 2

    async def test_foreign_page_token_is_invalid_argument(self, backend: StoreBackend) -> None:
        await backend.append("a", Expected.no_stream(), events("x"))
        await backend.append("b", Expected.no_stream(), events("x"))
        real = (await backend.list_streams(page_size=1)).next_page_token
        # This backend's own token format with a position no database integer can hold.
        prefix = base64.urlsafe_b64decode(real.encode()).rstrip(b"0123456789")
        out_of_range = base64.urlsafe_b64encode(prefix + str(2**70).encode()).decode()
        # More digits than Python converts to an int (4300): still the client's bad token.
        too_many_digits = base64.urlsafe_b64encode(prefix + b"1" * 5000).decode()
        for token in ["garbage", "bm9wZQ==", "!!", out_of_range, too_many_digits]:
            with pytest.raises(KeelError) as caught:
                await backend.list_streams(page_token=token)
            assert caught.value.code == "invalid_page_token"
            assert caught.value.category is ErrorCategory.INVALID_ARGUMENT

    # -- the due-time index -----------------------------------------------------------------

    async def test_due_time_is_set_with_the_append_listed_earliest_first_and_cleared(
        self, backend: StoreBackend
    ) -> None:
        await backend.append(
            "run:a", Expected.no_stream(), events("x"), status=StreamStatus.PARKED, due_at_us=300
        )
        await backend.append("run:b", Expected.no_stream(), events("x"), due_at_us=100)
        await backend.append("run:c", Expected.no_stream(), events("x"), due_at_us=200)
        await backend.append("other:d", Expected.no_stream(), events("x"), due_at_us=50)
        await backend.append("run:e", Expected.no_stream(), events("x"))
        page = await backend.list_due(250, prefix="run:")
        assert [(d.stream_id, d.due_at_us, d.head_seq) for d in page.due] == [
            ("run:b", 100, 1),
            ("run:c", 200, 1),
        ]
        assert page.next_due_at_us == 300
        # An append without a due time keeps it; 0 clears it; a new one replaces it.
        await backend.append("run:b", Expected.exact(1), events("y"))
        await backend.append("run:c", Expected.exact(1), events("y"), due_at_us=0)
        await backend.append("run:a", Expected.exact(1), events("y"), due_at_us=150)
        page = await backend.list_due(10_000, prefix="run:")
        assert [(d.stream_id, d.due_at_us, d.head_seq) for d in page.due] == [
            ("run:b", 100, 2),
            ("run:a", 150, 2),
        ]
        assert page.next_due_at_us == 0
        assert [d.stream_id for d in (await backend.list_due(60)).due] == ["other:d"]
        assert (await backend.head("run:a")).status is StreamStatus.PARKED

    async def test_list_due_stops_at_its_limit_and_names_the_next_due_time(
        self, backend: StoreBackend
    ) -> None:
        for i in range(5):
            await backend.append(f"s{i}", Expected.no_stream(), events("x"), due_at_us=10 + i)
        page = await backend.list_due(100, limit=3)
        assert [d.stream_id for d in page.due] == ["s0", "s1", "s2"]
        assert page.next_due_at_us == 13

    async def test_conflicting_append_sets_no_due_time(self, backend: StoreBackend) -> None:
        await backend.append("r", Expected.no_stream(), events("a"), due_at_us=500)
        with pytest.raises(KeelError):
            await backend.append("r", Expected.exact(0), events("b"), due_at_us=0)
        with pytest.raises(KeelError):
            await backend.append("new", Expected.exact(3), events("b"), due_at_us=5)
        page = await backend.list_due(1000)
        assert [(d.stream_id, d.due_at_us) for d in page.due] == [("r", 500)]

    async def test_parked_streams_are_listed_under_their_own_label_only(self, backend: StoreBackend) -> None:
        await backend.append("p", Expected.no_stream(), events("a"), status=StreamStatus.ACTIVE)
        await backend.append("p", Expected.exact(1), events("b"), status=StreamStatus.PARKED, due_at_us=9)
        await backend.append("q", Expected.no_stream(), events("a"), status=StreamStatus.ACTIVE)
        active = await backend.list_streams(statuses=[StreamStatus.ACTIVE])
        parked = await backend.list_streams(statuses=[StreamStatus.PARKED])
        assert [s.stream_id for s in active.streams] == ["q"]
        assert [s.stream_id for s in parked.streams] == ["p"]

    async def test_a_nudge_moves_only_a_parked_streams_due_time_and_only_earlier(
        self, backend: StoreBackend
    ) -> None:
        await backend.append(
            "p", Expected.no_stream(), events("a"), status=StreamStatus.PARKED, due_at_us=500
        )
        await backend.append("q", Expected.no_stream(), events("a"), status=StreamStatus.PARKED)
        await backend.append("r", Expected.no_stream(), events("a"), status=StreamStatus.ACTIVE)
        assert await backend.nudge_due("p", 100)
        assert await backend.nudge_due("p", 300)  # later than its due time: it stays at 100
        assert await backend.nudge_due("q", 200)  # parked without a due time: it gets one
        assert not await backend.nudge_due("r", 50)  # not parked: left alone
        assert not await backend.nudge_due("unknown", 50)
        page = await backend.list_due(1000)
        assert [(d.stream_id, d.due_at_us) for d in page.due] == [("p", 100), ("q", 200)]
        await backend.append("p", Expected.exact(1), events("b"), status=StreamStatus.ACTIVE, due_at_us=0)
        assert not await backend.nudge_due("p", 10)
        assert [d.stream_id for d in (await backend.list_due(1000)).due] == ["q"]

    async def test_an_appends_nudges_move_parked_streams_due_only_if_it_commits(
        self, backend: StoreBackend
    ) -> None:
        await backend.append("parent", Expected.no_stream(), events("a"), status=StreamStatus.PARKED)
        parked = StreamStatus.PARKED
        await backend.append("late", Expected.no_stream(), events("a"), status=parked, due_at_us=50)
        await backend.append("busy", Expected.no_stream(), events("a"), status=StreamStatus.ACTIVE)
        await backend.append("child", Expected.no_stream(), events("a"))
        # A conflicting append nudges nothing.
        with pytest.raises(KeelError):
            await backend.append("child", Expected.exact(5), events("b"), nudges={"parent": 10})
        assert [d.stream_id for d in (await backend.list_due(1000)).due] == ["late"]
        nudges = {"parent": 100, "late": 300, "busy": 20, "unknown": 20}
        await backend.append("child", Expected.exact(1), events("b"), nudges=nudges)
        page = await backend.list_due(1000)
        # Parked streams only, and only earlier; the active and the unknown ones are left alone.
        assert [(d.stream_id, d.due_at_us) for d in page.due] == [("late", 50), ("parent", 100)]
        assert (await backend.head("parent")).head_seq == 1  # nothing appended to a nudged stream

    async def test_an_append_reports_the_heads_it_asks_for_only_if_it_commits(
        self, backend: StoreBackend
    ) -> None:
        await backend.append("children", Expected.no_stream(), events("a", "b"))
        await backend.append("run", Expected.no_stream(), events("a"))
        with pytest.raises(KeelError) as conflict:
            await backend.append("run", Expected.exact(5), events("b"), report_heads=("children",))
        assert conflict.value.code == "sequence_conflict"
        result = await backend.append(
            "run", Expected.exact(1), events("b"), report_heads=("children", "none", "run")
        )
        # In request order; a stream without events is 0; the append's own stream shows its events.
        assert result.reported_heads == (2, 0, 2)
        assert (await backend.append("run", Expected.exact(2), events("c"))).reported_heads == ()

    async def test_heads_reported_in_one_group_are_each_appends_own_and_a_conflict_spoils_none(
        self, backend: StoreBackend
    ) -> None:
        # Many runs ending at once, each asking for its children stream's head: one group commit.
        for i in range(0, 20, 2):
            await backend.append(f"children{i}", Expected.no_stream(), events(*["x"] * (i + 1)))
        await backend.append("run7", Expected.no_stream(), events("a"))  # its own append below conflicts
        outcomes = await asyncio.gather(
            *(
                backend.append(f"run{i}", Expected.no_stream(), events("a"), report_heads=(f"children{i}",))
                for i in range(20)
            ),
            return_exceptions=True,
        )
        for i, outcome in enumerate(outcomes):
            if i == 7:
                assert isinstance(outcome, KeelError) and outcome.code == "sequence_conflict"
            else:
                assert isinstance(outcome, AppendResult), outcome
                assert outcome.reported_heads == ((i + 1 if i % 2 == 0 else 0),)

    async def test_nudges_of_many_appends_in_one_group_all_land_at_the_soonest_time(
        self, backend: StoreBackend
    ) -> None:
        await backend.append("parent", Expected.no_stream(), events("a"), status=StreamStatus.PARKED)
        await asyncio.gather(
            *(
                backend.append(f"child{i}", Expected.no_stream(), events("a"), nudges={"parent": 1000 - i})
                for i in range(20)
            )
        )
        page = await backend.list_due(2000)
        assert [(d.stream_id, d.due_at_us) for d in page.due] == [("parent", 981)]

    async def test_due_times_of_many_appends_in_one_group_all_land(self, backend: StoreBackend) -> None:
        await asyncio.gather(
            *(
                backend.append(f"g{i}", Expected.no_stream(), events("a"), due_at_us=1000 - i)
                for i in range(50)
            )
        )
        page = await backend.list_due(2000, limit=1000)
        assert [d.stream_id for d in page.due] == [f"g{i}" for i in reversed(range(50))]

    # -- attributes ------------------------------------------------------------------------

    async def test_attributes_are_set_with_the_append_and_listed(self, backend: StoreBackend) -> None:
        await backend.append("r1", Expected.no_stream(), events("x"), attributes={"team": "a", "env": "prod"})
        await backend.append("r1", Expected.exact(1), events("y"), attributes={"env": "dev"})
        await backend.append("r2", Expected.no_stream(), events("x"))
        listed = await backend.list_streams()
        assert [(s.stream_id, dict(s.attributes)) for s in listed.streams] == [
            ("r2", {}),
            ("r1", {"team": "a", "env": "dev"}),
        ]

    async def test_conflicting_append_sets_no_attribute(self, backend: StoreBackend) -> None:
        await backend.append("r", Expected.no_stream(), events("a"), attributes={"k": "first"})
        with pytest.raises(KeelError):
            await backend.append("r", Expected.no_stream(), events("b"), attributes={"k": "lost", "x": "1"})
        with pytest.raises(KeelError):
            await backend.append("new", Expected.exact(3), events("b"), attributes={"k": "lost"})
        listed = await backend.list_streams()
        assert [(s.stream_id, dict(s.attributes)) for s in listed.streams] == [("r", {"k": "first"})]
        assert (await backend.list_streams(attributes={"k": "lost"})).streams == ()

    async def test_list_streams_by_attributes_is_an_and_of_exact_matches(self, backend: StoreBackend) -> None:
        rows = [("a", "x"), ("a", "y"), ("b", "x"), ("a", "x")]
        for i, (team, env) in enumerate(rows):
            await backend.append(
                f"s{i}", Expected.no_stream(), events("e"), attributes={"team": team, "env": env}
            )
        await backend.append("s4", Expected.no_stream(), events("e"), status=StreamStatus.ACTIVE)

        async def ids(**filters: object) -> list[str]:
            page = await backend.list_streams(**filters)  # type: ignore[arg-type]
            return [s.stream_id for s in page.streams]

        assert await ids(attributes={"team": "a"}) == ["s3", "s1", "s0"]
        assert await ids(attributes={"team": "a", "env": "x"}) == ["s3", "s0"]
        assert await ids(attributes={"team": "a", "env": "nope"}) == []
        assert await ids(attributes={"team": "a"}, prefix="s1") == ["s1"]
        assert await ids(attributes={"team": "b"}, statuses=[StreamStatus.ACTIVE]) == []

    async def test_list_streams_by_attribute_pages_with_tokens(self, backend: StoreBackend) -> None:
        for i in range(12):
            group = "even" if i % 2 == 0 else "odd"
            await backend.append(f"p{i:02d}", Expected.no_stream(), events("x"), attributes={"g": group})
        seen: list[str] = []
        token = ""
        while True:
            page = await backend.list_streams(attributes={"g": "even"}, page_size=4, page_token=token)
            seen.extend(s.stream_id for s in page.streams)
            token = page.next_page_token
            if not token:
                break
        assert seen == [f"p{i:02d}" for i in range(10, -1, -2)]

    async def test_list_streams_by_creation_time(self, backend: StoreBackend) -> None:
        await backend.append("early", Expected.no_stream(), events("x"))
        await asyncio.sleep(0.01)
        await backend.append("late", Expected.no_stream(), events("x"))
        listed = {s.stream_id: s for s in (await backend.list_streams()).streams}
        cut = listed["late"].created_at_us
        assert cut > listed["early"].created_at_us
        after = await backend.list_streams(created_after_us=cut)
        before = await backend.list_streams(created_before_us=cut)
        assert [s.stream_id for s in after.streams] == ["late"]
        assert [s.stream_id for s in before.streams] == ["early"]

    async def test_a_finished_streams_end_is_its_first_terminal_label_and_later_appends_keep_it(
        self, backend: StoreBackend
    ) -> None:
        await backend.append("s", Expected.no_stream(), events("a"), status=StreamStatus.ACTIVE)
        await backend.append("s", Expected.exact(1), events("b"), status=StreamStatus.COMPLETED)

        async def listed() -> StreamInfo:
            return (await backend.list_streams(prefix="s")).streams[0]

        ended = await listed()
        assert ended.ended_at_us == ended.updated_at_us > 0
        await backend.append("s", Expected.exact(2), events("c"))  # the label stays COMPLETED
        await backend.append("s", Expected.exact(3), events("d"), status=StreamStatus.FAILED)
        later = await listed()
        assert later.updated_at_us > ended.ended_at_us
        assert later.ended_at_us == ended.ended_at_us
        await backend.append("s", Expected.exact(4), events("e"), status=StreamStatus.ACTIVE)
        assert (await listed()).ended_at_us == 0  # reopened: not ended any more

    async def test_a_stream_created_finished_ends_when_it_is_created(self, backend: StoreBackend) -> None:
        await backend.append("s", Expected.no_stream(), events("a", "b"), status=StreamStatus.CANCELED)
        await backend.append("t", Expected.no_stream(), events("a"), status=StreamStatus.PARKED)
        listed = {s.stream_id: s for s in (await backend.list_streams()).streams}
        assert listed["s"].ended_at_us == listed["s"].created_at_us
        assert listed["t"].ended_at_us == 0

    async def test_list_streams_by_duration_stops_a_finished_streams_at_its_end(
        self, backend: StoreBackend
    ) -> None:
        await backend.append("done", Expected.no_stream(), events("a"), status=StreamStatus.ACTIVE)
        await backend.append("done", Expected.exact(1), events("b"), status=StreamStatus.COMPLETED)
        await backend.append("live", Expected.no_stream(), events("a"), status=StreamStatus.ACTIVE)
        found = {s.stream_id: s for s in (await backend.list_streams()).streams}
        done, live = found["done"], found["live"]
        took = done.ended_at_us - done.created_at_us
        assert isinstance(backend, SqlStoreBackend)

        async def ids(now: int, low: int | None, high: int | None) -> list[str]:
            backend.now_us = lambda: now
            page = await backend.list_streams(min_duration_us=low, max_duration_us=high)
            return [s.stream_id for s in page.streams]

        hour = 3_600_000_000
        # An hour after "live" started it has run an hour; "done" still took what it took.
        later = live.created_at_us + hour
        assert await ids(later, took, took) == ["done"]
        assert await ids(later, hour, hour) == ["live"]
        assert await ids(later, hour + 1, None) == []
        assert await ids(later, None, hour - 1) == ["done"]
        assert await ids(later, 0, None) == ["live", "done"]
        # A day on, nothing about "done" moved, not even after another append to it.
        await backend.append("done", Expected.exact(2), events("c"))
        assert await ids(later + 24 * hour, None, took) == ["done"]
        assert await ids(later + 24 * hour, 25 * hour, None) == ["live"]

    async def test_duration_filters_combine_with_the_others_and_page(self, backend: StoreBackend) -> None:
        for i in range(7):
            status = StreamStatus.FAILED if i % 2 else StreamStatus.ACTIVE
            await backend.append(
                f"d{i}", Expected.no_stream(), events("a"), status=status, attributes={"k": "v"}
            )
        assert isinstance(backend, SqlStoreBackend)
        newest = (await backend.list_streams()).streams[0]
        backend.now_us = lambda: newest.created_at_us + 3_600_000_000  # the live ones ran at least an hour
        seen: list[str] = []
        token = ""
        while True:
            page = await backend.list_streams(
                attributes={"k": "v"}, min_duration_us=3_600_000_000, page_size=2, page_token=token
            )
            seen.extend(s.stream_id for s in page.streams)
            token = page.next_page_token
            if not token:
                break
        assert seen == ["d6", "d4", "d2", "d0"]
        quick = await backend.list_streams(statuses=[StreamStatus.FAILED], max_duration_us=0, prefix="d")
        assert [s.stream_id for s in quick.streams] == ["d5", "d3", "d1"]

    # -- trimming --------------------------------------------------------------------------

    async def test_trim_deletes_events_below_and_keeps_head_and_label(self, backend: StoreBackend) -> None:
        await backend.append("t", Expected.no_stream(), events(*(f"e{i}" for i in range(1, 11))))
        await backend.append("t", Expected.exact(10), events("e11"), status=StreamStatus.ACTIVE)
        result = await backend.trim("t", 9)
        assert (result.removed, result.head_seq) == (8, 11)
        assert [e.seq for e in await read_all(backend, "t")] == [9, 10, 11]
        head = await backend.head("t")
        assert (head.head_seq, head.status) == (11, StreamStatus.ACTIVE)
        again = await backend.trim("t", 9)
        assert (again.removed, again.head_seq) == (0, 11)

    async def test_read_from_a_trimmed_range_starts_at_the_first_kept_event(
        self, backend: StoreBackend
    ) -> None:
        await backend.append("t", Expected.no_stream(), events(*(f"e{i}" for i in range(1, 21))))
        await backend.trim("t", 15)
        page = await backend.read("t", 1, 3)
        assert [e.seq for e in page.events] == [15, 16, 17]
        assert (page.next_seq, page.head_seq) == (18, 20)
        page = await backend.read("t", 0, 100)
        assert [e.seq for e in page.events] == list(range(15, 21))
        assert page.next_seq == 0

    async def test_append_after_trim_still_needs_the_true_head(self, backend: StoreBackend) -> None:
        await backend.append("t", Expected.no_stream(), events("a", "b", "c"))
        result = await backend.trim("t", 4)  # head + 1: every event goes, the head stays
        assert (result.removed, result.head_seq) == (3, 3)
        page = await backend.read("t", 1, 10)
        assert (page.events, page.next_seq, page.head_seq) == ((), 0, 3)
        for stale in (Expected.exact(0), Expected.exact(2), Expected.no_stream()):
            with pytest.raises(KeelError) as caught:
                await backend.append("t", stale, events("x"))
            assert caught.value.code == "sequence_conflict"
            assert caught.value.details["actual_seq"] == 3
        appended = await backend.append("t", Expected.exact(3), events("d"))
        assert (appended.first_seq, appended.head_seq) == (4, 4)
        assert [(e.seq, e.type) for e in await read_all(backend, "t")] == [(4, "d")]

    async def test_trim_past_head_plus_one_is_invalid_and_deletes_nothing(
        self, backend: StoreBackend
    ) -> None:
        await backend.append("t", Expected.no_stream(), events("a", "b"))
        with pytest.raises(KeelError) as caught:
            await backend.trim("t", 4)
        assert caught.value.code == "invalid_sequence"
        assert caught.value.category is ErrorCategory.INVALID_ARGUMENT
        assert caught.value.details["head_seq"] == 2
        assert [e.seq for e in await read_all(backend, "t")] == [1, 2]

    async def test_trim_of_an_unknown_stream_is_an_empty_one(self, backend: StoreBackend) -> None:
        for before in (0, 1):
            result = await backend.trim("ghost", before)
            assert (result.removed, result.head_seq) == (0, 0)
        with pytest.raises(KeelError) as caught:
            await backend.trim("ghost", 2)
        assert caught.value.code == "invalid_sequence"
        head = await backend.head("ghost")
        assert (head.head_seq, head.status) == (0, StreamStatus.UNSPECIFIED)

    async def test_trims_racing_appends_lose_and_duplicate_nothing(self, backend: StoreBackend) -> None:
        """Appends with compare-and-swap and trims of the same stream interleave freely."""
        await backend.append("race", Expected.no_stream(), events("e1"))
        racers, each = 4, 15
        won: list[int] = []

        async def appender(index: int) -> None:
            done = 0
            while done < each:
                head = (await backend.head("race")).head_seq
                try:
                    result = await backend.append("race", Expected.exact(head), events(f"r{index}/{done}"))
                except KeelError as error:
                    assert error.code == "sequence_conflict"
                    continue
                assert result.first_seq == head + 1
                won.append(result.first_seq)
                done += 1

        async def trimmer() -> None:
            for _ in range(30):
                head = (await backend.head("race")).head_seq
                await backend.trim("race", max(1, head - 2))
                await asyncio.sleep(0)

        await asyncio.gather(*(appender(i) for i in range(racers)), trimmer())
        total = 1 + racers * each
        assert sorted(won) == list(range(2, total + 1))  # every sequence won exactly once
        assert (await backend.head("race")).head_seq == total
        kept = await read_all(backend, "race")
        assert kept and kept[-1].seq == total
        assert [e.seq for e in kept] == list(range(kept[0].seq, total + 1))

    # -- subscriptions ---------------------------------------------------------------------

    async def test_subscribe_yields_existing_then_live_events(self, backend: StoreBackend) -> None:
        await backend.append("feed", Expected.no_stream(), events("a", "b", "c"))
        received: list[StoredEvent] = []
        got_three = asyncio.Event()
        got_five = asyncio.Event()

        async def consume() -> None:
            async for event in backend.subscribe("feed", 1):
                received.append(event)
                if len(received) == 2:
                    got_three.set()
                if len(received) == 4:
                    got_five.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_three.wait(), 10)
        await backend.append("feed", Expected.exact(3), events("d"))
        await backend.append("other", Expected.any(), events("noise"))
        await backend.append("feed", Expected.exact(4), events("e"))
        await asyncio.wait_for(got_five.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [(e.seq, e.type) for e in received] == [(2, "b"), (3, "c"), (4, "d"), (5, "e")]

    async def test_subscribe_to_empty_stream_wakes_on_first_append(self, backend: StoreBackend) -> None:
        subscription = backend.subscribe("later", 0)
        first = asyncio.ensure_future(anext(subscription))
        await asyncio.sleep(0.05)
        assert not first.done()
        await backend.append("later", Expected.no_stream(), events("hello"))
        event = await asyncio.wait_for(first, 10)
        assert (event.seq, event.type) == (1, "hello")
        aclose = getattr(subscription, "aclose", None)
        if aclose is not None:
            await aclose()

    async def test_many_subscribers_each_see_every_event_in_order(self, backend: StoreBackend) -> None:
        async def collect(count: int) -> list[int]:
            out: list[int] = []
            async for event in backend.subscribe("fan", 0):
                out.append(event.seq)
                if len(out) == count:
                    break
            return out

        tasks = [asyncio.create_task(collect(25)) for _ in range(10)]
        for n in range(25):
            await backend.append("fan", Expected.exact(n), events(f"e{n}"))
        results = await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert all(r == list(range(1, 26)) for r in results)

    async def test_subscription_ends_when_the_backend_closes(self, request: pytest.FixtureRequest) -> None:
        backend = self.create_backend(request)
        await backend.open()
        await backend.append("s", Expected.any(), events("a"))
        seen: list[int] = []

        async def consume() -> None:
            async for event in backend.subscribe("s", 0):
                seen.append(event.seq)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        await backend.close()
        await asyncio.wait_for(task, 10)
        assert seen == [1]

    # -- artifacts -------------------------------------------------------------------------

    async def test_put_artifact_addresses_by_sha256_and_repeat_is_noop(self, backend: StoreBackend) -> None:
        data = os.urandom(300_000)
        first = await backend.put_artifact("blob", chunks_of(data, 65_536))
        assert (first.artifact_id, first.size, first.created) == (sha(data), len(data), True)
        again = await backend.put_artifact("blob", chunks_of(data, 7_000))
        assert (again.artifact_id, again.size, again.created) == (sha(data), len(data), False)
        info = await backend.has_artifact(first.artifact_id)
        assert info is not None and (info.kind, info.size) == ("blob", len(data))
        assert await download(backend, first.artifact_id) == data

    async def test_multi_chunk_artifact_round_trips_in_chunks(self, backend: StoreBackend) -> None:
        data = os.urandom(5 * 1024 * 1024 + 12_345)
        put = await backend.put_artifact("big", chunks_of(data, 300_001))
        got = await backend.get_artifact(put.artifact_id)
        assert (got.info.kind, got.info.size) == ("big", len(data))
        parts = [chunk async for chunk in got.chunks]
        assert len(parts) > 1
        assert all(len(p) <= 4 * 1024 * 1024 for p in parts)
        assert b"".join(parts) == data

    async def test_empty_artifact_is_stored(self, backend: StoreBackend) -> None:
        put = await backend.put_artifact("nothing", chunks_of(b"", 10))
        assert (put.artifact_id, put.size, put.created) == (sha(b""), 0, True)
        assert await download(backend, put.artifact_id) == b""

    async def test_missing_artifact_is_not_found(self, backend: StoreBackend) -> None:
        missing = sha(b"never stored")
        assert await backend.has_artifact(missing) is None
        with pytest.raises(KeelError) as caught:
            await backend.get_artifact(missing)
        assert caught.value.code == "artifact_not_found"
        assert caught.value.category is ErrorCategory.NOT_FOUND

    async def test_concurrent_puts_of_same_bytes_create_once(self, backend: StoreBackend) -> None:
        data = os.urandom(2 * 1024 * 1024)
        puts = await asyncio.gather(
            *(backend.put_artifact("dup", chunks_of(data, 500_000)) for _ in range(5))
        )
        assert [p.created for p in puts].count(True) == 1
        assert {p.artifact_id for p in puts} == {sha(data)}
        assert await download(backend, sha(data)) == data

    async def test_upload_refused_part_way_leaves_no_artifact_and_no_chunk(
        self, backend: StoreBackend, request: pytest.FixtureRequest
    ) -> None:
        """StoreService refuses an upload that passes its cap by raising from the chunk source.

        7 MiB have been handed over by then: more than a backend keeps in memory, so it has
        written chunks. When put_artifact raises, none of them may be left, and nothing published.
        """
        mib = 1024 * 1024
        data = os.urandom(9 * mib)
        handed_over = 0

        async def refused_after_seven_mib() -> AsyncIterator[bytes]:
            nonlocal handed_over
            async for chunk in chunks_of(data, mib):
                yield chunk
                handed_over += len(chunk)
                if handed_over == 7 * mib:
                    raise limits.artifact_too_large("the artifact", 7 * mib, 8 * mib)

        with pytest.raises(KeelError) as caught:
            await backend.put_artifact("refused", refused_after_seven_mib())
        assert caught.value.code == "artifact_too_large"
        assert handed_over == 7 * mib
        assert await backend.has_artifact(sha(data)) is None
        rows = await self.count_artifact_rows(request)
        assert rows == (0, 0), f"(artifacts, chunks) left by the refused upload: {rows}"
        # The same bytes sent whole afterwards are a new artifact, not taken for a repeat.
        put = await backend.put_artifact("whole", chunks_of(data, mib))
        assert (put.artifact_id, put.size, put.created) == (sha(data), len(data), True)
        assert await download(backend, put.artifact_id) == data
        assert await self.count_artifact_rows(request) == (1, 9)

    async def test_inline_artifacts_are_stored_with_the_append(self, backend: StoreBackend) -> None:
        snapshot = os.urandom(2 * 1024 * 1024 + 1)
        result = await backend.append(
            "run",
            Expected.no_stream(),
            events("Checkpoint"),
            artifacts=[NewArtifact("snapshot", snapshot), NewArtifact("note", b"hi")],
        )
        assert result.artifact_ids == (sha(snapshot), sha(b"hi"))
        assert await download(backend, sha(snapshot)) == snapshot
        info = await backend.has_artifact(sha(b"hi"))
        assert info is not None and info.kind == "note"
        again = await backend.append(
            "run", Expected.exact(1), events("Again"), artifacts=[NewArtifact("note", b"hi")]
        )
        assert again.artifact_ids == (sha(b"hi"),)

    async def test_inline_artifacts_of_a_conflicting_append_are_not_stored(
        self, backend: StoreBackend
    ) -> None:
        await backend.append("run", Expected.no_stream(), events("a"))
        with pytest.raises(KeelError):
            await backend.append(
                "run", Expected.no_stream(), events("b"), artifacts=[NewArtifact("snapshot", b"lost")]
            )
        assert await backend.has_artifact(sha(b"lost")) is None

    # -- lifecycle -------------------------------------------------------------------------

    async def test_a_closed_backend_refuses_every_call_as_store_unavailable(
        self, request: pytest.FixtureRequest
    ) -> None:
        backend = self.create_backend(request)
        await backend.open()
        await backend.append("s", Expected.no_stream(), events("a"))
        await backend.close()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: backend.append("s", Expected.any(), events("b")),
            lambda: backend.read("s", 1, 10),
            lambda: backend.head("s"),
            lambda: backend.trim("s", 1),
            lambda: backend.list_streams(),
            lambda: backend.has_artifact(sha(b"x")),
            lambda: backend.put_artifact("blob", chunks_of(b"x", 1)),
        ]
        for call in calls:
            with pytest.raises(KeelError) as caught:
                await call()
            assert (caught.value.code, caught.value.category) == (
                "store_unavailable",
                ErrorCategory.UNAVAILABLE,
            )
            assert caught.value.retryable

    # -- deletion (retention) ----------------------------------------------------------------

    async def test_delete_streams_removes_events_head_label_and_attributes_at_once(
        self, backend: StoreBackend
    ) -> None:
        await backend.append("d:a", Expected.no_stream(), events("a1", "a2"), status=StreamStatus.COMPLETED)
        await backend.append("d:b", Expected.no_stream(), events("b1"), attributes={"k": "v"})
        await backend.append("d:keep", Expected.no_stream(), events("k1"), attributes={"k": "v"})
        await backend.append("d:a", Expected.exact(2), events("a3"), due_at_us=1_000)
        assert [d.stream_id for d in (await backend.list_due(2_000, prefix="d:")).due] == ["d:a"]
        assert await backend.delete_streams(["d:a", "d:b", "d:unknown"]) == 2
        assert (await backend.list_due(2_000, prefix="d:")).due == ()
        for gone in ("d:a", "d:b"):
            assert await read_all(backend, gone) == []
            assert (await backend.head(gone)).head_seq == 0
        listed = await backend.list_streams(prefix="d:")
        assert [s.stream_id for s in listed.streams] == ["d:keep"]
        by_attribute = await backend.list_streams(attributes={"k": "v"})
        assert [s.stream_id for s in by_attribute.streams] == ["d:keep"]
        assert await backend.delete_streams(["d:a"]) == 0
        # A deleted stream's id starts again from head 0.
        again = await backend.append("d:a", Expected.no_stream(), events("new"))
        assert (again.first_seq, again.head_seq) == (1, 1)

    async def test_list_and_delete_artifacts_keep_what_was_stored_again_since_the_cutoff(
        self, backend: StoreBackend
    ) -> None:
        old = await backend.put_artifact("blob", chunks_of(b"old bytes", 4))
        appended = await backend.append(
            "s", Expected.no_stream(), events("e"), artifacts=[NewArtifact("x", b"inline")]
        )
        inline_old = appended.artifact_ids[0]
        page = await backend.list_artifacts(now_us() + 1_000_000, 100, "")
        listed = {a.artifact_id: a for a in page.artifacts}
        assert {old.artifact_id, inline_old} <= set(listed)
        assert listed[old.artifact_id].size == len(b"old bytes")
        cutoff = max(a.stored_at_us for a in page.artifacts) + 1
        deleted = await backend.delete_artifacts([old.artifact_id, sha(b"never stored")], cutoff)
        assert deleted == [old.artifact_id]
        assert await backend.has_artifact(old.artifact_id) is None
        with pytest.raises(KeelError) as caught:
            await backend.get_artifact(old.artifact_id)
        assert caught.value.code == "artifact_not_found"
        # Stored again after the cut-off (here: a cut-off before its stored time): kept.
        stored = listed[inline_old].stored_at_us
        assert await backend.delete_artifacts([inline_old], stored) == []
        assert await backend.has_artifact(inline_old) is not None
        # Bytes deleted can be stored again, whole.
        back = await backend.put_artifact("blob", chunks_of(b"old bytes", 2))
        assert back.created and await download(backend, back.artifact_id) == b"old bytes"

    async def test_list_artifacts_pages_oldest_first_without_repeats(self, backend: StoreBackend) -> None:
        ids = [
            (await backend.put_artifact("p", chunks_of(f"page {i}".encode(), 3))).artifact_id
            for i in range(7)
        ]
        seen: list[str] = []
        token = ""
        while True:
            page = await backend.list_artifacts(now_us() + 1_000_000, 3, token)
            seen += [a.artifact_id for a in page.artifacts]
            token = page.next_page_token
            if not token:
                break
        assert sorted(seen) == sorted(set(ids)) and len(seen) == len(set(seen))
        listed = await backend.list_artifacts(now_us() + 1_000_000, 100, "")
        times = [a.stored_at_us for a in listed.artifacts]
        assert times == sorted(times)
        with pytest.raises(KeelError) as caught:
            await backend.list_artifacts(now_us(), 3, "bm90IGEgdG9rZW4=")
        assert caught.value.code == "invalid_page_token"

    async def test_bytes_stored_again_renew_the_artifact_against_a_collection(
        self, backend: StoreBackend
    ) -> None:
        assert isinstance(backend, SqlStoreBackend)
        backend.renew_after_us = 0  # renew on every repeat (in production: at most once a minute)
        put = await backend.put_artifact("blob", chunks_of(b"shared", 3))
        first = {
            a.artifact_id: a.stored_at_us
            for a in (await backend.list_artifacts(now_us() + 10**6, 100, "")).artifacts
        }
        cutoff = first[put.artifact_id] + 1  # a collection decided it was unreferenced as of then
        await backend.append(
            "uses", Expected.no_stream(), events("e"), artifacts=[NewArtifact("blob", b"shared")]
        )
        assert await backend.delete_artifacts([put.artifact_id], cutoff) == []
        assert await download(backend, put.artifact_id) == b"shared"
        again = await backend.put_artifact("blob", chunks_of(b"shared", 2))
        assert not again.created
        renewed = {
            a.artifact_id: a.stored_at_us
            for a in (await backend.list_artifacts(now_us() + 10**6, 100, "")).artifacts
        }
        assert renewed[put.artifact_id] > first[put.artifact_id]
