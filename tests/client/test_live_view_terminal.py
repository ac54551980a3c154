"""`keel run --wait` in a real terminal (tmux) shorter than its live view: the view never stacks copies.

A live view redrawn in place can only climb back over lines still on the screen; a view taller than
the terminal used to leave one copy of itself in the scrollback per redraw. tmux is a real terminal
emulator with a scrollback, so what it holds at the end is what a person would scroll back through.
"""

from __future__ import annotations

import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.client.conftest import KEEL, pipeline, step

CHILDREN = 14  # with 3 steps, a header and column titles: 19 lines in a 10-line terminal
HANG_SECONDS = 120  # only to end a hung run of the test; the run itself takes about a second


@pytest.fixture
def tmux() -> Iterator[list[str]]:
    """The tmux command on a server of this test's own (its own socket), killed at the end."""
    command = ["tmux", "-L", f"keel-test-{uuid.uuid4().hex[:12]}", "-f", "/dev/null"]
    yield command
    subprocess.run([*command, "kill-server"], capture_output=True, check=False)


def _screen_and_scrollback(tmux: list[str]) -> list[str]:
    done = subprocess.run(
        [*tmux, "capture-pane", "-p", "-S", "-", "-E", "-", "-t", "keel"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


def test_a_live_view_taller_than_the_terminal_appears_once(
    engine_address: str, tmp_path: Path, tmux: list[str]
) -> None:
    path = tmp_path / "tall.yaml"
    fan_out = {"op_id": "keel.sleep", "op_config": {"seconds": 1}, "count": CHILDREN}
    tall = pipeline(
        "tall-fan-out",
        step("fetch", "keel.echo"),
        step("pack", "keel.fan_out", fan_out, ("fetch",)),
        step("done", "keel.echo", None, ("pack",)),
    )
    path.write_text(yaml.safe_dump({"pipeline": tall}))
    # LINES as a shell exports it and then forgets: stale, taller than the terminal. The view must
    # go by the terminal's own size.
    stale = ["LINES=24", "COLUMNS=80"]
    keel = shlex.join(["env", f"KEEL_ENGINE={engine_address}", *stale, str(KEEL), "run", str(path), "--wait"])
    subprocess.run(
        [
            *tmux,
            "new-session",
            "-d",
            "-s",
            "keel",
            "-x",
            "80",
            "-y",
            "10",
            f"{keel}; echo EXIT=$?; sleep 600",
        ],
        check=True,
    )
    deadline = time.monotonic() + HANG_SECONDS
    lines = _screen_and_scrollback(tmux)
    while not any(line.startswith("EXIT=") for line in lines) and time.monotonic() < deadline:
        time.sleep(0.2)
        lines = _screen_and_scrollback(tmux)
    assert "EXIT=0" in lines, "\n".join(lines)

    run_id = next(line.split()[-1] for line in lines if line.startswith("started run "))
    headers = [line for line in lines if line.startswith(f"run {run_id}  tall-fan-out  ")]
    assert len(headers) == 1, "\n".join(lines)
    assert headers[0].split()[3] == "completed"
    assert sum(line.split() == ["OP", "STATUS", "ATTEMPT", "ELAPSED"] for line in lines) == 1
    # The final picture is whole, children in natural order, each row once.
    rows = [line.split() for line in lines if line.startswith(("  step ", "  child "))]
    assert [row[1] for row in rows] == [
        "fetch", "pack", "done", *(f"pack.child.{n}" for n in range(CHILDREN))
    ]  # fmt: skip
    assert all(row[-3] == "completed" for row in rows)
    assert not any("more rows" in line for line in lines)
    assert f"run {run_id} completed in " in "\n".join(lines)
