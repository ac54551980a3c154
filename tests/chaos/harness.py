"""The chaos run: a workload of multi-call, fan-out runs while engines and stores are SIGKILLed and
SIGSTOPped at random, then the checks (every acknowledged run terminal, no stream gap, every
repeated call explained by its executor's death, its pause or its being cut off from the store past
its lease) and the report.

Every loop is bounded by a count or a deadline, and `chaos_run` kills every process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from keel_core.json_values import to_value
from tests.chaos.cluster import Cluster, Service
from tests.chaos.evidence import log_evidence, takeovers
from tests.chaos.ledger import (
    CAUSES,
    CUT_OFF,
    OTHER,
    Context,
    Repeat,
    faults_near,
    read_ledger,
    repeats,
    stream_gap,
)
from tests.store.postgres_schemas import fresh_schema

if TYPE_CHECKING:
    from keel.engine.v1.engine_pb2_grpc import EngineServiceAsyncStub
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

LEASE_TTL = 2.0
CALLS_PER_STEP = 3
CHILDREN = 2
START_ATTEMPTS = 6
RPC_PATIENCE = 5.0  # one StartRun or AwaitRun call; a paused engine is then tried again elsewhere
SETTLE_PATIENCE = 120.0  # a bound on driving every run to its end after the chaos, no timing claim
STREAM_PREFIXES = ("run:", "children:", "lease:")
TERMINAL = {
    engine_pb2.RUN_STATUS_COMPLETED: "completed",
    engine_pb2.RUN_STATUS_FAILED: "failed",
    engine_pb2.RUN_STATUS_CANCELED: "canceled",
}


def chaos_pipeline(order: int) -> engine_pb2.StartRunRequest:
    """Three steps of recorded calls; the middle one fans out to children making recorded calls too."""
    calls = to_value({"calls": CALLS_PER_STEP})
    fan = {"op_id": "chaos.calls", "op_config": {"calls": CALLS_PER_STEP}, "count": CHILDREN}
    steps = [
        engine_pb2.Step(step_id="first", op_id="chaos.calls", op_config=calls),
        engine_pb2.Step(step_id="fan", op_id="keel.fan_out", op_config=to_value(fan)),
        engine_pb2.Step(step_id="last", op_id="chaos.calls", op_config=calls),
    ]
    return engine_pb2.StartRunRequest(
        pipeline=engine_pb2.Pipeline(pipeline_id="chaos", steps=steps), input=to_value({"order": order})
    )


@dataclass
class Report:
    """What one chaos run found."""

    backend: str
    seed: int
    seconds: float
    started: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    not_completed: list[str] = field(default_factory=list)
    streams: int = 0
    gaps: list[str] = field(default_factory=list)
    executions: int = 0
    repeats: list[Repeat] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    other_details: list[str] = field(default_factory=list)
    cut_off_details: list[str] = field(default_factory=list)
    workdir: str = ""
    began: str = ""

    @property
    def failures(self) -> list[str]:
        """Why this run fails the test ([] when it passes)."""
        others = sum(1 for r in self.repeats if r.cause == OTHER)
        return [
            *([f"{len(self.lost)} acknowledged run(s) lost"] if self.lost else []),
            *([f"{len(self.gaps)} stream(s) with a gap"] if self.gaps else []),
            *([f"{others} repeated call(s) of cause 'other'"] if others else []),
        ]

    def text(self) -> str:
        """The report, for a person."""
        terminal = [s for s in self.statuses.values() if s in TERMINAL.values()]
        by_status = {s: terminal.count(s) for s in sorted(set(terminal))}
        by_cause = {c: sum(1 for r in self.repeats if r.cause == c) for c in CAUSES}
        lines = [
            f"chaos {self.backend} seed={self.seed} seconds={self.seconds:g} ttl={LEASE_TTL:g}",
            f"  files (ledger, faults, service logs): {self.workdir}; times are seconds after {self.began}",
            f"  runs: started {len(self.started)}, acknowledged {len(self.acknowledged)}, "
            f"terminal {len(terminal)} {by_status}, lost {len(self.lost)}",
            f"  faults ({len(self.faults)}): " + "; ".join(self.faults),
            f"  streams checked {self.streams}, with a gap {len(self.gaps)}",
            f"  transport calls {self.executions}, repeats {len(self.repeats)}: {by_cause}",
            *(f"  lost: {run} (last seen {self.statuses.get(run, 'never')})" for run in self.lost),
            *(f"  ended without completing: {line}" for line in self.not_completed),
            *(f"  gap: {gap}" for gap in self.gaps),
            *(f"  cut off: {detail}" for detail in self.cut_off_details),
            *(f"  other: {detail}" for detail in self.other_details),
            f"  verdict: {'; '.join(self.failures) or 'ok'}",
        ]
        return "\n".join(lines)


class Client:
    """gRPC channels to whatever addresses the engines and stores have now."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return self._channels[address]

    def engine(self, service: Service) -> EngineServiceAsyncStub:
        """A stub on the engine's current address."""
        return engine_pb2_grpc.EngineServiceStub(self._channel(service.address))

    def store(self) -> StoreServiceAsyncStub:
        """A stub on the first store."""
        return store_pb2_grpc.StoreServiceStub(self._channel(self.cluster.stores[0].address))

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            await channel.close(None)


