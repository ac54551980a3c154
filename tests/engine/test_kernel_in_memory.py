"""The engine's kernel over the in-memory event log: no server, no gRPC, no database.

Start, resume, complete, fail, retry, cancel and child runs, driven through `Engine` exactly as the
servicer drives it, with `InMemoryEventLog` as the EventLog port. Each test runs with write-behind
and with an append per step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import pytest

from engine_service.builtin_ops import EchoTransport
from engine_service.domain import (
    CANCELED,
    COMPLETED,
    FAILED,
    BuildProvenance,
    OpError,
    OpRegistry,
    RunManifest,
    StepContext,
    TransportRegistry,
    make_run_config,
    op,
    single_op_pipeline,
)
from engine_service.domain.child_runs import (
    AWAIT_KIND,
    AWAIT_NAMESPACE,
    SPAWN_KIND,
    SPAWN_NAMESPACE,
    ChildLink,
)
from engine_service.domain.events import ParkStep
from engine_service.domain.plan import PipelineSpec, StepSpec
from engine_service.domain.streams import (
    RUN_COMPLETED,
    RUN_STARTED,
    RUN_STREAM_PREFIX,
    children_stream_id,
    run_id_of_stream,
    run_stream_id,
)
from engine_service.domain.tasks import StepTimeouts
from engine_service.domain.waits import TIMER
from engine_service.failpoints import Failpoints
from engine_service.runtime.driver import RunDriver
from engine_service.runtime.environment import RunEnvironment
from engine_service.runtime.kernel import Engine, StartOutcome
from engine_service.runtime.views import RUNNING
from engine_service.store import AppendResult, InMemoryEventLog, StreamEvent
from keel_core.clock import now_us, us_of
from keel_core.errors import KeelError, unavailable
from tests.engine.test_calls_through_a_lost_lease import HeldCall

WAIT = 30.0
OPS = OpRegistry()
BUILD = BuildProvenance("test", "3", "none")
FAST_RETRY = make_run_config(max_attempts=3, initial_backoff_ms=1, max_backoff_ms=2)
# Ops that wait for the test: the gate is set per test (the event loop is per test).
GATES: dict[str, asyncio.Event] = {}
ENTERED: dict[str, asyncio.Event] = {}
SEEN: dict[str, Any] = {}


@op("mem.echo", registry=OPS)
async def echo(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Returns its input."""
    return input


