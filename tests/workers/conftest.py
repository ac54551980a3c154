"""Worker subprocesses for the worker tests (store and engine subprocesses: tests.engine.processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from keel_client import AsyncKeelClient, Run

from engine_service import EngineConfig, start_engine
from store_service.server import StoreConfig, start_store
from tests.engine.processes import REPO

WORKER_SCRIPT = str(Path(__file__).with_name("worker_process.py"))


@dataclass
class WorkerProcess:
    """A worker subprocess, its ledger and its stderr log."""

    process: asyncio.subprocess.Process
    ledger: Path
    log: Path
    worker_id: str

    def signal(self, signum: int) -> None:
        """Send it `signum`."""
        if self.process.returncode is None:
            self.process.send_signal(signum)

    async def stop(self) -> None:
        """SIGKILL and reap it (resuming it first if stopped)."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        await self.process.wait()

    def log_text(self) -> str:
        """What it logged."""
        return self.log.read_text() if self.log.exists() else ""


def ledger_lines(ledger: Path, kind: str) -> list[str]:
    """The ledger's lines of one kind (`start`, `pay`, `paid`, `done`)."""
    if not ledger.exists():
        return []
    return [line for line in ledger.read_text().splitlines() if line.split(" ", 1)[0] == kind]


class Workers:
    """Starts worker subprocesses sharing one ledger; kills them at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.ledger = tmp_path / "ledger.txt"
        self.started: list[WorkerProcess] = []

    async def start(
        self, engine: str, queue: str, worker_id: str, *, shutdown_grace: float | None = None
    ) -> WorkerProcess:
        """A worker of `queue` polling `engine`, once it is about to poll (`shutdown_grace`: its
        grace on SIGTERM, else worker_process.py's)."""
        log = self.tmp_path / f"{worker_id}.log"
        env = dict(os.environ)
        if shutdown_grace is not None:
            env["KEEL_TEST_SHUTDOWN_GRACE"] = str(shutdown_grace)
        with open(log, "ab") as err:  # noqa: ASYNC230
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                WORKER_SCRIPT,
                engine,
                queue,
                str(self.ledger),
                worker_id,
                cwd=REPO,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        assert line == "worker ready", line
        worker = WorkerProcess(process, self.ledger, log, worker_id)
        self.started.append(worker)
        return worker


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[Workers]:
    """Worker subprocesses, SIGKILLed after the test."""
    made = Workers(tmp_path)
    try:
        yield made
    finally:
        for worker in made.started:
            await worker.stop()


async def finished(client: AsyncKeelClient, run_id: str, within: float = 60.0) -> Run:
    """The run once terminal (`within` bounds the wait; it is no timing claim)."""
    awaited = await client.await_run(run_id, max_wait=within)
    assert awaited.done and awaited.run is not None, f"run {run_id} did not finish"
    return awaited.run


@dataclass(frozen=True)
class Stack:
    """A store and an engine in this process (real gRPC servers on 127.0.0.1:0, SQLite in tmp_path)."""

    engine: str
    store: str


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """A store and an engine, drained after the test."""
    store = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store")))
    engine = await start_engine(
        EngineConfig(listen="127.0.0.1:0", store=f"127.0.0.1:{store.port}", failpoints="")
    )
    try:
        yield Stack(f"127.0.0.1:{engine.port}", f"127.0.0.1:{store.port}")
    finally:
        await engine.drain(0.5)
        await store.drain(0.5)
