"""Keel's StoreService: durable event streams and content-addressed artifacts over gRPC.

The public surface: the backend contract and its records (`store_service.backend`), the SQLite and
PostgreSQL backends (both on the shared SQL flow of `store_service.sql_backend`), and the server
API (`StoreConfig`, `start_store`, `StoreServicer` from `store_service.wire`). The server names and
the PostgreSQL backend are loaded on first use, so that importing the contract imports neither
grpc nor asyncpg.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from store_service.backend import (
    AppendResult,
    ArtifactDownload,
    ArtifactInfo,
    ArtifactPut,
    EventPage,
    Expected,
    ExpectedKind,
    NewArtifact,
    NewEvent,
    StoreBackend,
    StoredEvent,
    StreamHead,
    StreamInfo,
    StreamPage,
    StreamStatus,
)
from store_service.sqlite import SqliteStoreBackend

if TYPE_CHECKING:
    from store_service.postgres import PostgresStoreBackend
    from store_service.server import StoreConfig, StoreServingHandle, start_store
    from store_service.wire import StoreServicer

_LAZY = {
    "PostgresStoreBackend": "store_service.postgres",
    "StoreConfig": "store_service.server",
    "StoreServingHandle": "store_service.server",
    "start_store": "store_service.server",
    "StoreServicer": "store_service.wire",
}


def __getattr__(name: str) -> Any:
    """Load the grpc-side names on first access."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'store_service' has no attribute {name!r}")


__all__ = [
    "AppendResult",
    "ArtifactDownload",
    "ArtifactInfo",
    "ArtifactPut",
    "EventPage",
    "Expected",
    "ExpectedKind",
    "NewArtifact",
    "NewEvent",
    "PostgresStoreBackend",
    "SqliteStoreBackend",
    "StoreBackend",
    "StoreConfig",
    "StoreServicer",
    "StoreServingHandle",
    "StoredEvent",
    "StreamHead",
    "StreamInfo",
    "StreamPage",
    "StreamStatus",
    "start_store",
]
