"""asyncio's event loop against uvloop for both services, measured side by side in one run.

Run: `.venv/bin/python bench/event_loops.py [--scenario all|store|engine] [--rounds R] [--seconds S]
[--runs N] [--parents P] [--durability full|normal]` (needs `pip install uvloop`)

Store part: two `store-service` processes (one per loop, SQLite, full durability by default) and two
bare echo servers (bench/echo_server.py, one per loop). Engine part: two clusters of one store and
one engine each, every process of a cluster on the same loop. This process is the client and stays
on asyncio's loop throughout, so only the servers' loop differs.

Each round measures every pattern on both loops back to back, the order alternating between rounds
(A B, then B A, ...), so both see the same machine. It prints, per round, the rate on each loop and
the ratio uvloop/asyncio, then the median ratio; and the servers' CPU time per unit of work (user +
system from /proc), which moves less than a rate when others load the shared machine. The load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from engine_runs import BIN, FAN_OUT, cpu_seconds, measure, measure_fan_out, spawn
from keel.engine.v1 import engine_pb2_grpc
from keel.store.v1 import store_pb2_grpc
from store_append import append_rate, batch_rate, echo_rate, server_process

LOOPS = ("asyncio", "uvloop")
MiB = 1024 * 1024


@dataclass
class Series:
    """One pattern's samples per loop: rate, and server CPU ms per unit of work."""

    name: str
    unit: str
    rates: dict[str, list[float]] = field(default_factory=lambda: {loop: [] for loop in LOOPS})
    cpu_ms: dict[str, list[float]] = field(default_factory=lambda: {loop: [] for loop in LOOPS})
    # Per server process when there are several (engine clusters): (process, loop) -> CPU ms per unit.
    parts: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def ratios(self) -> list[float]:
        """uvloop/asyncio rate, round by round."""
        return [b / a for a, b in zip(self.rates["asyncio"], self.rates["uvloop"], strict=True)]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def round_order(round_no: int) -> tuple[str, ...]:
    """asyncio first in even rounds, uvloop first in odd ones."""
    return LOOPS if round_no % 2 == 0 else LOOPS[::-1]


async def timed(
    series: Series, loop: str, pids: dict[str, int], work: Awaitable[tuple[float, float]]
) -> None:
    """Await one measurement, `work` giving (rate, units done); record the rate and CPU ms per unit.

    `pids` names the server processes whose CPU counts. `work` is a coroutine not yet started, so
    the CPU reading before it covers all of it.
    """
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    rate, units = await work
    used = {name: (cpu_seconds(pid) - before[name]) * 1000 / max(units, 1) for name, pid in pids.items()}
    series.rates[loop].append(rate)
    series.cpu_ms[loop].append(sum(used.values()))
    if len(pids) > 1:
        for name, value in used.items():
            series.parts.setdefault((name, loop), []).append(value)


async def with_units(rate_of: Awaitable[float], seconds: float) -> tuple[float, float]:
    """(rate, units done) of a store_append rate measured over `seconds` after its short warm-up.

    The CPU reading spans the warm-up too (store_append.run_for: min(0.3, seconds / 3) at about the
    same rate), so the units count it.
    """
    rate = await rate_of
    return rate, rate * (seconds + min(0.3, seconds / 3))


async def counted(work: Awaitable[tuple[float, list[float]]], units: int) -> tuple[float, float]:
    """(rate, units) of a fixed-size measurement that returns (rate, latencies)."""
    rate, _ = await work
    return rate, units


@contextlib.contextmanager
def store_servers(data_root: Path, durability: str) -> Iterator[dict[str, tuple[int, str, int, str]]]:
    """Per loop: (store pid, store address, echo pid, echo address)."""
    echo_script = str(Path(__file__).with_name("echo_server.py"))
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[int, str, int, str]] = {}
        for loop in LOOPS:
            store_cmd = [str(BIN / "store-service"), "--listen", "127.0.0.1:0", "--log-level", "warning"]
            store_cmd += ["--data-dir", str(data_root / loop), "--durability", durability]
            store_cmd += ["--event-loop", loop]
            store, store_address = stack.enter_context(
                server_process(store_cmd, r"^store-service listening on (\S+)$")
            )
            echo_cmd = [sys.executable, echo_script, "--listen", "127.0.0.1:0", "--event-loop", loop]
            echo, echo_address = stack.enter_context(server_process(echo_cmd, r"^echo listening on (\S+)$"))
            servers[loop] = (store.pid, store_address, echo.pid, echo_address)
        yield servers


