"""Task deadlines kept by the store's due-time index, and the wake-ups of runs parked on tasks.

Every append to a task stream sets the stream's due time to the task's next deadline
(engine_service.domain.tasks.next_deadline: schedule-to-start, the claim's lease, start-to-close;
0 once it ended). Each engine runs one TaskWaker: it asks the store for the task streams due by now
(`ListDue`, one query, never a scan), ends each such task (TaskExpired, or TaskReleased for a claim
never heard from) with a compare-and-swap at the head it read, and wakes the task's run
(`Engine.wake_run`), which its `task` wait resolver then settles. It sleeps until the earliest due
time the store named (at most POLL_SECONDS). A run still driven in a coroutine also keeps its task's
deadlines itself (engine_service.runtime.task_board.TaskBoard.outcome); the compare-and-swap lets one
of the two through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from engine_service.domain.streams import TASK_STREAM_PREFIX
from engine_service.runtime.task_board import TaskBoard
from keel_core.clock import now_us
from keel_core.errors import KeelError

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
DUE_PAGE = 200


def run_id_of_task_stream(stream_id: str) -> str:
    """The run id in a task stream id (`task:<run>:<attempt>:<step>`)."""
    return stream_id.removeprefix(TASK_STREAM_PREFIX).split(":", 1)[0]


class TaskWaker:
    """One per engine: ends the tasks whose deadline passed and wakes their runs."""

    def __init__(self, board: TaskBoard, wake: Callable[[str], Awaitable[bool]]) -> None:
        self.board = board
        self._wake = wake
        self._task: asyncio.Task[None] | None = None
        self._handling: set[str] = set()
        self._work: set[asyncio.Task[None]] = set()
        self.closing = False

    def start(self) -> None:
        """Start watching task deadlines (idempotent)."""
        if self._task is None and not self.closing:
            self._task = asyncio.create_task(self._watch_forever(), name="task deadlines")

    async def stop(self) -> None:
        """Stop watching."""
        self.closing = True
        for task in [t for t in (self._task, *self._work) if t is not None]:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _watch_forever(self) -> None:
        while not self.closing:
            try:
                sleep_for = await self.end_due()
            except KeelError as error:
                log.warning("looking for due tasks failed: %s", error.message)
                sleep_for = POLL_SECONDS
            await asyncio.sleep(sleep_for)

    async def end_due(self) -> float:
        """End every task due now (in the background); how long to sleep before the next look."""
        now = now_us()
        due, next_due_us = await self.board.store.list_due(now, prefix=TASK_STREAM_PREFIX, limit=DUE_PAGE)
        for entry in due:
            if entry.stream_id in self._handling:
                continue
            self._handling.add(entry.stream_id)
            work = asyncio.create_task(self._end_one(entry.stream_id))
            self._work.add(work)
            work.add_done_callback(self._work.discard)
        if len(due) == DUE_PAGE:
            return 0.05
        sleep_for = POLL_SECONDS
        if next_due_us:
            sleep_for = min(sleep_for, max(0.0, (next_due_us - now_us()) / 1e6))
        return max(sleep_for, 0.005)

    async def _end_one(self, stream_id: str) -> None:
        try:
            state = await self.board.read(stream_id)
            ended = state.outcome is None
            state = await self.board.enforce_deadline(stream_id, state)
            if ended and state.outcome is not None:
                await self._wake(run_id_of_task_stream(stream_id))
        except KeelError as error:  # a conflict (someone wrote first) or the store away: next look
            log.info("task %s: deadline not enforced here: %s", stream_id, error.message)
        finally:
            self._handling.discard(stream_id)
