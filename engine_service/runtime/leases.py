"""Run ownership leases: which engine drives a run. Upkeep costs O(engines), not O(live runs).

Three kinds of record say who drives what, all in the store:

- a run's lease stream `lease:<run id>`: `LeaseAcquired {engine_id, session}` each time the run
  changes hands, never as a periodic renewal (and `LeaseReleased {engine_id}` when a run still on
  its implicit lease is handed over, below). Every write is a compare-and-swap on the stream's
  head, so exactly one engine wins each acquisition.
- each engine's liveness record `engine:<engine id>` (engine_service.runtime.heartbeat): one
  `EngineHeartbeat` every ttl/4 while the engine holds any recorded lease (or an implicit one
  about to be recorded), whatever number of runs that is, and one `EngineStopped` at graceful
  shutdown. A recorded lease holds while the session it names does: until its engine's last
  heartbeat of that session expires, or its engine stops. Another engine may then fence the
  session off (one `EngineFenced` in the record, a compare-and-swap after the expired heartbeat)
  and take its runs over.
- the implicit lease of a new run: its creator holds it, without any write, until one ttl after
  the run stream was created (its first event's commit time). Runs that finish sooner than ttl/3
  (most of them) never write a lease at all: the hot path has no lease cost. A longer one gets its
  first `LeaseAcquired` when ttl/3 old (the holder checks every ttl/12), with "the stream must be
  new" as the compare-and-swap.

What an engine does:

- acquire (a resumption, a takeover): read the run's last lease event; the lease is free when it
  was released, when there is none and the run is older than one ttl, or when the session it
  names no longer holds: stopped, ended, or expired and then fenced off by this engine (once per
  session, not per run). Then append `LeaseAcquired` after it (a conflict: another engine got
  there first). A lease of this engine's own current session is taken again without any write.
  A run this engine parked is taken up again without that read (`Leases.take_known`), once its
  history shows it is the same run (not one started again under its id): a lease recorded in the
  session that still holds, or an implicit one younger than ttl/3, is held again without any
  write; a run it created and never recorded a lease for is taken with "the stream must be new".
- upkeep: the heartbeat, and recording implicit leases that turned ttl/3 old, neither waiting for
  the other. A heartbeat the store refuses because another engine fenced the session off ends
  that session: every lease recorded in it is lost at once (the drivers are cancelled; nothing
  more is appended), and the next heartbeat starts a new session. So does a heartbeat that fails
  once the session's trust ran out; that session goes on if nobody fenced it, and the scan takes
  its runs up again (without a write) once a heartbeat lands. A heartbeat that is only slow
  loses no lease; a driver that must write before it lands stops, and is resumed the same way.
- release: a graceful shutdown parks the drivers, appends `LeaseReleased` for each run still on
  its implicit lease (nothing else names that holder: a run it drove, and a run parked here
  earlier whose implicit lease still holds), once the store shows it is still the run created here
  and has not ended, then one `EngineStopped`, which hands every recorded lease over at once.

Fencing. A holder trusts a recorded lease until `ttl - margin` after it *sent* its session's last
heartbeat that landed (an implicit lease: after it sent RunStarted), and checks that before every
append and every transport call; a taker waits until the holder's `expires_at_us` (the holder's
clock at sending, plus ttl; for an implicit lease the store's commit time of RunStarted, plus ttl)
has passed on its own clock. So a holder has stopped writing `margin` before anyone may take over
(clock skew and delivery delay must stay below the margin, ttl/5). Whether a late heartbeat or
the taker's fence came first is the engine record's compare-and-swap to decide, as a renewal and
a takeover once raced on each run's lease stream: a holder whose late heartbeat landed is still
unfenced and trusts its session again. The taker then claims the run by appending to the run
stream at the head it read (`claim_first` in the run driver): the run stream's sequence
compare-and-swap refuses any later append of the old holder, whatever the clocks say.

Scans (engine_service.runtime.recovery). A run younger than ttl/3 is skipped unread (its creator's
implicit lease holds); an older one's lease stream is read until it names a holder, which is then
cached (a run changes hands only once its holder's session is over; engine_service.runtime.holders).
Each distinct holder's liveness record is read once per scan. So a steady state of many long runs
on live engines costs a scan one ListStreams of active runs, one of released leases, and two reads
per engine.

Why separate streams rather than lease events inside the run stream: bookkeeping would otherwise
fill the run's history (and every WatchRun), compete with the driver's write-behind batches for
the run's sequence, and every reader of a history would have to skip it. A run's lease is not
released when the run finishes (a terminal run is never scanned).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from engine_service.domain.leasing import (
    MARGIN_FRACTION,
    Holder,
    ImplicitHere,
    KnownLease,
    KnownWay,
    LeaseEvent,
    known_lease_way,
    lease_acquired_payload,
    lease_released_payload,
)
from engine_service.domain.streams import (
    LEASE_ACQUIRED,
    LEASE_HELD_LABEL,
    LEASE_RELEASED,
    LEASE_RELEASED_LABEL,
    lease_stream_id,
    run_status_of_label,
    run_stream_id,
)
from engine_service.runtime.heartbeat import Heartbeat, engine_fenced
from engine_service.runtime.holders import LeaseHolders
from engine_service.store.port import EventLog
from keel_core.clock import now_us, us_of
from keel_core.errors import ErrorCategory, KeelError
from keel_core.recent import Recent

log = logging.getLogger(__name__)

RELEASE_PATIENCE = 2.0
# How many lease streams a scan reads at once.
READ_CONCURRENCY = 16
# Runs whose lease stream an engine remembers after their driver here ended (a parked run, say).
KNOWN_LEASES = 10_000


def lease_lost(run_id: str, why: str) -> KeelError:
    """The error a driver meets when it may no longer write to its run."""
    return KeelError(
        "lease_lost",
        f"this engine may no longer write to run {run_id} ({why}); the engine that takes its lease "
        "next resumes it",
        category=ErrorCategory.CONFLICT,
        details={"run_id": run_id},
    )


class Lease:
    """This engine's lease on one run: implicit (nothing in the store yet) or recorded in a session."""

    def __init__(self, run_id: str, ttl: float, heartbeat: Heartbeat, *, born: float | None = None) -> None:
        self.run_id = run_id
        self.seq = 0  # its LeaseAcquired in the lease stream (0: implicit)
        self.session = 0  # the session that recorded it (0: implicit)
        self.lost = False
        self.lost_why = ""  # what happened, once lost
        self._heartbeat = heartbeat
        # Implicit: taken just before RunStarted was sent (`born`: when it first was, if held again).
        self._born = time.monotonic() if born is None else born
        # The run stream's creation time (the store's clock), when known: which run of the id it is.
        self.created_at_us: int | None = None
        self._ttl = ttl
        self._margin = ttl * MARGIN_FRACTION

    def recorded(self, seq: int, session: int) -> None:
        """Its LeaseAcquired landed at `seq`, in `session`: it now holds while the session does."""
        self.seq = seq
        self.session = session

    def age(self) -> float:
        """Seconds since the implicit lease was taken."""
        return time.monotonic() - self._born

    def implicit_until(self) -> float:
        """When (monotonic) the implicit lease ends for everyone (another engine may take it then)."""
        return self._born + self._ttl

    def implicit_left(self) -> float:
        """Seconds an implicit lease is still trusted."""
        return self._born + self._ttl - self._margin - time.monotonic()

    def is_valid(self) -> bool:
        """Whether this engine may still write to the run (with the safety margin)."""
        if self.lost:
            return False
        if self.session:
            return self._heartbeat.trusts(self.session)
        return self.implicit_left() > 0

    async def confirm(self) -> None:
        """Raise `lease_lost` unless the lease is held and valid."""
        if self.lost:
            raise lease_lost(self.run_id, self.lost_why or "it was handed over")
        if not self.is_valid():
            why = "this engine's heartbeat lapsed" if self.session else "its implicit lease's trust ran out"
            raise lease_lost(self.run_id, why)


