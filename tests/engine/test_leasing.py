"""The pure lease judgements (engine_service.domain.leasing): no store, no server."""

from __future__ import annotations

from engine_service.domain.leasing import (
    EngineRecord,
    Holder,
    Holding,
    KnownLease,
    KnownWay,
    LeaseEvent,
    implicit_holds_until,
    judge_holder,
    known_lease_way,
    lease_acquired_payload,
    lease_released_payload,
    legacy_holds_until,
)
from engine_service.domain.streams import (
    ENGINE_FENCED,
    ENGINE_HEARTBEAT,
    ENGINE_STOPPED,
    LEASE_ACQUIRED,
    LEASE_RELEASED,
)

NOW = 1_000_000_000


def record(
    kind: str = ENGINE_HEARTBEAT, session: int = 3, expires: int = NOW + 5, previous: int = 0
) -> EngineRecord:
    return EngineRecord("engine-a", 7, kind, session, expires, previous, "p", "")


def test_a_session_holds_until_its_last_heartbeat_expires() -> None:
    verdict = judge_holder(Holder("engine-a", 3), record(), NOW)
    assert (verdict.holding, verdict.until_us) == (Holding.HOLDS, NOW + 5)


def test_an_expired_heartbeat_is_for_a_taker_to_fence() -> None:
    verdict = judge_holder(Holder("engine-a", 3), record(expires=NOW), NOW)
    assert (verdict.holding, verdict.why) == (Holding.EXPIRED, "its engine's heartbeat expired")


def test_a_stopped_or_fenced_session_is_over_for_good() -> None:
    for kind, why in (
        (ENGINE_STOPPED, "its engine stopped"),
        (ENGINE_FENCED, "its engine's heartbeat expired"),
    ):
        verdict = judge_holder(Holder("engine-a", 3), record(kind, expires=NOW + 5), NOW)
        assert (verdict.holding, verdict.why) == (Holding.OVER, why)


def test_no_liveness_record_means_the_session_is_over() -> None:
    assert judge_holder(Holder("engine-a", 3), None, NOW).holding is Holding.OVER


def test_an_earlier_session_holds_only_until_the_expiry_its_successor_carries() -> None:
    assert judge_holder(Holder("engine-a", 2), record(previous=NOW + 1), NOW).until_us == NOW + 1
    ended = judge_holder(Holder("engine-a", 2), record(previous=NOW), NOW)
    assert (ended.holding, ended.why) == (Holding.OVER, "its engine's session ended")


def test_a_record_older_than_the_lease_must_be_read_again() -> None:
    assert judge_holder(Holder("engine-a", 4), record(), NOW).holding is Holding.RECORD_OLDER


def test_lease_events_round_trip_their_payloads() -> None:
    acquired = LeaseEvent.parse(LEASE_ACQUIRED, lease_acquired_payload("engine-a", 3))
    assert acquired.holder == Holder("engine-a", 3) and not acquired.released
    released = LeaseEvent.parse(LEASE_RELEASED, lease_released_payload("engine-a"))
    assert released.released and released.holder is None and released.engine_id == "engine-a"


def test_implicit_and_legacy_leases_hold_for_their_own_time() -> None:
    assert implicit_holds_until(NOW, 10) == NOW + 10
    legacy = LeaseEvent(False, "engine-b", None, NOW + 3)
    assert legacy_holds_until(legacy, "engine-a", NOW) == NOW + 3
    assert legacy_holds_until(legacy, "engine-b", NOW) == 0  # its own
    assert legacy_holds_until(legacy, "engine-a", NOW + 3) == 0  # expired


TTL = 9.0


def test_a_lease_recorded_in_the_current_session_is_held_again_and_one_of_another_is_read() -> None:
    recorded = KnownLease(NOW, seq=4, session=3, implicit_until=100.0, created_at_us=NOW)
    assert known_lease_way(recorded, 3, now=1_000.0, ttl=TTL) is KnownWay.HOLD_RECORDED
    assert known_lease_way(recorded, 4, now=1_000.0, ttl=TTL) is KnownWay.READ
    assert known_lease_way(recorded, 0, now=1_000.0, ttl=TTL) is KnownWay.READ


def test_an_implicit_lease_is_held_again_until_ttl_over_3_then_taken_with_a_new_stream() -> None:
    # Born at 100 - TTL = 91: held again as it was while younger than TTL / 3 = 3 s.
    implicit = KnownLease(NOW, seq=0, session=0, implicit_until=100.0, created_at_us=NOW)
    assert known_lease_way(implicit, 3, now=91.0, ttl=TTL) is KnownWay.HOLD_IMPLICIT
    assert known_lease_way(implicit, 3, now=93.9, ttl=TTL) is KnownWay.HOLD_IMPLICIT
    assert known_lease_way(implicit, 3, now=94.0, ttl=TTL) is KnownWay.TAKE_NEW
    assert known_lease_way(implicit, 3, now=500.0, ttl=TTL) is KnownWay.TAKE_NEW
