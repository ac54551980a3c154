"""Ops and transports that ship with the engine (registered on import).

Ops (all version "1"):

- `keel.echo`: returns `{"input": <run input>, "config": <op_config>}`.
- `keel.transform`: builds an object from `op_config {"fields": {name: spec}}` where a spec string
  `"$input"`, `"$input.a.b"` or `"$context.step.x"` is looked up (missing -> null) and anything else is
  taken literally. `{"fields": {"total": "$context.sum.value", "tag": "v1"}}`.
- `keel.sleep`: `op_config {"seconds": s}` is a durable timer: the attempt parks (StepWaiting with
  the absolute fire time, engine_service.domain.waits) and completes with `{"slept": s}` once that
  time has come, on whichever engine holds the run, however often engines restart meanwhile.
- `keel.sleep_in_process`: `op_config {"seconds": s}` sleeps inside the op (cancellable; the
  attempt stays running, and a restart sleeps again from the start) and returns `{"slept": s}`.
- `keel.fail_n_times`: `op_config {"n": n, "retryable": true, "code": "flaky"}` fails attempts
  0..n-1 (counted from the step's attempt number, so it survives restarts) and then returns
  `{"attempt": attempt}`. With `"retryable": false` the first failure is final.
- `keel.wait_signal`: `op_config {"name": n, "timeout_seconds"?: s}` waits for a signal `n` sent to
  the run (SignalRun, StartRun.signals) and returns its payload. The attempt *parks* on a `signal`
  wait (engine_service.domain.waits): no coroutine waits; the signal is consumed under the fact
  key `<step>.signal`, so a resumed run returns the same payload. With no signal after `s` seconds
  the attempt fails `signal_timeout` (retryable: the run's retry policy decides).
- `keel.io_call`: `op_config {"namespace", "request", "fact_key"}` (or `{"calls": [...]}` of those)
  calls the transport through the step's `io` handle and returns `{"response": ...}` (or
  `{"responses": [...]}`).
- `keel.fan_out`: `op_config {"op_id", "op_version"?, "op_config"?, "inputs": [...] | "count": n,
  "run_config"?, "parent_close_policy"?: "cancel"|"abandon"}` spawns one child run per input (with
  `count`, child i gets input i), awaits them all concurrently and returns
  `{"results": [<each child's output>], "children": [{"child_run_id", "status"}]}`. Spawns are
  recorded facts (`<step>.child.<i>`), so a resumed parent finds the same children. The step then
  *parks* on its children (a `children` wait, engine_service.domain.waits): no coroutine waits for
  them; each child's end wakes the parent, and once all ended the step completes with their
  outputs. A child that does not complete fails the step (`child_run_failed`, not retryable).

Transports:

- `keel.echo`: answers `{"echo": request}`.
- `keel.clock`: answers `{"unix_ms": <now>}` (not deterministic: shows that recorded facts replay).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from engine_service.domain.child_runs import CHILDREN, SPAWN_KIND, SPAWN_NAMESPACE
from engine_service.domain.ops import OpError, StepContext, op
from engine_service.domain.transports import register_transport
from engine_service.domain.waits import TIMER, ParkStep
from keel_core.clock import now_us


def _lookup(root: Any, path: list[str]) -> Any:
    for part in path:
        if isinstance(root, dict):
            root = root.get(part)
        elif isinstance(root, list) and part.isdigit() and int(part) < len(root):
            root = root[int(part)]
        else:
            return None
    return root


def _config(op_config: Any) -> dict[str, Any]:
    if op_config is None:
        return {}
    if not isinstance(op_config, dict):
        raise OpError("op_config_invalid", "op_config must be a JSON object")
    return op_config


@op("keel.echo", description="Returns the run input and the op config")
async def echo(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Returns the run input and the op config."""
    return {"input": input, "config": op_config}


