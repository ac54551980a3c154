"""The store's own Prometheus metrics (RPC counts and latency come from keel_core.metrics).

They count what the store acknowledged: an append is counted once it committed, artifact bytes
once they were stored or sent.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from keel_core.metrics import REGISTRY, RPC_SECONDS_BUCKETS

APPENDS = Counter(
    "keel_store_appends",
    "Appends that committed (an AppendEvents call, or one append of an AppendEventsBatch or of an "
    "AppendEventsStream request).",
    registry=REGISTRY,
)
EVENTS_APPENDED = Counter(
    "keel_store_events_appended",
    "Events committed by appends.",
    registry=REGISTRY,
)
ARTIFACT_BYTES_IN = Counter(
    "keel_store_artifact_bytes_in",
    "Artifact bytes received and stored, by how they came: inline (with an append) or put (PutArtifact). "
    "Bytes of an artifact the store already held count too: they crossed the wire.",
    ["via"],
    registry=REGISTRY,
)
ARTIFACT_BYTES_OUT = Counter(
    "keel_store_artifact_bytes_out",
    "Artifact bytes sent by GetArtifact.",
    registry=REGISTRY,
)

APPEND_STREAM_REQUEST_SECONDS = Histogram(
    "keel_store_append_stream_request_seconds",
    "Time to answer one AppendEventsStream request, from its arrival to its outcomes (its appends "
    "durable) or its refusal; its count is the requests received, each one batch's round trip as an "
    "AppendEventsBatch call is (keel_rpc_duration_seconds times the whole long-lived call).",
    registry=REGISTRY,
    buckets=RPC_SECONDS_BUCKETS,
)

STREAMS_DELETED = Counter(
    "keel_store_streams_deleted",
    "Streams DeleteStreams deleted (engines' retention).",
    registry=REGISTRY,
)
ARTIFACTS_DELETED = Counter(
    "keel_store_artifacts_deleted",
    "Artifacts DeleteArtifacts deleted (engines' artifact collection).",
    registry=REGISTRY,
)

for _via in ("inline", "put"):
    ARTIFACT_BYTES_IN.labels(_via)  # present at 0 from the start, so rates work from the first scrape


def appended(events: int, inline_artifact_bytes: int) -> None:
    """Count one committed append of `events` events carrying `inline_artifact_bytes` of artifacts."""
    APPENDS.inc()
    EVENTS_APPENDED.inc(events)
    if inline_artifact_bytes:
        ARTIFACT_BYTES_IN.labels("inline").inc(inline_artifact_bytes)


__all__ = [
    "APPENDS",
    "APPEND_STREAM_REQUEST_SECONDS",
    "ARTIFACTS_DELETED",
    "ARTIFACT_BYTES_IN",
    "ARTIFACT_BYTES_OUT",
    "EVENTS_APPENDED",
    "STREAMS_DELETED",
    "appended",
]
