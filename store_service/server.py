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

from keel_core import tracing
from keel_core.errors import KeelError
from keel_core.interceptors import ServerInterceptor
from keel_core.metrics import MetricsEndpoint, MetricsInterceptor, serve_metrics
from keel_core.security import BearerTokenInterceptor, TlsFiles, token_from_flags
from keel_core.server_flags import (
    ServerFlagNames,
    ServerFlags,
    add_server_flags,
    parse_server_args,
    run_server,
    serve_announced,
    transport_name,
)
from keel_core.serving import ServingHandle, start_server
from store_service.backend import StoreBackend
from store_service.limits import DEFAULT_MAX_ARTIFACT_BYTES
from store_service.sqlite import Durability, SqliteStoreBackend
from store_service.wire import StoreServicer, register

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
    # DeleteStreams/DeleteArtifacts without a token (with one, its holders may delete).
    allow_deletes: bool = False
    # OTLP/gRPC collector to export RPC spans to (None: not recorded unless a test installed tracing).
    otlp_endpoint: str | None = None


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
        servicer = StoreServicer(
            backend,
            max_artifact_bytes=config.max_artifact_bytes,
            allow_deletes=config.allow_deletes or bool(config.auth_token),
        )
        if config.otlp_endpoint:
            tracing.install("keel-store", config.otlp_endpoint)
        interceptors: list[ServerInterceptor] = [MetricsInterceptor()]
        if tracing.enabled():
            interceptors.insert(0, tracing.TracingInterceptor())
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


_FLAG_NAMES = ServerFlagNames(
    env_prefix="KEEL_STORE",
    default_listen=DEFAULT_LISTEN,
    client_ca_help="mutual TLS: refuse every client that does not present a certificate signed by this "
    "CA, so only engines holding one reach the store",
)


def _add_storage_flags(parser: argparse.ArgumentParser) -> None:
    """Where and how the store keeps its data."""
    storage = parser.add_argument_group("storage")
    storage.add_argument(
        "--data-dir",
        default=_env("KEEL_STORE_DATA_DIR", DEFAULT_DATA_DIR),
        help="directory holding the SQLite file keel-store.sqlite3, created if missing "
        f"[KEEL_STORE_DATA_DIR] (default ./{DEFAULT_DATA_DIR})",
    )
    storage.add_argument(
        "--durability",
        choices=["full", "normal"],
        default=_env("KEEL_STORE_DURABILITY", "full"),
        help="full: every commit is fsynced, so an acknowledged write survives kill -9, an OS crash "
        "and power loss. normal: commits are not fsynced (SQLite synchronous=NORMAL; PostgreSQL "
        "synchronous_commit=off); acknowledged writes survive kill -9 of the store but the last ones "
        "may be lost on power loss or an OS crash; faster where fsync is slow "
        "[KEEL_STORE_DURABILITY] (default full)",
    )
    storage.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default=_env("KEEL_STORE_BACKEND", "sqlite"),
        help="storage backend [KEEL_STORE_BACKEND] (default sqlite)",
    )
    storage.add_argument(
        "--dsn",
        default=os.environ.get("KEEL_STORE_DSN"),
        help="connection string for --backend postgres, e.g. postgresql://postgres@127.0.0.1:5432/keel; "
        "the schema is created and migrated on start-up, safely with several replicas [KEEL_STORE_DSN]",
    )
    storage.add_argument(
        "--pg-schema",
        default=_env("KEEL_STORE_PG_SCHEMA", "keel"),
        help="PostgreSQL schema for Keel's tables [KEEL_STORE_PG_SCHEMA] (default keel)",
    )
    storage.add_argument(
        "--max-artifact-bytes",
        type=_byte_count,
        default=_env("KEEL_STORE_MAX_ARTIFACT_BYTES", str(DEFAULT_MAX_ARTIFACT_BYTES)),
        metavar="N",
        help="largest artifact the store accepts, by PutArtifact or inline in an append; a bigger one "
        "is refused with RESOURCE_EXHAUSTED (artifact_too_large) as soon as its bytes pass N, and "
        "nothing of it is kept; 0 = no cap [KEEL_STORE_MAX_ARTIFACT_BYTES] "
        f"(default {DEFAULT_MAX_ARTIFACT_BYTES}, 1 GiB)",
    )


