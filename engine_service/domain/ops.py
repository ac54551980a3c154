"""Ops: registered async callables `(ctx, op_config, input) -> JSON`, and what they see.

    from engine_service import op, StepContext

    @op("greet", version="1", description="Says hello")
    async def greet(ctx: StepContext, op_config, input):
        answer = await ctx.io.call("keel.echo", {"name": input}, fact_key="greeting")
        return {"hello": answer}

An op's return value becomes the step's output in the context (see `engine_service.domain.context`).
An op fails by raising `OpError` (or any KeelError), which says whether a retry may help; any other
exception is recorded as `op_failed`, retryable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from keel_core.errors import ErrorCategory, KeelError

OpFunction = Callable[["StepContext", Any, Any], Awaitable[Any]]


class OpError(KeelError):
    """An op's failure: a stable code, a message, and whether trying again may succeed."""

    def __init__(self, code: str, message: str, *, retryable: bool = False, **details: Any) -> None:
        super().__init__(
            code, message, category=ErrorCategory.FAILED_PRECONDITION, retryable=retryable, details=details
        )


class IoHandle(Protocol):
    """How an op does I/O: every call is recorded as a fact under `fact_key`."""

    async def call(self, namespace: str, request: Any, fact_key: str) -> Any:
        """Call the transport for `namespace` (or return the fact recorded under `fact_key`)."""
        ...


class SignalHandle(Protocol):
    """How an op waits for a signal sent to its run (engine_service.runtime.signal_waits)."""

    async def wait(self, name: str, fact_key: str, seconds: float | None) -> Any:
        """The payload of the signal `name`, consumed under `fact_key`, waiting at most `seconds`."""
        ...

    async def park(self, name: str, fact_key: str, seconds: float | None) -> Any:
        """A `signal` wait (a ParkStep the op returns), or the payload consumed under `fact_key` already."""
        ...


@dataclass(frozen=True)
class StepContext:
    """What an op sees: the run input, the context snapshot, which step and attempt it is, and I/O."""

    run_id: str
    step_id: str
    attempt: int
    input: Any
    context: Mapping[str, Any]
    io: IoHandle
    signals: SignalHandle | None = None

    async def wait_signal(
        self,
        name: str,
        *,
        fact_key: str,
        timeout: float | None = None,  # noqa: ASYNC109 - the op's API: a recorded deadline, not asyncio's
    ) -> Any:
        """Wait for a signal `name` sent to the run (SignalRun) and return its payload.

        The signal consumed is recorded as a fact under `fact_key` before this returns: a rerun
        of the op after a crash gets the same payload at once, and consumes no other signal.
        `timeout` (seconds; None waits for ever) fails the attempt with `signal_timeout`,
        retryable, when no signal came; a rerun after a crash waits only what is left.
        """
        if self.signals is None:
            raise OpError("signals_unavailable", "this step context serves no signals")
        return await self.signals.wait(name, fact_key, timeout)

    async def park_for_signal(
        self,
        name: str,
        *,
        fact_key: str,
        timeout: float | None = None,  # noqa: ASYNC109 - a recorded deadline, not asyncio's
    ) -> Any:
        """What an op returns to wait for a signal `name` without holding a coroutine (keel.wait_signal).

        A `signal` wait (a ParkStep): the attempt parks, and ends with the payload of the signal
        it consumes under `fact_key` (or fails `signal_timeout`, retryable, after `timeout`
        seconds). When the run holds that fact already (a rerun, a replay), its payload.
        """
        if self.signals is None:
            raise OpError("signals_unavailable", "this step context serves no signals")
        return await self.signals.park(name, fact_key, timeout)


@dataclass(frozen=True)
class OpDefinition:
    """A registered op."""

    op_id: str
    op_version: str
    description: str
    function: OpFunction


class OpRegistry:
    """Ops by (op_id, op_version)."""

    def __init__(self) -> None:
        self._ops: dict[tuple[str, str], OpDefinition] = {}

    def register(self, definition: OpDefinition) -> None:
        """Add an op; registering the same function again is a no-op, a different one is an error."""
        key = (definition.op_id, definition.op_version)
        existing = self._ops.get(key)
        if existing is not None and existing.function is not definition.function:
            raise ValueError(
                f"op {definition.op_id!r} version {definition.op_version!r} is already registered"
            )
        self._ops[key] = definition

    def has_op(self, op_id: str, op_version: str) -> bool:
        """True when (op_id, op_version) is registered."""
        return (op_id, op_version) in self._ops

    def get(self, op_id: str, op_version: str) -> OpDefinition:
        """The op registered under (op_id, op_version)."""
        return self._ops[(op_id, op_version)]

    def all(self) -> list[OpDefinition]:
        """Every op, sorted by id and version."""
        return [self._ops[key] for key in sorted(self._ops)]

    def merged(self, other: OpRegistry) -> OpRegistry:
        """A registry holding this one's ops and `other`'s."""
        out = OpRegistry()
        for definition in [*self.all(), *other.all()]:
            out.register(definition)
        return out


DEFAULT_REGISTRY = OpRegistry()


def op(
    op_id: str, *, version: str = "1", description: str = "", registry: OpRegistry | None = None
) -> Callable[[OpFunction], OpFunction]:
    """Register an async op under (op_id, version) in `registry` (the default registry if None)."""

    def register(function: OpFunction) -> OpFunction:
        summary = description or next(iter((function.__doc__ or "").strip().splitlines()), "")
        (registry or DEFAULT_REGISTRY).register(OpDefinition(op_id, version, summary, function))
        return function

    return register
