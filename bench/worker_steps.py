"""A 3-step pipeline with every step on one Python worker (keel_client.worker) vs the same in-process.

Run: `.venv/bin/python bench/worker_steps.py [--runs N] [--concurrency C] [--rounds R] [--idle-runs K]`

A `store-service` (SQLite, full durability), an `engine-service` and one worker process
(`Worker(..., concurrency=C)`, C = 32 by default) run as subprocesses; this process is the client.
Each run is one `StartRun(wait=true)` of three steps returning small dicts (as bench/engine_runs.py:
echo -> transform -> transform), either in-process (`keel.echo`, `keel.transform`) or remote (ops of
the same shape on the worker, `task_queue: bench`). Rounds alternate in-process and remote, C runs
in flight, and the script prints runs/s and p50/p99 latency of each, and the ratio remote/in-process.

Schedule-to-start is read from the task streams themselves (TaskClaimed.at_us - TaskScheduled.at_us,
both stamped by the engine): under load (the last remote round) and on an idle queue (K runs one
at a time, the worker waiting in PollTask).

The profile says where a remote step's cost goes: store RPCs and engine RPCs (WorkerService calls)
per run, from the services' Prometheus counters, and CPU seconds per run of each process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from keel_core.json_values import to_value

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
QUEUE = "bench"


def pipeline(remote: bool) -> engine_pb2.Pipeline:
    """echo -> transform -> transform, in-process or on the worker's queue."""
    queue = QUEUE if remote else ""
    prefix = "w." if remote else "keel."
    return engine_pb2.Pipeline(
        pipeline_id="bench3-remote" if remote else "bench3",
        steps=[
            engine_pb2.Step(
                step_id="a", op_id=f"{prefix}echo", op_config=to_value({"k": 1}), task_queue=queue
            ),
            engine_pb2.Step(
                step_id="b",
                op_id=f"{prefix}transform",
                op_config=to_value({"fields": {"x": "$input.n"}}),
                depends_on=["a"],
                task_queue=queue,
            ),
            engine_pb2.Step(
                step_id="c",
                op_id=f"{prefix}transform",
                op_config=to_value({"fields": {"y": "$context.b.x"}}),
                depends_on=["b"],
                task_queue=queue,
            ),
        ],
    )


# --- the worker process ----------------------------------------------------------------------------


def run_worker(engine: str, concurrency: int) -> None:
    """This script as the worker process: echo and transform, shaped like the built-in ops."""
    from keel_client.worker import TaskContext, Worker, op

    @op("w.echo")
    async def echo(ctx: TaskContext, op_config: Any, input: Any) -> Any:
        return {"input": input, "config": op_config}

    @op("w.transform")
    async def transform(ctx: TaskContext, op_config: Any, input: Any) -> Any:
        out = {}
        for name, ref in (op_config or {}).get("fields", {}).items():
            if ref.startswith("$input."):
                out[name] = input.get(ref.removeprefix("$input."))
            elif ref.startswith("$context."):
                step, _, key = ref.removeprefix("$context.").partition(".")
                out[name] = ctx.context.get(step, {}).get(key)
        return out

    print("worker ready", flush=True)
    Worker(engine, QUEUE, ops=[echo, transform], concurrency=concurrency, worker_id="bench-worker").run()


# --- measuring ---------------------------------------------------------------------------------------


