"""The engine's way to the StoreService: one balanced gRPC channel, retries, deadlines.

Several store addresses (replicas) get one channel each, and calls take turns among them. Calls
that fail UNAVAILABLE or DEADLINE_EXCEEDED are retried with capped exponential backoff for as long
as the caller's `patience` allows (run drivers wait for the store forever; client-facing RPCs give
up and answer `store_unavailable`).

Deadlines. Each try's deadline is the smaller of the client's `rpc_timeout` and the caller's
patience left, shared among the replicas not tried yet: a replica that does not answer (stalled,
SIGSTOPped: its connection still looks healthy) costs a heartbeat with 0.5 s of patience at most
half of it when there are two, and the retry goes to the next replica. A replica that failed a try
is avoided for SUSPECT_SECONDS while another one is not.

Appends travel together. While a batch of appends is on its way to a replica, the appends made
meanwhile (by any of the engine's runs) wait and go as the next one: one round trip for what one
flush of all the runs in flight has to say, each append with its own expected head and its own
outcome. An append made when the way is free goes at the next turn of the event loop, with whatever
was made in the same turn. The batches go as requests on one long-lived `AppendEventsStream` call
per replica, which costs a fraction of a call each; with tracing on, an append that goes alone is
sent as a plain `AppendEvents` in its caller's context instead, so its span joins the run's trace.
A store that does not know `AppendEventsStream` (older than the engine) is sent `AppendEventsBatch`
calls from then on, and one that does not know those either plain appends.

An append whose answer was lost may have committed. Its retry then meets `sequence_conflict`; the
client re-reads the stream after `expected_seq` and, when it finds exactly the events it sent,
treats the append as done instead of failing or appending twice. An append at any head has no
expected head to meet: it carries an `append_key` (a fresh UUID, the same on every try), and the
store answers a try whose key it has committed already with that commit, writing nothing. That
also covers a first try still queued in a stalled store when the client gave up on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import ipaddress
import logging
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from engine_service.domain.canonical import artifact_id_for_bytes
from engine_service.domain.streams import (
    LABEL_ACTIVE,
    LABEL_CANCELED,
    LABEL_COMPLETED,
    LABEL_FAILED,
    LABEL_PARKED,
)
from engine_service.store.port import (
    AppendResult,
    ArtifactSummary,
    DueStream,
    LocalAppends,
    StreamEvent,
    StreamSummary,
)
from keel_core import tracing
from keel_core.clock import us_of
from keel_core.errors import ErrorCategory, KeelError, unavailable
from keel_core.recent import Recent
from keel_core.security import ClientTls, bearer_token_interceptors
from keel_core.serving import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS, MAX_MESSAGE_BYTES, host_port
from keel_core.status import error_from_parts, from_rpc_error

if TYPE_CHECKING:
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub as _Stub

log = logging.getLogger(__name__)

T = TypeVar("T")
# PutArtifact sends the bytes in messages of at most this size.
ARTIFACT_CHUNK_BYTES = 1024 * 1024
# Small artifacts this client stored or read lately are kept: an id names the same bytes for ever,
# so a run woken or resumed here reads the snapshot its engine wrote without a round trip. At most
# this many, each at most this big (32 MiB in all).
ARTIFACT_CACHE_ENTRIES = 1024
ARTIFACT_CACHE_MAX_BYTES = 32 * 1024
_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_REFUSED_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
# A store that takes no deletes (no token, no --allow-deletes) says so with this reason.
DELETES_NOT_ALLOWED = "deletes_not_allowed"
# An AppendEventsBatch carries at most this many appends (the store's cap) and about this many bytes.
MAX_BATCH_APPENDS = 256
MAX_BATCH_BYTES = 4 * 1024 * 1024
# Batches on their way to one replica at a time: appends made meanwhile wait for it and go together.
BATCHES_IN_FLIGHT = 1
# Append streams to one replica that may break in a row, no answer between, before it is sent each
# batch as its own call instead.
BROKEN_STREAMS_TO_GIVE_UP = 5
# How long a replica that failed a try is passed over while another one is not.
SUSPECT_SECONDS = 5.0
# The longest one try may wait on a replica while another one is still untried (see _try_timeout).
FAILOVER_SECONDS = 1.0

STATUS_LABELS: dict[str, int] = {
    LABEL_ACTIVE: store_pb2.STREAM_STATUS_ACTIVE,
    LABEL_COMPLETED: store_pb2.STREAM_STATUS_COMPLETED,
    LABEL_FAILED: store_pb2.STREAM_STATUS_FAILED,
    LABEL_CANCELED: store_pb2.STREAM_STATUS_CANCELED,
    LABEL_PARKED: store_pb2.STREAM_STATUS_PARKED,
}
_LABEL_NAMES = {value: name for name, value in STATUS_LABELS.items()}


def channel_target(addresses: str) -> str:
    """A gRPC target for `HOST:PORT[,HOST:PORT...]`: `ipv4:`/`ipv6:` lists, resolving names once."""
    parts = [part.strip() for part in addresses.split(",") if part.strip()]
    if not parts:
        raise ValueError("no store address given")
    if len(parts) == 1 and not _is_ip(host_port(parts[0])[0]):
        return f"dns:///{parts[0]}"
    v4: list[str] = []
    v6: list[str] = []
    for part in parts:
        host, port = host_port(part)
        ip = host if _is_ip(host) else socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
        if ipaddress.ip_address(ip).version == 4:
            v4.append(f"{ip}:{port}")
        else:
            v6.append(f"[{ip}]:{port}")
    if v4 and v6:
        raise ValueError("mix of IPv4 and IPv6 store addresses is not supported")
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _when(ts: object) -> datetime | None:
    seconds = getattr(ts, "seconds", 0)
    nanos = getattr(ts, "nanos", 0)
    if not seconds and not nanos:
        return None
    # Exact to the microsecond (a float of seconds would round some away).
    return datetime.fromtimestamp(seconds, tz=UTC) + timedelta(microseconds=nanos // 1000)


def _stream_event(event: store_pb2.RecordedEvent) -> StreamEvent:
    recorded = _when(event.recorded_at) if event.HasField("recorded_at") else None
    return StreamEvent(event.seq, event.type, bytes(event.payload), recorded)


AppendObserver = Callable[[str, Sequence[tuple[str, bytes]]], None]


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, "")


def _deadline_passed() -> grpc.aio.AioRpcError:
    """The error of an append whose try ran out of time before its batch answered."""
    return _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "the append waited for its batch past its deadline")


def _failed(failure: store_pb2.AppendFailure) -> Exception:
    """What one append of a batch raises for its failure: as a failed AppendEvents call would.

    UNAVAILABLE and DEADLINE_EXCEEDED come as an RPC error, which the caller's retry loop retries
    (elsewhere, if there are other replicas); anything else is the append's own KeelError.
    """
    code = _STATUS_CODES.get(failure.code, grpc.StatusCode.UNKNOWN)
    if code in _RETRY_CODES:
        return _rpc_error(code, failure.message)
    return error_from_parts(code, failure.reason, failure.message, failure.metadata)


def _each_its_own(error: BaseException) -> Callable[[], BaseException]:
    """A maker of copies of a batch's error: an exception object is raised by one caller only."""
    if isinstance(error, grpc.aio.AioRpcError):
        # Its metadata too: the trailing metadata carries the ErrorInfo (the refusal's reason).
        code, details = error.code(), error.details() or ""
        initial = error.initial_metadata()
        trailing = cast(grpc.aio.Metadata, error.trailing_metadata())  # an aio call's is aio Metadata
        debug = error.debug_error_string() or ""
        return lambda: grpc.aio.AioRpcError(code, initial, trailing, details, debug)
    if isinstance(error, asyncio.CancelledError):
        return lambda: _rpc_error(grpc.StatusCode.UNAVAILABLE, "the append's batch was cancelled on its way")
    # Not the store's answer but a fault in this client: retrying would meet it again.
    return lambda: KeelError("internal", f"the append's batch failed in the engine's store client: {error!r}")


