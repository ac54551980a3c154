"""StoreServicer: keel.store.v1.StoreService on top of a StoreBackend, translating and validating.

The servicer owns no semantics: it checks inputs against `store_service.limits` and turns protobuf
messages into backend records and back. Every handler carries one decorator from keel_core.servicer_errors
(`translated`, or `translated_stream` for server streams) that turns what it raises into a gRPC
status with ErrorInfo: a KeelError with its own code and reason, anything else as INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from keel.store.v1 import store_pb2, store_pb2_grpc

from keel_core.errors import ErrorCategory, KeelError, invalid_argument, unavailable
from keel_core.servicer_errors import translated, translated_stream
from keel_core.serving import add_servicer
from keel_core.status import bounded_message, error_metadata, grpc_code
from store_service import limits, metrics
from store_service.backend import (
    EventPair,
    Expected,
    NewArtifact,
    StoreBackend,
    StoredEvent,
)

Context = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger(__name__)

SERVICE_NAME: str = store_pb2.DESCRIPTOR.services_by_name["StoreService"].full_name
_EXACT = store_pb2.EXPECTED_KIND_EXACT
_NO_STREAM = store_pb2.EXPECTED_KIND_NO_STREAM
_ANY = store_pb2.EXPECTED_KIND_ANY


def _timestamp(micros: int) -> Timestamp:
    seconds, rest = divmod(micros, 1_000_000)
    return Timestamp(seconds=seconds, nanos=rest * 1000)


def _micros(timestamp: Timestamp) -> int:
    """A Timestamp as microseconds since the Unix epoch (at least 1: 0 means unbounded)."""
    return max(1, timestamp.seconds * 1_000_000 + timestamp.nanos // 1000)


def recorded_event(event: StoredEvent) -> store_pb2.RecordedEvent:
    """The wire form of a stored event."""
    return store_pb2.RecordedEvent(
        stream_id=event.stream_id,
        seq=event.seq,
        type=event.type,
        payload=event.payload,
        recorded_at=_timestamp(event.recorded_at_us),
    )


def _expected(request: store_pb2.AppendEventsRequest) -> Expected:
    kind = request.expected_kind
    if kind == _EXACT:
        return Expected.exact(limits.check_sequence("expected_seq", request.expected_seq))
    if kind == _NO_STREAM:
        return Expected.no_stream()
    if kind == _ANY:
        return Expected.any()
    raise invalid_argument(
        "invalid_expected",
        f"expected_kind must be EXACT, NO_STREAM or ANY (got {kind}); "
        "use EXACT with expected_seq = the head you read, or NO_STREAM for a new stream",
    )


def _new_events(request: store_pb2.AppendEventsRequest) -> list[EventPair]:
    """An append's events as (type, payload) pairs, within the limits."""
    events = request.events
    limits.check_batch_size(len(events))
    pairs = [(e.type, e.payload) for e in events]
    valid = limits.event_is_valid
    for index, (type_name, payload) in enumerate(pairs):
        if not valid(type_name, len(payload)):
            raise limits.bad_event(index, type_name, len(payload))
    return pairs


def _new_artifacts(request: store_pb2.AppendEventsRequest, max_artifact_bytes: int) -> list[NewArtifact]:
    if not request.artifacts:
        return []
    artifacts = [NewArtifact(a.kind, a.data) for a in request.artifacts]
    limits.check_inline_artifacts([len(a.data) for a in artifacts], max_artifact_bytes)
    for artifact in artifacts:
        limits.check_artifact_kind(artifact.kind)
    return artifacts


def _outcome(settled: store_pb2.AppendEventsResponse | BaseException) -> store_pb2.AppendOutcome:
    """One append's outcome in a batch: its answer, or the status AppendEvents would have failed with."""
    if isinstance(settled, store_pb2.AppendEventsResponse):
        return store_pb2.AppendOutcome(appended=settled)
    if not isinstance(settled, Exception):
        raise settled  # cancelled (the call was): nothing to answer
    error = settled
    if not isinstance(error, KeelError):
        log.error("an append of a batch failed", exc_info=error)
        error = KeelError("internal", f"AppendEventsBatch failed: {type(error).__name__}: {error}")
    return store_pb2.AppendOutcome(
        failure=store_pb2.AppendFailure(
            code=grpc_code(error).value[0],
            reason=error.code,
            message=bounded_message(error),
            metadata=error_metadata(error),
        )
    )


