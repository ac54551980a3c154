"""`engine-service --console HOST:PORT`: the web console, served by the engine's own process.

It is the same console as `keel ui` (keel_client.console) and, like it, talks to this engine only
through its public gRPC API: a client of the engine's own address, with the engine's bearer token
when one is required. It needs the client's `console` extra (Starlette, uvicorn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A wildcard listen address is reached on the loopback address of its family.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


@dataclass
class EngineConsole:
    """A console served beside an engine; `close` stops it (before the engine drains)."""

    url: str
    server: Any  # keel_client.console.ConsoleServer
    client: Any  # keel_client.AsyncKeelClient

    async def close(self) -> None:
        """Stop serving (open event streams end), then close the console's channel to the engine."""
        await self.server.stop()
        await self.client.close()


def engine_target(listen_host: str, port: int) -> str:
    """The address the console dials for an engine listening on `listen_host` and `port`."""
    host = _LOOPBACK.get(listen_host, listen_host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_console(listen: str, target: str, auth_token: str | None) -> EngineConsole:
    """Serve the console on `listen` for the engine at `target` (ImportError without the extra)."""
    try:
        from keel_client import AsyncKeelClient
        from keel_client.console import ConsoleServer, create_app
    except ImportError as error:
        raise ImportError(
            f"--console needs the console extra ({error.name} is missing): "
            "pip install 'keel-client[console]' (or './clients/python[console]' in a checkout)"
        ) from None
    client = AsyncKeelClient(target, token=auth_token)
    try:
        server = ConsoleServer(create_app(client), listen)
        await server.start()
    except BaseException:
        await client.close()
        raise
    return EngineConsole(server.url, server, client)