@dataclass(slots=True)
class _Waiting:
    """An append waiting for its batch: the request, when its try gives up, its answer, and the
    caller's context (a lone append is sent in it, so its RPC joins the caller's trace)."""

    request: store_pb2.AppendEventsRequest
    size: int
    deadline: float
    answer: asyncio.Future[store_pb2.AppendEventsResponse]
    context: contextvars.Context


class _AppendBatcher:
    """The appends bound for one replica, sent in batches on its AppendEventsStream (see the module
    docstring).

    Each append keeps the semantics of its own AppendEvents try: its answer, or the error that call
    would raise (an RPC error for the whole batch, its own KeelError for its own failure), within
    its own try's time: a caller stops waiting when its try's deadline passes, whether its append
    is still queued or on its way in a batch (a stalled replica then costs it no more than a plain
    call would, and its retry goes to the next replica). A batch is sent with the latest deadline of
    its appends, so no append is failed before its own time.
    """

    def __init__(self, stub: _Stub, calls: collections.Counter[str]) -> None:
        self._stub = stub
        self._calls = calls
        self._waiting: list[_Waiting] = []
        self._in_flight = 0
        self._flush_due = False
        self._sending: set[asyncio.Task[None]] = set()  # referenced until done
        self._closed = False
        self.batching = True  # False once the store has said it does not know AppendEventsBatch
        self.streaming = True  # False once the store has said it does not know AppendEventsStream
        self._exchanging = False  # a batch is on the stream
        self._broken_in_a_row = 0  # streams that broke since the last answer on one
        # The open AppendEventsStream call the batches go over, one at a time (None: open one).
        self._stream: (
            grpc.aio.StreamStreamCall[
                store_pb2.AppendEventsStreamRequest, store_pb2.AppendEventsStreamResponse
            ]
            | None
        ) = None

    async def append(
        self, request: store_pb2.AppendEventsRequest, seconds: float
    ) -> store_pb2.AppendEventsResponse:
        """Send the append with the next batch; its answer, or what its own AppendEvents would raise."""
        if self._closed:
            raise _closed()
        size = request.ByteSize()
        if (not self.batching and not self._waiting) or size > MAX_BATCH_BYTES:
            response: store_pb2.AppendEventsResponse = await self._stub.AppendEvents(request, timeout=seconds)
            return response
        loop = asyncio.get_running_loop()
        waiting = _Waiting(
            request, size, time.monotonic() + seconds, loop.create_future(), contextvars.copy_context()
        )
        self._waiting.append(waiting)
        if not self._flush_due and self._in_flight < BATCHES_IN_FLIGHT:
            self._flush_due = True
            loop.call_soon(self._flush, context=contextvars.Context())
        # When the try's time runs out first, its answer is that: a batch answering later finds it
        # done and leaves it be. (A timer on the answer costs half what `asyncio.timeout` does.)
        timer = loop.call_later(seconds, _time_out, waiting.answer)
        try:
            return await waiting.answer
        finally:
            timer.cancel()

    def close(self) -> None:
        """Fail the appends still queued (their batch will not leave) and any made from now on."""
        self._closed = True
        self._drop_stream()
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            _settle(each, _closed())

    def _flush(self) -> None:
        """Send what waits, in batches, while fewer than BATCHES_IN_FLIGHT are on their way."""
        self._flush_due = False
        if not self.batching:  # the store knows no batches: what waits goes one by one, in order
            waiting, self._waiting = self._waiting, []
            for each in waiting:
                if not each.answer.done():
                    self._start(self._send_alone(each), each.context, [each])
            return
        while self._waiting and self._in_flight < BATCHES_IN_FLIGHT:
            batch = self._take()
            if not batch:
                continue  # every taken append had given up
            self._in_flight += 1
            if len(batch) == 1 and (not self.streaming or tracing.enabled()):
                # Alone: a plain AppendEvents in its caller's context (its span joins the run's trace).
                self._start(self._send_alone(batch[0]), batch[0].context, batch, counted=True)
            else:  # made by many runs: the RPC belongs to none of them
                self._start(self._send_together(batch), contextvars.Context(), batch, counted=True)

    def _start(
        self,
        sending: Coroutine[Any, Any, None],
        context: contextvars.Context,
        batch: list[_Waiting],
        *,
        counted: bool = False,
    ) -> None:
        task = asyncio.get_running_loop().create_task(sending, context=context)
        self._sending.add(task)
        task.add_done_callback(functools.partial(self._sent, batch, counted))

    def _sent(self, batch: list[_Waiting], counted: bool, task: asyncio.Task[None]) -> None:
        """A send is over however it ended (even cancelled before it began): no append is left hanging."""
        self._sending.discard(task)
        ended: BaseException | None = asyncio.CancelledError() if task.cancelled() else task.exception()
        if ended is not None:
            # Closed under it (the channel refuses new calls): what its caller would get queued.
            error = _closed if self._closed else _each_its_own(ended)
            for waiting in batch:
                _settle(waiting, error())
        if counted:
            self._in_flight -= 1
        if self._waiting and not self._flush_due and not self._closed:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush, context=contextvars.Context())

    def _take(self) -> list[_Waiting]:
        """The next batch: the oldest appends still waiting for an answer, up to the caps."""
        batch: list[_Waiting] = []
        size = 0
        taken = 0
        for waiting in self._waiting:
            if len(batch) == MAX_BATCH_APPENDS or (batch and size + waiting.size > MAX_BATCH_BYTES):
                break
            taken += 1
            if waiting.answer.done():
                continue  # its caller gave up (its try's time ran out, or it was cancelled)
            batch.append(waiting)
            size += waiting.size
        del self._waiting[:taken]
        return batch

    async def _send_alone(self, waiting: _Waiting) -> None:
        seconds = _seconds_left(waiting.deadline)
        try:
            response = await self._stub.AppendEvents(waiting.request, timeout=seconds)
        except Exception as error:  # the caller's try raises it (once closed: closed, as if queued)
            _settle(waiting, _closed() if self._closed else error)
        else:
            _settle(waiting, response)

    async def _send_together(self, batch: list[_Waiting]) -> None:
        # The latest of the appends' deadlines: each caller stops waiting at its own.
        deadline = max(waiting.deadline for waiting in batch)
        try:
            outcomes = await self._exchange([waiting.request for waiting in batch], deadline)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                each = _each_its_own(error)
                for waiting in batch:
                    _settle(waiting, each())
                return
            if self.batching:
                log.warning(
                    "the store does not know AppendEventsBatch (older than this engine): appending one by one"
                )
                self.batching = False
            for waiting in batch:  # in the order they were made, each within its own try's time
                if not waiting.answer.done():
                    self._start(self._send_alone(waiting), waiting.context, [waiting])
            return
        if len(outcomes) != len(batch):
            self._drop_stream()  # answers that do not fit their requests: the call is not trusted again
            for waiting in batch:
                _settle(
                    waiting,
                    KeelError(
                        "internal",
                        f"the store answered {len(outcomes)} outcomes for {len(batch)} appends",
                    ),
                )
            return
        for waiting, outcome in zip(batch, outcomes, strict=True):
            if outcome.HasField("appended"):
                _settle(waiting, outcome.appended)
            else:
                _settle(waiting, _failed(outcome.failure))

    async def _exchange(
        self, appends: list[store_pb2.AppendEventsRequest], deadline: float
    ) -> Sequence[store_pb2.AppendOutcome]:
        """The batch's outcomes, by `deadline` (monotonic): over the open AppendEventsStream, or from
        an AppendEventsBatch call to a store that does not know the stream."""
        if self.streaming:
            try:
                request = store_pb2.AppendEventsStreamRequest(appends=appends)
                return await self._over_stream(request, _seconds_left(deadline))
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.warning(
                    "the store does not know AppendEventsStream (older than this engine): "
                    "sending each batch as its own call"
                )
                self.streaming = False
        self._calls["AppendEventsBatch"] += 1
        response: store_pb2.AppendEventsBatchResponse = await self._stub.AppendEventsBatch(
            store_pb2.AppendEventsBatchRequest(appends=appends),
            timeout=_seconds_left(deadline),
        )
        return response.outcomes

    async def _over_stream(
        self, request: store_pb2.AppendEventsStreamRequest, seconds: float
    ) -> Sequence[store_pb2.AppendOutcome]:
        """One request and its answer on the open stream (opened first if there is none).

        The stream has no deadline of its own: the batch's is kept here, and a stream whose answer
        did not come in time (or that failed in any way) is cancelled and left for a new one, so
        its state is never in doubt. What the batch then raises is what its own call would have:
        DEADLINE_EXCEEDED, or the status the store ended the stream with.
        """
        # One request at a time on a call (BATCHES_IN_FLIGHT): an answer is its request's because
        # the store answers in order and nothing else was asked since.
        assert not self._exchanging, "two batches on one append stream at once"
        call = self._stream
        if call is None or call.done():
            # No request iterator: this client writes and reads the call itself (the stubs' types
            # know only the iterator form).
            call = self._stream = self._stub.AppendEventsStream()  # type: ignore[call-arg]
        self._calls["AppendEventsStream"] += 1
        self._exchanging = True
        writing = True
        try:
            async with asyncio.timeout(seconds):
                await call.write(request)
                writing = False
                response = await call.read()
        except BaseException as error:
            ended = call.done()
            self._drop_stream()
            if isinstance(error, TimeoutError):
                raise _rpc_error(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "the store did not answer in time"
                ) from None
            if isinstance(error, asyncio.InvalidStateError):  # written to a call that had ended
                # Its own status says why: an older store's UNIMPLEMENTED (through interceptors, a
                # write can meet the call ended before the first read), else a broken call.
                if ended and await call.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise _rpc_error(grpc.StatusCode.UNIMPLEMENTED, await call.details()) from None
                raise self._broke(f"the append stream had ended: {error}") from None
            if isinstance(error, grpc.aio.AioRpcError) and _broken_stream(error, writing):
                raise self._broke(
                    f"the append stream broke ({error.code().name}: {error.details()})"
                ) from None
            raise
        finally:
            self._exchanging = False
        if not isinstance(response, store_pb2.AppendEventsStreamResponse):  # EOF: it ended, status OK
            self._drop_stream()
            raise self._broke("the store ended the append stream unasked")
        self._broken_in_a_row = 0
        return response.outcomes

    def _broke(self, why: str) -> grpc.aio.AioRpcError:
        """The UNAVAILABLE a batch on a broken stream fails with, which its callers retry. A replica
        whose streams keep breaking with no answer between (a proxy on the way that does not carry
        bidirectional calls, say) is sent each batch as its own call from then on."""
        self._broken_in_a_row += 1
        if self._broken_in_a_row >= BROKEN_STREAMS_TO_GIVE_UP and self.streaming:
            log.warning(
                "the append stream to a store broke %d times in a row with no answer (%s): "
                "sending each batch as its own call from now on",
                self._broken_in_a_row,
                why,
            )
            self.streaming = False
        return _rpc_error(grpc.StatusCode.UNAVAILABLE, why)

    def _drop_stream(self) -> None:
        """Cancel the open append stream, if any: the next batch opens a new one."""
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None


