"""Canonical JSON and content ids: sorted keys, no insignificant whitespace, UTF-8, no NaN."""

from __future__ import annotations

import copy
import json
import json.encoder
from collections.abc import Callable, Sequence
from typing import Any

from keel_core.content import content_id
from keel_core.errors import invalid_argument

# One encoder for every call: json.dumps with options builds a new one each time (a third of the
# cost of encoding an event).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _c_encoder() -> Callable[[Any, int], Sequence[str]] | None:
    """json's C encoder with `_CANONICAL`'s options (None where the json module has none).

    `JSONEncoder.encode` makes one at every call, with a dict to find cycles in and a closure for
    floats (a quarter to a third of what encoding a small event costs); this one is made once. Its
    cycle dict is empty again after every call that succeeds; one that fails may leave entries
    behind, so the encoder is then made anew. It runs on the event loop's thread only, and on plain
    JSON values (dicts, lists, strings, numbers) it calls back into no Python but `default`, which
    only raises: no two calls interleave.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    options = _CANONICAL
    encoder: Callable[[Any, int], Sequence[str]] = make(
        {},  # the ids of the containers being encoded: a cycle is refused, not followed
        options.default,
        json.encoder.encode_basestring,  # not ensure_ascii
        None,  # no indent
        options.key_separator,
        options.item_separator,
        options.sort_keys,
        options.skipkeys,
        options.allow_nan,
    )
    return encoder


_ENCODE = _c_encoder()


def _canonical_text(data: Any) -> str:
    """What `_CANONICAL.encode(data)` gives, through the encoder made once."""
    global _ENCODE
    if _ENCODE is None or isinstance(data, str):
        return _CANONICAL.encode(data)
    try:
        return "".join(_ENCODE(data, 0))
    except BaseException:
        _ENCODE = _c_encoder()  # what the failed call may have left in its cycle dict goes with it
        raise


def canonical_json_bytes(data: Any) -> bytes:
    """`data` as canonical JSON bytes (the form manifests and snapshots are hashed in).

    For the event loop's thread only: the encoder behind it is shared (`_c_encoder`).
    """
    try:
        # A lone surrogate (os.fsdecode of a non-UTF-8 name, say) is a str but no UTF-8: refused
        # here too (UnicodeEncodeError is a ValueError), not left to fail a caller as a retryable bug.
        return _canonical_text(data).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise invalid_argument("invalid_json", f"value is not JSON: {error}") from error


# The content id the store gives these bytes (`sha256:<hex>`), defined once in keel_core.content.
artifact_id_for_bytes = content_id


def json_copy(value: Any) -> Any:
    """A copy of `value` that shares nothing mutable with it: deepcopy's result, at a third of its
    cost for JSON (dicts, lists, scalars); anything else (a tuple an op put in a request, a dict
    subclass) is deep-copied."""
    if type(value) is dict:
        return {key: json_copy(item) for key, item in value.items()}
    if type(value) is list:
        return [json_copy(item) for item in value]
    if value is None or isinstance(value, str | int | float):
        return value
    return copy.deepcopy(value)


def parse_json_bytes(data: bytes) -> Any:
    """Bytes written by canonical_json_bytes, read back."""
    return json.loads(data.decode("utf-8"))
