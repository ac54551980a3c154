"""keel_core.launcher: a service started by `keel up` arms its own death signal; the launcher never forks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from keel_client.local_cluster import LocalCluster

from keel_core.launcher import LAUNCHER_PID_ENV, launcher_env, stop_with_launcher

# A process that ties itself to its launcher, then waits to be stopped.
TIED = (
    "import time; from keel_core.launcher import stop_with_launcher; "
    "stop_with_launcher(); print('armed', flush=True); time.sleep(120)"
)


def test_without_the_variable_nothing_is_armed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LAUNCHER_PID_ENV, raising=False)
    stop_with_launcher()  # no prctl, no signal: the test process goes on


def test_a_variable_that_is_not_a_process_id_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LAUNCHER_PID_ENV, "keel-up")
    with pytest.raises(
        ValueError, match=f"{LAUNCHER_PID_ENV} must be the launcher's process id, not 'keel-up'"
    ):
        stop_with_launcher()


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_service_whose_launcher_died_before_it_armed_stops_at_once() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # a launcher that is no longer this process's parent
    tied = subprocess.run(
        [sys.executable, "-c", TIED], env={**os.environ, LAUNCHER_PID_ENV: str(gone.pid)}, timeout=60
    )
    assert tied.returncode == -signal.SIGTERM


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_service_started_by_this_process_keeps_running_until_stopped() -> None:
    tied = subprocess.Popen(
        [sys.executable, "-c", TIED], env={**os.environ, **launcher_env()}, stdout=subprocess.PIPE, text=True
    )
    try:
        assert tied.stdout is not None
        assert tied.stdout.readline() == "armed\n"
        assert tied.poll() is None  # its launcher (this process) is alive: no signal
    finally:
        tied.terminate()
        tied.wait(timeout=60)


def test_local_cluster_starts_its_services_without_forking_this_process(tmp_path: Path) -> None:
    # subprocess runs Python's fork hooks only for a preexec_fn, which is also what makes it fork()
    # instead of vfork(): a fork() here runs gRPC's fork handlers, which abort the child before its
    # exec now and then, or hang this process (keel_core.launcher).
    forks: list[int] = []
    os.register_at_fork(before=lambda: forks.append(os.getpid()))
    with LocalCluster(data_dir=tmp_path, store_listen="127.0.0.1:0", engine_listen="127.0.0.1:0") as cluster:
        assert cluster.engine_address
    assert forks == []