# The status gRPC gives a stream call when a message could not be sent (the connection broke).
_CORE_INTERNAL = "Internal error from Core"


def _broken_stream(error: grpc.aio.AioRpcError, writing: bool) -> bool:
    """Whether an append stream's error is gRPC's own word that the call broke, not the store's.

    Those are worth a retry (elsewhere if there is another replica), the request having been
    appended or not, which the retry finds out (see the module docstring): a request sent on a
    stream whose store just died fails INTERNAL "Internal error from Core" (a unary call would fail
    UNAVAILABLE), on the write, or on the read when interceptors (a token, tracing) send the write
    from a task of theirs; and a call the other end cancelled (a server stopped past its grace, a
    proxy's idle timeout) fails CANCELLED (this client's own cancels raise CancelledError). The
    store's own statuses carry ErrorInfo; any other UNKNOWN or INTERNAL read without it (a fault
    outside the store's handler) stays final, as on a unary call.
    """
    trailing = cast(grpc.aio.Metadata, error.trailing_metadata())  # an aio call's is aio Metadata
    if "grpc-status-details-bin" in (trailing or ()):
        return False
    code = error.code()
    if code == grpc.StatusCode.CANCELLED:
        return True
    if code == grpc.StatusCode.INTERNAL and error.details() == _CORE_INTERNAL:
        return True
    return writing and code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def _seconds_left(deadline: float) -> float:
    """Seconds until `deadline` (monotonic), at least a millisecond: a timeout to give a try."""
    return max(deadline - time.monotonic(), 0.001)


