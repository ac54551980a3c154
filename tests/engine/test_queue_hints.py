"""A queue's hint stream stays short, and a follower that lagged past a trim lists the queue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from engine_service.domain.canonical import canonical_json_bytes
from engine_service.domain.streams import TASK_ENQUEUED, queue_stream_id
from engine_service.domain.tasks import StepTimeouts, TaskScheduled
from engine_service.runtime import task_board
from engine_service.runtime.task_board import Hint, TaskBoard
from engine_service.runtime.task_dispatch import CLAIM_GONE, Poller, QueueDispatcher
from engine_service.store import InMemoryEventLog
from tests.engine.processes import eventually

WAIT = 10.0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Return once `condition` holds (WAIT bounds the wait; it is no timing claim)."""
    await eventually(condition, what, within=WAIT, poll=0.01)


def scheduled(index: int) -> TaskScheduled:
    """A task of queue `q`."""
    return TaskScheduled(f"run-{index}", "s", 0, "q", "op", "1", StepTimeouts(), 1, 0)


async def test_every_trim_hints_every_th_hint_trims_the_queue_stream_to_its_last_hints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1,000 and 1,000 in service; 10 and 7 here.
    monkeypatch.setattr(task_board, "TRIM_HINTS_EVERY", 10)
    monkeypatch.setattr(task_board, "KEEP_HINTS", 7)
    log = InMemoryEventLog()
    board = TaskBoard(log)
    for index in range(1, 36):
        await board.hint(scheduled(index), f"task-{index}")
        await until(lambda: not board._hints, "the hint written")  # each lands before the next
    events = await log.read(queue_stream_id("q"))
    head, _ = await log.head(queue_stream_id("q"))
    assert head == 35
    # Trimmed below 30 - 7 at hint 30: hints 23 to 35 are kept, every one of them whole.
    assert [event.seq for event in events] == list(range(23, 36))
    assert all(event.type == TASK_ENQUEUED for event in events)


async def test_a_follower_that_lagged_past_a_trim_lists_the_queue_again() -> None:
    log = InMemoryEventLog()
    claimed: list[str] = []

    async def claim(hint: Hint, poller: Poller) -> str:
        claimed.append(hint.stream_id)
        return CLAIM_GONE

    dispatcher = QueueDispatcher(log, "q", claim, patience=1.0)
    poller = Poller("worker", frozenset(), asyncio.get_running_loop().create_future())
    try:
        dispatcher.add(poller)
        await until(lambda: log.calls["ListStreams"] == 1 and log.calls["SubscribeEvents"] == 1, "following")
        for _ in range(3):
            await asyncio.sleep(0)  # the follower waits for the queue's next hint
        stream = queue_stream_id("q")
        # Three hints land and the first two are trimmed before the follower reads any of them.
        for index in range(1, 4):
            payload = canonical_json_bytes({"v": 1, "task": f"task-{index}", "op": "op@1", "again": False})
            await log.append(stream, [(TASK_ENQUEUED, payload)], expected_seq=None, expected_any=True)
        await log.trim(stream, 3)
        await until(lambda: log.calls["ListStreams"] == 2, "listed again")  # the index has what it missed
        await until(lambda: claimed == ["task-3"], "the hint it read claimed")
    finally:
        poller.result.cancel()
        await dispatcher.close()
