"""Keel's one wall clock: microseconds since the Unix epoch, as events and leases record time."""

from __future__ import annotations

import time


def now_us() -> int:
    """Wall-clock microseconds since the Unix epoch."""
    return time.time_ns() // 1000


__all__ = ["now_us"]
