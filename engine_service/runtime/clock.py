"""The engine's clock: wall time in microseconds since the epoch.

One clock for what events record (`at_us`) and what lease expiries are compared with: both are
wall-clock instants shared with other engines, so skew between machines must stay below the
lease margin (engine_service.domain.leasing).
"""

from __future__ import annotations

import time


def now_us() -> int:
    """The time now, in microseconds since the epoch."""
    return time.time_ns() // 1000
