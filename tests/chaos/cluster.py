"""The chaos test's processes: store replicas and engines that can be SIGKILLed (and restarted) and
SIGSTOPped (and continued), each fault recorded with the pid it hit and its monotonic times.

A store restarts on its own port (the engines know stores by address); an engine restarts on a new
port under a new engine id (`<name>.<incarnation>`, as a fresh process would get by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.chaos_ops import LEDGER_ENV, append_line
from tests.chaos.ledger import Fault

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
CHAOS_OPS = str(Path(__file__).with_name("chaos_ops.py"))
# A bound on one process's start (its banner), not a timing claim.
START_PATIENCE = 60.0


@dataclass
class Service:
    """One store or engine; `args(incarnation, port)` is its command line."""

    name: str
    role: str
    args: Callable[[int, int], list[str]]
    env: dict[str, str]
    log_path: Path
    incarnation: int = 0
    port: int = 0
    process: asyncio.subprocess.Process | None = None
    address: str = ""
    pids: dict[int, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The running process's pid."""
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        """Start a new incarnation and wait for its banner (a store keeps its first port)."""
        self.incarnation += 1
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}, **self.env}
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230
            self.process = await asyncio.create_subprocess_exec(
                *self.args(self.incarnation, self.port),
                cwd=REPO,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        assert self.process.stdout is not None
        try:
            line = (await asyncio.wait_for(self.process.stdout.readline(), START_PATIENCE)).decode()
        except BaseException:
            await self.kill()
            raise
        if " listening on " not in line:
            await self.kill()
            raise RuntimeError(f"{self.name} did not start: {line!r} (log: {self.log_path})")
        self.address = line.rsplit(" ", 1)[1].strip()
        if self.role == "store":
            self.port = int(self.address.rsplit(":", 1)[1])
        self.pids[self.pid] = f"{self.name}.{self.incarnation}"

    async def kill(self) -> None:
        """SIGKILL the process (continuing it first is not needed: SIGKILL ends a stopped one too)."""
        if self.process is None:
            return
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    def signal(self, number: int) -> None:
        """Send a signal to the running process."""
        assert self.process is not None
        self.process.send_signal(number)


class Cluster:
    """The stores and engines of one chaos run, and the faults done to them."""

    def __init__(self, workdir: Path, ledger: str, lease_ttl: float) -> None:
        self.workdir = workdir
        self.ledger = ledger
        self.lease_ttl = lease_ttl
        self.stores: list[Service] = []
        self.engines: list[Service] = []
        self.faults: list[Fault] = []
        # When the chaos began (monotonic, and wall for the services' logs): reports count from it.
        self.t0 = time.monotonic()
        self.t0_wall = time.time()

    @property
    def services(self) -> list[Service]:
        """Stores and engines."""
        return [*self.stores, *self.engines]

    def add_sqlite_store(self) -> None:
        """One SQLite store-service over a data directory of its own."""
        data_dir = self.workdir / "store-data"
        data_dir.mkdir(exist_ok=True)

        def args(incarnation: int, port: int) -> list[str]:
            return [str(BIN / "store-service"), "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir)]

        self._add_store("store-0", args)

    def add_postgres_store(self, dsn: str, schema: str) -> None:
        """One more store-service replica on the PostgreSQL schema."""

        def args(incarnation: int, port: int) -> list[str]:
            return [
                *(str(BIN / "store-service"), "--listen", f"127.0.0.1:{port}"),
                *("--backend", "postgres", "--dsn", dsn, "--pg-schema", schema),
            ]

        self._add_store(f"store-{len(self.stores)}", args)

    def _add_store(self, name: str, args: Callable[[int, int], list[str]]) -> None:
        self.stores.append(Service(name, "store", args, {}, self.workdir / f"{name}.log"))

    def add_engine(self) -> None:
        """One engine-service with the chaos ops, on every store (started before it)."""
        name = f"engine-{'ab'[len(self.engines)]}"

        def args(incarnation: int, port: int) -> list[str]:
            stores = ",".join(store.address for store in self.stores)
            return [
                *(str(BIN / "engine-service"), "--listen", "127.0.0.1:0", "--store", stores),
                *("--ops", CHAOS_OPS, "--engine-id", f"{name}.{incarnation}"),
                *("--lease-ttl", str(self.lease_ttl)),
            ]

        env = {LEDGER_ENV: self.ledger}
        self.engines.append(Service(name, "engine", args, env, self.workdir / f"{name}.log"))

    def name_of(self, pid: int) -> str:
        """`<service>.<incarnation>` of a pid this cluster started ('?' for any other)."""
        for service in self.services:
            if pid in service.pids:
                return service.pids[pid]
        return f"pid {pid}?"

    async def kill_and_restart(self, service: Service, down: float) -> None:
        """SIGKILL `service`, leave it down `down` seconds, start it again; record the fault."""
        pid, start = service.pid, time.monotonic()
        await service.kill()
        await asyncio.sleep(down)
        await service.start()
        self._record(Fault("kill", service.role, service.pids[pid], pid, start, time.monotonic()))

    async def pause(self, service: Service, length: float) -> None:
        """SIGSTOP `service` for `length` seconds, then SIGCONT it; record the fault."""
        pid, start = service.pid, time.monotonic()
        service.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(length)
        finally:
            service.signal(signal.SIGCONT)
            self._record(Fault("pause", service.role, service.pids[pid], pid, start, time.monotonic()))

    def _record(self, fault: Fault) -> None:
        # Also on file (faults.jsonl, beside the ledger), for reading a run again after it ended.
        self.faults.append(fault)
        append_line(str(self.workdir / "faults.jsonl"), json.dumps(dataclasses.asdict(fault)))

    async def heal(self) -> None:
        """Every service running (and continued): a dead one is started again."""
        for service in self.services:
            if service.alive:
                service.signal(signal.SIGCONT)
            else:
                await service.start()

    async def close(self) -> None:
        """SIGKILL every process."""
        for service in self.services:
            await service.kill()
