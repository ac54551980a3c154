"""The engine's store client: addresses, and appends whose answer was lost on the way back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from keel.store.v1 import store_pb2, store_pb2_grpc

from engine_service.store import grpc_client
from engine_service.store.grpc_client import StoreClient, channel_target
from keel_core.errors import ErrorCategory, KeelError
from keel_core.serving import SERVER_OPTIONS
from store_service.server import StoreConfig, StoreServingHandle, start_store
from store_service.sqlite import SqliteStoreBackend
from store_service.sqlite import writer as sqlite_writer
from store_service.sqlite.backend import DATABASE_FILE
from store_service.wire.servicer import StoreServicer
from tests.engine.processes import eventually, start_store_process

ServicerT = TypeVar("ServicerT", bound=StoreServicer)

# Long enough for the store to commit and answer even on a loaded machine.
EAT_SECONDS = 1.5


class ResponseEatingProxy:
    """Forwards TCP to a target; when armed, eats server->client bytes for a while, then resets the link.

    That is an answer lost after the server committed: the client sees its connection drop and
    cannot know whether the call took effect.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed = False
        self.eaten = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on a fresh port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop forwarding."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, eat: bool) -> None:
            eating = False
            while data := await src.read(65536):
                if eat and self.armed:
                    # Eat everything the server says for a while (flow control frames come first,
                    # then the answer), then reset both sides.
                    self.armed, eating = False, True
                    self.eaten += 1
                    asyncio.get_running_loop().call_later(EAT_SECONDS, _reset)
                if eating:
                    continue
                dst.write(data)
                await dst.drain()

        def _reset() -> None:
            writer.transport.abort()
            up_writer.transport.abort()

        tasks = [
            asyncio.ensure_future(pump(reader, up_writer, False)),
            asyncio.ensure_future(pump(up_reader, writer, True)),
        ]
        for task in tasks:
            self._tasks.add(task)
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks)
        writer.transport.abort()
        up_writer.transport.abort()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StoreServingHandle]:
    """An in-process store."""
    handle = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store")))
    yield handle
    await handle.drain(0.5)


@contextlib.asynccontextmanager
async def through_an_eating_proxy(
    store: StoreServingHandle,
) -> AsyncIterator[tuple[ResponseEatingProxy, StoreClient, StoreClient]]:
    """A proxy in front of `store`, a client whose calls go through it, and one that goes direct."""
    proxy = ResponseEatingProxy(store.port)
    await proxy.start()
    client = StoreClient(f"127.0.0.1:{proxy.port}", rpc_timeout=5.0)
    direct = StoreClient(f"127.0.0.1:{store.port}")
    try:
        yield proxy, client, direct
    finally:
        await client.close()
        await direct.close()
        await proxy.close()


