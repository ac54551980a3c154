"""A bare grpc.aio unary echo server: the ceiling the store benchmark is compared against.

Run: `python bench/echo_server.py [--listen 127.0.0.1:0] [--event-loop asyncio|uvloop]`; prints
`echo listening on HOST:PORT`.
The method `/keel.bench.Echo/Echo` returns the request bytes untouched (no protobuf parsing).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc

from keel_core.serving import DEFAULT_EVENT_LOOP, EVENT_LOOPS, run_service

METHOD = "/keel.bench.Echo/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


def echo_method_handler() -> grpc.RpcMethodHandler[Any, Any]:
    """The bare echo method's handler (raw bytes in and out)."""
    return grpc.unary_unary_rpc_method_handler(_echo)


def echo_handlers(handler: grpc.RpcMethodHandler[Any, Any]) -> list[grpc.GenericRpcHandler[Any, Any]]:
    """`handler` served as METHOD, for `add_generic_rpc_handlers`."""
    service, method = METHOD.strip("/").split("/")
    return [grpc.method_handlers_generic_handler(service, {method: handler})]


async def serve(listen: str) -> None:
    """Serve the echo method until SIGTERM/SIGINT."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(echo_handlers(echo_method_handler()))
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rpartition(":")[0]
    print(f"echo listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    """Parse --listen and --event-loop, and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=DEFAULT_EVENT_LOOP)
    args = parser.parse_args()
    run_service(serve(args.listen), args.event_loop)


if __name__ == "__main__":
    main()
