"""A TCP forwarder on 127.0.0.1 that a test can cut: a database outage without stopping the database.

Cutting it resets every forwarded connection and closes the listening socket, so clients see what
they see when PostgreSQL goes down (connections lost mid-use, new ones refused), while the real
server keeps serving everyone else's tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


class CuttableTcpProxy:
    """Forwards 127.0.0.1:<port> to a target address until `cut()`, and again after `restore()`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Connections `stall()` froze: open, silent, closed only by `close()`.
        self._stalled: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Listen (on a fresh port the first time, on the same port after a cut)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and reset every open one, as a crashed server would."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER 0: close with RST, so the peer learns at once instead of on timeout.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stall(self) -> None:
        """Stop moving bytes on every open connection but keep it open: a silent network failure.

        New connections are still forwarded.
        """
        self._stalled.update(self._writers)
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def restore(self) -> None:
        """Accept connections again on the same port."""
        await self.start()

    async def close(self) -> None:
        """Stop forwarding for good."""
        await self.cut()
        for writer in self._stalled:
            writer.transport.abort()
        self._stalled.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, upstream_writer))
        pumps = [
            asyncio.create_task(self._pump(reader, upstream_writer)),
            asyncio.create_task(self._pump(upstream_reader, writer)),
        ]
        self._tasks.update(pumps)
        for pump in pumps:
            pump.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        except asyncio.CancelledError:
            if writer in self._stalled:
                return  # stalled: leave the connection open and silent
            raise
        writer.transport.abort()
        self._writers.discard(writer)
