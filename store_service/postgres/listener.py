"""One LISTEN connection per store replica, kept alive across outages, fanning NOTIFYs out locally.

`append_group` calls `pg_notify(channel, stream_id)` inside the append's transaction, so PostgreSQL
delivers the notification to every listening replica exactly when the append commits (and never
for a rolled-back one). The listener hands each stream id to `on_notify`. Notifications sent while
the connection is down are lost for good, so after every reconnect it calls `on_reconnect`, whose
job is to make every subscriber re-read its stream: nothing committed meanwhile is missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from store_service.postgres.errors import translate_error

log = logging.getLogger(__name__)

# Reconnect back-off: quick at first (a terminated session), slower while the server is down.
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 2.0
# How often an idle LISTEN connection is checked for being alive, and how long the check may take.
LIVENESS_CHECK_S = 30.0
LIVENESS_TIMEOUT_S = 10.0

Connect = Callable[[], Awaitable["asyncpg.Connection[asyncpg.Record]"]]


class PostgresListener:
    """LISTENs on `channel` over its own connection, reconnecting with back-off when it is lost."""

    def __init__(
        self,
        connect: Connect,
        channel: str,
        on_notify: Callable[[str], None],
        on_reconnect: Callable[[], None],
    ) -> None:
        self._connect = connect
        self.channel = channel
        self._on_notify = on_notify
        self._on_reconnect = on_reconnect
        self.connection: asyncpg.Connection[asyncpg.Record] | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """LISTEN now (errors propagate: a store must not start deaf), then keep it up."""
        await self._listen()
        self._task = asyncio.create_task(self._keep_listening(), name=f"pg-listen:{self.channel}")

    async def stop(self) -> None:
        """Stop listening and drop the connection."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.connection is not None:
            self.connection.terminate()

    def _deliver(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._on_notify(str(payload))

    async def _listen(self) -> None:
        conn = await self._connect()
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            await conn.add_listener(self.channel, self._deliver)
        except BaseException:
            conn.terminate()
            raise
        if conn.is_closed():  # lost before the termination listener was in place
            lost.set()
        self.connection, self._lost = conn, lost

    async def _until_lost(self) -> None:
        """Return when the connection is lost, or turns out dead when checked now and then.

        A connection can die without a word (a network partition, a host gone): the check is a
        liveness probe of the connection, not a poll for events.
        """
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), LIVENESS_CHECK_S)
                return
            except TimeoutError:
                pass
            try:
                assert self.connection is not None
                await self.connection.fetchval("SELECT 1", timeout=LIVENESS_TIMEOUT_S)
            except Exception as error:
                log.warning("LISTEN connection failed its liveness check: %s", translate_error(error))
                return

    async def _keep_listening(self) -> None:
        while True:
            await self._until_lost()
            if self.connection is not None:
                self.connection.terminate()
            log.warning("LISTEN connection to PostgreSQL lost; reconnecting")
            delay = RECONNECT_MIN_S
            while True:
                await asyncio.sleep(delay)
                try:
                    await self._listen()
                    break
                except Exception as error:
                    log.warning("LISTEN reconnect failed: %s", translate_error(error))
                    delay = min(delay * 2, RECONNECT_MAX_S)
            log.info("LISTEN connection to PostgreSQL re-established")
            self._on_reconnect()


__all__ = ["RECONNECT_MAX_S", "RECONNECT_MIN_S", "PostgresListener"]