async def start_run(client: Client, rng: random.Random, order: int, report: Report) -> None:
    """StartRun with a client-chosen id, retried (same id) on other engines until one acknowledges."""
    request = chaos_pipeline(order)
    request.run_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    report.started.append(request.run_id)
    engines = client.cluster.engines
    first = rng.randrange(len(engines))
    for attempt in range(START_ATTEMPTS):
        engine = engines[(first + attempt) % len(engines)]
        if not engine.alive:
            await asyncio.sleep(0.5)
            continue
        with contextlib.suppress(grpc.aio.AioRpcError):
            await client.engine(engine).StartRun(request, timeout=RPC_PATIENCE)
            report.acknowledged.append(request.run_id)
            return


async def workload(client: Client, rng: random.Random, until: float, report: Report) -> None:
    """Start runs at random intervals until `until`, then wait for the starts (each bounded)."""
    starts = []
    order = 0
    while time.monotonic() < until:
        starts.append(asyncio.create_task(start_run(client, rng, order, report)))
        order += 1
        await asyncio.sleep(rng.uniform(0.1, 0.4))
    await asyncio.gather(*starts)


async def chaos(cluster: Cluster, rng: random.Random, until: float) -> None:
    """One fault at a time at random moments: a SIGKILL (restart after up to 1 s) or a SIGSTOP
    (SIGCONT after a pause) of a random engine or store.

    Pauses are either short (at most ttl/2: with a heartbeat every ttl/4, every lease outlives
    them) or longer than the ttl (the lease may go); none falls in between, where a takeover would
    be legitimate and yet the pause not "past its lease" by the ledger's rule.
    """
    while True:
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        if time.monotonic() >= until:
            return
        service = rng.choice(cluster.services)
        action = rng.choice(("kill", "short pause", "long pause"))
        if action == "kill":
            await cluster.kill_and_restart(service, rng.uniform(0.0, 1.0))
        elif action == "short pause":
            await cluster.pause(service, rng.uniform(0.1, 0.5 * LEASE_TTL))
        else:
            await cluster.pause(service, rng.uniform(1.2 * LEASE_TTL, 2.0 * LEASE_TTL))


async def settle(client: Client, report: Report, deadline: float) -> None:
    """Await every started run through the engines (which resume what nobody drives) until terminal."""
    engines = client.cluster.engines

    async def await_one(index: int, run_id: str) -> None:
        attempt = 0
        while time.monotonic() < deadline:
            engine = engines[(index + attempt) % len(engines)]
            attempt += 1
            try:
                awaited = await client.engine(engine).AwaitRun(
                    engine_pb2.AwaitRunRequest(run_id=run_id), timeout=RPC_PATIENCE
                )
            except grpc.aio.AioRpcError as error:
                report.statuses[run_id] = f"error {error.code().name}: {error.details()}"
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    return
                await asyncio.sleep(0.2)
                continue
            if awaited.done:
                status = TERMINAL.get(awaited.run.status, str(awaited.run.status))
                report.statuses[run_id] = status
                if status != "completed":
                    report.not_completed.append(f"{run_id} {status}: {awaited.run.reason}")
                return
            report.statuses[run_id] = "running"

    await asyncio.gather(*(await_one(i, run_id) for i, run_id in enumerate(report.started)))
    report.lost = [r for r in report.acknowledged if report.statuses.get(r) not in TERMINAL.values()]


async def check_streams(client: Client, report: Report) -> None:
    """Read every run:, children: and lease: stream through a store; each must hold seqs 1..n."""
    store = client.store()
    for prefix in STREAM_PREFIXES:
        token = ""
        while True:
            page = await store.ListStreams(
                store_pb2.ListStreamsRequest(prefix=prefix, page_size=1000, page_token=token), timeout=30
            )
            for info in page.streams:
                report.streams += 1
                seqs = await read_seqs(store, info.stream_id)
                gap = stream_gap(seqs) or ("" if len(seqs) == info.head_seq else f"head {info.head_seq}")
                if gap:
                    report.gaps.append(f"{info.stream_id}: {gap}")
            token = page.next_page_token
            if not token:
                break


