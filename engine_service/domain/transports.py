"""Transports: where `io.call(namespace, ...)` goes. One per namespace, registered by name.

A transport's `call(namespace, request, fact_key, run_id)` may also accept, as keyword arguments,
what a remote system needs to deduplicate a call the engine repeats (DEDUP_KEYWORDS):

- `step_id`, `attempt`: the step and attempt making the call;
- `fencing`: the sequence number, in the run stream, of that attempt's StepAttemptStarted. A
  later attempt, or an engine that took the run over (its claim is a new StepAttemptStarted),
  always has a larger one, so a remote system that remembers the largest fencing value it saw
  per (run_id, fact_key) can refuse a call from a driver that was superseded.

They are passed only to a transport whose `call` names them (or takes `**kwargs`), looked up once
at registration: transports written for the four-argument signature keep working unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

DEDUP_KEYWORDS = ("step_id", "attempt", "fencing")


class Transport(Protocol):
    """Performs the I/O calls of one namespace; its answers are recorded as facts."""

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        """Perform the call and return a JSON answer (raise OpError/KeelError to fail it)."""
        ...


def accepted_keywords(transport: Transport) -> frozenset[str]:
    """Which of DEDUP_KEYWORDS the transport's `call` accepts (all of them with `**kwargs`)."""
    try:
        parameters = inspect.signature(transport.call).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: the four-argument one
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return frozenset(DEDUP_KEYWORDS)
    named = {p.name for p in parameters if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    return frozenset(DEDUP_KEYWORDS) & named


class TransportRegistry:
    """Transports by namespace."""

    def __init__(self) -> None:
        self._transports: dict[str, Transport] = {}
        self._keywords: dict[str, frozenset[str]] = {}

    def register(self, namespace: str, transport: Transport) -> None:
        """Route calls of `namespace` to `transport` (replacing any earlier one)."""
        self._transports[namespace] = transport
        self._keywords[namespace] = accepted_keywords(transport)

    async def call(
        self,
        namespace: str,
        request: Any,
        fact_key: str,
        run_id: str,
        *,
        step_id: str,
        attempt: int,
        fencing: int,
    ) -> Any:
        """Call the namespace's transport (which must be registered), with the keywords it accepts."""
        offered = {"step_id": step_id, "attempt": attempt, "fencing": fencing}
        keywords = {name: offered[name] for name in self._keywords[namespace]}
        return await self._transports[namespace].call(namespace, request, fact_key, run_id, **keywords)

    def get(self, namespace: str) -> Transport | None:
        """The transport for `namespace`, if any."""
        return self._transports.get(namespace)

    def namespaces(self) -> list[str]:
        """The registered namespaces, sorted."""
        return sorted(self._transports)

    def merged(self, other: TransportRegistry) -> TransportRegistry:
        """A registry with this one's transports and `other`'s (other wins on a clash)."""
        out = TransportRegistry()
        for source in (self, other):
            for namespace in source.namespaces():
                transport = source.get(namespace)
                assert transport is not None
                out.register(namespace, transport)
        return out


DEFAULT_TRANSPORTS = TransportRegistry()


def register_transport(
    namespace: str, instance: Transport, *, registry: TransportRegistry | None = None
) -> None:
    """Route calls of `namespace` to `instance` in `registry` (the default registry if None)."""
    (registry or DEFAULT_TRANSPORTS).register(namespace, instance)
