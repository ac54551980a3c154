"""Run ids that sort by the time they were made: UUIDv7 (RFC 9562, section 5.7).

A run's id keys its stream, so it is a key in the store's indexes (SQLite's and PostgreSQL's
B-trees on the stream id, the events' (stream id, seq) key). A random uuid4 lands every new run on
a page of its own in each of them, and a commit writes all those pages; ids that start with their
creation time put the runs in flight on the last few pages. The same layout also lists and reads
in creation order wherever ids are sorted. Of the 80 bits after the time, 6 are the version and
the variant and 74 are random (from `os.urandom`, as uuid4's are), so ids made in one millisecond,
by one process or many, do not collide and cannot be guessed from each other.
"""

from __future__ import annotations

import os
import time

_MS_BITS = (1 << 48) - 1
_VERSION = 0x7 << 76
_VARIANT = 0b10 << 62
_RAND_B_BITS = (1 << 62) - 1


def uuid7_int(ms: int, low: int) -> int:
    """A UUIDv7 as an integer: Unix milliseconds `ms`, then the 74 low bits of `low` around the
    version and the variant (random bits, or a counter's; the store's blob ids use one)."""
    return (
        (ms & _MS_BITS) << 80
        | _VERSION
        | (low >> 62 & 0xFFF) << 64  # rand_a
        | _VARIANT
        | low & _RAND_B_BITS  # rand_b
    )


def new_run_id() -> str:
    """A new run id: a UUIDv7 in its canonical 36-character form."""
    random = int.from_bytes(os.urandom(10), "big")  # 80 bits, of which 74 are used
    value = uuid7_int(time.time_ns() // 1_000_000, random)
    text = f"{value:032x}"  # str(uuid.UUID(int=value)), without making the UUID
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
