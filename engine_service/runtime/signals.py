"""Signals at run time: sending to a run's inbox, and waking the waits of this engine's runs.

`SignalInbox.send` appends signals to a run's inbox stream with the stream's compare-and-swap at
the head it read, leaving out the signal ids already there: two senders of one signal id append
it once. The inbox append also nudges the run stream (store `AppendEventsRequest.nudges`): a run
parked then is due now, in the same transaction, so the signal and the parked run's wake-up are
durable together (the Waker of whichever engine may take the run finds it). Then it appends one
`SignalWoken{run_id}` to the engine-wide `signal-wakeups` stream.

`SignalWakeups` is one subscription per engine to `signal-wakeups`: a wait registers for its run
and is woken when a SignalWoken names it, then re-reads the run's inbox; `on_woken` is told the run
too (the kernel pokes its driver here, whose parked-form waits ask their resolver again). A wait registers and
waits until the subscription is in place *before* it reads the inbox, so a signal sent after that
read is always followed by a wake-up it hears. A lost subscription (the store away), or a gap
in the sequence numbers it delivers (events trimmed before this engine read them), wakes every
wait to re-read.

`signal-wakeups` is kept short: an engine that reads a sequence number divisible by TRIM_EVERY
trims the stream below the last KEEP_WAKEUPS events (any engine may: trimming is idempotent, and
a follower that finds events gone notices the gap).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from engine_service.domain.canonical import canonical_json_bytes
from engine_service.domain.signals import (
    MAX_INBOX_SIGNALS,
    SIGNAL_WOKEN,
    Signal,
    decode_signal,
    encode_signal,
    inbox_full,
)
from engine_service.domain.streams import (
    SIGNAL_WAKEUPS_STREAM,
    run_status_of_label,
    run_stream_id,
    signals_stream_id,
)
from engine_service.store.port import EventLog
from keel_core.clock import now_us
from keel_core.errors import ErrorCategory, KeelError, not_found

log = logging.getLogger(__name__)

# How long the wake-up subscription waits before following again after the store failed it.
RESUBSCRIBE_SECONDS = 0.5
# signal-wakeups keeps about its last KEEP_WAKEUPS events: trimmed every TRIM_EVERY events.
TRIM_EVERY = 1000
KEEP_WAKEUPS = 1000


@dataclass(frozen=True)
class SentSignal:
    """A signal as SignalRun answers it: its id, where it is in the inbox, and whether it is new."""

    signal_id: str
    inbox_seq: int
    created: bool


def run_terminal(run_id: str, status: str) -> KeelError:
    """FAILED_PRECONDITION `run_terminal`: a signal to a run that has ended is never consumed."""
    return KeelError(
        "run_terminal",
        f"run {run_id} is {status}: it consumes no more signals (nothing was recorded)",
        category=ErrorCategory.FAILED_PRECONDITION,
        details={"run_id": run_id, "status": status},
    )


class SignalInbox:
    """Runs' inboxes in the event log: send (idempotent by signal id) and read."""

    def __init__(self, store: EventLog) -> None:
        self.store = store

    async def read(self, run_id: str) -> list[Signal]:
        """The run's inbox, in order (empty when nothing was sent)."""
        return (await self._read(run_id))[1]

    async def _read(self, run_id: str) -> tuple[int, list[Signal]]:
        events = await self.store.read(signals_stream_id(run_id))
        signals = []
        for event in events:
            try:
                data = json.loads(event.payload)
            except ValueError:
                continue  # not Keel's: nothing a wait could consume
            signal = decode_signal(event.seq, event.type, data) if isinstance(data, dict) else None
            if signal is not None:
                signals.append(signal)
        head = events[-1].seq if events else 0
        return head, signals

    async def send(
        self, run_id: str, signals: Sequence[Signal], *, run_exists: bool = True
    ) -> list[SentSignal]:
        """Put `signals` in the run's inbox unless their ids are there, and wake the run's engine.

        `run_exists`: refuse with `run_not_found` when the run has no events (StartRun sends the
        signals of a run it is about to start). A run that has ended refuses the signals it does
        not hold yet (`run_terminal`); a repeat of a signal it holds is answered as it was.
        """
        # The run's head and its inbox are read side by side (one round trip, not two).
        (head, label), inbox = await asyncio.gather(
            self.store.head(run_stream_id(run_id)), self._read(run_id)
        )
        if head == 0 and run_exists:
            raise not_found("run_not_found", f"run {run_id} does not exist", run_id=run_id)
        ended = run_status_of_label(label) if head else None
        sent = await self._append_new(run_id, signals, ended, inbox)
        if ended is None:
            wake = canonical_json_bytes({"run_id": run_id})
            await self.store.append(
                SIGNAL_WAKEUPS_STREAM, [(SIGNAL_WOKEN, wake)], expected_seq=None, expected_any=True
            )
        return sent

    async def _append_new(
        self, run_id: str, signals: Sequence[Signal], ended: str | None, read: tuple[int, list[Signal]]
    ) -> list[SentSignal]:
        stream_id = signals_stream_id(run_id)
        while True:
            head, inbox = read
            held = {signal.signal_id: signal for signal in inbox}
            new: list[Signal] = []
            for signal in signals:
                if signal.signal_id not in held and all(s.signal_id != signal.signal_id for s in new):
                    new.append(replace(signal, at_us=now_us()))
            if not new:
                return [SentSignal(s.signal_id, held[s.signal_id].inbox_seq, False) for s in signals]
            if ended is not None:
                raise run_terminal(run_id, ended)
            if len(inbox) + len(new) > MAX_INBOX_SIGNALS:
                raise inbox_full(run_id, len(inbox))
            try:
                await self.store.append(
                    stream_id,
                    [encode_signal(s) for s in new],
                    expected_seq=head if head else None,
                    nudges={run_stream_id(run_id): now_us()},  # a parked run: due now, durably
                )
            except KeelError as error:
                if error.code == "sequence_conflict":
                    read = await self._read(run_id)  # another sender appended: look again for our ids
                    continue
                raise
            seqs = {s.signal_id: head + i for i, s in enumerate(new, 1)}
            return [
                SentSignal(s.signal_id, seqs[s.signal_id], True)
                if s.signal_id in seqs
                else SentSignal(s.signal_id, held[s.signal_id].inbox_seq, False)
                for s in signals
            ]


