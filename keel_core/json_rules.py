"""What a JSON value must be to travel through Keel: one rule, checked wherever values come in.

Values come in from clients (google.protobuf.Value fields, keel_core.json_values) and from inside
the engine (op outputs, transport answers); all are checked here, so that whatever is stored can be
sent back. The rule: JSON types only (string object keys), strings that are Unicode text (no lone
surrogate: they cannot be encoded as UTF-8), finite numbers, integers within 2**53 (protobuf
carries numbers as doubles), and at most MAX_JSON_DEPTH levels of arrays and objects, counted from
what goes on the wire as one value: a value recorded inside an event (an io answer in FactRecorded,
one level down) is checked where it comes in with `within`, so that it may nest that many levels
less and the event can still be shown.

This module imports neither grpc nor protobuf: the engine's domain uses it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from keel_core.errors import KeelError, invalid_argument

MAX_EXACT_INT = 2**53
# Protobuf decoders (C++, Java, Python's upb) refuse messages nested past 100 levels, and each
# object level of a google.protobuf.Value costs three (Value, Struct, map entry): 30 levels leave
# room for the messages a value travels in (GetRunResponse > Run > final_snapshot, say).
MAX_JSON_DEPTH = 30


def check_json(data: Any, path: str = "value", *, within: int = 0) -> None:
    """Raise INVALID_ARGUMENT `invalid_json` naming the first place where `data` breaks the rule.

    `within`: how many levels of arrays and objects `data` will sit inside once recorded (the event
    that holds it, say): it may nest MAX_JSON_DEPTH - within levels, and a refusal says so.
    """
    # Checked on hot paths (every op output, answer and shown event): the walk that names the
    # place builds a path string per node, so it runs only once the plain walk has found a fault.
    if not _is_valid(data, within):
        _check(data, path, within, within)


def nests_too_deeply(refused: KeelError) -> bool:
    """Whether check_json refused a value for its nesting (the first fault it met), not for what it holds."""
    return "max_depth" in refused.details


def is_text(value: str) -> bool:
    """Whether `value` can be encoded as UTF-8 (no lone surrogate, as os.fsdecode can make)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_valid(data: Any, depth: int) -> bool:
    """Whether `data` keeps the rule; the same tests as `_check`, without naming anything."""
    if isinstance(data, str):
        return is_text(data)
    if isinstance(data, bool) or data is None:
        return True
    if isinstance(data, int):
        return abs(data) <= MAX_EXACT_INT
    if isinstance(data, float):
        return math.isfinite(data)
    if not isinstance(data, dict | list) or depth >= MAX_JSON_DEPTH:
        return False
    depth += 1
    items: Iterable[Any] = data
    if isinstance(data, dict):
        for key in data:
            if not isinstance(key, str) or not is_text(key):
                return False
        items = data.values()
    for item in items:
        # Strings and small values are most of any document: settled here without a call.
        kind = type(item)
        if kind is str:
            if not is_text(item):
                return False
            continue
        if item is None or kind is bool:
            continue
        if not _is_valid(item, depth):
            return False
    return True


def _check(data: Any, path: str, depth: int, within: int) -> None:
    if isinstance(data, str):
        if not is_text(data):
            raise _invalid(path, "string is not Unicode text (a lone surrogate: not encodable as UTF-8)")
        return
    if isinstance(data, bool) or data is None:
        return
    if isinstance(data, int):
        if abs(data) > MAX_EXACT_INT:
            raise _invalid(path, f"integer {data} is beyond 2**53 and not exact")
    elif isinstance(data, float):
        if not math.isfinite(data):
            raise _invalid(path, f"{data} is not a JSON number (NaN and Infinity are not JSON)")
    elif isinstance(data, dict | list):
        if depth >= MAX_JSON_DEPTH:
            raise _too_deep(path, within)
        if isinstance(data, dict):
            for key, item in data.items():
                if not isinstance(key, str):
                    raise _invalid(path, f"object key {key!r} is not a string")
                if not is_text(key):
                    raise _invalid(path, f"object key {key!r} is not Unicode text (a lone surrogate)")
                _check(item, f"{path}.{key}", depth + 1, within)
        else:
            for index, item in enumerate(data):
                _check(item, f"{path}[{index}]", depth + 1, within)
    else:
        raise _invalid(path, f"{type(data).__name__} is not JSON")


def _invalid(path: str, why: str) -> KeelError:
    return invalid_argument("invalid_json", f"{path}: {why}", path=path)


def _too_deep(path: str, within: int) -> KeelError:
    limit = MAX_JSON_DEPTH - within
    why = f"nests deeper than {limit} levels of arrays and objects"
    if within:
        levels = "one level" if within == 1 else f"{within} levels"
        why += f" (it is recorded {levels} down in a value that may nest {MAX_JSON_DEPTH})"
    return invalid_argument("invalid_json", f"{path}: {why}", path=path, max_depth=limit)
