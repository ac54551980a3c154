"""Retention: deleting old terminal run trees (DeleteRun, `engine-service --retention`) and collecting
the artifacts nothing references any more (engine_service.domain.retention says what and in which
order; this module reads the store and deletes through its delete RPCs).

Any number of engines may run passes at once: a tree's deletion record is created with a
compare-and-swap (one engine deletes a tree), deleting a stream twice deletes nothing, and a pass
that finds a record another engine left (its engine died) finishes that tree.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from engine_service.domain import RunStarted
from engine_service.domain.child_runs import ChildLink
from engine_service.domain.labels import PARENT_ATTRIBUTE, RERUN_OF_ATTRIBUTE
from engine_service.domain.retention import (
    RUN_TREE_DELETION,
    RunNode,
    artifact_ids_in,
    decode_tree_deletion,
    deletion_order,
    encode_tree_deletion,
    unreferenced,
)
from engine_service.domain.streams import (
    RETENTION_STREAM_PREFIX,
    RUN_STREAM_PREFIX,
    TERMINAL_RUN_LABELS,
    WORKER_STREAM_PREFIX,
    retention_stream_id,
    run_id_of_stream,
    run_owned_family_prefixes,
    run_owned_stream_ids,
    run_status_of_label,
    run_stream_id,
)
from engine_service.failpoints import RETENTION_AFTER_RUN_DELETED, Failpoints
from engine_service.runtime.reader import RunReader, stored_events
from engine_service.store.port import EventLog
from keel_core.clock import now_us
from keel_core.errors import ErrorCategory, KeelError, not_found

log = logging.getLogger(__name__)

LIST_PAGE = 200
MAX_DELETE = 100  # stream ids per DeleteStreams
READ_PAGE = 1000
# The shortest grace an artifact collection may use in production (tests pass 0): longer than
# any time between storing an artifact and appending the event that names it.
DEFAULT_ARTIFACT_GRACE = 3600.0
DEFAULT_RETENTION_INTERVAL = 60.0


@dataclass
class Deleted:
    """What a deletion or a pass removed."""

    runs: list[str] = field(default_factory=list)
    streams: int = 0
    artifacts: int = 0

    def add(self, other: Deleted) -> None:
        """Count `other` in."""
        self.runs += other.runs
        self.streams += other.streams
        self.artifacts += other.artifacts


@dataclass(frozen=True)
class RetentionHooks:
    """Where deletions are counted (engine_service.metrics)."""

    runs_deleted: Callable[[int], None] = lambda n: None
    streams_deleted: Callable[[int], None] = lambda n: None
    artifacts_deleted: Callable[[int], None] = lambda n: None


class Retention:
    """Deletes run trees and collects artifacts for one engine."""

    def __init__(
        self,
        store: EventLog,
        reader: RunReader,
        failpoints: Failpoints,
        hooks: RetentionHooks | None = None,
        *,
        artifact_grace: float = DEFAULT_ARTIFACT_GRACE,
    ) -> None:
        self.store = store
        self.reader = reader
        self.failpoints = failpoints
        self.hooks = hooks or RetentionHooks()
        self.artifact_grace = artifact_grace

    # -- DeleteRun -----------------------------------------------------------------------------

    async def delete_run(self, run_id: str) -> Deleted:
        """Delete a top-level run (or one whose parent is gone) with its tree, whatever its age.

        `run_not_found`; FAILED_PRECONDITION `run_not_terminal` when any run of the tree is not
        terminal, `run_has_parent` for a child of an existing run (delete its root), and
        `run_has_reruns` for a run whose children reruns reuse. Nothing is deleted then.
        """
        head, _ = await self.store.head(run_stream_id(run_id))
        if head == 0:
            raise not_found("run_not_found", f"run {run_id} does not exist", run_id=run_id)
        parent = await self._living_parent(run_id)
        if parent:
            raise _precondition(
                "run_has_parent",
                f"run {run_id} is a child of run {parent}; delete its top-level run, which deletes it too",
                run_id=run_id,
                parent_run_id=parent,
            )
        order, blocker = await self._tree(run_id)
        if order is None:
            raise _precondition(
                "run_not_terminal",
                f"run {blocker} of the tree of run {run_id} has not ended; a run is deleted with its "
                "whole tree, once every run of it is terminal",
                run_id=run_id,
                blocking_run_id=blocker,
            )
        if blocker:
            raise _precondition(
                "run_has_reruns",
                f"run {blocker} of the tree of run {run_id} has reruns that reuse its children; "
                "delete the reruns first",
                run_id=run_id,
                rerun_of_run_id=blocker,
            )
        done = await self._delete_tree(order)
        if done is None:
            raise not_found(
                "run_not_found", f"run {run_id} is being deleted by another engine", run_id=run_id
            )
        return done

    # -- passes --------------------------------------------------------------------------------

    async def pass_once(self, older_than: float, *, sweep: bool = True) -> Deleted:
        """Finish interrupted deletions, delete every tree whose root ended `older_than` seconds ago,
        and (when anything was deleted, or `sweep` says so) collect unreferenced artifacts."""
        deleted = await self.finish_interrupted()
        cutoff_us = now_us() - int(older_than * 1_000_000)
        before = datetime.fromtimestamp(cutoff_us / 1e6, tz=UTC)
        token = ""
        roots: list[str] = []
        while True:
            page, token = await self.store.list_streams(
                prefix=RUN_STREAM_PREFIX,
                statuses=TERMINAL_RUN_LABELS,
                page_size=LIST_PAGE,
                page_token=token,
                created_before=before,
            )
            for summary in page:
                ended = summary.updated_at
                if ended is not None and ended.timestamp() * 1e6 >= cutoff_us:
                    continue
                parent = summary.attributes.get(PARENT_ATTRIBUTE, "")
                if parent and (await self.store.head(run_stream_id(parent)))[0] > 0:
                    continue  # deleted with its parent's tree (a terminal child of a running parent stays)
                roots.append(run_id_of_stream(summary.stream_id))
            if not token:
                break
        for root in roots:
            order, blocker = await self._tree(root)
            if order is None or blocker:
                continue
            done = await self._delete_tree(order)
            if done is not None:
                deleted.add(done)
        deleted.streams += await self.forget_idle_workers(cutoff_us)
        if sweep or deleted.runs:
            deleted.artifacts += await self.collect_artifacts()
        return deleted

    async def forget_idle_workers(self, cutoff_us: int) -> int:
        """Delete the `worker:` records (a worker's last poll, for ListQueues) not renewed since
        `cutoff_us`: each worker process has its own, so they would pile up with every restart. A
        live worker renews its record every few seconds (and one deleted under it is written again
        within seconds of its next poll)."""
        idle: list[str] = []
        token = ""
        while True:
            page, token = await self.store.list_streams(
                prefix=WORKER_STREAM_PREFIX, page_size=LIST_PAGE, page_token=token
            )
            idle += [
                summary.stream_id
                for summary in page
                if summary.updated_at is not None and summary.updated_at.timestamp() * 1e6 < cutoff_us
            ]
            if not token:
                break
        removed = 0
        for start in range(0, len(idle), MAX_DELETE):
            removed += await self.store.delete_streams(idle[start : start + MAX_DELETE])
        if removed:
            log.info("retention: forgot %d idle worker(s)", removed)
            self.hooks.streams_deleted(removed)
        return removed

    async def finish_interrupted(self) -> Deleted:
        """Finish every tree deletion a `retention:` record names (its engine stopped in the middle)."""
        deleted = Deleted()
        token = ""
        while True:
            page, token = await self.store.list_streams(
                prefix=RETENTION_STREAM_PREFIX, page_size=LIST_PAGE, page_token=token
            )
            for summary in page:
                events = await self.store.read(summary.stream_id)
                order = [
                    run_id
                    for event in events
                    if event.type == RUN_TREE_DELETION
                    for run_id in decode_tree_deletion(event.payload)
                ]
                log.info(
                    "finishing the interrupted deletion of %d run(s) (%s)", len(order), summary.stream_id
                )
                deleted.add(await self._delete_recorded(summary.stream_id, order))
            if not token:
                return deleted

    async def run_forever(self, older_than: float, interval: float) -> None:
        """A pass every `interval` seconds until cancelled (a failed pass is logged and retried)."""
        while True:
            try:
                deleted = await self.pass_once(older_than, sweep=False)
                if deleted.runs or deleted.artifacts:
                    log.info(
                        "retention deleted %d run(s), %d stream(s), %d artifact(s)",
                        len(deleted.runs),
                        deleted.streams,
                        deleted.artifacts,
                    )
            except KeelError as error:
                log.warning("retention pass failed: %s", error.message)
            except Exception:  # never let the loop die: the next pass tries again
                log.exception("retention pass failed")
            await asyncio.sleep(interval)

    # -- trees ---------------------------------------------------------------------------------

    async def _living_parent(self, run_id: str) -> str:
        first = stored_events(await self.store.read(run_stream_id(run_id), limit=1))
        started = first[0].event if first else None
        parent = started.parent_run_id if isinstance(started, RunStarted) else ""
        if parent and (await self.store.head(run_stream_id(parent)))[0] > 0:
            return parent
        return ""

    async def _tree(self, root: str) -> tuple[list[str] | None, str]:
        """The tree's deletion order and "" ; (None, a run that is not terminal); or (order, a run whose
        children a rerun links: the tree must stay while that rerun exists)."""
        nodes: dict[str, RunNode] = {}
        level = [root]
        while level:
            following: list[str] = []
            for run_id in level:
                if run_id in nodes:
                    continue
                head, label = await self.store.head(run_stream_id(run_id))
                if head == 0 and run_id != root:
                    continue  # a child linked but never started: nothing of it to delete
                if run_status_of_label(label) is None:
                    return None, run_id
                # Only the children this run spawned itself: a rerun also links those it reused.
                own = [
                    link.child_run_id for link in await self.reader.links(run_id) if _owned_by(link, run_id)
                ]
                nodes[run_id] = RunNode(run_id, True, tuple(own))
                if own and await self._has_reruns(run_id):
                    return [], run_id
                following.extend(own)
            level = following
        return deletion_order(root, nodes), ""

    async def _has_reruns(self, run_id: str) -> bool:
        page, _ = await self.store.list_streams(
            prefix=RUN_STREAM_PREFIX, page_size=1, attributes={RERUN_OF_ATTRIBUTE: run_id}
        )
        return bool(page)

    async def _delete_tree(self, order: list[str]) -> Deleted | None:
        """Record the deletion, then delete root first; None when another engine records it first."""
        record = retention_stream_id(order[0])
        # Deleting the record that does not exist yet deletes nothing, and fails if this store
        # refuses deletes (deletes_not_allowed): then nothing is written either.
        await self.store.delete_streams([record])
        try:
            await self.store.append(record, [encode_tree_deletion(order)], expected_seq=None)
        except KeelError as error:
            if error.code == "sequence_conflict":
                return None
            raise
        return await self._delete_recorded(record, order)

    async def _delete_recorded(self, record: str, order: list[str]) -> Deleted:
        deleted = Deleted()
        for run_id in order:
            streams = await self._delete_run(run_id)
            if streams:
                deleted.runs.append(run_id)
                deleted.streams += streams
                self.hooks.runs_deleted(1)
                self.hooks.streams_deleted(streams)
            self.failpoints.hit(RETENTION_AFTER_RUN_DELETED)
        await self.store.delete_streams([record])
        return deleted

    async def _delete_run(self, run_id: str) -> int:
        """Delete every stream the run owns: its families first (a terminal run never reads them), then
        its own streams in one transaction, which is the moment the run is gone."""
        gone = 0
        for prefix in run_owned_family_prefixes(run_id):
            while True:
                page, _ = await self.store.list_streams(prefix=prefix, page_size=MAX_DELETE)
                if not page:
                    break
                gone += await self.store.delete_streams([summary.stream_id for summary in page])
        gone += await self.store.delete_streams(run_owned_stream_ids(run_id))
        self.reader.forget(run_id)
        return gone

    # -- artifacts -----------------------------------------------------------------------------

    async def collect_artifacts(self) -> int:
        """Mark every artifact any stream's events mention, then delete the others stored before the
        cut-off (this collection's start minus the grace); returns how many went."""
        cutoff_us = now_us() - int(self.artifact_grace * 1_000_000)
        marked = await self._mark()
        stored_before = datetime.fromtimestamp(cutoff_us / 1e6, tz=UTC)
        gone = 0
        token = ""
        while True:
            page, token = await self.store.list_artifacts(
                stored_before, page_size=LIST_PAGE, page_token=token
            )
            doomed = unreferenced((a.artifact_id for a in page), marked)
            if doomed:
                removed = await self.store.delete_artifacts(doomed, stored_before)
                gone += len(removed)
                self.hooks.artifacts_deleted(len(removed))
            if not token:
                return gone

    async def _mark(self) -> set[str]:
        marked: set[str] = set()
        token = ""
        while True:
            page, token = await self.store.list_streams(prefix="", page_size=LIST_PAGE, page_token=token)
            for summary in page:
                seq = 1
                while True:
                    events = await self.store.read(summary.stream_id, from_seq=seq, limit=READ_PAGE)
                    for event in events:
                        marked |= artifact_ids_in(event.payload)
                    if len(events) < READ_PAGE:
                        break
                    seq = events[-1].seq + 1
            if not token:
                return marked


def _owned_by(link: ChildLink, run_id: str) -> bool:
    return link.parent_run_id == run_id


def _precondition(code: str, message: str, **details: object) -> KeelError:
    return KeelError(code, message, category=ErrorCategory.FAILED_PRECONDITION, details=dict(details))
