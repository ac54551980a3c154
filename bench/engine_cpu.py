"""The engine's own CPU per pipeline run, without gRPC or a store process (issue 13).

Run: `.venv/bin/python bench/engine_cpu.py [--runs N] [--concurrency C] [--rounds R]`

The 3-step pipeline of bench/engine_runs.py, started as the servicer starts it (the request parsed
by `manifest_from`, `Engine.start_run(wait=True)`, the answer built by `run_message`) on an engine
whose store is the in-memory event log, C runs in flight, the ops metered as the service meters
them. It prints the process's CPU time per run (user + system), the median of R rounds. What is
left out is what gRPC and the store cost; what is measured is all of the engine's Python work
on a run, which is what a change to the engine's code moves. Its figure moves less with the
machine's load than a rate does, and `bench/ab.py` alternates it between two source trees.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from engine_runs import pipeline
from keel.engine.v1 import engine_pb2

import engine_service.builtin_ops  # noqa: F401  (registers the keel.* ops)
from engine_service.domain import BuildProvenance, TransportRegistry
from engine_service.domain.ops import DEFAULT_REGISTRY
from engine_service.failpoints import Failpoints
from engine_service.metrics import metered_ops
from engine_service.runtime.environment import RunEnvironment
from engine_service.runtime.kernel import Engine
from engine_service.store import InMemoryEventLog
from engine_service.wire import messages
from keel_core.json_values import to_value

BUILD = BuildProvenance("bench", "3", "none")


async def one_round(runs: int, concurrency: int) -> float:
    """CPU seconds per run of `runs` pipeline runs, `concurrency` in flight, on a fresh engine."""
    env = RunEnvironment(
        InMemoryEventLog(), metered_ops(DEFAULT_REGISTRY), TransportRegistry(), Failpoints.parse("")
    )
    engine = Engine(env, BUILD, engine_id="bench")
    request_pipeline = pipeline()
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < runs:
            index = next_index
            next_index += 1
            request = engine_pb2.StartRunRequest(
                pipeline=request_pipeline, input=to_value({"n": index}), wait=True
            )
            manifest = messages.manifest_from(request, engine.build)
            outcome = await engine.start_run(manifest, None, wait=True)
            view = await engine.views.run_view(outcome.run_id, just_ended=outcome.ended_here)
            answer = messages.run_message(view)
            if answer.status != engine_pb2.RUN_STATUS_COMPLETED:
                raise RuntimeError(f"run {outcome.run_id} ended {answer.status}")

    try:
        began = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return (time.process_time() - began) / runs
    finally:
        await engine.stop()


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(one_round(200, args.concurrency))  # warm-up: imports, caches, first-call costs
    figures = [asyncio.run(one_round(args.runs, args.concurrency)) for _ in range(args.rounds)]
    spread = ", ".join(f"{f * 1000:.3f}" for f in figures)
    print(f"engine_cpu: 3-step pipeline in process, {args.concurrency} in flight, pid {os.getpid()}")
    median = statistics.median(figures) * 1000
    print(f"engine CPU per run (in process, no gRPC): {median:.3f} ms  (rounds: {spread})")


if __name__ == "__main__":
    main()
