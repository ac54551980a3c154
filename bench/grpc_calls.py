"""What a gRPC round trip costs as a new unary call and as a message on an open call (grpc.aio).

Run: `.venv/bin/python bench/grpc_calls.py [--calls N] [--rounds R] [--bytes B]`

A bare grpc.aio server (a subprocess) echoes B bytes two ways: a unary method, and a bidirectional
stream that answers each message it reads. This process calls it N times one after the other each
way, alternated over R rounds, and prints the medians of the round trip and of the CPU each side
spent per round trip (user + system, from /proc). It is why the engine sends its appends as requests
on one long-lived `AppendEventsStream` call (see docs/performance.md, "Appends on an open call").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from typing import Any

import grpc
from engine_runs import cpu_seconds

SERVICE = "keel.bench.Calls"


async def serve() -> None:
    """The echo server: prints its port, serves until killed."""

    async def unary(request: bytes, context: Any) -> bytes:
        return request

    async def stream(requests: Any, context: Any) -> Any:
        async for request in requests:
            yield request

    handlers = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def measure(port: int, server_pid: int, calls: int, rounds: int, size: int) -> dict[str, list[float]]:
    """Per round and way: microseconds per round trip, client CPU and server CPU per round trip."""
    payload = b"x" * size
    figures: dict[str, list[float]] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary", request_serializer=None, response_deserializer=None)
        for _ in range(200):  # warm-up: the connection, the first calls
            await unary(payload)
        for round_no in range(rounds):
            ways = ("unary", "stream") if round_no % 2 == 0 else ("stream", "unary")
            for way in ways:
                client_before, server_before = time.process_time(), cpu_seconds(server_pid)
                began = time.perf_counter()
                if way == "unary":
                    for _ in range(calls):
                        await unary(payload)
                else:
                    call = channel.stream_stream(f"/{SERVICE}/Stream")()  # type: ignore[call-arg]
                    for _ in range(calls):
                        await call.write(payload)
                        await call.read()
                    await call.done_writing()
                elapsed = time.perf_counter() - began
                client = time.process_time() - client_before
                server = cpu_seconds(server_pid) - server_before
                for name, value in (("round trip", elapsed), ("client CPU", client), ("server CPU", server)):
                    figures.setdefault(f"{way} {name}", []).append(value * 1e6 / calls)
    return figures


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=5000, help="round trips per way and round (5000)")
    parser.add_argument("--rounds", type=int, default=4, help="alternated rounds (4)")
    parser.add_argument("--bytes", type=int, default=300, help="bytes echoed (300)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
        return
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        figures = asyncio.run(measure(port, server.pid, args.calls, args.rounds, args.bytes))
    finally:
        server.kill()
        server.wait()
    print(
        f"grpc_calls: {args.calls} sequential round trips of {args.bytes} bytes, "
        f"medians of {args.rounds} rounds"
    )
    for way in ("unary", "stream"):
        trip, client, served = (
            statistics.median(figures[f"{way} {n}"]) for n in ("round trip", "client CPU", "server CPU")
        )
        label = "a new unary call" if way == "unary" else "a message on an open call"
        print(
            f"  {label:<26} {trip:7.0f} us per round trip, "
            f"CPU {client:5.0f} us client, {served:5.0f} us server"
        )
    ratio = statistics.median(figures["stream server CPU"]) / statistics.median(figures["unary server CPU"])
    print(f"server CPU per round trip, open call vs new call: {ratio:.2f}x")


if __name__ == "__main__":
    main()