async def spawn(args: list[str], banners: list[str]) -> tuple[asyncio.subprocess.Process, list[str]]:
    """Start a process and read the lines it announces (address, metrics URL)."""
    process = await asyncio.create_subprocess_exec(
        *args, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert process.stdout is not None
    found = []
    for banner in banners:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        if not line.startswith(banner):
            process.kill()
            raise RuntimeError(f"{args[0]} did not start: {line!r}")
        found.append(line.removeprefix(banner).strip())
    return process, found


async def measure(stub: Any, remote: bool, runs: int, concurrency: int) -> tuple[float, list[float]]:
    """Complete `runs` runs with `concurrency` in flight; (runs/s, latencies in ms)."""
    request_pipeline = pipeline(remote)
    latencies: list[float] = []
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while next_index < runs:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            response = await stub.StartRun(
                engine_pb2.StartRunRequest(
                    pipeline=request_pipeline, input=to_value({"n": index}), wait=True
                ),
                timeout=120,
            )
            latencies.append((time.perf_counter() - started) * 1000)
            if response.run.status != engine_pb2.RUN_STATUS_COMPLETED:
                raise RuntimeError(f"run {response.run_id} ended {response.run.status}")

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return runs / (time.perf_counter() - began), latencies


async def schedule_to_start_ms(store: Any, since: set[str]) -> list[float]:
    """Schedule-to-start of every task stream not in `since` (which is updated), from its events."""
    found: list[float] = []
    token = ""
    streams: list[str] = []
    while True:
        page = await store.ListStreams(
            store_pb2.ListStreamsRequest(prefix="task:", page_size=1000, page_token=token)
        )
        streams += [s.stream_id for s in page.streams if s.stream_id not in since]
        token = page.next_page_token
        if not token:
            break
    for stream_id in streams:
        since.add(stream_id)
        read = await store.ReadEvents(store_pb2.ReadEventsRequest(stream_id=stream_id, from_seq=1, limit=2))
        stamps = {event.type: json.loads(event.payload)["at_us"] for event in read.events}
        if "TaskScheduled" in stamps and "TaskClaimed" in stamps:
            found.append((stamps["TaskClaimed"] - stamps["TaskScheduled"]) / 1000)
    return found


def rpc_counts(metrics_url: str) -> dict[str, float]:
    """keel_rpc_started_total by method, from a service's /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for match in re.finditer(r"^keel_rpc_started_total\{([^}]*)\} ([0-9.e+]+)$", text, re.M):
        method = re.search(r'method="([^"]+)"', match.group(1))
        if method:
            counts[method.group(1)] = counts.get(method.group(1), 0) + float(match.group(2))
    return counts


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of `values` fall."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def per_run(before: dict[str, float], after: dict[str, float], runs: int) -> str:
    """Per-run counts of each method that moved, largest first."""
    moved = {m: (after.get(m, 0) - before.get(m, 0)) / runs for m in after}
    return ", ".join(f"{m} {v:.2f}" for m, v in sorted(moved.items(), key=lambda kv: -kv[1]) if v >= 0.01)


async def profile(
    stub: Any, remote: bool, runs: int, concurrency: int, urls: tuple[str, str], pids: dict[str, int]
) -> None:
    """RPCs and CPU per run of one kind of run."""
    store_before, engine_before = rpc_counts(urls[0]), rpc_counts(urls[1])
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    await measure(stub, remote, runs, concurrency)
    store_after, engine_after = rpc_counts(urls[0]), rpc_counts(urls[1])
    cpu = {name: (cpu_seconds(pid) - cpu_before[name]) * 1000 / runs for name, pid in pids.items()}
    kind = "remote    " if remote else "in-process"
    print(f"  {kind} store RPCs/run: {per_run(store_before, store_after, runs)}")
    print(f"  {kind} engine RPCs/run: {per_run(engine_before, engine_after, runs)}")
    print(f"  {kind} CPU ms/run: " + ", ".join(f"{name} {ms:.1f}" for name, ms in cpu.items()))


async def main() -> None:
    """Start the services and the worker, alternate the two pipelines, print figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="runs per round (default 300)")
    parser.add_argument("--concurrency", type=int, default=32, help="runs in flight, and the worker's (32)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each kind, alternated (3)")
    parser.add_argument("--idle-runs", type=int, default=50, help="sequential remote runs for idle latency")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        store, (store_address, store_metrics) = await spawn(
            [
                str(BIN / "store-service"),
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data,
                "--metrics-listen",
                "127.0.0.1:0",
            ],
            ["store-service listening on", "store-service metrics on"],
        )
        engine, (engine_address, engine_metrics) = await spawn(
            [
                str(BIN / "engine-service"),
                "--listen",
                "127.0.0.1:0",
                "--store",
                store_address,
                "--metrics-listen",
                "127.0.0.1:0",
            ],
            ["engine-service listening on", "engine-service metrics on"],
        )
        worker, _ = await spawn(
            [sys.executable, __file__, "--as-worker", engine_address, str(args.concurrency)], ["worker ready"]
        )
        pids = {"engine": engine.pid, "store": store.pid, "worker": worker.pid}
        try:
            async with (
                grpc.aio.insecure_channel(engine_address) as channel,
                grpc.aio.insecure_channel(store_address) as store_channel,
            ):
                stub = engine_pb2_grpc.EngineServiceStub(channel)
                store_stub = store_pb2_grpc.StoreServiceStub(store_channel)
                seen: set[str] = set()
                for remote in (False, True):  # warm-up
                    await measure(stub, remote, 64, args.concurrency)
                await schedule_to_start_ms(store_stub, seen)
                rates: dict[bool, list[float]] = {False: [], True: []}
                latencies: dict[bool, list[float]] = {False: [], True: []}
                loaded: list[float] = []
                for _ in range(args.rounds):
                    for remote in (False, True):
                        rate, lat = await measure(stub, remote, args.runs, args.concurrency)
                        rates[remote].append(rate)
                        latencies[remote] += lat
                    loaded = await schedule_to_start_ms(store_stub, seen)
                await measure(stub, True, args.idle_runs, 1)
                idle = await schedule_to_start_ms(store_stub, seen)
                print(
                    f"3-step pipeline, {args.runs} runs x {args.rounds} rounds per kind, "
                    f"{args.concurrency} in flight, one worker process with concurrency {args.concurrency} "
                    "(SQLite, full durability)"
                )
                for remote in (False, True):
                    kind = "remote (worker)" if remote else "in-process     "
                    lat = latencies[remote]
                    print(
                        f"  {kind}: {statistics.median(rates[remote]):7.1f} runs/s (rounds: "
                        f"{', '.join(f'{r:.0f}' for r in rates[remote])}), "
                        f"p50 {percentile(lat, 0.5):.1f} ms, p99 {percentile(lat, 0.99):.1f} ms"
                    )
                ratio = statistics.median(rates[True]) / statistics.median(rates[False])
                print(f"  remote/in-process runs/s: {ratio:.2f}x (aim >= 0.5x)")
                print(
                    f"  schedule-to-start under load (last remote round, {len(loaded)} tasks): "
                    f"p50 {percentile(loaded, 0.5):.2f} ms, p99 {percentile(loaded, 0.99):.2f} ms"
                )
                print(
                    f"  schedule-to-start on an idle queue ({len(idle)} tasks, one run at a time): "
                    f"p50 {percentile(idle, 0.5):.2f} ms, p99 {percentile(idle, 0.99):.2f} ms "
                    "(aim p50 < 5 ms)"
                )
                print("profile (per run, same load):")
                for remote in (False, True):
                    await profile(
                        stub, remote, args.runs, args.concurrency, (store_metrics, engine_metrics), pids
                    )
        finally:
            for process in (worker, engine, store):
                process.terminate()
                await process.wait()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--as-worker":
        run_worker(sys.argv[2], int(sys.argv[3]))
    else:
        asyncio.run(main())
