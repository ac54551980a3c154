"""The children stream's links as data: encoded, read back, first link of each child kept."""

from __future__ import annotations

import asyncio
import uuid

from engine_service.domain.canonical import canonical_json_bytes
from engine_service.domain.child_runs import CLOSE_ABANDON, ChildLink, child_links, child_run_id
from engine_service.domain.streams import CHILD_LINKED, children_stream_id
from engine_service.runtime.children import (
    MAX_LINK_BYTES_PER_APPEND,
    MAX_LINKS_PER_APPEND,
    _Linking,
    _next_batch,
)

PARENT = str(uuid.uuid4())


def link(key: str, manifest: str = "sha256:a", policy: str = "cancel") -> ChildLink:
    """A link of the child `key` of PARENT."""
    return ChildLink(PARENT, key, child_run_id(PARENT, key), manifest, "keel.echo", policy)


def test_a_link_reads_back_as_written() -> None:
    written = link("b", policy=CLOSE_ABANDON)
    assert child_links([written.encode(at_us=1)]) == [written]
    assert children_stream_id(PARENT) == f"children:{PARENT}"


def test_the_first_link_of_a_child_wins_and_children_come_by_fact_key() -> None:
    events = [
        link("b").encode(at_us=1),
        link("a").encode(at_us=2),
        link("b", manifest="sha256:other").encode(at_us=3),  # a later, losing spawn of "b"
    ]
    assert child_links(events) == [link("a"), link("b")]


def test_unknown_events_and_newer_link_versions_are_skipped() -> None:
    newer = canonical_json_bytes({"v": 2, "child_run_id": child_run_id(PARENT, "z"), "fact_key": "z"})
    assert child_links([("ChildUnlinked", b"{}"), (CHILD_LINKED, newer), link("a").encode(at_us=1)]) == [
        link("a")
    ]


def test_overlapping_spawns_link_in_batches_the_store_accepts() -> None:
    loop = asyncio.new_event_loop()
    try:

        def waiting(key: str, size: int) -> _Linking:
            return _Linking(link(key), b"x" * size, loop.create_future())

        queue = [waiting(f"k{i}", 10) for i in range(MAX_LINKS_PER_APPEND + 4)]
        assert [len(_next_batch(queue)) for _ in range(3)] == [MAX_LINKS_PER_APPEND, 4, 0]
        big = MAX_LINK_BYTES_PER_APPEND // 2 + 1
        queue = [waiting("a", big), waiting("b", big), waiting("huge", 2 * MAX_LINK_BYTES_PER_APPEND)]
        assert [[w.link.fact_key for w in _next_batch(queue)] for _ in range(3)] == [["a"], ["b"], ["huge"]]
    finally:
        loop.close()


def test_only_a_canceled_parent_closes_a_child_and_only_under_the_cancel_policy() -> None:
    assert link("a").closed_by("canceled")
    assert not link("a", policy=CLOSE_ABANDON).closed_by("canceled")
    assert not any(link("a").closed_by(status) for status in ("active", "completed", "failed"))
    assert link("a").close_reason == f"parent run {PARENT} was canceled"
