"""Instructions per pipeline run of the whole engine process, gRPC included, and per bare echo call.

Run: `.venv/bin/python bench/service_instructions.py [--runs N] [--calls N]` (needs `valgrind`)

`bench/instructions.py` counts the engine's own Python work on a run, in process. This counts what
the served engine executes for one: the `StartRun(wait=true)` call served, the run, its appends on
the store's open call, the answer, gRPC's poller thread; everything but the kernel's own work in
system calls. It runs an `engine-service` under `valgrind --tool=callgrind` (all threads), beside a
`store-service` and this client at full speed, completes 100 runs to warm it, zeroes the counters
(`callgrind_control -z`), completes `--runs` runs with 32 in flight, and reads the counters back
(`callgrind_control -d`). Then the same for `bench/echo_server.py` answering `--calls` calls of the
pipeline's StartRunRequest bytes, 32 in flight (after 320 calls to warm it). It prints both
figures and their ratio.

Under valgrind the engine runs about fifty times slower, while the store and the client do not:
runs then share more of each batch of appends than at full speed, so the count per run is likely
a little lower than at full speed, and it moves by about 2% between runs of the same
code with how the batches fall. The engine runs with a 60 s checkpoint linger for the reason
`bench/instructions.py` gives (a 0.2 s linger would fire inside runs that last fifty times longer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
from engine_runs import BIN, ECHO_METHOD, REPO, measure, pipeline, spawn
from keel.engine.v1 import engine_pb2, engine_pb2_grpc

from keel_core.json_values import to_value

TOTALS = re.compile(r"^totals: (\d+)$", re.MULTILINE)
CONCURRENCY = 32
STARTUP = 600  # seconds a process under valgrind is given to start


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no"]


def control(action: str, pid: int) -> None:
    subprocess.run(["callgrind_control", action, str(pid)], check=True, capture_output=True)


def counted(out: Path) -> int:
    """The instructions of the first dump (`callgrind_control -d`) since the counters were zeroed."""
    found = TOTALS.search(Path(f"{out}.1").read_text())
    if found is None:
        raise SystemExit(f"service_instructions: no totals in {out}.1")
    return int(found.group(1))


async def stop(*processes: asyncio.subprocess.Process) -> None:
    """SIGTERM each process still running, then wait for all of them."""
    for process in processes:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                process.send_signal(signal.SIGTERM)
    for process in processes:
        await process.wait()


async def engine_per_run(work: Path, runs: int) -> float:
    store_args = [str(BIN / "store-service"), "--listen", "127.0.0.1:0", "--log-level", "warning"]
    store, store_address = await spawn([*store_args, "--data-dir", str(work)], "store-service listening on")
    out = work / "engine.callgrind"
    engine_args = [str(BIN / "engine-service"), "--listen", "127.0.0.1:0", "--store", store_address]
    engine_args += ["--log-level", "warning", "--checkpoint-linger", "60"]
    try:
        engine, address = await spawn(callgrind(out) + engine_args, "engine-service listening on", STARTUP)
    except BaseException:
        await stop(store)
        raise
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stubs = [engine_pb2_grpc.EngineServiceStub(channel)]
            await measure(stubs, 100, CONCURRENCY)
            control("-z", engine.pid)
            await measure(stubs, runs, CONCURRENCY)
            control("-d", engine.pid)
    finally:
        await stop(engine, store)
    return counted(out) / runs


async def echo_per_call(work: Path, calls: int) -> float:
    out = work / "echo.callgrind"
    command = [sys.executable, str(REPO / "bench" / "echo_server.py"), "--listen", "127.0.0.1:0"]
    echo, address = await spawn(callgrind(out) + command, "echo listening on", STARTUP)
    request = engine_pb2.StartRunRequest(pipeline=pipeline(), input=to_value({"n": 1}), wait=True)
    each = calls // CONCURRENCY
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary(
                ECHO_METHOD,
                request_serializer=engine_pb2.StartRunRequest.SerializeToString,
                response_deserializer=engine_pb2.StartRunRequest.FromString,
            )

            async def caller(times: int) -> None:
                for _ in range(times):
                    await call(request, timeout=600)

            await asyncio.gather(*(caller(10) for _ in range(CONCURRENCY)))  # warm-up
            control("-z", echo.pid)
            await asyncio.gather(*(caller(each) for _ in range(CONCURRENCY)))
            control("-d", echo.pid)
    finally:
        await stop(echo)
    return counted(out) / (each * CONCURRENCY)


async def main_async(runs: int, calls: int) -> None:
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as work:
        per_run = await engine_per_run(Path(work), runs)
        per_call = await echo_per_call(Path(work), calls)
    counted = calls // CONCURRENCY * CONCURRENCY
    print(f"service instructions: {runs} pipeline runs and {counted} echo calls, {CONCURRENCY} in flight")
    print(f"engine instructions per pipeline run (callgrind, served, all threads): {per_run:,.0f}")
    print(f"echo server instructions per call: {per_call:,.0f}")
    print(f"engine per run vs echo per call: {per_run / per_call:.2f}x")
    print(f"RESULT engine_instructions_per_run={per_run:.0f} echo_instructions_per_call={per_call:.0f}")


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=320, help="pipeline runs counted (320)")
    parser.add_argument("--calls", type=int, default=640, help="echo calls counted (640)")
    args = parser.parse_args()
    if args.runs < 1 or args.calls < CONCURRENCY:
        parser.error(f"--runs must be at least 1 and --calls at least {CONCURRENCY}")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("service_instructions: valgrind is not installed (apt-get install valgrind)")
    asyncio.run(main_async(args.runs, args.calls))


if __name__ == "__main__":
    main()
