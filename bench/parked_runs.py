"""Parked runs: what N runs waiting on durable timers cost an engine, and how late they wake.

Run: `.venv/bin/python bench/parked_runs.py [--runs N] [--seconds S] [--window W] [--warmup K]`

A `store-service` (SQLite) and one `engine-service` run as subprocesses; this process is the
client. First K warm-up runs of the same pipeline (a 0 s `keel.sleep`, then `keel.echo`) complete,
so the engine's imports, caches and allocator are warm; its RSS is read then (the baseline). Then
N runs of `keel.sleep` for S seconds start (each parks: StepWaiting, then RunParked with the
store's due-time index entry). Once all N are parked (listed with the store's `parked` label), the
engine's RSS and CPU time (utime + stime, from /proc) are read, again W seconds later: the RSS
growth per parked run, and the CPU the engine spent per second while N runs wait.

Then every run fires. Each run's delay is read from its stream: the StepCompleted of its sleep
step (`at_us`, when the engine decided it) minus its StepWaiting's recorded fire time
(`until_us`). p50 / p99 / max are printed, with the aims of issue 15 beside them (RSS < 2 KiB per
parked run, idle CPU near 0, wake-up p99 < 100 ms). Runs all start within a short span, so they
fall due in a burst of about that span: the delay includes waiting behind the burst.

Where the cost goes: the store runs with `--metrics-listen`, and its per-method RPC counters
(`keel_rpc_started`) are read before the runs start, once they are all parked, after the idle
window and once they all completed: the store calls per run of parking, of waiting (the Waker's
ListDue polls) and of waking and finishing, by method.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from engine_runs import spawn
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from keel_core.json_values import to_value

if TYPE_CHECKING:
    from keel.engine.v1.engine_pb2_grpc import EngineServiceAsyncStub
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

BIN = Path(sys.executable).parent
CLOCK_TICKS = 100  # os.sysconf("SC_CLK_TCK") on Linux


def rss_kib(pid: int) -> int:
    """The process's resident set size in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def store_calls(metrics_url: str) -> Counter[str]:
    """The store's RPCs so far, by method (its keel_rpc_started counters)."""
    calls: Counter[str] = Counter()
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("keel_rpc_started_total{") and "StoreService" in line:
                labels, value = line.rsplit(" ", 1)
                method = labels.split('method="', 1)[1].split('"', 1)[0]
                calls[method] += int(float(value))
    return calls


def per_run(before: Counter[str], after: Counter[str], runs: int) -> str:
    """Store calls between two readings, per run, by method (most first)."""
    diff = after - before
    return ", ".join(f"{method} {count / runs:.2f}" for method, count in diff.most_common()) or "none"


def sleep_pipeline(seconds: float) -> engine_pb2.Pipeline:
    """A durable sleep, then an echo."""
    return engine_pb2.Pipeline(
        pipeline_id="parked",
        steps=[
            engine_pb2.Step(step_id="nap", op_id="keel.sleep", op_config=to_value({"seconds": seconds})),
            engine_pb2.Step(step_id="after", op_id="keel.echo", depends_on=["nap"]),
        ],
    )


async def count(store: StoreServiceAsyncStub, status: int) -> int:
    """How many run streams carry the label `status`."""
    total, token = 0, ""
    while True:
        page = await store.ListStreams(
            store_pb2.ListStreamsRequest(prefix="run:", statuses=[status], page_size=1000, page_token=token)  # type: ignore[list-item]
        )
        total += len(page.streams)
        token = page.next_page_token
        if not token:
            return total


async def start_all(stub: EngineServiceAsyncStub, runs: int, seconds: float) -> list[str]:
    """Start `runs` runs of the sleep pipeline (32 at a time); their ids."""
    limit = asyncio.Semaphore(32)
    request = engine_pb2.StartRunRequest(pipeline=sleep_pipeline(seconds))

    async def start() -> str:
        async with limit:
            return str((await stub.StartRun(request, timeout=120)).run_id)

    return list(await asyncio.gather(*(start() for _ in range(runs))))


async def delays_ms(store: StoreServiceAsyncStub, run_id: str) -> tuple[float, float]:
    """The run's sleep step: when its StepCompleted was decided (`at_us`) and committed (the store's
    time), each minus the recorded fire time, in ms."""
    page = await store.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run_id}"))
    until = decided = committed = 0
    for event in page.events:
        data = json.loads(event.payload)
        if event.type == "StepWaiting" and data["step_id"] == "nap":
            until = data["wait"]["until_us"]
        if event.type == "StepCompleted" and data["step_id"] == "nap":
            decided, committed = data["at_us"], event.recorded_at.ToMicroseconds()
    if not until or not decided:
        raise RuntimeError(f"run {run_id} did not record a fired timer")
    return (decided - until) / 1000, (committed - until) / 1000


