"""What a JSON value must be to travel through Keel: one rule, checked wherever values come in.

Values come in from clients (google.protobuf.Value fields, keel_core.json_values) and from inside
the engine (op outputs, transport answers); all are checked here, so that whatever is stored can be
sent back. The rule: JSON types only (string object keys), finite numbers, integers within 2**53
(protobuf carries numbers as doubles), and at most MAX_JSON_DEPTH levels of arrays and objects.

This module imports neither grpc nor protobuf: the engine's domain uses it.
"""

from __future__ import annotations

import math
from typing import Any

from keel_core.errors import invalid_argument

MAX_EXACT_INT = 2**53
# Protobuf decoders (C++, Java, Python's upb) refuse messages nested past 100 levels, and each
# object level of a google.protobuf.Value costs three (Value, Struct, map entry): 30 levels leave
# room for the messages a value travels in (GetRunResponse > Run > final_snapshot, say).
MAX_JSON_DEPTH = 30


def check_json(data: Any, path: str = "value") -> None:
    """Raise INVALID_ARGUMENT `invalid_json` naming the first place where `data` breaks the rule."""
    _check(data, path, 0)


def _check(data: Any, path: str, depth: int) -> None:
    if isinstance(data, bool) or data is None or isinstance(data, str):
        return
    if isinstance(data, int):
        if abs(data) > MAX_EXACT_INT:
            raise _invalid(path, f"integer {data} is beyond 2**53 and not exact")
    elif isinstance(data, float):
        if not math.isfinite(data):
            raise _invalid(path, f"{data} is not a JSON number (NaN and Infinity are not JSON)")
    elif isinstance(data, dict | list):
        if depth >= MAX_JSON_DEPTH:
            raise _invalid(path, f"nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects")
        if isinstance(data, dict):
            for key, item in data.items():
                if not isinstance(key, str):
                    raise _invalid(path, f"object key {key!r} is not a string")
                _check(item, f"{path}.{key}", depth + 1)
        else:
            for index, item in enumerate(data):
                _check(item, f"{path}[{index}]", depth + 1)
    else:
        raise _invalid(path, f"{type(data).__name__} is not JSON")


def _invalid(path: str, why: str) -> Exception:
    return invalid_argument("invalid_json", f"{path}: {why}", path=path)
