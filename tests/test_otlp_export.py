"""Spans exported over OTLP/gRPC by real service processes started with --otlp-endpoint, to a
collector served in this process (the OTLP TraceService, answering Export); and, without the
`tracing` extra, --otlp-endpoint refused in one line."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.engine.processes import start_engine_process, start_store_process

pytestmark = pytest.mark.slow


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector keeping what it is sent: (service.name, span name, trace id hex)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        """Keep every span of the request."""
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                "",
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append((service, span.name, span.trace_id.hex()))
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_both_services_export_their_spans_in_the_clients_trace(tmp_path: Path) -> None:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    endpoint = f"http://127.0.0.1:{port}"
    store = await start_store_process(tmp_path / "store", extra_args=("--otlp-endpoint", endpoint))
    engine = await start_engine_process(store.address, extra_args=("--otlp-endpoint", endpoint))
    trace_id = secrets.token_hex(16)
    metadata = (("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"),)
    try:
        async with grpc.aio.insecure_channel(engine.address) as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            request = engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"), wait=True)
            started = await stub.StartRun(request, metadata=metadata)
            assert started.run.status == engine_pb2.RUN_STATUS_COMPLETED
        # A graceful stop flushes what the batch exporter still holds.
        assert await engine.terminate() == 0
        assert await store.terminate() == 0
    finally:
        await engine.kill()
        await store.kill()
        await server.stop(None)
    ours = {(service, name) for service, name, trace in collector.spans if trace == trace_id}
    assert {
        ("keel-engine", "keel.engine.v1.EngineService/StartRun"),
        ("keel-engine", "keel.run"),
        ("keel-engine", "keel.step"),
        ("keel-store", "keel.store.v1.StoreService/AppendEvents"),
    } <= ours


WITHOUT_TRACING = (
    "import sys; sys.modules['opentelemetry'] = None  # as if the `tracing` extra were not installed\n"
    "from {module} import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize(
    ("module", "flags", "status"),
    [
        ("engine_service.server", ["--store", "127.0.0.1:1"], 2),
        ("store_service.server", ["--data-dir", "{tmp}"], 1),
    ],
)
def test_otlp_endpoint_without_the_tracing_extra_is_one_line_naming_it(
    module: str, flags: list[str], status: int, tmp_path: Path
) -> None:
    args = [flag.format(tmp=tmp_path) for flag in flags]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRACING.format(module=module), "--listen", "127.0.0.1:0", *args,
         "--otlp-endpoint", "http://127.0.0.1:4317"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'keel[tracing]'" in lines[0], done.stderr
