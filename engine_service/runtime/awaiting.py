"""Awaiting runs: until a run is terminal, without polling, taking it over if its holder dies.

A run this engine drives is awaited on its driver's task. One that no engine drives is resumed
here first (DESIGN.md: resume on await). One whose lease another engine holds is waited for on
the event log's subscription; should that lease expire first (its engine died), the run is taken
over then.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from engine_service.domain import RunCompleted
from engine_service.domain.streams import RUN_COMPLETED, run_stream_id
from engine_service.runtime.leases import Leases
from engine_service.runtime.reader import RunReader
from engine_service.runtime.registry import RunRegistry
from engine_service.store.port import EventLog
from keel_core.errors import KeelError

log = logging.getLogger(__name__)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _release(waiter: asyncio.Future[None], _ended: object = None) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def until_done(task: asyncio.Future[Any], seconds: float | None = None) -> bool:
    """Whether `task` is done, having waited for it at most `seconds` (None: no limit).

    What `asyncio.wait({task}, timeout=seconds)` does for one task, never cancelling it (a caller
    cancelled meanwhile leaves it running), for a quarter to a half less while the task runs and
    next to nothing once it is done: that call also checks its argument and each member against the
    coroutine ABCs, builds a set, and takes a turn of the loop even for a task already done. Every
    waited StartRun waits here at least once.
    """
    if task.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    release = functools.partial(_release, waiter)
    task.add_done_callback(release)
    timer = None if seconds is None else loop.call_later(seconds, release)
    try:
        await waiter
    finally:
        task.remove_done_callback(release)
        if timer is not None:
            timer.cancel()
    return task.done()


class RunAwaits:
    """Waits for runs to end, on this engine's drivers or on the event log."""

    def __init__(
        self,
        store: EventLog,
        registry: RunRegistry,
        reader: RunReader,
        leases: Leases,
        resume: Callable[[str], Awaitable[bool]],
    ) -> None:
        self._store = store
        self._registry = registry
        self._reader = reader
        self._leases = leases
        # Resume a run nobody drives (the kernel's resume_run).
        self._resume = resume

    async def await_run(self, run_id: str, wait_seconds: float | None) -> bool:
        """Wait until the run is terminal (True) or `wait_seconds` pass (False), without polling.

        A run that no engine drives is resumed here first (DESIGN.md: resume on await). A run whose
        lease another engine holds is waited for on the store; should that lease expire first (its
        engine died), this engine takes the run over then.
        """
        deadline = None if wait_seconds is None else time.monotonic() + wait_seconds
        while True:
            task = self._registry.drivers.get(run_id)
            if task is None:
                _, history = await self._reader.read_history(run_id)
                if history.is_terminal:
                    return True
                try:
                    await self._resume(run_id)
                except KeelError as error:
                    log.warning("await of run %s could not resume it: %s", run_id, error.message)
                task = self._registry.drivers.get(run_id)
            if task is not None:
                if not await until_done(task, _left(deadline)):
                    return False
                if not task.cancelled() and task.exception() is None:
                    return True
                # The driver stopped without finishing (parked, or lost the run to another engine):
                # fall back to the store, which tells the truth either way.
            events, history = await self._reader.read_history(run_id)
            if history.is_terminal:
                return True
            patience = _left(deadline)
            retry_in = self._leases.others.seen_live_for(run_id)
            if retry_in is not None and (patience is None or retry_in < patience):
                patience = retry_in  # then try to take the run over
            if await self._until_terminal(run_id, events[-1].seq, patience):
                return True
            if retry_in is None or (deadline is not None and time.monotonic() >= deadline):
                return False

    async def _until_terminal(self, run_id: str, after_seq: int, patience: float | None) -> bool:
        """Whether a RunCompleted arrives after `after_seq` within `patience` seconds (None: ever)."""

        async def until_terminal() -> bool:
            subscription = self._store.subscribe(run_stream_id(run_id), after_seq=after_seq)
            async with contextlib.aclosing(subscription):
                async for event in subscription:
                    if event.type == RUN_COMPLETED:
                        return True
            # The subscription ended without the run's end (the store closing it): only the
            # stored history can say the run is over.
            _, history = await self._reader.read_history(run_id)
            return history.is_terminal

        try:
            return await asyncio.wait_for(until_terminal(), patience)
        except TimeoutError:
            return False

    async def await_terminal(self, run_id: str) -> RunCompleted:
        """The run's terminal event, once there is one: from the local driver, else the store."""
        while True:
            task = self._registry.drivers.get(run_id)
            if task is not None:
                await until_done(task)
                if not task.cancelled() and task.exception() is None:
                    return task.result()
            await self.await_run(run_id, None)
            _, history = await self._reader.read_history(run_id)
            if history.terminal is not None:
                return history.terminal
