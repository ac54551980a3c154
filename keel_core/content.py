"""Content ids: the one place that says how bytes are named (`sha256:<hex>` of the bytes)."""

from __future__ import annotations

import hashlib
import re

CONTENT_ID_SCHEME = "sha256:"
# A well-formed content id: the scheme and 64 lowercase hex digits.
CONTENT_ID_PATTERN = re.compile(re.escape(CONTENT_ID_SCHEME) + r"[0-9a-f]{64}")


class ContentDigest:
    """The content id of bytes fed in pieces, for uploads too large to hold at once."""

    __slots__ = ("_hasher",)

    def __init__(self) -> None:
        self._hasher = hashlib.sha256()

    def update(self, data: bytes) -> None:
        """Feed the next piece of the content."""
        self._hasher.update(data)

    @property
    def content_id(self) -> str:
        """`sha256:<hex>` of everything fed so far."""
        return CONTENT_ID_SCHEME + self._hasher.hexdigest()


def content_id(data: bytes) -> str:
    """The content id of `data`: `sha256:<hex>`, as the store names artifacts. The id `ContentDigest`
    gives, hashed in one call: both services name several artifacts per run."""
    return CONTENT_ID_SCHEME + hashlib.sha256(data).hexdigest()


__all__ = ["CONTENT_ID_PATTERN", "CONTENT_ID_SCHEME", "ContentDigest", "content_id"]
