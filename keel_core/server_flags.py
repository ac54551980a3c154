"""The flags every Keel server takes (listen, drain grace, TLS, metrics, event loop, logs), once.

`add_server_flags` adds them to a service's parser, each defaulting to the service's own
environment variable (`<PREFIX>_LISTEN`, `<PREFIX>_TLS_CERT`, ...); `ServerFlags.from_args`
reads them back as what a server is built from, and `run_server` builds and runs it;
`serve_announced` serves a started server the way both services do: the address line on stdout
(a contract that launchers parse), then until SIGTERM or SIGINT, then a drain.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from keel_core.launcher import stop_with_launcher
from keel_core.logs import configure_logging
from keel_core.security import TlsFiles
from keel_core.serving import (
    DEFAULT_EVENT_LOOP,
    EVENT_LOOPS,
    ServingHandle,
    host_port,
    run_service,
    serve_until_signalled,
)

LOG_LEVELS = ("debug", "info", "warning", "error")
# Net allocations between two collections of the youngest generation (700 by default through Python
# 3.13; 3.14's incremental collector reads the thresholds differently). A served call allocates a few
# hundred objects that live for its length, so at 700 the collector ran several times per run and
# carried the calls in flight into older generations, to be scanned again there (with the cycles of
# finished runs, 5-7% of the engine's CPU under bench/engine_runs.py; about 1% now: docs/performance.md).
YOUNG_COLLECTION_THRESHOLD = 10_000
C = TypeVar("C")


@dataclass(frozen=True)
class ServerFlagNames:
    """How one service words its common flags: its variables' prefix and what differs in the help."""

    # Prefix of the environment variables, e.g. "KEEL_STORE".
    env_prefix: str
    default_listen: str
    # Help of --tls-client-ca: who may connect under mutual TLS.
    client_ca_help: str
    # Help of --log-level, before the variable and default.
    log_help: str = "log level; logs are JSON lines on stderr"


def add_server_flags(parser: argparse.ArgumentParser, names: ServerFlagNames) -> None:
    """Add the common server flags to `parser`, in a group of their own."""
    prefix = names.env_prefix
    env = os.environ.get
    group = parser.add_argument_group("serving")
    group.add_argument(
        "--listen",
        default=env(f"{prefix}_LISTEN", names.default_listen),
        help=f"HOST:PORT to serve on; port 0 picks a free one [{prefix}_LISTEN] "
        f"(default {names.default_listen})",
    )
    group.add_argument(
        "--grace",
        type=float,
        default=env(f"{prefix}_GRACE", "10"),
        help=f"seconds a drain lets in-flight calls finish [{prefix}_GRACE] (default 10)",
    )
    _add_tls_flags(group, names)
    group.add_argument(
        "--metrics-listen",
        default=env(f"{prefix}_METRICS_LISTEN") or None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; port 0 picks one "
        f"[{prefix}_METRICS_LISTEN] (default: off)",
    )
    group.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=env(f"{prefix}_EVENT_LOOP") or env("KEEL_EVENT_LOOP") or DEFAULT_EVENT_LOOP,
        help="asyncio event loop to serve on: asyncio, uvloop (needs the uvloop package), or auto "
        f"(uvloop when installed) [{prefix}_EVENT_LOOP, else KEEL_EVENT_LOOP] "
        f"(default {DEFAULT_EVENT_LOOP})",
    )
    group.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=env(f"{prefix}_LOG_LEVEL", "info"),
        help=f"{names.log_help} [{prefix}_LOG_LEVEL] (default info)",
    )


