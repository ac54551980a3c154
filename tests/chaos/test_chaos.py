"""Issue 10's fault-injection test: runs with several recorded calls and fan-out children while
engines and stores are SIGKILLed and SIGSTOPped at random (tests.chaos.harness), on SQLite (one
store, two engines) and on PostgreSQL (two store replicas on one schema, two engines).

It fails on any acknowledged run that never ends, any gap in a run:, children: or lease: stream,
and any call the ledger shows executed again while its first executor neither died nor was paused
or cut off from the store past its lease (tests.chaos.ledger says how each is told).
KEEL_CHAOS_SEED picks the seed (default: a fixed one per backend); the longer version is
`bench/chaos.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.harness import chaos_on

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SECONDS = 20.0
SEEDS = {"sqlite": 1, "postgres": 2}


def seed_for(backend: str) -> int:
    """KEEL_CHAOS_SEED when set, else the backend's fixed seed."""
    chosen = os.environ.get("KEEL_CHAOS_SEED", "")
    return int(chosen) if chosen else SEEDS[backend]


async def test_chaos_on_sqlite_one_store_two_engines(tmp_path: Path) -> None:
    report = await chaos_on("sqlite", seed=seed_for("sqlite"), seconds=SECONDS, workdir=tmp_path)
    print(report.text())
    assert not report.failures, report.text()


@pytest.mark.postgres
async def test_chaos_on_postgres_two_stores_two_engines(postgres_dsn: str, tmp_path: Path) -> None:
    report = await chaos_on(
        "postgres", seed=seed_for("postgres"), seconds=SECONDS, workdir=tmp_path, dsn=postgres_dsn
    )
    print(report.text())
    assert not report.failures, report.text()
