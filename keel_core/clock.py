"""Keel's one wall clock: microseconds since the Unix epoch, as events and leases record time."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def now_us() -> int:
    """Wall-clock microseconds since the Unix epoch."""
    return time.time_ns() // 1000


def us_of(when: datetime) -> int:
    """An aware datetime as microseconds since the Unix epoch, exactly (no float in between)."""
    return (when - _EPOCH) // _MICROSECOND


__all__ = ["now_us", "us_of"]
