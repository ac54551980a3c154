"""Test-only ops and a counting transport, loaded into engine subprocesses with `--ops <this file>`.

The counting transport appends `<run_id> <fact_key>` to the file named by KEEL_TEST_IO_LOG and
fsyncs before answering, so the count survives the SIGKILLs the crash tests cause.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from engine_service import StepContext, op, register_transport

IO_LOG_ENV = "KEEL_TEST_IO_LOG"
# `test.gated_calls` waits between its two calls until the file this names exists.
GATE_ENV = "KEEL_TEST_GATE"


class CountingTransport:
    """Records every call durably, then answers deterministically."""

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        """Append the call to the log (fsynced) and echo the request."""
        path = os.environ.get(IO_LOG_ENV)
        if path:
            # Blocking on purpose: the line must be on disk before the answer exists.
            with open(path, "a", encoding="utf-8") as log:  # noqa: ASYNC230
                log.write(f"{run_id} {fact_key}\n")
                log.flush()
                os.fsync(log.fileno())
        return {"key": fact_key, "request": request}


register_transport("test.counting", CountingTransport())


def _log_call(run_id: str, fact_key: str) -> None:
    path = os.environ.get(IO_LOG_ENV)
    if path:
        # Blocking on purpose: the line must be on disk before the answer exists.
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{run_id} {fact_key}\n")
            log.flush()
            os.fsync(log.fileno())


class GatedTransport:
    """Logs the call (with the deduplication keywords it gets), then answers once the gate is open.

    The gate is the file `request["gate"]` names: the test opens it, so the call is in flight for
    as long as the test needs (to kill the store, pause the engine, stall a store replica).
    """

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str, **dedup: Any) -> Any:
        """Log the call and its keywords, wait for the gate, echo the request."""
        _log_call(run_id, fact_key)
        path = os.environ.get(IO_LOG_ENV)
        if path:
            with open(f"{path}.dedup", "a", encoding="utf-8") as log:  # noqa: ASYNC230
                log.write(json.dumps({"run_id": run_id, "fact_key": fact_key, **dedup}) + "\n")
        gate = str(request.get("gate", "")) if isinstance(request, dict) else ""
        while gate and not os.path.exists(gate):  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.05)
        return {"key": fact_key, "request": request}


register_transport("test.gated", GatedTransport())


@op("test.gated_call", description="One recorded call through the gated transport")
async def gated_call(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """One call of the gated transport, gated by the file `op_config["gate"]` names."""
    return await ctx.io.call("test.gated", {"gate": op_config.get("gate", "")}, f"{ctx.step_id}-gated")


@op("test.two_calls", description="Makes two recorded calls through the counting transport")
async def two_calls(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Makes two recorded calls through the counting transport."""
    first = await ctx.io.call("test.counting", {"step": ctx.step_id, "input": input}, f"{ctx.step_id}-first")
    second = await ctx.io.call("test.counting", {"after": first}, f"{ctx.step_id}-second")
    return {"first": first, "second": second}


@op("test.gated_calls", description="A recorded call, a wait for the test's gate file, another call")
async def gated_calls(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Calls the counting transport, waits until the gate file exists, calls it again."""
    first = await ctx.io.call("test.counting", {"input": input}, f"{ctx.step_id}-before")
    gate = os.environ.get(GATE_ENV, "")
    # Polled: the test (another process) opens the gate once engines have changed hands.
    while gate and not os.path.exists(gate):  # noqa: ASYNC110, ASYNC240
        await asyncio.sleep(0.2)
    second = await ctx.io.call("test.counting", {"after": first}, f"{ctx.step_id}-after")
    return {"first": first, "second": second}


def read_dedup_log(path: str) -> list[dict[str, Any]]:
    """The calls of the gated transport, with the deduplication keywords each one got."""
    if not os.path.exists(f"{path}.dedup"):
        return []
    with open(f"{path}.dedup", encoding="utf-8") as log:
        return [json.loads(line) for line in log.read().splitlines() if line]


def read_io_log(path: str) -> list[tuple[str, str]]:
    """The (run_id, fact_key) calls recorded in a counting-transport log."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as log:
        return [tuple(line.split(" ", 1)) for line in log.read().splitlines() if line]  # type: ignore[misc]


@op("test.wait_then_call", description="Waits for the signal `go`, then makes one recorded call with it")
async def wait_then_call(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """`ctx.wait_signal("go")` (fact key `go`), then one call of the counting transport with the payload."""
    payload = await ctx.wait_signal(
        "go", fact_key="go", timeout=op_config.get("timeout") if op_config else None
    )
    answer = await ctx.io.call("test.counting", {"payload": payload}, "after-go")
    return {"payload": payload, "answer": answer}
