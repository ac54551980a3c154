"""The chaos test's op and ledger transport, loaded into engine subprocesses with `--ops <this file>`.

The ledger transport is the ground truth of executions: before it answers, every call appends one
JSON line `{run, key, step, attempt, pid, mono, wall}` to the file named by KEEL_CHAOS_LEDGER with
a single O_APPEND write (atomic for lines this short, so engines sharing the file never interleave).
No fsync: a SIGKILLed process's writes are already in the kernel's page cache; only a machine crash
would lose them, and the chaos test kills processes, not machines.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from typing import Any

from engine_service import StepContext, op, register_transport

LEDGER_ENV = "KEEL_CHAOS_LEDGER"
NAMESPACE = "chaos.ledger"
# Each call answers after a short random delay, so kills and pauses land while calls are in flight.
MAX_CALL_DELAY = 0.05


class LedgerTransport:
    """Appends each call to the ledger, then answers deterministically (an echo of the request)."""

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str, **context: Any) -> Any:
        """Append the call to the ledger, wait a moment, answer.

        The step and attempt come from keyword arguments when the engine passes them (issue 10 adds
        them), else from the request (the op puts them there).
        """
        fields = request if isinstance(request, dict) else {}
        entry = {
            "run": run_id,
            "key": fact_key,
            "step": context.get("step_id", context.get("step", fields.get("step", ""))),
            "attempt": context.get("attempt", fields.get("attempt", -1)),
            "pid": os.getpid(),
            "mono": time.monotonic(),
            "wall": time.time(),
        }
        append_line(os.environ[LEDGER_ENV], json.dumps(entry, sort_keys=True))
        await asyncio.sleep(random.uniform(0, MAX_CALL_DELAY))
        return {"key": fact_key, "request": request}


def append_line(path: str, line: str) -> None:
    """One O_APPEND write of `line` and a newline."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


register_transport(NAMESPACE, LedgerTransport())


@op("chaos.calls", description="Makes op_config.calls recorded calls through the chaos ledger, in turn")
async def calls(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Makes `op_config["calls"]` (default 3) recorded calls, each after the previous one answered."""
    count = int(op_config.get("calls", 3)) if isinstance(op_config, dict) else 3
    answers = []
    for index in range(count):
        request = {"step": ctx.step_id, "attempt": ctx.attempt, "index": index, "input": input}
        answers.append(await ctx.io.call(NAMESPACE, request, f"{ctx.step_id}-call-{index}"))
    return {"calls": len(answers)}
