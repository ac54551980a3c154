"""The 3-step pipeline with every step on one Node worker process against the same pipeline in-process.

Run: `.venv/bin/python bench/node_worker_steps.py [--runs N] [--rounds R] [--concurrency C]
[--worker-concurrency W]` (needs `node` and `npm ci` in clients/node).

A `store-service` (SQLite, full durability), an `engine-service` and one Node worker
(`bench/node_worker.js`, clients/node/worker.js with W = 32 tasks at once) run as subprocesses;
this process is the client. Each run is one `StartRun(wait=true)` of `a -> b -> c`: in-process,
`keel.echo -> keel.transform -> keel.transform`; remote, the same work as Node ops on the worker's
queue. The two are alternated R times (default 3) in one run of this script, N runs each (default
300) with C (default 32) in flight, and it prints runs/s, p50/p99 latency, the remote/in-process
ratio, the remote steps' schedule-to-start latency (from the task's `scheduled_at` to the
handler's start, as the worker saw it; millisecond resolution), and the CPU milliseconds per run
of the engine, the store and the Node worker in each mode (where a remote step's cost goes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from keel.engine.v1 import engine_pb2, engine_pb2_grpc

from keel_core.json_values import to_value

if TYPE_CHECKING:
    from keel.engine.v1.engine_pb2_grpc import EngineServiceAsyncStub

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def pipeline(task_queue: str) -> engine_pb2.Pipeline:
    """Three steps returning small dicts: in the engine (no queue) or on the Node worker's queue."""
    remote = bool(task_queue)
    return engine_pb2.Pipeline(
        pipeline_id="bench3-node" if remote else "bench3",
        steps=[
            engine_pb2.Step(
                step_id="a",
                op_id="bench.echo" if remote else "keel.echo",
                op_config=to_value({"k": 1}),
                task_queue=task_queue,
            ),
            engine_pb2.Step(
                step_id="b",
                op_id="bench.x" if remote else "keel.transform",
                op_config=None if remote else to_value({"fields": {"x": "$input.n"}}),
                depends_on=["a"],
                task_queue=task_queue,
            ),
            engine_pb2.Step(
                step_id="c",
                op_id="bench.y" if remote else "keel.transform",
                op_config=None if remote else to_value({"fields": {"y": "$context.b.x", "ok": True}}),
                depends_on=["b"],
                task_queue=task_queue,
            ),
        ],
    )