def _add_access_flags(parser: argparse.ArgumentParser) -> None:
    """Who may call the store (beyond TLS, which the common flags cover)."""
    access = parser.add_argument_group("access")
    access.add_argument(
        "--auth-token",
        default=os.environ.get("KEEL_STORE_AUTH_TOKEN") or None,
        metavar="TOKEN",
        help="require 'authorization: Bearer TOKEN' on every StoreService call (health checks and "
        "reflection excepted), so only engines given the token (engine-service --store-auth-token) "
        "read or write streams; prefer the environment variable or --auth-token-file, command lines "
        "are visible to other users [KEEL_STORE_AUTH_TOKEN] (default: no token)",
    )
    access.add_argument(
        "--otlp-endpoint",
        default=os.environ.get("KEEL_STORE_OTLP_ENDPOINT") or None,
        metavar="URL",
        help="export OpenTelemetry spans (one per RPC, under the caller's W3C trace context) over "
        "OTLP/gRPC to this collector; needs the `tracing` extra [KEEL_STORE_OTLP_ENDPOINT] (default: off)",
    )
    access.add_argument(
        "--allow-deletes",
        action="store_true",
        default=os.environ.get("KEEL_STORE_ALLOW_DELETES", "") in ("1", "true", "yes"),
        help="accept DeleteStreams and DeleteArtifacts (engines' retention) without a token; with "
        "--auth-token they are accepted from its holders anyway. Without either, every delete is "
        "refused (PERMISSION_DENIED deletes_not_allowed) [KEEL_STORE_ALLOW_DELETES=1]",
    )
    access.add_argument(
        "--auth-token-file",
        default=os.environ.get("KEEL_STORE_AUTH_TOKEN_FILE") or None,
        metavar="PATH",
        help="like --auth-token, the token read from this file (one line) [KEEL_STORE_AUTH_TOKEN_FILE]",
    )


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
    add_server_flags(parser, _FLAG_NAMES)
    _add_storage_flags(parser)
    _add_access_flags(parser)
    return parse_server_args(parser, argv)


async def serve(config: StoreConfig) -> None:
    """Start the store, announce the address on stdout, serve until a signal, drain."""
    handle = await start_store(config)
    details = f"backend {config.backend}, durability {config.durability}, {transport_name(config.tls)}"
    if config.auth_token:
        details += ", bearer token required"
    await serve_announced("store-service", handle, config, handle.metrics, log, details)


def _config(args: argparse.Namespace, flags: ServerFlags) -> StoreConfig:
    return StoreConfig(
        listen=flags.listen,
        data_dir=Path(args.data_dir),
        durability=args.durability,
        backend=args.backend,
        dsn=args.dsn,
        pg_schema=args.pg_schema,
        grace=flags.grace,
        tls=flags.tls,
        auth_token=token_from_flags(args.auth_token, args.auth_token_file, flag="--auth-token"),
        metrics_listen=flags.metrics_listen,
        max_artifact_bytes=args.max_artifact_bytes,
        allow_deletes=args.allow_deletes,
        otlp_endpoint=args.otlp_endpoint,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `store-service` console script."""
    args = parse_args(argv)
    try:
        run_server(args, _config, serve)
    except (OSError, ValueError, RuntimeError, KeelError) as exc:
        # RuntimeError: grpc's "Failed to bind"; KeelError: e.g. store_unavailable from the database.
        log.error("store-service could not start: %s", exc)
        return 1
    return 0


__all__ = ["BACKENDS", "StoreConfig", "StoreServingHandle", "main", "make_backend", "start_store"]
