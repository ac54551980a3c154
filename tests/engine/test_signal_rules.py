"""The pure rules of signals (engine_service.domain.signals): which signal a wait consumes, what a
rerun's deadline is, what may be sent; property-tested where a rule is about every history."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine_service.domain import FactRecorded, StepAttemptFailed, StepAttemptStarted, fold
from engine_service.domain.events import (
    ErrorRecord,
    SignalAwaited,
    StepWaiting,
    decode_event,
    encode_event,
)
from engine_service.domain.signals import (
    SIGNAL_NAMESPACE,
    Signal,
    check_signal_id,
    check_signal_name,
    check_signal_payload,
    check_wait_timeout,
    consumed_signal_ids,
    decode_signal,
    encode_signal,
    next_signal,
    signal_park,
    signal_wait_outcome,
    start_signal_id,
    wait_deadline_us,
)
from keel_core.errors import KeelError

NAMES = st.sampled_from(["a", "b", "c"])


@given(sent=st.lists(NAMES, max_size=30), waits=st.lists(NAMES, max_size=30))
def test_waits_consume_each_signal_at_most_once_in_the_order_sent_per_name(
    sent: list[str], waits: list[str]
) -> None:
    inbox = [Signal(f"s{i}", name, i, inbox_seq=i + 1) for i, name in enumerate(sent)]
    facts: list[FactRecorded] = []
    got: dict[str, list[int]] = {}
    for index, name in enumerate(waits):
        signal = next_signal(inbox, consumed_signal_ids(facts), name)
        if signal is None:
            # Nothing left of that name: every signal of it was consumed already.
            assert got.get(name, []) == [s.payload for s in inbox if s.name == name]
            continue
        facts.append(FactRecorded("w", 0, f"wait-{index}", SIGNAL_NAMESPACE, signal.consumed_json()))
        got.setdefault(name, []).append(signal.payload)
    ids = [fact.response["signal_id"] for fact in facts]
    assert len(ids) == len(set(ids))
    for name, payloads in got.items():
        assert payloads == [s.payload for s in inbox if s.name == name][: len(payloads)]


def test_facts_of_other_namespaces_consume_nothing() -> None:
    inbox = [Signal("x", "go", 1, 1)]
    other = FactRecorded("w", 0, "k", "keel.echo", {"signal_id": "x"})
    assert next_signal(inbox, consumed_signal_ids([other]), "go") == inbox[0]


def test_a_signal_event_round_trips_and_foreign_events_are_not_signals() -> None:
    signal = Signal("id-1", "go", {"n": [1, "two"]}, at_us=5)
    kind, payload = encode_signal(signal)
    assert decode_signal(7, kind, json.loads(payload)) == Signal("id-1", "go", {"n": [1, "two"]}, 7, 5)
    assert decode_signal(1, "Other", {"signal_id": "a", "name": "b"}) is None
    assert decode_signal(1, kind, {"signal_id": 3, "name": "b"}) is None


def test_signal_awaited_round_trips_through_the_event_codec() -> None:
    event = SignalAwaited("w", 2, "w.signal", "go", deadline_us=99, at_us=10)
    assert decode_event(*encode_event(event)) == event
    forever = SignalAwaited("w", 0, "w.signal", "go")
    assert decode_event(*encode_event(forever)) == forever


def _history(*events: Any) -> Any:
    return fold([*events])


def test_a_rerun_after_a_crash_keeps_the_deadline_its_orphan_recorded() -> None:
    first = SignalAwaited("w", 0, "w.signal", "go", deadline_us=1_000)
    history = _history(StepAttemptStarted("w", 0, "base"), first, StepAttemptStarted("w", 1, "base"))
    assert wait_deadline_us(history, SignalAwaited("w", 1, "w.signal", "go", deadline_us=5_000)) == 1_000


def test_a_retry_after_a_failed_attempt_waits_afresh() -> None:
    first = SignalAwaited("w", 0, "w.signal", "go", deadline_us=1_000)
    timeout = ErrorRecord("signal_timeout", "failed_precondition", True, "no signal")
    history = _history(StepAttemptStarted("w", 0, "base"), first, StepAttemptFailed("w", 0, timeout))
    assert wait_deadline_us(history, SignalAwaited("w", 1, "w.signal", "go", deadline_us=5_000)) == 5_000


def test_another_name_under_the_same_key_waits_afresh() -> None:
    history = _history(StepAttemptStarted("w", 0, "b"), SignalAwaited("w", 0, "k", "go", deadline_us=1))
    assert wait_deadline_us(history, SignalAwaited("w", 1, "k", "stop", deadline_us=7)) == 7


@pytest.mark.parametrize("name", ["", "a b", "-x", "x" * 129, "é", "a\nb"])
def test_bad_signal_names_are_refused(name: str) -> None:
    with pytest.raises(KeelError) as refused:
        check_signal_name(name)
    assert refused.value.code == "invalid_signal"


@pytest.mark.parametrize("name", ["a", "approval", "order.42/approved", "x" * 128, "A:b@c-d_e"])
def test_good_signal_names_pass(name: str) -> None:
    assert check_signal_name(name) == name


@pytest.mark.parametrize(
    ("signal_id", "code"),
    [
        ("has space", "invalid_signal"),
        ("x" * 129, "invalid_signal"),
        ("ü", "invalid_signal"),
        ("password=hunter2hunter2", "secrets_detected"),
    ],
)
def test_bad_signal_ids_are_refused(signal_id: str, code: str) -> None:
    with pytest.raises(KeelError) as refused:
        check_signal_id(signal_id)
    assert refused.value.code == code
    assert signal_id not in refused.value.message


def test_payloads_are_json_within_the_size_limit() -> None:
    assert check_signal_payload({"ok": [1, 2.5, None]}) == {"ok": [1, 2.5, None]}
    with pytest.raises(KeelError) as large:
        check_signal_payload("x" * (256 * 1024))
    assert large.value.code == "signal_too_large"
    with pytest.raises(KeelError) as nan:
        check_signal_payload(float("nan"))
    assert nan.value.code == "invalid_json"


@pytest.mark.parametrize("timeout", [0, -1, True, "5", 1e12, float("nan")])
def test_bad_wait_timeouts_are_refused(timeout: Any) -> None:
    with pytest.raises(KeelError) as refused:
        check_wait_timeout(timeout, "timeout_seconds")
    assert refused.value.code == "op_config_invalid"


def test_start_signal_ids_follow_place_and_content() -> None:
    assert start_signal_id(0, "go", {"a": 1}) == start_signal_id(0, "go", {"a": 1})
    assert start_signal_id(0, "go", {"a": 1}) != start_signal_id(1, "go", {"a": 1})
    assert start_signal_id(0, "go", {"a": 1}) != start_signal_id(0, "go", {"a": 2})
    check_signal_id(start_signal_id(3, "go", None))


TIMEOUT = ErrorRecord("signal_timeout", "failed_precondition", True, "no signal")


@given(sent=st.lists(NAMES, max_size=20), waits=st.lists(NAMES, min_size=1, max_size=8))
def test_parked_waits_resolved_one_after_another_never_take_the_same_signal(
    sent: list[str], waits: list[str]
) -> None:
    inbox = [Signal(f"s{i}", name, i, inbox_seq=i + 1) for i, name in enumerate(sent)]
    started = [StepAttemptStarted(f"w{i}", 0, "base") for i in range(len(waits))]
    history = fold(started)
    for i, name in enumerate(waits):
        wait = signal_park(history, f"w{i}", 0, name, f"w{i}.signal", None, TIMEOUT, 1_000)
        assert wait.kind == "signal" and wait.until_us == 0 and wait.error is None
        history = history.extend([StepWaiting(f"w{i}", 0, wait)])
    for i, name in enumerate(waits):
        outcome = signal_wait_outcome(history, inbox, history.waiting[f"w{i}"])
        expected = next_signal(inbox, consumed_signal_ids(history.facts.values()), name)
        if expected is None:
            assert outcome is None
            continue
        assert outcome is not None and outcome.output == expected.payload
        [fact] = outcome.facts
        assert (fact.fact_key, fact.namespace, fact.response) == (
            f"w{i}.signal",
            SIGNAL_NAMESPACE,
            expected.consumed_json(),
        )
        history = history.extend(outcome.facts)  # what the driver records, with no await between
        again = signal_wait_outcome(history, inbox, history.waiting[f"w{i}"])
        assert again is not None and again.output == expected.payload and again.facts == ()
    ids = [f.response["signal_id"] for f in history.facts.values()]
    assert len(ids) == len(set(ids))


def test_a_parked_wait_records_its_deadline_and_keeps_an_orphans() -> None:
    history = fold([StepAttemptStarted("w", 0, "base")])
    wait = signal_park(history, "w", 0, "go", "w.signal", 2.5, TIMEOUT, 1_000_000)
    assert wait.until_us == 3_500_000 and wait.error == TIMEOUT
    assert wait.detail == {"name": "go", "fact_key": "w.signal", "timeout_seconds": 2.5}
    # An attempt that waited in its coroutine (a stream written before waits parked) and died.
    history = history.extend([SignalAwaited("w", 0, "w.signal", "go", 2_000_000)])
    history = history.extend([StepAttemptStarted("w", 1, "base")])
    assert signal_park(history, "w", 1, "go", "w.signal", 2.5, TIMEOUT, 9_000_000).until_us == 2_000_000


def test_a_parked_wait_whose_key_holds_another_call_fails() -> None:
    history = fold([StepAttemptStarted("w", 0, "base"), FactRecorded("w", 0, "w.signal", "keel.echo", {})])
    wait = signal_park(history, "w", 0, "go", "w.signal", None, TIMEOUT, 1)
    history = history.extend([StepWaiting("w", 0, wait)])
    outcome = signal_wait_outcome(history, [Signal("x", "go", 1, 1)], history.waiting["w"])
    assert outcome is not None and outcome.error is not None and outcome.error.code == "fact_key_conflict"
