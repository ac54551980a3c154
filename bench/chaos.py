"""The chaos test (tests/chaos) for longer: runs with recorded calls and fan-out children while
engines and stores are SIGKILLed and SIGSTOPped at random; prints runs started / acknowledged /
terminal / lost, stream gaps, and repeated transport calls by cause (executor killed, executor
paused past its lease, executor cut off past its lease, other).

Run: `.venv/bin/python bench/chaos.py [--seconds T] [--seed S] [--backend sqlite|postgres] [--dsn DSN]`

sqlite: one store-service, two engines. postgres: two store-service replicas on a fresh schema
(dropped afterwards), two engines. The working directory (ledger, service logs) is kept and
printed. Exits 1 when a run was lost, a stream has a gap, or a repeat has cause `other`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.chaos.harness import chaos_on  # noqa: E402

DEFAULT_DSN = os.environ.get("KEEL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def main() -> None:
    """Parse the flags, run, print the report; exit 1 when the run fails the test's checks."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the chaos lasts (default 60)")
    parser.add_argument("--seed", type=int, default=1, help="the chaos and workload seed (default 1)")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--dsn", default=DEFAULT_DSN, help=f"PostgreSQL DSN (default {DEFAULT_DSN})")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix=f"keel-chaos-{args.backend}-"))
    report = asyncio.run(
        chaos_on(args.backend, seed=args.seed, seconds=args.seconds, workdir=workdir, dsn=args.dsn)
    )
    print(report.text())
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
