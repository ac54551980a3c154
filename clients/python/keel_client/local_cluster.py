"""`keel up`'s machinery: a store and an engine as child processes on this machine, healthy or explained.

The store keeps its SQLite file under `DATA_DIR/store`; each service's stdout and stderr go to
`DATA_DIR/logs/<name>.log` as JSON lines only (a line that is not JSON, like the `listening on`
banner or a traceback, is wrapped in a record); its last error is quoted when a service fails to start.
Stopping sends SIGTERM to the engine first (so it parks its runs while the store is still there),
then to the store, and waits for each to drain.

The store requires a bearer token made up at each start and handed to the engine only (through the
environment, which other users cannot read, unlike command lines): nobody else on the machine can
write to, or read, the local store; clients go through the engine. For debugging with grpcurl, the
token is also written to `DATA_DIR/store-token`, readable by its owner only, like the database.

The services come with the server distribution (`keel`, the repository root), not with this client
(`keel-client`): `require_server` says so before anything is started.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc

from keel_core.launcher import launcher_env

SERVER_PACKAGES = ("store_service", "engine_service")
STARTUP_SECONDS = 30.0
STOP_SECONDS = 20.0
_READY = re.compile(r"^(store-service|engine-service) listening on (\S+)\s*$")


class ClusterError(Exception):
    """A local service could not be started or stopped; the message says why and where its log is."""


class ServerNotInstalled(ClusterError):
    """The Keel server distribution is not installed beside this client."""


def server_installed() -> bool:
    """Whether the server distribution (store-service, engine-service) is importable here."""
    return all(importlib.util.find_spec(name) is not None for name in SERVER_PACKAGES)


def require_server(command: str) -> None:
    """Raise ServerNotInstalled, naming `command` and how to install the server, when it is missing."""
    if not server_installed():
        raise ServerNotInstalled(
            f"{command} needs the Keel server, which is not installed here (this is the client alone): "
            "install it with `pip install .` in a Keel checkout "
            "(the `keel` distribution at the repository root)"
        )


def service_executable(name: str) -> str:
    """The console script `name` beside this Python (the virtualenv's bin), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ClusterError(
            f"cannot find the `{name}` program beside {sys.executable} or on PATH; is keel installed?"
        )
    return found


