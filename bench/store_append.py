"""StoreService throughput against a bare grpc.aio echo server, measured in the same run.

Run: `.venv/bin/python bench/store_append.py [--quick] [--durability full|normal] [--seconds N]
[--event-loop asyncio|uvloop|auto]` (the loop both servers run on; this client stays on asyncio)

Both servers run as separate processes (the store is the real `store-service` with full durability
by default); this process is the client, with one channel per server and N concurrent tasks. It
prints calls/s for each pattern and the store/echo ratios, next to the targets of issue 13:
64-client single-event appends >= 0.9x echo, and 100-event batches >= 0.8x of what plain `sqlite3`
commits with the store's settings: one process committing one transaction per 100-event batch,
serially (`SqliteWriter`'s connection: WAL, the same `synchronous`, the store's schema; each batch
reads its stream's head, inserts its events in one statement and updates the head, as the store
does). That baseline runs in this process, alternated with the store in every round. The batches
are also sent as requests on one long-lived `AppendEventsStream` call per client, as an engine sends
its appends; that line is printed beside the target's, which is the `AppendEvents` calls'.
The machine may be shared: compare the ratios within one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from engine_runs import main_thread_seconds
from keel.store.v1 import store_pb2, store_pb2_grpc

from keel_core.serving import DEFAULT_EVENT_LOOP, EVENT_LOOPS
from keel_core.status import from_rpc_error
from store_service.sqlite.writer import SqliteWriter

pb = store_pb2
ECHO_METHOD = "/keel.bench.Echo/Echo"
APPEND_METHOD = "/keel.store.v1.StoreService/AppendEvents"
STREAM_METHOD = "/keel.store.v1.StoreService/AppendEventsStream"
MiB = 1024 * 1024
PAYLOAD = b'{"step": "fetch", "attempt": 1, "result": {"ok": true, "rows": 42}}'


@dataclass(frozen=True)
class Figure:
    """One measured pattern: operations (calls or events) per second, and what they were."""

    name: str
    per_second: float
    unit: str


@contextmanager
def server_process(command: list[str], pattern: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start a server process, wait for its `... listening on HOST:PORT` line, stop it afterwards."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        address = ""
        while not address and time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                match = re.match(pattern, proc.stdout.readline().decode().strip())
                if match:
                    address = match.group(1)
            if proc.poll() is not None:
                break
        selector.close()
        if not address:
            raise RuntimeError(f"{command[0]} did not start")
        yield proc, address
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def run_for(seconds: float, tasks: int, one_call: Callable[[int], Awaitable[int]]) -> float:
    """Run `tasks` loops of `one_call(task_index)` for `seconds`; returns counted units per second."""
    stop_at = 0.0
    counts = [0] * tasks

    async def loop(index: int) -> None:
        while time.perf_counter() < stop_at:
            counts[index] += await one_call(index)

    # Warm-up: connections, caches, and (for the store) the first writes to each stream.
    stop_at = time.perf_counter() + min(0.3, seconds / 3)
    await asyncio.gather(*(loop(i) for i in range(tasks)))
    counts = [0] * tasks
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(loop(i) for i in range(tasks)))
    return sum(counts) / (time.perf_counter() - started)


async def with_main_thread_busy(pid: int, rate_of: Awaitable[float]) -> tuple[float, float]:
    """The rate `rate_of` measures, and the share of its time (0 to 1) the process's main thread was
    on a CPU. `rate_of` is a `run_for` measurement not yet started: its warm-up is inside, at the same
    load as the rest."""
    began, used = time.perf_counter(), main_thread_seconds(pid)
    rate = await rate_of
    return rate, (main_thread_seconds(pid) - used) / (time.perf_counter() - began)


@dataclass
class MainThreads:
    """How busy the echo server's and the store's main threads were at 64 clients, each round,
    with the CPU they spent per call and per append (busy share / rate)."""

    echo: list[tuple[float, float]] = field(default_factory=list)  # (busy share, ms per call)
    store: list[tuple[float, float]] = field(default_factory=list)  # (busy share, ms per append)

    def line(self) -> str:
        """The medians over the rounds."""
        (echo_busy, echo_ms), (store_busy, store_ms) = (
            (statistics.median(b for b, _ in rounds), statistics.median(ms for _, ms in rounds))
            for rounds in (self.echo, self.store)
        )
        return (
            f"  main threads at 64 clients: echo server busy {echo_busy:.0%} ({echo_ms:.3f} ms per call), "
            f"store busy {store_busy:.0%} ({store_ms:.3f} ms per append)"
        )


async def echo_rate(channel: grpc.aio.Channel, tasks: int, seconds: float) -> float:
    """Unary echo calls/s with `tasks` concurrent callers.

    The client side does what the append client does (build an AppendEventsRequest, serialize it,
    parse the reply) so the two differ only on the server side; the echo server itself parses
    nothing and returns the bytes it got.
    """
    call = channel.unary_unary(
        ECHO_METHOD,
        request_serializer=pb.AppendEventsRequest.SerializeToString,
        response_deserializer=pb.AppendEventsRequest.FromString,
    )
    heads = [0] * tasks
    events = [pb.EventData(type="StepCompleted", payload=PAYLOAD)]

    async def one(index: int) -> int:
        echoed = await call(
            pb.AppendEventsRequest(
                stream_id=f"echo-{index}",
                expected_kind=pb.EXPECTED_KIND_EXACT,
                expected_seq=heads[index],
                events=events,
            )
        )
        heads[index] = echoed.expected_seq + 1
        return 1

    return await run_for(seconds, tasks, one)


async def append_rate(
    stub: store_pb2_grpc.StoreServiceAsyncStub, tasks: int, seconds: float, batch: int, tag: str
) -> float:
    """Events/s appended by `tasks` concurrent clients, each on its own stream with exact CAS."""
    heads = [0] * tasks
    events = [pb.EventData(type="StepCompleted", payload=PAYLOAD)] * batch

    async def one(index: int) -> int:
        result = await stub.AppendEvents(
            pb.AppendEventsRequest(
                stream_id=f"{tag}-{index}",
                expected_kind=pb.EXPECTED_KIND_EXACT,
                expected_seq=heads[index],
                events=events,
            )
        )
        heads[index] = result.head_seq
        return batch

    return await run_for(seconds, tasks, one)


async def batch_rate(channel: grpc.aio.Channel, tasks: int, seconds: float, batch: int, tag: str) -> float:
    """Events/s of `batch`-event appends by `tasks` clients, each on its own stream with exact CAS.

    The load generator shares the machine's two cores with the store, so it encodes the identical
    `batch` events once and sends `<per-call header> + <encoded events>` (concatenated protobuf
    fields are one valid message). The store still parses, validates and commits every event; only
    the client's re-encoding of the same bytes on every call is saved.
    """
    call = channel.unary_unary(
        APPEND_METHOD, request_serializer=None, response_deserializer=pb.AppendEventsResponse.FromString
    )
    body = pb.AppendEventsRequest(events=[pb.EventData(type="StepCompleted", payload=PAYLOAD)] * batch)
    encoded_events = body.SerializeToString()
    heads = [0] * tasks

    async def one(index: int) -> int:
        header = pb.AppendEventsRequest(
            stream_id=f"{tag}-{index}", expected_kind=pb.EXPECTED_KIND_EXACT, expected_seq=heads[index]
        )
        result = await call(header.SerializeToString() + encoded_events)
        heads[index] = result.head_seq
        return batch

    return await run_for(seconds, tasks, one)


async def stream_batch_rate(
    channel: grpc.aio.Channel, tasks: int, seconds: float, batch: int, tag: str
) -> float:
    """Events/s of `batch`-event appends by `tasks` clients, each on its own stream with exact CAS,
    each client's appends sent as requests on its own AppendEventsStream call (as an engine does).

    As in `batch_rate`, the identical events are encoded once: a request is the AppendEventsRequest
    (per-call header + encoded events) as field 1 of an AppendEventsStreamRequest.
    """
    body = pb.AppendEventsRequest(events=[pb.EventData(type="StepCompleted", payload=PAYLOAD)] * batch)
    encoded_events = body.SerializeToString()
    heads = [0] * tasks
    calls: dict[int, Any] = {}

    async def one(index: int) -> int:
        call = calls.get(index)
        if call is None:
            call = calls[index] = channel.stream_stream(
                STREAM_METHOD,
                request_serializer=None,
                response_deserializer=pb.AppendEventsStreamResponse.FromString,
            )()  # type: ignore[call-arg]  # written and read here: no request iterator
        header = pb.AppendEventsRequest(
            stream_id=f"{tag}-{index}", expected_kind=pb.EXPECTED_KIND_EXACT, expected_seq=heads[index]
        )
        append = header.SerializeToString() + encoded_events
        await call.write(b"\x0a" + _varint(len(append)) + append)
        answer = await call.read()
        assert isinstance(answer, pb.AppendEventsStreamResponse), answer
        outcome = answer.outcomes[0]
        if not outcome.HasField("appended"):
            raise RuntimeError(f"append refused: {outcome.failure.reason}: {outcome.failure.message}")
        heads[index] = outcome.appended.head_seq
        return batch

    try:
        return await run_for(seconds, tasks, one)
    finally:
        for call in calls.values():
            call.cancel()


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


async def racing_rate(
    stub: store_pb2_grpc.StoreServiceAsyncStub, tasks: int, seconds: float, stream_id: str
) -> tuple[float, float]:
    """64 clients racing on one stream with exact CAS: (won appends/s, attempts/s)."""
    known = [0] * tasks
    attempts = [0]
    event = [pb.EventData(type="Raced", payload=PAYLOAD)]

    async def one(index: int) -> int:
        attempts[0] += 1
        try:
            result = await stub.AppendEvents(
                pb.AppendEventsRequest(
                    stream_id=stream_id,
                    expected_kind=pb.EXPECTED_KIND_EXACT,
                    expected_seq=known[index],
                    events=event,
                )
            )
        except grpc.aio.AioRpcError as error:
            known[index] = int(from_rpc_error(error).details["actual_seq"])
            return 0
        known[index] = result.head_seq
        return 1

    started = time.perf_counter()
    won = await run_for(seconds, tasks, one)
    return won, attempts[0] / (time.perf_counter() - started)


def sqlite3_batch_rate(data_dir: Path, durability: str, seconds: float, batch: int) -> float:
    """Events/s of `batch`-event transactions committed serially through plain sqlite3 in this process."""
    writer = SqliteWriter(
        data_dir / f"baseline-{time.monotonic_ns()}.db", "full" if durability == "full" else "normal"
    )
    conn = writer.conn
    insert = "INSERT INTO events (stream_id, seq, type, payload, recorded_at_us) VALUES " + ", ".join(
        ["(?, ?, ?, ?, ?)"] * batch
    )
    upsert = (
        "INSERT INTO streams (stream_id, head_seq, status, created_at_us, updated_at_us) "
        "VALUES (?, ?, 0, ?, ?) ON CONFLICT (stream_id) DO UPDATE SET "
        "head_seq = excluded.head_seq, updated_at_us = excluded.updated_at_us"
    )
    streams = [f"sqlite3-{i}" for i in range(16)]
    events = 0
    try:
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            stream_id = streams[(events // batch) % len(streams)]
            now = time.time_ns() // 1000
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT head_seq FROM streams WHERE stream_id = ?", (stream_id,)).fetchone()
            head = row[0] if row else 0
            values: list[object] = []
            for i in range(batch):
                values += [stream_id, head + 1 + i, "StepCompleted", PAYLOAD, now]
            conn.execute(insert, values)
            conn.execute(upsert, (stream_id, head + batch, now, now))
            conn.execute("COMMIT")
            events += batch
        return events / (time.perf_counter() - began)
    finally:
        writer.close()


async def artifact_rates(stub: store_pb2_grpc.StoreServiceAsyncStub, size_mib: int) -> tuple[float, float]:
    """(put MB/s, get MB/s) for one artifact of `size_mib` MiB sent in 1 MiB chunks."""
    block = os.urandom(MiB)

    async def requests() -> AsyncIterator[store_pb2.PutArtifactRequest]:
        for i in range(size_mib):
            yield pb.PutArtifactRequest(kind="bench" if i == 0 else "", data=i.to_bytes(4, "big") + block[4:])

    started = time.perf_counter()
    put = await stub.PutArtifact(requests())
    put_rate = size_mib * MiB / 1e6 / (time.perf_counter() - started)
    started = time.perf_counter()
    received = 0
    async for part in stub.GetArtifact(pb.GetArtifactRequest(artifact_id=put.artifact_id)):
        received += len(part.data)
    get_rate = received / 1e6 / (time.perf_counter() - started)
    assert received == size_mib * MiB
    return put_rate, get_rate


async def measure(
    store_address: str,
    echo_address: str,
    seconds: float,
    rounds: int,
    artifact_mib: int,
    baseline: tuple[Path, str],
    pids: tuple[int, int],
) -> tuple[list[Figure], list[float], MainThreads]:
    """Every pattern; echo and store alternate within each round so both see the same machine.

    Returns the figures (medians over rounds), the per-round 64-client store/echo ratios, and how
    busy the main threads of `pids` (the echo server's and the store's: their event loops, where
    requests are handled) were at 64 clients: one busy all the time bounds its server's rate.
    """
    options = [("grpc.max_receive_message_length", 16 * MiB)]
    samples: dict[tuple[str, str], list[float]] = {}

    def record(name: str, unit: str, value: float) -> None:
        samples.setdefault((name, unit), []).append(value)

    ratios: list[float] = []
    main_threads = MainThreads()
    async with (
        grpc.aio.insecure_channel(echo_address, options=options) as echo,
        grpc.aio.insecure_channel(store_address, options=options) as store,
    ):
        stub = store_pb2_grpc.StoreServiceStub(store)
        for round_no in range(rounds):
            for tasks in (1, 64):
                echoed, echo_busy = await with_main_thread_busy(pids[0], echo_rate(echo, tasks, seconds))
                record(f"echo, {tasks} client(s)", "calls/s", echoed)
                appended, store_busy = await with_main_thread_busy(
                    pids[1], append_rate(stub, tasks, seconds, 1, f"single{tasks}-r{round_no}")
                )
                record(f"append 1 event, {tasks} client(s), distinct streams", "appends/s", appended)
                if tasks == 64:
                    ratios.append(appended / echoed)
                    main_threads.echo.append((echo_busy, echo_busy * 1000 / echoed))
                    main_threads.store.append((store_busy, store_busy * 1000 / appended))
            won, tried = await racing_rate(stub, 64, seconds, f"race-r{round_no}")
            record("append 1 event, 64 clients racing on one stream (won)", "appends/s", won)
            record("append 1 event, 64 clients racing on one stream (attempts)", "calls/s", tried)
            for tasks in (1, 16):
                rate = await batch_rate(store, tasks, seconds, 100, f"batch{tasks}-r{round_no}")
                record(f"append 100-event batches, {tasks} client(s)", "events/s", rate)
            streamed = await stream_batch_rate(store, 16, seconds, 100, f"streamed-r{round_no}")
            record("append 100-event batches, 16 client(s), on AppendEventsStream", "events/s", streamed)
            plain = sqlite3_batch_rate(baseline[0], baseline[1], seconds, 100)
            record("sqlite3 alone, 100-event transactions, serially", "events/s", plain)
        put_rate, get_rate = await artifact_rates(stub, artifact_mib)
    figures = [Figure(name, statistics.median(values), unit) for (name, unit), values in samples.items()]
    figures.append(Figure(f"artifact put ({artifact_mib} MiB)", put_rate, "MB/s"))
    figures.append(Figure(f"artifact get ({artifact_mib} MiB)", get_rate, "MB/s"))
    return figures, ratios, main_threads


def report(
    figures: list[Figure], ratios: list[float], main_threads: MainThreads, durability: str, rounds: int
) -> None:
    """Print the figures, the store/echo ratios and the targets."""
    by_name = {f.name: f.per_second for f in figures}
    print(
        f"\nStoreService benchmark (durability={durability}, {os.cpu_count()} CPUs, "
        f"median of {rounds} rounds)"
    )
    for figure in figures:
        print(f"  {figure.name:<62} {figure.per_second:>12,.0f} {figure.unit}")
    print("\nRatios store/echo (same run, medians):")
    for tasks in (1, 64):
        store = by_name[f"append 1 event, {tasks} client(s), distinct streams"]
        echo = by_name[f"echo, {tasks} client(s)"]
        print(f"  {tasks:>2} client(s): {store / echo:.2f}x")
    print(f"  64 clients, each round: {', '.join(f'{r:.2f}x' for r in ratios)}")
    print(main_threads.line())
    ratio = by_name["append 1 event, 64 client(s), distinct streams"] / by_name["echo, 64 client(s)"]
    batch = max(
        by_name["append 100-event batches, 1 client(s)"], by_name["append 100-event batches, 16 client(s)"]
    )
    plain = by_name["sqlite3 alone, 100-event transactions, serially"]
    print("\nTargets (issue 13):")
    print(f"  64-client appends >= 0.9x echo: {ratio:.2f}x  {'MET' if ratio >= 0.9 else 'NOT MET'}")
    verdict = "MET" if batch >= 0.8 * plain else "NOT MET"
    print(
        f"  100-event batches vs sqlite3 alone >= 0.8x: {batch / plain:.2f}x  "
        f"({batch:,.0f} vs {plain:,.0f} events/s)  {verdict}"
    )
    streamed = by_name["append 100-event batches, 16 client(s), on AppendEventsStream"]
    called = by_name["append 100-event batches, 16 client(s)"]
    print(
        f"  (16 clients' batches on AppendEventsStream, as engines send them: {streamed / plain:.2f}x, "
        f"{streamed:,.0f} events/s; by calls {called / plain:.2f}x)"
    )


def main() -> None:
    """Start the two servers, measure, report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 second per pattern, 2 rounds, and a 16 MiB artifact"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alternating echo/store (default 3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per pattern (default 3)")
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument("--artifact-mib", type=int, default=64)
    parser.add_argument(
        "--event-loop", choices=EVENT_LOOPS, default=DEFAULT_EVENT_LOOP, help="the servers' event loop"
    )
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
    artifact_mib = 16 if args.quick else args.artifact_mib
    rounds = 2 if args.quick else args.rounds
    bin_dir = Path(sys.executable).parent
    store_cmd = (
        [str(bin_dir / "store-service")]
        if (bin_dir / "store-service").exists()
        else [
            sys.executable,
            "-m",
            "store_service",
        ]
    )
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as data_dir:
        store_cmd += ["--listen", "127.0.0.1:0", "--data-dir", data_dir, "--durability", args.durability]
        store_cmd += ["--log-level", "warning", "--event-loop", args.event_loop]
        echo_script = str(Path(__file__).with_name("echo_server.py"))
        echo_cmd = [sys.executable, echo_script, "--listen", "127.0.0.1:0", "--event-loop", args.event_loop]
        with (
            server_process(store_cmd, r"^store-service listening on (\S+)$") as (store, store_address),
            server_process(echo_cmd, r"^echo listening on (\S+)$") as (echo, echo_address),
        ):
            baseline = (Path(data_dir), args.durability)
            pids = (echo.pid, store.pid)
            figures, ratios, main_threads = asyncio.run(
                measure(store_address, echo_address, seconds, rounds, artifact_mib, baseline, pids)
            )
    report(figures, ratios, main_threads, args.durability, rounds)


if __name__ == "__main__":
    main()
