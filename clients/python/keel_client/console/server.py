"""Serving the console with uvicorn inside the caller's event loop: `keel ui`, `engine-service --console`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import uvicorn
from starlette.types import ASGIApp

# Open event streams are cut after this long when the console stops.
STOP_GRACE_SECONDS = 2


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its host (`keel ui`, the engine), which stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        """No signal handlers of its own: the host process decides when to stop."""
        yield


def bind(listen: str) -> socket.socket:
    """A listening TCP socket on HOST:PORT (port 0 picks one; `[::1]:PORT` for IPv6)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {listen!r} is not HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


class ConsoleServer:
    """An ASGI app served on HOST:PORT by uvicorn, started and stopped from the running event loop."""

    def __init__(self, app: ASGIApp, listen: str) -> None:
        self._socket = bind(listen)
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=STOP_GRACE_SECONDS,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None
        host, port = self._socket.getsockname()[:2]
        self.url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    async def start(self) -> None:
        """Serve in a task of this loop; returns once uvicorn accepts connections."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it stopped
                raise RuntimeError("the console stopped as it started")
            await asyncio.sleep(0.01)

    async def wait(self) -> None:
        """Until the server stops."""
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        """Stop accepting, end open connections (event streams within STOP_GRACE_SECONDS)."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._socket.close()
