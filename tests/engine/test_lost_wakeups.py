"""A wake-up is never dropped while its engine lives: a keel.fan_out parent parked on its children
completes when they end, even when the store does not answer the wake-up at first, and even when
the parent's driver ends (its store failing) right after it saw the wait was over.

Before this, either case left the parent parked until its re-check (RECHECK_AFTER_US, 5 minutes):
the chaos test lost a run that way. Over the in-memory event log, whose calls fail on cue.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import engine_service.builtin_ops
from engine_service.domain import (
    COMPLETED,
    DEFAULT_REGISTRY,
    BuildProvenance,
    RunManifest,
    StepContext,
    TransportRegistry,
    make_run_config,
    op,
    single_op_pipeline,
)
from engine_service.domain.streams import run_stream_id
from engine_service.failpoints import Failpoints
from engine_service.runtime.environment import RunEnvironment
from engine_service.runtime.kernel import Engine
from engine_service.store import AppendResult, InMemoryEventLog
from keel_core.errors import invalid_argument, unavailable

_ = engine_service.builtin_ops  # keel.fan_out
WAIT = 30.0
BUILD = BuildProvenance("test", "3", "none")
GATE: dict[str, asyncio.Event] = {}


@op("wakeups.gated", description="Waits until the test opens its gate")
async def gated(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Returns once GATE["open"] is set."""
    await GATE["open"].wait()
    return {"done": True}


def fan_out_manifest() -> RunManifest:
    """One keel.fan_out step with one gated child."""
    config = {"op_id": "wakeups.gated", "count": 1}
    pipeline = single_op_pipeline("keel.fan_out", "1", config)
    return RunManifest(pipeline, None, {}, make_run_config(max_attempts=1), BUILD)


class CuedLog(InMemoryEventLog):
    """An event log whose calls on one run's stream fail or pause on cue."""

    def __init__(self) -> None:
        super().__init__()
        self.parent = ""
        self.failing_heads = 0  # HeadSeq of the parent's stream fails this many more times
        self.on_parked: Any = None  # awaited once the parent's RunParked landed, before it is answered
        self.fail_resume = False  # the parent's next RunResumed append fails

    async def head(self, stream_id: str, *, patience: float | None = None) -> tuple[int, str]:
        if stream_id == run_stream_id(self.parent) and self.failing_heads > 0:
            self.failing_heads -= 1
            raise unavailable("store_unavailable", "the test's store does not answer")
        return await super().head(stream_id, patience=patience)

    async def append(
        self, stream_id: str, events: Sequence[tuple[str, bytes]], *, expected_seq: int | None, **kw: Any
    ) -> AppendResult:
        ours = stream_id == run_stream_id(self.parent)
        types = [name for name, _ in events]
        if ours and self.fail_resume and "RunResumed" in types:
            self.fail_resume = False
            raise unavailable("store_unavailable", "the test's store does not answer")
        result = await super().append(stream_id, events, expected_seq=expected_seq, **kw)
        if ours and "RunParked" in types and self.on_parked is not None:
            parked, self.on_parked = self.on_parked, None
            await parked()
        return result


async def parked(log: CuedLog, run_id: str) -> None:
    """Until the run's stream is labelled parked."""
    for _ in range(int(WAIT / 0.01)):
        if (await log.head(run_stream_id(run_id)))[1] == "parked":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"run {run_id} never parked")


async def ended(kernel: Engine, run_id: str) -> str:
    """The run's status once it ended."""
    while not await kernel.await_run(run_id, 1.0):
        pass
    return (await kernel.views.run_view(run_id)).status


def engine(log: CuedLog) -> Engine:
    env = RunEnvironment(log, DEFAULT_REGISTRY, TransportRegistry(), Failpoints.parse(""))
    return Engine(env, BUILD, checkpoint_linger=0.0, engine_id="mem-wakeups")


