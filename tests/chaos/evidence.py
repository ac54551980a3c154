"""What the engines logged about a run around a repeated call: the evidence behind an `other` repeat.

Engines log JSON lines (`ts`, `level`, `logger`, `msg`) to the chaos run's `<engine>.log` files.
Warnings, errors and lease hand-overs naming the run, from two ttls before its first execution to
one ttl after its repeat, are what a reader needs to match the repeat to a cause; the store
client's retries are counted, not listed.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from tests.chaos.ledger import Repeat, Takeover

TAKEOVER = re.compile(r"took over run (\S+) from (?:engine (\S+)|its creator) \((.*)\)$")

MAX_LINES = 8
MAX_MESSAGE = 220


def log_evidence(logs: list[Path], repeat: Repeat, lease_ttl: float, t0_wall: float) -> list[str]:
    """The engines' warnings, errors and hand-overs of the repeat's run around it, times from t0."""
    # Until a ttl after the repeat: the first executor learns it was fenced off only when it writes.
    since, until = repeat.before.wall - 2 * lease_ttl, repeat.again.wall + lease_ttl
    lines: list[str] = []
    retries = 0
    for path in logs:
        for record in _records_naming(path, repeat.before.run):
            at = _wall(record)
            takeover = record.get("logger") == "engine_service.runtime.leases"
            if not since <= at <= until or (record.get("level") not in ("warning", "error") and not takeover):
                continue
            if record.get("logger") == "engine_service.store.grpc_client":
                retries += 1
                continue
            message = str(record.get("msg", ""))[:MAX_MESSAGE]
            lines.append(f"{at - t0_wall:.2f}s {path.stem} {record.get('level')}: {message}")
    lines.sort()
    shown = lines[:MAX_LINES] + ([f"... {len(lines) - MAX_LINES} more"] if len(lines) > MAX_LINES else [])
    return [*shown, *([f"{retries} failed store call(s) retried"] if retries else [])]


def takeovers(logs: list[Path], t0_mono: float, t0_wall: float) -> list[Takeover]:
    """Every lease takeover the engines logged, at monotonic times (from the t0 pair's offset)."""
    found = []
    for path in logs:
        for record in _records_naming(path, "took over run "):
            matched = TAKEOVER.match(str(record.get("msg", "")))
            if record.get("logger") != "engine_service.runtime.leases" or matched is None:
                continue
            at = _wall(record) - t0_wall + t0_mono
            found.append(Takeover(matched[1], at, matched[2] or "", matched[3]))
    return sorted(found, key=lambda t: t.mono)


def _wall(record: dict[str, object]) -> float:
    return datetime.fromisoformat(str(record.get("ts", "")).replace("Z", "+00:00")).timestamp()


def _records_naming(path: Path, text: str) -> list[dict[str, object]]:
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            if text not in line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a SIGKILL
            if isinstance(record, dict):
                records.append(record)
    return records
