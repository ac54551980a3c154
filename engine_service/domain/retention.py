"""Retention as data: which runs a pass may delete, in which order, and which artifacts are unreferenced.

A run is deleted with its whole tree (the runs it spawned, and theirs), and only when every run of
the tree is terminal: a terminal child of a running parent stays, and so does its parent. A tree is
deleted root first, one run at a time, each run's streams (engine_service.domain.streams
`run_owned_stream_ids`) in ONE store transaction, so every run is at any moment either whole
(listed and readable) or gone. Before the first deletion the tree's run ids are recorded in a
`retention:<root run id>` stream (`RunTreeDeletion`); a pass first finishes every tree such a
record names (its engine died in the middle), then deletes the record.

Artifacts are shared between runs (content-addressed), so they are collected by mark and sweep: the
mark is every artifact id that any event payload of any stream mentions (`artifact_ids_in`), the
sweep deletes the other artifacts last stored before the cut-off (the collection's start minus a
grace period). The store renews an artifact's stored time whenever its bytes are stored again, and
deletes only artifacts not renewed since the cut-off, so a run that reuses an old artifact while the
collection runs keeps it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from engine_service.domain.canonical import canonical_json_bytes

RUN_TREE_DELETION = "RunTreeDeletion"
_ARTIFACT_ID = re.compile(rb"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class RunNode:
    """A run of a tree as retention sees it: terminal or not, and the children it spawned itself."""

    run_id: str
    terminal: bool
    children: tuple[str, ...] = ()


def deletion_order(root: str, nodes: Mapping[str, RunNode]) -> list[str] | None:
    """The tree's runs, root first then each level (None when any run of it is not terminal)."""
    order: list[str] = []
    seen: set[str] = set()
    level = [root]
    while level:
        following: list[str] = []
        for run_id in level:
            if run_id in seen:
                continue
            seen.add(run_id)
            node = nodes.get(run_id)
            if node is None:
                continue  # never started: nothing to delete

            if not node.terminal:
                return None
            order.append(run_id)
            following.extend(node.children)
        level = following
    return order


def artifact_ids_in(payload: bytes) -> set[str]:
    """Every artifact id (`sha256:<64 hex>`) a payload mentions, wherever it is in it."""
    return {match.decode("ascii") for match in _ARTIFACT_ID.findall(payload)}


def unreferenced(candidates: Iterable[str], marked: set[str]) -> list[str]:
    """The candidates nothing mentions, in order."""
    return [artifact_id for artifact_id in candidates if artifact_id not in marked]


def encode_tree_deletion(run_ids: Sequence[str]) -> tuple[str, bytes]:
    """The `RunTreeDeletion` record of a tree about to be deleted (root first)."""
    return RUN_TREE_DELETION, canonical_json_bytes({"v": 1, "run_ids": list(run_ids)})


def decode_tree_deletion(payload: bytes) -> list[str]:
    """The run ids a `RunTreeDeletion` record names ([] for a payload this engine cannot read)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("run_ids"), list):
        return []
    return [str(run_id) for run_id in data["run_ids"]]
