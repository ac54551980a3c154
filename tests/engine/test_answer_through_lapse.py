"""An answer is kept through a lapse of the lease even when a concurrent call of the op was refused.

Over the in-memory event log: an op makes two concurrent `io.call`s. The first one's transport is
in flight when the lease's trust lapses (nobody takes over); the second one is refused before its
transport (`lease_lost`). The first one's answer must still be recorded (a compare-and-swap at the
head this driver wrote, which nobody moved), or a resumed run would repeat its side effect.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

from engine_service.domain import (
    BuildProvenance,
    FactRecorded,
    OpRegistry,
    RunManifest,
    StepContext,
    TransportRegistry,
    make_run_config,
    op,
    single_op_pipeline,
)
from engine_service.domain.events import decode_event
from engine_service.domain.streams import run_stream_id
from engine_service.failpoints import Failpoints
from engine_service.runtime.environment import RunEnvironment
from engine_service.runtime.kernel import Engine
from engine_service.store import InMemoryEventLog
from keel_core.errors import KeelError

WAIT = 30.0
TTL = 600.0  # the upkeep never runs during the test: the lapse is the test's doing
OPS = OpRegistry()
BUILD = BuildProvenance("test", "3", "none")
STATE: dict[str, asyncio.Event] = {}
CALLS: collections.Counter[str] = collections.Counter()


class SlowTransport:
    """Answers once the test opens STATE["answer"]."""

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        CALLS[fact_key] += 1
        STATE["in_flight"].set()
        await STATE["answer"].wait()
        return {"answered": fact_key}


@op("lapse.two_calls", registry=OPS)
async def two_calls(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Starts a slow call; once the lease lapsed, makes a second call, then returns the first answer."""
    first = asyncio.ensure_future(ctx.io.call("slow", {}, "first"))
    await STATE["lapsed"].wait()
    with contextlib.suppress(KeelError):  # refused: the lease is no longer trusted
        await ctx.io.call("slow", {}, "second")
    STATE["answer"].set()
    return await first


async def test_a_refused_concurrent_call_does_not_drop_the_answer_in_flight() -> None:
    STATE.update(in_flight=asyncio.Event(), lapsed=asyncio.Event(), answer=asyncio.Event())
    CALLS.clear()
    transports = TransportRegistry()
    transports.register("slow", SlowTransport())
    log = InMemoryEventLog()
    engine = Engine(RunEnvironment(log, OPS, transports, Failpoints.parse("")), BUILD, lease_ttl=TTL)
    manifest = RunManifest(
        single_op_pipeline("lapse.two_calls", "1", None), None, {}, make_run_config(max_attempts=1), BUILD
    )
    try:
        outcome = await engine.start_run(manifest, None)
        await asyncio.wait_for(STATE["in_flight"].wait(), WAIT)
        lease = engine.leases.held[outcome.run_id]
        lease._born -= TTL  # the implicit lease's trust ran out (a pause); nobody takes the run over
        assert not lease.is_valid()
        STATE["lapsed"].set()
        driver = engine.drivers[outcome.run_id]
        await asyncio.wait({driver}, timeout=WAIT)
        assert driver.done()
        events = [decode_event(e.type, e.payload) for e in await log.read(run_stream_id(outcome.run_id))]
        recorded = [event.fact_key for event in events if isinstance(event, FactRecorded)]
        assert CALLS == {"first": 1}
        assert recorded == ["first"]
    finally:
        await engine.stop()
