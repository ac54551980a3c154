"""`keel ui`: the web console for an engine, served until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from keel_client.cli.options import CliError, async_client, print_json
from keel_core.launcher import stop_with_launcher

DEFAULT_LISTEN = "127.0.0.1:7080"


def ui_arguments(parser: argparse.ArgumentParser) -> None:
    """`keel ui [--listen HOST:PORT] [--refresh SECONDS]`."""
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where to serve the console (port 0 picks one; default {DEFAULT_LISTEN}); it has no "
        "login of its own: keep it on loopback or behind an authenticating proxy",
    )
    parser.add_argument(
        "--refresh",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often the runs page re-reads its page (default 2)",
    )


def cmd_ui(args: argparse.Namespace) -> int:
    """`keel ui`: print the console's URL, serve it until a signal."""
    try:
        from keel_client.console import ConsoleServer, create_app
    except ImportError as error:
        raise CliError(
            f"keel ui needs the console extra ({error.name} is missing): "
            "pip install 'keel-client[console]' (or './clients/python[console]' in a checkout)"
        ) from None
    if not args.refresh > 0:
        raise CliError(f"--refresh must be a positive number of seconds, not {args.refresh}")
    stop_with_launcher()

    async def serve() -> None:
        async with async_client(args) as client:
            try:
                server = ConsoleServer(create_app(client, refresh_seconds=args.refresh), args.listen)
            except (OSError, ValueError) as error:
                raise CliError(f"cannot listen on {args.listen}: {error}") from None
            await server.start()
            if args.json:
                print_json({"console": server.url, "engine": args.engine})
                sys.stdout.flush()
            else:
                print(f"keel ui: console on {server.url} (engine {args.engine}); Ctrl-C stops it", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            await stop.wait()
            await server.stop()

    asyncio.run(serve())
    return 0
