"""A real `store-service` subprocess for end-to-end tests: started, its address parsed, stopped."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

LISTENING = re.compile(r"^store-service listening on (\S+):(\d+)$")


def store_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m store_service`."""
    script = Path(sys.executable).parent / "store-service"
    return [str(script)] if script.exists() else [sys.executable, "-m", "store_service"]


class StoreProcess:
    """One store-service process listening on 127.0.0.1 with a random port."""

    def __init__(self, data_dir: Path, *extra: str, timeout: float = 20.0) -> None:
        self.data_dir = data_dir
        # stderr goes to a file: a pipe nobody reads could fill up and stall the store.
        self.log_path = data_dir.with_name(f"{data_dir.name}-{time.monotonic_ns()}.log")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*store_command(), "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), *extra],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.port = self._await_listening(timeout)
        self.address = f"127.0.0.1:{self.port}"

    def _await_listening(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if selector.select(timeout=0.2):
                    line = self.proc.stdout.readline().decode().strip()
                    match = LISTENING.match(line)
                    if match:
                        return int(match.group(2))
                    if not line and self.proc.poll() is not None:
                        break
            self.kill()
            raise RuntimeError(f"store-service did not announce its address: {self.stderr_text()}")
        finally:
            selector.close()

    def stderr_text(self) -> str:
        """Whatever the process has written to stderr so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no drain, no close; only what was durable survives."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the drain; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Make sure the process is gone and its pipes are closed."""
        if self.proc.poll() is None:
            self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
