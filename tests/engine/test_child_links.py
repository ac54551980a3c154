"""The children stream's links as data: encoded, read back, first link of each child kept."""

from __future__ import annotations

import uuid

from engine_service.domain.canonical import canonical_json_bytes
from engine_service.domain.child_runs import (
    CHILD_LINKED,
    CLOSE_ABANDON,
    ChildLink,
    child_links,
    child_run_id,
    children_stream_id,
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
