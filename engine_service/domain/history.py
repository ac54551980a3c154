"""`fold(events) -> RunHistory`: everything the engine decides about a run comes from this.

The fold is pure and total over any prefix of a stream the engine writes: it never raises on a
legal prefix, and `fold(a + b) == fold(a).extend(b)`, so a driver can keep folding the events
it appends instead of re-reading the stream.

A stream may hold an event that does not decode (`CorruptEvent`: any store client can append to
a run stream). The fold applies everything before it, notes the first one (`corrupt`, at
`corrupt_seq`), and after it applies nothing but a RunCompleted: later events may depend on the
unreadable one, so the fold does not guess, but an operator's terminal event (Terminalize cancels
or fails such a run) still ends the run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from engine_service.domain.events import (
    CorruptEvent,
    ErrorRecord,
    FactRecorded,
    KernelEvent,
    ParkStep,
    RunCompleted,
    RunParked,
    RunResumed,
    RunStarted,
    SignalAwaited,
    StepAttemptFailed,
    StepAttemptStarted,
    StepCompleted,
    StepWaiting,
)
from engine_service.domain.frozen import build


@dataclass(frozen=True)
class OpenAttempt:
    """An attempt that started and has neither completed nor failed (in flight, or orphaned by a crash)."""

    step_id: str
    attempt: int
    base_snapshot_id: str


@dataclass(frozen=True)
class StepFailure:
    """The last failed attempt of a step."""

    attempt: int
    base_snapshot_id: str
    error: ErrorRecord
    at_us: int = 0  # when it failed (0: not recorded): a retry's backoff counts from here


@dataclass(frozen=True)
class WaitingAttempt:
    """An open attempt that parked (StepWaiting): it waits for `wait`, and is never an orphan."""

    step_id: str
    attempt: int
    base_snapshot_id: str
    wait: ParkStep
    since_us: int = 0


class Facts(Mapping[str, FactRecorded]):
    """A run's recorded facts by key: the first one recorded under each key, in recording order.

    Facts are only ever added, so the histories of one run share one dict and one list of keys:
    each sees the first `count` of them. Extending the newest history adds to both in place, where
    copying them would make a step's N-th recorded call cost O(N); extending an older one (after
    another was extended from it) copies what it sees first, so no history sees another's facts.
    Iterating one history while a later one is made from it is safe: a list's iterator, bounded
    by `count`, does not mind the list growing.
    """

    __slots__ = ("_count", "_entries", "_keys")

    def __init__(
        self,
        entries: dict[str, tuple[int, FactRecorded]] | None = None,
        keys: list[str] | None = None,
        count: int = 0,
    ) -> None:
        self._entries = {} if entries is None else entries  # key -> (its place, the fact)
        self._keys = [] if keys is None else keys  # the keys in recording order
        self._count = count

    def __getitem__(self, key: str) -> FactRecorded:
        place, fact = self._entries[key]
        if place >= self._count:  # added by a later history
            raise KeyError(key)
        return fact

    def __contains__(self, key: object) -> bool:
        entry = self._entries.get(key) if isinstance(key, str) else None
        return entry is not None and entry[0] < self._count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        return itertools.islice(self._keys, self._count)

    def __repr__(self) -> str:
        return f"Facts({dict(self)!r})"

    def adding(self, facts: Iterable[FactRecorded]) -> Facts:
        """These facts and `facts`, each added unless its key has one already."""
        entries, keys, count = self._entries, self._keys, self._count
        if len(keys) != count:  # a later history added to them: take what this one sees
            keys = keys[:count]
            entries = {key: entries[key] for key in keys}
        for fact in facts:
            if fact.fact_key not in entries:
                entries[fact.fact_key] = (count, fact)
                keys.append(fact.fact_key)
                count += 1
        return Facts(entries, keys, count)


@dataclass(frozen=True)
class RunHistory:
    """The state of a run as its events tell it."""

    head_seq: int = 0
    started: RunStarted | None = None
    completed_steps: Mapping[str, str] = field(default_factory=dict)  # step id -> its checkpoint id
    last_checkpoint: str = ""
    last_attempt: Mapping[str, int] = field(default_factory=dict)
    last_failure: Mapping[str, StepFailure] = field(default_factory=dict)
    # step id -> its open attempt: parallel branches each have one; after a crash all are orphans
    open_attempts: Mapping[str, OpenAttempt] = field(default_factory=dict)
    facts: Facts = field(default_factory=Facts)
    # step id -> its open attempt that waits (a subset of open_attempts)
    waiting: Mapping[str, WaitingAttempt] = field(default_factory=dict)
    parked: RunParked | None = None  # the run is parked (RunParked not followed by RunResumed)
    # fact key -> the last wait for a signal recorded under it (engine_service.domain.signals)
    signal_waits: Mapping[str, SignalAwaited] = field(default_factory=dict)
    terminal: RunCompleted | None = None
    corrupt: CorruptEvent | None = None  # the first event that did not decode, at corrupt_seq
    corrupt_seq: int = 0

    @property
    def is_terminal(self) -> bool:
        """True once RunCompleted is in the stream."""
        return self.terminal is not None

    def extend(self, events: Iterable[KernelEvent]) -> RunHistory:
        """This history with more events folded in (the events follow head_seq, in order)."""
        return _Folder(self).fold(events)


def fold(events: Iterable[KernelEvent]) -> RunHistory:
    """The history told by a run's events, from event 1."""
    return RunHistory().extend(events)


