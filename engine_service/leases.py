"""Run ownership leases: which engine drives a run, held in the store with a bounded lifetime.

Each run has a lease stream `lease:<run id>` beside its run stream. Its events are
`LeaseAcquired {engine_id, expires_at_us}` (an acquisition or a renewal) and
`LeaseReleased {engine_id}`; the last event says who holds the run. Every write is a
compare-and-swap on the lease stream's head, so exactly one engine wins each acquisition:

- a new run's lease is implicit: its creator holds it, without any lease event, until one ttl
  after the run stream was created (its first event's commit time). Runs that finish sooner (most
  of them) never write a lease at all; a longer one writes its first `LeaseAcquired` at its first
  renewal, with "the stream must be new" as the compare-and-swap.
- acquire: read the last event; when it is a release, it has expired by this engine's clock, or
  it is this engine's own (or there is none and the run is older than one ttl), append
  `LeaseAcquired` after it. A conflict means another engine got there first.
- renew: a lease older than ttl/3 is renewed (the holder checks every ttl/6) by appending
  `LeaseAcquired` after its last lease event. A conflict, or the lease running out locally before
  a renewal lands, means the lease is lost: the engine cancels that run's driver at once (the run
  parks; nothing more is appended).
- release: graceful shutdown appends `LeaseReleased`, so another engine takes the run over at its
  next scan instead of waiting for the expiry.

Fencing. A holder trusts its lease until `ttl - margin` after it *sent* the write that granted it
(for an implicit lease: before it sent RunStarted), and checks that before every append and every
transport call; a taker waits until `expires_at_us` (the holder's clock at sending, plus ttl; for
an implicit lease the store's commit time of RunStarted, plus ttl) has passed on its own clock. So
a holder has stopped writing `margin` before anyone may take over (clock skew and delivery delay
must stay below the margin, ttl/5). The taker then claims the run by appending to the run stream
at the head it read (`claim_first` in the run driver): the run stream's sequence compare-and-swap
refuses any later append of the old holder, whatever the clocks say.

Why a separate stream rather than lease events inside the run stream: renewals of a long op would
otherwise fill the run's history (and every WatchRun) with bookkeeping, compete with the driver's
write-behind batches for the run's sequence, and every reader of a history would have to skip
them. Apart, a renewal is a tiny append nobody else reads, and the run stream still fences. With
implicit leases for new runs, a run that finishes within ttl/3 costs no lease write at all (the
hot path is unchanged); a run's lease is not released when the run finishes (a terminal run is
never scanned).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

from engine_service.store_client import StoreClient
from keel_core.errors import ErrorCategory, KeelError

log = logging.getLogger(__name__)

LEASE_STREAM_PREFIX = "lease:"
LEASE_ACQUIRED = "LeaseAcquired"
LEASE_RELEASED = "LeaseReleased"
# A holder stops trusting its lease this fraction of the ttl before a taker may take it.
MARGIN_FRACTION = 0.2
RELEASE_PATIENCE = 2.0
# Lease streams' status labels: a released lease is listed as "canceled" until someone takes it,
# so scans find handed-over runs with one ListStreams instead of reading every lease.
HELD = "active"
RELEASED = "canceled"


def lease_stream_id(run_id: str) -> str:
    """The store stream holding a run's lease."""
    return f"{LEASE_STREAM_PREFIX}{run_id}"


def _wall_us() -> int:
    return time.time_ns() // 1000


def lease_lost(run_id: str, why: str) -> KeelError:
    """The error a driver meets when it may no longer write to its run."""
    return KeelError(
        "lease_lost",
        f"this engine no longer holds the lease on run {run_id} ({why}); another engine drives it",
        category=ErrorCategory.CONFLICT,
        details={"run_id": run_id},
    )


class Lease:
    """This engine's lease on one run: the last lease event it wrote and until when it trusts it."""

    def __init__(self, run_id: str, ttl: float) -> None:
        self.run_id = run_id
        self.seq = 0
        self.valid_until = 0.0  # time.monotonic()
        self.lost = False
        self._margin = ttl * MARGIN_FRACTION
        self._ttl = ttl

    def granted(self, seq: int, sent_at: float, ttl: float) -> None:
        """A write of ours landed at `seq`; it was sent at monotonic time `sent_at`."""
        self.seq = seq
        self.valid_until = sent_at + ttl

    def age(self) -> float:
        """Seconds since the write that granted it was sent."""
        return time.monotonic() - (self.valid_until - self._ttl)

    def is_valid(self) -> bool:
        """Whether this engine may still write to the run (with the safety margin)."""
        return not self.lost and time.monotonic() < self.valid_until - self._margin

    async def confirm(self) -> None:
        """Raise `lease_lost` unless the lease is held and valid."""
        if self.lost:
            raise lease_lost(self.run_id, "another engine holds it")
        if not self.is_valid():
            raise lease_lost(self.run_id, "it expired before a renewal landed")


