"""keel_core.serving.add_servicer: a service's methods served by its one generic handler.

The services on real servers answer every method so (tests/test_malformed_requests.py calls each
of the engine's and the store's; tests/workers the WorkerService's); here, what the generated code
is let to register.
"""

from __future__ import annotations

from typing import Any

import grpc
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc
from keel.worker.v1 import worker_pb2, worker_pb2_grpc

from keel_core.serving import add_servicer


class RecordingServer:
    """What a generated add_*Servicer_to_server calls on a server, noted."""

    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.registered.append(service)


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_every_method_is_served_by_the_generic_handler_and_none_is_registered_one_by_one() -> None:
    # grpc.aio keeps a request open per registered method and waits for the first of them at every
    # call; generic methods share one open request.
    for add, servicer, descriptor in [
        (
            engine_pb2_grpc.add_EngineServiceServicer_to_server,
            engine_pb2_grpc.EngineServiceServicer(),  # type: ignore[abstract]
            engine_pb2.DESCRIPTOR.services_by_name["EngineService"],
        ),
        (
            worker_pb2_grpc.add_WorkerServiceServicer_to_server,
            worker_pb2_grpc.WorkerServiceServicer(),  # type: ignore[abstract]
            worker_pb2.DESCRIPTOR.services_by_name["WorkerService"],
        ),
        (
            store_pb2_grpc.add_StoreServiceServicer_to_server,
            store_pb2_grpc.StoreServiceServicer(),  # type: ignore[abstract]
            store_pb2.DESCRIPTOR.services_by_name["StoreService"],
        ),
    ]:
        server = RecordingServer()
        add_servicer(add, servicer, server)  # type: ignore[arg-type]
        assert server.registered == []
        assert len(server.generic) == 1
        handler = server.generic[0]
        for method in descriptor.methods:
            assert handler.service(Details(f"/{descriptor.full_name}/{method.name}")) is not None
        assert handler.service(Details(f"/{descriptor.full_name}/NoSuchMethod")) is None