async def store_rounds(
    servers: dict[str, tuple[int, str, int, str]], rounds: int, seconds: float
) -> list[Series]:
    """Echo and store patterns, both loops per round, alternating order."""
    echo64 = Series("echo, 64 clients (bare grpc.aio server)", "calls/s")
    single64 = Series("store: append 1 event, 64 clients", "appends/s")
    batch1 = Series("store: 100-event batches, 1 client", "events/s")
    batch16 = Series("store: 100-event batches, 16 clients", "events/s")
    options = [("grpc.max_receive_message_length", 16 * MiB)]
    async with contextlib.AsyncExitStack() as stack:
        channels: dict[str, tuple[grpc.aio.Channel, grpc.aio.Channel]] = {}
        for loop, (_, store_address, _, echo_address) in servers.items():
            store = await stack.enter_async_context(grpc.aio.insecure_channel(store_address, options=options))
            echo = await stack.enter_async_context(grpc.aio.insecure_channel(echo_address, options=options))
            channels[loop] = (store, echo)
        for round_no in range(rounds):
            for loop in round_order(round_no):
                store_pid, _, echo_pid, _ = servers[loop]
                store, echo = channels[loop]
                stub = store_pb2_grpc.StoreServiceStub(store)
                tag = f"{loop}-r{round_no}"

                await timed(
                    echo64, loop, {"echo": echo_pid}, with_units(echo_rate(echo, 64, seconds), seconds)
                )
                single = append_rate(stub, 64, seconds, 1, f"single-{tag}")
                await timed(single64, loop, {"store": store_pid}, with_units(single, seconds))
                await timed(
                    batch1,
                    loop,
                    {"store": store_pid},
                    with_units(batch_rate(store, 1, seconds, 100, f"b1-{tag}"), seconds),
                )
                batches = batch_rate(store, 16, seconds, 100, f"b16-{tag}")
                await timed(batch16, loop, {"store": store_pid}, with_units(batches, seconds))
            print(f"  store round {round_no + 1}/{rounds} done (load {load_average()})", flush=True)
    return [echo64, single64, batch1, batch16]


@contextlib.asynccontextmanager
async def engine_clusters(
    data_root: Path, durability: str
) -> AsyncIterator[dict[str, tuple[dict[str, int], str]]]:
    """Per loop: a store and an engine on that loop; yields ({"store": pid, "engine": pid}, address)."""
    processes: list[asyncio.subprocess.Process] = []
    clusters: dict[str, tuple[dict[str, int], str]] = {}
    try:
        for loop in LOOPS:
            store_args = [str(BIN / "store-service"), "--listen", "127.0.0.1:0", "--log-level", "warning"]
            store_args += ["--data-dir", str(data_root / f"engine-{loop}"), "--durability", durability]
            store_args += ["--event-loop", loop]
            store, store_address = await spawn(store_args, "store-service listening on")
            processes.append(store)
            engine_args = [str(BIN / "engine-service"), "--listen", "127.0.0.1:0", "--store", store_address]
            engine_args += ["--log-level", "warning", "--event-loop", loop]
            engine, engine_address = await spawn(engine_args, "engine-service listening on")
            processes.append(engine)
            clusters[loop] = ({"store": store.pid, "engine": engine.pid}, engine_address)
        yield clusters
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            await process.wait()


