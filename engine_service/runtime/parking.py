"""Parked runs and their wake-ups: the engine's Waker (DESIGN.md "Runs that wait").

How a run parks (engine_service.domain.waits): an op returns a `ParkStep`, the driver records
`StepWaiting`, and when nothing of the run can go on for a while it appends `RunParked{due_at_us}`
with the run stream's label `parked` and its due-time index entry (`due_at_us`) in that same
append, then ends. The run now holds no coroutine, no lease upkeep (its engine's heartbeat is per
engine; the parked run is not held) and nothing in memory: only the store's index entry.
Recovery scans list `active` runs only, so they skip it.

How it wakes. Each engine runs one `Waker`: it asks the store for the runs due by now (`ListDue`,
one query for all of them, never a scan of runs), sleeps until the earliest due time the store
named (or until told of an earlier one by a driver of its own that parked, or at most
`POLL_SECONDS`), and wakes each due run through the kernel's `wake_run`. That takes the run's lease
(a run parked by another live engine is left to that engine, and tried again once its lease could
have expired) and resumes it; the resumed driver's first append, at the head it read, holds
`RunResumed` (label `active`, due time cleared; with what the wake-up decided, when the run waits
only for signals and timers), so however many engines try, the run stream's sequence
compare-and-swap lets one wake-up through, once.

Other wake-ups (a signal, a remote task's outcome) use the same path: whatever ends a wait calls
`Engine.wake_run(run_id)`, and a `WaitResolver` registered for the wait's kind
(`RunEnvironment.wait_resolvers`) tells the driver how the wait ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from engine_service.domain.streams import RUN_STREAM_PREFIX, run_id_of_stream
from engine_service.store.port import EventLog
from keel_core.clock import now_us
from keel_core.errors import KeelError

log = logging.getLogger(__name__)

# The longest the Waker sleeps without asking the store: runs parked by an engine that died since
# (and so did not wake them) are found within this after their lease could be taken.
POLL_SECONDS = 2.0
# Due runs asked for per query, and woken at once at most.
DUE_PAGE = 500
WAKE_CONCURRENCY = 32
# A due run that could not be woken here (another engine holds it) is tried again after this.
RETRY_SECONDS = 2.0

# Wake a run (the kernel's wake_run): True when this engine took it up (or was driving it).
Wake = Callable[[str], Awaitable[bool]]
# Seconds until another engine's lease on the run could be taken (None: not known).
SeenLive = Callable[[str], float | None]


class Waker:
    """One per engine: finds due parked runs through the store's due-time index and wakes them."""

    def __init__(self, store: EventLog, wake: Wake, seen_live_for: SeenLive) -> None:
        self._store = store
        self._wake = wake
        self._seen_live_for = seen_live_for
        self._task: asyncio.Task[None] | None = None
        self._nudged = asyncio.Event()
        self._next_due_us = 0  # the earliest due time the Waker is sleeping towards (0: none)
        self._deferred: dict[str, float] = {}  # run id -> monotonic time to try it again
        self._waking: set[str] = set()
        self._limit = asyncio.Semaphore(WAKE_CONCURRENCY)
        self._wakes: set[asyncio.Task[None]] = set()
        self.closing = False

    def start(self) -> None:
        """Start watching due times (idempotent)."""
        if self._task is None and not self.closing:
            self._task = asyncio.create_task(self._watch_forever(), name="waker")

    def nudge(self, due_at_us: int) -> None:
        """A run parked here until `due_at_us`: make sure the Waker is up and wakes it in time."""
        self.start()
        if due_at_us and (not self._next_due_us or due_at_us < self._next_due_us):
            self._nudged.set()

    async def stop(self) -> None:
        """Stop watching and wait for wake-ups in progress to end."""
        self.closing = True
        tasks = [task for task in (self._task, *self._wakes) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def _watch_forever(self) -> None:
        while not self.closing:
            try:
                sleep_for = await self.wake_due()
            except KeelError as error:
                log.warning("looking for due parked runs failed: %s", error.message)
                sleep_for = POLL_SECONDS
            self._nudged.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), sleep_for)

    async def wake_due(self) -> float:
        """Wake every run due now; returns how long to sleep before the next look."""
        now = now_us()
        due, next_due_us = await self._store.list_due(now, prefix=RUN_STREAM_PREFIX, limit=DUE_PAGE)
        clock = time.monotonic()
        started = 0
        for entry in due:
            run_id = run_id_of_stream(entry.stream_id)
            if run_id in self._waking or self._deferred.get(run_id, 0.0) > clock:
                continue
            self._waking.add(run_id)
            started += 1
            task = asyncio.create_task(self._wake_one(run_id), name=f"wake {run_id}")
            self._wakes.add(task)
            task.add_done_callback(self._wakes.discard)
        self._deferred = {run_id: at for run_id, at in self._deferred.items() if at > clock}
        if len(due) == DUE_PAGE:
            # More are due than one page held: look again soon (sooner if this look woke some).
            next_due_us = now + (1_000 if started else 50_000)
        self._next_due_us = next_due_us
        sleep_for = POLL_SECONDS
        if next_due_us:
            sleep_for = min(sleep_for, max(0.0, (next_due_us - now_us()) / 1e6))
        if self._deferred:
            sleep_for = min(sleep_for, max(0.0, min(self._deferred.values()) - time.monotonic()))
        return max(sleep_for, 0.001)

    async def _wake_one(self, run_id: str) -> None:
        try:
            async with self._limit:
                woken = await self._wake(run_id)
        except KeelError as error:
            log.warning("could not wake parked run %s: %s", run_id, error.message)
            woken = False
        except Exception:
            log.exception("could not wake parked run %s", run_id)
            woken = False
        finally:
            self._waking.discard(run_id)
        # Woken: its RunResumed clears the due time (a short pause covers the append on its way; it
        # may wait for the checkpoint linger, 0.2 s by default: with a linger over this pause, a
        # look meanwhile pokes the driver here, which asks its waits' resolvers once more).
        # Not: another live engine holds it (and wakes it), or waking failed: look again later.
        retry = RETRY_SECONDS / 4 if woken else (self._seen_live_for(run_id) or RETRY_SECONDS)
        self._deferred[run_id] = time.monotonic() + min(retry, RETRY_SECONDS * 5)
        if not woken:
            self._nudged.set()  # the sleep may have to end sooner, for this retry
