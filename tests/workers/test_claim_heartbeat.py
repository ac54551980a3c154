"""A claim's heartbeat timeout is decided once, by the engine that made the claim, and recorded in
its TaskClaimed: a heartbeat served by any other engine (whatever its own --task-heartbeat-timeout)
renews the lease by it. Two engines over one in-memory event log."""

from __future__ import annotations

import asyncio
import uuid

from engine_service.domain import (
    DEFAULT_REGISTRY,
    BuildProvenance,
    RunManifest,
    TransportRegistry,
    make_run_config,
    single_op_pipeline,
)
from engine_service.domain.tasks import (
    NO_TIMEOUTS,
    TaskClaimed,
    TaskScheduled,
    fold_task,
    lease_deadline_after,
)
from engine_service.failpoints import Failpoints
from engine_service.runtime.environment import RunEnvironment
from engine_service.runtime.kernel import Engine
from engine_service.store import InMemoryEventLog

BUILD = BuildProvenance("test", "3", "none")


def engine(log: InMemoryEventLog, name: str, task_heartbeat_timeout: float) -> Engine:
    env = RunEnvironment(log, DEFAULT_REGISTRY, TransportRegistry(), Failpoints.parse(""))
    return Engine(env, BUILD, engine_id=name, task_heartbeat_timeout=task_heartbeat_timeout)


async def test_a_heartbeat_through_another_engine_renews_the_claim_by_the_claims_own_timeout() -> None:
    log = InMemoryEventLog()
    claiming, other = engine(log, "a", 60.0), engine(log, "b", 0.0)
    pipeline = single_op_pipeline("remote.op", "1", {}, task_queue="q")
    manifest = RunManifest(pipeline, None, {}, make_run_config(max_attempts=1), BUILD)
    try:
        await claiming.start_run(manifest, str(uuid.uuid4()))
        claimed = await asyncio.wait_for(claiming.tasks.poll("q", "w1", [], 10), 30)
        assert claimed is not None and claimed.heartbeat_ms == 60_000
        first = claimed.lease_deadline_us
        await asyncio.sleep(0.01)  # so that a renewal is a later deadline
        cancel_requested, renewed = await other.tasks.heartbeat(claimed.token)
        assert not cancel_requested
        assert renewed > first  # engine b has no default of its own: it renewed by the claim's 60 s
        state = await claiming.env.tasks.read(claimed.token.stream_id)
        assert state.lease_deadline_us == renewed and state.claim_heartbeat_ms == 60_000
    finally:
        await claiming.stop()
        await other.stop()


def test_a_claim_an_older_engine_made_is_renewed_by_the_span_its_lease_was_given() -> None:
    """An older engine recorded no heartbeat timeout in TaskClaimed, only the lease deadline its own
    default gave: a heartbeat renews by that span, so a live worker keeps its task through an upgrade."""
    scheduled = TaskScheduled("r", "s", 0, "q", "op", "1", NO_TIMEOUTS, fencing=3, at_us=1_000)
    older_claim = TaskClaimed("w1", at_us=2_000_000, lease_deadline_us=62_000_000)  # no heartbeat_ms
    state = fold_task([scheduled, older_claim])
    assert state.claim_heartbeat_ms == 0
    assert lease_deadline_after(state, 10_000_000) == 70_000_000
    unexpiring = fold_task([scheduled, TaskClaimed("w1", at_us=2_000_000)])
    assert lease_deadline_after(unexpiring, 10_000_000) == 0
