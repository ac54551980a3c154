"""Transports: where `io.call(namespace, ...)` goes. One per namespace, registered by name."""

from __future__ import annotations

from typing import Any, Protocol


class Transport(Protocol):
    """Performs the I/O calls of one namespace; its answers are recorded as facts."""

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        """Perform the call and return a JSON answer (raise OpError/KeelError to fail it)."""
        ...


class TransportRegistry:
    """Transports by namespace."""

    def __init__(self) -> None:
        self._transports: dict[str, Transport] = {}

    def register(self, namespace: str, transport: Transport) -> None:
        """Route calls of `namespace` to `transport` (replacing any earlier one)."""
        self._transports[namespace] = transport

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
