"""A worker subprocess for the worker tests: `python worker_process.py ENGINE QUEUE LEDGER [WORKER_ID]`.

Its ops append to LEDGER (a file the test reads) so that the test counts executions itself:
`start <run> <step> <attempt>` when an op starts, `pay <fact key>` when the pay transport really
runs (a recorded fact is served without it), `done <run> <step> <attempt>` when an op returns.
It prints `worker ready` once it polls, and logs to stderr (where `is stale` shows a refused claim,
and `waiting up to` a shutdown that began). KEEL_TEST_SHUTDOWN_GRACE sets its shutdown grace (5 s);
SIGUSR1 opens the gate the `gated` op waits for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

from keel_client.worker import CallInfo, TaskContext, Worker, op

GATE = asyncio.Event()  # the `gated` op's gate: SIGUSR1 opens it


def _ledger(line: str) -> None:
    with open(LEDGER, "a") as out:
        out.write(line + "\n")
        out.flush()


async def _pay(request: Any, call: CallInfo) -> Any:
    _ledger(f"pay {call.fact_key}")
    return {"paid": request["amount"]}


@op("slow_pay")
async def slow_pay(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """Pays (a recorded fact), then sleeps op_config.sleep seconds; hangs on op_config.hang_attempts."""
    config = op_config or {}
    _ledger(f"start {ctx.run_id} {ctx.step_id} {ctx.attempt}")
    receipt = await ctx.io.call(
        "pay", {"amount": input.get("amount", 1)}, fact_key=f"pay:{ctx.run_id}:{ctx.step_id}"
    )
    _ledger(f"paid {ctx.run_id} {ctx.step_id} {ctx.attempt}")
    if ctx.attempt in config.get("hang_attempts", ()):
        await asyncio.Event().wait()
    await asyncio.sleep(float(config.get("sleep", 0)))
    _ledger(f"done {ctx.run_id} {ctx.step_id} {ctx.attempt}")
    return {"receipt": receipt, "attempt": ctx.attempt, "seen": sorted(ctx.context)}


@op("inc")
async def inc(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """n + 1, where n is op_config.from's output (or the input's n)."""
    source = (op_config or {}).get("from")
    n = ctx.context[source]["n"] if source else input["n"]
    _ledger(f"start {ctx.run_id} {ctx.step_id} {ctx.attempt}")
    return {"n": n + 1}


@op("gated")
async def gated(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """Returns once the process gets SIGUSR1 (the test opens the gate)."""
    _ledger(f"start {ctx.run_id} {ctx.step_id} {ctx.attempt}")
    await GATE.wait()
    _ledger(f"done {ctx.run_id} {ctx.step_id} {ctx.attempt}")
    return {"attempt": ctx.attempt}


@op("hang")
async def hang(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """Never returns."""
    _ledger(f"start {ctx.run_id} {ctx.step_id} {ctx.attempt}")
    await asyncio.Event().wait()


async def main(engine: str, queue: str, worker_id: str | None) -> None:
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, GATE.set)
    worker = Worker(
        engine,
        queue,
        ops=[slow_pay, inc, gated, hang],
        transports={"pay": _pay},
        concurrency=8,
        worker_id=worker_id,
        heartbeat_every=0.2,
        shutdown_grace=float(os.environ.get("KEEL_TEST_SHUTDOWN_GRACE", "5")),
    )
    print("worker ready", flush=True)
    await worker.serve(handle_signals=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    LEDGER = sys.argv[3]
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[4] if len(sys.argv) > 4 else None))
