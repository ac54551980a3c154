"""keel_core.launcher: a service started by `keel up` arms its own death signal; the launcher never forks."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from keel_client.local_cluster import LocalCluster

from keel_core.launcher import LAUNCHER_PID_ENV, launcher_env, stop_with_launcher

# A process that ties itself to its launcher, then waits to be stopped.
TIED = (
    "import time; from keel_core.launcher import stop_with_launcher; "
    "stop_with_launcher(); print('armed', flush=True); time.sleep(120)"
)
# A tied process that answers each line it reads with "alive".
ANSWERING = (
    "import sys; from keel_core.launcher import stop_with_launcher; "
    "stop_with_launcher(); print('armed', flush=True)\n"
    "for _ in sys.stdin: print('alive', flush=True)"
)
# A launcher that starts TIED, prints its pid once it is armed, then waits to be killed.
LAUNCHING = (
    "import subprocess, sys, time; from keel_core.launcher import launcher_env; "
    f"tied = subprocess.Popen([sys.executable, '-c', {TIED!r}], env={{**__import__('os').environ, "
    "**launcher_env()}, stdout=subprocess.PIPE, text=True); "
    "assert tied.stdout.readline() == 'armed\\n'; print(tied.pid, flush=True); time.sleep(120)"
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


@pytest.mark.skipif(sys.platform != "linux", reason="the launcher is watched on Linux only")
def test_a_service_whose_launcher_died_before_it_armed_stops_at_once() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # a launcher that is no longer this process's parent
    tied = subprocess.run(
        [sys.executable, "-c", TIED], env={**os.environ, LAUNCHER_PID_ENV: str(gone.pid)}, timeout=60
    )
    assert tied.returncode == -signal.SIGTERM


@pytest.mark.skipif(sys.platform != "linux", reason="the launcher is watched on Linux only")
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


@pytest.mark.skipif(sys.platform != "linux", reason="the launcher is watched on Linux only")
def test_a_service_started_from_a_thread_that_ended_keeps_running() -> None:
    started: list[subprocess.Popen[str]] = []
    thread_ids: list[int] = []

    def start() -> None:
        thread_ids.append(threading.get_native_id())
        tied = subprocess.Popen(
            [sys.executable, "-c", ANSWERING],
            env={**os.environ, **launcher_env()},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(tied)
        assert tied.stdout is not None
        assert tied.stdout.readline() == "armed\n"

    starter = threading.Thread(target=start)
    starter.start()
    starter.join()
    [tied] = started
    try:
        while os.path.exists(f"/proc/self/task/{thread_ids[0]}"):
            time.sleep(0.01)  # until the starting thread is gone from the kernel too
        assert tied.stdin is not None and tied.stdout is not None
        tied.stdin.write("still there?\n")
        tied.stdin.flush()
        assert tied.stdout.readline() == "alive\n"  # its launcher process lives: no signal
    finally:
        tied.kill()
        tied.wait(timeout=60)


@pytest.mark.skipif(sys.platform != "linux", reason="the launcher is watched on Linux only")
def test_a_service_stops_when_its_launcher_is_killed() -> None:
    launching = subprocess.Popen([sys.executable, "-c", LAUNCHING], stdout=subprocess.PIPE, text=True)
    assert launching.stdout is not None
    tied = int(launching.stdout.readline())
    watched = os.pidfd_open(tied)
    try:
        launching.kill()
        launching.wait(timeout=60)
        readable, _, _ = select.select([watched], [], [], 60)
        assert readable == [watched]  # the tied service exited once its launcher was gone
    finally:
        os.close(watched)
