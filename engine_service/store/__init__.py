"""The engine's storage port: the EventLog Protocol, its gRPC and in-memory implementations.

- `EventLog` (the port every runtime component depends on) and its records: `StreamEvent`,
  `AppendResult`, `StreamSummary`; `FOREVER` patience;
- `InMemoryEventLog`: the StoreService's semantics in one process, for fast tests;
- `engine_service.store.grpc_client.StoreClient`: the EventLog over the StoreService (it loads
  grpc, so it is imported from its module, not from here).
"""

from __future__ import annotations

from engine_service.store.memory import InMemoryEventLog
from engine_service.store.port import FOREVER, AppendResult, EventLog, StreamEvent, StreamSummary

__all__ = [
    "FOREVER",
    "AppendResult",
    "EventLog",
    "InMemoryEventLog",
    "StreamEvent",
    "StreamSummary",
]