async def main() -> None:
    """Start the services, park N runs, measure, let them fire, print."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000, help="parked runs (default 1000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="each run's sleep (default 60)")
    parser.add_argument("--window", type=float, default=20.0, help="idle measurement window (default 20)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up runs first (default 200)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as data:
        processes: list[asyncio.subprocess.Process] = []
        channels: list[grpc.aio.Channel] = []
        try:
            quiet = ["--listen", "127.0.0.1:0", "--log-level", "warning"]
            store_process, store_address = await spawn(
                [str(BIN / "store-service"), *quiet, "--data-dir", data, "--metrics-listen", "127.0.0.1:0"],
                "store-service listening on",
            )
            processes.append(store_process)
            assert store_process.stdout is not None
            metrics_line = (await store_process.stdout.readline()).decode().strip()
            metrics_url = metrics_line.removeprefix("store-service metrics on").strip()
            engine, engine_address = await spawn(
                [str(BIN / "engine-service"), *quiet, "--store", store_address], "engine-service listening on"
            )
            processes.append(engine)
            channels = [grpc.aio.insecure_channel(engine_address), grpc.aio.insecure_channel(store_address)]
            stub = engine_pb2_grpc.EngineServiceStub(channels[0])
            store = store_pb2_grpc.StoreServiceStub(channels[1])

            warm = engine_pb2.StartRunRequest(pipeline=sleep_pipeline(0), wait=True)
            for _ in range(args.warmup):
                await stub.StartRun(warm, timeout=60)
            await asyncio.sleep(2)
            baseline = rss_kib(engine.pid)

            calls_start = store_calls(metrics_url)
            began = time.monotonic()
            run_ids = await start_all(stub, args.runs, args.seconds)
            start_span = time.monotonic() - began
            while await count(store, store_pb2.STREAM_STATUS_PARKED) < args.runs:
                if time.monotonic() - began > args.seconds:
                    raise RuntimeError("the runs did not all park before their timers fired")
                await asyncio.sleep(0.5)
            parked_at = time.monotonic()
            calls_parked = store_calls(metrics_url)
            rss_parked = rss_kib(engine.pid)
            cpu_before = cpu_seconds(engine.pid)
            window = min(args.window, max(1.0, args.seconds - (parked_at - began) - 2))
            await asyncio.sleep(window)
            cpu_idle = (cpu_seconds(engine.pid) - cpu_before) / window
            rss_after_window = rss_kib(engine.pid)
            calls_waited = store_calls(metrics_url)

            fire_cpu = cpu_seconds(engine.pid)
            while await count(store, store_pb2.STREAM_STATUS_COMPLETED) < args.runs + args.warmup:
                if time.monotonic() - began > args.seconds + 600:
                    raise RuntimeError("the runs did not all complete")
                await asyncio.sleep(0.5)
            fire_cpu = cpu_seconds(engine.pid) - fire_cpu
            calls_done = store_calls(metrics_url)
            limit = asyncio.Semaphore(64)

            async def one(run_id: str) -> tuple[float, float]:
                async with limit:
                    return await delays_ms(store, run_id)

            both = await asyncio.gather(*(one(r) for r in run_ids))
            delays = sorted(decided for decided, _ in both)
            durable = sorted(committed for _, committed in both)
        finally:
            for channel in channels:
                await channel.close(None)
            for process in processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                await process.wait()
    rss_per_run = (rss_parked - baseline) * 1024 / args.runs
    p50 = statistics.median(delays)
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    print(f"parked_runs: {args.runs} runs parked on {args.seconds:g}s timers (started in {start_span:.1f}s)")
    print(
        f"  engine RSS: {baseline / 1024:.1f} MiB warm, {rss_parked / 1024:.1f} MiB with {args.runs} parked, "
        f"{rss_after_window / 1024:.1f} MiB after {window:.0f}s"
    )
    print(f"  RSS growth per parked run: {rss_per_run:.0f} bytes = {rss_per_run / 2048:.2f} x the 2 KiB aim")
    print(f"  engine CPU while they wait: {cpu_idle * 100:.2f}% of a core ({window:.0f}s window)")
    print(
        f"  engine CPU to wake and finish them: {fire_cpu:.1f}s "
        f"= {fire_cpu / args.runs * 1000:.1f} ms per run"
    )
    print(
        f"  delay from fire time to the step's completion (decided): p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
        f"max {delays[-1]:.1f} ms (p99 = {p99 / 100:.2f} x the 100 ms aim)"
    )
    durable_p99 = durable[min(len(durable) - 1, int(len(durable) * 0.99))]
    print(
        f"  ... to its StepCompleted committed: p50 {statistics.median(durable):.1f} ms, "
        f"p99 {durable_p99:.1f} ms (the engine's --checkpoint-linger, 0.2 s, batches it with what follows)"
    )
    print("  store calls per run (the bench's own ListStreams polls included):")
    print(f"    start and park: {per_run(calls_start, calls_parked, args.runs)}")
    waited = calls_waited - calls_parked
    idle = ", ".join(f"{method} {count}" for method, count in waited.most_common())
    print(f"    while parked ({window:.0f}s, all runs together): {idle}")
    print(f"    wake and finish: {per_run(calls_waited, calls_done, args.runs)}")


if __name__ == "__main__":
    asyncio.run(main())
