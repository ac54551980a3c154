"""Tasks, shields and event-loop callbacks per run in the engine: counts no load moves.

Run: `.venv/bin/python bench/loop_counts.py [--scenario pipeline|fan-out|calls] [--runs N]`

Every task the engine creates, every `asyncio.shield` it calls and every callback its event loop
runs costs the engine's main thread CPU, which bounds its rate on these machines ("The engine's
main thread is the ceiling" in docs/performance.md). This counts them per run, in process: the
engine on the in-memory log as bench/engine_cpu.py runs it (pipeline runs, or fan-out parents and
their 10 children each, counted as 11 runs), or one run whose step makes N sequential recorded
`keel.echo` calls (`calls`: per call, a run without calls subtracted). Tasks are listed by their
coroutine and the engine function that made them. The counts are the same from run to run, so
`bench/ab.py --before DIR --rounds 1 -- bench/loop_counts.py` shows a change's effect at once.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.events
import collections
import sys
import types
from collections.abc import Coroutine, Generator
from typing import Any

from engine_cpu import BUILD, one_round
from engine_runs import io_calls_config

import engine_service.builtin_ops  # noqa: F401  (registers the keel.* ops)
from engine_service.domain import RunManifest, make_run_config, single_op_pipeline
from engine_service.domain.ops import DEFAULT_REGISTRY
from engine_service.domain.transports import DEFAULT_TRANSPORTS
from engine_service.failpoints import Failpoints
from engine_service.runtime.environment import RunEnvironment
from engine_service.runtime.kernel import Engine
from engine_service.store import InMemoryEventLog


class Counts:
    """What the engine did, counted while `counting` is set."""

    def __init__(self) -> None:
        self.counting = False
        self.tasks: collections.Counter[str] = collections.Counter()
        self.shields = 0
        self.callbacks = 0

    def reset(self) -> None:
        self.tasks.clear()
        self.shields = self.callbacks = 0


COUNTS = Counts()


def _maker(frame: types.FrameType | None) -> str:
    """The first caller outside asyncio: the function that made the task."""
    while frame is not None and "asyncio" in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"


def install() -> None:
    """Wrap the event loop's task creation, `asyncio.shield` and the running of a callback."""
    create_task = asyncio.BaseEventLoop.create_task
    run = asyncio.events.Handle._run
    shield = asyncio.shield

    def counted_create_task(
        self: asyncio.BaseEventLoop, coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any], **kw: Any
    ) -> asyncio.Task[Any]:
        if COUNTS.counting:
            name = getattr(coro, "__qualname__", type(coro).__name__)
            COUNTS.tasks[f"{name} (made in {_maker(sys._getframe(1))})"] += 1
        return create_task(self, coro, **kw)

    def counted_run(self: asyncio.events.Handle) -> None:
        if COUNTS.counting:
            COUNTS.callbacks += 1
        run(self)

    def counted_shield(arg: Any) -> Any:
        if COUNTS.counting:
            COUNTS.shields += 1
        return shield(arg)

    asyncio.BaseEventLoop.create_task = counted_create_task  # type: ignore[method-assign]
    asyncio.events.Handle._run = counted_run  # type: ignore[method-assign]
    asyncio.shield = counted_shield


async def calls_run(calls: int) -> None:
    """One run whose single step makes `calls` sequential recorded `keel.echo` calls."""
    env = RunEnvironment(InMemoryEventLog(), DEFAULT_REGISTRY, DEFAULT_TRANSPORTS, Failpoints.parse(""))
    engine = Engine(env, BUILD, engine_id="bench", checkpoint_linger=0.2)
    pipeline = single_op_pipeline("keel.io_call", "1", io_calls_config(calls))
    run = RunManifest(pipeline, None, {}, make_run_config(), BUILD)
    try:
        await engine.start_run(run, None, wait=True)
    finally:
        await engine.stop()


def counted(scenario: str, runs: int) -> Counts:
    """The counts of `runs` runs (or parents, or calls) of `scenario`, after a warm-up."""
    if scenario == "calls":
        asyncio.run(calls_run(50))
        COUNTS.counting = True
        asyncio.run(calls_run(0))
        fixed = Counts()
        fixed.tasks, fixed.shields, fixed.callbacks = COUNTS.tasks.copy(), COUNTS.shields, COUNTS.callbacks
        COUNTS.reset()
        asyncio.run(calls_run(runs))
        COUNTS.counting = False
        COUNTS.tasks.subtract(fixed.tasks)
        COUNTS.shields -= fixed.shields
        COUNTS.callbacks -= fixed.callbacks
        return COUNTS
    concurrency = 8 if scenario == "fan-out" else 32
    asyncio.run(one_round(max(1, runs // 10), concurrency, scenario))
    COUNTS.counting = True
    asyncio.run(one_round(runs, concurrency, scenario))
    COUNTS.counting = False
    return COUNTS


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=["pipeline", "fan-out", "calls"], default="pipeline")
    parser.add_argument("--runs", type=int, default=0, help="runs (500), parents (50) or calls (1000)")
    args = parser.parse_args()
    runs = args.runs or {"pipeline": 500, "fan-out": 50, "calls": 1000}[args.scenario]
    install()
    counts = counted(args.scenario, runs)
    per = runs * 11 if args.scenario == "fan-out" else runs
    unit = "call" if args.scenario == "calls" else "run"
    counted_as = {
        "pipeline": "runs",
        "fan-out": "parents of 10 children",
        "calls": "sequential recorded calls",
    }
    print(f"loop_counts: {args.scenario} in process, {runs} {counted_as[args.scenario]}; per {unit}:")
    for what, count in counts.tasks.most_common():
        if count / per >= 0.05:
            print(f"  {count / per:6.2f} tasks of {what}")
    tasks = sum(counts.tasks.values()) / per
    print(
        f"RESULT scenario={args.scenario} per={unit} tasks={tasks:.2f} "
        f"shields={counts.shields / per:.2f} loop_callbacks={counts.callbacks / per:.2f}"
    )


if __name__ == "__main__":
    main()
