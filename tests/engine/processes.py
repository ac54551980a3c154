"""Store and engine subprocesses for the engine's integration tests (real processes, real gRPC)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CRASH_OPS = str(Path(__file__).with_name("crash_ops.py"))


@dataclass
class ServiceProcess:
    """A started service subprocess and the address it announced."""

    process: asyncio.subprocess.Process
    address: str

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.address.rsplit(":", 1)[1])

    async def kill(self) -> None:
        """SIGKILL it and reap it."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def terminate(self, patience: float = 15.0) -> int:
        """SIGTERM it and wait for its exit code (SIGKILL if it hangs)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), patience)
        except TimeoutError:
            await self.kill()
            raise


async def _spawn(
    args: list[str], banner: str, env: dict[str, str] | None, stderr_path: str = ""
) -> ServiceProcess:
    full_env = {**os.environ, **(env or {})}
    with contextlib.ExitStack() as files:
        stderr: int | IO[bytes] = asyncio.subprocess.DEVNULL
        if stderr_path:
            stderr = files.enter_context(open(stderr_path, "ab"))  # noqa: ASYNC230
        process = await asyncio.create_subprocess_exec(
            *args, cwd=REPO, env=full_env, stdout=asyncio.subprocess.PIPE, stderr=stderr
        )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    if not line.startswith(banner):
        process.kill()
        await process.wait()
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return ServiceProcess(process, line.removeprefix(banner).strip())


async def start_store_process(
    data_dir: Path, port: int = 0, *, allow_deletes: bool = False, extra_args: tuple[str, ...] = ()
) -> ServiceProcess:
    """`store-service` on 127.0.0.1 (port 0: any free port) over `data_dir`."""
    args = [str(BIN / "store-service"), "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
    if allow_deletes:
        args.append("--allow-deletes")
    return await _spawn([*args, *extra_args], "store-service listening on", None)


async def start_postgres_store_process(
    dsn: str, schema: str, *, allow_deletes: bool = False
) -> ServiceProcess:
    """`store-service --backend postgres` on 127.0.0.1:0, in `schema` (replicas share one schema)."""
    args = [
        str(BIN / "store-service"),
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "postgres",
        "--dsn",
        dsn,
        "--pg-schema",
        schema,
        *(["--allow-deletes"] if allow_deletes else []),
    ]
    return await _spawn(args, "store-service listening on", None)


async def start_engine_process(
    store: str,
    *,
    failpoints: str = "",
    io_log: str = "",
    ops: tuple[str, ...] = (CRASH_OPS,),
    checkpoint_linger: float = 0.2,
    engine_id: str = "",
    lease_ttl: float = 1.0,
    gate: str = "",
    log_path: str = "",
    extra_args: tuple[str, ...] = (),
) -> ServiceProcess:
    """`engine-service` on 127.0.0.1:0 with the test ops, failpoints and counting-transport log.

    `store` may name several store addresses (comma-separated); `log_path` keeps its JSON log lines.
    """
    env = {
        "KEEL_FAILPOINTS": failpoints,
        "KEEL_TEST_IO_LOG": io_log,
        "KEEL_ENGINE_CHECKPOINT_LINGER": str(checkpoint_linger),
        "KEEL_TEST_GATE": gate,
    }
    if engine_id:
        env["KEEL_ENGINE_ID"] = engine_id
    # Short: a SIGKILLed engine's runs wait this long (and a scan) before another engine takes them.
    env["KEEL_ENGINE_LEASE_TTL"] = str(lease_ttl)
    args = [
        str(BIN / "engine-service"),
        "--listen",
        "127.0.0.1:0",
        "--store",
        store,
        *extra_args,
        "--ops",
        *ops,
    ]
    return await _spawn(args, "engine-service listening on", env, log_path)


async def eventually(check: Callable[[], object], what: str, *, within: float, poll: float) -> None:
    """Wait until `check()` (sync or async) is truthy; `within` bounds the wait, it is no timing claim."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(poll)
