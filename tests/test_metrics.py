"""/metrics of both services, scraped over HTTP after real runs, finds the runs counted.

The metrics registry is per process and this process may have run other servers before, so every
check compares a scrape after the run with one before it (a delta), never an absolute value.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from keel.store.v1 import store_pb2, store_pb2_grpc
from keel_client import AsyncKeelClient, RunNotFound, RunStatus
from prometheus_client.parser import text_string_to_metric_families

from engine_service import EngineConfig, OpError, OpRegistry, StepContext, op, start_engine
from store_service.server import StoreConfig, start_store

ENGINE_SERVICE = "keel.engine.v1.EngineService"
STORE_SERVICE = "keel.store.v1.StoreService"
OPS = OpRegistry()


@op("metrics.flaky", registry=OPS, description="Fails its first attempt (retryable), then succeeds")
async def flaky(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Fails attempt 0, returns on attempt 1."""
    if ctx.attempt == 0:
        raise OpError("not_yet", "first attempts fail", retryable=True)
    return {"attempt": ctx.attempt}


@op("metrics.broken", registry=OPS, description="Always fails, not retryable")
async def broken(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Fails for good."""
    raise OpError("broken", "this op always fails")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(url: str) -> Samples:
    """Every sample at `url` (fetched in a thread: the endpoint is served from this process)."""
    return await asyncio.to_thread(_scrape, url)


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass
class Endpoints:
    """Where the engine and the store serve, and their /metrics URLs."""

    engine: str
    engine_metrics: str
    store_metrics: str


@pytest.fixture
async def endpoints(tmp_path: Path) -> AsyncIterator[Endpoints]:
    """A store and an engine, each with /metrics on a port picked by the OS."""
    store = await start_store(
        StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "store", metrics_listen="127.0.0.1:0")
    )
    engine = await start_engine(
        EngineConfig(
            listen="127.0.0.1:0",
            store=f"127.0.0.1:{store.port}",
            failpoints="",
            ops=OPS,
            metrics_listen="127.0.0.1:0",
        )
    )
    assert store.metrics is not None and engine.metrics is not None
    try:
        yield Endpoints(f"127.0.0.1:{engine.port}", engine.metrics.url, store.metrics.url)
    finally:
        await engine.drain(0.5)
        await store.drain(0.5)


def pipeline(pipeline_id: str, op_id: str) -> dict[str, Any]:
    """A one-step pipeline."""
    return {"pipeline_id": pipeline_id, "steps": [{"step_id": "only", "op_id": op_id}]}


async def test_metrics_count_a_completed_run_its_rpcs_and_the_store_appends(endpoints: Endpoints) -> None:
    engine_before = await scrape(endpoints.engine_metrics)
    store_before = await scrape(endpoints.store_metrics)
    async with AsyncKeelClient(endpoints.engine) as client:
        started = await client.start_run(pipeline("counted", "keel.echo"), input={"n": 1}, wait=True)
    assert started.run is not None and started.run.status == RunStatus.COMPLETED
    engine_after = await scrape(endpoints.engine_metrics)
    store_after = await scrape(endpoints.store_metrics)

    def engine_delta(name: str, **labels: str) -> float:
        return value(engine_after, name, **labels) - value(engine_before, name, **labels)

    def store_delta(name: str, **labels: str) -> float:
        return value(store_after, name, **labels) - value(store_before, name, **labels)

    assert engine_delta("keel_engine_runs_started_total") >= 1
    assert engine_delta("keel_engine_runs_finished_total", status="completed") >= 1
    assert engine_delta("keel_rpc_handled_total", service=ENGINE_SERVICE, method="StartRun", code="OK") >= 1
    assert engine_delta("keel_rpc_duration_seconds_count", service=ENGINE_SERVICE, method="StartRun") >= 1
    assert engine_delta("keel_engine_step_duration_seconds_count", op="keel.echo", outcome="completed") >= 1
    assert ("keel_engine_runs_in_flight", frozenset()) in engine_after
    assert ("keel_engine_lease_takeovers_total", frozenset()) in engine_after

    assert store_delta("keel_store_appends_total") >= 1
    assert store_delta("keel_store_events_appended_total") >= 3  # RunStarted, the step, RunCompleted
    assert store_delta("keel_store_artifact_bytes_in_total", via="inline") > 0  # manifest and snapshots
    # The engine's appends travel on its open AppendEventsStream: a request each, counted as it is.
    assert store_delta("keel_store_append_stream_request_seconds_count") >= 1
    assert (
        value(store_after, "keel_rpc_started_total", service=STORE_SERVICE, method="AppendEventsStream") >= 1
    )


async def test_metrics_count_retries_failures_and_error_codes(endpoints: Endpoints) -> None:
    before = await scrape(endpoints.engine_metrics)
    async with AsyncKeelClient(endpoints.engine) as client:
        retried = await client.start_run(pipeline("retried", "metrics.flaky"), wait=True)
        failed = await client.start_run(pipeline("failed", "metrics.broken"), wait=True)
        with pytest.raises(RunNotFound):
            await client.get_run("00000000-0000-4000-8000-000000000000")
    assert retried.run is not None and retried.run.status == RunStatus.COMPLETED
    assert failed.run is not None and failed.run.status == RunStatus.FAILED
    after = await scrape(endpoints.engine_metrics)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("keel_engine_step_retries_total", op="metrics.flaky") == 1
    assert delta("keel_engine_step_duration_seconds_count", op="metrics.flaky", outcome="failed") == 1
    assert delta("keel_engine_step_duration_seconds_count", op="metrics.flaky", outcome="completed") == 1
    assert delta("keel_engine_runs_finished_total", status="failed") >= 1
    assert delta("keel_rpc_handled_total", service=ENGINE_SERVICE, method="GetRun", code="NOT_FOUND") == 1


async def test_store_metrics_count_artifact_bytes_in_and_out(tmp_path: Path) -> None:
    store = await start_store(
        StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "own-store", metrics_listen="127.0.0.1:0")
    )
    assert store.metrics is not None
    data = b"x" * 70_000
    before = await scrape(store.metrics.url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{store.port}") as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)

            async def chunks() -> AsyncIterator[store_pb2.PutArtifactRequest]:
                yield store_pb2.PutArtifactRequest(kind="blob", data=data[:40_000])
                yield store_pb2.PutArtifactRequest(data=data[40_000:])

            put = await stub.PutArtifact(chunks())
            got = b"".join(
                [
                    m.data
                    async for m in stub.GetArtifact(store_pb2.GetArtifactRequest(artifact_id=put.artifact_id))
                ]
            )
        assert got == data
        after = await scrape(store.metrics.url)
    finally:
        await store.drain(0.5)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("keel_store_artifact_bytes_in_total", via="put") == len(data)
    assert delta("keel_store_artifact_bytes_out_total") == len(data)
    assert delta("keel_rpc_handled_total", service=STORE_SERVICE, method="PutArtifact", code="OK") == 1
    assert delta("keel_rpc_handled_total", service=STORE_SERVICE, method="GetArtifact", code="OK") == 1
