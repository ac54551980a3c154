"""What an engine knows of other engines' run leases: who holds which run, and until when.

Leases (engine_service.runtime.leases) asks it when taking a run over and when scanning: a lease
event names a holder, which is then cached (a run changes hands only once its holder's session is
over); each distinct holder's liveness record is read once per scan; a session seen over is
remembered as over for good. The judgements themselves are pure (engine_service.domain.leasing);
this class reads what they judge and fences off a session whose heartbeat expired, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from engine_service.domain.leasing import (
    EngineRecord,
    Holder,
    Holding,
    LeaseEvent,
    implicit_holds_until,
    judge_holder,
    legacy_holds_until,
)
from engine_service.domain.streams import (
    LEASE_RELEASED_LABEL,
    LEASE_STREAM_PREFIX,
    lease_stream_id,
    run_id_of_lease_stream,
)
from engine_service.runtime.heartbeat import fence, read_engine_record
from engine_service.store.port import EventLog
from keel_core.clock import now_us


class LeaseHolders:
    """Other engines' leases as this engine last read them, and the reads and fences behind that."""

    def __init__(self, store: EventLog, engine_id: str, ttl: float) -> None:
        self.store = store
        self.engine_id = engine_id
        self.ttl = ttl
        # run id -> when the lease another engine holds on it expires, as last read.
        self.seen_live: dict[str, int] = {}
        # run id -> who its lease event names, as last read (it changes only once that is over).
        self.holders: dict[str, Holder] = {}
        # Sessions seen over, and why: they never hold a lease again.
        self._over: dict[Holder, str] = {}
        # Liveness records read during the current scan: one read per engine per scan.
        self._records: dict[str, EngineRecord | None] = {}
        # One fence at a time: concurrent takeovers of one dead engine's runs fence it once.
        self._fencing = asyncio.Lock()

    def forget(self, keep: set[str]) -> None:
        """Drop what was seen of runs no longer active (scans call this with the active ones)."""
        self.seen_live = {run_id: at for run_id, at in self.seen_live.items() if run_id in keep}
        for run_id in [run_id for run_id in self.holders if run_id not in keep]:
            del self.holders[run_id]
        named = set(self.holders.values())
        self._over = {holder: why for holder, why in self._over.items() if holder in named}

    def known_live(self, run_id: str) -> bool:
        """Whether another engine's lease on the run was seen, and has not expired since."""
        expires_at = self.seen_live.get(run_id)
        if expires_at is None:
            return False
        if expires_at > now_us():
            return True
        del self.seen_live[run_id]
        return False

    def seen_live_for(self, run_id: str) -> float | None:
        """Seconds until another engine's lease on the run, as last read, expires (None: not seen)."""
        if not self.known_live(run_id):
            return None
        return max(0.0, (self.seen_live[run_id] - now_us()) / 1_000_000) + 0.05

    def begin_scan(self) -> None:
        """A new scan: liveness records are read again (once each)."""
        self._records.clear()

    async def released_runs(self) -> set[str]:
        """Runs whose implicit lease was released and not taken since (other engines' shutdowns)."""
        out: set[str] = set()
        token = ""
        while True:
            page, token = await self.store.list_streams(
                prefix=LEASE_STREAM_PREFIX, statuses=[LEASE_RELEASED_LABEL], page_size=500, page_token=token
            )
            out.update(run_id_of_lease_stream(s.stream_id) for s in page)
            if not token:
                return out

    async def read_records(self, holders: Iterable[Holder]) -> None:
        """Read this scan's liveness record of each engine named, unless its session is known over."""
        engines = {holder.engine_id for holder in holders if holder not in self._over}
        await asyncio.gather(*(self._scan_record(engine_id) for engine_id in engines))

    async def _scan_record(self, engine_id: str) -> None:
        if engine_id not in self._records:
            self._records[engine_id] = await read_engine_record(self.store, engine_id)

    async def holds_until(self, holder: Holder, *, fresh: bool) -> tuple[int, str]:
        """Until when (wall µs) the holder's session holds its leases (0: it does not, and why).

        `fresh` (a takeover): read the holder's liveness record now, and fence its session off
        when its heartbeat expired. Otherwise (a scan's look) use this scan's read of it; an
        expired session is only reported, not fenced.
        """
        why = self._over.get(holder)
        if why is not None:
            return 0, why
        if fresh or holder.engine_id not in self._records:
            record = await read_engine_record(self.store, holder.engine_id)
            if not fresh:
                self._records[holder.engine_id] = record
        else:
            record = self._records[holder.engine_id]
        verdict = judge_holder(holder, record, now_us())
        match verdict.holding:
            case Holding.HOLDS:
                return verdict.until_us, ""
            case Holding.OVER:
                return self._now_over(holder, verdict.why)
            case Holding.RECORD_OLDER:  # read before the lease was: read it again
                if not fresh:
                    return await self.holds_until(holder, fresh=True)
                return now_us() + int(self.ttl * 1_000_000), ""  # cannot be: let it hold a ttl meanwhile
        if not fresh:
            return 0, verdict.why
        assert record is not None  # expired: a record was read
        return await self._fence(holder, record)

    async def _fence(self, holder: Holder, record: EngineRecord) -> tuple[int, str]:
        """Fence off a session whose heartbeat expired (once), then judge the holder again."""
        async with self._fencing:
            why = self._over.get(holder)
            if why is not None:
                return 0, why  # fenced while this waited
            if await fence(self.store, record, self.engine_id):
                return self._now_over(holder, "its engine's heartbeat expired")
        return await self.holds_until(holder, fresh=True)  # it beat, or was fenced, since

    def _now_over(self, holder: Holder, why: str) -> tuple[int, str]:
        self._over[holder] = why
        return 0, why

    def implicit_holds(self, run_id: str, created_at_us: int | None) -> bool:
        """Whether the run's creator still holds its implicit lease (created at `created_at_us`)."""
        until = implicit_holds_until(created_at_us, int(self.ttl * 1_000_000))
        if until > now_us():
            self.seen_live[run_id] = until
            return True
        return False

    def legacy_holds(self, run_id: str, last: LeaseEvent) -> bool:
        """A lease event written before sessions holds until its own expiry (unless it is ours)."""
        until = legacy_holds_until(last, self.engine_id, now_us())
        if until:
            self.seen_live[run_id] = until
        return bool(until)

    async def last_event(self, run_id: str) -> tuple[int, LeaseEvent | None]:
        """The run's lease stream head and its last event (0 and None: no lease was ever written)."""
        stream = lease_stream_id(run_id)
        head, _ = await self.store.head(stream)
        if head == 0:
            return 0, None
        events = await self.store.read(stream, from_seq=head, limit=1)
        return head, LeaseEvent.parse(events[0].type, events[0].payload) if events else None
