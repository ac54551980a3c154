"""Child runs: the one implementation behind SpawnChild/AwaitChild and `machine.child_run.*`.

A spawn first links the child to its parent: a `ChildLinked` event on the parent's children stream,
with the child's manifest stored in the same append (the store's artifact id is checked against
the locally computed one). Only then is the child started: its RunStarted is appended with
`expected = no stream`, so two concurrent spawns of one key race on the store and both answer the
same child. A crash between the two leaves a linked child that never started; spawning it again,
awaiting it (with its parent) or canceling the parent settles it.

Canceling a parent reads its links, so it closes every child whatever spawned it (a step, the
SpawnChild RPC) and on whichever engine. A spawn that races a cancel looks at the parent's status
after its link is durable and before it starts the child: either the cancel's read finds the link,
or the spawn's look finds the parent canceled (then the child is recorded canceled, never run).

Spawns of one parent that overlap (a fan-out) share the work: their links travel in one append and
one look at the parent, taken after that append landed, serves them all.

The engine's run registry is the child supervisor: a child is driven by at most one task in an
engine (engine_service.runtime.registry), whoever asked for it (an RPC, a parent's op, recovery).
Starting, resuming and awaiting runs are the kernel's, which this module reaches through the
narrow `RunKernel` Protocol (the kernel holds the child runs, not the other way round).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Any, Protocol

from engine_service.domain import (
    CANCELED,
    COMPLETED,
    Plan,
    RunHistory,
    RunManifest,
    artifact_id_for_bytes,
    parse_run_id,
)
from engine_service.domain.child_runs import (
    AWAIT_NAMESPACE,
    SPAWN_NAMESPACE,
    ChildAwaitRequest,
    ChildLink,
    ChildOutcome,
    ChildSpawned,
    ChildSpawnRequest,
    parse_await_request,
    parse_spawn_request,
    request_invalid,
)
from engine_service.domain.events import ErrorRecord
from engine_service.domain.facts import check_fact_key
from engine_service.domain.history import WaitingAttempt
from engine_service.domain.labels import PARENT_ATTRIBUTE
from engine_service.domain.manifest import MANIFEST_ARTIFACT_KIND
from engine_service.domain.streams import (
    RUN_LIVE_LABELS,
    RUN_STREAM_PREFIX,
    children_stream_id,
    run_id_of_stream,
    run_status_of_label,
    run_stream_id,
)
from engine_service.domain.waits import WaitOutcome
from engine_service.failpoints import AFTER_CHILD_COMPLETED, BEFORE_CHILD_STARTED, Failpoints
from engine_service.runtime.awaiting import RunAwaits
from engine_service.runtime.reader import RunReader
from engine_service.runtime.registry import RunRegistry
from engine_service.runtime.terminalize import Terminalizer
from engine_service.store.port import EventLog, StreamSummary
from keel_core.clock import now_us
from keel_core.errors import ErrorCategory, KeelError, not_found

log = logging.getLogger(__name__)

# One append of links stays well inside the store's limits on inline artifacts per append.
MAX_LINKS_PER_APPEND = 16
MAX_LINK_BYTES_PER_APPEND = 4 * 1024 * 1024


@dataclass
class _Linking:
    """A spawn waiting for its link to land: the answer is the parent's status, read after it."""

    link: ChildLink
    manifest_bytes: bytes
    landed: asyncio.Future[str | None]


def _conflict(link: ChildLink) -> KeelError:
    return KeelError(
        "child_run_conflict",
        f"child run {link.child_run_id} (fact key {link.fact_key!r} of run {link.parent_run_id}) "
        f"already exists with a different manifest; spawn it under another fact key",
        category=ErrorCategory.FAILED_PRECONDITION,
        details={"child_run_id": link.child_run_id, "manifest_id": link.child_manifest_id},
    )


def _spawned(link: ChildLink) -> ChildSpawned:
    return ChildSpawned(
        link.parent_run_id, link.child_run_id, link.child_manifest_id, link.op_id, link.parent_close_policy
    )


class RunKernel(Protocol):
    """What child runs need of the engine's kernel: to plan, start and resume runs."""

    def plan_for(self, manifest: RunManifest) -> Plan:
        """The manifest's pipeline resolved against the engine's ops (`invalid_plan` if it cannot be)."""
        ...

    async def start_run(
        self,
        manifest: RunManifest,
        run_id: str | None,
        *,
        parent: tuple[str, str] | None = None,
        manifest_stored: bool = False,
    ) -> object:
        """Record RunStarted and drive the run (`run_already_exists` for another manifest)."""
        ...

    async def resume_run(self, run_id: str) -> bool:
        """Drive a run nobody drives (False when there is nothing to do here)."""
        ...


