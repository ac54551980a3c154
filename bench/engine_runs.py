"""Completed runs/s of a 3-step pipeline, and fan-out parents/s, through real gRPC to both services.

Run: `.venv/bin/python bench/engine_runs.py [--scenario all|pipeline|fan-out|calls] [--runs N] [--calls N]
[--durability full|normal] [--concurrency C] [--parents P] [--fan-out-concurrency F]
[--backend sqlite|postgres] [--dsn DSN] [--engines N] [--stores M]
[--event-loop asyncio|uvloop|auto]` (the loop the services run on; this client stays on asyncio)

Scale-out (issue 5): `--backend postgres` runs M store replicas (`--stores`, default 1) on one
fresh PostgreSQL schema (dropped afterwards) and N engines (`--engines`, default 1), each engine
given every store address; the client spreads its runs round-robin over the engines (worker i
always calls engine i mod N; a fan-out parent's children run on its engine). CPU per run then sums
all engines and all stores. `--engines N` works on the SQLite store too (one store, N engines).

A `store-service` (SQLite, full durability by default) and an `engine-service` run as
subprocesses; this process is the client. Each run is one `StartRun(wait=true)` call (one client
RPC) of the pipeline `keel.echo -> keel.transform -> keel.transform`, ops that return small
dicts. It measures runs started one at a time and C (default 32) at a time, and prints completed
runs/s and p50/p99 end-to-end latency next to the targets of issue 3 (>= 300 runs/s with 32 in
flight, p99 < 250 ms; DBOS Transact on SQLite does about 100/s on these 2-core machines).
Store round trips per run (see engine_service.runtime.driver): 1 append for RunStarted (manifest and
initial snapshot inline), 1 per step (StepAttemptStarted + StepCompleted + checkpoint, and
RunCompleted with the last step), then 1 ReadEvents + 1 GetArtifact to answer with the run.

Fan-out scenario (issue 4): each parent is one `StartRun(wait=true)` of `keel.fan_out` spawning 10
children (`keel.echo`) and awaiting them all; it prints parents completed/s with F (default 8)
parents in flight. DBOS Transact on SQLite was once noted at about 5.6 such parents/s here (the
same-run measurement, bench/peers/compare.py, found 11.5/s on a quiet machine); the
target is at least 3x that (17/s).

The ceiling (issue 13): a bare grpc.aio echo server (`bench/echo_server.py`) answers the same
serialized StartRunRequest at the same concurrency, alternated with the pipeline measurement, and
the ratio is printed on a line of its own: `pipeline runs/s vs echo calls/s: 0.12x`.

Sequential recorded calls (issue 13, `--scenario calls`): one run whose single step makes `--calls`
(1000) `io.call`s one after another to the in-process `keel.echo` transport, each recorded (durable
before the op sees it); per-call overhead = (that run's time - a run of the same step with no call)
/ calls.

The client's own CPU per pipeline run is printed too: it shares the machine's two cores with the
services. CPU per run (and per parent) is printed for each service in all and for its main thread (the
event loop, where its requests are handled), with how much of the measured time each main thread
was on a CPU, and the rate at which the engine's would be busy all the time: an upper bound. On a
fast machine the engine's main thread was busy nearly all the time under 32 pipelines in flight
(docs/performance.md, "The engine's main thread is the ceiling").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import secrets
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from keel.engine.v1 import engine_pb2, engine_pb2_grpc

from keel_core.json_values import to_value
from keel_core.serving import DEFAULT_EVENT_LOOP, EVENT_LOOPS

if TYPE_CHECKING:
    from keel.engine.v1.engine_pb2_grpc import EngineServiceAsyncStub

BIN = Path(sys.executable).parent
FAN_OUT = 10
DBOS_FAN_OUT = 5.6
REPO = Path(__file__).resolve().parents[1]
ECHO_METHOD = "/keel.bench.Echo/Echo"
DEFAULT_DSN = os.environ.get("KEEL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def pipeline() -> engine_pb2.Pipeline:
    """Three steps returning small dicts."""
    return engine_pb2.Pipeline(
        pipeline_id="bench3",
        steps=[
            engine_pb2.Step(step_id="a", op_id="keel.echo", op_config=to_value({"k": 1})),
            engine_pb2.Step(
                step_id="b",
                op_id="keel.transform",
                op_config=to_value({"fields": {"x": "$input.n"}}),
                depends_on=["a"],
            ),
            engine_pb2.Step(
                step_id="c",
                op_id="keel.transform",
                op_config=to_value({"fields": {"y": "$context.b.x", "ok": True}}),
                depends_on=["b"],
            ),
        ],
    )


async def spawn(args: list[str], banner: str, patience: float = 30) -> tuple[asyncio.subprocess.Process, str]:
    """Start a service and read the address it announces (within `patience` seconds); one that does
    not announce it is killed."""
    process = await asyncio.create_subprocess_exec(
        *args, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        return process, await announced(process, banner, patience)
    except BaseException:
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise


async def announced(process: asyncio.subprocess.Process, banner: str, patience: float = 30) -> str:
    """What the service's next line on stdout says after `banner` (an address, a URL)."""
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), patience)).decode().strip()
    if not line.startswith(banner):
        process.kill()
        raise RuntimeError(f"the service did not say {banner!r}: {line!r}")
    return line.removeprefix(banner).strip()


