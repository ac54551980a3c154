"""Recovery: every engine scans for active runs nobody drives and takes them over.

At start, then every ttl/3 (jittered), an engine lists the active runs and resumes those whose
lease holder stopped, was fenced off, or whose heartbeat (or implicit lease) expired, and those
whose implicit lease a drained engine released. ttl/3 rather than ttl/2: a drained engine's runs
(freed at once by its EngineStopped, no expiry to wait for) are then taken over within ttl/3.

Cheap when repeated: a run's lease holder is read once and cached, each distinct holder engine's
liveness record is read once per scan (not once per run), and released implicit leases come from
one ListStreams (engine_service.runtime.leases).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from engine_service.domain.streams import RUN_ACTIVE_LABEL, RUN_STREAM_PREFIX, run_id_of_stream
from engine_service.runtime.leases import Leases
from engine_service.runtime.registry import RunRegistry
from engine_service.store.port import EventLog
from keel_core.clock import us_of
from keel_core.errors import KeelError

log = logging.getLogger(__name__)

# How many runs one scan tries to take over at once.
SCAN_CONCURRENCY = 16
# Resume a run (run id, its creation time in µs when known): True when this engine took it on.
Resume = Callable[[str, int | None], Awaitable[bool]]


class Recovery:
    """Scans for runs to take over and resumes them."""

    def __init__(self, store: EventLog, leases: Leases, registry: RunRegistry, resume: Resume) -> None:
        self.store = store
        self.leases = leases
        self.registry = registry
        self._resume = resume
        # Set once the scan at start has ended, however it ended: from then on only the periodic
        # scans (every ttl/3) may look at a run, so a caller can tell their reads from its own.
        self.first_scan_done = asyncio.Event()

    async def recover(self) -> int:
        """Resume every active run nobody holds; returns how many this engine took on."""
        resumed = 0
        token = ""
        limit = asyncio.Semaphore(SCAN_CONCURRENCY)
        self.leases.others.begin_scan()
        released = await self.leases.others.released_runs()
        active: set[str] = set()

        async def resume(run_id: str, created_at_us: int | None) -> bool:
            async with limit:
                try:
                    return await self._resume(run_id, created_at_us)
                except KeelError as error:
                    if error.code != "corrupt_event":  # logged once, when found
                        log.error("could not resume run %s: %s", run_id, error.message)
                    return False

        while True:
            listed, token = await self._active_page(token)
            active.update(listed)
            candidates = await self._candidates(listed, released)
            resumed += sum(await asyncio.gather(*(resume(*candidate) for candidate in candidates)))
            if not token or self.registry.closing:
                self.leases.forget_seen(active)
                return resumed

    async def _active_page(self, token: str) -> tuple[dict[str, int | None], str]:
        """A page of active runs (run id -> creation time, µs) and the next page token."""
        page, token = await self.store.list_streams(
            prefix=RUN_STREAM_PREFIX,
            statuses=[RUN_ACTIVE_LABEL],
            page_size=500,
            page_token=token,
            patience=float("inf"),
        )
        listed = {run_id_of_stream(s.stream_id): us_of(s.created_at) if s.created_at else None for s in page}
        return listed, token

    async def _candidates(
        self, listed: dict[str, int | None], released: set[str]
    ) -> list[tuple[str, int | None]]:
        """The listed runs this engine may take over: not driven here, and free (or released)."""
        drivers, terminalizing = self.registry.drivers, self.registry.terminalizing
        leased = await self.leases.leased_elsewhere(
            {run_id: at for run_id, at in listed.items() if run_id not in drivers}
        )
        return [
            (run_id, created_at_us)
            for run_id, created_at_us in listed.items()
            if run_id not in drivers
            and run_id not in terminalizing
            and (run_id in released or run_id not in leased)
        ]

    async def scan_forever(self) -> None:
        """Take over runs whose lease expired or was released: at start, then every ttl/3 (jittered)."""
        interval = self.leases.ttl / 3
        first = True
        while not self.registry.closing:
            try:
                resumed = await self.recover()
                if first or resumed:
                    log.info("%s: resumed %d run(s)", "recovery" if first else "scan", resumed)
                first = False
            except KeelError as error:
                log.warning("scanning for runs to take over failed: %s", error.message)
            self.first_scan_done.set()
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