class ChildRuns:
    """Spawns and awaits child runs on one engine."""

    def __init__(
        self,
        store: EventLog,
        failpoints: Failpoints,
        registry: RunRegistry,
        reader: RunReader,
        terminalizer: Terminalizer,
        kernel: RunKernel,
        awaits: RunAwaits,
    ) -> None:
        self.store = store
        self.failpoints = failpoints
        self.registry = registry
        self.reader = reader
        self.terminalizer = terminalizer
        self.kernel = kernel
        self.awaits = awaits
        # parent run id -> links waiting for the append in flight for that parent to finish.
        self._unlinked: dict[str, list[_Linking]] = {}
        self._appending: set[asyncio.Future[None]] = set()

    async def closed_with_parent(self, run_id: str, history: RunHistory) -> bool:
        """Before resuming a child: cancel it instead when its parent was canceled (True).

        A cancel closes its children after the parent's terminal event; if it could not finish (its
        engine died, a child's cancel failed) a child whose policy is `cancel` is closed here.
        """
        started = history.started
        if started is None or history.is_terminal or not started.parent_run_id:
            return False
        parent_status = await self.reader.run_status(started.parent_run_id)
        if parent_status != CANCELED:  # the links are read only when they may matter
            return False
        link = await self.reader.link_of(started.parent_run_id, run_id)
        if link is None or not link.closed_by(parent_status):
            return False
        log.info("run %s: parent %s was canceled; canceling it, not resuming it", run_id, link.parent_run_id)
        await self.terminalizer.cancel_child(link)
        return True

    async def spawn(self, request: ChildSpawnRequest, *, in_run: bool = False) -> ChildSpawned:
        """Link the child to its parent and start it (or find it); nothing is written on bad input.

        `in_run`: the parent's own step spawns, so the parent exists and is being driven. A spawn
        through the RPC checks first: the parent must exist; a child that exists is answered (and
        resumed if unfinished) without writing anything; a canceled parent takes no new child that
        its cancel would close. A parent that completed or failed may still take children (a client
        grouping work under a run): they are listed on it, and nothing closes them.
        """
        check_fact_key(request.fact_key, "spawning a child run")
        parse_run_id(request.parent_run_id, field="parent_run_id")
        manifest = request.manifest()
        self.kernel.plan_for(manifest)  # an unknown op is `invalid_plan` before anything is stored
        manifest_bytes = manifest.canonical_bytes()
        link = ChildLink(
            request.parent_run_id,
            request.fact_key,
            request.child_run_id,
            artifact_id_for_bytes(manifest_bytes),
            request.op_id,
            request.parent_close_policy,
        )
        if not in_run and await self._found_before_linking(link):
            return _spawned(link)
        # Shielded: a parent cancelled mid-spawn must not leave a child started after the cancel
        # looked for children; the cancel waits for spawns in flight (`settle`).
        spawning = asyncio.ensure_future(self._link_and_start(link, manifest, manifest_bytes))
        self.registry.track_spawn(request.parent_run_id, spawning)
        try:
            await asyncio.shield(spawning)
        except KeelError as error:
            if error.code != "run_already_exists":
                raise
            raise _conflict(link) from None
        return _spawned(link)

    async def _found_before_linking(self, link: ChildLink) -> bool:
        """For an RPC spawn: True when the child exists already (resumed if unfinished)."""
        parent_head, parent_label = await self.store.head(run_stream_id(link.parent_run_id))
        if parent_head == 0:
            raise not_found(
                "run_not_found", f"parent run {link.parent_run_id} does not exist", run_id=link.parent_run_id
            )
        started = await self.reader.started_manifest_id(link.child_run_id)
        if started is None:
            if link.closed_by(run_status_of_label(parent_label)):
                raise KeelError(
                    "parent_run_canceled",
                    f"parent run {link.parent_run_id} was canceled, and with it its children: spawn "
                    "under a run that is not canceled, or with parent_close_policy abandon",
                    category=ErrorCategory.FAILED_PRECONDITION,
                    details={"run_id": link.parent_run_id},
                )
            return False
        if started != link.child_manifest_id:
            raise _conflict(link)
        await self.kernel.resume_run(link.child_run_id)  # DESIGN: an unfinished child goes on
        return True

    async def _link_and_start(self, link: ChildLink, manifest: RunManifest, manifest_bytes: bytes) -> None:
        parent_status = await self._link(link, manifest_bytes)
        self.failpoints.hit(BEFORE_CHILD_STARTED)
        await self._start_linked(link, manifest, parent_status)

    async def _link(self, link: ChildLink, manifest_bytes: bytes) -> str | None:
        """Record the link (with the manifest); the parent's status (None: active), read after it landed."""
        waiting = _Linking(link, manifest_bytes, asyncio.get_running_loop().create_future())
        queue = self._unlinked.get(link.parent_run_id)
        if queue is not None:
            queue.append(waiting)  # an append for this parent is in flight: go with the next one
        else:
            self._unlinked[link.parent_run_id] = [waiting]
            appending = asyncio.ensure_future(self._append_links(link.parent_run_id))
            self._appending.add(appending)
            appending.add_done_callback(self._appending.discard)
        return await waiting.landed

    async def _append_links(self, parent_run_id: str) -> None:
        """Append the parent's waiting links in batches, then look at the parent once per batch."""
        try:
            while batch := _next_batch(self._unlinked[parent_run_id]):
                try:
                    at_us = now_us()
                    encoded = [waiting.link.encode(at_us) for waiting in batch]
                    appended = await self.store.append(
                        children_stream_id(parent_run_id),
                        encoded,
                        expected_seq=None,
                        expected_any=True,
                        artifacts=list(
                            dict.fromkeys((MANIFEST_ARTIFACT_KIND, w.manifest_bytes) for w in batch)
                        ),
                    )
                    self.reader.note_links(parent_run_id, appended.first_seq, encoded)
                    parent_status = await self.reader.run_status(parent_run_id)
                except BaseException as error:  # each spawn of the batch fails with it
                    for waiting in batch:
                        if not waiting.landed.done():
                            waiting.landed.set_exception(error)
                    if not isinstance(error, Exception):
                        raise
                    continue
                for waiting in batch:
                    if not waiting.landed.done():
                        waiting.landed.set_result(parent_status)
        finally:
            for waiting in self._unlinked.pop(parent_run_id, []):
                if not waiting.landed.done():
                    waiting.landed.set_exception(asyncio.CancelledError())

    async def _start_linked(self, link: ChildLink, manifest: RunManifest, parent_status: str | None) -> None:
        """Start a linked child, unless its parent was canceled meanwhile (then it is canceled unrun).

        `parent_status` is the parent's status as read after the link landed (None: not terminal).
        """
        if link.closed_by(parent_status):
            log.info("run %s was canceled while spawning child %s", link.parent_run_id, link.child_run_id)
            await self.terminalizer.cancel_child(link)
            return
        await self.kernel.start_run(
            manifest, link.child_run_id, parent=(link.parent_run_id, link.fact_key), manifest_stored=True
        )

    async def await_child(self, request: ChildAwaitRequest) -> ChildOutcome:
        """Wait until the child is terminal: join its task here, else resume it, else start it."""
        child_id = request.child_run_id
        while True:
            try:
                terminal = await self.awaits.await_terminal(child_id)
                break
            except KeelError as error:
                if error.code != "run_not_found":
                    raise
                await self._start_never_started(request)
        snapshot = await self.reader.final_snapshot(terminal.final_snapshot_id)
        self.failpoints.hit(AFTER_CHILD_COMPLETED)
        return ChildOutcome(child_id, terminal.status, terminal.final_snapshot_id, snapshot)

    def _held_history(
        self, child_id: str, stored: StreamSummary | None, parent_created_us: int
    ) -> RunHistory | None:
        """The history of a child this engine finished and still holds, when it is the stored
        child's (None: read it).

        A terminal stream never changes; but a parent's tree deleted by another engine and started
        again under the same run id has children of the same ids. Held events are trusted only when
        the child the store lists has their head and they started after the parent's stream was
        created (a child of an earlier incarnation started before it): otherwise they are read.
        """
        held = self.reader.finished_run(child_id)
        if held is None or stored is None:
            return None
        _, history = held
        started = history.started
        if started is None or stored.head_seq != history.head_seq or started.at_us < parent_created_us:
            return None
        return history

    async def children_wait_outcome(self, run_id: str, waiting: WaitingAttempt) -> WaitOutcome | None:
        """The `children` wait's resolver (keel.fan_out): None while a child it names is unfinished;
        once all ended, the step's output (each child's `main` output and status) or its failure.

        One indexed listing of the run's children answers "not yet" (a child it names is running or
        parked) and, at the end, tells which held child histories are current; only at the end is a
        child not held here read. A child whose spawn was recorded but never started is started here.
        """
        ids = [str(child) for child in waiting.wait.detail.get("children", [])]
        listed = await self._children_listed(run_id)
        if any(child in listed and listed[child].status in RUN_LIVE_LABELS for child in ids):
            return None
        children: list[dict[str, Any]] = []
        results: list[Any] = []
        parent_created_us = await self.reader.created_at_us(run_id) or 0
        for child_id in ids:
            history = self._held_history(child_id, listed.get(child_id), parent_created_us)
            if history is None:
                head, _ = await self.store.head(run_stream_id(child_id))
                if head == 0:
                    await self._start_never_started(ChildAwaitRequest(child_id, parent_run_id=run_id))
                    return None  # its end wakes this run again
                _, history = await self.reader.read_history(child_id)
            if history.terminal is None:
                return None  # it ended after the listing, or is not labelled yet: asked again later
            snapshot = await self.reader.final_snapshot(history.terminal.final_snapshot_id)
            children.append({"child_run_id": child_id, "status": history.terminal.status})
            results.append((snapshot or {}).get("main") if isinstance(snapshot, dict) else None)
        unfinished = [child for child in children if child["status"] != COMPLETED]
        if unfinished:
            first = unfinished[0]
            return WaitOutcome(
                error=ErrorRecord(
                    "child_run_failed",
                    ErrorCategory.FAILED_PRECONDITION.value,
                    False,
                    f"keel.fan_out: {len(unfinished)} of {len(children)} child runs did not complete "
                    f"(first: {first['child_run_id']} {first['status']})",
                    {"children": children},
                )
            )
        return WaitOutcome(output={"results": results, "children": children})

    async def _children_listed(self, run_id: str) -> dict[str, StreamSummary]:
        """The run's child streams, from the store's attribute index (one listing per 1,000)."""
        found: dict[str, StreamSummary] = {}
        token = ""
        while True:
            page, token = await self.store.list_streams(
                prefix=RUN_STREAM_PREFIX,
                page_size=1000,
                page_token=token,
                attributes={PARENT_ATTRIBUTE: run_id},
            )
            found.update((run_id_of_stream(stream.stream_id), stream) for stream in page)
            if not token:
                return found

    async def _start_never_started(self, request: ChildAwaitRequest) -> None:
        """A child whose spawn was recorded but which never started: start it now."""
        link = None
        if request.parent_run_id:
            link = await self.reader.link_of(request.parent_run_id, request.child_run_id)
        if link is None and not request.child_manifest_id:
            raise not_found(
                "run_not_found",
                f"child run {request.child_run_id} was never started and no spawn of it is recorded"
                + (f" on run {request.parent_run_id}" if request.parent_run_id else ""),
                run_id=request.child_run_id,
            )
        manifest_id = link.child_manifest_id if link is not None else request.child_manifest_id
        try:
            manifest = await self.reader.manifest(manifest_id)
        except KeelError as error:
            if link is not None or error.code != "corrupt_artifact":
                raise
            raise request_invalid(f"child_manifest_id: {error.message}") from None
        log.info("child run %s was never started: starting it from its manifest", request.child_run_id)
        try:
            if link is not None:
                await self._start_linked(link, manifest, await self.reader.run_status(link.parent_run_id))
            else:
                # Inline again: the manifest may have been read from a cache (this engine's, its store
                # client's) after a collection deleted it from the store.
                await self.kernel.start_run(manifest, request.child_run_id)
        except KeelError as error:
            if error.code == "run_already_exists":
                raise KeelError(
                    "child_run_conflict",
                    f"child run {request.child_run_id} exists with another manifest than {manifest_id}",
                    category=ErrorCategory.FAILED_PRECONDITION,
                ) from None
            raise


def _next_batch(queue: list[_Linking]) -> list[_Linking]:
    """Take the next links off `queue`: as many as one append carries (at least one)."""
    size = 0
    taken = 0
    for waiting in queue:
        size += len(waiting.manifest_bytes)
        if taken and (taken == MAX_LINKS_PER_APPEND or size > MAX_LINK_BYTES_PER_APPEND):
            break
        taken += 1
    batch = queue[:taken]
    del queue[:taken]
    return batch


class ChildRunTransport:
    """`machine.child_run.spawn` / `machine.child_run.await` inside a run, answered by ChildRuns."""

    def __init__(self, children: ChildRuns) -> None:
        self.children = children

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        """Spawn or await a child of run `run_id`; the answer becomes the parent's fact."""
        if namespace == SPAWN_NAMESPACE:
            spawned = await self.children.spawn(parse_spawn_request(request, run_id, fact_key), in_run=True)
            return spawned.to_json()
        if namespace == AWAIT_NAMESPACE:
            awaited = parse_await_request(request)
            if not awaited.parent_run_id:
                awaited = replace(awaited, parent_run_id=run_id)
            outcome = await self.children.await_child(awaited)
            return outcome.to_json()
        raise request_invalid(f"namespace {namespace!r} is not a child run namespace")