# A store's RPC counter line on /metrics: its method and count.
_STORE_RPC = re.compile(
    r'^keel_rpc_started_total\{method="(\w+)",service="keel\.store\.v1\.StoreService"\} (\S+)$'
)


async def store_rpcs(metrics_urls: list[str]) -> collections.Counter[str]:
    """StoreService RPCs received so far, by method, summed over the stores (from their /metrics)."""

    def scrape(url: str) -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    counts: collections.Counter[str] = collections.Counter()
    for url in metrics_urls:
        for line in (await asyncio.to_thread(scrape, url)).splitlines():
            if match := _STORE_RPC.match(line):
                counts[match.group(1)] += int(float(match.group(2)))
            elif line.startswith("keel_store_append_stream_request_seconds_count "):
                # A batch on the open AppendEventsStream: a round trip, as an AppendEventsBatch call is.
                counts["AppendEventsStream msgs"] += int(float(line.split()[1]))
    return counts


def rpcs_per(spent: collections.Counter[str], units: int) -> str:
    """`N.NN (Method a.aa, ...)`: store RPCs per unit of work, the busiest methods named."""
    total = sum(spent.values()) / units
    methods = ", ".join(f"{method} {count / units:.2f}" for method, count in spent.most_common(4))
    return f"{total:.2f} ({methods})"


async def measure(
    stubs: list[EngineServiceAsyncStub], runs: int, concurrency: int
) -> tuple[float, list[float]]:
    """Complete `runs` runs with `concurrency` in flight over the engines; returns (runs/s, latencies ms)."""
    request_pipeline = pipeline()
    latencies: list[float] = []
    next_index = 0

    async def worker(stub: EngineServiceAsyncStub) -> None:
        nonlocal next_index
        while next_index < runs:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            response = await stub.StartRun(
                engine_pb2.StartRunRequest(
                    pipeline=request_pipeline, input=to_value({"n": index}), wait=True
                ),
                timeout=60,
            )
            latencies.append((time.perf_counter() - started) * 1000)
            if response.run.status != engine_pb2.RUN_STATUS_COMPLETED:
                raise RuntimeError(f"run {response.run_id} ended {response.run.status}")

    began = time.perf_counter()
    await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(concurrency)))
    return runs / (time.perf_counter() - began), latencies


