"""The chaos ledger's repeat classification and gap check, on hand-made ledgers (no processes)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.chaos.chaos_ops import append_line
from tests.chaos.ledger import (
    CUT_OFF,
    KILLED,
    OTHER,
    PAUSED,
    Context,
    Execution,
    Fault,
    Takeover,
    faults_near,
    read_ledger,
    repeats,
    store_outages,
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


def test_a_repeat_after_a_store_kill_and_a_takeover_of_the_lapsed_lease_is_a_cut_off() -> None:
    # The run seen in bench/chaos.py seed 12: the store died right after the call, the executor's
    # implicit lease ran out meanwhile, the other engine took the run over and called again.
    store_kill = Fault("kill", "store", "store-0.1", 9, 1.02, 2.7)
    expired = Takeover("r1", 3.04, "", "its implicit lease expired")
    context = Context([expired], stores=1, engine_ids={1: "engine-b.2", 2: "engine-a.1"})
    [repeat] = repeats([call(1, 1.0), call(2, 3.4)], [store_kill], TTL, context)
    assert repeat.cause == CUT_OFF
    heartbeat = Takeover("r1", 3.04, "engine-b.2", "its engine's heartbeat expired")
    named = Context([heartbeat], 1, {1: "engine-b.2"})
    assert repeats([call(1, 1.0), call(2, 3.4)], [store_kill], TTL, named)[0].cause == CUT_OFF


def test_a_store_fault_without_a_takeover_of_an_expired_lease_is_other() -> None:
    store_kill = Fault("kill", "store", "store-0.1", 9, 1.02, 2.7)
    executions = [call(1, 1.0), call(2, 3.4)]
    assert repeats(executions, [store_kill], TTL, Context([], 1, {1: "engine-b.2"}))[0].cause == OTHER
    released = Takeover("r1", 3.04, "engine-b.2", "it was released")
    other_run = Takeover("r2", 3.04, "", "its implicit lease expired")
    from_another = Takeover("r1", 3.04, "engine-c.1", "it expired")
    after_repeat = Takeover("r1", 3.5, "", "its implicit lease expired")
    for takeover in (released, other_run, from_another, after_repeat):
        context = Context([takeover], 1, {1: "engine-b.2"})
        assert repeats(executions, [store_kill], TTL, context)[0].cause == OTHER, takeover


def test_a_takeover_of_an_expired_lease_without_a_store_outage_is_other() -> None:
    expired = Context([Takeover("r1", 3.04, "", "its implicit lease expired")], 1, {1: "engine-b.2"})
    executions = [call(1, 1.0), call(2, 3.4)]
    assert repeats(executions, [], TTL, expired)[0].cause == OTHER
    # A store fault over before the call, or begun only after the takeover, cut nothing off.
    early = Fault("kill", "store", "store-0.1", 9, 0.2, 0.9)
    late = Fault("pause", "store", "store-0.2", 9, 3.1, 3.3)
    assert repeats(executions, [early, late], TTL, expired)[0].cause == OTHER
    # A fault of another engine is no store outage.
    engine = Fault("pause", "engine", "engine-a.1", 2, 1.1, 2.5)
    assert repeats(executions, [engine], TTL, expired)[0].cause == OTHER


def test_with_replicas_only_all_of_them_down_at_once_cuts_an_engine_off() -> None:
    expired = Context([Takeover("r1", 3.04, "", "its implicit lease expired")], 2, {1: "engine-b.2"})
    executions = [call(1, 1.0), call(2, 3.4)]
    one = Fault("kill", "store", "store-0.1", 9, 1.02, 2.7)
    assert repeats(executions, [one], TTL, expired)[0].cause == OTHER
    other = Fault("pause", "store", "store-1.1", 8, 2.0, 2.9)
    assert store_outages([one, other], 2) == [(2.0, 2.7)]
    assert repeats(executions, [one, other], TTL, expired)[0].cause == CUT_OFF


def test_a_cut_off_executor_that_was_also_paused_or_killed_is_not_a_cut_off() -> None:
    store_kill = Fault("kill", "store", "store-0.1", 9, 1.02, 2.7)
    expired = Context([Takeover("r1", 3.04, "", "its implicit lease expired")], 1, {1: "engine-b.2"})
    executions = [call(1, 1.0), call(2, 3.4)]
    short_pause = Fault("pause", "engine", "engine-b.2", 1, 1.1, 1.1 + 0.4 * TTL)
    assert repeats(executions, [store_kill, short_pause], TTL, expired)[0].cause == OTHER
    kill = Fault("kill", "engine", "engine-b.2", 1, 2.9, 3.0)
    assert repeats(executions, [store_kill, kill], TTL, expired)[0].cause == KILLED


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
