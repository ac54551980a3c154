"""Keel's EngineService: durable pipeline runs whose every fact lives in the StoreService.

The public surface:

- `EngineConfig`, `start_engine(config) -> EngineServingHandle` (in-process), `main` (`engine-service`),
  loaded on first use, so that `import engine_service` (or its pure `domain`) loads neither grpc
  nor the engine;
- `op` (decorator registering `async (ctx, op_config, input) -> JSON` under (op_id, version)),
  `StepContext`, `OpError`, `OpRegistry`;
- `Transport` (Protocol), `TransportRegistry`, `register_transport`;
- the pure core in `engine_service.domain` (manifests, plans, events, `fold`, `next_action`).

Layout: `domain/` (pure), `store/` (the EventLog port and its implementations), `runtime/` (the
engine at work), `wire/` (the gRPC servicer and message mapping), `server.py` (the process).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engine_service.domain import (
    DEFAULT_REGISTRY,
    DEFAULT_TRANSPORTS,
    OpError,
    OpRegistry,
    StepContext,
    Transport,
    TransportRegistry,
    op,
    register_transport,
)

if TYPE_CHECKING:
    from engine_service.server import EngineConfig, EngineServingHandle, main, start_engine

_LAZY = {
    "EngineConfig": "engine_service.server",
    "EngineServingHandle": "engine_service.server",
    "main": "engine_service.server",
    "start_engine": "engine_service.server",
}


def __getattr__(name: str) -> Any:
    """Load the server-side names on first access."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine_service' has no attribute {name!r}")


__all__ = [
    "DEFAULT_REGISTRY",
    "DEFAULT_TRANSPORTS",
    "EngineConfig",
    "EngineServingHandle",
    "OpError",
    "OpRegistry",
    "StepContext",
    "Transport",
    "TransportRegistry",
    "main",
    "op",
    "register_transport",
    "start_engine",
]