async def measure_fan_out(
    stubs: list[EngineServiceAsyncStub], parents: int, concurrency: int, children: int
) -> tuple[float, list[float]]:
    """Complete `parents` fan-out parents with `concurrency` in flight over the engines (a parent's
    children run on its engine); returns (parents/s, latencies ms)."""
    config = to_value({"op_id": "keel.echo", "count": children})
    latencies: list[float] = []
    next_index = 0

    async def worker(stub: EngineServiceAsyncStub) -> None:
        nonlocal next_index
        while next_index < parents:
            next_index += 1
            started = time.perf_counter()
            response = await stub.StartRun(
                engine_pb2.StartRunRequest(
                    op=engine_pb2.SingleOp(op_id="keel.fan_out", op_config=config), wait=True
                ),
                timeout=120,
            )
            latencies.append((time.perf_counter() - started) * 1000)
            if response.run.status != engine_pb2.RUN_STATUS_COMPLETED:
                run = response.run
                raise RuntimeError(f"parent {run.run_id} ended {run.status}: {run.reason}")
            if len(response.run.children) != children:
                raise RuntimeError(f"parent {response.run_id} lists {len(response.run.children)} children")

    began = time.perf_counter()
    await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(concurrency)))
    return parents / (time.perf_counter() - began), latencies


async def echo_rate(address: str, concurrency: int, seconds: float) -> float:
    """Calls/s of a bare grpc.aio echo server answering StartRunRequest bytes, `concurrency` in flight."""
    request = engine_pb2.StartRunRequest(pipeline=pipeline(), input=to_value({"n": 1}), wait=True)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            ECHO_METHOD,
            request_serializer=engine_pb2.StartRunRequest.SerializeToString,
            response_deserializer=engine_pb2.StartRunRequest.FromString,
        )
        await asyncio.gather(*(call(request) for _ in range(concurrency)))  # warm-up
        count = 0
        began = time.perf_counter()

        async def caller() -> None:
            nonlocal count
            while time.perf_counter() - began < seconds:
                await call(request, timeout=60)
                count += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return count / (time.perf_counter() - began)


def io_calls_config(calls: int) -> dict[str, Any]:
    """`keel.io_call`'s op_config for a step making `calls` recorded echo calls one after another."""
    return {
        "calls": [
            {"namespace": "keel.echo", "request": {"i": i}, "fact_key": f"call-{i}"} for i in range(calls)
        ]
    }


async def one_run_seconds(stub: EngineServiceAsyncStub, calls: int) -> float:
    """Seconds for one run whose single step makes `calls` recorded echo calls one after another."""
    op = engine_pb2.SingleOp(op_id="keel.io_call", op_config=to_value(io_calls_config(calls)))
    began = time.perf_counter()
    response = await stub.StartRun(engine_pb2.StartRunRequest(op=op, wait=True), timeout=600)
    elapsed = time.perf_counter() - began
    if response.run.status != engine_pb2.RUN_STATUS_COMPLETED:
        raise RuntimeError(f"run {response.run_id} ended {response.run.status}: {response.run.reason}")
    return elapsed


