"""The engine's storage port: the EventLog Protocol, its gRPC and in-memory implementations.

- `EventLog` (the port every runtime component depends on) and its records: `StreamEvent`,
  `AppendResult`, `StreamSummary`; `FOREVER` patience;
- `StoreClient`: the EventLog over the StoreService (loads grpc; imported on first use);
- `InMemoryEventLog`: the same semantics in one process, for fast tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine_service.store.memory import InMemoryEventLog
from engine_service.store.port import FOREVER, AppendResult, EventLog, StreamEvent, StreamSummary

if TYPE_CHECKING:
    from engine_service.store.grpc_client import StoreClient, channel_target

__all__ = [
    "FOREVER",
    "AppendResult",
    "EventLog",
    "InMemoryEventLog",
    "StoreClient",
    "StreamEvent",
    "StreamSummary",
    "channel_target",
]


def __getattr__(name: str) -> Any:
    """The gRPC implementation, imported when first named (it loads grpc)."""
    if name in ("StoreClient", "channel_target"):
        from engine_service.store import grpc_client

        return getattr(grpc_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
