"""`until_done`: what `asyncio.wait({task}, timeout=...)` answers for one task, never cancelling it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from engine_service.runtime.awaiting import until_done


class Watched(asyncio.Future[Any]):
    """A future that counts the done callbacks added to it and not removed."""

    def __init__(self) -> None:
        super().__init__()
        self.callbacks = 0

    def add_done_callback(self, fn: Callable[[Watched], object], **kwargs: Any) -> None:
        self.callbacks += 1
        super().add_done_callback(fn, **kwargs)

    def remove_done_callback(self, fn: Callable[[Watched], object]) -> int:
        removed = super().remove_done_callback(fn)
        self.callbacks -= removed
        return removed


async def test_a_task_that_ends_in_time_is_done_and_its_result_is_its_own() -> None:
    release = asyncio.Event()

    async def work() -> str:
        await release.wait()
        return "result"

    task = asyncio.ensure_future(work())
    asyncio.get_running_loop().call_soon(release.set)
    assert await until_done(task, 60)
    assert task.result() == "result"


async def test_time_running_out_first_answers_false_and_leaves_the_task_running() -> None:
    release = asyncio.Event()
    task = asyncio.ensure_future(release.wait())
    assert not await until_done(task, 0.01)
    assert not task.done()
    release.set()
    assert await until_done(task)  # waited again, with no limit
    assert task.result() is True


async def test_a_caller_cancelled_while_waiting_leaves_the_task_running() -> None:
    release = asyncio.Event()
    task = asyncio.ensure_future(release.wait())
    waiting = asyncio.ensure_future(until_done(task))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not task.done()
    release.set()
    assert await task is True


async def test_a_wait_that_ends_without_the_task_leaves_no_callback_on_it() -> None:
    task = Watched()
    assert not await until_done(task, 0.01)  # its time ran out
    waiting = asyncio.ensure_future(until_done(task))
    await asyncio.sleep(0)
    assert task.callbacks == 1
    waiting.cancel()  # its caller stopped waiting
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert task.callbacks == 0
    task.set_result(None)
    assert await until_done(task, 60)


async def test_a_task_already_done_answers_at_once() -> None:
    task = asyncio.ensure_future(asyncio.sleep(0))
    await task
    turned = asyncio.Event()
    asyncio.get_running_loop().call_soon(turned.set)
    assert await until_done(task, 0)
    assert not turned.is_set()  # no turn of the loop was taken


async def test_a_failed_or_cancelled_task_is_done() -> None:
    async def fail() -> None:
        raise ValueError("failed")

    failed = asyncio.ensure_future(fail())
    assert await until_done(failed, 60)
    assert isinstance(failed.exception(), ValueError)
    cancelled = asyncio.ensure_future(asyncio.Event().wait())
    asyncio.get_running_loop().call_soon(cancelled.cancel)
    assert await until_done(cancelled, 60)
    assert cancelled.cancelled()