class _Folder:
    """Mutable accumulator behind `extend`; it copies the history's maps once per call (the facts,
    which only grow, are added to the base's at the end instead)."""

    def __init__(self, base: RunHistory) -> None:
        self.head = base.head_seq
        self.started = base.started
        self.completed = dict(base.completed_steps)
        self.checkpoint = base.last_checkpoint
        self.last_attempt = dict(base.last_attempt)
        self.last_failure = dict(base.last_failure)
        self.open = dict(base.open_attempts)
        self.facts = base.facts
        self.new_facts: list[FactRecorded] = []
        self.waiting = dict(base.waiting)
        self.parked = base.parked
        self.signal_waits = dict(base.signal_waits)
        self.terminal = base.terminal
        self.corrupt = base.corrupt
        self.corrupt_seq = base.corrupt_seq

    def fold(self, events: Iterable[KernelEvent]) -> RunHistory:
        for event in events:
            self.head += 1
            if self.terminal is not None:
                continue
            if self.corrupt is None or isinstance(event, RunCompleted):
                self.apply(event)
        return build(  # every field, without the frozen __init__: a history is built per decision
            RunHistory,
            head_seq=self.head,
            started=self.started,
            completed_steps=self.completed,
            last_checkpoint=self.checkpoint,
            last_attempt=self.last_attempt,
            last_failure=self.last_failure,
            open_attempts=self.open,
            facts=self.facts.adding(self.new_facts) if self.new_facts else self.facts,
            waiting=self.waiting,
            parked=self.parked,
            signal_waits=self.signal_waits,
            terminal=self.terminal,
            corrupt=self.corrupt,
            corrupt_seq=self.corrupt_seq,
        )

    def apply(self, event: KernelEvent) -> None:
        match event:
            case RunStarted():
                if self.started is None:
                    self.started = event
                    self.checkpoint = event.initial_snapshot_id
            case StepAttemptStarted():
                self.open[event.step_id] = OpenAttempt(event.step_id, event.attempt, event.base_snapshot_id)
                self.waiting.pop(event.step_id, None)
                self.last_attempt[event.step_id] = max(
                    event.attempt, self.last_attempt.get(event.step_id, -1)
                )
            case FactRecorded():
                self.new_facts.append(event)
            case SignalAwaited():
                self.signal_waits[event.fact_key] = event
            case StepAttemptFailed():
                base = self._base_of(event.step_id, event.attempt)
                self.last_failure[event.step_id] = StepFailure(event.attempt, base, event.error, event.at_us)
                self.last_attempt[event.step_id] = max(
                    event.attempt, self.last_attempt.get(event.step_id, -1)
                )
                self._close(event.step_id)
            case StepCompleted():
                self.completed[event.step_id] = event.snapshot_id
                self.checkpoint = event.snapshot_id
                self.last_attempt[event.step_id] = max(
                    event.attempt, self.last_attempt.get(event.step_id, -1)
                )
                self._close(event.step_id)
            case StepWaiting():
                opened = self.open.get(event.step_id)
                if opened is not None and opened.attempt == event.attempt:
                    self.waiting[event.step_id] = WaitingAttempt(
                        event.step_id, event.attempt, opened.base_snapshot_id, event.wait, event.at_us
                    )
            case RunParked():
                self.parked = event
            case RunResumed():
                self.parked = None
            case RunCompleted():
                self.terminal = event
                self.open = {}
                self.waiting = {}
                self.parked = None
            case CorruptEvent():
                self.corrupt = event
                self.corrupt_seq = self.head

    def _base_of(self, step_id: str, attempt: int) -> str:
        opened = self.open.get(step_id)
        if opened is not None and opened.attempt == attempt:
            return opened.base_snapshot_id
        return self.checkpoint

    def _close(self, step_id: str) -> None:
        self.open.pop(step_id, None)
        self.waiting.pop(step_id, None)
