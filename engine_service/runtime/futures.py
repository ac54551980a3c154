"""Futures the engine's tasks share: one task does the work, others wait on its outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def run_telling(outcome: asyncio.Future[T], work: Awaitable[T]) -> T:
    """Await `work` in this task and tell `outcome` how it ended, for whoever waits on that: its
    result; its exception (marked retrieved: this caller raises it); or, for anything else that
    ends it (a cancel, the coroutine closed), a cancel."""
    try:
        result = await work
    except Exception as error:
        outcome.set_exception(error)
        outcome.exception()
        raise
    except BaseException:
        outcome.cancel()
        raise
    outcome.set_result(result)
    return result


def retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a done future's exception as seen (a done callback, where nobody may be left to)."""
    if not future.cancelled():
        future.exception()
