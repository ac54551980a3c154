"""In-process wake-ups for stream subscribers: a committed append wakes the readers of its stream."""

from __future__ import annotations

import asyncio


class StreamWakeups:
    """Per-stream one-shot events; `notify(stream_id)` sets every event armed for that stream.

    A subscriber arms an event *before* reading, so an append committed between its read and its
    wait still wakes it (no lost wake-up, and no polling).
    """

    def __init__(self) -> None:
        self._armed: dict[str, set[asyncio.Event]] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once `close()` ran: subscribers should end."""
        return self._closed

    def arm(self, stream_id: str) -> asyncio.Event:
        """A fresh event that the next commit to `stream_id` (or close) will set."""
        event = asyncio.Event()
        if self._closed:
            event.set()
        else:
            self._armed.setdefault(stream_id, set()).add(event)
        return event

    def disarm(self, stream_id: str, event: asyncio.Event) -> None:
        """Forget an event that is no longer waited on."""
        waiting = self._armed.get(stream_id)
        if waiting is not None:
            waiting.discard(event)
            if not waiting:
                del self._armed[stream_id]

    def armed_count(self, stream_id: str) -> int:
        """How many waiters are armed on a stream (a subscription that ended must leave none)."""
        return len(self._armed.get(stream_id, ()))

    def notify(self, stream_id: str) -> None:
        """Wake everyone waiting on `stream_id`."""
        waiting = self._armed.pop(stream_id, None)
        if waiting:
            for event in waiting:
                event.set()

    def close(self) -> None:
        """Wake every subscriber for good."""
        self._closed = True
        armed, self._armed = self._armed, {}
        for waiting in armed.values():
            for event in waiting:
                event.set()
