"""How artifacts are cut into stored chunks, and the hashing loop of a streamed upload (both once)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

from keel_core.content import ContentDigest
from store_service.backend import ARTIFACT_CHUNK_BYTES


def split_chunks(data: bytes) -> list[bytes]:
    """`data` cut into stored chunks of at most ARTIFACT_CHUNK_BYTES (none for empty data)."""
    return [data[i : i + ARTIFACT_CHUNK_BYTES] for i in range(0, len(data), ARTIFACT_CHUNK_BYTES)]


class ChunkedUpload:
    """An upload being hashed and re-cut into stored chunks as its pieces arrive.

    Memory stays at about one chunk whatever the artifact's size: `full_chunks` yields each full
    chunk as soon as more bytes follow it; the final chunk (at most ARTIFACT_CHUNK_BYTES, empty
    only for an empty artifact) is `last` once the source is exhausted, so that a backend can
    store it together with the artifact row.
    """

    def __init__(self) -> None:
        self._digest = ContentDigest()
        self._pending = bytearray()
        self.size = 0

    async def full_chunks(self, pieces: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """Every stored chunk but the last, in order, as `pieces` arrive."""
        async for piece in pieces:
            self._digest.update(piece)
            self.size += len(piece)
            self._pending += piece
            while len(self._pending) > ARTIFACT_CHUNK_BYTES:
                yield bytes(self._pending[:ARTIFACT_CHUNK_BYTES])
                del self._pending[:ARTIFACT_CHUNK_BYTES]

    @property
    def last(self) -> bytes:
        """The final chunk (read it after `full_chunks` is exhausted)."""
        return bytes(self._pending)

    @property
    def artifact_id(self) -> str:
        """The content id of every byte seen so far."""
        return self._digest.content_id


__all__ = ["ChunkedUpload", "split_chunks"]
