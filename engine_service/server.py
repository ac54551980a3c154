"""Running EngineService: `engine-service` on the command line, `start_engine` in-process.

The one stdout line `engine-service listening on HOST:PORT` is a contract (port resolved when 0
was asked). Logs are JSON lines on stderr. On start the engine resumes every run the store lists
as active; SIGTERM drains: health NOT_SERVING, in-flight RPCs finish within the grace period, then
the run drivers are cancelled (parked) and resume on the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from grpc_health.v1 import health_pb2

import engine_service.builtin_ops
import engine_service.metrics as engine_metrics
from engine_service.console import EngineConsole, engine_target, start_console
from engine_service.domain.ops import DEFAULT_REGISTRY, OpRegistry
from engine_service.domain.tasks import DEFAULT_TASK_HEARTBEAT_MS
from engine_service.domain.transports import DEFAULT_TRANSPORTS, TransportRegistry
from engine_service.failpoints import Failpoints
from engine_service.runtime.environment import RunEnvironment
from engine_service.runtime.kernel import DEFAULT_LEASE_TTL, Engine, build_provenance
from engine_service.runtime.retention import (
    DEFAULT_ARTIFACT_GRACE,
    DEFAULT_RETENTION_INTERVAL,
    RetentionHooks,
)
from engine_service.store.grpc_client import StoreClient
from engine_service.wire.servicer import EngineServicer, register
from engine_service.wire.worker_servicer import WorkerServicer, register_workers
from keel_core import tracing
from keel_core.errors import KeelError
from keel_core.interceptors import ServerInterceptor
from keel_core.metrics import MetricsEndpoint, MetricsInterceptor, serve_metrics
from keel_core.security import BearerTokenInterceptor, ClientTls, TlsFiles, token_from_flags
from keel_core.server_flags import (
    ServerFlagNames,
    ServerFlags,
    add_server_flags,
    parse_server_args,
    run_server,
    serve_announced,
    transport_name,
)
from keel_core.serving import ServingHandle, host_port, start_server

log = logging.getLogger("engine_service")

DEFAULT_LISTEN = "127.0.0.1:7070"
DEFAULT_STORE = "127.0.0.1:7071"
# How long start-up waits for the store to say whether it accepts this engine's credentials.
ACCESS_CHECK_SECONDS = 2.0
_ = engine_service.builtin_ops  # imported for its registrations


@dataclass(frozen=True)
class EngineConfig:
    """How to run an engine: where it listens, which store(s), which op modules, which failpoints."""

    listen: str = DEFAULT_LISTEN
    store: str = DEFAULT_STORE
    ops_modules: tuple[str, ...] = ()
    # None: read KEEL_FAILPOINTS; "" or a spec string: use that.
    failpoints: str | None = None
    # Extra registries (in-process tests); merged over the default ones.
    ops: OpRegistry | None = None
    transports: TransportRegistry | None = None
    grace: float = 10.0
    # How long a client-facing RPC waits for an unreachable store before answering UNAVAILABLE.
    store_patience: float = 10.0
    recover_on_start: bool = True
    # Write-behind window for decided events (see engine_service.runtime.driver); 0 appends each at once.
    checkpoint_linger: float = 0.2
    # TLS for EngineService (with client_ca: mutual TLS); None: plaintext.
    tls: TlsFiles | None = None
    # TLS to the store: its CA, and the client certificate a mutual-TLS store requires; None: plaintext.
    store_tls: ClientTls | None = None
    # When set, every EngineService call must carry `authorization: Bearer <token>` (health excepted).
    auth_token: str | None = None
    # The token of a store started with --auth-token, sent as `authorization: Bearer <token>`.
    store_auth_token: str | None = None
    # HOST:PORT of the Prometheus /metrics endpoint (port 0 picks one); None: no endpoint.
    metrics_listen: str | None = None
    # This engine's name in run leases; None: hostname-pid-random.
    engine_id: str | None = None
    # Seconds a run lease lives without renewal: how long a dead engine's runs wait for a taker.
    lease_ttl: float = DEFAULT_LEASE_TTL
    # The heartbeat timeout of remote steps that set none (0: their claims never expire).
    task_heartbeat_timeout: float = DEFAULT_TASK_HEARTBEAT_MS / 1000
    # HOST:PORT of the web console served by this process (engine_service.console); None: none.
    console_listen: str | None = None
    # Delete terminal run trees whose root ended this many seconds ago (None: keep every run).
    retention: float | None = None
    # Seconds between retention passes, and the grace an artifact collection gives new artifacts.
    retention_interval: float = DEFAULT_RETENTION_INTERVAL
    artifact_grace: float = DEFAULT_ARTIFACT_GRACE
    # OTLP/gRPC collector to export spans to (None: spans are not recorded unless a test installed tracing).
    otlp_endpoint: str | None = None


@dataclass
class EngineServingHandle(ServingHandle):
    """A running engine: the served handle plus the engine (drivers, store client)."""

    engine: Engine | None = None
    metrics: MetricsEndpoint | None = None
    console: EngineConsole | None = None

    async def drain(self, grace: float = 10.0) -> None:
        """Stop the console first (its event streams are RPCs in flight), then drain the engine."""
        if self.console is not None:
            await self.console.close()
            self.console = None
        await super().drain(grace)


def load_op_module(name: str) -> None:
    """Import an op module by dotted name or by path to a .py file (its @op decorators register)."""
    if name.endswith(".py") or os.sep in name:
        path = Path(name).resolve()
        spec = importlib.util.spec_from_file_location(f"keel_ops_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load op module from {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        importlib.import_module(name)


async def start_engine(config: EngineConfig) -> EngineServingHandle:
    """Start serving; `await handle.drain()` stops, parks the runs and closes the store channel."""
    for module in config.ops_modules:
        load_op_module(module)
    if config.otlp_endpoint:
        tracing.install("keel-engine", config.otlp_endpoint)
    interceptors: list[ServerInterceptor] = [MetricsInterceptor()]
    if tracing.enabled():
        interceptors.insert(0, tracing.TracingInterceptor())  # first: the span covers the others
    if config.auth_token:
        # After the metrics interceptor, so refused calls are counted (code UNAUTHENTICATED).
        interceptors.append(BearerTokenInterceptor(config.auth_token))
    async with contextlib.AsyncExitStack() as undo:  # what to undo if a later part fails to start
        metrics = serve_metrics(config.metrics_listen) if config.metrics_listen is not None else None
        if metrics is not None:
            undo.push_async_callback(metrics.close)
        store = StoreClient(
            config.store,
            patience=config.store_patience,
            tls=config.store_tls,
            auth_token=config.store_auth_token,
            on_appended=engine_metrics.count_appended,
        )
        undo.push_async_callback(store.close)
        # A store that refuses our credentials would fail every run: say so now, not per run.
        await store.check_access(ACCESS_CHECK_SECONDS)
        engine = _engine(config, store)
        servicer = EngineServicer(engine)
        workers = WorkerServicer(engine.tasks)
        served = await start_server(
            config.listen,
            lambda server: [*register(server, servicer), *register_workers(server, workers)],
            credentials=config.tls.server_credentials() if config.tls else None,
            interceptors=interceptors,
        )
        undo.pop_all()
    engine_metrics.track_engine(engine)
    engine.tasks.on_claimed.append(engine_metrics.observe_claim)
    gauges: asyncio.Task[None] | None = None
    if metrics is not None:
        gauges = asyncio.create_task(engine_metrics.refresh_queue_gauges(engine.tasks), name="queue gauges")
    # An engine fenced off for good (another process uses its engine id) drives nothing more: it
    # says so to health checks, so that balancers send clients elsewhere.
    engine.leases.heartbeat.on_fenced.append(lambda: _not_serving(served))
    engine.retention.artifact_grace = config.artifact_grace
    engine.retention.hooks = RetentionHooks(
        runs_deleted=engine_metrics.RETENTION_RUNS_DELETED.inc,
        streams_deleted=engine_metrics.RETENTION_STREAMS_DELETED.inc,
        artifacts_deleted=engine_metrics.RETENTION_ARTIFACTS_DELETED.inc,
    )
    retention: asyncio.Task[None] | None = None
    if config.retention is not None:
        retention = asyncio.create_task(
            engine.retention.run_forever(config.retention, config.retention_interval), name="retention"
        )
    recovery: asyncio.Task[None] | None = None
    if config.recover_on_start:
        # Recovery at start, then takeover of runs whose lease expired or was released.
        recovery = asyncio.create_task(engine.recovery.scan_forever(), name="scan for runs")
        engine.waker.start()  # parked runs (of any engine before this one) wake when due
        engine.task_waker.start()  # and tasks past their deadlines end (waking their runs)
        recovery.add_done_callback(_log_scanning)

    async def stop_engine() -> None:
        if recovery is not None:
            recovery.cancel()
        if retention is not None:
            retention.cancel()
        if gauges is not None:
            gauges.cancel()
        await engine.stop()
        await store.close()
        if metrics is not None:
            await metrics.close()

    return EngineServingHandle(
        server=served.server,
        health=served.health,
        port=served.port,
        service_names=served.service_names,
        on_stop=[*served.on_stop, stop_engine],
        engine=engine,
        metrics=metrics,
    )


def _engine(config: EngineConfig, store: StoreClient) -> Engine:
    """The engine `config` asks for over `store`: its ops (metered), transports and failpoints."""
    ops = DEFAULT_REGISTRY.merged(config.ops) if config.ops else DEFAULT_REGISTRY
    transports = DEFAULT_TRANSPORTS.merged(config.transports) if config.transports else DEFAULT_TRANSPORTS
    failpoints = Failpoints.from_env() if config.failpoints is None else Failpoints.parse(config.failpoints)
    return Engine(
        RunEnvironment(store, engine_metrics.metered_ops(ops), transports, failpoints),
        build_provenance(),
        checkpoint_linger=config.checkpoint_linger,
        engine_id=config.engine_id,
        lease_ttl=config.lease_ttl,
        task_heartbeat_timeout=config.task_heartbeat_timeout,
        on_takeover=engine_metrics.LEASE_TAKEOVERS.inc,
    )


_reports: set[asyncio.Future[None]] = set()


def _not_serving(served: ServingHandle) -> None:
    async def report() -> None:
        for name in ["", *served.service_names]:
            await served.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    reporting = asyncio.ensure_future(report())
    _reports.add(reporting)
    reporting.add_done_callback(_reports.discard)


def _log_scanning(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("scanning for runs stopped: %r", task.exception())


_FLAG_NAMES = ServerFlagNames(
    env_prefix="KEEL_ENGINE",
    default_listen=DEFAULT_LISTEN,
    client_ca_help="mutual TLS: clients must present a certificate signed by this CA",
    log_help="log level; JSON lines on stderr carrying run_id, step_id and attempt",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; each defaults to its KEEL_ENGINE_* environment variable."""
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="engine-service",
        description="Keel's EngineService: durable pipeline runs over gRPC, state kept in a StoreService. "
        "Every flag can also be set with the environment variable in brackets; a flag wins.",
        epilog="On start it prints one line to stdout: 'engine-service listening on HOST:PORT' (then, "
        "with --metrics-listen, 'engine-service metrics on http://HOST:PORT/metrics', and with --console, "
        "'engine-service console on http://HOST:PORT'). "
        "Failpoints for crash tests: KEEL_FAILPOINTS=name[:step],... (see engine_service.failpoints).",
    )
    add_server_flags(parser, _FLAG_NAMES)
    parser.add_argument(
        "--store",
        default=env("KEEL_ENGINE_STORE", DEFAULT_STORE),
        help="store address(es) HOST:PORT[,HOST:PORT...], taking turns; one that does not answer is skipped "
        f"[KEEL_ENGINE_STORE] (default {DEFAULT_STORE})",
    )
    parser.add_argument(
        "--ops",
        nargs="*",
        default=[m for m in env("KEEL_ENGINE_OPS", "").replace(",", " ").split() if m],
        metavar="MODULE",
        help="op modules to load: dotted names or paths to .py files [KEEL_ENGINE_OPS, comma-separated]",
    )
    parser.add_argument(
        "--checkpoint-linger",
        type=float,
        default=float(env("KEEL_ENGINE_CHECKPOINT_LINGER", "0.2")),
        help="seconds decided events may wait to travel in one append with later ones (write-behind; "
        "0 appends each step on its own); a crash re-runs at most this much completed work "
        "[KEEL_ENGINE_CHECKPOINT_LINGER] (default 0.2)",
    )
    parser.add_argument(
        "--engine-id",
        default=env("KEEL_ENGINE_ID") or None,
        metavar="ID",
        help="this engine's name in run leases; must differ between engines sharing a store "
        "[KEEL_ENGINE_ID] (default: hostname-pid-random)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=float(env("KEEL_ENGINE_LEASE_TTL", str(DEFAULT_LEASE_TTL))),
        metavar="SECONDS",
        help="lifetime of run leases without a heartbeat (one per engine every ttl/4 while it holds runs "
        "older than ttl/3, whatever their number): a dead engine's runs are "
        "taken over by another within about 1.4 x this; a drained engine hands its runs over at "
        "once [KEEL_ENGINE_LEASE_TTL] (default 10)",
    )
    parser.add_argument(
        "--task-heartbeat-timeout",
        type=float,
        default=float(env("KEEL_ENGINE_TASK_HEARTBEAT_TIMEOUT", str(DEFAULT_TASK_HEARTBEAT_MS / 1000))),
        metavar="SECONDS",
        help="the heartbeat timeout of remote steps that set none: a worker silent this long loses its "
        "task, which is retried (task_lease_expired); Keel's workers heartbeat at least every 10 s; 0: "
        "no timeout, a dead worker's task waits for its start_to_close_timeout or for ever "
        "[KEEL_ENGINE_TASK_HEARTBEAT_TIMEOUT] (default 60)",
    )
    parser.add_argument(
        "--auth-token",
        default=env("KEEL_ENGINE_AUTH_TOKEN") or None,
        metavar="TOKEN",
        help="require 'authorization: Bearer TOKEN' on every EngineService call (health checks "
        "excepted); prefer the environment variable, command lines are visible to other users "
        "[KEEL_ENGINE_AUTH_TOKEN] (default: no token)",
    )
    parser.add_argument(
        "--store-tls-ca",
        default=env("KEEL_ENGINE_STORE_TLS_CA"),
        metavar="PEM",
        help="connect to the store over TLS, verifying it with this CA (any --store-tls-* flag turns "
        "TLS on; without this one the system's roots verify it) [KEEL_ENGINE_STORE_TLS_CA]",
    )
    parser.add_argument(
        "--store-tls-cert",
        default=env("KEEL_ENGINE_STORE_TLS_CERT"),
        metavar="PEM",
        help="client certificate to present to a mutual-TLS store (needs --store-tls-key) "
        "[KEEL_ENGINE_STORE_TLS_CERT]",
    )
    parser.add_argument(
        "--store-tls-key",
        default=env("KEEL_ENGINE_STORE_TLS_KEY"),
        metavar="PEM",
        help="key of --store-tls-cert [KEEL_ENGINE_STORE_TLS_KEY]",
    )
    parser.add_argument(
        "--store-auth-token",
        default=env("KEEL_ENGINE_STORE_AUTH_TOKEN") or None,
        metavar="TOKEN",
        help="send 'authorization: Bearer TOKEN' on every store call, for a store started with "
        "--auth-token; prefer the environment variable or --store-auth-token-file, command lines "
        "are visible to other users [KEEL_ENGINE_STORE_AUTH_TOKEN] (default: no token)",
    )
    parser.add_argument(
        "--store-auth-token-file",
        default=env("KEEL_ENGINE_STORE_AUTH_TOKEN_FILE") or None,
        metavar="PATH",
        help="like --store-auth-token, the token read from this file (one line) "
        "[KEEL_ENGINE_STORE_AUTH_TOKEN_FILE]",
    )
    parser.add_argument(
        "--retention",
        type=_duration("--retention"),
        default=env("KEEL_ENGINE_RETENTION") or None,
        metavar="DURATION",
        help="delete terminal run trees (every run of the tree terminal) whose top-level run ended "
        "longer ago than this: 30d, 12h, 15m, 90s or seconds; each run goes with every stream it "
        "owns, unreferenced artifacts are collected after --artifact-grace. The store must accept "
        "deletes (--auth-token or --allow-deletes) [KEEL_ENGINE_RETENTION] (default: keep every run)",
    )
    parser.add_argument(
        "--retention-interval",
        type=_duration("--retention-interval"),
        default=env("KEEL_ENGINE_RETENTION_INTERVAL") or str(DEFAULT_RETENTION_INTERVAL),
        metavar="DURATION",
        help="time between retention passes "
        f"[KEEL_ENGINE_RETENTION_INTERVAL] (default {DEFAULT_RETENTION_INTERVAL:g}s)",
    )
    parser.add_argument(
        "--artifact-grace",
        type=_duration("--artifact-grace"),
        default=env("KEEL_ENGINE_ARTIFACT_GRACE") or str(DEFAULT_ARTIFACT_GRACE),
        metavar="DURATION",
        help="an artifact collection keeps artifacts stored less than this long ago, referenced or not "
        f"[KEEL_ENGINE_ARTIFACT_GRACE] (default {DEFAULT_ARTIFACT_GRACE:g}s)",
    )
    parser.add_argument(
        "--console",
        default=env("KEEL_ENGINE_CONSOLE") or None,
        metavar="HOST:PORT",
        help="also serve the web console (as `keel ui` does) on HOST:PORT, talking to this engine over "
        "its gRPC API; needs keel-client[console]; no login of its own, so keep it on loopback or "
        "behind an authenticating proxy [KEEL_ENGINE_CONSOLE] (default: no console)",
    )
    parser.add_argument(
        "--otlp-endpoint",
        default=env("KEEL_ENGINE_OTLP_ENDPOINT") or None,
        metavar="URL",
        help="export OpenTelemetry spans (RPCs, runs, step attempts) over OTLP/gRPC to this collector, "
        "e.g. http://127.0.0.1:4317; needs the `tracing` extra [KEEL_ENGINE_OTLP_ENDPOINT] (default: off)",
    )
    args = parse_server_args(parser, argv)
    if not args.lease_ttl > 0:
        parser.error(f"argument --lease-ttl: must be a positive number of seconds, not {args.lease_ttl}")
    if not args.task_heartbeat_timeout >= 0:
        parser.error(
            "argument --task-heartbeat-timeout: must be 0 (none) or a positive number of seconds, "
            f"not {args.task_heartbeat_timeout}"
        )
    return args


