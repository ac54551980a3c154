"""The chaos ledger's repeat classification and gap check, on hand-made ledgers (no processes)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.chaos.chaos_ops import append_line
from tests.chaos.ledger import (
    KILLED,
    OTHER,
    PAUSED,
    Execution,
    Fault,
    faults_near,
    read_ledger,
    repeats,
    stream_gap,
)

TTL = 2.0


def call(pid: int, at: float, key: str = "first-call-0", run: str = "r1") -> Execution:
    """An execution of `key` in `run` by `pid` at monotonic time `at`."""
    return Execution(run, key, "first", 0, pid, at, 1_000 + at)


def test_a_call_executed_once_is_no_repeat() -> None:
    assert repeats([call(1, 1.0), call(1, 2.0, key="first-call-1"), call(2, 3.0, run="r2")], [], TTL) == []


def test_a_repeat_after_its_executor_was_killed_is_explained() -> None:
    kill = Fault("kill", "engine", "engine-a.1", 1, 1.5, 2.0)
    [repeat] = repeats([call(1, 1.0), call(2, 4.0)], [kill], TTL)
    assert (repeat.before.pid, repeat.again.pid, repeat.cause) == (1, 2, KILLED)


def test_a_kill_before_the_call_or_after_the_repeat_or_of_another_pid_explains_nothing() -> None:
    faults = [
        Fault("kill", "engine", "engine-a.1", 1, 0.5, 0.9),
        Fault("kill", "engine", "engine-a.1", 1, 4.5, 5.0),
        Fault("kill", "store", "store-0.1", 3, 2.0, 2.5),
    ]
    [repeat] = repeats([call(1, 1.0), call(2, 4.0)], faults, TTL)
    assert repeat.cause == OTHER
    assert faults_near(repeat, faults, TTL) == faults[:1] + faults[2:]


def test_only_a_pause_longer_than_the_ttl_overlapping_the_call_explains_a_repeat() -> None:
    long_pause = Fault("pause", "engine", "engine-a.1", 1, 1.2, 1.2 + TTL + 0.1)
    [repeat] = repeats([call(1, 1.0), call(2, 4.0)], [long_pause], TTL)
    assert repeat.cause == PAUSED
    short_pause = Fault("pause", "engine", "engine-a.1", 1, 1.2, 1.2 + 0.85 * TTL)
    assert repeats([call(1, 1.0), call(2, 4.0)], [short_pause], TTL)[0].cause == OTHER
    # Paused and continued before it made the call: the pause cannot have cost it the answer.
    earlier = Fault("pause", "engine", "engine-a.1", 1, -3.0, 0.5)
    assert repeats([call(1, 1.0), call(2, 4.0)], [earlier], TTL)[0].cause == OTHER


def test_a_paused_engine_repeating_a_call_its_successor_made_is_other() -> None:
    # Issue 10 bug 4: engine 1 paused, engine 2 took over and called, engine 1 woke and called again.
    pause = Fault("pause", "engine", "engine-a.1", 1, 0.5, 0.5 + TTL + 1)
    [repeat] = repeats([call(2, 2.0), call(1, 3.6)], [pause], TTL)
    assert (repeat.before.pid, repeat.cause) == (2, OTHER)


def test_each_repeat_is_judged_against_the_execution_just_before_it() -> None:
    kill = Fault("kill", "engine", "engine-a.1", 1, 1.5, 2.0)
    found = repeats([call(3, 6.0), call(1, 1.0), call(2, 4.0)], [kill], TTL)
    assert [(r.before.pid, r.again.pid, r.cause) for r in found] == [(1, 2, KILLED), (2, 3, OTHER)]


def test_the_ledger_reads_back_what_the_transport_appended(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.jsonl")
    assert read_ledger(path) == []
    for execution in (call(1, 1.0), call(2, 2.0)):
        append_line(path, json.dumps(execution.__dict__))
    assert read_ledger(path) == [call(1, 1.0), call(2, 2.0)]


def test_stream_gap_names_the_first_missing_or_misplaced_seq() -> None:
    assert stream_gap([]) == stream_gap([1, 2, 3]) == ""
    assert stream_gap([1, 3]).startswith("seq 3 where 2 was expected")
    assert stream_gap([2]).startswith("seq 2 where 1 was expected")
