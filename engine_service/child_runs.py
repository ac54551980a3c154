"""Child runs: the one implementation behind SpawnChild/AwaitChild and `machine.child_run.*`.

The child's manifest is stored inline with its RunStarted (one append; the store's artifact id is
checked against the locally computed one by the store client). The engine's driver registry is
the child supervisor: a child is driven by at most one task in an engine (`Engine.drivers`),
whoever asked for it (an RPC, a parent's op, recovery). Spawn appends the child's RunStarted
itself (with `expected = no stream`), so two concurrent spawns of one key race on the store and
both answer the same child.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from engine_service.domain import artifact_id_for_bytes, looks_like_secret, parse_run_id
from engine_service.domain.child_runs import (
    AWAIT_NAMESPACE,
    SPAWN_NAMESPACE,
    ChildAwaitRequest,
    ChildOutcome,
    ChildSpawned,
    ChildSpawnRequest,
    parse_await_request,
    parse_spawn_request,
    request_invalid,
)
from engine_service.failpoints import AFTER_CHILD_COMPLETED, BEFORE_CHILD_STARTED
from keel_core.errors import ErrorCategory, KeelError, invalid_argument

if TYPE_CHECKING:
    from engine_service.engine import Engine

log = logging.getLogger(__name__)


class ChildRuns:
    """Spawns and awaits child runs on one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # parent run id -> {child run id: parent-close policy} for spawns made by this engine, so a
        # cancel that overtakes a spawn (before its fact is recorded) still closes the child.
        self._spawned: dict[str, dict[str, str]] = {}
        self._starting: dict[str, set[asyncio.Future[Any]]] = {}

    async def settle(self, parent_run_id: str) -> None:
        """Wait until every child start this engine has in flight for the parent has landed or failed."""
        pending = self._starting.pop(parent_run_id, set())
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def settle_all(self) -> None:
        """Wait for every child start in flight (engine shutdown)."""
        for parent_run_id in list(self._starting):
            await self.settle(parent_run_id)

    def spawned_here(self, parent_run_id: str, policy: str) -> set[str]:
        """Children this engine spawned for the parent under `policy`."""
        return {child for child, p in self._spawned.get(parent_run_id, {}).items() if p == policy}

    def forget(self, parent_run_id: str) -> None:
        """Drop what this engine remembers of the parent's spawns (the parent stopped here)."""
        self._spawned.pop(parent_run_id, None)
        if not self._starting.get(parent_run_id, True):
            del self._starting[parent_run_id]

    async def spawn(self, request: ChildSpawnRequest) -> ChildSpawned:
        """Start the child (or find it), after checking everything; nothing is written on bad input."""
        if not request.fact_key:
            raise invalid_argument("missing_fact_key", "spawning a child run needs a fact key (its name)")
        if looks_like_secret(request.fact_key):
            raise invalid_argument(
                "secrets_detected", "the fact key looks like it contains a secret; nothing was recorded"
            )
        parse_run_id(request.parent_run_id, field="parent_run_id")
        manifest = request.manifest()
        self.engine.plan_for(manifest)  # an unknown op is `invalid_plan` before anything is stored
        manifest_id = artifact_id_for_bytes(manifest.canonical_bytes())
        child_id = request.child_run_id
        self.engine.env.failpoints.hit(BEFORE_CHILD_STARTED)
        self._spawned.setdefault(request.parent_run_id, {})[child_id] = request.parent_close_policy
        # Shielded: a parent cancelled mid-spawn must not leave a child whose RunStarted lands after
        # the cancel looked for children; the cancel waits for starts in flight (`settle`).
        starting = asyncio.ensure_future(
            self.engine.start_run(manifest, child_id, parent=(request.parent_run_id, request.fact_key))
        )
        in_flight = self._starting.setdefault(request.parent_run_id, set())
        in_flight.add(starting)
        starting.add_done_callback(in_flight.discard)
        try:
            await asyncio.shield(starting)
        except KeelError as error:
            if error.code != "run_already_exists":
                raise
            raise KeelError(
                "child_run_conflict",
                f"child run {child_id} (fact key {request.fact_key!r} of run {request.parent_run_id}) "
                f"already exists with a different manifest; spawn it under another fact key",
                category=ErrorCategory.FAILED_PRECONDITION,
                details={"child_run_id": child_id, "manifest_id": manifest_id},
            ) from None
        return ChildSpawned(
            request.parent_run_id, child_id, manifest_id, request.op_id, request.parent_close_policy
        )

    async def await_child(self, request: ChildAwaitRequest) -> ChildOutcome:
        """Wait until the child is terminal: join its task here, else resume it, else start it."""
        child_id = request.child_run_id
        while True:
            try:
                terminal = await self.engine.await_terminal(child_id)
                break
            except KeelError as error:
                if error.code != "run_not_found":
                    raise
                await self._start_never_started(request)
        snapshot = await self.engine.final_snapshot(terminal.final_snapshot_id)
        self.engine.env.failpoints.hit(AFTER_CHILD_COMPLETED)
        return ChildOutcome(child_id, terminal.status, terminal.final_snapshot_id, snapshot)

    async def _start_never_started(self, request: ChildAwaitRequest) -> None:
        if not request.child_manifest_id:
            raise KeelError(
                "run_not_found",
                f"child run {request.child_run_id} was never started and no child_manifest_id was given",
                category=ErrorCategory.NOT_FOUND,
            )
        manifest = await self.engine.manifest(request.child_manifest_id)
        log.info("child run %s was never started: starting it from its manifest", request.child_run_id)
        try:
            await self.engine.start_run(manifest, request.child_run_id)
        except KeelError as error:
            if error.code == "run_already_exists":
                raise KeelError(
                    "child_run_conflict",
                    f"child run {request.child_run_id} exists with another manifest than "
                    f"{request.child_manifest_id}",
                    category=ErrorCategory.FAILED_PRECONDITION,
                ) from None
            raise


class ChildRunTransport:
    """`machine.child_run.spawn` / `machine.child_run.await` inside a run, answered by ChildRuns."""

    def __init__(self, children: ChildRuns) -> None:
        self.children = children

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        """Spawn or await a child of run `run_id`; the answer becomes the parent's fact."""
        if namespace == SPAWN_NAMESPACE:
            spawned = await self.children.spawn(parse_spawn_request(request, run_id, fact_key))
            return spawned.to_json()
        if namespace == AWAIT_NAMESPACE:
            outcome = await self.children.await_child(parse_await_request(request))
            return outcome.to_json()
        raise request_invalid(f"namespace {namespace!r} is not a child run namespace")
