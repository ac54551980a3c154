"""Runs waiting for signals: the engine's memory and CPU while N runs wait, and the delay from a
signal's acknowledgement to the completion of the step that waited for it.

Run: `.venv/bin/python bench/signal_waits.py [--runs N] [--idle-seconds T] [--concurrency C]`

A `store-service` (SQLite) and an `engine-service` run as subprocesses; this process is the
client. First the engine's resident memory (VmRSS) is read with no run; then N runs of
`keel.wait_signal` start, and once GetRun shows every one waiting, RSS is read again and the
engine's CPU time (utime + stime from /proc) is measured over T idle seconds. Then one signal per
run is sent, C at a time; for each, the delay is from SignalRun's answer (this process's clock) to
the step's completion as the engine recorded it (the attempt's `finished_at`, the same machine's
clock). The same-run reference: the latency of a one-step `keel.echo` run started with
`wait=true`, the engine's shortest round trip through the store.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from engine_runs import spawn
from keel.engine.v1 import engine_pb2, engine_pb2_grpc

from keel_core.json_values import to_value

BIN = Path(sys.executable).parent
TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """The process's resident set size in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def percentile(values: list[float], fraction: float) -> float:
    """The value at `fraction` of the sorted values (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def main() -> None:
    """Start the services, park N runs on signals, measure, signal them, print, stop."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000, help="runs waiting for a signal (default 1000)")
    parser.add_argument(
        "--idle-seconds", type=float, default=10.0, help="CPU window while they wait (default 10)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="signals in flight (default 16)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as data:
        processes: list[asyncio.subprocess.Process] = []
        channel: grpc.aio.Channel | None = None
        try:
            store_args = [str(BIN / "store-service"), "--listen", "127.0.0.1:0", "--data-dir", data]
            store_process, store_address = await spawn(
                [*store_args, "--log-level", "warning"], "store-service listening on"
            )
            processes.append(store_process)
            engine_args = [str(BIN / "engine-service"), "--listen", "127.0.0.1:0", "--store", store_address]
            engine_process, engine_address = await spawn(
                [*engine_args, "--log-level", "warning"], "engine-service listening on"
            )
            processes.append(engine_process)
            channel = grpc.aio.insecure_channel(engine_address)
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            echo = engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"), wait=True)
            echo_ms = []
            for _ in range(200):
                began = time.perf_counter()
                await stub.StartRun(echo, timeout=60)
                echo_ms.append((time.perf_counter() - began) * 1000)
            pid = engine_process.pid
            rss_before = rss_kib(pid)

            wait = engine_pb2.SingleOp(op_id="keel.wait_signal", op_config=to_value({"name": "go"}))
            limit = asyncio.Semaphore(32)

            async def start() -> str:
                async with limit:
                    started = await stub.StartRun(engine_pb2.StartRunRequest(op=wait), timeout=60)
                    while True:
                        run = (
                            await stub.GetRun(engine_pb2.GetRunRequest(run_id=started.run_id), timeout=60)
                        ).run
                        if run.steps[0].HasField("waiting_for_signal"):
                            return started.run_id
                        await asyncio.sleep(0.05)

            began = time.monotonic()
            run_ids = await asyncio.gather(*(start() for _ in range(args.runs)))
            parked_in = time.monotonic() - began
            await asyncio.sleep(2.0)  # let upkeep that follows a start (lease records) settle
            rss_waiting = rss_kib(pid)
            cpu_before = cpu_seconds(pid)
            await asyncio.sleep(args.idle_seconds)
            idle_cpu = (cpu_seconds(pid) - cpu_before) / args.idle_seconds

            delays_ms: list[float] = []
            sending = asyncio.Semaphore(args.concurrency)

            async def wake(run_id: str) -> None:
                async with sending:
                    await stub.SignalRun(
                        engine_pb2.SignalRunRequest(run_id=run_id, name="go", payload=to_value(1)), timeout=60
                    )
                    acknowledged = time.time()
                awaited = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=120)
                if awaited.run.status != engine_pb2.RUN_STATUS_COMPLETED:
                    raise RuntimeError(f"run {run_id} ended {awaited.run.status}")
                finished = awaited.run.steps[0].attempts[-1].finished_at.ToNanoseconds() / 1e9
                delays_ms.append((finished - acknowledged) * 1000)

            began = time.monotonic()
            await asyncio.gather(*(wake(run_id) for run_id in run_ids))
            woken_in = time.monotonic() - began
        finally:
            if channel is not None:
                await channel.close(None)
            for process in processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                await process.wait()
    echo_p50 = statistics.median(echo_ms)
    p50, p99 = percentile(delays_ms, 0.5), percentile(delays_ms, 0.99)
    per_run = (rss_waiting - rss_before) / args.runs
    print(f"signal_waits: {args.runs} runs waiting for a signal on one engine (SQLite store)")
    print(
        f"  all waiting after {parked_in:.1f}s; engine RSS {rss_before / 1024:.1f} MiB idle -> "
        f"{rss_waiting / 1024:.1f} MiB waiting = {per_run:.1f} KiB per waiting run"
    )
    print(f"  engine CPU while they wait: {idle_cpu * 100:.1f}% of one core over {args.idle_seconds:g}s")
    print(
        f"  signal acknowledged -> step completed: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
        f"({args.runs} signals, {args.concurrency} in flight, {woken_in:.1f}s in all)"
    )
    print(
        f"  same run: keel.echo run with wait=true p50 {echo_p50:.1f} ms; "
        f"wake-up p50 / echo p50 = {p50 / echo_p50:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
