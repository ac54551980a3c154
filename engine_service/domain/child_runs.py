"""Child runs as data: versioned spawn/await requests, the child's id and manifest, the parent's links.

A child run is spawned on behalf of a parent under a fact key; its id is `uuid5(parent, fact_key)`
so that spawning twice yields the same child. Its manifest is a single-op pipeline built from the
request with an empty build provenance, so that every engine computes the same manifest id for the
same request (an engine upgrade must not turn a resumed spawn into a conflict).

Requests in their JSON form (what ops pass to `io.call`):

    machine.child_run.spawn  {kind: "child_run_spawn_v1", op_id, op_version?, op_config?, input?,
                              run_config?: {execution_mode?, retry_policy?: {max_attempts?,
                              initial_backoff_ms?, max_backoff_ms?, multiplier?}},
                              initial_context?, parent_close_policy?: "cancel"|"abandon"}
    machine.child_run.await  {kind: "child_run_await_v1", child_run_id, child_manifest_id?,
                              parent_run_id?}

The io call's fact key names the child; the spawn answer `{parent_run_id, child_run_id,
child_manifest_id, op_id, parent_close_policy}` is what the parent records as its fact.

Before a child is started, its link is recorded on the parent: a `ChildLinked` event in the
parent's children stream (`children:<parent run id>`), with the child's manifest stored in the
same append. That stream, not the parent's facts, is what lists a parent's children and what a
cancel closes: it holds every child whatever spawned it (a step or the SpawnChild RPC), including
one whose start a crash interrupted. Links are appended without a sequence check (spawns of one
parent run concurrently), so a spawn retried after a lost answer may link a child twice; readers
keep the first link of each child.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine_service.domain.canonical import canonical_json_bytes, parse_json_bytes
from engine_service.domain.events import RunStarted
from engine_service.domain.manifest import BuildProvenance, RunManifest
from engine_service.domain.plan import single_op_pipeline
from engine_service.domain.run_config import RunConfig, make_run_config, parse_run_id
from engine_service.domain.streams import CANCELED, CHILD_LINKED, run_stream_id
from engine_service.domain.tasks import NO_TIMEOUTS, StepTimeouts
from keel_core.errors import KeelError, invalid_argument

SPAWN_KIND = "child_run_spawn_v1"
AWAIT_KIND = "child_run_await_v1"
# The wait kind of a step parked until child runs it spawned have ended (keel.fan_out).
CHILDREN = "children"
SPAWN_NAMESPACE = "machine.child_run.spawn"
AWAIT_NAMESPACE = "machine.child_run.await"
CLOSE_CANCEL = "cancel"
CLOSE_ABANDON = "abandon"
CLOSE_POLICIES = (CLOSE_CANCEL, CLOSE_ABANDON)
CHILD_BUILD = BuildProvenance("", "", "")
CHILD_LINK_VERSION = 1


def request_invalid(message: str) -> KeelError:
    """`child_run_request_invalid` (INVALID_ARGUMENT, not retryable)."""
    return invalid_argument("child_run_request_invalid", message)


@dataclass(frozen=True)
class ChildSpawnRequest:
    """Spawn (or find) the child `fact_key` of `parent_run_id` running one op."""

    parent_run_id: str
    fact_key: str
    op_id: str
    op_version: str = "1"
    op_config: Any = None
    input: Any = None
    run_config: RunConfig = field(default_factory=RunConfig)
    initial_context: Mapping[str, Any] = field(default_factory=dict)
    parent_close_policy: str = CLOSE_CANCEL
    # Set: the child's op runs on a worker of this queue (engine_service.domain.tasks).
    task_queue: str = ""
    timeouts: StepTimeouts = NO_TIMEOUTS

    @property
    def child_run_id(self) -> str:
        """uuid5(parent_run_id, fact_key)."""
        return child_run_id(self.parent_run_id, self.fact_key)

    def manifest(self) -> RunManifest:
        """The child's single-op manifest."""
        pipeline = single_op_pipeline(
            self.op_id, self.op_version, self.op_config, self.task_queue, self.timeouts
        )
        return RunManifest(pipeline, self.input, dict(self.initial_context), self.run_config, CHILD_BUILD)