async def per_call_ms(
    stub: EngineServiceAsyncStub, calls: int, engine_pids: list[int], store_pids: list[int]
) -> tuple[float, float, float]:
    """Milliseconds each sequential recorded call adds to a run, and the engine's and the store's
    CPU milliseconds per call (medians of 3 pairs)."""
    overheads, engine_cpu, store_cpu = [], [], []
    for _ in range(3):
        cpu_before = (cpu_seconds(*engine_pids), cpu_seconds(*store_pids))
        with_calls = await one_run_seconds(stub, calls)
        cpu_between = (cpu_seconds(*engine_pids), cpu_seconds(*store_pids))
        without = await one_run_seconds(stub, 0)
        cpu_after = (cpu_seconds(*engine_pids), cpu_seconds(*store_pids))
        overheads.append((with_calls - without) * 1000 / calls)
        # The run without calls is short: its CPU stands in for the with-calls run's fixed part.
        fixed = (cpu_after[0] - cpu_between[0], cpu_after[1] - cpu_between[1])
        engine_cpu.append((cpu_between[0] - cpu_before[0] - fixed[0]) * 1000 / calls)
        store_cpu.append((cpu_between[1] - cpu_before[1] - fixed[1]) * 1000 / calls)
    return statistics.median(overheads), statistics.median(engine_cpu), statistics.median(store_cpu)


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time the processes have used so far (Linux /proc)."""
    return sum(_stat_seconds(Path(f"/proc/{pid}/stat")) for pid in pids)


def main_thread_seconds(*pids: int) -> float:
    """CPU time the processes' main threads (their event loops) have used so far, to the nanosecond.

    A service's requests are handled on its main thread, one core at most (gRPC's poller and own
    threads run beside it, and the store's SQLite writer): when that thread is busy all the time,
    its CPU per run bounds the rate, whatever the other core has left. The scheduler's own count
    (`schedstat`, time on a CPU), not `stat`'s 10 ms ticks: a window of a second would be only
    100 ticks.
    """
    return sum(int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) for pid in pids) / 1e9


def _stat_seconds(stat: Path) -> float:
    """User + system time from a /proc `stat` file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds the engines and the stores used (each in all, and on their main threads)."""

    engine: float
    store: float
    engine_main: float
    store_main: float

    @classmethod
    def now(cls, engine_pids: list[int], store_pids: list[int]) -> CpuUse:
        """What they have used so far."""
        return cls(
            cpu_seconds(*engine_pids),
            cpu_seconds(*store_pids),
            main_thread_seconds(*engine_pids),
            main_thread_seconds(*store_pids),
        )

    def since(self, before: CpuUse) -> CpuUse:
        """What they used between `before` and this."""
        return CpuUse(
            self.engine - before.engine,
            self.store - before.store,
            self.engine_main - before.engine_main,
            self.store_main - before.store_main,
        )

    def lines(self, unit: str, units: int, seconds: float, engines: int, stores: int) -> list[str]:
        """CPU per `unit` of each service, and how busy their main threads were over `seconds`
        (with several engines or stores, the mean of theirs)."""
        per = 1000 / units
        engine_busy = self.engine_main / (seconds * engines)
        store_busy = self.store_main / (seconds * stores)
        ceiling = f"{units / self.engine_main * engines:,.0f}" if self.engine_main > 0 else "?"
        return [
            f"  CPU per {unit}: engine {self.engine * per:.2f} ms (main thread {self.engine_main * per:.2f}),"
            f" store {self.store * per:.2f} ms (main thread {self.store_main * per:.2f})",
            f"  main threads busy: engine {engine_busy:.0%}, store {store_busy:.0%} of the time "
            f"(the engine's, busy all the time, would allow at most {ceiling} {unit}s/s)",
        ]


async def drop_schema(dsn: str, schema: str) -> None:
    """Drop the benchmark's PostgreSQL schema and everything in it."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of `values` fall."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main() -> None:
    """Start both services, warm up, measure, print, stop."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000, help="runs per measurement (default 1000)")
    parser.add_argument("--concurrency", type=int, default=32, help="runs in flight (default 32)")
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument(
        "--checkpoint-linger",
        default="0.2",
        help="engine write-behind window in seconds (0: one append per step)",
    )
    parser.add_argument("--scenario", choices=["all", "pipeline", "fan-out", "calls"], default="all")
    parser.add_argument("--calls", type=int, default=1000, help="sequential recorded calls (default 1000)")
    parser.add_argument("--parents", type=int, default=80, help="fan-out parents to complete (default 80)")
    parser.add_argument(
        "--fan-out-concurrency", type=int, default=8, help="fan-out parents in flight (default 8)"
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--dsn", default=DEFAULT_DSN, help=f"PostgreSQL to use (default {DEFAULT_DSN})")
    parser.add_argument("--engines", type=int, default=1, help="engines sharing the store (default 1)")
    parser.add_argument("--stores", type=int, default=1, help="store replicas (postgres; default 1)")
    parser.add_argument(
        "--event-loop", choices=EVENT_LOOPS, default=DEFAULT_EVENT_LOOP, help="the services' event loop"
    )
    args = parser.parse_args()
    pipelines = args.scenario in ("all", "pipeline")
    fan_outs = args.scenario in ("all", "fan-out")
    sequential_calls = args.scenario in ("all", "calls")
    if args.backend == "sqlite" and args.stores != 1:
        parser.error("--stores > 1 needs --backend postgres (SQLite files are not shared)")
    schema = f"keel_bench_{secrets.token_hex(5)}"
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as data:
        store_args = [str(BIN / "store-service"), "--listen", "127.0.0.1:0", "--log-level", "warning"]
        store_args += ["--durability", args.durability, "--event-loop", args.event_loop]
        if args.backend == "postgres":
            store_args += ["--backend", "postgres", "--dsn", args.dsn, "--pg-schema", schema]
        else:
            store_args += ["--data-dir", data]
        processes: list[asyncio.subprocess.Process] = []
        try:
            store_args += ["--metrics-listen", "127.0.0.1:0"]
            stores = [await spawn(store_args, "store-service listening on") for _ in range(args.stores)]
            processes += [process for process, _ in stores]
            metrics_urls = [await announced(process, "store-service metrics on") for process, _ in stores]
            store_addresses = ",".join(address for _, address in stores)
            engines = [
                await spawn(
                    [
                        str(BIN / "engine-service"),
                        "--listen",
                        "127.0.0.1:0",
                        "--store",
                        store_addresses,
                        "--checkpoint-linger",
                        args.checkpoint_linger,
                        "--log-level",
                        "warning",
                        "--event-loop",
                        args.event_loop,
                    ],
                    "engine-service listening on",
                )
                for _ in range(args.engines)
            ]
            processes += [process for process, _ in engines]
            echo_command = [sys.executable, str(REPO / "bench" / "echo_server.py"), "--listen", "127.0.0.1:0"]
            echo_process, echo_address = await spawn(echo_command, "echo listening on")
            processes.append(echo_process)
            engine_pids = [process.pid for process, _ in engines]
            store_pids = [process.pid for process, _ in stores]
            channels = [grpc.aio.insecure_channel(address) for _, address in engines]
            stubs = [engine_pb2_grpc.EngineServiceStub(channel) for channel in channels]
            try:
                await measure(stubs, 50, 8)  # warm-up
                sequential_runs = max(50, args.runs // 5)
                if pipelines:
                    serial_rate, serial_lat = await measure(stubs, sequential_runs, 1)
                    rpcs_before = await store_rpcs(metrics_urls)
                    cpu_before = CpuUse.now(engine_pids, store_pids)
                    client_before = time.process_time()
                    rate, lat = await measure(stubs, args.runs, args.concurrency)
                    run_cpu = CpuUse.now(engine_pids, store_pids).since(cpu_before)
                    client_ms = (time.process_time() - client_before) * 1000 / args.runs
                    run_rpcs = await store_rpcs(metrics_urls) - rpcs_before
                    echo_cpu = cpu_seconds(echo_process.pid)
                    echo = await echo_rate(echo_address, args.concurrency, seconds=3.0)
                    echo_cpu = (cpu_seconds(echo_process.pid) - echo_cpu) / (echo * 3.0)
                if sequential_calls:
                    call_ms, call_engine_ms, call_store_ms = await per_call_ms(
                        stubs[0], args.calls, engine_pids[:1], store_pids
                    )
                if fan_outs:
                    await measure_fan_out(stubs, 8, args.fan_out_concurrency, FAN_OUT)  # warm-up
                    fan_rpcs_before = await store_rpcs(metrics_urls)
                    fan_cpu_before = CpuUse.now(engine_pids, store_pids)
                    fan_rate, fan_lat = await measure_fan_out(
                        stubs, args.parents, args.fan_out_concurrency, FAN_OUT
                    )
                    fan_cpu = CpuUse.now(engine_pids, store_pids).since(fan_cpu_before)
                    parent_rpcs = await store_rpcs(metrics_urls) - fan_rpcs_before
            finally:
                for channel in channels:
                    await channel.close(None)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                await process.wait()
            if args.backend == "postgres":
                await drop_schema(args.dsn, schema)
    if pipelines:
        report_pipelines(args, serial_rate, serial_lat, sequential_runs, rate, lat, run_cpu)
        print(f"  store RPCs per run ({args.concurrency} in flight): {rpcs_per(run_rpcs, args.runs)}")
        # The client shares the machine's cores with the services (DBOS's benchmark has none).
        print(f"  client CPU per run: {client_ms:.2f} ms (this process: the calls and their answers)")
        print(f"pipeline runs/s vs echo calls/s: {rate / echo:.2f}x  ({rate:.1f} vs {echo:.1f}, same run)")
        print(f"  echo server CPU per call: {echo_cpu * 1000:.2f} ms (a bare served unary call)")
    if sequential_calls:
        print(
            f"engine_runs: one step making {args.calls} sequential recorded io.calls (keel.echo transport): "
            f"{call_ms:.2f} ms per call (issue 13 aim <= 1.5 ms)"
        )
        print(f"  CPU per call: engine {call_engine_ms:.2f} ms, store {call_store_ms:.2f} ms")
    if fan_outs:
        print(
            f"engine_runs: fan-out parents of {FAN_OUT} keel.echo children, store durability "
            f"{args.durability}, checkpoint linger {args.checkpoint_linger}s, {os.cpu_count()} CPUs"
        )
        print(
            f"  {args.fan_out_concurrency:2d} parents in flight: {fan_rate:6.1f} parents/s "
            f"({fan_rate * FAN_OUT:6.1f} children/s)  p50 {statistics.median(fan_lat):6.1f} ms  "
            f"p99 {percentile(fan_lat, 0.99):6.1f} ms  ({args.parents} parents)"
        )
        for line in fan_cpu.lines("parent", args.parents, args.parents / fan_rate, args.engines, args.stores):
            print(line)
        print(f"  store RPCs per parent: {rpcs_per(parent_rpcs, args.parents)}")
        print(
            f"  target (issue 4): >= {3 * DBOS_FAN_OUT:.1f} parents/s, 3x the {DBOS_FAN_OUT}/s once noted "
            "for DBOS (a constant; bench/peers/compare.py measures DBOS in the same run, and found it faster)"
        )
        print(
            f"RESULT scenario=fan-out rate={fan_rate:.1f} p50_ms={statistics.median(fan_lat):.1f} "
            f"p99_ms={percentile(fan_lat, 0.99):.1f}"
        )


def report_pipelines(
    args: argparse.Namespace,
    serial_rate: float,
    serial_lat: list[float],
    sequential_runs: int,
    rate: float,
    lat: list[float],
    cpu: CpuUse,
) -> None:
    """Print the 3-step pipeline figures."""
    print(
        f"engine_runs: 3-step pipeline, {args.backend} store x{args.stores}, {args.engines} engine(s), "
        f"store durability {args.durability}, checkpoint linger {args.checkpoint_linger}s, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"  one at a time : {serial_rate:7.1f} runs/s  p50 {statistics.median(serial_lat):6.1f} ms  "
        f"p99 {percentile(serial_lat, 0.99):6.1f} ms  ({sequential_runs} runs)"
    )
    print(
        f"  {args.concurrency:2d} in flight  : {rate:7.1f} runs/s  p50 {statistics.median(lat):6.1f} ms  "
        f"p99 {percentile(lat, 0.99):6.1f} ms  ({args.runs} runs)"
    )
    for line in cpu.lines("run", args.runs, args.runs / rate, args.engines, args.stores):
        print(line)
    print(f"  targets (issue 3): >= 300 runs/s with 32 in flight ({rate / 300:.2f}x), p99 < 250 ms")
    print(
        f"RESULT scenario=pipeline rate={rate:.1f} p50_ms={statistics.median(lat):.1f} "
        f"p99_ms={percentile(lat, 0.99):.1f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
