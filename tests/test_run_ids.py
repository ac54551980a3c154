"""keel_core.ids: the run ids Keel picks are UUIDv7s, in creation order across milliseconds."""

from __future__ import annotations

import time
import uuid

from engine_service.domain.run_config import parse_run_id
from keel_core.ids import new_run_id


def made_at_ms(run_id: str) -> int:
    """The Unix milliseconds in a UUIDv7's first 48 bits."""
    return uuid.UUID(run_id).int >> 80


def test_a_run_id_is_a_canonical_uuid7_holding_the_millisecond_it_was_made() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_run_id() for _ in range(10_000)]
    after = time.time_ns() // 1_000_000
    for run_id in ids:
        parsed = uuid.UUID(run_id)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert str(parsed) == run_id == parse_run_id(run_id)
        assert before <= made_at_ms(run_id) <= after
    assert len(set(ids)) == len(ids)
    # The 74 bits after the time are random: every one of them takes both values across the ids.
    random_bits = [
        (uuid.UUID(run_id).int >> 64 & 0xFFF) << 62 | uuid.UUID(run_id).int & (2**62 - 1) for run_id in ids
    ]
    varied = 0
    for value in random_bits:
        varied |= value ^ random_bits[0]
    assert varied == 2**74 - 1


def test_an_id_made_in_a_later_millisecond_sorts_after_as_text_and_as_a_uuid() -> None:
    earlier = new_run_id()
    while time.time_ns() // 1_000_000 <= made_at_ms(earlier):
        pass  # at most a millisecond
    later = new_run_id()
    assert earlier < later
    assert uuid.UUID(earlier) < uuid.UUID(later)
