"""Run leases as data: what lease and liveness events say, and whether a holder still holds.

The runtime (engine_service.runtime.leases, .heartbeat) reads and writes these records; every
judgement of them is here, as a function of the records and the time (wall microseconds):

- a recorded lease names a holder (an engine and its session); it holds while that session does
  (`judge_holder`, from the engine's liveness record);
- a run without any lease event is its creator's for one ttl after its creation
  (`implicit_holds_until`);
- a lease written before sessions existed holds until its own expiry (`legacy_holds_until`);
- what an engine remembers of the lease of a run it parked, and how a wake-up takes it from that
  (`KnownLease`, `known_lease_way`).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from engine_service.domain.streams import ENGINE_FENCED, ENGINE_STOPPED, LEASE_RELEASED

# A holder stops trusting its leases this fraction of the ttl before a taker may take them.
MARGIN_FRACTION = 0.2


def json_payload(data: dict[str, object]) -> bytes:
    """A lease or liveness event's payload: JSON with sorted keys."""
    return json.dumps(data, sort_keys=True).encode()


def _parsed(payload: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(payload.decode("utf-8")) if payload else {}
    return data


@dataclass(frozen=True)
class Holder:
    """Who a recorded lease names: an engine, and its session that took the lease."""

    engine_id: str
    session: int


@dataclass(frozen=True)
class LeaseEvent:
    """A run's last lease event, read."""

    released: bool
    engine_id: str
    holder: Holder | None  # None: released, or a lease written before sessions (`legacy_until_us`)
    legacy_until_us: int

    @classmethod
    def parse(cls, event_type: str, payload: bytes) -> LeaseEvent:
        """What the event says."""
        data = _parsed(payload)
        engine_id = str(data.get("engine_id", ""))
        session = data.get("session")
        released = event_type == LEASE_RELEASED
        holder = Holder(engine_id, session) if isinstance(session, int) and not released else None
        legacy = data.get("expires_at_us")
        return cls(released, engine_id, holder, legacy if isinstance(legacy, int) else 0)


def lease_acquired_payload(engine_id: str, session: int) -> bytes:
    """The payload of a LeaseAcquired by `engine_id` in `session`."""
    return json_payload({"engine_id": engine_id, "session": session})


def lease_released_payload(engine_id: str) -> bytes:
    """The payload of a LeaseReleased by `engine_id`."""
    return json_payload({"engine_id": engine_id})


@dataclass(frozen=True)
class EngineRecord:
    """The last event of an engine's liveness stream, as read by anyone."""

    engine_id: str
    seq: int
    kind: str  # its event type: EngineHeartbeat, EngineStopped or EngineFenced
    session: int
    expires_at_us: int
    previous_expires_at_us: int
    process: str
    fenced_by: str

    @classmethod
    def parse(cls, engine_id: str, seq: int, event_type: str, payload: bytes) -> EngineRecord:
        """The record an event of `engine:<engine_id>` says."""
        data = _parsed(payload)
        return cls(
            engine_id,
            seq,
            event_type,
            int(data.get("session", 0)),
            int(data.get("expires_at_us", 0)),
            int(data.get("previous_expires_at_us", 0)),
            str(data.get("process", "")),
            str(data.get("fenced_by", "")),
        )


def heartbeat_payload(
    engine_id: str, process: str, session: int, expires_at_us: int, previous_expires_at_us: int
) -> bytes:
    """The payload of an EngineHeartbeat: its session holds until `expires_at_us` (sender's clock)."""
    return json_payload(
        {
            "engine_id": engine_id,
            "process": process,
            "session": session,
            "expires_at_us": expires_at_us,
            "previous_expires_at_us": previous_expires_at_us,
        }
    )


def engine_stopped_payload(engine_id: str, process: str, session: int, previous_expires_at_us: int) -> bytes:
    """The payload of an EngineStopped: every lease of its sessions is free at once."""
    return json_payload(
        {
            "engine_id": engine_id,
            "process": process,
            "session": session,
            "previous_expires_at_us": previous_expires_at_us,
        }
    )


def engine_fenced_payload(record: EngineRecord, fenced_by: str) -> bytes:
    """The payload of an EngineFenced ending `record`'s session, written by engine `fenced_by`."""
    return json_payload(
        {
            "engine_id": record.engine_id,
            "session": record.session,
            "previous_expires_at_us": record.previous_expires_at_us,
            "fenced_by": fenced_by,
        }
    )


class Holding(enum.Enum):
    """What a holder's session is, judged from its engine's liveness record."""

    HOLDS = "holds"  # until `until_us`
    OVER = "over"  # for good: stopped, fenced, ended, or never recorded
    EXPIRED = "expired"  # its heartbeat expired: a taker may fence the session off now
    RECORD_OLDER = "record_older"  # the record was read before the lease: read it again


@dataclass(frozen=True)
class HolderVerdict:
    """`judge_holder`'s answer: the session's state, until when it holds, or why it does not."""

    holding: Holding
    until_us: int = 0
    why: str = ""


def judge_holder(holder: Holder, record: EngineRecord | None, now_us: int) -> HolderVerdict:
    """Whether the session a lease names still holds at `now_us`, by its engine's liveness record."""
    if record is None:  # a lease names a session only once its first heartbeat landed
        return HolderVerdict(Holding.OVER, why="its engine has no liveness record")
    if holder.session > record.session:
        return HolderVerdict(Holding.RECORD_OLDER)
    if holder.session < record.session:
        # An earlier session: over for its engine, which carries its expiry in the later one.
        if record.previous_expires_at_us > now_us:
            return HolderVerdict(Holding.HOLDS, until_us=record.previous_expires_at_us)
        return HolderVerdict(Holding.OVER, why="its engine's session ended")
    if record.kind == ENGINE_STOPPED:
        return HolderVerdict(Holding.OVER, why="its engine stopped")
    if record.kind == ENGINE_FENCED:
        return HolderVerdict(Holding.OVER, why="its engine's heartbeat expired")
    if record.expires_at_us > now_us:
        return HolderVerdict(Holding.HOLDS, until_us=record.expires_at_us)
    return HolderVerdict(Holding.EXPIRED, why="its engine's heartbeat expired")


def implicit_holds_until(created_at_us: int | None, ttl_us: int) -> int:
    """Until when (wall µs) a run's creator holds its implicit lease: one ttl after its creation."""
    return (created_at_us or 0) + ttl_us


def legacy_holds_until(last: LeaseEvent, engine_id: str, now_us: int) -> int:
    """Until when a lease event written before sessions holds (0: it does not, or it is `engine_id`'s)."""
    if last.released or last.engine_id == engine_id or last.legacy_until_us <= now_us:
        return 0
    return last.legacy_until_us


@dataclass(frozen=True, slots=True)
class KnownLease:
    """What an engine knows of the lease of a run it parked: the run (its RunStarted's `at_us`), and
    the lease: recorded at `seq` in `session`, or (session 0) implicit until `implicit_until`
    (monotonic seconds), of the run stream created at `created_at_us` (None: not known)."""

    started_at_us: int
    seq: int
    session: int
    implicit_until: float
    created_at_us: int | None


@dataclass(frozen=True, slots=True)
class ImplicitHere:
    """The implicit lease of a run an engine created and no longer drives: until when it holds
    (monotonic seconds), and the creation time of the run stream it is of (None: not known)."""

    until: float
    created_at_us: int | None


class KnownWay(enum.Enum):
    """How a wake-up takes the lease of a run its engine parked, from what the engine knows."""

    HOLD_RECORDED = "hold_recorded"  # recorded in the session that still holds: no write
    HOLD_IMPLICIT = "hold_implicit"  # implicit, younger than ttl/3: held again as it was
    TAKE_NEW = "take_new"  # never recorded: appended with "the lease stream must be new"
    READ = "read"  # recorded in another session: the lease stream is read


def known_lease_way(known: KnownLease, session: int, now: float, ttl: float) -> KnownWay:
    """How to take `known` at `now` (monotonic seconds) for an engine in `session` with lease `ttl`.

    Nobody records a lease of a run younger than ttl/3 (its creator does so at that age), and
    nobody takes a lease recorded in a session before that session is over (its engine checks
    that its session still holds before it holds the lease again).
    """
    if known.session:
        return KnownWay.HOLD_RECORDED if known.session == session else KnownWay.READ
    born = known.implicit_until - ttl
    return KnownWay.HOLD_IMPLICIT if now - born < ttl / 3 else KnownWay.TAKE_NEW
