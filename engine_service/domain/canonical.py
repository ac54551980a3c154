"""Canonical JSON and content ids: sorted keys, no insignificant whitespace, UTF-8, no NaN."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from keel_core.errors import invalid_argument


def canonical_json_bytes(data: Any) -> bytes:
    """`data` as canonical JSON bytes (the form manifests and snapshots are hashed in)."""
    try:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise invalid_argument("invalid_json", f"value is not JSON: {error}") from error
    return text.encode("utf-8")


def artifact_id_for_bytes(data: bytes) -> str:
    """The content id the store gives these bytes: `sha256:<hex>`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_json_bytes(data: bytes) -> Any:
    """Bytes written by canonical_json_bytes, read back."""
    return json.loads(data.decode("utf-8"))
