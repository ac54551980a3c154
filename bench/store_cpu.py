"""The store's own CPU per pipeline run, without gRPC or an engine (issue 13).

Run: `.venv/bin/python bench/store_cpu.py [--runs N] [--per-batch B] [--callers C] [--rounds R]
[--durability full|normal] [--random-run-ids]`

What `bench/engine_runs.py`'s 3-step pipeline asks of the store per run, as the engine sends it:
one append creating the run stream with its eight events (RunStarted, three attempts started and
completed, RunCompleted), five small inline artifacts (the manifest and four snapshots) and a
pipeline attribute, B runs' appends to one `AppendEventsBatch`, C batches in flight. The requests
go straight to the `StoreServicer` over a fresh SQLite store in a temporary directory, in this
process. It prints the process's CPU time per run (user + system, every thread), the part of the
SQLite writer's thread (`commit_appends`: building rows, inserting, committing) and the appends
per group commit, the median of R rounds. gRPC's part is left out; the store's Python and SQLite
work is what is measured. `bench/ab.py` alternates it between two source trees.

The run streams are named by run ids as the engine and the clients pick them, UUIDv7 (in creation
order: keel_core.ids); `--random-run-ids` names them by uuid4s instead, as before 2026-12-07, to
measure what the order saves.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from keel.store.v1 import store_pb2

from keel_core.ids import new_run_id
from store_service.sqlite import SqliteStoreBackend
from store_service.sqlite import writer as sqlite_writer
from store_service.wire import StoreServicer

EVENT_TYPES = ["RunStarted"] + ["StepAttemptStarted", "StepCompleted"] * 3 + ["RunCompleted"]


def random_run_id() -> str:
    """A uuid4, as Keel picked run ids until 2026-12-07 (and a caller still may)."""
    return str(uuid.uuid4())


def run_append(index: int, run_id: Callable[[], str] = new_run_id) -> store_pb2.AppendEventsRequest:
    """One pipeline run's append: a new run stream, its events, artifacts and attribute."""
    request = store_pb2.AppendEventsRequest(
        stream_id=f"run:{run_id()}",
        expected_kind=store_pb2.EXPECTED_KIND_NO_STREAM,
        status=store_pb2.STREAM_STATUS_COMPLETED,
    )
    for kind in EVENT_TYPES:
        snapshot_id = uuid.uuid4().hex * 2
        payload = f'{{"at_us":1765000000000000,"snapshot_id":"sha256:{snapshot_id}","step_id":"a","v":1}}'
        request.events.add(type=kind, payload=payload.encode())
    for part in range(5):
        data = f'{{"a":{{"config":{{"k":1}},"input":{{"n":{index}}}}},"b":{{"x":{part}}}}}'
        request.artifacts.add(kind="snapshot", data=data.encode())
    request.attributes["pipeline"] = "bench3"
    return request


class WriterClock:
    """The CPU time the writer's `commit_appends` takes on its own thread, and its calls."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.groups = 0

    def wrap(self, commit: Callable[..., Any]) -> Callable[..., Any]:
        """`commit`, timed by the thread it runs on."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.thread_time()
            try:
                return commit(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - began
                self.groups += 1

        return timed


async def one_round(
    runs: int,
    per_batch: int,
    callers: int,
    durability: str,
    clock: WriterClock,
    run_id: Callable[[], str] = new_run_id,
) -> tuple[float, float, float]:
    """(process CPU seconds per run, writer CPU seconds per run, appends per group) of one round."""
    with tempfile.TemporaryDirectory() as data_dir:
        backend = SqliteStoreBackend.in_directory(data_dir, durability=durability)  # type: ignore[arg-type]
        await backend.open()
        servicer = StoreServicer(backend)
        batches = [
            store_pb2.AppendEventsBatchRequest(
                appends=[run_append(b * per_batch + i, run_id) for i in range(per_batch)]
            )
            for b in range(runs // per_batch)
        ]
        try:
            warm, measured = batches[: len(batches) // 10], batches[len(batches) // 10 :]
            await send(servicer, warm, callers)
            clock.seconds, clock.groups = 0.0, 0
            began = time.process_time()
            await send(servicer, measured, callers)
            spent = time.process_time() - began
        finally:
            await backend.close()
    done = len(measured) * per_batch
    return spent / done, clock.seconds / done, done / max(clock.groups, 1)


async def send(
    servicer: StoreServicer, batches: Sequence[store_pb2.AppendEventsBatchRequest], callers: int
) -> None:
    """Each batch through AppendEventsBatch, `callers` at a time; every append must succeed."""

    async def caller(mine: Sequence[store_pb2.AppendEventsBatchRequest]) -> None:
        for batch in mine:
            response = await servicer.AppendEventsBatch(batch, None)  # type: ignore[arg-type]
            if not all(outcome.HasField("appended") for outcome in response.outcomes):
                raise RuntimeError(f"an append failed: {response}")

    await asyncio.gather(*(caller(batches[i::callers]) for i in range(callers)))


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=4000, help="runs per round")
    parser.add_argument("--per-batch", type=int, default=4, help="runs' appends per AppendEventsBatch")
    parser.add_argument("--callers", type=int, default=4, help="batches in flight")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument(
        "--random-run-ids",
        action="store_true",
        help="uuid4 run ids, as Keel picked them before 2026-12-07 (default: UUIDv7, as it picks them now)",
    )
    args = parser.parse_args()
    run_id = random_run_id if args.random_run_ids else new_run_id
    clock = WriterClock()
    sqlite_writer.SqliteWriter.commit_appends = clock.wrap(  # type: ignore[method-assign]
        sqlite_writer.SqliteWriter.commit_appends
    )
    figures = [
        asyncio.run(one_round(args.runs, args.per_batch, args.callers, args.durability, clock, run_id))
        for _ in range(args.rounds)
    ]
    process = statistics.median(f[0] for f in figures) * 1e6
    writer = statistics.median(f[1] for f in figures) * 1e6
    group = statistics.median(f[2] for f in figures)
    spread = ", ".join(f"{f[0] * 1e6:.0f}" for f in figures)
    ids = "uuid4" if args.random_run_ids else "UUIDv7"
    print(
        f"store_cpu: pipeline runs' appends in process, {args.per_batch} per batch, "
        f"{args.callers} in flight, {ids} run ids"
    )
    print(f"store CPU per run (in process, no gRPC): {process:.1f} us  (rounds: {spread})")
    print(f"  of which the SQLite writer's commit_appends: {writer:.1f} us; {group:.1f} appends per group")
    print(f"RESULT scenario=store_cpu us_per_run={process:.1f} writer_us_per_run={writer:.1f}")


if __name__ == "__main__":
    main()