class SignalWakeups:
    """One subscription per engine to `signal-wakeups`, waking the waits of the runs it names."""

    def __init__(self, store: EventLog) -> None:
        self.store = store
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None
        self._trims: set[asyncio.Task[None]] = set()
        # Told each run a signal was sent to (None: any run, the subscription was lost or skipped).
        self.on_woken: Callable[[str | None], None] | None = None

    @contextlib.contextmanager
    def watching(self, run_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever a signal is sent to `run_id` (or the subscription was lost)."""
        woken = asyncio.Event()
        self._waiters.setdefault(run_id, set()).add(woken)
        try:
            yield woken
        finally:
            waiters = self._waiters.get(run_id)
            if waiters is not None:
                waiters.discard(woken)
                if not waiters:
                    del self._waiters[run_id]

    async def ready(self) -> None:
        """Return once the subscription is in place (started on first use, kept for the engine's life)."""
        if self._ready is None:
            self._ready = asyncio.Event()
            self._task = asyncio.create_task(self._follow(self._ready), name="signal-wakeups")
        await self._ready.wait()

    async def close(self) -> None:
        """End the subscription."""
        tasks = [*self._trims, *([self._task] if self._task is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._task, self._ready = None, None

    async def _follow(self, ready: asyncio.Event) -> None:
        while True:
            try:
                head, _ = await self.store.head(SIGNAL_WAKEUPS_STREAM)
                subscription = self.store.subscribe(SIGNAL_WAKEUPS_STREAM, after_seq=head)
                async with contextlib.aclosing(subscription):
                    ready.set()
                    # Woken while the subscription was away: every wait re-reads its inbox.
                    self._wake_everyone()
                    seen = head
                    async for event in subscription:
                        if event.seq != seen + 1:
                            self._wake_everyone()  # trimmed before this engine read them
                        seen = event.seq
                        self._wake(event.payload)
                        if seen % TRIM_EVERY == 0 and seen > KEEP_WAKEUPS:
                            self._trim(seen - KEEP_WAKEUPS)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the store away for longer than its client retries
                log.warning("signal wake-up subscription lost (%s); following again", error)
            await asyncio.sleep(RESUBSCRIBE_SECONDS)

    def _trim(self, before_seq: int) -> None:
        async def trim() -> None:
            try:
                await self.store.trim(SIGNAL_WAKEUPS_STREAM, before_seq, patience=RESUBSCRIBE_SECONDS)
            except KeelError as error:  # the next trim takes these too
                log.info("signal wake-ups not trimmed below %d: %s", before_seq, error.message)

        task = asyncio.create_task(trim(), name="signal-wakeups-trim")
        self._trims.add(task)
        task.add_done_callback(self._trims.discard)

    def _wake(self, payload: bytes) -> None:
        try:
            run_id = json.loads(payload).get("run_id")
        except (ValueError, AttributeError):
            return
        for woken in self._waiters.get(str(run_id), ()):
            woken.set()
        if self.on_woken is not None and isinstance(run_id, str):
            self.on_woken(run_id)

    def _wake_everyone(self) -> None:
        for waiters in self._waiters.values():
            for woken in waiters:
                woken.set()
        if self.on_woken is not None:
            self.on_woken(None)
