"""Reading lease takeovers out of engine logs (tests.chaos.evidence), on hand-written log lines."""

from __future__ import annotations

import json
from pathlib import Path

from tests.chaos.evidence import takeovers
from tests.chaos.ledger import Takeover

LEASES = "engine_service.runtime.leases"


def line(ts: str, msg: str, logger: str = LEASES) -> str:
    """One engine log line as the engine writes it."""
    return json.dumps({"ts": ts, "level": "info", "logger": logger, "msg": msg})


def test_takeovers_are_read_with_their_previous_holder_and_reason_at_monotonic_times(tmp_path: Path) -> None:
    log = tmp_path / "engine-a.log"
    lines = [
        line("1970-01-01T00:00:12.500Z", "took over run r1 from its creator (its implicit lease expired)"),
        line("1970-01-01T00:00:11.000Z", "took over run r2 from engine engine-b.2 (it was released)"),
        line("1970-01-01T00:00:13.000Z", "took over run r3 from its creator (x)", "engine_service.runs"),
        '{"ts": "1970-01-01T00:00:14.000Z", "msg": "took over run r4 from its cr',  # cut by a SIGKILL
    ]
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # t0 is monotonic 100.0 at wall 10.0.
    found = takeovers([log, tmp_path / "engine-b.log"], 100.0, 10.0)
    assert found == [
        Takeover("r2", 101.0, "engine-b.2", "it was released"),
        Takeover("r1", 102.5, "", "its implicit lease expired"),
    ]
    assert [t.expired for t in found] == [False, True]