@dataclass(frozen=True)
class ChildAwaitRequest:
    """Wait for a child to be terminal (starting it if its spawn was recorded but it never started).

    With `parent_run_id`, a never-started child is started from the link its parent recorded (as that
    parent's child); otherwise from `child_manifest_id`.
    """

    child_run_id: str
    child_manifest_id: str = ""
    parent_run_id: str = ""


@dataclass(frozen=True)
class ChildSpawned:
    """What a spawn returns, and what the parent records as its spawn fact."""

    parent_run_id: str
    child_run_id: str
    child_manifest_id: str
    op_id: str = ""
    parent_close_policy: str = CLOSE_CANCEL

    def to_json(self) -> dict[str, Any]:
        """The spawn answer as JSON."""
        return {
            "parent_run_id": self.parent_run_id,
            "child_run_id": self.child_run_id,
            "child_manifest_id": self.child_manifest_id,
            "op_id": self.op_id,
            "parent_close_policy": self.parent_close_policy,
        }


@dataclass(frozen=True)
class ChildOutcome:
    """A terminal child: its status and final snapshot."""

    child_run_id: str
    status: str
    final_snapshot_id: str
    final_snapshot: Any

    def to_json(self) -> dict[str, Any]:
        """The await answer as JSON."""
        return {
            "child_run_id": self.child_run_id,
            "status": self.status,
            "final_snapshot_id": self.final_snapshot_id,
            "final_snapshot": self.final_snapshot,
        }


@dataclass(frozen=True)
class ChildLink:
    """A child as its parent's children stream records it (before the child is started)."""

    parent_run_id: str
    fact_key: str
    child_run_id: str
    child_manifest_id: str
    op_id: str
    parent_close_policy: str = CLOSE_CANCEL

    def encode(self, at_us: int) -> tuple[str, bytes]:
        """The `ChildLinked` event (type, canonical JSON payload)."""
        body = {
            "v": CHILD_LINK_VERSION,
            "parent_run_id": self.parent_run_id,
            "fact_key": self.fact_key,
            "child_run_id": self.child_run_id,
            "child_manifest_id": self.child_manifest_id,
            "op_id": self.op_id,
            "parent_close_policy": self.parent_close_policy,
            "at_us": at_us,
        }
        return CHILD_LINKED, canonical_json_bytes(body)

    def closed_by(self, parent_status: str | None) -> bool:
        """Whether the parent's run status closes this child: a canceled parent, a `cancel` policy."""
        return parent_status == CANCELED and self.parent_close_policy == CLOSE_CANCEL

    @property
    def close_reason(self) -> str:
        """Why a child its parent's cancel closes ends canceled."""
        return f"parent run {self.parent_run_id} was canceled"


def parent_nudge(started: RunStarted | None, at_us: int) -> dict[str, int] | None:
    """What a child run's terminal append nudges (store `AppendEventsRequest.nudges`): its parent's
    run stream, due at `at_us` if parked, so the child's end and its parent's wake-up are durable
    together. None for a run without a parent."""
    parent = started.parent_run_id if started is not None else ""
    return {run_stream_id(parent): at_us} if parent else None


def child_run_id(parent_run_id: str, fact_key: str) -> str:
    """The child's run id: uuid5 of the parent's id (as namespace) and the fact key."""
    return str(uuid.uuid5(uuid.UUID(parent_run_id), fact_key))


