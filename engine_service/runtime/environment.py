"""What an engine's run drivers share: its event log, ops, transports and failpoints."""

from __future__ import annotations

from dataclasses import dataclass

from engine_service.domain.ops import OpRegistry
from engine_service.domain.transports import TransportRegistry
from engine_service.failpoints import Failpoints
from engine_service.store.port import EventLog

# How long a parked driver (a drain, a cancel) keeps trying to make what it decided durable.
PARK_FLUSH_SECONDS = 1.0


@dataclass
class RunEnvironment:
    """What drivers share: the store, ops, transports and failpoints of one engine."""

    store: EventLog
    ops: OpRegistry
    transports: TransportRegistry
    failpoints: Failpoints