@dataclass
class ServiceProcess:
    """One running service: its process, the address it announced, and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""
    _ready: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _pumps: list[threading.Thread] = field(default_factory=list)

    def drain(self, timeout: float) -> None:
        """Wait until what the exited service wrote is in its log (its streams' pumps have ended)."""
        for pump in self._pumps:
            pump.join(timeout)

    def last_error(self) -> str:
        """The most telling line of the service's log: its last error entry, else its last line."""
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
                return str(entry.get("msg", ""))
        # No structured error: an uncaught exception's last line ("RuntimeError: ...") says the most.
        unindented = [line for line in lines if not line[0].isspace()]
        return unindented[-1].strip() if unindented else ""


class JsonLinesLog:
    """A service's log file, holding JSON lines only: one per line the service wrote on either stream.

    The services log JSON to stderr, but not everything they write is a log record: the
    `listening on` banner on stdout, a Python warning, an uncaught traceback. Such a line is wrapped
    in a record of the same shape (`ts`, `level`, `logger`, `msg`, and `stream`), so every line of
    the file parses; a traceback keeps one record per line, in order, at level error.
    """

    def __init__(self, path: Path, service: str, streams: int) -> None:
        self._file = path.open("ab")
        self._service = service
        self._open_streams = streams
        self._lock = threading.Lock()

    def write(self, raw: bytes, stream: str, level: str) -> None:
        """Write one line the service wrote on `stream` (wrapped at `level` unless it is a JSON object)."""
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            return
        if not _is_json_object(line):
            line = json.dumps(
                {
                    "ts": _now_iso(),
                    "level": level,
                    "logger": f"{self._service}.{stream}",
                    "msg": line.decode(errors="replace"),
                    "stream": stream,
                },
                ensure_ascii=False,
            ).encode()
        with self._lock:
            self._file.write(line + b"\n")
            self._file.flush()

    def stream_closed(self) -> None:
        """One of the service's streams ended; the file is closed after the last."""
        with self._lock:
            self._open_streams -= 1
            if self._open_streams == 0:
                self._file.close()


def _is_json_object(line: bytes) -> bool:
    if not line.lstrip().startswith(b"{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _now_iso() -> str:
    # The services' own format (keel_core.logs): UTC, milliseconds, a Z.
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


_WARNING = re.compile(rb"^\S.*\b\w*Warning: ")


def _stderr_level(line: bytes, previous: str) -> str:
    # A traceback's and a warning's indented lines belong to the line above them.
    if line[:1].isspace():
        return previous
    return "warning" if _WARNING.match(line) else "error"


def _pump_stdout(service: ServiceProcess, stream: IO[bytes], log: JsonLinesLog) -> None:
    # Drains the child's stdout so it never blocks on a full pipe; the first "listening on" line
    # tells where it serves, everything goes to the log.
    announced = False
    for raw in iter(stream.readline, b""):
        log.write(raw, "stdout", "info")
        if not announced:
            match = _READY.match(raw.decode(errors="replace"))
            if match:
                announced = True
                service._ready.put(match.group(2))
    if not announced:
        service._ready.put(None)
    log.stream_closed()


def _pump_stderr(stream: IO[bytes], log: JsonLinesLog) -> None:
    level = "error"
    for raw in iter(stream.readline, b""):
        level = _stderr_level(raw, level)
        log.write(raw, "stderr", level)
    log.stream_closed()


@dataclass
class LocalCluster:
    """A store-service and an engine-service started together; use as a context manager or start()/stop()."""

    data_dir: Path
    store_listen: str = "127.0.0.1:7071"
    engine_listen: str = "127.0.0.1:7070"
    ops: Sequence[str] = ()
    extra_env: dict[str, str] = field(default_factory=dict)
    # The store's bearer token, made anew by each start(); only the engine is given it.
    store_token: str = field(default="", init=False, repr=False)
    store: ServiceProcess | None = None
    engine: ServiceProcess | None = None

    @property
    def store_address(self) -> str:
        """HOST:PORT the store serves on."""
        return self.store.address if self.store else ""

    @property
    def store_token_file(self) -> Path:
        """Where start() wrote the store's token (mode 0600), for its owner's grpcurl sessions."""
        return self.data_dir / "store-token"

    @property
    def engine_address(self) -> str:
        """HOST:PORT the engine serves on (what clients use)."""
        return self.engine.address if self.engine else ""

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the store, then the engine pointed at it, and wait until both answer health checks."""
        require_server("starting a local store and engine")
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.store_token = secrets.token_urlsafe(32)
        _write_private(self.store_token_file, self.store_token + "\n")
        try:
            self.store = self._spawn(
                "store-service",
                ["--listen", self.store_listen, "--data-dir", str(self.data_dir / "store")],
                {"KEEL_STORE_AUTH_TOKEN": self.store_token, "KEEL_STORE_AUTH_TOKEN_FILE": ""},
            )
            self._await_ready(self.store)
            engine_args = ["--listen", self.engine_listen, "--store", self.store.address]
            if self.ops:
                engine_args += ["--ops", *self.ops]
            self.engine = self._spawn(
                "engine-service",
                engine_args,
                {"KEEL_ENGINE_STORE_AUTH_TOKEN": self.store_token, "KEEL_ENGINE_STORE_AUTH_TOKEN_FILE": ""},
            )
            self._await_ready(self.engine)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, args: list[str], secret_env: dict[str, str]) -> ServiceProcess:
        log_path = self.data_dir / "logs" / f"{name}.log"
        log = JsonLinesLog(log_path, name, streams=2)
        # The token last: a KEEL_*_AUTH_TOKEN in the caller's environment must not split the pair.
        # launcher_env: if `keel up` itself is killed, its services get SIGTERM instead of living on
        # as orphans holding the ports and the database (armed by the service: see keel_core.launcher).
        env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1", **launcher_env(), **secret_env}
        try:
            process = subprocess.Popen(
                [service_executable(name), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                # Its own process group: Ctrl-C reaches `keel up`, which then stops the services in order.
                process_group=0,
                # No preexec_fn: with one, this process (gRPC running) would fork instead of vfork,
                # and gRPC's fork handlers can abort the child before its exec (keel_core.launcher).
            )
        except OSError as error:
            log.stream_closed()
            log.stream_closed()
            raise ClusterError(f"cannot start {name}: {error}") from None
        service = ServiceProcess(name=name, process=process, log_path=log_path)
        assert process.stdout is not None and process.stderr is not None
        service._pumps = [
            threading.Thread(
                target=_pump_stdout, args=(service, process.stdout, log), name=f"{name}-stdout", daemon=True
            ),
            threading.Thread(
                target=_pump_stderr, args=(process.stderr, log), name=f"{name}-stderr", daemon=True
            ),
        ]
        for pump in service._pumps:
            pump.start()
        return service

    def _await_ready(self, service: ServiceProcess) -> None:
        timed_out = False
        try:
            address = service._ready.get(timeout=STARTUP_SECONDS)
        except queue.Empty:
            address, timed_out = None, True
        if address is None:
            code = service.process.poll()
            if code is None and not timed_out:
                # Its stdout closed: it is exiting. Reap it, so the error tells its exit code.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = service.process.wait(timeout=STOP_SECONDS)
            state = (
                f"exited with code {code}"
                if code is not None
                else f"did not start within {STARTUP_SECONDS:.0f}s"
            )
            if code is not None:
                service.drain(STOP_SECONDS)
            why = service.last_error()
            raise ClusterError(
                f"{service.name} {state}" + (f": {why}" if why else "") + f" (log {service.log_path})"
            )
        service.address = address
        wait_healthy(address, service.name, STARTUP_SECONDS)

    def poll(self) -> ServiceProcess | None:
        """A service that has exited on its own, if any."""
        for service in (self.store, self.engine):
            if service is not None and service.process.poll() is not None:
                return service
        return None

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """SIGTERM the engine, wait, then the store; a service that will not drain in `timeout` is killed."""
        for service in (self.engine, self.store):
            if service is None or service.process.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                service.process.send_signal(signal.SIGTERM)
            try:
                service.process.wait(timeout)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()
        for service in (self.engine, self.store):
            if service is not None:
                for stream in (service.process.stdout, service.process.stderr):
                    if stream is not None:
                        stream.close()


def _write_private(path: Path, text: str) -> None:
    # Created 0600, and narrowed to it when it existed: other users must not read the token.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


def wait_healthy(address: str, name: str, timeout: float) -> None:
    """Wait until grpc.health.v1 at `address` reports SERVING for the whole server."""
    # The health stubs come with the server distribution (grpcio-health-checking), which a local
    # cluster needs anyway; a client-only install never gets here (see require_server).
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    last_problem = "no answer"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                answer = stub.Check(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=max(0.1, min(2.0, deadline - time.monotonic())),
                    wait_for_ready=True,
                )
            except grpc.RpcError as error:
                last_problem = f"{error.code().name}: {error.details()}"
            else:
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_problem = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            time.sleep(0.1)
    raise ClusterError(f"{name} at {address} is not healthy after {timeout:.0f}s ({last_problem})")