async def engine_rounds(
    clusters: dict[str, tuple[dict[str, int], str]], rounds: int, runs: int, parents: int
) -> list[Series]:
    """3-step pipelines with 32 in flight and fan-out parents with 8 in flight, both loops per round."""
    pipelines = Series("engine: 3-step pipeline, 32 in flight", "runs/s")
    fan_outs = Series(f"engine: fan-out parents of {FAN_OUT}, 8 in flight", "parents/s")
    async with contextlib.AsyncExitStack() as stack:
        stubs = {}
        for loop, (_, address) in clusters.items():
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            stubs[loop] = engine_pb2_grpc.EngineServiceStub(channel)
        for loop in LOOPS:  # warm-up
            await measure([stubs[loop]], 50, 8)
            await measure_fan_out([stubs[loop]], 4, 4, FAN_OUT)
        for round_no in range(rounds):
            for loop in round_order(round_no):
                pids, stub = clusters[loop][0], stubs[loop]
                await timed(pipelines, loop, pids, counted(measure([stub], runs, 32), runs))
                await timed(
                    fan_outs, loop, pids, counted(measure_fan_out([stub], parents, 8, FAN_OUT), parents)
                )
            print(f"  engine round {round_no + 1}/{rounds} done (load {load_average()})", flush=True)
    return [pipelines, fan_outs]


def report(all_series: list[Series]) -> None:
    """Per pattern: each round's rates and ratio, the median ratio, and CPU per unit."""
    for series in all_series:
        ratios = series.ratios()
        print(f"\n{series.name} ({series.unit}; CPU = server ms per {series.unit.split('/')[0][:-1]})")
        for index, ratio in enumerate(ratios):
            a, b = series.rates["asyncio"][index], series.rates["uvloop"][index]
            cpu_a, cpu_b = series.cpu_ms["asyncio"][index], series.cpu_ms["uvloop"][index]
            print(
                f"  round {index + 1}: asyncio {a:10,.1f}  uvloop {b:10,.1f}  ratio {ratio:.3f}   "
                f"CPU asyncio {cpu_a:.4f}  uvloop {cpu_b:.4f}  ratio {cpu_b / cpu_a:.3f}"
            )
        cpu_ratios = [
            b / a for a, b in zip(series.cpu_ms["asyncio"], series.cpu_ms["uvloop"], strict=True) if a
        ]
        print(
            f"  median rate ratio uvloop/asyncio {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}); "
            f"median CPU-per-unit ratio {statistics.median(cpu_ratios):.3f}"
        )
        for name in sorted({name for name, _ in series.parts}):
            a_parts, b_parts = series.parts[(name, "asyncio")], series.parts[(name, "uvloop")]
            print(
                f"    {name} CPU ms per unit, median: asyncio {statistics.median(a_parts):.3f}  "
                f"uvloop {statistics.median(b_parts):.3f}  "
                f"(ratio {statistics.median(b / a for a, b in zip(a_parts, b_parts, strict=True) if a):.3f})"
            )


async def run(args: argparse.Namespace) -> list[Series]:
    """Start what the scenario needs, measure, stop."""
    results: list[Series] = []
    with tempfile.TemporaryDirectory(prefix="keel-bench-loops-") as data:
        root = Path(data)
        if args.scenario in ("all", "store"):
            with store_servers(root, args.durability) as servers:
                results += await store_rounds(servers, args.rounds, args.seconds)
        if args.scenario in ("all", "engine"):
            async with engine_clusters(root, args.durability) as clusters:
                results += await engine_rounds(clusters, args.rounds, args.runs, args.parents)
    return results


def main() -> None:
    """Parse the flags, measure, report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=["all", "store", "engine"], default="all")
    parser.add_argument("--rounds", type=int, default=4, help="A/B rounds (default 4)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per store pattern (default 3)")
    parser.add_argument("--runs", type=int, default=1000, help="pipeline runs per measurement (default 1000)")
    parser.add_argument(
        "--parents", type=int, default=40, help="fan-out parents per measurement (default 40)"
    )
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    args = parser.parse_args()
    started = time.monotonic()
    print(f"load average before: {load_average()} ({os.cpu_count()} CPUs)", flush=True)
    results = asyncio.run(run(args))
    report(results)
    print(f"\nload average after: {load_average()}; took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