@op("keel.transform", description="Builds an object from the input and the context ($input, $context.x)")
async def transform(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Builds an object from the input and the context."""
    fields = _config(op_config).get("fields", {})
    if not isinstance(fields, dict):
        raise OpError("op_config_invalid", "keel.transform: op_config.fields must be an object")
    out: dict[str, Any] = {}
    for name, spec in fields.items():
        if isinstance(spec, str) and (spec == "$input" or spec.startswith("$input.")):
            out[name] = _lookup(input, spec.split(".")[1:])
        elif isinstance(spec, str) and spec.startswith("$context."):
            out[name] = _lookup(dict(ctx.context), spec.split(".")[1:])
        else:
            out[name] = spec
    return out


def _seconds(op_id: str, op_config: Any) -> float:
    seconds = _config(op_config).get("seconds", 0)
    if (
        not isinstance(seconds, int | float)
        or isinstance(seconds, bool)
        or not 0 <= seconds <= MAX_SLEEP_SECONDS
    ):
        raise OpError(
            "op_config_invalid", f"{op_id}: op_config.seconds must be a number from 0 to {MAX_SLEEP_SECONDS}"
        )
    return seconds


# A year: a timer's fire time stays a plain 64-bit count of microseconds with room to spare.
MAX_SLEEP_SECONDS = 366 * 24 * 3600


@op("keel.sleep", description="Sleeps op_config.seconds on a durable timer (the run parks)")
async def sleep(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """A durable timer: parks the attempt until now + op_config.seconds (recorded as an absolute time)."""
    seconds = _seconds("keel.sleep", op_config)
    return ParkStep(TIMER, until_us=now_us() + int(seconds * 1_000_000), output={"slept": seconds})


@op("keel.sleep_in_process", description="Sleeps op_config.seconds inside the op (the attempt stays running)")
async def sleep_in_process(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Sleeps op_config.seconds in the op's coroutine: the attempt is running the whole time."""
    seconds = _seconds("keel.sleep_in_process", op_config)
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@op("keel.wait_signal", description="Waits for a signal op_config.name and returns its payload")
async def wait_signal(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Waits for a signal op_config.name (at most op_config.timeout_seconds) and returns its payload."""
    config = _config(op_config)
    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise OpError("op_config_invalid", "keel.wait_signal: op_config.name (the signal's name) is required")
    # Parked until a signal comes (RunSignalWaits.resolve) or the timeout: no coroutine waits.
    return await ctx.park_for_signal(
        name, fact_key=f"{ctx.step_id}.signal", timeout=config.get("timeout_seconds")
    )


@op("keel.fail_n_times", description="Fails the first n attempts, then succeeds")
async def fail_n_times(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Fails the first n attempts, then succeeds."""
    config = _config(op_config)
    n = config.get("n", 1)
    if not isinstance(n, int) or n < 0:
        raise OpError("op_config_invalid", "keel.fail_n_times: op_config.n must be an integer >= 0")
    if ctx.attempt < n:
        raise OpError(
            str(config.get("code", "flaky")),
            f"attempt {ctx.attempt} of step {ctx.step_id!r} fails on purpose ({n} failures configured)",
            retryable=bool(config.get("retryable", True)),
        )
    return {"attempt": ctx.attempt}


@op("keel.io_call", description="Calls a transport through recorded facts")
async def io_call(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Calls a transport through recorded facts."""
    config = _config(op_config)
    calls = config.get("calls")
    if calls is None:
        return {"response": await _one_call(ctx, config)}
    if not isinstance(calls, list):
        raise OpError("op_config_invalid", "keel.io_call: op_config.calls must be a list")
    return {"responses": [await _one_call(ctx, _config(call)) for call in calls]}


async def _one_call(ctx: StepContext, call: dict[str, Any]) -> Any:
    namespace = call.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        raise OpError("op_config_invalid", "keel.io_call: a call needs a namespace")
    return await ctx.io.call(namespace, call.get("request"), str(call.get("fact_key") or ""))


MAX_FAN_OUT = 1000


@op("keel.fan_out", description="Spawns one child run per input and awaits them all")
async def fan_out(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Spawns one child run per input, awaits them all concurrently, returns their outputs."""
    config = _config(op_config)
    op_id = config.get("op_id")
    if not isinstance(op_id, str) or not op_id:
        raise OpError("op_config_invalid", "keel.fan_out: op_config.op_id (the children's op) is required")
    inputs = config.get("inputs")
    if inputs is None:
        count = config.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise OpError("op_config_invalid", "keel.fan_out: give op_config.inputs (a list) or count (>= 0)")
        inputs = list(range(count))
    if not isinstance(inputs, list) or len(inputs) > MAX_FAN_OUT:
        raise OpError("op_config_invalid", f"keel.fan_out: inputs must be a list of at most {MAX_FAN_OUT}")
    spawn = {
        "kind": SPAWN_KIND,
        "op_id": op_id,
        "op_version": str(config.get("op_version") or "1"),
        "op_config": config.get("op_config"),
        "run_config": config.get("run_config"),
        "parent_close_policy": config.get("parent_close_policy") or "",
    }

    async def one(index: int, child_input: Any) -> str:
        spawned = await ctx.io.call(
            SPAWN_NAMESPACE, {**spawn, "input": child_input}, f"{ctx.step_id}.child.{index}"
        )
        return str(spawned["child_run_id"])

    if not inputs:
        return {"results": [], "children": []}
    try:
        # A task group, not gather: one failed spawn cancels the others with the step.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(i, value)) for i, value in enumerate(inputs)]
    except* Exception as failures:
        raise failures.exceptions[0] from None
    # Parked until every child ended: no coroutine waits for them (ChildRuns.children_wait_outcome).
    return ParkStep(CHILDREN, detail={"children": [task.result() for task in tasks]})


class EchoTransport:
    """Answers every request with `{"echo": request}`."""

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        """Echo the request."""
        return {"echo": request}


class ClockTransport:
    """Answers with the current time in milliseconds."""

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        """The time now."""
        return {"unix_ms": int(time.time() * 1000)}


register_transport("keel.echo", EchoTransport())
register_transport("keel.clock", ClockTransport())
