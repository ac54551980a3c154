"""Where a parked run's memory goes: the engine's Python heap, traced (tracemalloc), per parked run.

Run: `.venv/bin/python bench/parked_memory.py [--runs N] [--top K]`

`bench/parked_runs.py` measures the engine process's RSS, which also counts the allocator's
high-water mark from starting the runs (memory freed after a burst stays in the process). This
one runs the engine in this process (the store is a subprocess) with tracemalloc on: after K
warm-up runs, N runs of a 600 s `keel.sleep` start and park; the Python heap still held once they
are all parked (after a garbage collection) is printed per parked run, with the allocation sites
that hold the most. The client's share (this process also runs the gRPC client) is in the figure:
it is an upper bound of what the engine keeps.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from engine_runs import spawn
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from engine_service.server import EngineConfig, start_engine
from keel_core.json_values import to_value

if TYPE_CHECKING:
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

BIN = Path(sys.executable).parent


def sleep_pipeline(seconds: float) -> engine_pb2.Pipeline:
    """A durable sleep, then an echo."""
    return engine_pb2.Pipeline(
        pipeline_id="parked",
        steps=[
            engine_pb2.Step(step_id="nap", op_id="keel.sleep", op_config=to_value({"seconds": seconds})),
            engine_pb2.Step(step_id="after", op_id="keel.echo", depends_on=["nap"]),
        ],
    )


async def parked(store: StoreServiceAsyncStub) -> int:
    """How many run streams are labelled parked."""
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


async def main() -> None:
    """Start the store, an engine here, park N runs, print the traced heap they hold."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000, help="parked runs (default 1000)")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up runs first (default 100)")
    parser.add_argument("--top", type=int, default=8, help="allocation sites shown (default 8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as data:
        quiet = ["--listen", "127.0.0.1:0", "--log-level", "warning"]
        store_process, store_address = await spawn(
            [str(BIN / "store-service"), *quiet, "--data-dir", data], "store-service listening on"
        )
        engine = await start_engine(EngineConfig(listen="127.0.0.1:0", store=store_address, failpoints=""))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}")
        store_channel = grpc.aio.insecure_channel(store_address)
        try:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            store = store_pb2_grpc.StoreServiceStub(store_channel)
            for _ in range(args.warmup):
                await stub.StartRun(engine_pb2.StartRunRequest(pipeline=sleep_pipeline(0), wait=True))
            gc.collect()
            tracemalloc.start(10)
            before = tracemalloc.take_snapshot()
            limit = asyncio.Semaphore(32)
            request = engine_pb2.StartRunRequest(pipeline=sleep_pipeline(600))

            async def start() -> None:
                async with limit:
                    await stub.StartRun(request, timeout=120)

            await asyncio.gather(*(start() for _ in range(args.runs)))
            while True:
                if await parked(store) >= args.runs:
                    break
                await asyncio.sleep(0.2)  # a look at the store's labels, not a timing claim
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            assert engine.engine is not None
            drivers = len(engine.engine.drivers)
        finally:
            await channel.close(None)
            await store_channel.close(None)
            await engine.drain(0.5)
            store_process.terminate()
            await store_process.wait()
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "traceback")
    total = sum(stat.size_diff for stat in stats)
    print(f"parked_memory: {args.runs} parked runs, {drivers} driver(s) left in the engine")
    print(f"  Python heap still held per parked run: {total / args.runs:.0f} bytes (engine and client)")
    for stat in stats[: args.top]:
        frames = [
            f for f in stat.traceback if "/site-packages/" not in f.filename and "asyncio" not in f.filename
        ]
        where = frames[-1] if frames else stat.traceback[-1]
        print(f"  {stat.size_diff / args.runs:7.0f} B/run  {Path(where.filename).name}:{where.lineno}")


if __name__ == "__main__":
    asyncio.run(main())
