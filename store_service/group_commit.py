"""The group-commit queue both SQL backends feed: appends wait here until their writer takes them.

A writer takes every append queued since its last commit as one group (bounded in count and
bytes) and commits it in one transaction; each caller's future then gets its own outcome. Other
write work (a backend's artifact staging, trims) queues as a plain coroutine function and runs
alone, in queue order with the appends around it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from keel_core.content import content_id
from store_service.backend import AppendResult, EventPair, Expected, NewArtifact, StreamStatus

T = TypeVar("T")
WriteTask = Callable[[], Awaitable[None]]


class AppendJob:
    """One caller's append waiting for its writer; its future gets the caller's own outcome."""

    __slots__ = (
        "append_key",
        "artifact_ids",
        "artifacts",
        "attributes",
        "due_at_us",
        "events",
        "expected",
        "future",
        "nudges",
        "report_heads",
        "size",
        "status",
        "stream_id",
    )

    def __init__(
        self,
        stream_id: str,
        expected: Expected,
        events: Sequence[EventPair],
        status: StreamStatus | None,
        artifacts: Sequence[NewArtifact],
        future: asyncio.Future[AppendResult],
        attributes: Mapping[str, str] | None = None,
        due_at_us: int | None = None,
        nudges: Mapping[str, int] | None = None,
        report_heads: Sequence[str] = (),
        append_key: str | None = None,
    ) -> None:
        self.stream_id = stream_id
        # Names the append: a repeat under the same key on the same stream answers as the first.
        self.append_key = append_key
        # Streams whose heads the caller's result reports, read in the group's transaction.
        self.report_heads = report_heads
        # Other streams made due with the append if they are PARKED (stream id -> due time).
        self.nudges: Mapping[str, int] = nudges or {}
        # None keeps the stream's due time, 0 clears it, more sets it (with the events).
        self.due_at_us = due_at_us
        self.expected = expected
        self.events = events
        self.status = status
        self.artifacts = artifacts
        self.attributes: Mapping[str, str] = attributes or {}
        self.artifact_ids = tuple(content_id(a.data) for a in artifacts)
        self.size = sum(len(payload) for _, payload in events) + sum(len(a.data) for a in artifacts)
        self.future = future


def resolve(future: asyncio.Future[T] | None, outcome: T | BaseException) -> None:
    """Hand `outcome` (a result or an error) to whoever waits on `future`, if anyone still does."""
    # A caller cancelled while queued has no one to tell; its write may still have happened.
    if future is None or future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


# A KeelError (a conflict) or, for a whole group that failed, the error every caller gets.
AppendOutcome = AppendResult | BaseException


class WriteQueue:
    """One writer's queue: appends (taken in groups), other write tasks, and the closing mark."""

    def __init__(self, max_appends: int, max_bytes: int) -> None:
        self.max_appends = max_appends
        self.max_bytes = max_bytes
        self._items: collections.deque[AppendJob | WriteTask | None] = collections.deque()
        self._queued = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: AppendJob | WriteTask | None) -> None:
        """Queue an append, a write task, or (None) the mark after which the writer stops."""
        self._items.append(item)
        self._queued.set()

    async def wait(self) -> None:
        """Return once something is queued."""
        if not self._items:
            self._queued.clear()
            await self._queued.wait()

    def take(self) -> list[AppendJob] | WriteTask | None:
        """The next group of consecutive appends, else the next write task, else None (closing)."""
        group: list[AppendJob] = []
        size = 0
        while self._items and len(group) < self.max_appends:
            head = self._items[0]
            if not isinstance(head, AppendJob) or (group and size + head.size > self.max_bytes):
                break
            group.append(head)
            size += head.size
            self._items.popleft()
        if group:
            return group
        item = self._items.popleft()
        assert not isinstance(item, AppendJob)  # an append at the head is always taken above
        return item


__all__ = ["AppendJob", "AppendOutcome", "WriteQueue", "WriteTask", "resolve"]
