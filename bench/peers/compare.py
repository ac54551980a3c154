"""Keel against DBOS Transact in one run, alternating, so the ratio is a same-run figure (issue 13).

    python3 -m venv /tmp/dbos-venv && /tmp/dbos-venv/bin/pip install dbos
    .venv/bin/python bench/peers/compare.py --dbos-python /tmp/dbos-venv/bin/python [--rounds 3]

Each round runs, one after the other, Keel's `bench/engine_runs.py` and `bench/peers/dbos_runs.py` on the
same scenario (the 3-step pipeline with 32 in flight, then the fan-out parent of 10 children with 8 in
flight), both on SQLite in WAL mode with full sync. It prints every measurement and, per scenario,
the ratio of the medians over the rounds:
`pipeline keel/dbos: 6.1x (keel, 1 engine(s), 352.0/s p99 120 ms, dbos 57.3/s p99 1900 ms; medians of 3
rounds)`. `--engines N` runs N Keel engines on the one SQLite store (an engine is one process and
uses one core; the client spreads its runs over them); DBOS runs as one process either way.
The order within a round alternates, so neither side always runs on a warmer machine.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = re.compile(r"^RESULT scenario=(\S+) rate=([\d.]+) p50_ms=([\d.]+) p99_ms=([\d.]+)$", re.M)


@dataclass(frozen=True)
class Measurement:
    """One benchmark's figures for one scenario."""

    rate: float
    p50_ms: float
    p99_ms: float


def measured(command: list[str]) -> Measurement:
    """Runs one benchmark command and reads its RESULT line."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    found = RESULT.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return Measurement(float(found[2]), float(found[3]), float(found[4]))


def commands(args: argparse.Namespace, scenario: str) -> dict[str, list[str]]:
    """The Keel and DBOS command lines for one scenario."""
    amount = ["--runs", str(args.runs)] if scenario == "pipeline" else ["--parents", str(args.parents)]
    return {
        "keel": [
            sys.executable,
            str(HERE.parent / "engine_runs.py"),
            "--scenario",
            scenario,
            *amount,
            "--engines",
            str(args.engines),
        ],
        "dbos": [args.dbos_python, str(HERE / "dbos_runs.py"), "--scenario", scenario, *amount],
    }


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dbos-python", required=True, help="a Python with `dbos` installed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1000, help="pipeline runs per measurement")
    parser.add_argument("--parents", type=int, default=80, help="fan-out parents per measurement")
    parser.add_argument("--scenario", choices=["all", "pipeline", "fan-out"], default="all")
    parser.add_argument(
        "--engines",
        type=int,
        default=1,
        help="Keel engines sharing the one SQLite store (the client spreads its runs over them)",
    )
    args = parser.parse_args()
    scenarios = ["pipeline", "fan-out"] if args.scenario == "all" else [args.scenario]
    for scenario in scenarios:
        figures: dict[str, list[Measurement]] = {"keel": [], "dbos": []}
        for round_index in range(args.rounds):
            order = ["keel", "dbos"] if round_index % 2 == 0 else ["dbos", "keel"]
            for side in order:
                result = measured(commands(args, scenario)[side])
                figures[side].append(result)
                print(f"round {round_index + 1} {scenario} {side}: {result.rate:.1f}/s", end=" ")
                print(f"p99 {result.p99_ms:.0f} ms")
        keel = statistics.median(m.rate for m in figures["keel"])
        dbos = statistics.median(m.rate for m in figures["dbos"])
        keel_p99 = statistics.median(m.p99_ms for m in figures["keel"])
        dbos_p99 = statistics.median(m.p99_ms for m in figures["dbos"])
        print(
            f"{scenario} keel/dbos: {keel / dbos:.2f}x (keel, {args.engines} engine(s), {keel:.1f}/s p99 "
            f"{keel_p99:.0f} ms, "
            f"dbos {dbos:.1f}/s p99 {dbos_p99:.0f} ms; medians of {args.rounds} rounds)"
        )


if __name__ == "__main__":
    main()
