"""StoreService on the wire: the servicer translating protobuf messages to backend calls and back."""

from store_service.wire.servicer import SERVICE_NAME, StoreServicer, recorded_event, register

__all__ = ["SERVICE_NAME", "StoreServicer", "recorded_event", "register"]
