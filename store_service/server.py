"""Running StoreService: `store-service` on the command line, `start_store` in-process.

The one line `store-service listening on HOST:PORT` on stdout (port resolved when 0 was asked)
is a contract: the engine's launcher and `keel up` parse it. Logs go to stderr as JSON lines.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from keel_core.errors import KeelError
from keel_core.logs import configure_logging
from keel_core.metrics import MetricsEndpoint, MetricsInterceptor, serve_metrics
from keel_core.security import BearerTokenInterceptor, TlsFiles, token_from_flags
from keel_core.serving import (
    DEFAULT_EVENT_LOOP,
    EVENT_LOOPS,
    ServerInterceptor,
    ServingHandle,
    host_port,
    run_service,
    serve_until_signalled,
    start_server,
)
from store_service.backend import StoreBackend
from store_service.limits import DEFAULT_MAX_ARTIFACT_BYTES
from store_service.servicer import StoreServicer, register
from store_service.sqlite import Durability, SqliteStoreBackend

log = logging.getLogger("store_service")

DEFAULT_LISTEN = "127.0.0.1:7071"
DEFAULT_DATA_DIR = "keel-data"


@dataclass(frozen=True)
class StoreConfig:
    """How to run a store: where it listens, where its data lives, and how durable commits are."""

    listen: str = DEFAULT_LISTEN
    data_dir: str | Path = DEFAULT_DATA_DIR
    durability: Durability = "full"
    backend: str = "sqlite"
    # Connection string for network backends (PostgreSQL); unused by sqlite.
    dsn: str | None = None
    # PostgreSQL schema holding Keel's tables; replicas sharing a schema share the data.
    pg_schema: str = "keel"
    # Seconds SIGTERM/drain lets in-flight RPCs finish before cancelling them.
    grace: float = 10.0
    # TLS (with client_ca: mutual TLS, only clients holding a certificate it signed get in); None: plaintext.
    tls: TlsFiles | None = None
    # When set, every StoreService call must carry `authorization: Bearer <token>` (health and
    # reflection excepted): only engines given the token can read or write streams.
    auth_token: str | None = None
    # HOST:PORT of the Prometheus /metrics endpoint (port 0 picks one); None: no endpoint.
    metrics_listen: str | None = None
    # Bytes one artifact may have (PutArtifact or inline in an append); 0: no cap.
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES


def _sqlite_backend(config: StoreConfig) -> StoreBackend:
    return SqliteStoreBackend.in_directory(config.data_dir, durability=config.durability)


def _postgres_backend(config: StoreConfig) -> StoreBackend:
    from store_service.postgres import PostgresStoreBackend

    if not config.dsn:
        raise ValueError("--backend postgres needs --dsn postgresql://USER@HOST:PORT/DB (or KEEL_STORE_DSN)")
    return PostgresStoreBackend(config.dsn, schema=config.pg_schema, durability=config.durability)


BACKENDS: dict[str, Callable[[StoreConfig], StoreBackend]] = {
    "sqlite": _sqlite_backend,
    "postgres": _postgres_backend,
}


def make_backend(config: StoreConfig) -> StoreBackend:
    """The (unopened) backend that `config.backend` names."""
    factory = BACKENDS.get(config.backend)
    if factory is None:
        raise ValueError(f"unknown backend {config.backend!r}; available: {', '.join(sorted(BACKENDS))}")
    return factory(config)


@dataclass
class StoreServingHandle(ServingHandle):
    """A running store: the served handle plus its backend; drain() also ends subscriptions."""

    backend: StoreBackend | None = None
    servicer: StoreServicer | None = None
    metrics: MetricsEndpoint | None = None

    async def drain(self, grace: float = 10.0) -> None:
        """NOT_SERVING, end subscriptions (UNAVAILABLE), finish in-flight RPCs, close the backend."""
        await self.health.enter_graceful_shutdown()
        if self.servicer is not None:
            # Subscriptions never finish on their own; without this the drain would wait `grace`.
            self.servicer.end_subscriptions()
        await self.server.stop(grace)
        for hook in self.on_stop:
            await hook()


async def start_store(config: StoreConfig) -> StoreServingHandle:
    """Open the backend and start serving; `await handle.drain()` stops and closes both."""
    async with contextlib.AsyncExitStack() as undo:  # what to undo if a later part fails to start
        metrics = serve_metrics(config.metrics_listen) if config.metrics_listen is not None else None
        if metrics is not None:
            undo.push_async_callback(metrics.close)
        backend = make_backend(config)
        await backend.open()
        undo.push_async_callback(backend.close)
        servicer = StoreServicer(backend, max_artifact_bytes=config.max_artifact_bytes)
        interceptors: list[ServerInterceptor] = [MetricsInterceptor()]
        if config.auth_token:
            # After the metrics interceptor, so refused calls are counted (code UNAUTHENTICATED).
            interceptors.append(BearerTokenInterceptor(config.auth_token))
        served = await start_server(
            config.listen,
            lambda server: register(server, servicer),
            credentials=config.tls.server_credentials() if config.tls else None,
            interceptors=interceptors,
        )
        undo.pop_all()
    on_stop = [*served.on_stop, backend.close]
    if metrics is not None:
        on_stop.append(metrics.close)
    return StoreServingHandle(
        server=served.server,
        health=served.health,
        port=served.port,
        service_names=served.service_names,
        on_stop=on_stop,
        backend=backend,
        servicer=servicer,
        metrics=metrics,
    )


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _byte_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; 0 means no cap")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; each defaults to its KEEL_STORE_* environment variable."""
    parser = argparse.ArgumentParser(
        prog="store-service",
        description="Keel's StoreService: durable event streams and content-addressed artifacts over gRPC.\n"
        "Every flag can also be set with the environment variable shown in brackets; a flag wins.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="On start it prints one line to stdout: 'store-service listening on HOST:PORT', then,\n"
        "with --metrics-listen, 'store-service metrics on http://HOST:PORT/metrics'.\n"
        "SIGTERM or SIGINT drains: health turns NOT_SERVING, in-flight calls finish, the database closes.",
    )
    parser.add_argument(
        "--listen",
        default=_env("KEEL_STORE_LISTEN", DEFAULT_LISTEN),
        help=f"HOST:PORT to serve on; port 0 picks a free one [KEEL_STORE_LISTEN] (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--data-dir",
        default=_env("KEEL_STORE_DATA_DIR", DEFAULT_DATA_DIR),
        help="directory holding the SQLite file keel-store.sqlite3, created if missing "
        f"[KEEL_STORE_DATA_DIR] (default ./{DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--durability",
        choices=["full", "normal"],
        default=_env("KEEL_STORE_DURABILITY", "full"),
        help="full: every commit is fsynced, so an acknowledged write survives kill -9, an OS crash "
        "and power loss. normal: commits are not fsynced (SQLite synchronous=NORMAL; PostgreSQL "
        "synchronous_commit=off); acknowledged writes survive kill -9 of the store but the last ones "
        "may be lost on power loss or an OS crash; faster where fsync is slow "
        "[KEEL_STORE_DURABILITY] (default full)",
    )
    parser.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default=_env("KEEL_STORE_BACKEND", "sqlite"),
        help="storage backend [KEEL_STORE_BACKEND] (default sqlite)",
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("KEEL_STORE_DSN"),
        help="connection string for --backend postgres, e.g. postgresql://postgres@127.0.0.1:5432/keel; "
        "the schema is created and migrated on start-up, safely with several replicas [KEEL_STORE_DSN]",
    )
    parser.add_argument(
        "--pg-schema",
        default=_env("KEEL_STORE_PG_SCHEMA", "keel"),
        help="PostgreSQL schema for Keel's tables [KEEL_STORE_PG_SCHEMA] (default keel)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=_env("KEEL_STORE_GRACE", "10"),
        help="seconds a drain lets in-flight calls finish [KEEL_STORE_GRACE] (default 10)",
    )
    parser.add_argument(
        "--max-artifact-bytes",
        type=_byte_count,
        default=_env("KEEL_STORE_MAX_ARTIFACT_BYTES", str(DEFAULT_MAX_ARTIFACT_BYTES)),
        metavar="N",
        help="largest artifact the store accepts, by PutArtifact or inline in an append; a bigger one "
        "is refused with RESOURCE_EXHAUSTED (artifact_too_large) as soon as its bytes pass N, and "
        "nothing of it is kept; 0 = no cap [KEEL_STORE_MAX_ARTIFACT_BYTES] "
        f"(default {DEFAULT_MAX_ARTIFACT_BYTES}, 1 GiB)",
    )
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get("KEEL_STORE_TLS_CERT"),
        metavar="PEM",
        help="serve TLS with this certificate chain (needs --tls-key) [KEEL_STORE_TLS_CERT] "
        "(default: plaintext)",
    )
    parser.add_argument(
        "--tls-key",
        default=os.environ.get("KEEL_STORE_TLS_KEY"),
        metavar="PEM",
        help="private key of --tls-cert [KEEL_STORE_TLS_KEY]",
    )
    parser.add_argument(
        "--tls-client-ca",
        default=os.environ.get("KEEL_STORE_TLS_CLIENT_CA"),
        metavar="PEM",
        help="mutual TLS: refuse every client that does not present a certificate signed by this CA, "
        "so only engines holding one reach the store [KEEL_STORE_TLS_CLIENT_CA]",
    )
    parser.add_argument(
        "--auth-token",
        default=os.environ.get("KEEL_STORE_AUTH_TOKEN") or None,
        metavar="TOKEN",
        help="require 'authorization: Bearer TOKEN' on every StoreService call (health checks and "
        "reflection excepted), so only engines given the token (engine-service --store-auth-token) "
        "read or write streams; prefer the environment variable or --auth-token-file, command lines "
        "are visible to other users [KEEL_STORE_AUTH_TOKEN] (default: no token)",
    )
    parser.add_argument(
        "--auth-token-file",
        default=os.environ.get("KEEL_STORE_AUTH_TOKEN_FILE") or None,
        metavar="PATH",
        help="like --auth-token, the token read from this file (one line) [KEEL_STORE_AUTH_TOKEN_FILE]",
    )
    parser.add_argument(
        "--metrics-listen",
        default=os.environ.get("KEEL_STORE_METRICS_LISTEN") or None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; port 0 picks one "
        "[KEEL_STORE_METRICS_LISTEN] (default: off)",
    )
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=os.environ.get("KEEL_STORE_EVENT_LOOP") or _env("KEEL_EVENT_LOOP", DEFAULT_EVENT_LOOP),
        help="asyncio event loop to serve on: asyncio, uvloop (needs the uvloop package), or auto "
        "(uvloop when installed) [KEEL_STORE_EVENT_LOOP, else KEEL_EVENT_LOOP] "
        f"(default {DEFAULT_EVENT_LOOP})",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=_env("KEEL_STORE_LOG_LEVEL", "info"),
        help="log level; logs are JSON lines on stderr [KEEL_STORE_LOG_LEVEL] (default info)",
    )
    args = parser.parse_args(argv)
    # argparse checks `choices` on the command line only; values from the environment get the
    # same check here, so a typo in KEEL_STORE_* fails loudly instead of picking something else.
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.choices is not None and value not in action.choices:
            parser.error(
                f"argument {action.option_strings[0]}: invalid choice {value!r} (from the environment)"
            )
    return args


