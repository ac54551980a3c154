"""JSON values on the wire: google.protobuf.Value both ways, keeping integers integers.

protobuf carries every JSON number as a double, so `3` arrives as `3.0`. Keel hashes canonical
JSON (manifests) and shows values to people, so a double that holds an integer exactly is read
back as an int. Integers beyond 2**53 cannot cross the wire exactly and are refused.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format, struct_pb2

from keel_core.errors import invalid_argument

MAX_EXACT_INT = 2**53


def to_value(data: Any) -> struct_pb2.Value:
    """A JSON-ready Python value as a google.protobuf.Value."""
    _check_ints(data, "value")
    value = struct_pb2.Value()
    json_format.ParseDict(data, value)
    return value


def to_struct(data: dict[str, Any]) -> struct_pb2.Struct:
    """A JSON object as a google.protobuf.Struct."""
    _check_ints(data, "value")
    struct = struct_pb2.Struct()
    json_format.ParseDict(data, struct)
    return struct


def from_value(value: struct_pb2.Value, *, default: Any = None) -> Any:
    """A google.protobuf.Value as plain Python data; an unset Value reads as `default`."""
    if value.WhichOneof("kind") is None:
        return default
    return _normalize(json_format.MessageToDict(value))


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A google.protobuf.Struct as a plain dict."""
    result: dict[str, Any] = _normalize(json_format.MessageToDict(struct))
    return result


def _normalize(data: Any) -> Any:
    if isinstance(data, float) and data.is_integer() and abs(data) <= MAX_EXACT_INT:
        return int(data)
    if isinstance(data, dict):
        return {key: _normalize(item) for key, item in data.items()}
    if isinstance(data, list):
        return [_normalize(item) for item in data]
    return data


def _check_ints(data: Any, path: str) -> None:
    if isinstance(data, bool) or data is None or isinstance(data, str):
        return
    if isinstance(data, int):
        if abs(data) > MAX_EXACT_INT:
            raise invalid_argument("invalid_json", f"{path}: integer {data} is beyond 2**53 and not exact")
    elif isinstance(data, float):
        if not math.isfinite(data):
            raise invalid_argument("invalid_json", f"{path}: {data} is not a JSON number")
    elif isinstance(data, dict):
        for key, item in data.items():
            if not isinstance(key, str):
                raise invalid_argument("invalid_json", f"{path}: object key {key!r} is not a string")
            _check_ints(item, f"{path}.{key}")
    elif isinstance(data, list):
        for index, item in enumerate(data):
            _check_ints(item, f"{path}[{index}]")
    else:
        raise invalid_argument("invalid_json", f"{path}: {type(data).__name__} is not JSON")
