"""How a driver learns a remote task's outcome (TaskBoard.outcome): the events its own engine appends
to the task stream (the claim, and the outcome of a worker it serves) are handed over at once, and
the stream is followed in the store as well only when the outcome may come through another engine.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engine_service.domain import (
    COMPLETED,
    DEFAULT_REGISTRY,
    FAILED,
    BuildProvenance,
    RunManifest,
    TransportRegistry,
    make_run_config,
    single_op_pipeline,
)
from engine_service.domain.streams import TASK_STREAM_PREFIX, task_stream_id
from engine_service.domain.tasks import (
    StepTimeouts,
    TaskClaimed,
    TaskCompleted,
    TaskScheduled,
    encode_task_event,
)
from engine_service.failpoints import Failpoints
from engine_service.runtime import remote_steps
from engine_service.runtime.environment import RunEnvironment
from engine_service.runtime.kernel import Engine
from engine_service.runtime.task_board import TaskBoard
from engine_service.store import InMemoryEventLog, StreamEvent
from engine_service.store.port import LocalAppends
from keel_core.clock import now_us
from keel_core.json_rules import MAX_JSON_DEPTH
from store_service.server import StoreConfig, start_store
from tests.engine.conftest import start_test_engine

BUILD = BuildProvenance("test", "3", "none")
WAIT = 30.0
NEVER = 3600.0  # a store follow this late never starts within a test


def nested_output(depth: int) -> Any:
    """An object nesting `depth` levels."""
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


def remote_run() -> RunManifest:
    """One step on task queue `q` (its op runs on a worker: here, the test's own calls)."""
    pipeline = single_op_pipeline("remote.op", "1", {}, task_queue="q")
    return RunManifest(pipeline, None, {}, make_run_config(max_attempts=1), BUILD)


async def work_one_task(through: Engine, output: Any) -> None:
    """Claim the next task of `q` through `through`, as a worker polling it would, and complete it."""
    claimed = await asyncio.wait_for(through.tasks.poll("q", "w1", [], WAIT), WAIT)
    assert claimed is not None
    await through.tasks.complete(claimed.token, output)


async def main_output(running: Engine, run_id: str) -> Any:
    """The run's final output, once it ended completed."""
    assert await running.await_run(run_id, WAIT)
    _, history = await running.reader.read_history(run_id)
    assert history.terminal is not None and history.terminal.status == COMPLETED
    return (await running.reader.final_snapshot(history.terminal.final_snapshot_id))["main"]


def task_subscriptions(running: Engine) -> list[str]:
    """The task streams `running` subscribes to in its store from now on (a list it appends to)."""
    store = running.env.store
    real = store.subscribe
    seen: list[str] = []

    def spying(stream_id: str, **kw: Any) -> AsyncIterator[StreamEvent]:
        if stream_id.startswith(TASK_STREAM_PREFIX):
            seen.append(stream_id)
        return real(stream_id, **kw)

    store.subscribe = spying  # type: ignore[method-assign,assignment]
    return seen


async def test_a_task_ended_through_the_engine_driving_its_run_needs_no_store_subscription(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The driver waits for the outcome itself (no parking, no resolver's read): only the events
    # handed over by its own engine can end that wait.
    monkeypatch.setattr(remote_steps, "WAIT_IN_DRIVER_SECONDS", NEVER)
    env = RunEnvironment(InMemoryEventLog(), DEFAULT_REGISTRY, TransportRegistry(), Failpoints.parse(""))
    running = Engine(env, BUILD, engine_id="a")
    running.env.tasks.follow_store_after = NEVER  # only this engine's own appends can end the wait
    subscribed = task_subscriptions(running)
    try:
        run_id = str(uuid.uuid4())
        await running.start_run(remote_run(), run_id)
        await work_one_task(running, {"n": 1})
        assert await main_output(running, run_id) == {"n": 1}
        assert subscribed == []
        assert not running.env.tasks.follows_store_at_once()
    finally:
        await running.stop()


async def test_a_task_ended_through_another_engine_reaches_its_run_and_later_ones_are_followed_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Engine b serves the worker: the claim and the outcome are its appends, which engine a, driving
    # the run, sees only in the store. Once a saw a task claimed elsewhere, it follows the store at
    # once: its second run would otherwise wait for a follow that never starts. The driver waits
    # for each outcome itself (never parked: a parked run's resolver reads the task instead).
    monkeypatch.setattr(remote_steps, "WAIT_IN_DRIVER_SECONDS", NEVER)
    store = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store")))
    address = f"127.0.0.1:{store.port}"
    a_serving, b_serving = await start_test_engine(address), await start_test_engine(address)
    try:
        a, b = a_serving.engine, b_serving.engine
        assert a is not None and b is not None
        subscribed = task_subscriptions(a)
        first = str(uuid.uuid4())
        await a.start_run(remote_run(), first)
        await work_one_task(b, {"n": 1})
        assert await main_output(a, first) == {"n": 1}
        assert a.env.tasks.follows_store_at_once()
        assert subscribed and all(first in stream for stream in subscribed)  # after a's short wait
        before = len(subscribed)

        a.env.tasks.follow_store_after = NEVER
        second = str(uuid.uuid4())
        await a.start_run(remote_run(), second)
        await work_one_task(b, {"n": 2})
        assert await main_output(a, second) == {"n": 2}
        assert any(second in stream for stream in subscribed[before:])
    finally:
        await a_serving.drain(0.5)
        await b_serving.drain(0.5)
        await store.drain(0.5)


async def test_a_deadline_missed_while_another_engine_ended_the_task_reads_the_outcome() -> None:
    # The task's schedule-to-start deadline has passed, but another engine claimed and completed it
    # (appends this engine is not handed, and no store follow has started): the driver's attempt to
    # end the task loses the compare-and-swap, and the outcome it lost to is read, not waited for.
    log = InMemoryEventLog()
    board = TaskBoard(log, follow_store_after=NEVER)
    timeouts = StepTimeouts(schedule_to_start_ms=1)
    late = TaskScheduled("run-1", "s", 1, "q", "op", "1", timeouts, 1, now_us() - 10_000_000)
    stream_id = task_stream_id("run-1", "s", 1)
    state = await board.schedule(late, {"op_config": None, "input": None}, stream_id, adopted=False)
    here, log.local = log.local, LocalAppends()  # appends of another engine: not handed over here
    claim = TaskClaimed("w1", now_us())
    await log.append(stream_id, [encode_task_event(claim)], expected_seq=state.head_seq)
    done = TaskCompleted(state.head_seq + 1, {"n": 1}, now_us())
    await log.append(stream_id, [encode_task_event(done)], expected_seq=state.head_seq + 1)
    log.local = here
    ended = await asyncio.wait_for(board.outcome(stream_id, state), WAIT)
    assert ended.outcome == done


@pytest.mark.parametrize(
    ("output", "why"),
    [({"n": 2**60}, "beyond 2**53"), (nested_output(MAX_JSON_DEPTH), "cannot be kept in the run's context")],
    ids=["inexact-integer", "too-deep"],
)
async def test_an_output_a_store_client_wrote_past_complete_tasks_checks_fails_its_step_for_good(
    output: Any, why: str
) -> None:
    # A TaskCompleted appended straight to the task stream (not through CompleteTask, which would
    # refuse it) reaches the run, which checks the output where it records it: the step fails,
    # not retried, and the run can still be read and answered.
    env = RunEnvironment(InMemoryEventLog(), DEFAULT_REGISTRY, TransportRegistry(), Failpoints.parse(""))
    running = Engine(env, BUILD, engine_id="a")
    try:
        run_id = str(uuid.uuid4())
        await running.start_run(remote_run(), run_id)
        claimed = await asyncio.wait_for(running.tasks.poll("q", "w1", [], WAIT), WAIT)
        assert claimed is not None
        stream_id = claimed.token.stream_id
        head, _ = await env.store.head(stream_id)
        done = TaskCompleted(claimed.token.claim, output, now_us())
        await env.store.append(stream_id, [encode_task_event(done)], expected_seq=head)
        assert await running.await_run(run_id, WAIT)
        _, history = await running.reader.read_history(run_id)
        assert history.terminal is not None and history.terminal.status == FAILED
        error = history.terminal.error
        assert error is not None and error.code == "op_output_invalid" and not error.retryable
        assert why in error.message
    finally:
        await running.stop()