async def spawn(args: list[str], banner: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start a process and read the line it announces itself with."""
    process = await asyncio.create_subprocess_exec(
        *args, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
    if not line.startswith(banner):
        process.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return process, line.removeprefix(banner).strip()


async def measure(
    stub: EngineServiceAsyncStub, plan: engine_pb2.Pipeline, runs: int, concurrency: int
) -> tuple[float, list[float]]:
    """Complete `runs` runs of `plan` with `concurrency` in flight; returns (runs/s, latencies ms)."""
    latencies: list[float] = []
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while next_index < runs:
            index = next_index
            next_index += 1
            began = time.perf_counter()
            response = await stub.StartRun(
                engine_pb2.StartRunRequest(pipeline=plan, input=to_value({"n": index}), wait=True),
                timeout=120,
            )
            latencies.append((time.perf_counter() - began) * 1000)
            if response.run.status != engine_pb2.RUN_STATUS_COMPLETED:
                raise RuntimeError(f"run {response.run_id} ended {response.run.status}")

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return runs / (time.perf_counter() - began), latencies


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of `values` fall."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def line(label: str, rate: float, latencies: list[float]) -> str:
    """One measurement as a line of the report."""
    return (
        f"  {label:<22}: {rate:7.1f} runs/s  p50 {statistics.median(latencies):6.1f} ms  "
        f"p99 {percentile(latencies, 0.99):6.1f} ms"
    )


async def main() -> None:
    """Start the services and the Node worker, alternate the two pipelines, print, stop."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=300, help="runs per measurement (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two (default 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="runs in flight (default 32)")
    parser.add_argument(
        "--worker-concurrency", type=int, default=32, help="the worker's tasks at once (default 32)"
    )
    args = parser.parse_args()
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node_worker_steps: `node` is not on PATH")
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    results: dict[str, list[tuple[float, list[float]]]] = {"in-process": [], "node worker": []}
    cpu = {name: [0.0, 0.0, 0.0] for name in results}  # engine, store, worker CPU seconds
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as data:
        stats_file = Path(data) / "schedule_to_start.json"
        processes: list[asyncio.subprocess.Process] = []
        try:
            store, store_address = await spawn(
                [
                    str(BIN / "store-service"),
                    "--listen",
                    "127.0.0.1:0",
                    "--data-dir",
                    data,
                    "--log-level",
                    "warning",
                ],
                "store-service listening on",
            )
            processes.append(store)
            engine, engine_address = await spawn(
                [
                    str(BIN / "engine-service"),
                    *("--listen", "127.0.0.1:0", "--store", store_address, "--log-level", "warning"),
                ],
                "engine-service listening on",
            )
            processes.append(engine)
            worker_args = [node, str(REPO / "bench" / "node_worker.js"), engine_address, queue]
            worker, _ = await spawn(
                [*worker_args, str(args.worker_concurrency), str(stats_file)], "node worker"
            )
            processes.append(worker)
            plans = {"in-process": pipeline(""), "node worker": pipeline(queue)}
            async with grpc.aio.insecure_channel(engine_address) as channel:
                stub = engine_pb2_grpc.EngineServiceStub(channel)
                for plan in plans.values():
                    await measure(stub, plan, 50, 8)  # warm-up
                pids = (engine.pid, store.pid, worker.pid)
                for _ in range(args.rounds):
                    for name, plan in plans.items():
                        before = [cpu_seconds(pid) for pid in pids]
                        results[name].append(await measure(stub, plan, args.runs, args.concurrency))
                        used = [cpu_seconds(pid) - start for pid, start in zip(pids, before, strict=True)]
                        cpu[name] = [total + part for total, part in zip(cpu[name], used, strict=True)]
        finally:
            for process in reversed(processes):
                process.send_signal(signal.SIGTERM)
                await process.wait()
        schedule_to_start = json.loads(stats_file.read_text()) if stats_file.exists() else []
    print(
        f"node_worker_steps: 3-step pipeline, SQLite store (full durability), 1 engine, "
        f"{args.concurrency} runs in flight, {args.runs} runs x {args.rounds} alternated rounds, "
        f"{os.cpu_count()} CPUs"
    )
    rates = {}
    for name, measured in results.items():
        rates[name] = statistics.mean(rate for rate, _ in measured)
        latencies = [value for _, values in measured for value in values]
        print(
            line(
                f"{name}{' (W=' + str(args.worker_concurrency) + ')' if name != 'in-process' else ''}",
                rates[name],
                latencies,
            )
        )
    ratio = rates["node worker"] / rates["in-process"]
    print(f"  node worker / in-process: {ratio:.2f}x runs/s (same run)")
    if schedule_to_start:
        print(
            f"  schedule-to-start of a remote step: p50 {statistics.median(schedule_to_start):.1f} ms  "
            f"p99 {percentile(schedule_to_start, 0.99):.1f} ms  "
            f"({len(schedule_to_start)} tasks, warm-up included)"
        )
    for name, (engine_s, store_s, worker_s) in cpu.items():
        per_run = 1000 / (args.runs * args.rounds)
        print(
            f"  CPU ms per run, {name:<11}: engine {engine_s * per_run:5.1f}, "
            f"store {store_s * per_run:5.1f}, node worker {worker_s * per_run:5.1f}"
        )
    print(
        f"RESULT scenario=node-worker-steps ratio={ratio:.2f} "
        f"in_process={rates['in-process']:.1f} node={rates['node worker']:.1f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
