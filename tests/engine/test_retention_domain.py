"""The pure part of retention: deletion order, artifact references, the tree deletion record."""

from __future__ import annotations

from engine_service.domain.retention import (
    RunNode,
    artifact_ids_in,
    decode_tree_deletion,
    deletion_order,
    encode_tree_deletion,
    unreferenced,
)

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


def test_a_tree_is_deleted_root_first_then_level_by_level() -> None:
    nodes = {
        "p": RunNode("p", True, ("c1", "c2")),
        "c1": RunNode("c1", True, ("g1",)),
        "c2": RunNode("c2", True),
        "g1": RunNode("g1", True),
    }
    assert deletion_order("p", nodes) == ["p", "c1", "c2", "g1"]


def test_a_tree_with_a_run_that_has_not_ended_is_not_deleted() -> None:
    nodes = {"p": RunNode("p", True, ("c",)), "c": RunNode("c", False)}
    assert deletion_order("p", nodes) is None


def test_a_child_that_never_started_is_skipped() -> None:
    assert deletion_order("p", {"p": RunNode("p", True, ("never",))}) == ["p"]


def test_artifact_references_are_found_anywhere_in_a_payload() -> None:
    payload = f'{{"snapshot_id":"{A}","response":{{"nested":["x {B} y"]}}}}'.encode()
    assert artifact_ids_in(payload) == {A, B}
    assert artifact_ids_in(b'{"id":"sha256:abc"}') == set()
    assert unreferenced([A, B], {B}) == [A]


def test_the_tree_deletion_record_round_trips_and_junk_names_nothing() -> None:
    kind, payload = encode_tree_deletion(["p", "c"])
    assert kind == "RunTreeDeletion"
    assert decode_tree_deletion(payload) == ["p", "c"]
    assert decode_tree_deletion(b"not json") == []
    assert decode_tree_deletion(b'{"run_ids": 3}') == []
