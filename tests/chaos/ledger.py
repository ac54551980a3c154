"""Reading the chaos ledger and deciding why a call was executed more than once (pure functions).

A repeat is a ledger entry for a (run, fact key) that an earlier entry already holds. Its cause is
judged from the process that made the earlier execution and the faults the chaos loop recorded:

- `executor killed`: that pid was SIGKILLed after its call began and before the repeat began;
- `executor paused past its lease`: that pid was SIGSTOPped for longer than the lease ttl, the
  pause overlapping the time from its call to the repeat;
- `executor cut off past its lease`: the executor itself was neither killed nor paused from its
  call to the repeat, but the store was out of its reach (every store replica killed or paused at
  once: with one store that store, with replicas all of them, since the store client fails over
  per call and the logs cannot tell which replica an engine was using), the outage beginning
  before an engine logged taking the run over because its lease had expired or lapsed (from the
  executor or from the run's creator), that takeover falling between the call and the repeat;
- `other`: none of these. The promise (issue 10) is that these do not happen.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

KILLED = "executor killed"
PAUSED = "executor paused past its lease"
CUT_OFF = "executor cut off past its lease"
OTHER = "other"
CAUSES = (KILLED, PAUSED, CUT_OFF, OTHER)
EXPIRY_WORDS = ("expired", "lapsed")


@dataclass(frozen=True)
class Execution:
    """One ledger line: a transport call as the engine process `pid` made it."""

    run: str
    key: str
    step: str
    attempt: int
    pid: int
    mono: float
    wall: float


@dataclass(frozen=True)
class Fault:
    """What the chaos loop did to one process: `kill` (SIGKILL) or `pause` (SIGSTOP ... SIGCONT).

    `start` and `end` are monotonic times: for a kill, the SIGKILL and the restarted process's
    banner; for a pause, the SIGSTOP and the SIGCONT.
    """

    kind: str
    role: str
    name: str
    pid: int
    start: float
    end: float

    @property
    def length(self) -> float:
        """How long the process was down or stopped."""
        return self.end - self.start


@dataclass(frozen=True)
class Takeover:
    """An engine's log line "took over run `run` from `previous` (`why`)" at monotonic time `mono`.

    `previous` is the engine id the lease was taken from, '' when it was the run's creator's
    implicit lease.
    """

    run: str
    mono: float
    previous: str
    why: str

    @property
    def expired(self) -> bool:
        """Whether the lease was taken because it expired or lapsed (not released, say)."""
        return any(word in self.why for word in EXPIRY_WORDS)


@dataclass(frozen=True)
class Context:
    """What besides the faults judges a repeat: the logged takeovers, how many store replicas
    there are, and the engine id of each engine pid."""

    takeovers: Sequence[Takeover] = ()
    stores: int = 1
    engine_ids: Mapping[int, str] | None = None


@dataclass(frozen=True)
class Repeat:
    """An execution (`again`) of a call that `before` had executed already, and why."""

    before: Execution
    again: Execution
    cause: str


def read_ledger(path: str) -> list[Execution]:
    """Every execution in the ledger, in the order they were appended."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as ledger:
        return [Execution(**json.loads(line)) for line in ledger if line.strip()]


def repeats(
    executions: list[Execution], faults: list[Fault], lease_ttl: float, context: Context | None = None
) -> list[Repeat]:
    """Each execution of a call after its first, with the cause judged from the one just before it."""
    context = context or Context()
    by_call: dict[tuple[str, str], list[Execution]] = collections.defaultdict(list)
    for execution in executions:
        by_call[(execution.run, execution.key)].append(execution)
    found = []
    for calls in by_call.values():
        ordered = sorted(calls, key=lambda e: e.mono)
        for before, again in itertools.pairwise(ordered):
            found.append(Repeat(before, again, cause_of(before, again, faults, lease_ttl, context)))
    return sorted(found, key=lambda r: r.again.mono)


def cause_of(
    before: Execution, again: Execution, faults: list[Fault], lease_ttl: float, context: Context | None = None
) -> str:
    """Why `again` executed a call `before` had executed: see the module docstring."""
    mine = [f for f in faults if f.pid == before.pid]
    if any(f.kind == "kill" and before.mono <= f.start <= again.mono for f in mine):
        return KILLED
    if any(
        f.kind == "pause" and f.length > lease_ttl and f.start <= again.mono and f.end >= before.mono
        for f in mine
    ):
        return PAUSED
    if _cut_off(before, again, faults, context or Context()):
        return CUT_OFF
    return OTHER


def _cut_off(before: Execution, again: Execution, faults: list[Fault], context: Context) -> bool:
    if any(f.pid == before.pid and f.start <= again.mono and f.end >= before.mono for f in faults):
        return False  # any fault of the executor itself in between: not a store's doing alone
    executor = (context.engine_ids or {}).get(before.pid)
    handed = [
        t
        for t in context.takeovers
        if t.run == before.run
        and t.expired
        and before.mono <= t.mono <= again.mono
        and (t.previous == "" or t.previous == executor)
    ]
    outages = store_outages(faults, context.stores)
    return any(start <= t.mono and end >= before.mono for t in handed for start, end in outages)


def store_outages(faults: list[Fault], stores: int) -> list[tuple[float, float]]:
    """The (start, end) spans during which all `stores` store services were killed or paused at once."""
    mine = [f for f in faults if f.role == "store"]
    points = sorted({t for f in mine for t in (f.start, f.end)})
    spans: list[tuple[float, float]] = []
    for low, high in itertools.pairwise(points):
        middle = (low + high) / 2
        down = {_service(f.name) for f in mine if f.start <= middle <= f.end}
        if len(down) < stores:
            continue
        if spans and spans[-1][1] == low:
            spans[-1] = (spans[-1][0], high)
        else:
            spans.append((low, high))
    return spans


def _service(name: str) -> str:
    """The service of a process name `<service>.<incarnation>`."""
    return name.rsplit(".", 1)[0]


def faults_near(repeat: Repeat, faults: list[Fault], lease_ttl: float) -> list[Fault]:
    """The faults from two ttls before the first execution until the repeat: what to look at first."""
    low, high = repeat.before.mono - 2 * lease_ttl, repeat.again.mono
    return [f for f in faults if f.end >= low and f.start <= high]


def stream_gap(seqs: list[int]) -> str:
    """'' when `seqs` is 1..n in order, else a description of the first place it is not."""
    for expected, seq in enumerate(seqs, start=1):
        if seq != expected:
            return f"seq {seq} where {expected} was expected"
    return ""