async def test_a_parent_woken_while_the_store_does_not_answer_completes_once_it_answers() -> None:
    GATE["open"] = asyncio.Event()
    log = CuedLog()
    kernel = engine(log)
    try:
        log.parent = str(uuid.uuid4())
        started = await kernel.start_run(fan_out_manifest(), log.parent)
        await asyncio.wait_for(parked(log, started.run_id), WAIT)
        for _ in range(int(WAIT / 0.01)):  # the driver ends right after RunParked lands
            if started.run_id not in kernel.drivers:
                break
            await asyncio.sleep(0.01)
        assert started.run_id not in kernel.drivers
        # The child's end wakes the parent: its first looks at the parent's stream fail.
        log.failing_heads = 3
        GATE["open"].set()
        assert await asyncio.wait_for(ended(kernel, started.run_id), WAIT) == COMPLETED
        assert log.failing_heads == 0
    finally:
        await kernel.stop()


async def test_a_parent_whose_driver_failed_as_it_saw_its_children_end_is_woken_again() -> None:
    GATE["open"] = asyncio.Event()
    log = CuedLog()
    kernel = engine(log)
    child_ended = asyncio.Event()

    async def end_the_child_now() -> None:
        # Between the park's landing and its answer, the child ends (its wake-up pokes the
        # parent's driver, still here); then the driver's RunResumed append fails.
        log.fail_resume = True
        GATE["open"].set()
        await child_ended.wait()

    log.on_parked = end_the_child_now
    on_terminal = kernel.runs.on_terminal

    def noted(parent_run_id: str) -> None:
        child_ended.set()
        if on_terminal is not None:
            on_terminal(parent_run_id)

    kernel.runs.on_terminal = noted
    try:
        log.parent = str(uuid.uuid4())
        started = await kernel.start_run(fan_out_manifest(), log.parent)
        assert await asyncio.wait_for(ended(kernel, started.run_id), WAIT) == COMPLETED
        assert not log.fail_resume  # the failing append was tried
    finally:
        await kernel.stop()


CALLS: dict[str, int] = {}


@op("wakeups.effect", description="Counts its calls")
async def effect(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Counts its calls in CALLS[input]."""
    CALLS[input] = CALLS.get(input, 0) + 1
    return {"done": True}


class RefusingLog(InMemoryEventLog):
    """An event log that refuses every StepCompleted (a failure that will not go away)."""

    async def append(
        self, stream_id: str, events: Sequence[tuple[str, bytes]], *, expected_seq: int | None, **kw: Any
    ) -> AppendResult:
        if any(name == "StepCompleted" for name, _ in events):
            raise invalid_argument("event_too_large", "the test's store refuses this event")
        return await super().append(stream_id, events, expected_seq=expected_seq, **kw)


async def test_a_driver_that_fails_for_good_is_not_driven_again_at_once() -> None:
    """A failure that is neither a hand-over nor a store outage hands no wake-up on: the run is left
    to the scans (a wake-up at once would re-drive it in a tight loop, calling its op each time)."""
    log = RefusingLog()
    env = RunEnvironment(log, DEFAULT_REGISTRY, TransportRegistry(), Failpoints.parse(""))
    kernel = Engine(env, BUILD, checkpoint_linger=0.0, engine_id="mem-refused")
    key = str(uuid.uuid4())
    try:
        pipeline = single_op_pipeline("wakeups.effect", "1", None)
        manifest = RunManifest(pipeline, key, {}, make_run_config(max_attempts=1), BUILD)
        started = await kernel.start_run(manifest, None)
        for _ in range(int(WAIT / 0.01)):
            if CALLS.get(key) and started.run_id not in kernel.drivers:
                break
            await asyncio.sleep(0.01)
        # The driver ended (its StepCompleted refused) and nothing was set to wake the run again.
        assert started.run_id not in kernel.drivers
        assert not kernel._wakes
        assert CALLS[key] == 1
    finally:
        await kernel.stop()
