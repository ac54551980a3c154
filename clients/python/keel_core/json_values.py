"""JSON values on the wire: google.protobuf.Value both ways, keeping integers integers.

protobuf carries every JSON number as a double, so `3` arrives as `3.0`. Keel hashes canonical
JSON (manifests) and shows values to people, so a double that holds an integer exactly is read
back as an int. Values both ways obey keel_core.json_rules (finite numbers, exact integers,
bounded nesting); one that does not is INVALID_ARGUMENT `invalid_json` naming where.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format, struct_pb2

from keel_core.json_rules import MAX_EXACT_INT, MAX_JSON_DEPTH, check_json, is_text

__all__ = ["MAX_EXACT_INT", "from_struct", "from_value", "set_value", "to_struct", "to_value"]


def to_value(data: Any, path: str = "value") -> struct_pb2.Value:
    """A JSON-ready Python value as a google.protobuf.Value."""
    value = struct_pb2.Value()
    set_value(value, data, path)
    return value


def set_value(value: struct_pb2.Value, data: Any, path: str = "value") -> None:
    """`value` (a message's Value field, say, filled in place rather than copied) set to `data`,
    which is checked as `to_value` checks it; an empty `value` is expected."""
    if not _filled(value, data, 0):
        value.Clear()
        check_json(data, path)  # the walk that names the fault
        raise AssertionError(f"{path}: json_values refused a value json_rules keeps")


def to_struct(data: dict[str, Any], path: str = "value") -> struct_pb2.Struct:
    """A JSON object as a google.protobuf.Struct."""
    check_json(data, path)
    struct = struct_pb2.Struct()
    json_format.ParseDict(data, struct)
    return struct


def _filled(value: struct_pb2.Value, data: Any, depth: int) -> bool:
    # The check and the build in one walk (a run's answer walks its final snapshot and input): the
    # tests of keel_core.json_rules' own walk, in its order, each value set as json_format.ParseDict
    # would set it, without its generic message walk. False (with `value` half set) where the rule
    # is broken; check_json then names the place.
    if isinstance(data, str):
        if not is_text(data):
            return False
        value.string_value = data
    elif isinstance(data, bool):
        value.bool_value = data
    elif data is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, int):
        if abs(data) > MAX_EXACT_INT:
            return False
        value.number_value = data
    elif isinstance(data, float):
        if not math.isfinite(data):
            return False
        value.number_value = data
    elif not isinstance(data, dict | list) or depth >= MAX_JSON_DEPTH:
        return False
    elif isinstance(data, dict):
        fields = value.struct_value.fields
        value.struct_value.SetInParent()  # an empty object is still an object
        for key, item in data.items():
            if not isinstance(key, str) or not is_text(key):
                return False
            if type(item) is str:  # most of any document: set here without a call
                if not is_text(item):
                    return False
                fields[key].string_value = item
            elif not _filled(fields[key], item, depth + 1):
                return False
    else:
        values = value.list_value.values
        value.list_value.SetInParent()
        for item in data:
            if not _filled(values.add(), item, depth + 1):
                return False
    return True


def from_value(value: struct_pb2.Value, *, default: Any = None, path: str = "value") -> Any:
    """A google.protobuf.Value as plain Python data; an unset Value reads as `default`."""
    if value.WhichOneof("kind") is None:
        return default
    data = _plain(value)
    check_json(data, path)
    return data


def from_struct(struct: struct_pb2.Struct, path: str = "value") -> dict[str, Any]:
    """A google.protobuf.Struct as a plain dict."""
    data = {key: _plain(item) for key, item in struct.fields.items()}
    check_json(data, path)
    return data


def _plain(value: struct_pb2.Value) -> Any:
    # Not json_format.MessageToDict: it raises ValueError on NaN and Infinity, which check_json
    # refuses with a reason. The recursion is bounded by the protobuf decoder's nesting limit.
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) <= MAX_EXACT_INT else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {key: _plain(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    return None  # null_value, or a Value left unset inside a list or struct (as MessageToDict reads it)