async def serve(config: EngineConfig) -> None:
    """Start, announce the address on stdout, serve until a signal, drain."""
    handle = await start_engine(config)
    also = []
    if config.console_listen is not None:
        if config.tls is not None:
            await handle.drain(0)
            raise ValueError(
                "--console serves a plaintext engine only; with --tls run `keel ui --tls-ca ...` instead"
            )
        target = engine_target(host_port(config.listen)[0], handle.port)
        try:
            handle.console = await start_console(config.console_listen, target, config.auth_token)
        except BaseException:
            await handle.drain(0)
            raise
        also.append(f"engine-service console on {handle.console.url}")
    details = (
        f"{transport_name(config.tls)}{', bearer token required' if config.auth_token else ''}; "
        f"store {config.store} over {'TLS' if config.store_tls else 'plaintext'}"
        f"{' with a bearer token' if config.store_auth_token else ''}"
    )
    await serve_announced("engine-service", handle, config, handle.metrics, log, details, also=also)


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `15m`, `12h` or `30d` (ValueError otherwise, or when negative)."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit is not None else text
    seconds = float(number) * (unit or 1.0)
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"not a duration: {text!r}")
    return seconds


def _duration(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return parse_duration(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag}: {text!r} is not a duration (90, 90s, 15m, 12h or 30d)"
            ) from None

    return parse


