"""The engine's own CPU per pipeline run, without gRPC or a store process (issue 13).

Run: `.venv/bin/python bench/engine_cpu.py [--scenario pipeline|fan-out] [--runs N] [--concurrency C]
[--rounds R]`

The 3-step pipeline of bench/engine_runs.py (or its fan-out parent of 10 `keel.echo` children),
started as the servicer starts it (the request parsed by `manifest_from`,
`Engine.start_run(wait=True)`, the answer built by `run_message`) on an engine whose store is the
in-memory event log, C runs in flight, the ops metered as the service meters them. It prints the
process's CPU time per run or parent (user + system), the median of R rounds. What is left out is
what gRPC and the store cost; what is measured is all of the engine's Python work on a run, which
is what a change to the engine's code moves. Its figure moves less with the machine's load than a
rate does, and `bench/ab.py` alternates it between two source trees. The in-memory log lists a
parent's children by scanning every stream it holds, a cost a real store does not have and that grows
with the round: the fan-out figure is for A/Bs, not for comparing with the services' CPU.
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


FAN_OUT_CONFIG = to_value({"op_id": "keel.echo", "count": 10})


def start_request(scenario: str, index: int) -> engine_pb2.StartRunRequest:
    """A pipeline run's StartRunRequest, or a fan-out parent's (10 `keel.echo` children)."""
    if scenario == "fan-out":
        return engine_pb2.StartRunRequest(
            op=engine_pb2.SingleOp(op_id="keel.fan_out", op_config=FAN_OUT_CONFIG), wait=True
        )
    return engine_pb2.StartRunRequest(pipeline=PIPELINE, input=to_value({"n": index}), wait=True)


PIPELINE = pipeline()


async def one_round(
    runs: int, concurrency: int, scenario: str = "pipeline", checkpoint_linger: float = 0.2
) -> float:
    """CPU seconds per run of `runs` runs (pipelines, or fan-out parents), `concurrency` in flight,
    on a fresh engine (with the service's default linger unless told)."""
    env = RunEnvironment(
        InMemoryEventLog(), metered_ops(DEFAULT_REGISTRY), TransportRegistry(), Failpoints.parse("")
    )
    engine = Engine(env, BUILD, engine_id="bench", checkpoint_linger=checkpoint_linger)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < runs:
            index = next_index
            next_index += 1
            request = start_request(scenario, index)
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
    parser.add_argument("--scenario", choices=["pipeline", "fan-out"], default="pipeline")
    parser.add_argument("--runs", type=int, default=0, help="runs (2000) or fan-out parents (100) per round")
    parser.add_argument("--concurrency", type=int, default=0, help="in flight: 32 runs or 8 parents")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    fan_out = args.scenario == "fan-out"
    runs = args.runs or (100 if fan_out else 2000)
    concurrency = args.concurrency or (8 if fan_out else 32)
    asyncio.run(one_round(runs // 10, concurrency, args.scenario))  # warm-up: imports, caches, first calls
    figures = [asyncio.run(one_round(runs, concurrency, args.scenario)) for _ in range(args.rounds)]
    spread = ", ".join(f"{f * 1000:.3f}" for f in figures)
    what = "fan-out parent (10 children)" if fan_out else "run"
    print(f"engine_cpu: {args.scenario} in process, {concurrency} in flight, pid {os.getpid()}")
    median = statistics.median(figures) * 1000
    print(f"engine CPU per {what} (in process, no gRPC): {median:.3f} ms  (rounds: {spread})")


if __name__ == "__main__":
    main()
