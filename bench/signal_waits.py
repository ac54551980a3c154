"""Runs parked on signals: the engine's memory and CPU while N runs wait for a signal, and the
delay from a signal's acknowledgement to the completion of the step that waited for it.

Run: `.venv/bin/python bench/signal_waits.py [--runs N] [--idle-seconds T] [--concurrency C]`

A `store-service` (SQLite) and an `engine-service` run as subprocesses; this process is the
client. First K warm-up runs of `keel.echo` complete (so the engine's imports, caches and
allocator are warm) and the engine's resident memory (VmRSS) is read: the baseline. Then N runs of
`keel.wait_signal` start (32 at a time); each parks its attempt on a `signal` wait (StepWaiting,
then RunParked: no driver, no coroutine). Once the store lists all N with the `parked` label, RSS is
read again and the engine's CPU time (utime + stime from /proc) is measured over T idle seconds.
Then one signal per run is sent, C at a time. SignalRun's own round trip is printed (this process's
call: the signal put in the inbox, the answer back), and for each signal the delay from SignalRun's
answer (this process's clock) to the step's completion as the engine decided it (the attempt's
`finished_at`, its StepCompleted's `at_us`, the same machine's clock). Each wake-up takes the parked
run up (RunResumed), consumes the signal (its FactRecorded), completes the step and the run. The
reference: the latency of a one-step `keel.echo` run started with `wait=true`, the engine's shortest
round trip through the store.

Each run gets an input of its own, so each parked run starts from a snapshot of its own.

Under load (`--load L`, default 0: none): the first half of the runs is woken on an otherwise idle
engine, the second half while L callers keep 3-step pipelines running on the same engine
(`StartRun(wait=true)` one after another, each with an input of its own, as
`bench/engine_runs.py` does), and the two halves' delays are printed on lines of their own, with
the load's rate: a ratio measured in one run. `--concurrency` bounds the SignalRun calls in flight;
the wake-ups they cause may overlap.
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
from typing import TYPE_CHECKING

import grpc
from engine_runs import pipeline, spawn
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from keel_core.json_values import to_value

if TYPE_CHECKING:
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

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


async def parked_count(store: StoreServiceAsyncStub) -> int:
    """How many run streams carry the store's `parked` label."""
    total, token = 0, ""
    while True:
        page = await store.ListStreams(
            store_pb2.ListStreamsRequest(
                prefix="run:",
                statuses=[store_pb2.STREAM_STATUS_PARKED],
                page_size=1000,
                page_token=token,
            )
        )
        total += len(page.streams)
        token = page.next_page_token
        if not token:
            return total


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
    parser.add_argument("--warmup", type=int, default=200, help="warm-up keel.echo runs first (default 200)")
    parser.add_argument(
        "--load", type=int, default=0, help="pipelines in flight while the second half wakes (default 0)"
    )
    args = parser.parse_args()
    if args.load and args.runs < 2:
        parser.error("--load needs --runs 2 or more: half are woken idle, half under load")
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as data:
        processes: list[asyncio.subprocess.Process] = []
        channel: grpc.aio.Channel | None = None
        store_channel: grpc.aio.Channel | None = None
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
            store_channel = grpc.aio.insecure_channel(store_address)
            store = store_pb2_grpc.StoreServiceStub(store_channel)
            echo = engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"), wait=True)
            echo_ms = []
            for _ in range(max(args.warmup, 1)):
                began = time.perf_counter()
                await stub.StartRun(echo, timeout=60)
                echo_ms.append((time.perf_counter() - began) * 1000)
            await asyncio.sleep(2.0)
            pid = engine_process.pid
            rss_before = rss_kib(pid)

            wait = engine_pb2.SingleOp(op_id="keel.wait_signal", op_config=to_value({"name": "go"}))
            limit = asyncio.Semaphore(32)

            async def start(index: int) -> str:
                async with limit:
                    request = engine_pb2.StartRunRequest(op=wait, input=to_value({"i": index}))
                    started = await stub.StartRun(request, timeout=60)
                    return str(started.run_id)

            began = time.monotonic()
            run_ids = await asyncio.gather(*(start(index) for index in range(args.runs)))
            while await parked_count(store) < args.runs:
                if time.monotonic() - began > 600:
                    raise RuntimeError("the runs did not all park")
                await asyncio.sleep(0.5)
            parked_in = time.monotonic() - began
            await asyncio.sleep(2.0)  # let upkeep that follows a start (lease records) settle
            rss_waiting = rss_kib(pid)
            cpu_before = cpu_seconds(pid)
            await asyncio.sleep(args.idle_seconds)
            idle_cpu = (cpu_seconds(pid) - cpu_before) / args.idle_seconds

            sending = asyncio.Semaphore(args.concurrency)

            answers_ms: list[float] = []  # SignalRun's own round trip, the idle half's

            async def wake(run_id: str, delays_ms: list[float], answers: list[float] | None = None) -> None:
                async with sending:
                    sent = time.perf_counter()
                    await stub.SignalRun(
                        engine_pb2.SignalRunRequest(run_id=run_id, name="go", payload=to_value(1)), timeout=60
                    )
                    acknowledged = time.time()
                    if answers is not None:
                        answers.append((time.perf_counter() - sent) * 1000)
                awaited = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=120)
                if awaited.run.status != engine_pb2.RUN_STATUS_COMPLETED:
                    raise RuntimeError(f"run {run_id} ended {awaited.run.status}")
                finished = awaited.run.steps[0].attempts[-1].finished_at.ToNanoseconds() / 1e9
                delays_ms.append((finished - acknowledged) * 1000)

            async def wake_all(ids: list[str], callers: int) -> tuple[list[float], float, float]:
                """Signal `ids` while `callers` keep pipelines running: the delays, the seconds it
                took, and the load's runs/s meanwhile."""
                delays_ms: list[float] = []
                stop = asyncio.Event()
                completed = 0

                async def load(caller: int) -> None:
                    nonlocal completed
                    shape = pipeline()
                    while not stop.is_set():
                        data = to_value({"n": caller * 1_000_000 + completed})
                        request = engine_pb2.StartRunRequest(pipeline=shape, input=data, wait=True)
                        await stub.StartRun(request, timeout=60)
                        completed += 1

                loaders = [asyncio.create_task(load(caller)) for caller in range(callers)]
                try:
                    if loaders:
                        await asyncio.sleep(1.0)  # the load runs at its pace before the first signal
                    began, completed = time.monotonic(), 0
                    answers = answers_ms if not callers else None
                    await asyncio.gather(*(wake(run_id, delays_ms, answers) for run_id in ids))
                    seconds = time.monotonic() - began
                    rate = completed / seconds
                finally:
                    stop.set()
                    ended = await asyncio.gather(*loaders, return_exceptions=True)
                failed = [error for error in ended if isinstance(error, BaseException)]
                if failed:
                    raise RuntimeError(f"{len(failed)} load callers failed: {failed[0]!r}")
                return delays_ms, seconds, rate

            half = len(run_ids) // 2 if args.load else len(run_ids)
            idle, woken_in, _ = await wake_all(run_ids[:half], 0)
            busy, busy_in, load_rate = (
                await wake_all(run_ids[half:], args.load) if args.load else ([], 0.0, 0.0)
            )
        finally:
            for open_channel in (channel, store_channel):
                if open_channel is not None:
                    await open_channel.close(None)
            for process in processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                await process.wait()
    echo_p50 = statistics.median(echo_ms)
    p50, p99 = percentile(idle, 0.5), percentile(idle, 0.99)
    per_run = (rss_waiting - rss_before) * 1024 / args.runs
    print(f"signal_waits: {args.runs} runs parked on signals on one engine (SQLite store)")
    print(
        f"  all parked after {parked_in:.1f}s; engine RSS {rss_before / 1024:.1f} MiB warm -> "
        f"{rss_waiting / 1024:.1f} MiB with them parked = {per_run:.0f} bytes per parked run "
        f"({per_run / 2048:.2f} x the 2 KiB aim)"
    )
    print(f"  engine CPU while they wait: {idle_cpu * 100:.2f}% of one core over {args.idle_seconds:g}s")
    print(
        f"  signal acknowledged -> step completed: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
        f"max {max(idle):.1f} ms ({len(idle)} signals, {args.concurrency} in flight, "
        f"{woken_in:.1f}s in all)"
    )
    answer_p50, answer_p99 = percentile(answers_ms, 0.5), percentile(answers_ms, 0.99)
    print(
        f"  SignalRun's own round trip (the signal put in the inbox): "
        f"p50 {answer_p50:.1f} ms, p99 {answer_p99:.1f} ms"
    )
    print(
        f"  reference: keel.echo run with wait=true p50 {echo_p50:.1f} ms; "
        f"wake-up p50 / echo p50 = {p50 / echo_p50:.2f}"
    )
    if busy:
        busy_p50, busy_p99 = percentile(busy, 0.5), percentile(busy, 0.99)
        print(
            f"  under load ({args.load} pipelines in flight, {load_rate:.1f} runs/s meanwhile): "
            f"p50 {busy_p50:.1f} ms, p99 {busy_p99:.1f} ms, max {max(busy):.1f} ms "
            f"({len(busy)} signals, {args.concurrency} in flight, {busy_in:.1f}s in all)"
        )
        print(f"  wake-up p99 under load / idle: {busy_p99 / p99:.2f}x (same run)")
    loaded = f" busy_p50_ms={busy_p50:.1f} busy_p99_ms={busy_p99:.1f}" if busy else ""
    print(
        f"RESULT scenario=signal_waits p50_ms={p50:.1f} p99_ms={p99:.1f}{loaded} "
        f"signal_run_p50_ms={answer_p50:.1f} signal_run_p99_ms={answer_p99:.1f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