async def read_seqs(store: StoreServiceAsyncStub, stream_id: str) -> list[int]:
    """The sequence numbers of every event of a stream, page by page."""
    seqs: list[int] = []
    while True:
        request = store_pb2.ReadEventsRequest(stream_id=stream_id, from_seq=len(seqs) + 1, limit=1000)
        page = await store.ReadEvents(request, timeout=30)
        seqs.extend(event.seq for event in page.events)
        if not page.next_seq or not page.events:
            return seqs


def classify(cluster: Cluster, report: Report) -> None:
    """The ledger's repeats by cause, the faults done, and what happened around each `other` repeat."""
    executions = read_ledger(cluster.ledger)
    report.executions = len(executions)
    t0 = cluster.t0
    logs = [engine.log_path for engine in cluster.engines]
    engine_ids = {pid: name for engine in cluster.engines for pid, name in engine.pids.items()}
    context = Context(takeovers(logs, t0, cluster.t0_wall), len(cluster.stores), engine_ids)
    report.repeats = repeats(executions, cluster.faults, LEASE_TTL, context)
    report.faults = [
        f"{f.kind} {f.name} (pid {f.pid}) at {f.start - t0:.2f}s for {f.length:.2f}s" for f in cluster.faults
    ]
    for repeat in report.repeats:
        before, again = repeat.before, repeat.again
        if repeat.cause == CUT_OFF:
            report.cut_off_details.append(
                f"run {before.run} key {before.key!r}: first by {cluster.name_of(before.pid)} at "
                f"{before.mono - t0:.2f}s, again by {cluster.name_of(again.pid)} at {again.mono - t0:.2f}s"
            )
        if repeat.cause != OTHER:
            continue
        near = [
            f"{f.kind} {f.name} at {f.start - t0:.2f}s for {f.length:.2f}s"
            for f in faults_near(repeat, cluster.faults, LEASE_TTL)
        ]
        report.other_details.append(
            f"run {before.run} key {before.key!r}: first by {cluster.name_of(before.pid)} (pid {before.pid}, "
            f"attempt {before.attempt}) at {before.mono - t0:.2f}s, again by {cluster.name_of(again.pid)} "
            f"(pid {again.pid}, attempt {again.attempt}) at {again.mono - t0:.2f}s; faults around: "
            + ("; ".join(near) or "none")
            + "".join(f"\n      {line}" for line in log_evidence(logs, repeat, LEASE_TTL, cluster.t0_wall))
        )


async def chaos_run(cluster: Cluster, *, backend: str, seed: int, seconds: float, workdir: Path) -> Report:
    """Start the cluster (its stores and engines added already), run the chaos, check, kill everything."""
    report = Report(backend, seed, seconds, workdir=str(workdir))
    client = Client(cluster)
    try:
        await asyncio.gather(*(store.start() for store in cluster.stores))
        await asyncio.gather(*(engine.start() for engine in cluster.engines))
        cluster.t0, cluster.t0_wall = time.monotonic(), time.time()
        report.began = datetime.fromtimestamp(cluster.t0_wall, UTC).isoformat(timespec="milliseconds")
        until = cluster.t0 + seconds
        await asyncio.gather(
            workload(client, random.Random(seed + 1), until, report),
            chaos(cluster, random.Random(seed), until),
        )
        await cluster.heal()
        await settle(client, report, time.monotonic() + SETTLE_PATIENCE)
        await check_streams(client, report)
        classify(cluster, report)
        (workdir / "report.txt").write_text(report.text() + "\n", encoding="utf-8")
        return report
    finally:
        await client.close()
        await cluster.close()


async def chaos_on(backend: str, *, seed: int, seconds: float, workdir: Path, dsn: str = "") -> Report:
    """A chaos run on `sqlite` (one store, two engines) or `postgres` (two store replicas on a fresh
    schema of `dsn`, dropped afterwards, and two engines), its files in `workdir`."""
    cluster = Cluster(workdir, str(workdir / "ledger.jsonl"), LEASE_TTL)
    if backend == "sqlite":
        cluster.add_sqlite_store()
        cluster.add_engine()
        cluster.add_engine()
        return await chaos_run(cluster, backend=backend, seed=seed, seconds=seconds, workdir=workdir)
    async with fresh_schema(dsn) as schema:
        cluster.add_postgres_store(dsn, schema)
        cluster.add_postgres_store(dsn, schema)
        cluster.add_engine()
        cluster.add_engine()
        return await chaos_run(cluster, backend=backend, seed=seed, seconds=seconds, workdir=workdir)
