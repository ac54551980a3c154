"""A subscription on a store replica that stalls (SIGSTOP) goes on through another replica.

Real processes: two store replicas on one PostgreSQL schema. The replica stops answering but its
TCP connection stays up; only the channel's keepalive pings can tell, and then the subscription
resumes on the other replica from the last event it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import pytest

from engine_service.store import StreamEvent
from engine_service.store.grpc_client import StoreClient
from tests.engine.processes import start_postgres_store_process
from tests.store.postgres_schemas import fresh_schema

pytestmark = pytest.mark.slow

WAIT = 120.0
STREAM = "run:stalled-subscription"


async def test_a_subscription_on_a_stalled_replica_resubscribes_on_the_other(postgres_dsn: str) -> None:
    async with fresh_schema(postgres_dsn) as schema:
        stores = [await start_postgres_store_process(postgres_dsn, schema) for _ in range(2)]
        # A fresh client's first call goes to its first replica: the subscription is on stores[0].
        watcher = StoreClient(",".join(store.address for store in stores))
        writer = StoreClient(stores[1].address)
        subscription = watcher.subscribe(STREAM)
        try:
            await writer.append(STREAM, [("First", b"1")], expected_seq=None)
            first: StreamEvent = await asyncio.wait_for(anext(subscription), WAIT)
            assert first.seq == 1
            stores[0].process.send_signal(signal.SIGSTOP)
            await writer.append(STREAM, [("Second", b"2")], expected_seq=1)
            second = await asyncio.wait_for(anext(subscription), WAIT)
            assert (second.seq, second.type) == (2, "Second")  # through stores[1], nothing missed
        finally:
            stores[0].process.send_signal(signal.SIGCONT)
            with contextlib.suppress(Exception):
                await subscription.aclose()
            await watcher.close()
            await writer.close()
            for store in stores:
                await store.kill()