@op("mem.flaky", registry=OPS)
async def flaky(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Fails its first two attempts (retryably)."""
    if ctx.attempt < 2:
        raise OpError("flaky", "not yet", retryable=True)
    return {"attempt": ctx.attempt}


@op("mem.broken", registry=OPS)
async def broken(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Fails for good."""
    raise OpError("broken", "this op never works", retryable=False)


@op("mem.gated", registry=OPS)
async def gated(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Waits until the test opens the gate named by its input."""
    ENTERED[input].set()
    await GATES[input].wait()
    return {"gate": input}


@op("mem.parent", registry=OPS)
async def parent(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Spawns one child running `input["op"]` on `input["input"]` and returns what it ended with."""
    spawn = {"kind": SPAWN_KIND, "op_id": input["op"], "input": input["input"]}
    spawned = await ctx.io.call(SPAWN_NAMESPACE, spawn, "child")
    awaited = {"kind": AWAIT_KIND, "child_run_id": spawned["child_run_id"]}
    outcome = await ctx.io.call(AWAIT_NAMESPACE, awaited, "child-done")
    return {"status": outcome["status"], "snapshot": outcome["final_snapshot"]}


class ClosingTransport:
    """Answers, closing the log first: the answer's append fails."""

    def __init__(self, log: InMemoryEventLog) -> None:
        self._log = log

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        await self._log.close()
        return {"answered": fact_key}


@op("mem.call_twice", registry=OPS)
async def call_twice(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Calls `closing`; when that fails, repeats the call with the same key (what it gets: SEEN)."""
    try:
        return await ctx.io.call("closing", {}, "once")
    except KeelError as first:
        SEEN["first"] = first.code
    try:
        SEEN["again"] = await ctx.io.call("closing", {}, "once")
    except KeelError as again:
        SEEN["again"] = again.code
    return None


@op("mem.counted", registry=OPS)
async def counted(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Counts its runs in SEEN[input]."""
    SEEN[input] = SEEN.get(input, 0) + 1
    return input


@op("mem.swallows_cancel", registry=OPS)
async def swallows_cancel(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Waits at its gate; a cancel it catches and returns from (a sloppy op)."""
    ENTERED[input].set()
    try:
        await GATES[input].wait()
    except asyncio.CancelledError:
        return {"cleaned_up": True}
    return {"gate": input}


@op("mem.cancelled_inside", registry=OPS)
async def cancelled_inside(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Attempt 0 awaits an inner task something else cancels (CancelledError, nobody cancelled the
    step); later attempts return."""
    if ctx.attempt == 0:
        inner = asyncio.ensure_future(asyncio.sleep(3600))
        asyncio.get_running_loop().call_soon(inner.cancel)
        await inner
    return {"attempt": ctx.attempt}


@op("mem.always_cancelled_inside", registry=OPS)
async def always_cancelled_inside(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Every attempt awaits an inner task something else cancels."""
    inner = asyncio.ensure_future(asyncio.sleep(3600))
    asyncio.get_running_loop().call_soon(inner.cancel)
    return await inner


@op("mem.task_group_fallback", registry=OPS)
async def task_group_fallback(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """A TaskGroup whose child fails once its body is done; the op returns a fallback. (On Python 3.11
    and 3.12 this leaves the task that ran the op counted as cancelling.)"""

    async def fails() -> None:
        await asyncio.sleep(0)
        raise OpError("child_failed", "no luck", retryable=False)

    fallback = False
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(fails())
    except* OpError:
        fallback = True
    return {"fallback": fallback}


@op("mem.task_group_then_slow", registry=OPS)
async def task_group_then_slow(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Handles a failed TaskGroup, then runs past its step's start-to-close timeout."""
    await task_group_fallback(ctx, op_config, input)
    await asyncio.sleep(3600)
    return None


def two_steps(first_op: str, second_op: str) -> PipelineSpec:
    """`first` then `second`: sequential, so each runs in the driver's own task."""
    return PipelineSpec(
        "two", "1", (StepSpec("first", first_op), StepSpec("second", second_op, depends_on=("first",)))
    )


RUN_ID = "0b0e7f4e-3c51-4d5e-8f2a-7d6c5b4a3921"
# The stream of a one-step run that completed at its first attempt.
ONE_STEP_RUN = [RUN_STARTED, "StepAttemptStarted", "StepCompleted", RUN_COMPLETED]


class SlowStartLog(InMemoryEventLog):
    """A log whose append of RUN_ID's RunStarted lands, then answers once `answer` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.landed, self.answer = asyncio.Event(), asyncio.Event()

    async def append(
        self, stream_id: str, events: Sequence[tuple[str, bytes]], *, expected_seq: int | None, **kw: Any
    ) -> AppendResult:
        result = await super().append(stream_id, events, expected_seq=expected_seq, **kw)
        if expected_seq is None and stream_id == run_stream_id(RUN_ID) and not self.landed.is_set():
            self.landed.set()
            await self.answer.wait()
        return result


def manifest(op_id: str, input: Any = None, **config: Any) -> RunManifest:
    """A one-op run."""
    run_config = make_run_config(**config) if config else FAST_RETRY
    return RunManifest(single_op_pipeline(op_id, "1", None), input, {}, run_config, BUILD)


def engine(log: InMemoryEventLog, linger: float, engine_id: str = "mem-a") -> Engine:
    """An engine over `log`, with the test ops."""
    env = RunEnvironment(log, OPS, TransportRegistry(), Failpoints.parse(""))
    return Engine(env, BUILD, checkpoint_linger=linger, engine_id=engine_id)


def gate(name: str) -> asyncio.Event:
    """A new gate for `mem.gated` runs whose input is `name`."""
    GATES[name], ENTERED[name] = asyncio.Event(), asyncio.Event()
    return GATES[name]


@pytest.fixture(params=[0.2, 0.0], ids=["write-behind", "append-per-step"])
async def kernel(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    """An engine over a fresh in-memory event log, stopped after the test."""
    running = engine(InMemoryEventLog(), request.param)
    try:
        yield running
    finally:
        await running.stop()


async def types_of(kernel: Engine, run_id: str) -> list[str]:
    """The event types of the run's stream."""
    return [event.type for event in await kernel.env.store.read(run_stream_id(run_id))]


async def test_a_waited_run_completes_with_its_output(kernel: Engine) -> None:
    outcome = await kernel.start_run(manifest("mem.echo", {"x": 1}), None, wait=True, wait_seconds=WAIT)
    assert outcome.created
    view = await kernel.views.run_view(outcome.run_id)
    assert view.status == COMPLETED and view.final_snapshot == {"main": {"x": 1}}
    assert await types_of(kernel, outcome.run_id) == [
        RUN_STARTED,
        "StepAttemptStarted",
        "StepCompleted",
        RUN_COMPLETED,
    ]


@op("mem.sleep_long", registry=OPS)
async def sleep_long(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Parks its attempt on a durable timer an hour away."""
    return ParkStep(TIMER, until_us=now_us() + 3_600_000_000)


@pytest.mark.parametrize("ending", ["completed", "parked"])
async def test_a_drivers_objects_are_freed_without_the_cycle_collector(
    kernel: Engine, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    # Nothing of a run's driver holds it in a cycle (its facts and signal waits reach it weakly,
    # its timers are cancelled, its task forgotten): it goes with its last reference, not at some
    # later collection that would first have carried it, its history and its snapshots into an
    # older generation. A parked run's task ends with an exception whose frames hold the driver.
    drivers: list[weakref.ref[RunDriver]] = []
    born = RunDriver.__init__

    def noted(self: RunDriver, *args: Any, **kwargs: Any) -> None:
        born(self, *args, **kwargs)
        drivers.append(weakref.ref(self))

    monkeypatch.setattr(RunDriver, "__init__", noted)
    gc.disable()
    try:
        if ending == "completed":
            outcome = await kernel.start_run(manifest("mem.echo", 1), None, wait=True, wait_seconds=WAIT)
        else:
            outcome = await kernel.start_run(manifest("mem.sleep_long"), None)
            if outcome.run_id in kernel.drivers:  # else it parked already
                await asyncio.wait({kernel.drivers[outcome.run_id]})  # no name keeps the task
        await asyncio.sleep(0)  # the driver task's done callbacks run
        assert len(drivers) == 1 and drivers[0]() is None
    finally:
        gc.enable()
    view = await kernel.views.run_view(outcome.run_id)
    assert view.status == (COMPLETED if ending == "completed" else RUNNING)


async def test_an_unwaited_start_is_durable_before_it_returns_and_awaits_to_the_end(kernel: Engine) -> None:
    outcome = await kernel.start_run(manifest("mem.echo", 7), None)
    head, _ = await kernel.env.store.head(run_stream_id(outcome.run_id))
    assert head >= 1
    assert await kernel.await_run(outcome.run_id, WAIT)
    assert (await kernel.views.run_view(outcome.run_id)).status == COMPLETED


async def test_a_retried_start_with_the_clients_run_id_finds_the_same_run(kernel: Engine) -> None:
    run_id = "6f1d6d2e-8a53-4b1e-9d0e-5a4c1f0b2a11"
    first = await kernel.start_run(manifest("mem.echo", 1), run_id, wait=True, wait_seconds=WAIT)
    again = await kernel.start_run(manifest("mem.echo", 1), run_id, wait=True, wait_seconds=WAIT)
    assert (first.created, again.created) == (True, False)
    assert first.manifest_id == again.manifest_id
    assert (await types_of(kernel, run_id)).count(RUN_STARTED) == 1


async def test_a_retryable_failure_is_retried_until_the_step_completes(kernel: Engine) -> None:
    outcome = await kernel.start_run(manifest("mem.flaky"), None, wait=True, wait_seconds=WAIT)
    view = await kernel.views.run_view(outcome.run_id)
    assert view.status == COMPLETED
    assert [attempt.status for attempt in view.steps[0].attempts] == [FAILED, FAILED, COMPLETED]


async def test_a_permanent_failure_fails_the_run_with_the_ops_error(kernel: Engine) -> None:
    outcome = await kernel.start_run(manifest("mem.broken"), None, wait=True, wait_seconds=WAIT)
    view = await kernel.views.run_view(outcome.run_id)
    assert view.status == FAILED
    assert view.error is not None and view.error.code == "broken"


async def test_cancel_stops_the_running_op_once_and_a_repeat_is_a_noop(kernel: Engine) -> None:
    gate("cancel")
    outcome = await kernel.start_run(manifest("mem.gated", "cancel"), None)
    await asyncio.wait_for(ENTERED["cancel"].wait(), WAIT)
    first = await kernel.terminalizer.terminalize(outcome.run_id, CANCELED, "the test says so")
    again = await kernel.terminalizer.terminalize(outcome.run_id, CANCELED, "again")
    assert (first.transitioned, first.status) == (True, CANCELED)
    assert (again.transitioned, again.status) == (False, CANCELED)
    assert outcome.run_id not in kernel.drivers
    view = await kernel.views.run_view(outcome.run_id)
    assert view.status == CANCELED and view.reason == "the test says so"


async def test_a_cancel_the_op_swallows_still_stops_a_sequential_run(kernel: Engine) -> None:
    # The step runs in the driver's own task: the cancel reaches the op, which returns; the driver
    # stops all the same, and the next step never runs.
    gate("swallow")
    pipeline = two_steps("mem.swallows_cancel", "mem.counted")
    run = RunManifest(pipeline, "swallow", {}, make_run_config(max_attempts=1), BUILD)
    outcome = await kernel.start_run(run, None)
    await asyncio.wait_for(ENTERED["swallow"].wait(), WAIT)
    result = await kernel.terminalizer.terminalize(outcome.run_id, CANCELED, "stop")
    assert (result.transitioned, result.status) == (True, CANCELED)
    assert outcome.run_id not in kernel.drivers
    assert "swallow" not in SEEN  # mem.counted (the second step) never ran


async def test_an_op_cancelled_from_inside_fails_its_attempt_and_is_tried_again(kernel: Engine) -> None:
    # CancelledError that no stop of the run caused fails the attempt, retryably: it runs again.
    pipeline = two_steps("mem.cancelled_inside", "mem.echo")
    run = RunManifest(pipeline, "x", {}, FAST_RETRY, BUILD)
    outcome = await kernel.start_run(run, None, wait=True, wait_seconds=WAIT)
    view = await kernel.views.run_view(outcome.run_id)
    assert view.status == COMPLETED
    first = view.steps[0].attempts
    assert [attempt.attempt for attempt in first] == [0, 1]
    assert first[0].error is not None and first[0].error.code == "op_cancelled"
    assert view.steps[0].output == {"attempt": 1}


@pytest.mark.parametrize("parallel", [False, True], ids=["inline", "branch-task"])
async def test_an_op_that_always_cancels_itself_uses_up_its_attempts(kernel: Engine, parallel: bool) -> None:
    # Bounded by the retry policy, in the driver's task and in a branch's own task alike (it used to
    # be run again at once, for ever).
    steps = [StepSpec("self", "mem.always_cancelled_inside")]
    if parallel:
        steps.append(StepSpec("other", "mem.echo"))
    run = RunManifest(PipelineSpec("p", "1", tuple(steps)), "x", {}, FAST_RETRY, BUILD)
    outcome = await kernel.start_run(run, None, wait=True, wait_seconds=WAIT)
    view = await kernel.views.run_view(outcome.run_id)
    assert view.status == FAILED
    assert view.error is not None and view.error.code == "op_cancelled"
    assert len(view.steps[0].attempts) == 3  # FAST_RETRY: max_attempts 3


async def test_a_step_timeout_after_a_handled_task_group_failure_is_a_step_timeout(kernel: Engine) -> None:
    # The timeout's cancel comes out as CancelledError there (Python 3.11, 3.12): not the op's own.
    step = StepSpec("slow", "mem.task_group_then_slow", timeouts=StepTimeouts(start_to_close_ms=50))
    run = RunManifest(PipelineSpec("p", "1", (step,)), "x", {}, make_run_config(max_attempts=1), BUILD)
    outcome = await kernel.start_run(run, None, wait=True, wait_seconds=WAIT)
    view = await kernel.views.run_view(outcome.run_id)
    assert view.status == FAILED
    assert view.error is not None and view.error.code == "step_timeout"


async def test_an_ops_task_group_failure_it_handled_does_not_stop_the_run(kernel: Engine) -> None:
    # The op runs in the driver's own task: the cancel count a TaskGroup leaves there on Python
    # 3.11 and 3.12 is not taken for a stop of the run.
    pipeline = two_steps("mem.task_group_fallback", "mem.echo")
    run = RunManifest(pipeline, "x", {}, make_run_config(max_attempts=1), BUILD)
    outcome = await kernel.start_run(run, None, wait=True, wait_seconds=WAIT)
    assert outcome.ended_here
    view = await kernel.views.run_view(outcome.run_id)
    assert view.status == COMPLETED
    assert view.steps[0].output == {"fallback": True}


async def test_a_parked_run_is_resumed_by_another_engine_on_the_same_log(kernel: Engine) -> None:
    log = kernel.env.store
    assert isinstance(log, InMemoryEventLog)
    opened = gate("resume")
    first = engine(log, kernel.checkpoint_linger, engine_id="mem-first")
    outcome = await first.start_run(manifest("mem.gated", "resume"), None)
    await asyncio.wait_for(ENTERED["resume"].wait(), WAIT)
    await first.stop()  # parks the run and releases its implicit lease at once
    opened.set()
    assert await kernel.resume_run(outcome.run_id)
    assert await kernel.await_run(outcome.run_id, WAIT)
    view = await kernel.views.run_view(outcome.run_id)
    assert view.status == COMPLETED and view.final_snapshot == {"main": {"gate": "resume"}}


async def test_a_parent_spawns_and_awaits_its_child(kernel: Engine) -> None:
    spec = {"op": "mem.echo", "input": {"y": 2}}
    outcome = await kernel.start_run(manifest("mem.parent", spec), None, wait=True, wait_seconds=WAIT)
    view = await kernel.views.run_view(outcome.run_id)
    assert view.status == COMPLETED
    assert view.final_snapshot == {"main": {"status": COMPLETED, "snapshot": {"main": {"y": 2}}}}
    [child] = view.children
    assert (child.fact_key, child.status) == ("child", COMPLETED)
    child_view = await kernel.views.run_view(child.child_run_id)
    assert child_view.parent_run_id == outcome.run_id


async def test_the_answer_of_a_waited_start_reads_nothing_when_this_engine_linked_every_child(
    kernel: Engine,
) -> None:
    # The run ended here: nothing can have deleted or rerun it before its terminal event, a child
    # this engine finished has a status that never changes, and its terminal append reported a
    # children stream holding only the link this engine appended.
    spec = {"op": "mem.echo", "input": {"y": 2}}
    outcome = await kernel.start_run(manifest("mem.parent", spec), None, wait=True, wait_seconds=WAIT)
    assert outcome.ended_here
    log = kernel.env.store
    assert isinstance(log, InMemoryEventLog)
    before = log.calls.copy()
    answered = await kernel.views.run_view(outcome.run_id, just_ended=True)
    assert log.calls == before
    read_back = await kernel.views.run_view(outcome.run_id)
    assert answered == read_back
    [child] = answered.children
    assert (child.fact_key, child.status) == ("child", COMPLETED)


async def end_with_a_child_linked_elsewhere(
    kernel: Engine, name: str, run_id: str | None = None
) -> StartOutcome:
    """Start a waited `mem.gated` run (gate `name`), link a child `elsewhere` to it while it waits,
    as another client may (another engine's SpawnChild), and return the start once the run ended."""
    gate(name)
    started = asyncio.ensure_future(
        kernel.start_run(manifest("mem.gated", name), run_id, wait=True, wait_seconds=WAIT)
    )
    await asyncio.wait_for(ENTERED[name].wait(), WAIT)
    [running] = kernel.drivers
    link = ChildLink(running, "elsewhere", "5d0f3c1e-2b4a-4c6d-8e9f-0a1b2c3d4e5f", "m", "mem.echo")
    await kernel.env.store.append(
        children_stream_id(running), [link.encode(1)], expected_seq=None, expected_any=True
    )
    GATES[name].set()
    return await started


async def test_a_run_streams_creation_time_is_held_only_while_the_driver_that_created_it_drives_it(
    kernel: Engine,
) -> None:
    # keel.fan_out's resolver asks when the parent's stream was created. While the driver whose
    # append created it drives the run, nobody can delete and start the id again: the answer is that
    # append's commit time, read from nothing. Once the driver ended, the stream is read.
    gate("created")
    outcome = await kernel.start_run(manifest("mem.gated", "created"), None)  # durable before it returns
    await asyncio.wait_for(ENTERED["created"].wait(), WAIT)
    log = kernel.env.store
    assert isinstance(log, InMemoryEventLog)
    [first] = await log.read(run_stream_id(outcome.run_id), limit=1)
    assert first.recorded_at is not None
    before = log.calls.copy()
    assert await kernel.reader.created_at_us(outcome.run_id) == us_of(first.recorded_at)
    assert log.calls == before
    driving = kernel.drivers[outcome.run_id]
    GATES["created"].set()
    await driving  # its end is settled first (Drivers._done was added to the task before this wait)
    before = log.calls.copy()
    assert await kernel.reader.created_at_us(outcome.run_id) == us_of(first.recorded_at)
    assert log.calls - before == {"ReadEvents": 1}


@op("mem.park_on_probe", registry=OPS)
async def park_on_probe(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Parks its attempt on a `probe` wait (a test registers the kind's resolver)."""
    return ParkStep("probe")


async def test_a_first_append_landing_after_its_driver_ended_leaves_no_creation_time_held() -> None:
    # A waited start's RunStarted travels in its driver's first batch. The driver ends on an error
    # (its wait's resolver finds the store away) while that append is still on its way; the append
    # then lands with nobody driving the run here. Its time must not be held: a lease check or a
    # fan-out's end here would trust it after another engine deleted the run and started it again.
    log = InMemoryEventLog()
    running = engine(log, 0.2)
    on_its_way, release, landed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    slowed: list[str] = []
    real_append = log.append

    async def slow_first_append(stream_id: str, events: Any, **kw: Any) -> AppendResult:
        if not stream_id.startswith(RUN_STREAM_PREFIX) or on_its_way.is_set():
            return await real_append(stream_id, events, **kw)
        on_its_way.set()
        slowed.append(stream_id)
        await release.wait()
        try:
            return await real_append(stream_id, events, **kw)
        finally:
            landed.set()

    async def store_away(run_id: str, waiting: Any) -> Any:
        await on_its_way.wait()
        raise unavailable("store_unavailable", "the resolver's read found the store away")

    log.append = slow_first_append  # type: ignore[method-assign]
    running.env.wait_resolvers["probe"] = store_away
    try:
        starting = asyncio.ensure_future(
            running.start_run(manifest("mem.park_on_probe"), None, wait=True, wait_seconds=WAIT)
        )
        with pytest.raises(KeelError, match="store away"):
            await starting
        assert not running.drivers  # the driver ended, its first append still on its way
        [stream_id] = slowed
        run_id = run_id_of_stream(stream_id)
        release.set()
        await asyncio.wait_for(landed.wait(), WAIT)
        [first] = await log.read(run_stream_id(run_id), limit=1)
        assert first.recorded_at is not None
        before = log.calls.copy()
        assert await running.reader.created_at_us(run_id) == us_of(first.recorded_at)
        assert log.calls - before == {"ReadEvents": 1}  # read: not held
    finally:
        release.set()
        await running.stop()


async def test_the_answer_of_a_waited_start_reads_the_children_another_client_linked(kernel: Engine) -> None:
    # A link this engine did not append makes the answer read the children stream.
    outcome = await end_with_a_child_linked_elsewhere(kernel, "foreign")
    log = kernel.env.store
    assert isinstance(log, InMemoryEventLog)
    before = log.calls.copy()
    answered = await kernel.views.run_view(outcome.run_id, just_ended=True)
    # The children stream, and the label of the one child this engine does not hold.
    assert log.calls - before == {"ReadEvents": 1, "HeadSeq": 1}
    assert [child.fact_key for child in answered.children] == ["elsewhere"]
    assert answered == await kernel.views.run_view(outcome.run_id)


async def test_a_run_id_started_again_here_after_a_delete_elsewhere_answers_its_own_children() -> None:
    # Engine A finished run R with a child it linked; engine B deleted R; R is started again on A
    # and another client links a child to it: A's answer lists that child, not the deleted run's.
    run_id = "3f2b9a40-5c1d-4e7f-9a8b-1c2d3e4f5a6b"
    log = InMemoryEventLog()
    first_engine, other = engine(log, 0.2, "mem-a"), engine(log, 0.2, "mem-b")
    try:
        spec = {"op": "mem.echo", "input": {"y": 2}}
        await first_engine.start_run(manifest("mem.parent", spec), run_id, wait=True, wait_seconds=WAIT)
        answered = await first_engine.views.run_view(run_id, just_ended=True)
        assert [child.fact_key for child in answered.children] == ["child"]
        await other.retention.delete_run(run_id)
        assert (await end_with_a_child_linked_elsewhere(first_engine, "again", run_id)).ended_here
        answered = await first_engine.views.run_view(run_id, just_ended=True)
        assert [child.fact_key for child in answered.children] == ["elsewhere"]
        assert answered == await first_engine.views.run_view(run_id)
    finally:
        await first_engine.stop()
        await other.stop()


class SlowAppendLog(InMemoryEventLog):
    """A log whose appends take a few turns of the event loop (as a store's round trip does), and
    which counts the appends to each stream."""

    def __init__(self) -> None:
        super().__init__()
        self.appends: collections.Counter[str] = collections.Counter()

    async def append(
        self, stream_id: str, events: Sequence[tuple[str, bytes]], *, expected_seq: int | None, **kw: Any
    ) -> AppendResult:
        self.appends[stream_id] += 1
        for _ in range(3):
            await asyncio.sleep(0)
        return await super().append(stream_id, events, expected_seq=expected_seq, **kw)


@op("mem.spawn_many", registry=OPS)
async def spawn_many(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Spawns `input` children of mem.echo at once (as keel.fan_out does), awaiting none."""

    async def one(index: int) -> str:
        spawn = {"kind": SPAWN_KIND, "op_id": "mem.echo", "input": index}
        return str((await ctx.io.call(SPAWN_NAMESPACE, spawn, f"child.{index}"))["child_run_id"])

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(index)) for index in range(input)]
    return [task.result() for task in tasks]


@pytest.mark.parametrize("linger", [0.2, 0.0], ids=["write-behind", "append-per-step"])
async def test_the_concurrent_spawns_of_a_step_link_their_children_in_one_append(linger: float) -> None:
    # Each spawn first makes the attempt's events durable: the ten wait for one append together and
    # go on together, so their links make one append (they used to go on one turn of the loop apart,
    # and the links took two appends and two reads of the parent's status).
    log = SlowAppendLog()
    running = engine(log, linger)
    try:
        outcome = await running.start_run(manifest("mem.spawn_many", 10), None, wait=True, wait_seconds=WAIT)
        view = await running.views.run_view(outcome.run_id)
        assert view.status == COMPLETED and len(view.children) == 10
        assert log.appends[children_stream_id(outcome.run_id)] == 1
    finally:
        await running.stop()


async def test_the_answer_of_a_waited_start_without_children_reads_nothing(kernel: Engine) -> None:
    # Its terminal append reported an empty children stream: no link came before its end.
    outcome = await kernel.start_run(manifest("mem.echo", {"x": 1}), None, wait=True, wait_seconds=WAIT)
    log = kernel.env.store
    assert isinstance(log, InMemoryEventLog)
    before = log.calls.copy()
    answered = await kernel.views.run_view(outcome.run_id, just_ended=True)
    assert log.calls == before
    assert answered == await kernel.views.run_view(outcome.run_id)
    assert answered.status == COMPLETED and answered.children == []


async def test_an_unwaited_start_has_not_ended_here(kernel: Engine) -> None:
    outcome = await kernel.start_run(manifest("mem.echo", 7), None)
    assert not outcome.ended_here
    assert await kernel.await_run(outcome.run_id, WAIT)


async def test_canceling_a_parent_cancels_its_running_child(kernel: Engine) -> None:
    gate("child")
    spec = {"op": "mem.gated", "input": "child"}
    outcome = await kernel.start_run(manifest("mem.parent", spec), None)
    await asyncio.wait_for(ENTERED["child"].wait(), WAIT)
    await kernel.terminalizer.terminalize(outcome.run_id, CANCELED, "stop the family")
    view = await kernel.views.run_view(outcome.run_id)
    [child] = view.children
    assert view.status == CANCELED and child.status == CANCELED


async def test_list_runs_by_status_and_watch_a_run_to_its_end(kernel: Engine) -> None:
    gate("listed")
    done = await kernel.start_run(manifest("mem.echo", 1), None, wait=True, wait_seconds=WAIT)
    running = await kernel.start_run(manifest("mem.gated", "listed"), None)
    page, _ = await kernel.views.list_runs([RUNNING], 10, "")
    assert [(run.run_id, run.status) for run in page] == [(running.run_id, RUNNING)]
    page, _ = await kernel.views.list_runs([COMPLETED], 10, "")
    assert [run.run_id for run in page] == [done.run_id]
    seen: list[str] = []

    async def watch() -> None:
        events = kernel.views.watch_run(running.run_id, 0)
        async with contextlib.aclosing(events):
            async for event in events:
                seen.append(type(event.event).__name__)

    watching = asyncio.create_task(watch())
    GATES["listed"].set()
    await asyncio.wait_for(watching, WAIT)
    assert seen[0] == RUN_STARTED and seen[-1] == RUN_COMPLETED


async def test_an_await_on_the_log_is_not_done_when_the_subscription_ends_without_the_runs_end(
    kernel: Engine,
) -> None:
    log = kernel.env.store
    assert isinstance(log, InMemoryEventLog)
    opened = gate("unfinished")
    outcome = await kernel.start_run(manifest("mem.gated", "unfinished"), None)
    await asyncio.wait_for(ENTERED["unfinished"].wait(), WAIT)
    other = engine(log, kernel.checkpoint_linger, engine_id="mem-other")
    try:
        subscribed = asyncio.Event()
        subscribe = log.subscribe

        def noted(stream_id: str, *, after_seq: int = 0) -> AsyncGenerator[StreamEvent, None]:
            subscribed.set()
            return subscribe(stream_id, after_seq=after_seq)

        log.subscribe = noted  # type: ignore[method-assign]
        awaiting = asyncio.create_task(other.await_run(outcome.run_id, None))
        await asyncio.wait_for(subscribed.wait(), WAIT)  # the other engine waits on the log
        await log.close()  # ends the subscription; the run is still running
        with pytest.raises(KeelError) as refused:
            await asyncio.wait_for(awaiting, WAIT)
        assert refused.value.code == "store_unavailable"
    finally:
        opened.set()
        await other.stop()


async def test_an_answer_whose_append_failed_is_not_served_to_a_repeated_call() -> None:
    log = InMemoryEventLog()
    transports = TransportRegistry()
    transports.register("closing", ClosingTransport(log))
    env = RunEnvironment(log, OPS, transports, Failpoints.parse(""))
    kernel = Engine(env, BUILD, checkpoint_linger=0.0, engine_id="mem-closing")
    SEEN.clear()
    try:
        outcome = await kernel.start_run(manifest("mem.call_twice", None, max_attempts=1), None)
        await asyncio.wait({kernel.drivers[outcome.run_id]}, timeout=WAIT)  # a wait that cancels nothing
        # The answer never became durable: the repeat fails as the first call did.
        assert SEEN == {"first": "store_unavailable", "again": "store_unavailable"}
    finally:
        await kernel.stop()


async def test_an_await_while_a_chosen_id_start_lands_does_not_drive_the_run_a_second_time() -> None:
    log = SlowStartLog()
    kernel = engine(log, 0.2, engine_id="mem-slow-start")
    SEEN.clear()
    resuming = asyncio.Event()
    resume = kernel.awaits._resume

    async def noted(run_id: str) -> bool:
        resuming.set()
        return await resume(run_id)

    kernel.awaits._resume = noted
    run_id = RUN_ID
    try:
        starting = asyncio.create_task(kernel.start_run(manifest("mem.counted", "start"), run_id))
        await asyncio.wait_for(log.landed.wait(), WAIT)  # RunStarted landed; no driver yet
        awaiting = asyncio.create_task(kernel.await_run(run_id, None))
        await asyncio.wait_for(resuming.wait(), WAIT)  # the await found no driver: it resumes the run
        log.answer.set()
        await asyncio.wait_for(starting, WAIT)
        assert await asyncio.wait_for(awaiting, WAIT)
        assert (await kernel.views.run_view(run_id)).status == COMPLETED
        assert SEEN == {"start": 1}
    finally:
        await kernel.stop()


class GatedAppendLog(InMemoryEventLog):
    """A log whose first append to a run (`first`), or else the first after it, or (`holding`) the
    first holding an event of that type, waits until `opened` is set (it notes the task making it
    and sets `entered` first); with `failing`, that append then fails as an unreachable store's
    would."""

    def __init__(self, *, first: bool = True, failing: bool = False, holding: str = "") -> None:
        super().__init__()
        self.entered, self.opened = asyncio.Event(), asyncio.Event()
        self._first, self._failing, self._holding = first, failing, holding
        self.appending: asyncio.Task[Any] | None = None  # the task that made that append

    async def append(
        self, stream_id: str, events: Sequence[tuple[str, bytes]], *, expected_seq: int | None, **kw: Any
    ) -> AppendResult:
        if self._holding:
            gated = any(name == self._holding for name, _ in events)
        else:
            gated = (expected_seq is None) == self._first and stream_id.startswith(RUN_STREAM_PREFIX)
        if gated and not self.entered.is_set():
            self.appending = asyncio.current_task()
            self.entered.set()
            await self.opened.wait()
            if self._failing:
                raise unavailable("store_unavailable", "the test's store is down")
        return await super().append(stream_id, events, expected_seq=expected_seq, **kw)


@pytest.mark.parametrize("failing", [False, True], ids=["lands", "fails"])
async def test_a_start_out_of_time_waits_for_the_first_batch_the_driver_is_appending_itself(
    failing: bool,
) -> None:
    # With no time left to wait, a waited start must still not name its run before the run exists.
    # Its first batch (RunStarted to RunCompleted) is then on its way in the driver's own task, not
    # in a flush task of its own: the start's flush, with nothing left to append, waits for that
    # append all the same, and fails as it does.
    log = GatedAppendLog(failing=failing)
    kernel = engine(log, 0.2)
    try:
        start = asyncio.ensure_future(
            kernel.start_run(manifest("mem.echo", 1), None, wait=True, wait_seconds=0)
        )
        await asyncio.wait_for(log.entered.wait(), WAIT)
        [driver] = kernel.drivers.values()
        assert log.appending is driver  # the driver's own append, in its task
        for _ in range(10):  # turns of the loop in which a start not waiting for the append would end
            await asyncio.sleep(0)
        assert not start.done()
        log.opened.set()
        if failing:
            with pytest.raises(KeelError) as raised:
                await asyncio.wait_for(start, WAIT)
            assert raised.value.code == "store_unavailable"
        else:
            outcome = await asyncio.wait_for(start, WAIT)
            assert await types_of(kernel, outcome.run_id) == ONE_STEP_RUN
    finally:
        await kernel.stop()


# Turns a counting task has had (COUNTED[0]), as each `mem.holds_the_loop` step saw them.
COUNTED = [0]
LOOP_TURNS: list[int] = []


@op("mem.holds_the_loop", registry=OPS)
async def holds_the_loop(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Notes the counting task's turns so far, then holds the loop 2 ms without awaiting."""
    LOOP_TURNS.append(COUNTED[0])
    time.sleep(0.002)  # noqa: ASYNC251  (the point: longer than the driver's INLINE_TURN, not awaiting)
    return None


async def test_a_pipeline_of_steps_that_never_await_still_gives_the_loop_turns(kernel: Engine) -> None:
    # Its steps run in the driver's task one after the other; once the driver has held the loop
    # for INLINE_TURN it gives the loop a turn before the next step, so other work is not starved.
    async def count() -> None:
        while True:
            COUNTED[0] += 1
            await asyncio.sleep(0)

    steps = tuple(
        StepSpec(f"s{i}", "mem.holds_the_loop", depends_on=(f"s{i - 1}",) if i else ()) for i in range(5)
    )
    run = RunManifest(PipelineSpec("held", "1", steps), None, {}, FAST_RETRY, BUILD)
    LOOP_TURNS.clear()
    counter = asyncio.ensure_future(count())
    try:
        outcome = await kernel.start_run(run, None, wait=True, wait_seconds=WAIT)
    finally:
        counter.cancel()
    assert (await kernel.views.run_view(outcome.run_id)).status == COMPLETED
    assert len(LOOP_TURNS) == 5
    assert all(later > earlier for earlier, later in itertools.pairwise(LOOP_TURNS))


@op("mem.cancels_itself", registry=OPS)
async def cancels_itself(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Cancels the task running it and returns: a cancel left pending, which no stop sent."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    return input


@op("mem.yields", registry=OPS)
async def yields(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Gives the loop a turn (where a cancel left pending would land), then returns its attempt."""
    await asyncio.sleep(0)
    return {"attempt": ctx.attempt}


async def test_a_cancel_an_op_left_pending_is_its_own_and_does_not_reach_the_next_step(
    kernel: Engine,
) -> None:
    # Both steps run in the driver's task. The first op's cancel is taken at the end of its step,
    # as that op's (whose attempt has completed): the second op runs once and completes.
    pipeline = two_steps("mem.cancels_itself", "mem.yields")
    run = RunManifest(pipeline, "x", {}, make_run_config(max_attempts=1), BUILD)
    outcome = await kernel.start_run(run, None, wait=True, wait_seconds=WAIT)
    view = await kernel.views.run_view(outcome.run_id)
    assert view.status == COMPLETED
    assert [[attempt.status for attempt in step.attempts] for step in view.steps] == [
        [COMPLETED],
        [COMPLETED],
    ]


async def test_a_cancel_that_is_no_stop_during_a_steps_own_append_leaves_that_append_to_land() -> None:
    # With an append per step, the step's append (its completion and the run's) goes while the step
    # still runs. A plain cancel of the driver's task meanwhile (no stop: an op's stray cancel) is
    # taken as the op's, and the append in flight lands: the run completes.
    log = GatedAppendLog(first=False)  # the step's, after RunStarted's
    kernel = engine(log, 0.0)
    try:
        start = asyncio.ensure_future(
            kernel.start_run(manifest("mem.echo", 1), None, wait=True, wait_seconds=WAIT)
        )
        await asyncio.wait_for(log.entered.wait(), WAIT)
        [driver] = kernel.drivers.values()
        driver.cancel()
        await asyncio.sleep(0)
        log.opened.set()
        outcome = await asyncio.wait_for(start, WAIT)
        assert (await kernel.views.run_view(outcome.run_id)).status == COMPLETED
        assert await types_of(kernel, outcome.run_id) == ONE_STEP_RUN
    finally:
        await kernel.stop()


@op("mem.calls_echo", registry=OPS)
async def calls_echo(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Returns what `keel.echo` answers to its input (a recorded call); a stop sets ENTERED["stopped"]."""
    try:
        return await ctx.io.call("keel.echo", input, "echo")
    except asyncio.CancelledError:
        ENTERED["stopped"].set()
        raise


@op("mem.fails_when_answered", registry=OPS)
async def fails_when_answered(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Fails for good once the other branch's answer is on its way to the store (ENTERED["answered"])."""
    await ENTERED["answered"].wait()
    raise OpError("broken", "this branch fails the run", retryable=False)


async def test_a_branch_stopped_while_its_answer_is_appended_leaves_that_append_to_land() -> None:
    # With write-behind (with an append per step, the failing branch's own append would queue
    # behind the held one), one branch's recorded answer is on its way to the store when the other
    # branch fails the run.
    # The answering branch is stopped: it waits a while for its answer's append, then stops
    # waiting. The append itself goes on (the run's one writer never loses track of its head): it
    # lands once the store answers, and the run's failure is appended after it.
    log = GatedAppendLog(holding="FactRecorded")  # the answer's append
    env = RunEnvironment(log, OPS, TransportRegistry(), Failpoints.parse(""))
    env.transports.register("keel.echo", EchoTransport())
    kernel = Engine(env, BUILD, checkpoint_linger=0.2, engine_id="mem-a")
    ENTERED["answered"], ENTERED["stopped"] = log.entered, asyncio.Event()
    pipeline = PipelineSpec(
        "branches", "1", (StepSpec("calls", "mem.calls_echo"), StepSpec("fails", "mem.fails_when_answered"))
    )
    run = RunManifest(pipeline, {"n": 1}, {}, make_run_config(max_attempts=1), BUILD)
    try:
        start = asyncio.ensure_future(kernel.start_run(run, None, wait=True, wait_seconds=WAIT))
        await asyncio.wait_for(ENTERED["stopped"].wait(), WAIT)  # the answer's append still held
        assert not log.opened.is_set()
        log.opened.set()
        outcome = await asyncio.wait_for(start, WAIT)
        view = await kernel.views.run_view(outcome.run_id)
        assert view.status == FAILED and view.error is not None and view.error.code == "broken"
        types = await types_of(kernel, outcome.run_id)
        assert types.count("FactRecorded") == 1 and types[-1] == RUN_COMPLETED
    finally:
        await kernel.stop()


@op("mem.one_key_twice", registry=OPS)
async def one_key_twice(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Makes the `held` call under one key twice at once; with input "cancel", cancels the second."""
    transport: HeldCall = SEEN["held"]
    first = asyncio.ensure_future(ctx.io.call("held", {}, "shared"))
    await transport.entered.wait()  # the first is in flight: the second finds it
    second = asyncio.ensure_future(ctx.io.call("held", {}, "shared"))
    await asyncio.sleep(0)
    if input == "cancel":
        second.cancel()
    await asyncio.sleep(0)
    transport.release.set()
    answers = await asyncio.gather(first, second, return_exceptions=True)
    return [answer if isinstance(answer, dict) else type(answer).__name__ for answer in answers]


@pytest.mark.parametrize("cancel", [False, True], ids=["both-wait", "second-cancelled"])
async def test_two_calls_with_one_key_at_once_make_one_call_and_a_cancelled_one_leaves_the_other(
    cancel: bool,
) -> None:
    # Two concurrent calls with one key make one transport call and share its recorded answer. A
    # cancel of the second one stops its wait only: the first one still gets the answer.
    transport = HeldCall()
    SEEN["held"] = transport
    env = RunEnvironment(InMemoryEventLog(), OPS, TransportRegistry(), Failpoints.parse(""))
    env.transports.register("held", transport)
    kernel = Engine(env, BUILD, checkpoint_linger=0.2, engine_id="mem-a")
    try:
        run = manifest("mem.one_key_twice", "cancel" if cancel else "wait")
        outcome = await kernel.start_run(run, None, wait=True, wait_seconds=WAIT)
        view = await kernel.views.run_view(outcome.run_id)
        assert view.status == COMPLETED
        second = "CancelledError" if cancel else {"echo": {}}
        assert view.final_snapshot == {"main": [{"echo": {}}, second]}
        assert (transport.calls, transport.answered) == (1, 1)
        assert (await types_of(kernel, outcome.run_id)).count("FactRecorded") == 1
    finally:
        await kernel.stop()
