"""An engine's liveness record: one store stream per engine, which every run lease it holds leans on.

`engine:<engine id>` holds, newest last:

- `EngineHeartbeat {engine_id, process, session, expires_at_us, previous_expires_at_us}`: appended
  by the engine itself, every ttl/4 while it holds a run lease that is recorded in the store (or
  about to be). One that drives only short runs writes nothing here at all.
- `EngineStopped {engine_id, process, session, previous_expires_at_us}`: its graceful shutdown.
- `EngineFenced {engine_id, session, previous_expires_at_us, fenced_by}`: appended by *another*
  engine that found the session's last heartbeat expired, before taking any of its runs over.

Every append is a compare-and-swap after the event its writer read, so the engine's next heartbeat
and a taker's fence cannot both land: either the heartbeat came in time (the fence is refused and
the taker sees the session alive) or the session is fenced (the heartbeat is refused, and the
engine drops every lease of that session at once). That is what a per-run renewal's
compare-and-swap on the run's lease stream used to decide, once per run; now it is decided once
per engine.

Sessions. A session is numbered by the sequence of its first heartbeat (so sessions of one stream
are ordered); a run's lease event names the session it was taken in and holds while that session
does. A session is over once stopped or fenced, or once a later session follows it and the
expiry carried in `previous_expires_at_us` (the latest of any earlier session) has passed; over
means over for good, so readers may remember it. The engine trusts its session until ttl - margin
after it *sent* the last heartbeat that landed (`trusts`): a taker waits until the heartbeat's
`expires_at_us` (the sender's clock plus ttl) has passed on its own clock before fencing, so the
holder stops writing `margin` before anyone may take over. A heartbeat that lands late but is
not refused restores the trust: nobody fenced the session meanwhile.

One process per engine id. A process's first heartbeat appends after whatever the stream holds
(a restarted engine with the same id takes its stream over); every later append is after its own
last one. A refusal whose winner is another process's heartbeat means another process writes
under this engine id: this one is fenced off for good (it drives nothing more) and says so.

Trimming. Readers only ever read the stream's last event, so every TRIM_EVERY heartbeats that land
the engine trims its stream (StoreService TrimStream) to the last TRIM_KEEP events up to its own
heartbeat that just landed: it deletes only events it has seen, never that heartbeat, so the last
event always stays, and the head (what every compare-and-swap here is after) is unchanged. The
trim runs beside the heartbeats, one at a time; a failed one is only logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from engine_service.domain.leasing import (
    MARGIN_FRACTION,
    EngineRecord,
    engine_fenced_payload,
    engine_stopped_payload,
    heartbeat_payload,
)
from engine_service.domain.streams import (
    ENGINE_BEATING_LABEL,
    ENGINE_FENCED,
    ENGINE_FENCED_LABEL,
    ENGINE_HEARTBEAT,
    ENGINE_STOPPED,
    ENGINE_STOPPED_LABEL,
    engine_stream_id,
)
from engine_service.store.port import EventLog
from keel_core.clock import now_us
from keel_core.errors import ErrorCategory, KeelError

log = logging.getLogger(__name__)

# How long a shutdown waits for the store to record it (its sessions expire otherwise).
STOP_PATIENCE = 2.0
# Every this many landed heartbeats, the stream is trimmed to its last TRIM_KEEP events.
TRIM_EVERY = 100
TRIM_KEEP = 20


async def read_engine_record(store: EventLog, engine_id: str) -> EngineRecord | None:
    """An engine's liveness record now (None: it never wrote one)."""
    stream = engine_stream_id(engine_id)
    head, _ = await store.head(stream)
    if head == 0:
        return None
    events = await store.read(stream, from_seq=head, limit=1)
    if not events:
        return None
    return EngineRecord.parse(engine_id, events[0].seq, events[0].type, events[0].payload)


async def fence(store: EventLog, record: EngineRecord, by_engine_id: str) -> bool:
    """End `record`'s session, whose heartbeat expired: True once it is fenced, False if it beat since.

    Call it only once the heartbeat's `expires_at_us` has passed on this engine's clock. After it
    succeeds the session never holds a lease again, whatever its engine does next.
    """
    data = engine_fenced_payload(record, by_engine_id)
    try:
        await store.append(
            engine_stream_id(record.engine_id),
            [(ENGINE_FENCED, data)],
            expected_seq=record.seq,
            status=ENGINE_FENCED_LABEL,
        )
    except KeelError as error:
        if error.code == "sequence_conflict":
            return False  # its engine (or another taker) wrote since: read the record again
        raise
    log.info("fenced engine %s's session %d: its heartbeat had expired", record.engine_id, record.session)
    return True


def engine_fenced(engine_id: str) -> KeelError:
    """The error once another process writes this engine's liveness record."""
    return KeelError(
        "engine_id_in_use",
        f"another engine process appended to {engine_stream_id(engine_id)}: this one drives nothing "
        "more (engine ids must differ between engines sharing a store)",
        category=ErrorCategory.CONFLICT,
    )


