"""DBOS Transact doing Keel's benchmark workloads, for a same-run ratio (issue 13).

Run it with a Python that has DBOS installed (it is not a Keel dependency):

    python3 -m venv /tmp/dbos-venv && /tmp/dbos-venv/bin/pip install dbos
    /tmp/dbos-venv/bin/python bench/peers/dbos_runs.py --scenario pipeline --runs 1000

`bench/peers/compare.py` alternates this with `bench/engine_runs.py` in one run and prints the ratios.

The workloads mirror `bench/engine_runs.py`:
- pipeline: a workflow of three steps returning small dicts (echo, then two transforms of the previous
  step's output), `--concurrency` (32) workflows in flight, each awaited by its caller;
- fan-out: a parent workflow that starts 10 child workflows (one echo step each) and awaits them all,
  `--fan-out-concurrency` (8) parents in flight.

DBOS runs on SQLite in WAL mode with full sync (`PRAGMA journal_mode=WAL` is persistent in the file and set
before DBOS opens it; `synchronous=FULL` is SQLite's default and is checked and printed), the same
durability as Keel's default store. The last line is machine-readable:
`RESULT scenario=<name> rate=<per second> p50_ms=<ms> p99_ms=<ms>`.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dbos import DBOS, DBOSConfig

FAN_OUT = 10


@DBOS.step()
async def echo(config: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The first step: echoes its config and the run's input."""
    return {"config": config, "input": payload}


@DBOS.step()
async def transform(previous: dict[str, Any], field: str) -> dict[str, Any]:
    """A later step: a small dict made from the previous step's output."""
    return {field: previous, "n": len(previous)}


@DBOS.workflow()
async def pipeline(payload: dict[str, Any]) -> dict[str, Any]:
    """echo -> transform -> transform, as Keel's benchmark pipeline."""
    first = await echo({"greeting": "hello"}, payload)
    second = await transform(first, "a")
    return await transform(second, "b")


@DBOS.workflow()
async def child(index: int) -> dict[str, Any]:
    """One child of the fan-out: a single echo step."""
    return await echo({"child": index}, {"index": index})


@DBOS.workflow()
async def fan_out(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Starts ten children and awaits them all."""
    handles = [await DBOS.start_workflow_async(child, i) for i in range(FAN_OUT)]
    return [await handle.get_result() for handle in handles]


async def timed(
    call: Callable[[], Awaitable[object]], count: int, concurrency: int
) -> tuple[float, list[float]]:
    """(completions per second, latencies in seconds) of `count` calls, `concurrency` in flight."""
    latencies: list[float] = []
    remaining = iter(range(count))

    async def worker() -> None:
        for _ in remaining:
            began = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - began), latencies


def percentile(latencies: list[float], fraction: float) -> float:
    """The latency below which `fraction` of the calls finished, in milliseconds."""
    ordered = sorted(latencies)
    return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def prepared_database(folder: Path) -> Path:
    """An empty SQLite file already in WAL mode (the mode is stored in the file)."""
    path = folder / "dbos.sqlite"
    with sqlite3.connect(path) as conn:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise SystemExit(f"SQLite refused WAL mode ({mode})")
    return path


async def measure(args: argparse.Namespace) -> None:
    """Launches DBOS on a fresh file, warms up, measures the chosen scenario, prints the result."""
    with tempfile.TemporaryDirectory(prefix="dbos-bench-") as folder:
        path = prepared_database(Path(folder))
        config: DBOSConfig = {
            "name": "keel-peer-bench",
            "system_database_url": f"sqlite:///{path}",
            "log_level": "WARNING",
        }
        DBOS(config=config)
        DBOS.launch()
        try:
            with sqlite3.connect(path) as conn:
                sync = conn.execute("PRAGMA synchronous").fetchone()[0]
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            print(f"dbos sqlite: journal_mode={mode} synchronous={sync} (2 = FULL)")
            if args.scenario == "pipeline":
                call: Callable[[], Awaitable[object]] = lambda: run(pipeline, {"name": "Ada"})  # noqa: E731
                count, concurrency = args.runs, args.concurrency
            else:
                call = lambda: run(fan_out, {"name": "Ada"})  # noqa: E731
                count, concurrency = args.parents, args.fan_out_concurrency
            await timed(call, max(concurrency, count // 10), concurrency)
            rate, latencies = await timed(call, count, concurrency)
        finally:
            DBOS.destroy()
    p50, p99 = statistics.median(latencies) * 1000, percentile(latencies, 0.99)
    print(f"RESULT scenario={args.scenario} rate={rate:.1f} p50_ms={p50:.1f} p99_ms={p99:.1f}")


async def run(workflow: Callable[[dict[str, Any]], Awaitable[Any]], payload: dict[str, Any]) -> Any:
    """Starts one workflow and waits for its result, as Keel's StartRun(wait=true) does."""
    handle = await DBOS.start_workflow_async(workflow, payload)
    return await handle.get_result()


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=["pipeline", "fan-out"], default="pipeline")
    parser.add_argument("--runs", type=int, default=1000, help="pipelines to complete (default 1000)")
    parser.add_argument("--concurrency", type=int, default=32, help="pipelines in flight (default 32)")
    parser.add_argument("--parents", type=int, default=80, help="fan-out parents to complete (default 80)")
    parser.add_argument("--fan-out-concurrency", type=int, default=8, help="parents in flight (default 8)")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