def test_channel_target_balances_ip_addresses_and_resolves_names() -> None:
    assert channel_target("127.0.0.1:7071") == "ipv4:127.0.0.1:7071"
    assert channel_target("127.0.0.1:1,127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target("localhost:7071") == "dns:///localhost:7071"
    assert channel_target("[::1]:5") == "ipv6:[::1]:5"
    with pytest.raises(ValueError):
        channel_target("")


async def test_append_whose_answer_was_lost_is_recognised_not_repeated(
    store: StoreServingHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine_service.store.grpc_client")
    async with through_an_eating_proxy(store) as (proxy, client, direct):
        await client.append("run:x", [("A", b"1")], expected_seq=None)
        proxy.armed = True
        result = await client.append(
            "run:x", [("B", b"2"), ("C", b"3")], expected_seq=1, artifacts=[("k", b"d")]
        )
        assert proxy.eaten == 1
        assert (result.first_seq, result.head_seq) == (2, 3)
        assert client.calls["AppendEvents"] == 3  # the first append, the lost one, its retry
        assert "had committed before its answer was lost" in caplog.text  # the retry met its own events
        events = await direct.read("run:x")
        assert [(e.seq, e.type, e.payload) for e in events] == [
            (1, "A", b"1"),
            (2, "B", b"2"),
            (3, "C", b"3"),
        ]


async def test_an_append_at_any_head_whose_answer_was_lost_is_not_repeated(
    store: StoreServingHandle, caplog: pytest.LogCaptureFixture
) -> None:
    # No expected head to meet: the retry carries the first try's append key, and the store answers
    # it with the first try's commit. (Before append keys this stream held B, C, B, C.)
    caplog.set_level(logging.INFO, logger="engine_service.store.grpc_client")
    async with through_an_eating_proxy(store) as (proxy, client, direct):
        await client.append("ledger:x", [("A", b"1")], expected_seq=None, expected_any=True)
        proxy.armed = True
        result = await client.append(
            "ledger:x", [("B", b"2"), ("C", b"3")], expected_seq=None, expected_any=True
        )
        assert proxy.eaten == 1
        assert client.calls["AppendEvents"] == 3  # the first append, the lost one, its retry
        assert "(its key repeated)" in caplog.text  # the store answered the retry with the first try
        assert (result.first_seq, result.head_seq) == (2, 3)
        assert [(e.seq, e.type) for e in await direct.read("ledger:x")] == [(1, "A"), (2, "B"), (3, "C")]


async def test_an_append_at_any_head_still_queued_when_its_caller_gave_up_is_not_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another connection holds the SQLite write lock (a backup, the sqlite3 shell): the first try
    # waits in the store's writer past its deadline, the client retries, and then the lock goes.
    # The first try commits after all (its caller gone); the retry must not commit again.
    monkeypatch.setattr(sqlite_writer, "BUSY_TIMEOUT_MS", 600_000)  # the writer outwaits the test
    handle = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store")))
    client = StoreClient(f"127.0.0.1:{handle.port}", rpc_timeout=2.0)
    holder = sqlite3.connect(tmp_path / "store" / DATABASE_FILE, isolation_level=None)
    try:
        await client.append("hints:q", [("Hint", b"0")], expected_seq=None, expected_any=True)
        holder.execute("BEGIN IMMEDIATE")
        append = asyncio.create_task(
            client.append("hints:q", [("Hint", b"1")], expected_seq=None, expected_any=True, patience=600)
        )
        # The first append, the held one, and its retry (bounded only as a hang detector).
        await eventually(lambda: client.calls["AppendEvents"] >= 3, "a retry", within=300, poll=0.05)
        holder.execute("ROLLBACK")
        result = await asyncio.wait_for(append, 120)  # a hang detector, not a timing threshold
        assert (result.first_seq, result.head_seq) == (2, 2)
        assert [(e.seq, e.payload) for e in await client.read("hints:q")] == [(1, b"0"), (2, b"1")]
    finally:
        holder.close()
        await client.close()
        await handle.drain(0.5)


async def test_small_artifacts_stored_or_read_here_are_read_back_without_asking_the_store(
    tmp_path: Path,
) -> None:
    handle = await start_store(
        StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store"), allow_deletes=True)
    )
    client = StoreClient(f"127.0.0.1:{handle.port}")
    other = StoreClient(f"127.0.0.1:{handle.port}")
    small, big = b'{"n": 1}', b"x" * (grpc_client.ARTIFACT_CACHE_MAX_BYTES + 1)
    try:
        stored = await client.append(
            "run:a", [("E", b"1")], expected_seq=None, artifacts=[("s", small), ("s", big)]
        )
        put = await client.put_artifact("s", b"put")
        before = client.calls.copy()
        assert await client.get_artifact(stored.artifact_ids[0]) == small
        assert await client.get_artifact(put) == b"put"
        assert client.calls - before == {}
        assert await client.get_artifact(stored.artifact_ids[1]) == big  # too big to keep: read
        assert client.calls - before == {"GetArtifact": 1}
        # Another client reads it once, then keeps it.
        assert await other.get_artifact(stored.artifact_ids[0]) == small
        assert await other.get_artifact(stored.artifact_ids[0]) == small
        assert other.calls["GetArtifact"] == 1
        # Deleting through a client forgets it there: the store's answer counts.
        deleted = await client.delete_artifacts([put], datetime.now(UTC) + timedelta(seconds=60))
        assert deleted == [put]
        with pytest.raises(KeelError) as caught:
            await client.get_artifact(put)
        assert caught.value.code == "artifact_not_found"
    finally:
        await client.close()
        await other.close()
        await handle.drain(0.5)


async def test_appends_made_together_go_as_one_batch_each_with_its_own_outcome(
    store: StoreServingHandle,
) -> None:
    client = StoreClient(f"127.0.0.1:{store.port}")
    try:
        await client.append("run:taken", [("A", b"1")], expected_seq=None)
        before = client.calls.copy()
        streams = [f"run:{i}" for i in range(20)]
        outcomes = await asyncio.gather(
            *(client.append(stream, [("E", stream.encode())], expected_seq=None) for stream in streams),
            client.append("run:taken", [("B", b"2")], expected_seq=None),  # its head is 1: a conflict
            return_exceptions=True,
        )
        # Made in one turn of the loop: one batch carried all 21, on the client's AppendEventsStream.
        assert client.calls - before == {"AppendEvents": 21, "AppendEventsStream": 1}
        *answers, conflict = outcomes
        assert isinstance(conflict, KeelError) and conflict.code == "sequence_conflict"
        assert conflict.details["actual_seq"] == "1"
        assert [(a.first_seq, a.head_seq) for a in answers if not isinstance(a, BaseException)] == [
            (1, 1)
        ] * 20
        for stream in streams:
            assert [(e.seq, e.payload) for e in await client.read(stream)] == [(1, stream.encode())]
        assert [e.type for e in await client.read("run:taken")] == ["A"]
    finally:
        await client.close()


async def test_a_batch_whose_answer_was_lost_is_recognised_append_by_append(
    store: StoreServingHandle,
) -> None:
    async with through_an_eating_proxy(store) as (proxy, client, direct):
        await client.append("run:warm", [("A", b"1")], expected_seq=None)  # the connection is up
        proxy.armed = True
        streams = [f"run:{i}" for i in range(5)]
        results = await asyncio.gather(
            *(client.append(stream, [("E", b"1"), ("F", b"2")], expected_seq=None) for stream in streams)
        )
        assert proxy.eaten == 1 and client.calls["AppendEventsStream"] >= 1
        assert [(r.first_seq, r.head_seq) for r in results] == [(1, 2)] * 5
        for stream in streams:  # each committed once: the retry met its own events
            assert [(e.seq, e.type) for e in await direct.read(stream)] == [(1, "E"), (2, "F")]


class _StoreBeforeStreams(StoreServicer):
    """A store from before AppendEventsStream: it answers the call UNIMPLEMENTED, as gRPC does."""

    async def AppendEventsStream(
        self,
        requests: AsyncIterator[store_pb2.AppendEventsStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[store_pb2.AppendEventsStreamResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        yield store_pb2.AppendEventsStreamResponse()  # never: an async generator, as the servicer's


class _OlderStore(_StoreBeforeStreams):
    """A store from before AppendEventsBatch (and the stream): it answers the call UNIMPLEMENTED."""

    async def AppendEventsBatch(
        self, request: store_pb2.AppendEventsBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> store_pb2.AppendEventsBatchResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        raise AssertionError("abort returned")


@contextlib.asynccontextmanager
async def serving(
    servicer_type: Callable[[SqliteStoreBackend], ServicerT], directory: Path
) -> AsyncIterator[tuple[ServicerT, int]]:
    """An in-process store of a servicer of the test's own on a SQLite backend: it and its port."""
    backend = SqliteStoreBackend.in_directory(directory)
    await backend.open()
    servicer = servicer_type(backend)
    server = grpc.aio.server(options=SERVER_OPTIONS)  # the store's: a held call's pings are welcome
    store_pb2_grpc.add_StoreServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, port
    finally:
        await server.stop(None)
        await backend.close()


async def test_a_store_without_the_append_stream_is_sent_each_batch_as_its_own_call(tmp_path: Path) -> None:
    async with serving(_StoreBeforeStreams, tmp_path / "older") as (_, port):
        client = StoreClient(f"127.0.0.1:{port}")
        try:
            await client.append("run:taken", [("A", b"1")], expected_seq=None)  # refused as a stream, re-sent
            for round_ in (1, 2):
                before = client.calls.copy()
                streams = [f"run:{round_}-{i}" for i in range(6)]
                outcomes = await asyncio.gather(
                    *(client.append(s, [("E", s.encode())], expected_seq=None) for s in streams),
                    client.append("run:taken", [("B", b"2")], expected_seq=None),  # a conflict, its own
                    return_exceptions=True,
                )
                *answers, conflict = outcomes
                assert [(a.first_seq, a.head_seq) for a in answers if not isinstance(a, BaseException)] == [
                    (1, 1)
                ] * 6
                assert isinstance(conflict, KeelError) and conflict.code == "sequence_conflict"
                assert client.calls - before == {"AppendEvents": 7, "AppendEventsBatch": 1}
            # Asked until refused, then never again (each round's calls above). Usually once: but a
            # stream refused while its first request is being written can fail that write INTERNAL
            # "Internal error from Core" in place of the store's UNIMPLEMENTED (grpc.aio overwrites
            # the status: grpc/grpc#36066), which the client takes for a broken stream, as it must
            # (a store that died fails the same way), and retries on a new stream.
            assert client.calls["AppendEventsStream"] >= 1
            for round_ in (1, 2):
                for i in range(6):
                    stream = f"run:{round_}-{i}"
                    assert [e.payload for e in await client.read(stream)] == [stream.encode()]
        finally:
            await client.close()


async def test_a_store_without_batches_is_sent_appends_one_by_one(tmp_path: Path) -> None:
    async with serving(_OlderStore, tmp_path / "older") as (_, port):
        client = StoreClient(f"127.0.0.1:{port}")
        try:
            streams = [f"run:{i}" for i in range(6)]
            for round_ in (1, 2):  # the first is refused as a batch and re-sent; the second is never batched
                before = client.calls.copy()
                results = await asyncio.gather(
                    *(client.append(s, [("E", b"x")], expected_seq=(round_ - 1) or None) for s in streams)
                )
                assert [r.head_seq for r in results] == [round_] * 6
            assert client.calls - before == {"AppendEvents": 6}  # the second round: one by one, nothing else
            assert client.calls["AppendEventsBatch"] == 1
            # Asked until refused (see above), then never again (the second round's calls).
            assert client.calls["AppendEventsStream"] >= 1
            for stream in streams:
                assert [e.seq for e in await client.read(stream)] == [1, 2]
        finally:
            await client.close()


async def test_conflict_with_someone_elses_events_is_still_a_conflict(store: StoreServingHandle) -> None:
    async with through_an_eating_proxy(store) as (_proxy, client, direct):
        await direct.append("run:y", [("A", b"1")], expected_seq=None)
        with pytest.raises(KeelError) as caught:
            await client.append("run:y", [("B", b"2")], expected_seq=None)
        assert caught.value.code == "sequence_conflict"
        await direct.append("run:y", [("X", b"other")], expected_seq=1)
        with pytest.raises(KeelError) as caught:
            await client.append("run:y", [("B", b"2")], expected_seq=1)
        assert caught.value.code == "sequence_conflict"


async def test_several_store_addresses_are_balanced_and_a_dead_one_is_skipped(
    store: StoreServingHandle,
) -> None:
    # Port 1 refuses connections: round-robin sends every call to the live replica instead.
    client = StoreClient(f"127.0.0.1:1,127.0.0.1:{store.port}", patience=10.0)
    try:
        for seq in range(5):
            await client.append("run:z", [("E", str(seq).encode())], expected_seq=seq or None)
        assert [e.seq for e in await client.read("run:z")] == [1, 2, 3, 4, 5]
    finally:
        await client.close()


@pytest.mark.parametrize("token", [None, "s3cret-token"], ids=["plain", "with-a-token"])
async def test_an_append_written_to_a_stream_whose_store_just_died_is_retried_not_failed(
    tmp_path: Path, token: str | None
) -> None:
    # Written at once to the open append stream of a store just killed, a request fails in one of
    # three ways depending on how far gRPC has got with the broken connection: UNAVAILABLE, a write
    # to a call already over, or INTERNAL "Internal error from Core". The last used to fail the
    # append for good (not a retry code): a step's recorded answer was lost and its call made again.
    # With a token, the channel's interceptors send the write from a task of theirs, and the
    # INTERNAL comes out of the read.
    store_args = ("--auth-token", token) if token else ()
    store = await start_store_process(tmp_path / "data", extra_args=store_args)
    client = StoreClient(store.address, auth_token=token)
    try:
        await client.append("run:x", [("E", b"0")], expected_seq=None)  # the stream is open
        for seq in range(1, 11):
            await store.kill()
            append = asyncio.ensure_future(
                client.append("run:x", [("E", str(seq).encode())], expected_seq=seq)
            )
            store = await start_store_process(tmp_path / "data", port=store.port, extra_args=store_args)
            result = await asyncio.wait_for(append, 60)  # a hang detector, not a timing threshold
            assert (result.first_seq, result.head_seq) == (seq + 1, seq + 1)
        assert [e.payload for e in await client.read("run:x")] == [str(seq).encode() for seq in range(11)]
    finally:
        await client.close()
        await store.kill()


async def test_a_stalled_replica_is_skipped_within_the_callers_patience(
    store: StoreServingHandle, tmp_path: Path
) -> None:
    # A SIGSTOPped replica keeps its connection open and answers nothing. With the client's 10 s
    # RPC timeout, calls with 0.5 s of patience (a heartbeat's) must still land, on the other one.
    stalled = await start_store_process(tmp_path / "stalled")
    client = StoreClient(f"{stalled.address},127.0.0.1:{store.port}", rpc_timeout=10.0)
    try:
        await client.head("warm-up")  # both connections up before one replica stalls
        await client.head("warm-up")
        stalled.process.send_signal(signal.SIGSTOP)
        for seq in range(6):
            await client.append(
                "engine:x", [("E", str(seq).encode())], expected_seq=seq or None, patience=0.5
            )
        assert [e.seq for e in await client.read("engine:x", patience=0.5)] == [1, 2, 3, 4, 5, 6]
    finally:
        stalled.process.send_signal(signal.SIGCONT)
        await client.close()
        await stalled.kill()


async def test_a_caller_that_waits_for_ever_is_not_held_by_a_stalled_replica(
    store: StoreServingHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by the chaos run on PostgreSQL: a run driver recording an answer waits for the store as
    # long as it takes, so each try got the whole RPC timeout and sat on a SIGSTOPped replica while
    # the run's lease ran out. While another replica is untried, a try now fails over within
    # FAILOVER_SECONDS. (A 600 s RPC timeout, and keepalive pings out of the way, so that only the
    # per-try deadline can end the try: without the fix, the hang detector below fires.)
    monkeypatch.setattr(grpc_client, "KEEPALIVE_TIME_MS", 3_600_000)
    stalled = await start_store_process(tmp_path / "stalled")
    client = StoreClient(f"{stalled.address},127.0.0.1:{store.port}", rpc_timeout=600.0)
    try:
        await client.head("warm-up")  # both connections up before one replica stalls
        await client.head("warm-up")
        stalled.process.send_signal(signal.SIGSTOP)
        for seq in range(4):
            append = client.append(
                "run:forever", [("E", str(seq).encode())], expected_seq=seq or None, patience=3600
            )
            await asyncio.wait_for(append, 60)  # a hang detector, not a timing threshold
        assert [e.seq for e in await client.read("run:forever", patience=0.5)] == [1, 2, 3, 4]
    finally:
        stalled.process.send_signal(signal.SIGCONT)
        await client.close()
        await stalled.kill()


class _HeldStore(StoreServicer):
    """A store whose batches wait for `release`, then commit even if their caller is gone (as a
    real store's group commit does once the appends are queued)."""

    def __init__(self, backend: SqliteStoreBackend) -> None:
        super().__init__(backend)
        self.batch_arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def append_batch(
        self, appends: Sequence[store_pb2.AppendEventsRequest]
    ) -> list[store_pb2.AppendOutcome]:
        self.batch_arrived.set()
        return await asyncio.shield(self._after_release(appends))

    async def _after_release(
        self, appends: Sequence[store_pb2.AppendEventsRequest]
    ) -> list[store_pb2.AppendOutcome]:
        await self.release.wait()
        return await super().append_batch(appends)


@pytest.fixture
async def held_store(tmp_path: Path) -> AsyncIterator[tuple[_HeldStore, int]]:
    """An in-process store whose batches wait to be released."""
    async with serving(_HeldStore, tmp_path / "held") as (servicer, port):
        yield servicer, port
        servicer.release.set()


async def test_an_append_in_a_batch_is_failed_at_its_own_time_not_its_neighbours(
    held_store: tuple[_HeldStore, int],
) -> None:
    # A batch used to be sent with the earliest deadline of its appends: when a short-patience
    # append's time ran out, every append of the batch failed DEADLINE_EXCEEDED and was retried,
    # while the store committed the batch anyway: a ledger entry (expected_any) was written twice.
    servicer, port = held_store
    client = StoreClient(f"127.0.0.1:{port}")
    try:
        hasty = asyncio.ensure_future(
            client.append("run:hasty", [("A", b"1")], expected_seq=None, patience=0.3)
        )
        patient = asyncio.ensure_future(
            client.append(
                "ledger:x", [("Failed", b"once")], expected_seq=None, expected_any=True, patience=600
            )
        )
        await servicer.batch_arrived.wait()  # both went in one batch, held by the store
        with pytest.raises(KeelError) as caught:
            await hasty  # its own patience ran out while the batch was held: it alone gives up
        assert caught.value.code == "store_unavailable"
        assert not patient.done()
        servicer.release.set()
        result = await asyncio.wait_for(patient, 60)  # a hang detector, not a timing threshold
        assert (result.first_seq, result.head_seq) == (1, 1)
        assert [e.payload for e in await client.read("ledger:x")] == [b"once"]
        assert client.calls["AppendEventsStream"] == 1
    finally:
        await client.close()


async def test_an_append_waiting_behind_a_held_batch_gives_up_within_its_patience(
    held_store: tuple[_HeldStore, int],
) -> None:
    # Appends made while a batch is on its way wait for it to come back before they leave. A
    # store that holds the batch (stalled, overloaded) must not hold them past their own patience:
    # a heartbeat with half a second of patience used to wait for the batch's whole RPC timeout.
    servicer, port = held_store
    client = StoreClient(f"127.0.0.1:{port}", rpc_timeout=600.0)
    try:
        held = [
            asyncio.ensure_future(client.append(f"run:{i}", [("A", b"1")], expected_seq=None, patience=600))
            for i in range(2)
        ]
        await servicer.batch_arrived.wait()
        late = client.append("engine:x", [("Beat", b"1")], expected_seq=None, patience=0.5)
        with pytest.raises(KeelError) as caught:
            await asyncio.wait_for(late, 60)  # a hang detector, not a timing threshold
        assert caught.value.code == "store_unavailable"
        assert not any(append.done() for append in held)  # it did not wait for the batch to come back
        servicer.release.set()
        assert [r.head_seq for r in await asyncio.gather(*held)] == [1, 1]
    finally:
        await client.close()


async def test_appends_queued_when_the_client_closes_fail_rather_than_hang(
    held_store: tuple[_HeldStore, int],
) -> None:
    servicer, port = held_store
    client = StoreClient(f"127.0.0.1:{port}")
    held = [
        asyncio.ensure_future(client.append(f"run:{i}", [("A", b"1")], expected_seq=None, patience=600))
        for i in range(2)
    ]
    await servicer.batch_arrived.wait()
    queued = asyncio.ensure_future(client.append("run:q", [("A", b"1")], expected_seq=None, patience=600))
    await asyncio.sleep(0)  # it is queued behind the held batch
    await client.close()
    outcomes = await asyncio.wait_for(asyncio.gather(*held, queued, return_exceptions=True), 60)
    assert all(isinstance(outcome, KeelError) for outcome in outcomes), outcomes
    queued_error = outcomes[-1]
    assert isinstance(queued_error, KeelError) and queued_error.code == "store_client_closed"


class _RefusingStore(StoreServicer):
    """A store that refuses every batch as a whole, with its reason in ErrorInfo."""

    async def append_batch(
        self, appends: Sequence[store_pb2.AppendEventsRequest]
    ) -> list[store_pb2.AppendOutcome]:
        raise KeelError(
            "store_read_only",
            "this store is read-only for maintenance",
            category=ErrorCategory.FAILED_PRECONDITION,
        )


async def test_a_batch_refused_as_a_whole_gives_each_append_the_refusals_reason(tmp_path: Path) -> None:
    # Each append of a refused batch is given its own copy of the error; the copies used to drop
    # the trailing metadata, so the ErrorInfo reason became `internal`.
    async with serving(_RefusingStore, tmp_path / "refusing") as (_, port):
        client = StoreClient(f"127.0.0.1:{port}")
        try:
            outcomes = await asyncio.gather(
                *(client.append(f"run:{i}", [("A", b"1")], expected_seq=None) for i in range(3)),
                return_exceptions=True,
            )
            assert client.calls["AppendEventsStream"] >= 1  # refused on the stream, which it ended
            for outcome in outcomes:
                assert isinstance(outcome, KeelError), outcome
                assert (outcome.code, outcome.category) == (
                    "store_read_only",
                    ErrorCategory.FAILED_PRECONDITION,
                )
                assert "read-only for maintenance" in outcome.message
        finally:
            await client.close()


@pytest.mark.parametrize("appends", [1, 3])
async def test_appends_whose_send_meets_a_closed_channel_fail_as_closed(appends: int) -> None:
    # The client closes after a flush made its send but before the send began: the channel then
    # refuses the call with a UsageError, which used to reach the caller bare (a lone append) or
    # as an internal error (a batch); it is the same as an append queued when the client closed.
    client = StoreClient("127.0.0.1:1", patience=600)
    batcher = next(iter(client._batchers.values()))
    flush = batcher._flush
    closing: list[asyncio.Future[None]] = []

    def flush_then_close() -> None:
        closing.append(asyncio.ensure_future(client.close()))  # its first step runs before the send's
        flush()

    batcher._flush = flush_then_close  # type: ignore[method-assign]
    made = [client.append(f"run:{i}", [("A", b"1")], expected_seq=None) for i in range(appends)]
    outcomes = await asyncio.wait_for(asyncio.gather(*made, return_exceptions=True), 60)
    await asyncio.gather(*closing)
    for outcome in outcomes:
        assert isinstance(outcome, KeelError) and outcome.code == "store_client_closed", outcome