def _closed() -> KeelError:
    return unavailable("store_client_closed", "the engine's store client was closed (the engine is stopping)")


def _time_out(answer: asyncio.Future[store_pb2.AppendEventsResponse]) -> None:
    """An append's try ran out of time: unless its answer came first, it fails DEADLINE_EXCEEDED."""
    if not answer.done():
        answer.set_exception(_deadline_passed())


def _settle(waiting: _Waiting, outcome: store_pb2.AppendEventsResponse | BaseException) -> None:
    if waiting.answer.done():
        return  # its caller gave up (its try's time ran out, or it was cancelled) while it was on its way
    if isinstance(outcome, BaseException):
        waiting.answer.set_exception(outcome)
    else:
        waiting.answer.set_result(outcome)


class StoreClient:
    """The EventLog over gRPC: typed, retrying calls to the StoreService (TLS and a client certificate
    when given).

    With `auth_token`, every call carries `authorization: Bearer <token>` for a store started with
    `--auth-token`.
    """

    def __init__(
        self,
        addresses: str,
        *,
        rpc_timeout: float = 10.0,
        patience: float = 10.0,
        tls: ClientTls | None = None,
        auth_token: str | None = None,
        on_appended: AppendObserver | None = None,
    ) -> None:
        self.addresses = addresses
        self.rpc_timeout = rpc_timeout
        self.patience = patience
        # Told (stream id, events) after each append is known to have committed: metrics.
        self._on_appended = on_appended
        # Store RPCs attempted, by method: how tests and operators count round trips per run.
        self.calls: collections.Counter[str] = collections.Counter()
        self.local = LocalAppends()
        self._artifacts: Recent[str, bytes] = Recent(ARTIFACT_CACHE_ENTRIES)  # id -> bytes
        options = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # A subscription has no deadline: pings tell a stalled replica (SIGSTOPped, its TCP
            # connection still up) from a quiet stream; pings go on however long nothing is sent.
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),  # recent gRPC waits this long for an ack
            ("grpc.http2.max_pings_without_data", 0),
        ]
        channel_target(addresses)  # checks the list as a whole
        targets = [channel_target(part) for part in addresses.split(",") if part.strip()]
        # No interceptor without a token: each one costs every call a little.
        interceptors = bearer_token_interceptors(auth_token) if auth_token else None
        if tracing.enabled():  # the store's RPC spans join the engine's trace
            interceptors = [*(interceptors or []), *tracing.client_interceptors()]
        if tls is None:
            self._channels = [
                grpc.aio.insecure_channel(t, options=options, interceptors=interceptors) for t in targets
            ]
        else:
            credentials = tls.channel_credentials()
            self._channels = [
                grpc.aio.secure_channel(t, credentials, options=options, interceptors=interceptors)
                for t in targets
            ]
        self._stubs: list[_Stub] = [store_pb2_grpc.StoreServiceStub(channel) for channel in self._channels]
        self._batchers = {id(stub): _AppendBatcher(stub, self.calls) for stub in self._stubs}  # by stub
        self._turn = 0  # the replica the next call starts with (calls take turns)
        self._suspect_until = [0.0] * len(self._stubs)  # monotonic time until which a replica is avoided

    async def close(self) -> None:
        """Close the channels; appends still waiting for a batch fail `store_client_closed`."""
        for batcher in self._batchers.values():
            batcher.close()
        for channel in self._channels:
            await channel.close(grace=None)

    def _order(self) -> list[int]:
        """Replicas in the order one call tries them: by turn, those not suspected first."""
        n = len(self._stubs)
        if n == 1:  # the common set-up: nothing to take turns with or to sort
            return [0]
        start, self._turn = self._turn, (self._turn + 1) % n
        turns = [(start + i) % n for i in range(n)]
        now = time.monotonic()
        return sorted(turns, key=lambda i: self._suspect_until[i] > now)

    def _suspect_or_raise(self, error: grpc.aio.AioRpcError, replica: int) -> None:
        """A failed try: raise what is not worth another try, else suspect the replica that failed."""
        if error.code() in _REFUSED_CODES:
            refusal = from_rpc_error(error)
            if refusal.code == DELETES_NOT_ALLOWED:
                raise refusal from None  # the credentials are fine: this store deletes nothing
            raise self._refused(error) from None
        if error.code() not in _RETRY_CODES:
            raise from_rpc_error(error) from None
        self._suspect_until[replica] = time.monotonic() + SUSPECT_SECONDS

    def _try_timeout(self, deadline: float, untried: int) -> float:
        """A try's deadline: the RPC timeout, or the patience left shared among untried replicas.

        While another replica is still untried, a try gets at most FAILOVER_SECONDS: a caller that
        waits for the store for ever (a run driver recording an answer) must not spend the whole RPC
        timeout on a stalled replica while its lease runs out. The last replica of a round gets all
        that is left, so a slow but sole store is waited for as before.
        """
        left = _seconds_left(deadline)
        share = left / max(untried, 1)
        if untried > 1:
            share = min(share, FAILOVER_SECONDS)
        return min(self.rpc_timeout, share)

    async def _retrying(
        self,
        what: str,
        call: Callable[[_Stub, float], Awaitable[T]],
        patience: float | None,
    ) -> T:
        limit = self.patience if patience is None else patience
        deadline = time.monotonic() + limit
        delay = 0.05
        method = what.split("(", 1)[0]
        order = self._order()
        tries = 0
        while True:
            self.calls[method] += 1
            replica = order[tries]
            tries += 1
            try:
                result = await call(self._stubs[replica], self._try_timeout(deadline, len(order) - tries + 1))
            except grpc.aio.AioRpcError as error:
                self._suspect_or_raise(error, replica)
                if tries < len(order) and time.monotonic() < deadline:
                    continue  # the next replica at once: this one may be the only one down
                if time.monotonic() + delay > deadline:
                    raise unavailable(
                        "store_unavailable",
                        f"the store at {self.addresses} did not answer {what} "
                        f"({error.code().name}: {error.details()}); is store-service running?",
                    ) from None
                log.warning("store %s failed (%s); retrying in %.2fs", what, error.code().name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                order, tries = self._order(), 0  # a new round, those not suspected first
            else:
                self._suspect_until[replica] = 0.0
                return result

    def _refused(self, error: grpc.aio.AioRpcError) -> KeelError:
        # The engine's credentials for the store are wrong: an operator's set-up error, not the
        # engine's caller's. Passing UNAUTHENTICATED on would tell a client its own token is wrong.
        return KeelError(
            "store_unauthenticated",
            f"the store at {self.addresses} refused this engine's credentials ({error.details()}); "
            "give the engine the store's token with --store-auth-token or KEEL_ENGINE_STORE_AUTH_TOKEN "
            "(and, for a mutual-TLS store, a client certificate with --store-tls-cert/--store-tls-key)",
            category=ErrorCategory.UNAVAILABLE,
        )

    async def check_access(self, within: float) -> None:
        """Raise `store_unauthenticated` if the store refuses this engine's credentials.

        One read, tried once within `within` seconds: a store that does not answer (not started yet,
        unreachable) passes, since the engine waits for its store anyway; only a refusal fails.
        """
        try:
            await self._stubs[self._order()[0]].HeadSeq(
                store_pb2.HeadSeqRequest(stream_id="keel:access-check"), timeout=within
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in _REFUSED_CODES:
                raise self._refused(error) from None

    async def append(
        self,
        stream_id: str,
        events: Sequence[tuple[str, bytes]],
        *,
        expected_seq: int | None,
        status: str | None = None,
        artifacts: Sequence[tuple[str, bytes]] = (),
        patience: float | None = None,
        expected_any: bool = False,
        attributes: Mapping[str, str] | None = None,
        due_at_us: int | None = None,
        nudges: Mapping[str, int] | None = None,
        report_heads: Sequence[str] = (),
    ) -> AppendResult:
        """Append atomically after `expected_seq` (None: the stream must be empty), with inline artifacts,
        the stream's `attributes` and its due time (`due_at_us`: None keeps it, 0 clears it); in the
        same transaction, each parked stream of `nudges` (stream id -> due time) becomes due by then,
        and the heads of the `report_heads` streams are read (`AppendResult.reported_heads`).

        `expected_any` appends at whatever the head is (side streams such as a run's failure ledger).
        """
        kind = store_pb2.EXPECTED_KIND_NO_STREAM if expected_seq is None else store_pb2.EXPECTED_KIND_EXACT
        request = store_pb2.AppendEventsRequest(
            stream_id=stream_id,
            expected_kind=store_pb2.EXPECTED_KIND_ANY if expected_any else kind,
            expected_seq=expected_seq or 0,
            status=STATUS_LABELS[status] if status else store_pb2.STREAM_STATUS_UNSPECIFIED,  # type: ignore[arg-type]
            attributes=attributes or {},
            report_heads=report_heads,
        )
        # Added in place: a message given to the constructor is built and then copied in.
        add_event = request.events.add
        for name, payload in events:
            add_event(type=name, payload=payload)
        add_artifact = request.artifacts.add
        for artifact_kind, data in artifacts:
            add_artifact(kind=artifact_kind, data=data)
        for nudged, at in (nudges or {}).items():
            request.nudges.add(stream_id=nudged, due_at_us=at)
        if due_at_us is not None:
            request.due_at_us = due_at_us
        if expected_any:
            # Every try carries it: one that finds an earlier try committed answers with that one.
            request.append_key = uuid.uuid4().hex
        attempts = 0

        async def once(stub: _Stub, seconds: float) -> store_pb2.AppendEventsResponse:
            nonlocal attempts
            attempts += 1
            return await self._batchers[id(stub)].append(request, seconds)

        try:
            response = await self._retrying(f"AppendEvents({stream_id})", once, patience)
        except KeelError as error:
            if error.code != "sequence_conflict" or attempts < 2 or expected_any:
                raise
            # An earlier try may have committed with its answer lost: recognise our own events.
            base = expected_seq or 0
            found = await self.read(stream_id, from_seq=base + 1, limit=len(events), patience=patience)
            if [(e.type, e.payload) for e in found] != [(name, bytes(p)) for name, p in events]:
                raise
            log.info("append to %s had committed before its answer was lost", stream_id)
            ids = tuple(artifact_id_for_bytes(data) for _, data in artifacts)
            self._appended(stream_id, base + 1, events)
            when = found[0].recorded_at
            recorded = us_of(when) if when else None
            return AppendResult(base + 1, base + len(events), ids, recorded_at_us=recorded)
        if response.repeated:
            log.info("append to %s had committed before its answer was lost (its key repeated)", stream_id)
        ids = tuple(response.artifact_ids)
        for (_, data), stored in zip(artifacts, ids, strict=True):
            if artifact_id_for_bytes(data) != stored:
                raise KeelError(
                    "artifact_id_mismatch", f"the store named an artifact {stored}, expected otherwise"
                )
            self._keep_artifact(stored, data)
        self._appended(stream_id, response.first_seq, events)
        reported = (
            tuple(response.reported_heads) if len(response.reported_heads) == len(report_heads) else None
        )
        recorded = response.recorded_at_us or None  # 0: a store older than the field
        return AppendResult(response.first_seq, response.head_seq, ids, reported, recorded)

    def _appended(self, stream_id: str, first_seq: int, events: Sequence[tuple[str, bytes]]) -> None:
        """An append committed: its events go to this process's watchers, and to the observer."""
        self.local.published(stream_id, first_seq, events)
        if self._on_appended is None:
            return
        try:
            self._on_appended(stream_id, events)
        except Exception:  # an observer's bug must not turn a committed append into a failure
            log.exception("append observer failed for %s", stream_id)

    async def read(
        self, stream_id: str, *, from_seq: int = 1, limit: int | None = None, patience: float | None = None
    ) -> list[StreamEvent]:
        """Events of a stream from `from_seq` (all of them, paging, or at most `limit`)."""
        out: list[StreamEvent] = []
        seq = from_seq
        while True:
            page_limit = 10_000 if limit is None else min(10_000, limit - len(out))
            request = store_pb2.ReadEventsRequest(stream_id=stream_id, from_seq=seq, limit=page_limit)

            async def once(
                stub: _Stub,
                seconds: float,
                request: store_pb2.ReadEventsRequest = request,
            ) -> store_pb2.ReadEventsResponse:
                response: store_pb2.ReadEventsResponse = await stub.ReadEvents(request, timeout=seconds)
                return response

            page = await self._retrying(f"ReadEvents({stream_id})", once, patience)
            out.extend(_stream_event(event) for event in page.events)
            if page.next_seq == 0 or not page.events or (limit is not None and len(out) >= limit):
                return out
            seq = page.next_seq

    async def head(self, stream_id: str, *, patience: float | None = None) -> tuple[int, str]:
        """The stream's head sequence and status label ("" when unlabelled)."""

        async def once(stub: _Stub, seconds: float) -> store_pb2.HeadSeqResponse:
            response: store_pb2.HeadSeqResponse = await stub.HeadSeq(
                store_pb2.HeadSeqRequest(stream_id=stream_id), timeout=seconds
            )
            return response

        response = await self._retrying(f"HeadSeq({stream_id})", once, patience)
        return response.head_seq, _LABEL_NAMES.get(response.status, "")

    async def trim(self, stream_id: str, before_seq: int, *, patience: float | None = None) -> int:
        """Delete the stream's events below `before_seq` (at most head + 1); returns how many went.

        The head and the label stay. A repeat after a lost answer is harmless (it deletes nothing
        more), so it is retried like a read.
        """
        request = store_pb2.TrimStreamRequest(stream_id=stream_id, before_seq=before_seq)

        async def once(stub: _Stub, seconds: float) -> store_pb2.TrimStreamResponse:
            response: store_pb2.TrimStreamResponse = await stub.TrimStream(request, timeout=seconds)
            return response

        response = await self._retrying(f"TrimStream({stream_id})", once, patience)
        return response.removed

    async def list_streams(
        self,
        *,
        prefix: str,
        statuses: Sequence[str] = (),
        page_size: int = 100,
        page_token: str = "",
        patience: float | None = None,
        attributes: Mapping[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        min_duration: timedelta | None = None,
        max_duration: timedelta | None = None,
    ) -> tuple[list[StreamSummary], str]:
        """A page of streams, newest first, and the next page token."""
        request = store_pb2.ListStreamsRequest(
            statuses=[STATUS_LABELS[s] for s in statuses],  # type: ignore[misc]
            prefix=prefix,
            page_size=page_size,
            page_token=page_token,
            attributes=attributes or {},
        )
        if created_after is not None:
            request.created_after.FromDatetime(created_after)
        if created_before is not None:
            request.created_before.FromDatetime(created_before)
        if min_duration is not None:
            request.min_duration_us = min_duration // timedelta(microseconds=1)
        if max_duration is not None:
            request.max_duration_us = max_duration // timedelta(microseconds=1)

        async def once(stub: _Stub, seconds: float) -> store_pb2.ListStreamsResponse:
            response: store_pb2.ListStreamsResponse = await stub.ListStreams(request, timeout=seconds)
            return response

        page = await self._retrying("ListStreams", once, patience)
        streams = [
            StreamSummary(
                s.stream_id,
                s.head_seq,
                _LABEL_NAMES.get(s.status, ""),
                _when(s.created_at),
                _when(s.updated_at),
                dict(s.attributes),
                _when(s.ended_at) if s.HasField("ended_at") else None,
            )
            for s in page.streams
        ]
        return streams, page.next_page_token

    async def list_due(
        self, before_us: int, *, prefix: str, limit: int = 100, patience: float | None = None
    ) -> tuple[list[DueStream], int]:
        """Streams due by `before_us`, earliest first, and the next due time after them (0: none)."""
        request = store_pb2.ListDueRequest(before_us=before_us, prefix=prefix, limit=limit)

        async def once(stub: _Stub, seconds: float) -> store_pb2.ListDueResponse:
            response: store_pb2.ListDueResponse = await stub.ListDue(request, timeout=seconds)
            return response

        page = await self._retrying("ListDue", once, patience)
        return [DueStream(d.stream_id, d.due_at_us, d.head_seq) for d in page.due], page.next_due_at_us

    async def nudge_due(self, stream_id: str, due_at_us: int, *, patience: float | None = None) -> bool:
        """If the stream is parked, make its due time at most `due_at_us`; whether it is parked."""
        request = store_pb2.NudgeDueRequest(stream_id=stream_id, due_at_us=due_at_us)

        async def once(stub: _Stub, seconds: float) -> store_pb2.NudgeDueResponse:
            response: store_pb2.NudgeDueResponse = await stub.NudgeDue(request, timeout=seconds)
            return response

        return (await self._retrying(f"NudgeDue({stream_id})", once, patience)).parked

    def _keep_artifact(self, artifact_id: str, data: bytes) -> None:
        if len(data) <= ARTIFACT_CACHE_MAX_BYTES:
            self._artifacts.put(artifact_id, bytes(data))  # the caller's, if mutable, stays theirs

    async def get_artifact(self, artifact_id: str, *, patience: float | None = None) -> bytes:
        """An artifact's bytes (NOT_FOUND `artifact_not_found` when missing); a small one this
        client stored or read lately is answered without asking the store."""
        kept = self._artifacts.get(artifact_id)
        if kept is not None:
            return kept

        async def once(stub: _Stub, seconds: float) -> bytes:
            chunks = []
            call = stub.GetArtifact(store_pb2.GetArtifactRequest(artifact_id=artifact_id), timeout=seconds)
            async for chunk in call:
                chunks.append(chunk.data)
            return b"".join(chunks)

        data = await self._retrying(f"GetArtifact({artifact_id})", once, patience)
        if artifact_id_for_bytes(data) != artifact_id:
            raise KeelError("artifact_corrupt", f"artifact {artifact_id} came back with different bytes")
        self._keep_artifact(artifact_id, data)
        return data

    async def delete_streams(self, stream_ids: Sequence[str], *, patience: float | None = None) -> int:
        """Delete whole streams in one store transaction; returns how many existed.

        A repeat after a lost answer deletes nothing more, so it is retried like a read.
        """
        request = store_pb2.DeleteStreamsRequest(stream_ids=list(stream_ids))

        async def once(stub: _Stub, seconds: float) -> store_pb2.DeleteStreamsResponse:
            response: store_pb2.DeleteStreamsResponse = await stub.DeleteStreams(request, timeout=seconds)
            return response

        return (await self._retrying("DeleteStreams", once, patience)).deleted

    async def list_artifacts(
        self,
        stored_before: datetime,
        *,
        page_size: int = 100,
        page_token: str = "",
        patience: float | None = None,
    ) -> tuple[list[ArtifactSummary], str]:
        """A page of artifacts last stored before `stored_before`, oldest first, and the next token."""
        request = store_pb2.ListArtifactsRequest(page_size=page_size, page_token=page_token)
        request.stored_before.FromDatetime(stored_before)

        async def once(stub: _Stub, seconds: float) -> store_pb2.ListArtifactsResponse:
            response: store_pb2.ListArtifactsResponse = await stub.ListArtifacts(request, timeout=seconds)
            return response

        page = await self._retrying("ListArtifacts", once, patience)
        found = [ArtifactSummary(a.artifact_id, a.kind, a.size, _when(a.stored_at)) for a in page.artifacts]
        return found, page.next_page_token

    async def delete_artifacts(
        self, artifact_ids: Sequence[str], stored_before: datetime, *, patience: float | None = None
    ) -> list[str]:
        """Delete those artifacts not stored again since `stored_before`; returns the ids deleted."""
        request = store_pb2.DeleteArtifactsRequest(artifact_ids=list(artifact_ids))
        request.stored_before.FromDatetime(stored_before)
        self._forget_artifacts(request.artifact_ids)  # deleted or not, read them from the store

        async def once(stub: _Stub, seconds: float) -> store_pb2.DeleteArtifactsResponse:
            response: store_pb2.DeleteArtifactsResponse = await stub.DeleteArtifacts(request, timeout=seconds)
            return response

        deleted = list((await self._retrying("DeleteArtifacts", once, patience)).deleted_ids)
        self._forget_artifacts(request.artifact_ids)  # again: a read in flight may have kept one
        return deleted

    def _forget_artifacts(self, artifact_ids: Sequence[str]) -> None:
        for artifact_id in artifact_ids:
            self._artifacts.drop(artifact_id)

    async def put_artifact(self, kind: str, data: bytes, *, patience: float | None = None) -> str:
        """Store `data` under its content id (a repeat stores nothing new); returns the id."""

        async def once(stub: _Stub, seconds: float) -> str:
            chunks = [
                data[at : at + ARTIFACT_CHUNK_BYTES] for at in range(0, len(data), ARTIFACT_CHUNK_BYTES)
            ]
            messages = [store_pb2.PutArtifactRequest(kind=kind, data=chunk) for chunk in chunks or [b""]]
            response: store_pb2.PutArtifactResponse = await stub.PutArtifact(iter(messages), timeout=seconds)
            return response.artifact_id

        artifact_id = await self._retrying("PutArtifact", once, patience)
        if artifact_id != artifact_id_for_bytes(data):
            raise KeelError(
                "artifact_id_mismatch", f"the store named an artifact {artifact_id}, expected otherwise"
            )
        self._keep_artifact(artifact_id, data)
        return artifact_id

    async def has_artifact(self, artifact_id: str, *, patience: float | None = None) -> bool:
        """Whether the artifact is stored."""

        async def once(stub: _Stub, seconds: float) -> bool:
            response: store_pb2.HasArtifactResponse = await stub.HasArtifact(
                store_pb2.HasArtifactRequest(artifact_id=artifact_id), timeout=seconds
            )
            return response.exists

        return await self._retrying(f"HasArtifact({artifact_id})", once, patience)

    async def subscribe(self, stream_id: str, *, after_seq: int = 0) -> AsyncGenerator[StreamEvent, None]:
        """Events after `after_seq`, then live ones; resubscribes after the last seen if the store drops.

        A replica that stalls is noticed by the channel's keepalive pings (the call fails
        UNAVAILABLE); it is then suspected, so the resubscription goes to another replica.
        """
        seq = after_seq
        delay = 0.05
        while True:
            replica = self._order()[0]
            call = self._stubs[replica].SubscribeEvents(
                store_pb2.SubscribeEventsRequest(stream_id=stream_id, after_seq=seq)
            )
            try:
                async for message in call:
                    delay = 0.05
                    seq = message.event.seq
                    yield _stream_event(message.event)
                return
            except grpc.aio.AioRpcError as error:
                self._suspect_or_raise(error, replica)
                log.info(
                    "subscription to %s on store replica %d failed (%s); resubscribing",
                    stream_id,
                    replica,
                    error.code().name,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            finally:
                call.cancel()
