"""Canonical JSON and content ids: sorted keys, no insignificant whitespace, UTF-8, no NaN."""

from __future__ import annotations

import copy
import json
from typing import Any

from keel_core.content import content_id
from keel_core.errors import invalid_argument

# One encoder for every call: json.dumps with options builds a new one each time (a third of the
# cost of encoding an event).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json_bytes(data: Any) -> bytes:
    """`data` as canonical JSON bytes (the form manifests and snapshots are hashed in)."""
    try:
        text = _CANONICAL.encode(data)
        # A lone surrogate (os.fsdecode of a non-UTF-8 name, say) is a str but no UTF-8: refused
        # here too (UnicodeEncodeError is a ValueError), not left to fail a caller as a retryable bug.
        return text.encode("utf-8")
    except (TypeError, ValueError) as error:
        raise invalid_argument("invalid_json", f"value is not JSON: {error}") from error


# The content id the store gives these bytes (`sha256:<hex>`), defined once in keel_core.content.
artifact_id_for_bytes = content_id


def json_copy(value: Any) -> Any:
    """A copy of `value` that shares nothing mutable with it: deepcopy's result, at a third of its
    cost for JSON (dicts, lists, scalars); anything else (a tuple an op put in a request) is
    deep-copied."""
    if isinstance(value, dict):
        return {key: json_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_copy(item) for item in value]
    if value is None or isinstance(value, str | int | float):
        return value
    return copy.deepcopy(value)


def parse_json_bytes(data: bytes) -> Any:
    """Bytes written by canonical_json_bytes, read back."""
    return json.loads(data.decode("utf-8"))