def _config(args: argparse.Namespace, flags: ServerFlags) -> EngineConfig:
    return EngineConfig(
        listen=flags.listen,
        store=args.store,
        ops_modules=tuple(args.ops),
        grace=flags.grace,
        checkpoint_linger=args.checkpoint_linger,
        tls=flags.tls,
        store_tls=ClientTls.from_flags(
            args.store_tls_ca, args.store_tls_cert, args.store_tls_key, prefix="--store-"
        ),
        auth_token=args.auth_token,
        store_auth_token=token_from_flags(
            args.store_auth_token, args.store_auth_token_file, flag="--store-auth-token"
        ),
        metrics_listen=flags.metrics_listen,
        engine_id=args.engine_id,
        lease_ttl=args.lease_ttl,
        task_heartbeat_timeout=args.task_heartbeat_timeout,
        console_listen=args.console,
        retention=args.retention,
        retention_interval=args.retention_interval,
        artifact_grace=args.artifact_grace,
        otlp_endpoint=args.otlp_endpoint,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `engine-service` console script."""
    args = parse_args(argv)
    try:
        run_server(args, _config, serve)
    except KeyboardInterrupt:
        pass
    except (ImportError, ValueError, OSError, tracing.TracingUnavailable) as error:
        print(f"engine-service: {error}", file=sys.stderr)
        return 2
    except KeelError as error:  # e.g. store_unauthenticated: the store refused our credentials
        log.error("engine-service could not start: %s", error.message, extra={"error_code": error.code})
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
