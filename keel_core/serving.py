"""Serving a Keel gRPC service: health, reflection, a bound address, and a SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # untyped re-export
from grpc_reflection.v1alpha import reflection

from keel_core.interceptors import ServerInterceptor, WrappingInterceptor
from keel_core.request_decoding import refusing_undecodable

log = logging.getLogger(__name__)

# Large artifacts stream in chunks, but a single event batch or inline artifact may be several MiB.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Clients ping every KEEPALIVE_TIME_MS while a call is open (engine_service.store.grpc_client: a
# subscription on a stalled store replica must notice); a ping unanswered for KEEPALIVE_TIMEOUT_MS
# closes the connection. Servers accept pings that often, even with no call open, and never answer
# them with GOAWAY "too_many_pings" (which would end the very subscriptions the pings keep).
KEEPALIVE_TIME_MS = 5000
KEEPALIVE_TIMEOUT_MS = 5000
SERVER_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
)


class _GenericHandlersOnly:
    """What a generated `add_<Service>Servicer_to_server` is given instead of the server: it passes
    the service's generic handler on and drops the same methods' registered-method handlers."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Dropped: the generic handler serves these methods."""


def add_servicer(
    add_to_server: Callable[[Any, Any], None], servicer: object, server: grpc.aio.Server
) -> None:
    """Add a servicer through its generated `add_to_server`, served by its one generic handler.

    Its methods are not registered one by one: grpc.aio's server keeps a request for the next call
    of each registered method open (a task each), and at every call it waits for the first of them,
    `asyncio.wait` over them all, each given a callback and then rid of it (25 in the engine, with
    health and reflection: about 6 µs per call more than 3 would cost). Generic methods share one
    request; a call's handler is then found by its method's name in a dict, where a registered
    method is matched by gRPC's core.
    """
    add_to_server(servicer, _GenericHandlersOnly(server))


class MalformedRequestInterceptor(WrappingInterceptor):
    """Undecodable request bytes -> INVALID_ARGUMENT `malformed_request` (keel_core.request_decoding).

    `start_server` installs it innermost, so metrics and authentication see the refusal as the
    call's outcome, and an unauthenticated caller is refused for that first.
    """

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any] | None, method: str) -> Any:
        """The handler guarded against undecodable requests."""
        return refusing_undecodable(handler, method)


@dataclass
class ServingHandle:
    """A started server: its bound port and the pieces a drain needs."""

    server: grpc.aio.Server
    health: health_aio.HealthServicer
    port: int
    service_names: Sequence[str]
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def drain(self, grace: float = 10.0) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish within `grace`, then run the stop hooks."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for hook in self.on_stop:
            await hook()


async def start_server(
    listen: str,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    *,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[ServerInterceptor] = (),
) -> ServingHandle:
    """Start a grpc.aio server on `listen` (HOST:PORT; port 0 picks one) with health and reflection.

    `register` adds the service's servicers and returns their full names (from the descriptors),
    which are then published through reflection and marked SERVING. Every RPC of the server,
    health and reflection included, refuses undecodable request bytes with `malformed_request`.
    """
    server = grpc.aio.server(
        options=SERVER_OPTIONS, interceptors=[*interceptors, MalformedRequestInterceptor()]
    )
    names = list(register(server))
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as error:  # grpc's "Failed to bind to address ..."
        port = 0
        cause: BaseException | None = error
    else:
        cause = None
    if port == 0:
        # Stop the never-started server now: left to interpreter exit, grpc's shutdown of it can
        # hang the process instead of letting it exit with the error.
        await server.stop(None)
        raise OSError(f"could not bind {listen}: the address is in use or not available") from cause
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return ServingHandle(server=server, health=health_servicer, port=port, service_names=names)


async def serve_until_signalled(handle: ServingHandle, grace: float = 10.0) -> None:
    """Serve until SIGTERM or SIGINT, then drain. Returns when the server has stopped."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    waiter = asyncio.ensure_future(handle.server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("signal received: draining")
        await handle.drain(grace)
    stopper.cancel()
    await waiter


# `--event-loop` choices. grpc.aio runs on any asyncio loop that can watch a file descriptor
# (loop.add_reader), which uvloop can. "auto" takes uvloop when it is installed.
EVENT_LOOPS = ("auto", "asyncio", "uvloop")
DEFAULT_EVENT_LOOP = "asyncio"


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for `choice` (one of EVENT_LOOPS); None means asyncio's own loop.

    Raises ValueError for an unknown choice, or for "uvloop" when uvloop is not installed.
    """
    if choice not in EVENT_LOOPS:
        raise ValueError(f"unknown event loop {choice!r}: expected one of {', '.join(EVENT_LOOPS)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop  # optional: imported only when chosen
    except ImportError as error:
        if choice == "auto":
            return None
        raise ValueError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from error
    return uvloop.new_event_loop


def run_service(main: Coroutine[Any, Any, None], event_loop: str = DEFAULT_EVENT_LOOP) -> None:
    """`asyncio.run(main)` on the event loop `event_loop` names (see EVENT_LOOPS)."""
    try:
        factory = event_loop_factory(event_loop)
    except ValueError:
        main.close()  # never awaited: close it so Python does not warn about it
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        log.debug("event loop: %s (%s)", event_loop, type(runner.get_loop()).__module__)
        runner.run(main)


def host_port(address: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 hosts in brackets) into its parts."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)
