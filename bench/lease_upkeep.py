"""What run-lease upkeep writes to the store: per sleeping run and per engine, per minute.

Run: `.venv/bin/python bench/lease_upkeep.py [--runs K] [--seconds T] [--lease-ttl TTL]
[--engines E] [--short-runs S]`

A `store-service` (SQLite) and E `engine-service`s (`--lease-ttl TTL`) run as subprocesses; this
process is the client. First S short runs (`keel.echo`, StartRun wait=true, each done in
milliseconds) show the hot path writes no lease and no heartbeat. Then K runs of `keel.sleep_in_process`,
spread over the engines, sleep past the measurement; once each has recorded its lease (one
`LeaseAcquired` when ttl/3 old), the store's stream heads are read, again T seconds later, and
the difference is what lease upkeep appended meanwhile: to `lease:*` streams (per run) and to
`engine:*` liveness records (per engine). Per-run renewals, the design before, appended one
`LeaseAcquired` to every live run's lease stream each ttl/3 to ttl/2, so K * 120/TTL to
K * 180/TTL appends per minute; the figure to compare is printed beside the measured one.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from engine_runs import spawn
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from keel_core.json_values import to_value

if TYPE_CHECKING:
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


async def heads(store: StoreServiceAsyncStub, prefix: str) -> dict[str, int]:
    """Head sequence of every stream whose id starts with `prefix` (its number of events)."""
    out: dict[str, int] = {}
    token = ""
    while True:
        page = await store.ListStreams(
            store_pb2.ListStreamsRequest(prefix=prefix, page_size=1000, page_token=token)
        )
        out.update((s.stream_id, s.head_seq) for s in page.streams)
        token = page.next_page_token
        if not token:
            return out


def appended(before: dict[str, int], after: dict[str, int]) -> int:
    """Events appended between two reads of the heads."""
    return sum(after.values()) - sum(before.values())


async def main() -> None:
    """Start the services, run the two phases, print, stop."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000, help="sleeping runs (default 1000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window (default 60)")
    parser.add_argument("--lease-ttl", type=float, default=10.0, help="engines' --lease-ttl (default 10)")
    parser.add_argument("--engines", type=int, default=1, help="engines sharing the store (default 1)")
    parser.add_argument("--short-runs", type=int, default=200, help="hot-path runs first (default 200)")
    args = parser.parse_args()
    ttl = args.lease_ttl
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as data:
        processes: list[asyncio.subprocess.Process] = []
        channels: list[grpc.aio.Channel] = []
        try:
            store_args = [str(BIN / "store-service"), "--listen", "127.0.0.1:0", "--data-dir", data]
            store_process, store_address = await spawn(
                [*store_args, "--log-level", "warning"], "store-service listening on"
            )
            processes.append(store_process)
            engine_args = [str(BIN / "engine-service"), "--listen", "127.0.0.1:0", "--store", store_address]
            engine_args += ["--lease-ttl", str(ttl), "--log-level", "warning"]
            engines = [await spawn(engine_args, "engine-service listening on") for _ in range(args.engines)]
            processes += [process for process, _ in engines]
            channels = [grpc.aio.insecure_channel(address) for _, address in engines]
            channels.append(grpc.aio.insecure_channel(store_address))
            stubs = [engine_pb2_grpc.EngineServiceStub(channel) for channel in channels[:-1]]
            store = store_pb2_grpc.StoreServiceStub(channels[-1])

            echo = engine_pb2.SingleOp(op_id="keel.echo", op_config=to_value({"k": 1}))
            for index in range(args.short_runs):
                response = await stubs[index % len(stubs)].StartRun(
                    engine_pb2.StartRunRequest(op=echo, wait=True), timeout=60
                )
                if response.run.status != engine_pb2.RUN_STATUS_COMPLETED:
                    raise RuntimeError(f"run {response.run_id} ended {response.run.status}")
            short_leases = sum((await heads(store, "lease:")).values())
            short_beats = sum((await heads(store, "engine:")).values())

            # Long enough to outlive the recording of every lease and the whole window.
            sleep = to_value({"seconds": args.seconds + 4 * ttl + 60})
            limit = asyncio.Semaphore(32)

            async def start(index: int) -> None:
                async with limit:
                    await stubs[index % len(stubs)].StartRun(
                        engine_pb2.StartRunRequest(
                            op=engine_pb2.SingleOp(op_id="keel.sleep_in_process", op_config=sleep)
                        ),
                        timeout=60,
                    )

            await asyncio.gather(*(start(index) for index in range(args.runs)))
            deadline = time.monotonic() + 10 * ttl + 60
            while len(await heads(store, "lease:")) < args.runs:
                if time.monotonic() > deadline:
                    raise RuntimeError("the sleeping runs' leases were not all recorded")
                await asyncio.sleep(ttl / 10)
            leases_before, engines_before = await heads(store, "lease:"), await heads(store, "engine:")
            began = time.monotonic()
            await asyncio.sleep(args.seconds)
            leases_after, engines_after = await heads(store, "lease:"), await heads(store, "engine:")
            window = time.monotonic() - began
        finally:
            for channel in channels:
                await channel.close(None)
            for process in processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                await process.wait()
    lease_appends = appended(leases_before, leases_after)
    beat_appends = appended(engines_before, engines_after)
    minutes = window / 60
    print(
        f"lease_upkeep: {args.runs} sleeping runs on {args.engines} engine(s), lease ttl {ttl:g}s, "
        f"{window:.1f}s window"
    )
    print(
        f"  hot path: {args.short_runs} short runs wrote {short_leases} lease event(s) "
        f"and {short_beats} heartbeat(s)"
    )
    print(f"  first acquisitions before the window: {sum(leases_before.values())} (one per sleeping run)")
    print(
        f"  lease streams:   {lease_appends:6d} appends in the window = "
        f"{lease_appends / args.runs / minutes:.3f} per run per minute"
    )
    print(
        f"  engine records:  {beat_appends:6d} appends in the window = "
        f"{beat_appends / args.engines / minutes:.1f} per engine per minute"
    )
    print(f"  lease upkeep in total: {(lease_appends + beat_appends) / window:.2f} store appends/s")
    low, high = args.runs * 120 / ttl, args.runs * 180 / ttl
    print(
        f"  per-run renewals (the design before) would append {low:.0f}-{high:.0f} per minute "
        f"= {low / 60:.0f}-{high / 60:.0f} appends/s for these runs"
    )


if __name__ == "__main__":
    asyncio.run(main())