class Leases:
    """The leases one engine holds: taking, recording, losing and handing them over."""

    def __init__(
        self,
        store: EventLog,
        engine_id: str,
        ttl: float,
        *,
        on_lost: Callable[[str], None],
        on_takeover: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.engine_id = engine_id
        self.ttl = ttl
        self.heartbeat = Heartbeat(store, engine_id, ttl, on_leases_lost=self._session_lost)
        self._on_lost = on_lost
        self._on_takeover = on_takeover
        self.held: dict[str, Lease] = {}
        self._upkeep: asyncio.Task[None] | None = None
        self._closing = False
        # Runs this engine created whose implicit lease it stopped using (no event names it), with
        # when (monotonic) that lease ends: till then a wake-up here takes it at once, once the run
        # is known to be the one created here (by its stream's creation time).
        self._implicit_here: dict[str, ImplicitHere] = {}
        # Runs parked here whose lease this engine knows without reading their lease stream.
        self._known: Recent[str, KnownLease] = Recent(KNOWN_LEASES)
        # What this engine knows of other engines' leases (and of its own, as the store says).
        self.others = LeaseHolders(store, engine_id, ttl)
        # Upkeep: the loop, its heartbeat under way, and the runs whose lease is being recorded.
        self._beating: asyncio.Task[None] | None = None
        self._recording: dict[str, asyncio.Task[None]] = {}

    @property
    def _holders(self) -> dict[str, Holder]:
        """Who each run's lease names, as last read (kept by `others`)."""
        return self.others.holders

    def forget_seen(self, keep: set[str]) -> None:
        """Drop what was seen of runs no longer active (scans call this with the active ones)."""
        # A run no longer active (parked, say) is remembered while its implicit lease could hold:
        # forgetting it sooner would make this engine wait for its own lease to expire.
        clock = time.monotonic()
        self._implicit_here = {
            run_id: mine
            for run_id, mine in self._implicit_here.items()
            if run_id in keep or mine.until > clock
        }
        self.others.forget(keep)

    def _implicit_ours(self, run_id: str, created_at_us: int | None) -> bool:
        """Whether the implicit lease this engine remembers of `run_id` is of the run whose stream was
        created at `created_at_us` (not of an earlier run of the id, deleted since)."""
        mine = self._implicit_here.get(run_id)
        return mine is not None and mine.created_at_us is not None and mine.created_at_us == created_at_us

    async def leased_elsewhere(self, runs: Mapping[str, int | None]) -> set[str]:
        """Those of `runs` (run id -> creation time, µs) whose lease holds now and is not this engine's.

        A run this engine's current session holds but does not drive (its driver stopped) is not
        in it: the scan takes it up again here, without a write.
        """
        now = now_us()
        young = int(self.ttl / 3 * 1_000_000)
        live: set[str] = set()
        unread: list[tuple[str, int | None]] = []
        for run_id, created_at_us in runs.items():
            if run_id in self.held or run_id in self.others.holders:
                continue
            if (
                created_at_us is not None
                and created_at_us + young > now
                and not self._implicit_ours(run_id, created_at_us)
            ):
                live.add(run_id)  # too young to have recorded its lease: its creator's implicit one holds
            else:
                unread.append((run_id, created_at_us))
        limit = asyncio.Semaphore(READ_CONCURRENCY)

        async def held_unrecorded(run_id: str, created_at_us: int | None) -> bool:
            async with limit:
                _, last = await self.others.last_event(run_id)
            if last is None:
                ours = self._implicit_ours(run_id, created_at_us)
                return not ours and self.others.implicit_holds(run_id, created_at_us)
            if last.holder is not None:
                self.others.holders[run_id] = last.holder  # judged below, with the other holders
                return False
            return self.others.legacy_holds(run_id, last)

        found = await asyncio.gather(*(held_unrecorded(*run) for run in unread))
        live.update(run_id for (run_id, _), held in zip(unread, found, strict=True) if held)
        holders = {
            run_id: holder
            for run_id in runs
            if run_id not in self.held
            and (holder := self.others.holders.get(run_id)) is not None
            and not (holder.engine_id == self.engine_id and self.heartbeat.trusts(holder.session))
        }
        await self.others.read_records(holders.values())
        for run_id, holder in holders.items():
            until, _ = await self.others.holds_until(holder, fresh=False)
            if until:
                live.add(run_id)
                self.others.seen_live[run_id] = until
        return live

    def _ensure_upkeep(self) -> None:
        if self._upkeep is None and not self._closing:
            self._upkeep = asyncio.create_task(self._upkeep_forever(), name="lease upkeep")

    def _hold(self, run_id: str, seq: int, session: int) -> Lease:
        lease = Lease(run_id, self.ttl, self.heartbeat)
        lease.recorded(seq, session)
        self.held[run_id] = lease
        self.others.holders[run_id] = Holder(self.engine_id, session)
        self._ensure_upkeep()
        return lease

    def start_new(self, run_id: str) -> Lease:
        """The implicit lease of a run this engine creates now (call it before sending RunStarted).

        An engine fenced off for good (another process writes under its engine id) starts nothing:
        it could never record the lease, and the run would wait a ttl for another engine.
        """
        if self.heartbeat.fenced:
            raise engine_fenced(self.engine_id)
        return self._hold_implicit(Lease(run_id, self.ttl, self.heartbeat))

    def _hold_implicit(self, lease: Lease) -> Lease:
        """Hold an implicit lease (its upkeep records it once ttl/3 old)."""
        self.held[lease.run_id] = lease
        self._ensure_upkeep()
        return lease

    def discard(self, run_id: str) -> None:
        """Forget a lease this engine turned out not to hold (its run existed already)."""
        lease = self.held.pop(run_id, None)
        if lease is not None:
            lease.lost = True

    async def acquire(
        self, run_id: str, created_at_us: int | None, born: Callable[[], Awaitable[int | None]]
    ) -> Lease | None:
        """Take the run's lease when it is free or this session's; None when another engine holds it.

        A run without any lease event is its creator's for one ttl after its creation time
        (`created_at_us` when a scan knows it, else `born()` reads it).
        """
        current = self.held.get(run_id)
        if current is not None and not current.lost:
            return current
        if self._closing or self.heartbeat.fenced:
            return None
        head, last = await self.others.last_event(run_id)
        taken_from_self = False
        if last is None and run_id in self._implicit_here:
            if created_at_us is None:
                created_at_us = await born()
            taken_from_self = self._implicit_ours(run_id, created_at_us)
        why = "its implicit lease expired"
        if last is not None and last.holder is not None:
            holder = last.holder
            self.others.holders[run_id] = holder
            if holder.engine_id == self.engine_id and holder.session == self.heartbeat.session:
                with contextlib.suppress(KeelError):  # fenced off, say: judged as anyone's below
                    session = await self.heartbeat.ensure()
                    if session == holder.session and not self._closing:
                        self.others.seen_live.pop(run_id, None)
                        return self._hold(run_id, head, session)  # still this session's: nothing to write
            until, why = await self.others.holds_until(holder, fresh=True)
            if until:
                self.others.seen_live[run_id] = until
                return None
        elif last is not None:
            if self.others.legacy_holds(run_id, last):
                return None
            why = "it was released" if last.released else "it expired"
        elif not taken_from_self:
            if created_at_us is None:
                created_at_us = await born()
            if self.others.implicit_holds(run_id, created_at_us):
                return None
        return await self._take(run_id, head, last, why, taken_from_self=taken_from_self)

    def known_start(self, run_id: str) -> int | None:
        """The `at_us` of the RunStarted of the run parked here whose lease this engine knows (None:
        it knows none). The caller compares it with the run's history before `take_known`: a run id
        may have been deleted and started again since, elsewhere, and that run's lease is unknown."""
        known = self._known.get(run_id)
        return None if known is None else known.started_at_us

    def forget_known(self, run_id: str) -> None:
        """What this engine knew of the run's lease no longer applies (the run is another one, or
        ended): its implicit lease here is forgotten too, so that the lease stream is judged as read."""
        self._known.drop(run_id)
        self._implicit_here.pop(run_id, None)

    async def take_known(self, run_id: str) -> Lease | None:
        """The lease of a run parked here, from what this engine knows of it (the history read names
        the same run: `known_start`); None: read the lease stream (`acquire`).

        - Its lease recorded here, in the session that still holds (nobody may take a lease before
          its session is over): held again, without a write.
        - Created here and younger than ttl/3 (nobody records a lease of it before that age): its
          implicit lease is held again as it was, without a write.
        - Created here and never recorded: taken with "the lease stream must be new" as the
          compare-and-swap, which holds exactly when nobody took it since; a conflict (somebody
          did) is left to the reading path.
        """
        known = self._known.get(run_id)
        if known is None or self._closing or self.heartbeat.fenced:
            return None
        self._known.drop(run_id)
        way = known_lease_way(known, self.heartbeat.session, time.monotonic(), self.ttl)
        if way is KnownWay.HOLD_RECORDED:
            with contextlib.suppress(KeelError):  # fenced off, say: the reading path judges it
                if await self.heartbeat.ensure() == known.session and not self._closing:
                    self.others.seen_live.pop(run_id, None)
                    return self._hold(run_id, known.seq, known.session)
            return None
        if way is KnownWay.HOLD_IMPLICIT:
            lease = Lease(run_id, self.ttl, self.heartbeat, born=known.implicit_until - self.ttl)
            lease.created_at_us = known.created_at_us
            self._implicit_here.pop(run_id, None)
            self.others.seen_live.pop(run_id, None)
            return self._hold_implicit(lease)
        if way is KnownWay.TAKE_NEW:
            return await self._take(run_id, 0, None, "its implicit lease ended", taken_from_self=True)
        return None

    async def _take(
        self, run_id: str, head: int, last: LeaseEvent | None, why: str, *, taken_from_self: bool
    ) -> Lease | None:
        """Append LeaseAcquired after `last`, the lease event at `head` (None: another engine was first)."""
        if self._closing:
            return None
        session = await self.heartbeat.ensure()
        payload = lease_acquired_payload(self.engine_id, session)
        try:
            result = await self.store.append(
                lease_stream_id(run_id),
                [(LEASE_ACQUIRED, payload)],
                expected_seq=head or None,
                status=LEASE_HELD_LABEL,
            )
        except KeelError as error:
            if error.code == "sequence_conflict":
                return None
            raise
        if session != self.heartbeat.session:
            log.warning("run %s: its lease landed after this engine's session was fenced off", run_id)
            return None
        lease = self._hold(run_id, result.head_seq, session)
        self.others.seen_live.pop(run_id, None)
        self._implicit_here.pop(run_id, None)
        previous = last.engine_id if last is not None else ""
        if previous != self.engine_id and not (last is None and taken_from_self):
            log.info(
                "took over run %s from %s (%s)",
                run_id,
                f"engine {previous}" if previous else "its creator",
                why,
            )
            if self._on_takeover is not None:
                self._on_takeover()
        return lease

    def drop(
        self,
        run_id: str,
        *,
        run_exists: bool = True,
        ended: bool = False,
        parked_start_us: int | None = None,
        created_at_us: int | None = None,
    ) -> None:
        """This engine stopped driving the run (its driver ended): stop keeping its lease here.

        An implicit lease expires on its own, or is released at `close()` (once checked); a recorded one
        stays this session's (the scan takes the run up again) until the session ends. Nothing is
        remembered of a run that `ended`: its id may be deleted and started again elsewhere.
        `parked_start_us`: the driver ended with the run parked, started at that time (its
        RunStarted's `at_us`): what its lease is is kept for its wake-up (`take_known`).
        `created_at_us`: the run stream's creation time, when the driver knows it.
        """
        self.forget_known(run_id)  # what is remembered below is of this driver's run
        lease = self.held.pop(run_id, None)
        if lease is None or lease.lost or not run_exists or ended:
            return
        created_at_us = created_at_us or lease.created_at_us
        if parked_start_us is not None and not self._closing:
            until = lease.implicit_until()
            known = KnownLease(parked_start_us, lease.seq, lease.session, until, created_at_us)
            self._known.put(run_id, known)
        if lease.session:
            return
        # No event says it is ours: remember it, and of which run of the id it is (released at close).
        self._implicit_here[run_id] = ImplicitHere(lease.implicit_until(), created_at_us)

    def _forget(self, lease: Lease) -> None:
        lease.lost = True
        if self.held.get(lease.run_id) is lease:
            del self.held[lease.run_id]

    def _lose(self, lease: Lease, why: str) -> None:
        if lease.lost:
            return
        # Routine (a pause, the store away, a takeover): the run resumes wherever its lease goes next.
        log.info("lost the lease on run %s (%s): stopping its driver here", lease.run_id, why)
        lease.lost_why = why
        self._forget(lease)
        self._on_lost(lease.run_id)

    def _session_lost(self, session: int, why: str) -> None:
        for lease in list(self.held.values()):
            if lease.session == session:
                self._lose(lease, why)

    async def _upkeep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 12)
            try:
                self.upkeep()
            except Exception as error:  # a bug must not stop the upkeep of every lease
                log.error("lease upkeep failed: %r", error)

    def upkeep(self) -> None:
        """One round (every ttl/12): start the heartbeat, or the recordings of implicit leases, due.

        Neither waits for the other: a slow recording never delays the heartbeat every recorded
        lease leans on. The heartbeat is due at ttl/4 old (so it has over ttl/2 to land before the
        session's trust runs out) while the engine holds a recorded lease, or an implicit one ttl/6
        old, soon to be recorded in a session ready by then. An implicit lease is recorded at ttl/3
        old: a run that finishes sooner writes no lease at all.
        """
        leases = list(self.held.values())
        wanted = any(lease.session or lease.age() >= self.ttl / 6 for lease in leases)
        fresh = self.heartbeat.trusts(self.heartbeat.session) and self.heartbeat.age() < self.ttl / 4
        if wanted and not fresh and (self._beating is None or self._beating.done()):
            self._beating = asyncio.create_task(self._beat(), name="engine heartbeat")
        for lease in leases:
            if not lease.session and lease.age() >= self.ttl / 3 and lease.run_id not in self._recording:
                task = asyncio.create_task(self._record_implicit(lease), name=f"record lease {lease.run_id}")
                self._recording[lease.run_id] = task
                task.add_done_callback(functools.partial(self._recorded, lease.run_id))

    def _recorded(self, run_id: str, _: asyncio.Task[None]) -> None:
        self._recording.pop(run_id, None)

    async def _beat(self) -> None:
        try:
            await self.heartbeat.beat(unless_younger_than=self.ttl / 4)
        except KeelError as error:  # fenced off: its leases are lost already; else the next one tries
            log.warning("heartbeat failed: %s", error.message)

    async def _record_implicit(self, lease: Lease) -> None:
        """Write the first LeaseAcquired of a run this engine created, which outlived ttl/3."""
        if self.held.get(lease.run_id) is not lease:
            return
        # Even when its trust ran out (the process was paused, the store slow): the compare-and-swap
        # says whether another engine took the run meanwhile; if not, it is still this engine's.
        try:
            session = await self.heartbeat.ensure()
            payload = lease_acquired_payload(self.engine_id, session)
            result = await self.store.append(
                lease_stream_id(lease.run_id),
                [(LEASE_ACQUIRED, payload)],
                expected_seq=None,  # the stream must be new: nobody took the run meanwhile
                status=LEASE_HELD_LABEL,
                patience=max(1.0, lease.implicit_left()),
            )
        except KeelError as error:
            if error.code == "sequence_conflict":
                self._lose(lease, error.code)  # another engine recorded a lease on it first
            else:
                self._lose(lease, f"its lease could not be recorded: {error.code}")
            return
        if lease.lost:
            return
        if session != self.heartbeat.session:
            self._lose(lease, "this engine's session was fenced off while its lease was recorded")
            return
        lease.recorded(result.head_seq, session)
        self.others.holders[lease.run_id] = Holder(self.engine_id, session)

    async def close(self) -> None:
        """Stop the upkeep; release the implicit leases still held, and record that this engine stopped."""
        self._closing = True
        for run_id in list(self.held):
            self.drop(run_id)
        for task in [self._upkeep, self._beating, *self._recording.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        # Every implicit lease still holding: nothing but a release names this engine as its holder,
        # and another engine would wait for it to expire (up to a ttl) before taking the run up.
        clock = time.monotonic()
        holding = [(run_id, mine) for run_id, mine in self._implicit_here.items() if mine.until > clock]
        self._implicit_here = {}  # released or left to expire: none is this engine's to take again
        reads = asyncio.Semaphore(READ_CONCURRENCY)
        releases = [asyncio.ensure_future(self._release_checked(r, mine, reads)) for r, mine in holding]
        try:
            if releases:  # a store away must not hold the shutdown for reads per run: the rest expire
                _, late = await asyncio.wait(releases, timeout=2 * RELEASE_PATIENCE)
                if late:
                    log.info("%d run(s)' implicit leases not released in time; they expire", len(late))
        finally:
            for release in releases:
                release.cancel()
            await asyncio.gather(*releases, return_exceptions=True)  # none outlives close()
            await self.heartbeat.stop()

    def begin_closing(self) -> None:
        """From now on no lease is taken; a stopped driver's implicit one is released at `close()`."""
        self._closing = True

    async def _release_checked(self, run_id: str, mine: ImplicitHere, reads: asyncio.Semaphore) -> None:
        """Release the implicit lease of a run created here, once the store shows it is that run (its
        stream's creation time) and not ended. A run parked here may meanwhile have been terminalized
        elsewhere (Terminalize takes no lease), deleted, even started again under its id by another
        engine, whose implicit lease a release would hand over; a driver stopped while closing may
        have been stopped by a foreign end. (A deletion and a new start between the reads and the
        release would still be released: the release's compare-and-swap is on the lease stream.)"""
        if mine.created_at_us is None:
            log.info("run %s: lease not released (which run of the id is not known); it expires", run_id)
            return
        stream_id = run_stream_id(run_id)
        try:
            async with reads:
                first, (_, label) = await asyncio.gather(
                    self.store.read(stream_id, limit=1, patience=RELEASE_PATIENCE),
                    self.store.head(stream_id, patience=RELEASE_PATIENCE),
                )
            when = first[0].recorded_at if first else None
            if when is None or us_of(when) != mine.created_at_us or run_status_of_label(label) is not None:
                return
            await self._release(run_id)
        except KeelError as error:  # the store is away, say
            log.info("run %s: lease not released (%s); it expires instead", run_id, error.message)
        except Exception:  # a bug must not stop the shutdown's other releases or its EngineStopped
            log.exception("run %s: lease not released; it expires instead", run_id)

    async def _release(self, run_id: str) -> None:
        payload = lease_released_payload(self.engine_id)
        try:
            await self.store.append(
                lease_stream_id(run_id),
                [(LEASE_RELEASED, payload)],
                expected_seq=None,  # an implicit lease: nothing was written yet
                status=LEASE_RELEASED_LABEL,
                patience=RELEASE_PATIENCE,
            )
        except KeelError as error:  # recorded meanwhile (EngineStopped frees it), or the store is gone
            log.info("run %s: lease not released (%s); it expires instead", run_id, error.message)
