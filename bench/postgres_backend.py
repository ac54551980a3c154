"""Appends/s and artifact MB/s of PostgresStoreBackend, driven directly (no gRPC in the way).

Run: `.venv/bin/python bench/postgres_backend.py [--dsn DSN] [--appends N]`

Each case runs on a fresh schema (dropped afterwards) with N appends per client, after a warm-up
round. It prints single-event appends with 1 client and with 64 clients on distinct streams (for
1, 2 and 4 writers, and with durability normal), 64 clients appending with ANY to one stream,
100-event batches, and the same 64-client load with group commit switched off (one append per
transaction), with the same-run ratio grouped/ungrouped. Figures on a shared 2-core machine move
with everything else running on it; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

import store_service.postgres.backend as postgres
from store_service.backend import Expected, NewEvent
from store_service.postgres import PostgresStoreBackend

DEFAULT_DSN = os.environ.get("KEEL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


async def _with_backend(dsn: str, options: dict[str, Any]) -> tuple[PostgresStoreBackend, str]:
    schema = f"keel_bench_{secrets.token_hex(4)}"
    backend = PostgresStoreBackend(dsn, schema=schema, **options)
    await backend.open()
    return backend, schema


async def _drop(dsn: str, backend: PostgresStoreBackend, schema: str) -> None:
    await backend.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


async def appends_per_second(
    dsn: str, clients: int, per_client: int, batch: int, one_stream: bool, **options: Any
) -> float:
    """Appends/s of `clients` concurrent callers making `per_client` appends of `batch` events."""
    backend, schema = await _with_backend(dsn, options)
    events = [NewEvent("Bench", b"x" * 200)] * batch
    try:

        async def client(name: str) -> None:
            for n in range(per_client):
                if one_stream:
                    await backend.append("shared", Expected.any(), events)
                else:
                    await backend.append(name, Expected.exact(n * batch), events)

        await asyncio.gather(*(client(f"warm-{i}") for i in range(clients)))
        started = time.perf_counter()
        await asyncio.gather(*(client(f"c-{i}") for i in range(clients)))
        return clients * per_client / (time.perf_counter() - started)
    finally:
        await _drop(dsn, backend, schema)


async def artifact_mb_per_second(dsn: str, mib: int) -> tuple[float, float]:
    """MB/s of putting and then getting one `mib` MiB artifact."""
    backend, schema = await _with_backend(dsn, {})
    block = os.urandom(1 << 20)

    async def source() -> AsyncIterator[bytes]:
        for i in range(mib):
            yield i.to_bytes(8, "big") + block[8:]

    try:
        started = time.perf_counter()
        put = await backend.put_artifact("bench", source())
        put_rate = mib / (time.perf_counter() - started)
        started = time.perf_counter()
        download = await backend.get_artifact(put.artifact_id)
        async for _chunk in download.chunks:
            pass
        return put_rate, mib / (time.perf_counter() - started)
    finally:
        await _drop(dsn, backend, schema)


async def main() -> None:
    """Run every case and print one line each."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--appends", type=int, default=100, help="appends per client (default 100)")
    args = parser.parse_args()
    dsn, per = args.dsn, args.appends

    def show(label: str, rate: float, batch: int = 1) -> None:
        print(f"{label:55s} {rate:9.0f} appends/s {rate * batch:10.0f} events/s", flush=True)

    show("1 client, single events", await appends_per_second(dsn, 1, per * 4, 1, False))
    grouped = 0.0
    for writers in (1, 2, 4):
        rate = await appends_per_second(dsn, 64, per, 1, False, writers=writers)
        grouped = max(grouped, rate)
        show(f"64 clients, distinct streams, {writers} writer(s)", rate)
    show(
        "64 clients, distinct streams, durability normal",
        await appends_per_second(dsn, 64, per, 1, False, durability="normal"),
    )
    show("64 clients, ANY on one stream", await appends_per_second(dsn, 64, per, 1, True))
    show(
        "16 clients, 100-event batches", await appends_per_second(dsn, 16, max(1, per // 3), 100, False), 100
    )
    group_limit = postgres.MAX_GROUP_APPENDS
    postgres.MAX_GROUP_APPENDS = 1  # one append per transaction: what group commit saves
    try:
        ungrouped = await appends_per_second(dsn, 64, per, 1, False, writers=9)
    finally:
        postgres.MAX_GROUP_APPENDS = group_limit
    show("64 clients, NO group commit (9 writers)", ungrouped)
    print(f"group commit speed-up (best grouped / ungrouped, same run): {grouped / ungrouped:.1f}x")
    put_rate, get_rate = await artifact_mb_per_second(dsn, 64)
    print(f"artifact 64 MiB: put {put_rate:.0f} MB/s, get {get_rate:.0f} MB/s")


if __name__ == "__main__":
    asyncio.run(main())
