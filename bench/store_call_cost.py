"""What a single-event append costs the store's main thread beyond a bare echo call, part by part.

Run: `.venv/bin/python bench/store_call_cost.py [--rounds 3] [--seconds 4] [--clients 64]`

Five servers, each its own process, answer unary calls from this process's clients in turn
(alternated over the rounds, so all see the same machine):

- `echo`: the bare grpc.aio echo server of `bench/store_append.py` (`bench/echo_server.py`);
- `echo-dressed`: the same method served as Keel serves its services (`start_server`: its options,
  health, reflection, the malformed-request interceptor) with the metrics interceptor;
- `echo-wrapped`: the same wrappers applied to the echo handler once, with no interceptors;
- `servicer`: the real `StoreServicer` served as the store serves it, over a backend whose append
  answers at once (no writer thread, no commit);
- `store`: the real `store-service` with full durability.

For each it prints calls/s and the main thread's CPU per call (the event loop's thread, where
requests are handled), medians of the rounds, then the differences: what Keel's serving adds to
a call, what the servicer adds, and what the write path adds to the main thread.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
from echo_server import METHOD, echo_handlers, echo_method_handler
from keel.store.v1 import store_pb2_grpc
from store_append import append_rate, echo_rate, server_process, with_main_thread_busy

from keel_core.metrics import MetricsInterceptor
from keel_core.serving import (
    DEFAULT_EVENT_LOOP,
    SERVER_OPTIONS,
    MalformedRequestInterceptor,
    run_service,
    start_server,
)
from store_service.backend import AppendResult, EventPair, Expected
from store_service.sqlite import SqliteStoreBackend
from store_service.wire import StoreServicer, register

SERVERS = ("echo", "echo-dressed", "echo-wrapped", "servicer", "store")
ANNOUNCED = r"^\S+ listening on (\S+)$"


class AnsweringAtOnce(SqliteStoreBackend):
    """A SQLite backend whose append answers at once and writes nothing: the servicer alone."""

    async def append(
        self, stream_id: str, expected: Expected, events: Sequence[EventPair], **_: Any
    ) -> AppendResult:
        """The answer an append at the expected head would get."""
        return AppendResult(expected.seq + 1, expected.seq + len(events), recorded_at_us=1)


async def serve(kind: str, data_dir: str) -> None:
    """Serve one of the scratch servers until killed; print `<kind> listening on HOST:PORT`."""
    plain = echo_method_handler()
    if kind == "echo-wrapped":
        server = grpc.aio.server(options=SERVER_OPTIONS)
        # As start_server's interceptors would wrap it: metrics outermost.
        guarded = MalformedRequestInterceptor().wrap(plain, METHOD)
        server.add_generic_rpc_handlers(echo_handlers(MetricsInterceptor().wrap(guarded, METHOD)))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    else:
        registrations: Callable[[grpc.aio.Server], Iterable[str]]
        if kind == "servicer":
            backend = AnsweringAtOnce.in_directory(data_dir)
            await backend.open()
            servicer = StoreServicer(backend)
            registrations = lambda server: register(server, servicer)  # noqa: E731
        else:

            def registrations(server: grpc.aio.Server) -> Iterable[str]:
                server.add_generic_rpc_handlers(echo_handlers(plain))
                return []

        # The handle is kept: the server lives as long as it does.
        served = await start_server("127.0.0.1:0", registrations, interceptors=[MetricsInterceptor()])
        port = served.port
    print(f"{kind} listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


async def measure(
    addresses: dict[str, tuple[int, str]], rounds: int, seconds: float, clients: int
) -> dict[str, list[tuple[float, float]]]:
    """(calls/s, main-thread CPU µs per call) of each server in each round, servers in turn."""
    figures: dict[str, list[tuple[float, float]]] = {kind: [] for kind in addresses}
    for round_no in range(rounds):
        for kind, (pid, address) in addresses.items():
            async with grpc.aio.insecure_channel(address) as channel:
                if kind.startswith("echo"):
                    rate = echo_rate(channel, clients, seconds)
                else:
                    stub = store_pb2_grpc.StoreServiceStub(channel)
                    rate = append_rate(stub, clients, seconds, 1, f"{kind}-r{round_no}")
                per_second, busy = await with_main_thread_busy(pid, rate)
            figures[kind].append((per_second, busy * 1e6 / per_second))
    return figures


def report(figures: dict[str, list[tuple[float, float]]], clients: int) -> None:
    """Medians and rounds of each server, and the differences between them, taken within each
    round (the servers of one round ran back to back) and given as their median and range."""
    cost = {kind: [us for _, us in rounds] for kind, rounds in figures.items()}
    print(f"store_call_cost: {clients} clients, unary calls (single-event appends for the store), medians")
    for kind, rounds in figures.items():
        rate = statistics.median(per_second for per_second, _ in rounds)
        spread = ", ".join(f"{us:.0f}" for us in cost[kind])
        median = statistics.median(cost[kind])
        print(f"  {kind:13s} {rate:8,.0f} calls/s   main thread {median:5.0f} us per call  ({spread})")
    parts = [
        ("Keel's serving (interceptors, wrappers, options)", "echo-dressed", "echo"),
        ("  of which the interceptors' calls", "echo-dressed", "echo-wrapped"),
        ("the servicer (protobuf, checks, answer)", "servicer", "echo-dressed"),
        ("the write path, on the main thread", "store", "servicer"),
    ]
    print("  differences within each round, median (range):")
    for name, more, less in parts:
        each = [a - b for a, b in zip(cost[more], cost[less], strict=True)]
        middle, low, high = statistics.median(each), min(each), max(each)
        print(f"  {name:50s} {middle:+5.0f} us per call  ({low:+.0f} to {high:+.0f})")
    ratios = [a / b for a, b in zip(cost["echo"], cost["store"], strict=True)]
    print(f"  echo's main-thread CPU per call against the store's: {statistics.median(ratios):.2f}x")


def main() -> None:
    """Start the five servers, measure in turn, report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per server and round (default 4)")
    parser.add_argument("--clients", type=int, default=64)
    # A scratch server, started by this script itself:
    parser.add_argument("--serve", choices=SERVERS[1:4], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run_service(serve(args.serve, args.data_dir), DEFAULT_EVENT_LOOP)
        return
    python = sys.executable
    here = Path(__file__)
    with tempfile.TemporaryDirectory(prefix="keel-call-cost-") as data_dir, ExitStack() as servers:
        scratch = Path(data_dir, "servicer")  # the answering-at-once backend's own file
        scratch.mkdir()
        commands = {
            "echo": [python, str(here.with_name("echo_server.py")), "--listen", "127.0.0.1:0"],
            **{
                kind: [python, str(here), "--serve", kind, "--data-dir", str(scratch)]
                for kind in SERVERS[1:4]
            },
            "store": [
                str(Path(python).with_name("store-service")),
                *("--listen", "127.0.0.1:0", "--data-dir", data_dir, "--log-level", "warning"),
            ],
        }
        addresses = {}
        for kind, command in commands.items():
            process, address = servers.enter_context(server_process(command, ANNOUNCED))
            addresses[kind] = (process.pid, address)
        figures = asyncio.run(measure(addresses, args.rounds, args.seconds, args.clients))
    report(figures, args.clients)


if __name__ == "__main__":
    main()
