"""Real services for the client tests: one store-service and one engine-service subprocess per session."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from keel_client.local_cluster import LocalCluster

KEEL = Path(sys.executable).parent / "keel"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A store and an engine on 127.0.0.1 (ports picked by the OS), stopped with SIGTERM at the end."""
    with LocalCluster(
        data_dir=tmp_path_factory.mktemp("keel-data"), store_listen="127.0.0.1:0", engine_listen="127.0.0.1:0"
    ) as running:
        yield running


@pytest.fixture(scope="session")
def engine_address(cluster: LocalCluster) -> str:
    """HOST:PORT of the session's engine."""
    return cluster.engine_address


@dataclass(frozen=True)
class CliResult:
    """What a `keel` invocation printed and how it exited."""

    code: int
    stdout: str
    stderr: str


def run_keel(*args: str, engine: str | None = None, timeout: float = 60) -> CliResult:
    """Run the installed `keel` console script with `args` (against `engine` when given)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEEL_")}
    if engine is not None:
        env["KEEL_ENGINE"] = engine
    done = subprocess.run(
        [str(KEEL), *args], capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


def pipeline(pipeline_id: str, *steps: dict[str, object]) -> dict[str, object]:
    """A pipeline dict shaped like the proto."""
    return {"pipeline_id": pipeline_id, "steps": list(steps)}


def step(
    step_id: str, op_id: str, op_config: object = None, depends_on: tuple[str, ...] = ()
) -> dict[str, object]:
    """A step dict shaped like the proto."""
    out: dict[str, object] = {"step_id": step_id, "op_id": op_id, "depends_on": list(depends_on)}
    if op_config is not None:
        out["op_config"] = op_config
    return out