def _kind(data: Any, expected: str, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise request_invalid(f"a child run {what} request must be a JSON object with kind {expected!r}")
    kind = data.get("kind", "")
    if kind != expected:
        raise request_invalid(f"unsupported child run {what} request kind {kind!r}; expected {expected!r}")
    return data


def _text(data: dict[str, Any], name: str, *, required: bool = True, default: str = "") -> str:
    value = data.get(name, default)
    if not isinstance(value, str) or (required and not value):
        raise request_invalid(f"child run request field {name!r} must be a non-empty string")
    return value


def check_close_policy(policy: str) -> str:
    """The parent-close policy (`cancel` when empty), or `child_run_request_invalid`."""
    policy = policy or CLOSE_CANCEL
    if policy not in CLOSE_POLICIES:
        raise request_invalid(f"parent_close_policy {policy!r} is not one of {CLOSE_POLICIES}")
    return policy


def run_config_from_json(data: Any) -> RunConfig:
    """A RunConfig from its JSON request form (absent fields take their defaults)."""
    if data is None:
        return RunConfig()
    if not isinstance(data, dict):
        raise request_invalid("run_config must be a JSON object")
    policy = data.get("retry_policy") or {}
    if not isinstance(policy, dict):
        raise request_invalid("run_config.retry_policy must be a JSON object")
    try:
        return make_run_config(
            execution_mode=str(data.get("execution_mode") or "live"),
            max_attempts=int(policy.get("max_attempts", 0)),
            initial_backoff_ms=None
            if policy.get("initial_backoff_ms") is None
            else int(policy["initial_backoff_ms"]),
            max_backoff_ms=None if policy.get("max_backoff_ms") is None else int(policy["max_backoff_ms"]),
            multiplier=float(policy.get("multiplier", 0.0)),
            replay_of_run_id=str(data.get("replay_of_run_id", "")),
        )
    except (TypeError, ValueError) as error:
        raise request_invalid(f"run_config is malformed: {error}") from None
    except KeelError as error:
        raise request_invalid(f"run_config: {error.message}") from None


def parse_spawn_request(data: Any, parent_run_id: str, fact_key: str) -> ChildSpawnRequest:
    """A spawn request from its JSON form (`child_run_request_invalid` if malformed)."""
    body = _kind(data, SPAWN_KIND, "spawn")
    context = body.get("initial_context") or {}
    if not isinstance(context, dict):
        raise request_invalid("initial_context must be a JSON object")
    return ChildSpawnRequest(
        parent_run_id=parent_run_id,
        fact_key=fact_key,
        op_id=_text(body, "op_id"),
        op_version=_text(body, "op_version", required=False) or "1",
        op_config=body.get("op_config"),
        input=body.get("input"),
        run_config=run_config_from_json(body.get("run_config")),
        initial_context=context,
        parent_close_policy=check_close_policy(_text(body, "parent_close_policy", required=False)),
        task_queue=_text(body, "task_queue", required=False),
        timeouts=_timeouts(body.get("timeouts")),
    )


def _timeouts(data: Any) -> StepTimeouts:
    """A spawn's `timeouts` ({start_to_close_ms, heartbeat_ms, schedule_to_start_ms}, each optional)."""
    if data is None:
        return StepTimeouts()
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k, 0), int) and data.get(k, 0) >= 0
        for k in ("start_to_close_ms", "heartbeat_ms", "schedule_to_start_ms")
    ):
        raise request_invalid("timeouts must be an object of non-negative integer milliseconds")
    return StepTimeouts.from_json(data)


def parse_await_request(data: Any) -> ChildAwaitRequest:
    """An await request from its JSON form (`child_run_request_invalid` if malformed)."""
    body = _kind(data, AWAIT_KIND, "await")
    try:
        run_id = parse_run_id(_text(body, "child_run_id"), field="child_run_id")
        parent = _text(body, "parent_run_id", required=False)
        if parent:
            parse_run_id(parent, field="parent_run_id")
    except KeelError as error:
        raise request_invalid(error.message) from None
    return ChildAwaitRequest(run_id, _text(body, "child_manifest_id", required=False), parent)


def child_links(events: Iterable[tuple[str, bytes]]) -> list[ChildLink]:
    """A parent's children from its children stream (type, payload): the first link of each, by fact key.

    Unknown event types, newer link versions and payloads that are not JSON are skipped: an older
    engine lists what it can read, and junk appended by another store client links no child.
    """
    seen: dict[str, ChildLink] = {}
    for event_type, payload in events:
        if event_type != CHILD_LINKED:
            continue
        try:
            data = parse_json_bytes(payload)
        except ValueError:  # not JSON: not a link any engine wrote (any store client may append)
            continue
        if not isinstance(data, dict) or data.get("v") != CHILD_LINK_VERSION:
            continue
        link = ChildLink(
            parent_run_id=str(data.get("parent_run_id", "")),
            fact_key=str(data.get("fact_key", "")),
            child_run_id=str(data.get("child_run_id", "")),
            child_manifest_id=str(data.get("child_manifest_id", "")),
            op_id=str(data.get("op_id", "")),
            parent_close_policy=str(data.get("parent_close_policy") or CLOSE_CANCEL),
        )
        seen.setdefault(link.child_run_id, link)
    return sorted(seen.values(), key=lambda link: link.fact_key)
