"""Store and engine subprocesses for the operability tests: started from their console scripts."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

BIN = Path(sys.executable).parent


@contextlib.contextmanager
def running_service(
    args: list[str], env: dict[str, str], banner: str, *, stderr: IO[bytes] | None = None
) -> Iterator[str]:
    """A service subprocess (KEEL_* taken from `env` only); yields the address its banner names.

    It is stopped with SIGTERM (SIGKILL if it does not exit within 15 s) when the block ends.
    """
    process = subprocess.Popen(
        args,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}, **env},
        stdout=subprocess.PIPE,
        stderr=stderr if stderr is not None else subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
        assert line.startswith(banner), f"{args[0]} did not start: {line!r}"
        yield line.removeprefix(banner).strip()
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