class StoreServicer(store_pb2_grpc.StoreServiceServicer):
    """The StoreService RPCs over one backend.

    `max_artifact_bytes` caps one artifact, whether put or carried inline by an append (0: no cap).
    """

    def __init__(
        self,
        backend: StoreBackend,
        *,
        max_artifact_bytes: int = limits.DEFAULT_MAX_ARTIFACT_BYTES,
        allow_deletes: bool = False,
    ) -> None:
        if max_artifact_bytes < 0:
            raise ValueError(f"max_artifact_bytes must be 0 (no cap) or more, got {max_artifact_bytes}")
        self._backend = backend
        self._max_artifact_bytes = max_artifact_bytes
        # Deletes are for engines only: a store that requires a token lets its token holders (the
        # engines) delete; one without a token deletes only when started with --allow-deletes.
        self._allow_deletes = allow_deletes
        self._shutting_down = asyncio.Event()
        # AppendEventsStream calls waiting for their next request (their tasks).
        self._idle_append_streams: set[asyncio.Task[Any]] = set()

    def end_subscriptions(self) -> None:
        """Make every open SubscribeEvents, and every AppendEventsStream between requests, end with
        UNAVAILABLE (the server is draining)."""
        self._shutting_down.set()
        for task in list(self._idle_append_streams):
            task.cancel()

    @translated
    async def AppendEvents(
        self, request: store_pb2.AppendEventsRequest, context: Context
    ) -> store_pb2.AppendEventsResponse:
        """Validate, append through the backend (group-committed there), report the new head."""
        return await self._append(request)

    @translated
    async def AppendEventsBatch(
        self, request: store_pb2.AppendEventsBatchRequest, context: Context
    ) -> store_pb2.AppendEventsBatchResponse:
        """Each append as AppendEvents would take it, queued together for one group commit; each
        its own outcome."""
        return store_pb2.AppendEventsBatchResponse(outcomes=await self.append_batch(request.appends))

    @translated_stream
    async def AppendEventsStream(
        self, requests: AsyncIterator[store_pb2.AppendEventsStreamRequest], context: Context
    ) -> AsyncIterator[store_pb2.AppendEventsStreamResponse]:
        """Each request as AppendEventsBatch takes it, answered in turn; a request it would refuse
        as a whole ends the call with that status. Ends an idle call when the store shuts down."""
        # Waiting for the next request, the call's task is listed, and a shutdown cancels it there
        # (a task per read, raced against the shutdown, cost each request as much again).
        task = asyncio.current_task()
        assert task is not None
        incoming = aiter(requests)
        while not self._shutting_down.is_set():
            self._idle_append_streams.add(task)
            try:
                request = await anext(incoming)
            except StopAsyncIteration:
                return  # the client is done
            except asyncio.CancelledError:
                if not self._shutting_down.is_set():
                    raise  # the client cancelled, or the server is stopping
                task.uncancel()  # the shutdown's: ended below, UNAVAILABLE
                break
            finally:
                self._idle_append_streams.discard(task)
            arrived = time.perf_counter()
            try:
                outcomes = await self.append_batch(request.appends)
            finally:  # each request received is counted, answered or not
                metrics.APPEND_STREAM_REQUEST_SECONDS.observe(time.perf_counter() - arrived)
            yield store_pb2.AppendEventsStreamResponse(outcomes=outcomes)
        raise unavailable("store_shutting_down", "the store is shutting down; open the append stream again")

    async def append_batch(
        self, appends: Sequence[store_pb2.AppendEventsRequest]
    ) -> list[store_pb2.AppendOutcome]:
        """The outcomes of a batch's appends (AppendEventsBatch, or a request of AppendEventsStream),
        queued together for one group commit, in request order; raises for a batch refused whole."""
        limits.check_batch_appends(len(appends))
        # The appends enqueue in request order within one turn of the loop, before the writer runs.
        settled = await asyncio.gather(*(self._append(append) for append in appends), return_exceptions=True)
        return [_outcome(each) for each in settled]

    async def _append(self, request: store_pb2.AppendEventsRequest) -> store_pb2.AppendEventsResponse:
        stream_id = limits.check_stream_id(request.stream_id)
        expected = _expected(request)
        events = _new_events(request)
        status = limits.check_status_label(request.status)
        artifacts = _new_artifacts(request, self._max_artifact_bytes)
        attributes = limits.check_attributes(dict(request.attributes))
        due_at_us = (
            limits.check_due_at("due_at_us", request.due_at_us, zero=True)
            if request.HasField("due_at_us")
            else None
        )
        nudges = limits.check_nudges([(n.stream_id, n.due_at_us) for n in request.nudges])
        report_heads = limits.check_report_heads(list(request.report_heads)) if request.report_heads else ()
        append_key = limits.check_append_key(request.append_key)
        result = await self._backend.append(
            stream_id,
            expected,
            events,
            status=status,
            artifacts=artifacts,
            attributes=attributes,
            due_at_us=due_at_us,
            nudges=nudges,
            report_heads=report_heads,
            append_key=append_key,
        )
        if not result.repeated:  # a repeat appended nothing
            metrics.appended(len(events), sum(len(artifact.data) for artifact in artifacts))
        if result.artifact_ids or result.reported_heads or result.repeated:
            return store_pb2.AppendEventsResponse(
                first_seq=result.first_seq,
                head_seq=result.head_seq,
                artifact_ids=result.artifact_ids,
                reported_heads=result.reported_heads,
                recorded_at_us=result.recorded_at_us,
                repeated=result.repeated,
            )
        return store_pb2.AppendEventsResponse(
            first_seq=result.first_seq, head_seq=result.head_seq, recorded_at_us=result.recorded_at_us
        )

    @translated
    async def ReadEvents(
        self, request: store_pb2.ReadEventsRequest, context: Context
    ) -> store_pb2.ReadEventsResponse:
        """One forward page of a stream."""
        stream_id = limits.check_stream_id(request.stream_id)
        from_seq = limits.check_sequence("from_seq", request.from_seq)
        page = await self._backend.read(stream_id, from_seq, limits.read_limit(request.limit))
        return store_pb2.ReadEventsResponse(
            events=[recorded_event(e) for e in page.events], next_seq=page.next_seq, head_seq=page.head_seq
        )

    @translated
    async def TrimStream(
        self, request: store_pb2.TrimStreamRequest, context: Context
    ) -> store_pb2.TrimStreamResponse:
        """Delete a stream's events below `before_seq`; its head and label stay as they are."""
        stream_id = limits.check_stream_id(request.stream_id)
        before_seq = limits.check_sequence("before_seq", request.before_seq)
        result = await self._backend.trim(stream_id, before_seq)
        return store_pb2.TrimStreamResponse(removed=result.removed, head_seq=result.head_seq)

    def _check_deletes_allowed(self) -> None:
        if not self._allow_deletes:
            raise KeelError(
                "deletes_not_allowed",
                "this store refuses deletes: only engines may delete, so a store deletes only when it "
                "requires a token (--auth-token, which engines present) or was started with --allow-deletes",
                category=ErrorCategory.PERMISSION_DENIED,
            )

    @translated
    async def DeleteStreams(
        self, request: store_pb2.DeleteStreamsRequest, context: Context
    ) -> store_pb2.DeleteStreamsResponse:
        """Delete whole streams in one transaction (engines only)."""
        stream_ids = limits.check_delete_streams(list(request.stream_ids))
        self._check_deletes_allowed()
        deleted = await self._backend.delete_streams(stream_ids)
        metrics.STREAMS_DELETED.inc(deleted)
        return store_pb2.DeleteStreamsResponse(deleted=deleted)

    @translated
    async def ListArtifacts(
        self, request: store_pb2.ListArtifactsRequest, context: Context
    ) -> store_pb2.ListArtifactsResponse:
        """A page of artifacts last stored before `stored_before`, oldest first."""
        if not request.HasField("stored_before"):
            raise invalid_argument("invalid_argument", "stored_before is required")
        page = await self._backend.list_artifacts(
            _micros(request.stored_before), limits.page_size(request.page_size), request.page_token
        )
        return store_pb2.ListArtifactsResponse(
            artifacts=[
                store_pb2.ArtifactSummary(
                    artifact_id=a.artifact_id, kind=a.kind, size=a.size, stored_at=_timestamp(a.stored_at_us)
                )
                for a in page.artifacts
            ],
            next_page_token=page.next_page_token,
        )

    @translated
    async def DeleteArtifacts(
        self, request: store_pb2.DeleteArtifactsRequest, context: Context
    ) -> store_pb2.DeleteArtifactsResponse:
        """Delete artifacts not stored again since `stored_before` (engines only)."""
        artifact_ids = limits.check_delete_artifacts(list(request.artifact_ids))
        if not request.HasField("stored_before"):
            raise invalid_argument("invalid_argument", "stored_before is required")
        self._check_deletes_allowed()
        deleted = await self._backend.delete_artifacts(artifact_ids, _micros(request.stored_before))
        metrics.ARTIFACTS_DELETED.inc(len(deleted))
        return store_pb2.DeleteArtifactsResponse(deleted_ids=deleted)

    @translated
    async def HeadSeq(self, request: store_pb2.HeadSeqRequest, context: Context) -> store_pb2.HeadSeqResponse:
        """The stream's head and status label."""
        head = await self._backend.head(limits.check_stream_id(request.stream_id))
        return store_pb2.HeadSeqResponse(head_seq=head.head_seq, status=int(head.status))  # type: ignore[arg-type]

    @translated
    async def ListStreams(
        self, request: store_pb2.ListStreamsRequest, context: Context
    ) -> store_pb2.ListStreamsResponse:
        """A page of streams, newest first, filtered by label, prefix, attributes, creation time and
        duration."""
        min_duration_us, max_duration_us = limits.check_duration_range(
            request.min_duration_us if request.HasField("min_duration_us") else None,
            request.max_duration_us if request.HasField("max_duration_us") else None,
        )
        page = await self._backend.list_streams(
            statuses=limits.check_status_filter(list(request.statuses)),
            prefix=limits.check_prefix(request.prefix),
            page_size=limits.page_size(request.page_size),
            page_token=request.page_token,
            attributes=limits.check_attributes(dict(request.attributes)),
            created_after_us=_micros(request.created_after) if request.HasField("created_after") else 0,
            created_before_us=_micros(request.created_before) if request.HasField("created_before") else 0,
            min_duration_us=min_duration_us,
            max_duration_us=max_duration_us,
        )
        return store_pb2.ListStreamsResponse(
            streams=[
                store_pb2.StreamInfo(
                    stream_id=s.stream_id,
                    head_seq=s.head_seq,
                    status=int(s.status),  # type: ignore[arg-type]
                    created_at=_timestamp(s.created_at_us),
                    updated_at=_timestamp(s.updated_at_us),
                    attributes=s.attributes,
                    ended_at=_timestamp(s.ended_at_us) if s.ended_at_us else None,
                )
                for s in page.streams
            ],
            next_page_token=page.next_page_token,
        )

    @translated
    async def ListDue(self, request: store_pb2.ListDueRequest, context: Context) -> store_pb2.ListDueResponse:
        """The streams due by `before_us`, earliest first, and the next due time after them."""
        page = await self._backend.list_due(
            limits.check_due_at("before_us", request.before_us, zero=False),
            prefix=limits.check_prefix(request.prefix),
            limit=limits.due_limit(request.limit),
        )
        return store_pb2.ListDueResponse(
            due=[
                store_pb2.DueStream(stream_id=d.stream_id, due_at_us=d.due_at_us, head_seq=d.head_seq)
                for d in page.due
            ],
            next_due_at_us=page.next_due_at_us,
        )

    @translated
    async def NudgeDue(
        self, request: store_pb2.NudgeDueRequest, context: Context
    ) -> store_pb2.NudgeDueResponse:
        """Move a PARKED stream's due time earlier; whether it is PARKED."""
        parked = await self._backend.nudge_due(
            limits.check_stream_id(request.stream_id),
            limits.check_due_at("due_at_us", request.due_at_us, zero=False),
        )
        return store_pb2.NudgeDueResponse(parked=parked)

    @translated_stream
    async def SubscribeEvents(
        self, request: store_pb2.SubscribeEventsRequest, context: Context
    ) -> AsyncIterator[store_pb2.SubscribeEventsResponse]:
        """Existing events after `after_seq`, then live ones, until the client cancels."""
        stream_id = limits.check_stream_id(request.stream_id)
        after_seq = limits.check_sequence("after_seq", request.after_seq)
        stopping = asyncio.ensure_future(self._shutting_down.wait())
        events = self._backend.subscribe(stream_id, after_seq)
        step: asyncio.Future[StoredEvent] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(events))
                await asyncio.wait({step, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await step
                    break
                try:
                    event = step.result()
                except StopAsyncIteration:
                    break
                yield store_pb2.SubscribeEventsResponse(event=recorded_event(event))
        finally:
            stopping.cancel()
            # A client that cancels interrupts us while `step` is suspended inside the generator:
            # finish that step first, or aclose() finds the generator running and the task and its
            # wake-up leak until the stream's next append (never, for a finished run).
            if step is not None and not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
            # Close the backend's generator now (not at garbage collection): it holds a wake-up.
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
        # The backend or the server is going away: tell the client to resubscribe elsewhere/later.
        raise unavailable(
            "store_shutting_down", "the store is shutting down; subscribe again after your last seq"
        )

    @translated
    async def PutArtifact(
        self, request_iterator: AsyncIterator[store_pb2.PutArtifactRequest], context: Context
    ) -> store_pb2.PutArtifactResponse:
        """Hash and store the streamed chunks; the first message names the kind.

        The upload is refused (RESOURCE_EXHAUSTED `artifact_too_large`) at the first message that
        takes it past the cap, before the backend sees that message; the backend then discards
        what it had staged.
        """
        cap = self._max_artifact_bytes
        first = await anext(request_iterator, None)
        if first is None:
            raise invalid_argument(
                "invalid_artifact_kind", "PutArtifact needs at least one message carrying the kind"
            )
        kind = limits.check_artifact_kind(first.kind)

        async def chunks() -> AsyncIterator[bytes]:
            seen = len(first.data)
            limits.check_artifact_size("the artifact", seen, cap)
            if first.data:
                yield first.data
            async for message in request_iterator:
                if message.data:
                    seen += len(message.data)
                    limits.check_artifact_size("the artifact", seen, cap)
                    yield message.data

        put = await self._backend.put_artifact(kind, chunks())
        metrics.ARTIFACT_BYTES_IN.labels("put").inc(put.size)
        return store_pb2.PutArtifactResponse(artifact_id=put.artifact_id, size=put.size, created=put.created)

    @translated_stream
    async def GetArtifact(
        self, request: store_pb2.GetArtifactRequest, context: Context
    ) -> AsyncIterator[store_pb2.GetArtifactResponse]:
        """The artifact in chunks; the first carries kind and size (an empty one sends just that)."""
        download = await self._backend.get_artifact(limits.check_artifact_id(request.artifact_id))
        info = download.info
        first = True
        async for data in download.chunks:
            metrics.ARTIFACT_BYTES_OUT.inc(len(data))
            if first:
                yield store_pb2.GetArtifactResponse(kind=info.kind, size=info.size, data=data)
                first = False
            else:
                yield store_pb2.GetArtifactResponse(data=data)
        if first:
            yield store_pb2.GetArtifactResponse(kind=info.kind, size=info.size)

    @translated
    async def HasArtifact(
        self, request: store_pb2.HasArtifactRequest, context: Context
    ) -> store_pb2.HasArtifactResponse:
        """Whether the artifact is stored, and its size."""
        info = await self._backend.has_artifact(limits.check_artifact_id(request.artifact_id))
        if info is None:
            return store_pb2.HasArtifactResponse(exists=False)
        return store_pb2.HasArtifactResponse(exists=True, size=info.size)


def register(server: grpc.aio.Server, servicer: StoreServicer) -> list[str]:
    """Add the servicer to a server; returns the service names for health and reflection."""
    add_servicer(store_pb2_grpc.add_StoreServiceServicer_to_server, servicer, server)
    return [SERVICE_NAME]
