"""The engine's instructions per run, counted by valgrind: an A/B that the machine's load hardly moves.

Run: `.venv/bin/python bench/instructions.py [--scenario pipeline|fan-out] [--runs N] [--warm N]`
(needs `valgrind`: `apt-get install valgrind`)

It runs bench/engine_cpu.py's round (the engine on the in-memory log, no gRPC, the ops metered as
the service meters them) under `valgrind --tool=callgrind` twice, side by side: once with `--warm`
runs and once with `--warm` + `--runs`. The difference in instructions, divided by `--runs`, is what
one run costs the engine, start-up and warm-up left out. CPU time on these shared machines moves
by 10-30% between rounds of the same code; this count moves by about 0.5%, so a change of 1-2%
shows in one pair of runs (`bench/ab.py --before DIR --rounds 1 -- bench/instructions.py`). It
counts instructions, not cache misses: a change that frees memory sooner (fewer objects left to
the cycle collector) saves more time than it shows here. Each child first runs 20 runs at 4 in
flight (imports, caches): the same in both, so they cancel out of the difference. The fan-out's
in-memory log lists a parent's children by scanning every stream it holds (as bench/engine_cpu.py
says): its count includes a cost a real store does not have, and is for A/Bs.

Under valgrind everything runs about fifty times slower, so the engine's timers would fire where
at full speed they never do (a run's 0.2 s linger outlasts it). The rounds here run with a 60 s
linger: at full speed, and here, every run ends before its linger does, as in the service.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys

from engine_cpu import one_round

LINGER = 60.0
COLLECTED = re.compile(r"Collected : (\d+)")


def counted(runs: int, scenario: str) -> subprocess.Popen[str]:
    """This script's child round under callgrind (started, not waited for)."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        str(runs),
        "--scenario",
        scenario,
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts in both children
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def instructions(child: subprocess.Popen[str]) -> int:
    """The instructions the child executed, from callgrind's summary."""
    _, err = child.communicate()
    found = COLLECTED.search(err)
    if child.returncode != 0 or found is None:
        raise SystemExit(f"instructions: the counted round failed (exit {child.returncode}):\n{err[-2000:]}")
    return int(found.group(1))


def child(runs: int, scenario: str) -> None:
    """A warm-up of 20 runs (imports, caches), then `runs` runs, 32 in flight (8 fan-out parents)."""
    concurrency = 8 if scenario == "fan-out" else 32
    asyncio.run(one_round(20, 4, scenario, checkpoint_linger=LINGER))
    if runs:
        asyncio.run(one_round(runs, concurrency, scenario, checkpoint_linger=LINGER))


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=["pipeline", "fan-out"], default="pipeline")
    parser.add_argument("--runs", type=int, default=0, help="runs counted (500) or fan-out parents (50)")
    parser.add_argument("--warm", type=int, default=0, help="runs before them (200) or parents (20)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.scenario)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("instructions: valgrind is not installed (apt-get install valgrind)")
    fan_out = args.scenario == "fan-out"
    runs = args.runs or (50 if fan_out else 500)
    warm = args.warm or (20 if fan_out else 200)
    small, large = counted(warm, args.scenario), counted(warm + runs, args.scenario)
    per_run = (instructions(large) - instructions(small)) / runs
    what = "fan-out parent (10 children)" if fan_out else "run"
    print(f"instructions: {args.scenario} in process, {runs} runs after {warm}, linger {LINGER:.0f} s")
    print(f"engine instructions per {what} (callgrind, in process): {per_run:,.0f}")
    print(f"RESULT scenario={args.scenario} instructions_per_run={per_run:.0f}")


if __name__ == "__main__":
    main()
