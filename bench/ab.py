"""Before/after in one run: a benchmark alternated between two source trees (issue 13).

Run: `.venv/bin/python bench/ab.py --before DIR [--rounds 3] -- bench/engine_runs.py --scenario pipeline`

`DIR` holds the "before" sources (for example `git archive <commit> | tar -x -C DIR`). Each round
runs the benchmark twice, once with `PYTHONPATH=DIR:DIR/clients/python` (the services and the
benchmark import the "before" code, the client package's included: the editable install's finder
comes after PYTHONPATH) and once without (this worktree's code), alternating which goes first. The
benchmark script itself is always this worktree's, so both sides print the same figures. It prints
every line the benchmark prints that holds a `x` ratio, `ms per call`, `CPU per`, `threads busy`,
`RPCs per`, `events/s`, `calls/s` or `RESULT`, tagged with its side and round.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

SHOWN = re.compile(r"(\d\.\d\dx|ms per call|CPU per|threads busy|RPCs per|RESULT|events/s|calls/s)")


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="a directory with the 'before' sources")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...]")
    args = parser.parse_args()
    command = [a for a in args.command if a != "--"]
    for round_index in range(args.rounds):
        sides = ["before", "after"] if round_index % 2 == 0 else ["after", "before"]
        for side in sides:
            env = dict(os.environ)
            if side == "before":
                # The client package's directory too: keel_core is one package in two directories
                # (the services' part and the client's, json_values among it).
                before = os.path.abspath(args.before)
                env["PYTHONPATH"] = os.pathsep.join([before, os.path.join(before, "clients", "python")])
            else:
                env.pop("PYTHONPATH", None)
            done = subprocess.run(
                [sys.executable, *command], env=env, capture_output=True, text=True, timeout=1800, check=False
            )
            if done.returncode != 0:
                raise SystemExit(f"{side} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
            for line in done.stdout.splitlines():
                if SHOWN.search(line):
                    print(f"round {round_index + 1} {side:6s} {line.strip()}", flush=True)


if __name__ == "__main__":
    main()
