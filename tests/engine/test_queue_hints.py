"""A queue's hint stream stays short, and tasks whose hints were trimmed unread still reach pollers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from engine_service.domain.canonical import canonical_json_bytes
from engine_service.domain.streams import TASK_ENQUEUED, TASK_OPEN_LABEL, TASK_STREAM_PREFIX, queue_stream_id
from engine_service.domain.tasks import (
    OP_ATTRIBUTE,
    PENDING,
    QUEUE_ATTRIBUTE,
    STATE_ATTRIBUTE,
    StepTimeouts,
    TaskScheduled,
)
from engine_service.runtime import task_board
from engine_service.runtime.task_board import Hint, TaskBoard
from engine_service.runtime.task_dispatch import CLAIM_GONE, Poller, QueueDispatcher
from engine_service.store import InMemoryEventLog, StreamSummary
from keel_core.errors import unavailable
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


class FlakyListing(InMemoryEventLog):
    """A log whose next `failing` listings fail as a store away would."""

    failing = 0

    async def list_streams(self, **kw: Any) -> tuple[list[StreamSummary], str]:
        if self.failing:
            self.failing -= 1
            self.calls["ListStreams"] += 1
            raise unavailable("store_unavailable", "the store is away")
        return await super().list_streams(**kw)


@pytest.mark.parametrize("failed_listings", [0, 1], ids=["listed", "listed after a failed listing"])
async def test_tasks_whose_hints_were_trimmed_unread_reach_a_waiting_poller(failed_listings: int) -> None:
    log = FlakyListing()
    claimed: set[str] = set()

    async def claim(hint: Hint, poller: Poller) -> str:
        claimed.add(hint.stream_id)
        return CLAIM_GONE  # the poller stays free for the next

    dispatcher = QueueDispatcher(log, "q", claim, patience=1.0)
    poller = Poller("worker", frozenset(), asyncio.get_running_loop().create_future())
    try:
        dispatcher.add(poller)
        await until(lambda: log.calls["ListStreams"] == 1 and log.calls["SubscribeEvents"] == 1, "following")
        for _ in range(3):
            await asyncio.sleep(0)  # the follower waits for the queue's next hint
        # Three tasks are created elsewhere; their hints land, and the first two are trimmed before
        # the follower reads any of them.
        hints = queue_stream_id("q")
        for index in range(1, 4):
            task = f"{TASK_STREAM_PREFIX}{index}"
            await log.append(
                task,
                [("TaskScheduled", b"{}")],
                expected_seq=None,
                status=TASK_OPEN_LABEL,
                attributes={QUEUE_ATTRIBUTE: "q", STATE_ATTRIBUTE: PENDING, OP_ATTRIBUTE: "op@1"},
            )
            payload = canonical_json_bytes({"v": 1, "task": task, "op": "op@1", "again": False})
            await log.append(hints, [(TASK_ENQUEUED, payload)], expected_seq=None, expected_any=True)
        log.failing = failed_listings
        await log.trim(hints, 3)
        # The queue's index has what the follower missed.
        tasks = {f"{TASK_STREAM_PREFIX}{index}" for index in (1, 2, 3)}
        await until(lambda: claimed == tasks, "every task claimed for the poller")
        assert log.calls["ListStreams"] == 2 + failed_listings
    finally:
        poller.result.cancel()
        await dispatcher.close()