def _add_tls_flags(group: argparse._ArgumentGroup, names: ServerFlagNames) -> None:
    prefix = names.env_prefix
    group.add_argument(
        "--tls-cert",
        default=os.environ.get(f"{prefix}_TLS_CERT"),
        metavar="PEM",
        help=f"serve TLS with this certificate chain (needs --tls-key) [{prefix}_TLS_CERT] "
        "(default: plaintext)",
    )
    group.add_argument(
        "--tls-key",
        default=os.environ.get(f"{prefix}_TLS_KEY"),
        metavar="PEM",
        help=f"private key of --tls-cert [{prefix}_TLS_KEY]",
    )
    group.add_argument(
        "--tls-client-ca",
        default=os.environ.get(f"{prefix}_TLS_CLIENT_CA"),
        metavar="PEM",
        help=f"{names.client_ca_help} [{prefix}_TLS_CLIENT_CA]",
    )


def parse_server_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse `argv`, then check values that came from the environment against `choices` too.

    argparse checks `choices` on the command line only; without this, a typo in an environment
    variable would silently pick something else instead of failing loudly.
    """
    args = parser.parse_args(argv)
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.choices is not None and value not in action.choices:
            parser.error(
                f"argument {action.option_strings[0]}: invalid choice {value!r} (from the environment)"
            )
    return args


@dataclass(frozen=True)
class ServerFlags:
    """The common server settings as parsed: what a server is built and run from."""

    listen: str
    grace: float
    tls: TlsFiles | None
    metrics_listen: str | None
    event_loop: str
    log_level: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerFlags:
        """Read the flags `add_server_flags` added; raises ValueError for an incomplete TLS pair."""
        return cls(
            listen=args.listen,
            grace=args.grace,
            tls=TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_client_ca),
            metrics_listen=args.metrics_listen,
            event_loop=args.event_loop,
            log_level=args.log_level,
        )


def run_server(
    args: argparse.Namespace,
    config_of: Callable[[argparse.Namespace, ServerFlags], C],
    serve: Callable[[C], Coroutine[Any, Any, None]],
) -> None:
    """Build a server from parsed flags and run it: logs first, then its config, then `serve` on its loop.

    A server started by `keel up` is tied to it before anything else (keel_core.launcher): it gets
    SIGTERM when `keel up` dies. Errors in the flags (an incomplete TLS pair, a missing token file)
    and in start-up propagate, already with logging configured, for the service's `main` to report
    as it does.
    """
    configure_logging(args.log_level)
    stop_with_launcher()
    flags = ServerFlags.from_args(args)
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)
    run_service(serve(config_of(args, flags)), flags.event_loop)


def transport_name(tls: TlsFiles | None) -> str:
    """How a server with `tls` is reached, for its start-up log line."""
    if tls is None:
        return "plaintext"
    return "mutual TLS" if tls.client_ca else "TLS"


class Served(Protocol):
    """What `serve_announced` needs of a service's config: where it listens, how long a drain is."""

    @property
    def listen(self) -> str:
        """HOST:PORT as configured (the port may be 0)."""

    @property
    def grace(self) -> float:
        """Seconds a drain lets in-flight calls finish."""


class HasUrl(Protocol):
    """An endpoint that says where it is (the metrics endpoint)."""

    @property
    def url(self) -> str:
        """The endpoint's URL."""


async def serve_announced(
    prog: str,
    handle: ServingHandle,
    config: Served,
    metrics: HasUrl | None,
    log: logging.Logger,
    details: str,
    also: Sequence[str] = (),
) -> None:
    """Announce the bound address on stdout (then the metrics URL and the lines `also` holds), serve
    until a signal, drain."""
    host, _ = host_port(config.listen)
    address = f"{host}:{handle.port}" if ":" not in host else f"[{host}]:{handle.port}"
    print(f"{prog} listening on {address}", flush=True)
    if metrics is not None:
        print(f"{prog} metrics on {metrics.url}", flush=True)
    for line in also:
        print(line, flush=True)
    log.info("serving on %s (%s)", address, details)
    await serve_until_signalled(handle, config.grace)
    log.info("stopped")


__all__ = [
    "LOG_LEVELS",
    "HasUrl",
    "Served",
    "ServerFlagNames",
    "ServerFlags",
    "add_server_flags",
    "parse_server_args",
    "run_server",
    "serve_announced",
    "transport_name",
]
