"""Keel's EngineService: durable pipeline runs whose every fact lives in the StoreService.

The public surface:

- `EngineConfig`, `start_engine(config) -> EngineServingHandle` (in-process), `main` (`engine-service`);
- `op` (decorator registering `async (ctx, op_config, input) -> JSON` under (op_id, version)),
  `StepContext`, `OpError`, `OpRegistry`;
- `Transport` (Protocol), `TransportRegistry`, `register_transport`;
- the pure core in `engine_service.domain` (manifests, plans, events, `fold`, `next_action`).
"""

from __future__ import annotations

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
from engine_service.server import EngineConfig, EngineServingHandle, main, start_engine

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