def session_over(why: str) -> KeelError:
    """The error when this engine's session ended under a heartbeat."""
    return KeelError(
        "session_over", f"this engine's session is over ({why})", category=ErrorCategory.CONFLICT
    )


class Heartbeat:
    """This engine's own liveness record: its sessions, their heartbeats, how long to trust them."""

    def __init__(
        self,
        store: EventLog,
        engine_id: str,
        ttl: float,
        *,
        on_leases_lost: Callable[[int, str], None],
        trim_every: int = TRIM_EVERY,
        trim_keep: int = TRIM_KEEP,
    ) -> None:
        if trim_every < 1 or trim_keep < 1:
            raise ValueError(f"trim_every and trim_keep must be 1 or more, got {trim_every}, {trim_keep}")
        self.store = store
        self.engine_id = engine_id
        self.ttl = ttl
        self.stream = engine_stream_id(engine_id)
        self.session = 0  # the current session (0: none yet, or the last one was fenced)
        self.fenced = False  # another process writes this engine id's record: for good
        self.stopped = False
        # Told (session, why) when the session's leases are lost: it was fenced off, or a heartbeat
        # failed once its trust had run out (then the session goes on, if nobody fenced it).
        self._on_leases_lost = on_leases_lost
        self._margin = ttl * MARGIN_FRACTION
        self._sent_at = 0.0  # monotonic send time of the current session's last landed heartbeat
        self._last_session = 0  # the latest session started (what EngineStopped names)
        self._last_expires_at_us = 0  # the latest expiry written (or perhaps written) in it
        self._previous_expires_at_us = 0  # the latest expiry of any session before it
        self._head: int | None = None  # the stream's head as this process last knew it (None: read it)
        self._started = False  # whether this process has appended yet
        # Sessions whose heartbeat landed: only those can be fenced (a taker read their heartbeat).
        self._landed_sessions: set[int] = set()
        # Called once when this process is fenced off for good (the server reports NOT_SERVING).
        self.on_fenced: list[Callable[[], None]] = []
        self._process = uuid.uuid4().hex[:12]  # tells this process's appends from another's
        self._lock = asyncio.Lock()
        self._trim_every = trim_every
        self._trim_keep = trim_keep
        self._beats_since_trim = 0
        self._trimming: asyncio.Task[None] | None = None  # the trim in flight, if any

    def trusts(self, session: int) -> bool:
        """Whether leases taken in `session` are this engine's now (with the safety margin)."""
        return (
            session != 0
            and session == self.session
            and not self.fenced
            and not self.stopped
            and time.monotonic() < self._sent_at + self.ttl - self._margin
        )

    def age(self) -> float:
        """Seconds since the current session's last heartbeat that landed was sent."""
        return time.monotonic() - self._sent_at

    async def ensure(self) -> int:
        """A trusted session with time left for a lease append to land in, heartbeating first if need be."""
        for attempt in range(2):
            if self.trusts(self.session) and self.age() < self.ttl / 2:
                return self.session
            try:
                await self.beat(unless_younger_than=self.ttl / 2)
            except KeelError as error:
                # Fenced off while it did not heartbeat (no lease needed it): a new session now.
                if error.code != "session_over" or attempt:
                    raise
        if not self.trusts(self.session):
            raise session_over("its heartbeat landed after its trust ran out")
        return self.session

    async def beat(self, *, unless_younger_than: float = 0.0) -> None:
        """Append a heartbeat: the current session's next one, or a new session's first one.

        Raises when the store refused it or did not answer; a refusal because another engine fenced
        the session ends it (its leases are lost), and the next heartbeat starts a new one.
        """
        async with self._lock:
            if self.trusts(self.session) and self.age() < unless_younger_than:
                return  # another caller's heartbeat landed meanwhile
            if self.fenced:
                raise engine_fenced(self.engine_id)
            if self.stopped:
                raise KeelError("engine_stopping", "this engine is shutting down: it takes no lease")
            if self._head is None:
                await self._find_head()
            head = self._head or 0
            continuing = self.session != 0
            session = self.session if continuing else head + 1
            previous = self._previous_expires_at_us
            if not continuing:
                previous = max(previous, self._last_expires_at_us)
            sent_at = time.monotonic()
            expires_at_us = now_us() + int(self.ttl * 1_000_000)
            data = heartbeat_payload(self.engine_id, self._process, session, expires_at_us, previous)
            if not continuing:
                self._last_session, self._previous_expires_at_us = session, previous
            self._last_expires_at_us = max(self._last_expires_at_us, expires_at_us)  # it may land
            # Retrying a heartbeat the store did not answer makes sense while the session is trusted.
            patience = (
                max(self.ttl / 10, self._sent_at + self.ttl - self._margin - sent_at) if continuing else None
            )
            try:
                result = await self.store.append(
                    self.stream,
                    [(ENGINE_HEARTBEAT, data)],
                    expected_seq=head or None,
                    status=ENGINE_BEATING_LABEL,
                    patience=patience,
                )
            except KeelError as error:
                self._head = None  # it may have landed, or someone else wrote: read the head next time
                if error.code == "sequence_conflict":
                    await self._refused()
                if continuing and not self.trusts(session):
                    self._on_leases_lost(session, f"this engine's heartbeat failed: {error.code}")
                raise
            except BaseException:
                self._head = None
                raise
            self._head = result.head_seq
            self._started = True
            self._landed_sessions.add(session)
            self.session = session
            self._sent_at = sent_at
            self._maybe_trim(result.head_seq)

    def _maybe_trim(self, landed_seq: int) -> None:
        """Every `trim_every` landed heartbeats, start trimming to the last `trim_keep` up to `landed_seq`."""
        self._beats_since_trim += 1
        if self._beats_since_trim < self._trim_every or not self.trim_settled():
            return
        self._beats_since_trim = 0
        before_seq = landed_seq - self._trim_keep + 1
        if before_seq > 1:
            self._trimming = asyncio.create_task(self._trim(before_seq), name=f"trim {self.stream}")

    async def _trim(self, before_seq: int) -> None:
        # Never raises: a trim only saves space, and the heartbeats must not depend on it.
        try:
            removed = await self.store.trim(self.stream, before_seq, patience=self.ttl / 4)
        except Exception as error:
            log.warning(
                "could not trim %s before %d (%s); trying again later", self.stream, before_seq, error
            )
            return
        log.debug("trimmed %d events of %s before %d", removed, self.stream, before_seq)

    def trim_settled(self) -> bool:
        """Whether no trim of the stream is in flight."""
        return self._trimming is None or self._trimming.done()

    async def settle_trim(self) -> None:
        """Wait for the trim in flight, if any, to end (it never raises)."""
        if self._trimming is not None:
            await asyncio.shield(self._trimming)

    async def _refused(self) -> None:
        """Our heartbeat was refused: find out by whom (ending the session if it was fenced)."""
        await self._find_head()  # raises when the session was fenced, or the engine id is taken
        raise KeelError("heartbeat_refused", "a heartbeat was refused; the next one follows the head")

    async def _find_head(self) -> None:
        head, _ = await self.store.head(self.stream)
        if head == 0:
            if self._started:
                log.warning("engine record %s is gone from the store: starting it anew", self.stream)
            self._head = 0
            return
        last = (await self.store.read(self.stream, from_seq=head, limit=1))[0]
        record = EngineRecord.parse(self.engine_id, last.seq, last.type, last.payload)
        if record.process == self._process:
            self._head = head  # our own append, whose answer was lost
            if record.kind == ENGINE_HEARTBEAT:
                self._landed_sessions.add(record.session)
            return
        # A fence of any session of ours (not only the latest: a heartbeat that would have started a
        # new one may have failed since) ends it; the next heartbeat starts a new session after it.
        if record.kind == ENGINE_FENCED and self._started and record.session in self._landed_sessions:
            self._head = head  # the next heartbeat starts a new session after the fence
            ended, self.session = self.session, 0
            why = (
                f"sequence_conflict: engine {record.fenced_by} fenced its session off, its heartbeat expired"
            )
            if ended:
                self._on_leases_lost(ended, why)
            raise session_over(why)
        if self._started:
            self._fence_for_good()
            raise engine_fenced(self.engine_id)
        # This process's first heartbeat: it follows an earlier process with this engine id.
        self._head = head
        ended_at = record.expires_at_us if record.kind == ENGINE_HEARTBEAT else 0
        self._last_expires_at_us = max(self._last_expires_at_us, ended_at, record.previous_expires_at_us)

    def _fence_for_good(self) -> None:
        if not self.fenced:
            log.error("%s", engine_fenced(self.engine_id).message)
            for hook in self.on_fenced:
                hook()
        self.fenced = True
        ended, self.session = self.session, 0
        if ended:
            self._on_leases_lost(ended, "another process uses this engine id")

    async def stop(self) -> None:
        """Record that this engine stopped: every lease of its session is free at once.

        Call it only once nothing drives a run here any more.
        """
        if self._trimming is not None and not self._trimming.done():
            self._trimming.cancel()  # only saves space; the next process trims again
        async with self._lock:
            if self.stopped:
                return
            self.stopped = True
            self.session = 0
            if not self._started or self.fenced:
                return  # never recorded anything (or the record is another process's now)
            data = engine_stopped_payload(
                self.engine_id, self._process, self._last_session, self._previous_expires_at_us
            )
            try:
                if self._head is None:
                    await self._find_head()
                await self.store.append(
                    self.stream,
                    [(ENGINE_STOPPED, data)],
                    expected_seq=self._head or None,
                    status=ENGINE_STOPPED_LABEL,
                    patience=STOP_PATIENCE,
                )
            except KeelError as error:  # the store is gone, or fenced: the leases expire instead
                log.info("engine stop not recorded (%s); its run leases expire instead", error.message)