class Leases:
    """The leases one engine holds, their renewal, acquisition and release."""

    def __init__(
        self,
        store: StoreClient,
        engine_id: str,
        ttl: float,
        *,
        on_lost: Callable[[str], None],
        on_takeover: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.engine_id = engine_id
        self.ttl = ttl
        self._on_lost = on_lost
        self._on_takeover = on_takeover
        self.held: dict[str, Lease] = {}
        self._renewing: asyncio.Task[None] | None = None
        self._closing = False
        self._to_release: dict[str, Lease] = {}
        # Runs this engine created whose implicit lease it stopped renewing (no event names it).
        self._implicit_here: set[str] = set()
        # run id -> expiry of another engine's lease as last read: scans skip it until then.
        self._seen_live: dict[str, int] = {}

    def known_live(self, run_id: str) -> bool:
        """Whether another engine's lease on the run was seen, and has not expired since."""
        expires_at = self._seen_live.get(run_id)
        if expires_at is None:
            return False
        if expires_at > _wall_us():
            return True
        del self._seen_live[run_id]
        return False

    def seen_live_for(self, run_id: str) -> float | None:
        """Seconds until another engine's lease on the run, as last read, expires (None: not seen)."""
        if not self.known_live(run_id):
            return None
        return max(0.0, (self._seen_live[run_id] - _wall_us()) / 1_000_000) + 0.05

    def forget_seen(self, keep: set[str]) -> None:
        """Drop what was seen of runs no longer active (scans call this with the active ones)."""
        self._seen_live = {run_id: at for run_id, at in self._seen_live.items() if run_id in keep}
        self._implicit_here &= keep

    async def released_runs(self) -> set[str]:
        """Runs whose lease was released and not taken since (graceful shutdowns of other engines)."""
        out: set[str] = set()
        token = ""
        while True:
            page, token = await self.store.list_streams(
                prefix=LEASE_STREAM_PREFIX, statuses=[RELEASED], page_size=500, page_token=token
            )
            out.update(s.stream_id.removeprefix(LEASE_STREAM_PREFIX) for s in page)
            if not token:
                return out

    def _payload(self, expires: bool) -> bytes:
        data: dict[str, object] = {"engine_id": self.engine_id}
        if expires:
            data["expires_at_us"] = _wall_us() + int(self.ttl * 1_000_000)
        return json.dumps(data, sort_keys=True).encode()

    def _ensure_renewing(self) -> None:
        if self._renewing is None and not self._closing:
            self._renewing = asyncio.create_task(self._renew_forever(), name="renew leases")

    def start_new(self, run_id: str) -> Lease:
        """The implicit lease of a run this engine creates now (call it before sending RunStarted)."""
        lease = Lease(run_id, self.ttl)
        lease.granted(0, time.monotonic(), self.ttl)  # seq 0: no lease event yet
        self.held[run_id] = lease
        self._ensure_renewing()
        return lease

    def discard(self, run_id: str) -> None:
        """Forget a lease this engine turned out not to hold (its run existed already)."""
        lease = self.held.pop(run_id, None)
        if lease is not None:
            lease.lost = True

    async def acquire(
        self, run_id: str, created_at_us: int | None, born: Callable[[], Awaitable[int | None]]
    ) -> Lease | None:
        """Take the run's lease when it is free, expired or ours; None when another engine holds it.

        A run without any lease event is its creator's for one ttl after its creation time
        (`created_at_us` when a scan knows it, else `born()` reads it).
        """
        current = self.held.get(run_id)
        if current is not None and not current.lost:
            return current
        stream = lease_stream_id(run_id)
        head, _ = await self.store.head(stream)
        taken_from_self = run_id in self._implicit_here
        previous: dict[str, object] = {}
        released = False
        if head:
            last = (await self.store.read(stream, from_seq=head, limit=1))[0]
            previous = json.loads(last.payload.decode("utf-8")) if last.payload else {}
            released = last.type == LEASE_RELEASED
            expires_at = previous.get("expires_at_us")
            ours = previous.get("engine_id") == self.engine_id
            if not released and not ours and isinstance(expires_at, int) and expires_at > _wall_us():
                self._seen_live[run_id] = expires_at
                return None
        elif not taken_from_self:
            if created_at_us is None:
                created_at_us = await born()
            implicit_until = (created_at_us or 0) + int(self.ttl * 1_000_000)
            if implicit_until > _wall_us():
                self._seen_live[run_id] = implicit_until
                return None
        if self._closing:
            return None
        lease = Lease(run_id, self.ttl)
        sent_at = time.monotonic()
        try:
            result = await self.store.append(
                stream,
                [(LEASE_ACQUIRED, self._payload(expires=True))],
                expected_seq=head or None,
                status=HELD,
            )
        except KeelError as error:
            if error.code == "sequence_conflict":
                return None
            raise
        lease.granted(result.head_seq, sent_at, self.ttl)
        self._seen_live.pop(run_id, None)
        self._implicit_here.discard(run_id)
        self.held[run_id] = lease
        self._ensure_renewing()
        holder = previous.get("engine_id") if head else "its creator"
        if holder != self.engine_id and not (head == 0 and taken_from_self):
            log.info(
                "took over run %s from %s (its lease %s)",
                run_id,
                f"engine {holder}" if head else holder,
                "was released" if released else "expired" if head else "(implicit) expired",
            )
            if self._on_takeover is not None:
                self._on_takeover()
        return lease

    def drop(self, run_id: str, *, run_exists: bool = True) -> None:
        """Stop renewing the run's lease (its driver stopped); it expires on its own.

        While closing it is released instead, unless the run never reached the store.
        """
        lease = self.held.pop(run_id, None)
        if lease is not None and lease.seq == 0 and not lease.lost and run_exists:
            self._implicit_here.add(run_id)  # no event says it is ours: remember it
        if lease is not None and self._closing and not lease.lost and run_exists:
            self._to_release[run_id] = lease  # shutting down: hand it over at once instead

    def _forget(self, lease: Lease) -> None:
        lease.lost = True
        if self.held.get(lease.run_id) is lease:
            del self.held[lease.run_id]

    def _lose(self, lease: Lease, why: str) -> None:
        if lease.lost:
            return
        log.warning("lost the lease on run %s (%s): stopping its driver here", lease.run_id, why)
        self._forget(lease)
        self._on_lost(lease.run_id)

    async def _renew_forever(self) -> None:
        while True:
            # Each lease is renewed once it is ttl/3 old, so at between ttl/3 and ttl/2: a run that
            # finishes sooner never renews (nor, if new, writes) its lease.
            await asyncio.sleep(self.ttl / 6)
            leases = [lease for lease in self.held.values() if lease.age() >= self.ttl / 3]
            results = await asyncio.gather(*(self._renew(lease) for lease in leases), return_exceptions=True)
            for lease, result in zip(leases, results, strict=True):
                if isinstance(result, Exception):  # a bug must not stop every other renewal
                    log.error("renewing the lease on run %s failed: %r", lease.run_id, result)
                    self._lose(lease, "its renewal failed")

    async def _renew(self, lease: Lease) -> None:
        if lease.lost:
            return
        sent_at = time.monotonic()
        patience = max(0.0, lease.valid_until - sent_at)
        try:
            result = await self.store.append(
                lease_stream_id(lease.run_id),
                [(LEASE_ACQUIRED, self._payload(expires=True))],
                expected_seq=lease.seq or None,  # an implicit lease's first write: the stream is new
                status=HELD,
                patience=patience,
            )
        except KeelError as error:
            self._lose(lease, error.code)
            return
        if lease.lost:
            return
        if time.monotonic() >= lease.valid_until:
            self._lose(lease, "it expired before its renewal landed")
            return
        lease.granted(result.head_seq, sent_at, self.ttl)

    async def close(self) -> None:
        """Stop renewing; release every lease still held or handed over during shutdown."""
        self._closing = True
        for run_id in list(self.held):
            self.drop(run_id)
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(BaseException):
                await self._renewing
        leases, self._to_release = list(self._to_release.values()), {}
        await asyncio.gather(*(self._release(lease) for lease in leases))

    def begin_closing(self) -> None:
        """From now on a stopped driver's lease is released (not left to expire) and none is taken."""
        self._closing = True

    async def _release(self, lease: Lease) -> None:
        try:
            await self.store.append(
                lease_stream_id(lease.run_id),
                [(LEASE_RELEASED, self._payload(expires=False))],
                expected_seq=lease.seq or None,
                status=RELEASED,
                patience=RELEASE_PATIENCE,
            )
        except KeelError as error:  # lost already, or the store is gone: it expires instead
            log.info("run %s: lease not released (%s); it expires instead", lease.run_id, error.message)
