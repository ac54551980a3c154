"""OpenTelemetry spans from real services in this process (real gRPC servers, real SQLite store),
recorded with the SDK's in-memory exporter: a client's W3C trace context is the parent of the
StartRun span, kept in RunStarted, and continued by the engine that resumes the run."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keel_core import tracing
from store_service.server import StoreConfig, start_store
from tests.engine.conftest import gate, start_test_engine
from tests.engine.test_engine_rpcs import pipeline, step


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing installed for this test, every span kept in memory."""
    exporter = InMemorySpanExporter()
    tracing.install("keel-test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.uninstall()


def client_context() -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """A client's trace id, span id and the gRPC metadata carrying them (W3C traceparent)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, (("traceparent", f"00-{trace_id}-{span_id}-01"),)


def named(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    """The spans called `name`."""
    return [s for s in finished if s.name == name]


def hex_trace(span: ReadableSpan) -> str:
    """The span's trace id as 32 hex digits."""
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


async def run_started_trace(store_address: str, run_id: str) -> dict[str, str]:
    """RunStarted's trace_context, read from the store."""
    async with grpc.aio.insecure_channel(store_address) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        read = await stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run_id}", limit=1))
    data = json.loads(read.events[0].payload)
    return dict(data.get("trace_context", {}))


async def test_rpc_run_and_step_spans_follow_the_clients_trace_through_both_services(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    store = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store")))
    address = f"127.0.0.1:{store.port}"
    engine = await start_test_engine(address, checkpoint_linger=0.0)
    trace_id, client_span, metadata = client_context()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            steps = pipeline(step("a", "keel.echo"), step("b", "keel.echo", None, ("a",)))
            started = await stub.StartRun(
                engine_pb2.StartRunRequest(pipeline=steps, wait=True), metadata=metadata
            )
            assert started.run.status == engine_pb2.RUN_STATUS_COMPLETED
    finally:
        await engine.drain(0.5)
        await store.drain(0.5)
    finished = spans.get_finished_spans()
    [rpc] = named(finished, "keel.engine.v1.EngineService/StartRun")
    assert hex_trace(rpc) == trace_id
    assert rpc.parent is not None and f"{rpc.parent.span_id:016x}" == client_span
    assert rpc.attributes is not None and rpc.attributes["rpc.method"] == "StartRun"
    [run] = named(finished, "keel.run")
    assert hex_trace(run) == trace_id
    assert run.attributes is not None and run.attributes["keel.run_id"] == started.run_id
    assert run.attributes["keel.status"] == "completed"
    steps_done = named(finished, "keel.step")
    assert sorted(str(s.attributes["keel.step_id"]) for s in steps_done if s.attributes) == ["a", "b"]
    assert run.context is not None
    assert {s.parent.span_id for s in steps_done if s.parent} == {run.context.span_id}
    # The store's RPCs the engine made for the run are in the same trace.
    appends = [
        s for s in named(finished, "keel.store.v1.StoreService/AppendEvents") if hex_trace(s) == trace_id
    ]
    assert appends


async def test_a_run_resumed_by_another_engine_continues_the_clients_trace(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    store = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store")))
    address = f"127.0.0.1:{store.port}"
    first = await start_test_engine(address)
    trace_id, _, metadata = client_context()
    name = f"tracing-{uuid.uuid4()}"
    door = gate(name)
    second = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            request = engine_pb2.StartRunRequest(
                pipeline=pipeline(step("wait", "test.gated", {"gate": name}), pipeline_id="traced")
            )
            run_id = (await stub.StartRun(request, metadata=metadata)).run_id
        await door.wait_for(1)
        assert (await run_started_trace(address, run_id))["traceparent"].split("-")[1] == trace_id
        await first.drain(0.5)  # parks the run and hands its lease over
        second = await start_test_engine(address)
        await door.wait_for(2)  # the second engine took the run over and runs the step again
        door.opened.set()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            done = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id))
            assert done.run.status == engine_pb2.RUN_STATUS_COMPLETED
    finally:
        if second is not None:
            await second.drain(0.5)
        await store.drain(0.5)
    finished = spans.get_finished_spans()
    runs = [s for s in named(finished, "keel.run") if s.attributes and s.attributes["keel.run_id"] == run_id]
    # One per time an engine drove it: the first engine's, then the second engine's (more only if a
    # lease lapsed on a loaded machine and the run was taken over again).
    assert len(runs) >= 2
    assert {hex_trace(s) for s in runs} == {trace_id}
    [rpc] = named(finished, "keel.engine.v1.EngineService/StartRun")
    assert rpc.context is not None
    assert {s.parent.span_id for s in runs if s.parent} == {rpc.context.span_id}
    first_drive = min(runs, key=lambda s: s.start_time or 0)
    assert first_drive.attributes is not None and first_drive.attributes["keel.resumed"] is False
    last_drive = max(runs, key=lambda s: s.end_time or 0)
    assert last_drive.attributes is not None and last_drive.attributes["keel.resumed"] is True
    assert last_drive.attributes["keel.status"] == "completed"


async def test_without_tracing_nothing_is_recorded_but_the_clients_context_is_kept(tmp_path: Path) -> None:
    assert not tracing.enabled()
    store = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store")))
    address = f"127.0.0.1:{store.port}"
    engine = await start_test_engine(address)
    trace_id, span_id, metadata = client_context()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            request = engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"), wait=True)
            run_id = (await stub.StartRun(request, metadata=metadata)).run_id
        # Kept as the client sent it: an engine with tracing that resumes the run continues it.
        assert await run_started_trace(address, run_id) == {"traceparent": f"00-{trace_id}-{span_id}-01"}
    finally:
        await engine.drain(0.5)
        await store.drain(0.5)
