"""What retention costs: the renewal of re-stored artifacts on PostgreSQL appends, and a pass's speed.

Run: `.venv/bin/python bench/retention.py [--dsn DSN] [--appends N] [--runs N]`

1. PostgreSQL appends carrying one fresh 1 KiB artifact each (a step's checkpoint), 64 clients on
   distinct streams, with the statement that renews re-stored artifacts before append_group (what
   the store runs) and with a statement that skips the renewal, alternating rounds on one schema;
   prints appends/s of both and the same-run ratio.
2. Retention over N finished two-step runs (a real store and engine in this process, SQLite): an
   artifact collection's mark over their streams, then a pass that deletes them all and collects
   their artifacts; runs deleted per second and the same-run ratio mark / pass.

Figures on a shared 2-core machine move with everything else running on it; compare ratios within
one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import tempfile
import time
from typing import Any

import asyncpg
import grpc
from keel.engine.v1 import engine_pb2, engine_pb2_grpc

import store_service.postgres.backend as postgres
from engine_service import EngineConfig, start_engine
from keel_core.json_values import to_value
from store_service.backend import Expected, NewArtifact, NewEvent
from store_service.postgres import PostgresStoreBackend
from store_service.server import StoreConfig, start_store

DEFAULT_DSN = os.environ.get("KEEL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
CLIENTS = 64
# The same call without the renewal (it still takes the 16th argument, which it ignores).
_WITHOUT_RENEWAL = postgres._APPEND_GROUP.replace("$15::text)", "$15::text) WHERE $16::int8 IS NOT NULL")


async def _appends(backend: PostgresStoreBackend, round_id: str, appends: int) -> float:
    async def client(number: int) -> None:
        stream = f"bench:{round_id}:{number}"
        for seq in range(appends):
            artifact = NewArtifact("snapshot", secrets.token_bytes(1024))
            await backend.append(
                stream, Expected.exact(seq), [NewEvent("StepCompleted", b"{}")], artifacts=[artifact]
            )

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return CLIENTS * appends / (time.perf_counter() - started)


async def renewal(dsn: str, appends: int, rounds: int = 3) -> None:
    """Appends/s with and without the renewal, alternating rounds."""
    schema = f"keel_bench_{secrets.token_hex(4)}"
    backend = PostgresStoreBackend(dsn, schema=schema)
    await backend.open()
    renewing = postgres._APPEND_GROUP_RENEWING
    rates: dict[str, list[float]] = {"with renewal": [], "without": []}
    try:
        await _appends(backend, "warm-up", 5)
        for number in range(rounds):
            for name, statement in (("with renewal", renewing), ("without", _WITHOUT_RENEWAL)):
                postgres._APPEND_GROUP_RENEWING = statement
                rates[name].append(await _appends(backend, f"{name}-{number}", appends))
    finally:
        postgres._APPEND_GROUP_RENEWING = renewing
        await backend.close()
        conn = await asyncpg.connect(dsn)
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()
    best = {name: max(values) for name, values in rates.items()}
    print(f"PostgreSQL, {CLIENTS} clients, appends with one fresh 1 KiB artifact (best of {rounds} rounds):")
    for name, value in best.items():
        print(f"  {name:13s} {value:8.0f} appends/s")
    print(f"  ratio with/without renewal: {best['with renewal'] / best['without']:.2f}")


async def retention_pass(runs: int) -> None:
    """Runs deleted per second by one pass over `runs` finished runs."""
    with tempfile.TemporaryDirectory() as data:
        store = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=data, allow_deletes=True))
        address = f"127.0.0.1:{store.port}"
        engine = await start_engine(EngineConfig(listen="127.0.0.1:0", store=address, failpoints=""))
        assert engine.engine is not None
        retention = engine.engine.retention
        retention.artifact_grace = 0.0
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
                stub = engine_pb2_grpc.EngineServiceStub(channel)
                steps: Any = [
                    engine_pb2.Step(step_id="a", op_id="keel.echo"),
                    engine_pb2.Step(step_id="b", op_id="keel.echo", depends_on=["a"]),
                ]
                request = engine_pb2.StartRunRequest(
                    pipeline=engine_pb2.Pipeline(pipeline_id="bench", steps=steps), wait=True
                )
                for number in range(runs):
                    request.input.CopyFrom(to_value({"n": number}))  # distinct manifests and outputs
                    await stub.StartRun(request)
            started = time.perf_counter()
            kept = await retention.collect_artifacts()  # every artifact is referenced: a mark, no sweep
            mark_seconds = time.perf_counter() - started
            started = time.perf_counter()
            deleted = await retention.pass_once(0.0, sweep=False)  # deletes, then collects
            pass_seconds = time.perf_counter() - started
        finally:
            await engine.drain(1.0)
            await store.drain(1.0)
    print(f"retention over {runs} finished two-step runs (SQLite, in-process store and engine):")
    print(f"  an artifact collection over their streams (mark only, {kept} deleted): {mark_seconds:.2f} s")
    print(
        f"  a pass deleting them ({deleted.streams} streams) and collecting {deleted.artifacts} artifacts: "
        f"{pass_seconds:.2f} s, {len(deleted.runs) / pass_seconds:.0f} runs/s; "
        f"mark / pass: {mark_seconds / pass_seconds:.2f}"
    )


def main() -> None:
    """Run both benchmarks."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--appends", type=int, default=50, help="appends per client per round (default 50)")
    parser.add_argument("--runs", type=int, default=300, help="runs for the retention pass (default 300)")
    args = parser.parse_args()
    asyncio.run(renewal(args.dsn, args.appends))
    asyncio.run(retention_pass(args.runs))


if __name__ == "__main__":
    main()
