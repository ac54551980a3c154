"""The Node.js client (clients/node) against a real engine and store: `node --test` with KEEL_ENGINE set.

Needs `node` on PATH and `npm ci` run in clients/node. Without them the test is skipped loudly on a
developer machine and fails in CI (CI=true), where both must be present.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _node_or_skip() -> str:
    node = shutil.which("node")
    problem = None
    if node is None:
        problem = "`node` is not on PATH (install Node.js 18 or newer)"
    elif not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        problem = f"{NODE_CLIENT}/node_modules is missing (run `npm ci` in clients/node)"
    if problem is not None:
        if IN_CI:
            pytest.fail(f"the Node client test must run in CI, but {problem}", pytrace=False)
        pytest.skip(f"SKIPPED NODE CLIENT TEST: {problem}")
    assert node is not None
    return node


def test_node_client_starts_watches_and_awaits_a_run(engine_address: str) -> None:
    node = _node_or_skip()
    env = {**os.environ, "KEEL_ENGINE": engine_address}
    done = subprocess.run(
        [node, "--test", "--test-reporter=tap"],
        cwd=NODE_CLIENT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, f"node --test failed:\n{report}"
    # Every test ran: none was skipped for want of an engine.
    summary = [line for line in report.splitlines() if line.startswith("# ")]
    assert "# skipped 0" in summary and "# fail 0" in summary, report
    assert "# pass 0" not in summary, report


def test_node_example_runs_against_the_engine(engine_address: str) -> None:
    node = _node_or_skip()
    done = subprocess.run(
        [node, "example.js"],
        cwd=NODE_CLIENT,
        env={**os.environ, "KEEL_ENGINE": engine_address},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "RunCompleted" in done.stdout
    assert " completed" in done.stdout