async def serve(config: StoreConfig) -> None:
    """Start the store, announce the address on stdout, serve until a signal, drain."""
    handle = await start_store(config)
    host, _ = host_port(config.listen)
    address = f"{host}:{handle.port}" if ":" not in host else f"[{host}]:{handle.port}"
    print(f"store-service listening on {address}", flush=True)
    if handle.metrics is not None:
        print(f"store-service metrics on {handle.metrics.url}", flush=True)
    log.info(
        "serving on %s (backend %s, durability %s, %s%s)",
        address,
        config.backend,
        config.durability,
        _transport(config.tls),
        ", bearer token required" if config.auth_token else "",
    )
    await serve_until_signalled(handle, config.grace)
    log.info("stopped")


def _transport(tls: TlsFiles | None) -> str:
    if tls is None:
        return "plaintext"
    return "mutual TLS" if tls.client_ca else "TLS"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `store-service` console script."""
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = StoreConfig(
            listen=args.listen,
            data_dir=Path(args.data_dir),
            durability=args.durability,
            backend=args.backend,
            dsn=args.dsn,
            pg_schema=args.pg_schema,
            grace=args.grace,
            tls=TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_client_ca),
            auth_token=token_from_flags(args.auth_token, args.auth_token_file, flag="--auth-token"),
            metrics_listen=args.metrics_listen,
            max_artifact_bytes=args.max_artifact_bytes,
        )
        run_service(serve(config), args.event_loop)
    except (OSError, ValueError, RuntimeError, KeelError) as exc:
        # RuntimeError: grpc's "Failed to bind"; KeelError: e.g. store_unavailable from the database.
        log.error("store-service could not start: %s", exc)
        return 1
    return 0


__all__ = ["BACKENDS", "StoreConfig", "StoreServingHandle", "main", "make_backend", "start_store"]
