"""Reading the chaos ledger and deciding why a call was executed more than once (pure functions).

A repeat is a ledger entry for a (run, fact key) that an earlier entry already holds. Its cause is
judged from the process that made the earlier execution and the faults the chaos loop recorded:

- `executor killed`: that pid was SIGKILLed after its call began and before the repeat began;
- `executor paused past its lease`: that pid was SIGSTOPped for longer than the lease ttl, the
  pause overlapping the time from its call to the repeat;
- `other`: neither. The promise (issue 10) is that these do not happen.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
from dataclasses import dataclass

KILLED = "executor killed"
PAUSED = "executor paused past its lease"
OTHER = "other"
CAUSES = (KILLED, PAUSED, OTHER)


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


def repeats(executions: list[Execution], faults: list[Fault], lease_ttl: float) -> list[Repeat]:
    """Each execution of a call after its first, with the cause judged from the one just before it."""
    by_call: dict[tuple[str, str], list[Execution]] = collections.defaultdict(list)
    for execution in executions:
        by_call[(execution.run, execution.key)].append(execution)
    found = []
    for calls in by_call.values():
        ordered = sorted(calls, key=lambda e: e.mono)
        for before, again in itertools.pairwise(ordered):
            found.append(Repeat(before, again, cause_of(before, again, faults, lease_ttl)))
    return sorted(found, key=lambda r: r.again.mono)


def cause_of(before: Execution, again: Execution, faults: list[Fault], lease_ttl: float) -> str:
    """Why `again` executed a call `before` had executed: see the module docstring."""
    mine = [f for f in faults if f.pid == before.pid]
    if any(f.kind == "kill" and before.mono <= f.start <= again.mono for f in mine):
        return KILLED
    if any(
        f.kind == "pause" and f.length > lease_ttl and f.start <= again.mono and f.end >= before.mono
        for f in mine
    ):
        return PAUSED
    return OTHER


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
