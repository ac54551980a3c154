"""Property tests of the pure core: fold, next_action, plans, backoff, secrets, canonical JSON."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_service.domain import (
    COMPLETED,
    FAILED,
    AlreadyTerminal,
    CompleteRun,
    ErrorRecord,
    FactRecorded,
    KernelEvent,
    OpRegistry,
    PipelineSpec,
    RetryPolicy,
    RunCompleted,
    RunConfig,
    RunStarted,
    RunStep,
    StepAttemptFailed,
    StepAttemptStarted,
    StepCompleted,
    StepSpec,
    canonical_json_bytes,
    decode_event,
    encode_event,
    fold,
    looks_like_secret,
    next_action,
    resolve_plan,
)
from engine_service.domain.ops import OpDefinition
from engine_service.domain.plan import Plan, topological_order
from keel_core.errors import KeelError


async def _noop(ctx: Any, config: Any, data: Any) -> Any:
    return None


def _catalog(*ops: str) -> OpRegistry:
    registry = OpRegistry()
    for op_id in ops:
        registry.register(OpDefinition(op_id, "1", "", _noop))
    return registry


@st.composite
def dags(draw: st.DrawFn) -> Plan:
    """A random acyclic pipeline of 1..6 steps, declared in a random order."""
    n = draw(st.integers(1, 6))
    names = [f"s{i}" for i in range(n)]
    steps = []
    for i, name in enumerate(names):
        deps = draw(st.lists(st.sampled_from(names[:i]), unique=True)) if i else []
        steps.append(StepSpec(name, "noop", "1", None, tuple(deps)))
    shuffled = draw(st.permutations(steps))
    return resolve_plan(PipelineSpec("p", "1", tuple(shuffled)), _catalog("noop"))


OUTCOMES = st.sampled_from(["ok", "retryable", "fatal", "crash", "crash_after_start"])


def _simulate(plan: Plan, max_attempts: int, outcomes: list[str]) -> tuple[list[KernelEvent], list[Any]]:
    """Drive a run through next_action, taking step outcomes from `outcomes` (then all `ok`)."""
    config = RunConfig(retry_policy=RetryPolicy(max_attempts=max_attempts, initial_backoff_ms=10))
    events: list[KernelEvent] = [RunStarted("p", "sha256:m", "snap0")]
    actions: list[Any] = []
    feed = iter(outcomes)
    for _ in range(500):
        action = next_action(fold(events), plan, config)
        actions.append(action)
        match action:
            case AlreadyTerminal():
                return events, actions
            case CompleteRun():
                events.append(
                    RunCompleted(action.status, action.final_snapshot_id, action.reason, action.error)
                )
            case RunStep(step_id=step, attempt=attempt, base_snapshot_id=base):
                outcome = next(feed, "ok")
                if outcome == "crash":
                    continue  # died before StepAttemptStarted was durable: nothing recorded
                events.append(StepAttemptStarted(step, attempt, base))
                if outcome == "crash_after_start":
                    continue
                if outcome == "ok":
                    events.append(StepCompleted(step, attempt, f"snap-{step}"))
                else:
                    error = ErrorRecord("boom", "op", outcome == "retryable", "boom")
                    events.append(StepAttemptFailed(step, attempt, error))
    raise AssertionError("the run did not terminate")


@settings(max_examples=300, deadline=None)
@given(plan=dags(), max_attempts=st.integers(1, 4), outcomes=st.lists(OUTCOMES, max_size=30))
def test_driving_next_action_terminates_with_each_step_completed_once_in_plan_order(
    plan: Plan, max_attempts: int, outcomes: list[str]
) -> None:
    events, _ = _simulate(plan, max_attempts, outcomes)
    history = fold(events)
    assert history.terminal is not None
    assert isinstance(events[-1], RunCompleted)
    completed = [e.step_id for e in events if isinstance(e, StepCompleted)]
    assert len(completed) == len(set(completed))
    assert completed == list(plan.step_ids[: len(completed)])
    if history.terminal.status == COMPLETED:
        assert completed == list(plan.step_ids)
        assert history.terminal.final_snapshot_id == f"snap-{plan.step_ids[-1]}"
    else:
        assert history.terminal.status == FAILED
        failed_step = plan.step_ids[len(completed)]
        failures = [e for e in events if isinstance(e, StepAttemptFailed) and e.step_id == failed_step]
        last = failures[-1]
        assert (not last.error.retryable) or last.attempt + 1 >= max_attempts
        assert history.terminal.error == last.error


@settings(max_examples=300, deadline=None)
@given(plan=dags(), max_attempts=st.integers(1, 4), outcomes=st.lists(OUTCOMES, max_size=30))
def test_attempt_numbers_of_a_step_strictly_increase_from_zero(
    plan: Plan, max_attempts: int, outcomes: list[str]
) -> None:
    events, _ = _simulate(plan, max_attempts, outcomes)
    for step in plan.step_ids:
        attempts = [e.attempt for e in events if isinstance(e, StepAttemptStarted) and e.step_id == step]
        assert attempts == sorted(set(attempts))
        if attempts:
            assert attempts[0] >= 0


@settings(max_examples=200, deadline=None)
@given(
    plan=dags(),
    max_attempts=st.integers(1, 4),
    outcomes=st.lists(OUTCOMES, max_size=20),
    cut=st.integers(0, 60),
)
def test_fold_of_a_prefix_extended_by_the_rest_equals_the_fold_of_the_whole(
    plan: Plan, max_attempts: int, outcomes: list[str], cut: int
) -> None:
    events, _ = _simulate(plan, max_attempts, outcomes)
    cut = min(cut, len(events))
    assert fold(events[:cut]).extend(events[cut:]) == fold(events)


@settings(max_examples=200, deadline=None)
@given(
    plan=dags(),
    max_attempts=st.integers(1, 4),
    outcomes=st.lists(OUTCOMES, max_size=20),
    cut=st.integers(1, 60),
)
def test_next_action_on_any_prefix_never_reruns_a_completed_step(
    plan: Plan, max_attempts: int, outcomes: list[str], cut: int
) -> None:
    events, _ = _simulate(plan, max_attempts, outcomes)
    prefix = events[: min(cut, len(events))]
    history = fold(prefix)
    config = RunConfig(retry_policy=RetryPolicy(max_attempts=max_attempts))
    action = next_action(history, plan, config)
    if isinstance(action, RunStep):
        assert action.step_id not in history.completed_steps
        assert action.attempt > history.last_attempt.get(action.step_id, -1)


def test_terminal_run_is_left_alone() -> None:
    plan = resolve_plan(PipelineSpec("p", "1", (StepSpec("a", "noop"),)), _catalog("noop"))
    terminal = RunCompleted(COMPLETED, "snapA")
    events: list[KernelEvent] = [RunStarted("p", "m", "s0"), StepCompleted("a", 0, "snapA"), terminal]
    assert next_action(fold(events), plan, RunConfig()) == AlreadyTerminal(terminal)
    # Events after the terminal one never change the history.
    later = fold([*events, StepAttemptStarted("a", 5, "x")])
    assert later.terminal == terminal and later.open_attempt is None


def test_resume_after_orphan_attempt_reruns_from_base_snapshot() -> None:
    plan = resolve_plan(
        PipelineSpec("p", "1", (StepSpec("a", "noop"), StepSpec("b", "noop", depends_on=("a",)))),
        _catalog("noop"),
    )
    events: list[KernelEvent] = [
        RunStarted("p", "m", "s0"),
        StepAttemptStarted("a", 0, "s0"),
        StepCompleted("a", 0, "sA"),
        StepAttemptStarted("b", 0, "sA"),
        FactRecorded("b", 0, "k", "ns", {"x": 1}),
    ]
    history = fold(events)
    assert history.open_attempt is not None
    assert next_action(history, plan, RunConfig()) == RunStep("b", 1, "sA")
    assert history.facts["k"].response == {"x": 1}


def test_exhausted_retries_fail_the_run_with_the_last_error() -> None:
    plan = resolve_plan(PipelineSpec("p", "1", (StepSpec("a", "noop"),)), _catalog("noop"))
    error = ErrorRecord("boom", "op", True, "it broke")
    events: list[KernelEvent] = [RunStarted("p", "m", "s0")]
    for attempt in range(2):
        events += [StepAttemptStarted("a", attempt, "s0"), StepAttemptFailed("a", attempt, error)]
    config = RunConfig(retry_policy=RetryPolicy(max_attempts=2))
    action = next_action(fold(events), plan, config)
    assert isinstance(action, CompleteRun) and action.status == FAILED and action.error == error
    config3 = RunConfig(retry_policy=RetryPolicy(max_attempts=3, initial_backoff_ms=100, multiplier=2))
    assert next_action(fold(events), plan, config3) == RunStep("a", 2, "s0", 200)


def test_non_retryable_failure_fails_the_run_at_once() -> None:
    plan = resolve_plan(PipelineSpec("p", "1", (StepSpec("a", "noop"),)), _catalog("noop"))
    error = ErrorRecord("bad", "op", False, "no")
    events: list[KernelEvent] = [RunStarted("p", "m", "s0"), StepAttemptStarted("a", 0, "s0")]
    events.append(StepAttemptFailed("a", 0, error))
    action = next_action(fold(events), plan, RunConfig(retry_policy=RetryPolicy(max_attempts=10)))
    assert isinstance(action, CompleteRun) and action.status == FAILED


def test_no_events_is_run_not_found_and_op_id_mismatch_is_invalid_plan() -> None:
    plan = resolve_plan(PipelineSpec("p", "1", (StepSpec("a", "noop"),)), _catalog("noop"))
    with pytest.raises(KeelError) as caught:
        next_action(fold([]), plan, RunConfig())
    assert caught.value.code == "run_not_found"
    with pytest.raises(KeelError) as caught:
        next_action(fold([RunStarted("other", "m", "s0")]), plan, RunConfig())
    assert caught.value.code == "invalid_plan"


@given(st.integers(0, 40), st.integers(0, 1000), st.integers(0, 100_000), st.floats(1.0, 5.0))
def test_backoff_is_zero_first_then_grows_and_is_capped(
    attempt: int, initial: int, extra: int, mult: float
) -> None:
    policy = RetryPolicy(
        max_attempts=50, initial_backoff_ms=initial, max_backoff_ms=initial + extra, multiplier=mult
    )
    assert policy.backoff_ms(0) == 0
    if attempt >= 1:
        assert initial <= policy.backoff_ms(attempt) or policy.backoff_ms(attempt) == policy.max_backoff_ms
        assert policy.backoff_ms(attempt) <= policy.max_backoff_ms
        assert policy.backoff_ms(attempt + 1) >= policy.backoff_ms(attempt)


@pytest.mark.parametrize(
    ("steps", "culprit"),
    [
        ((StepSpec("a", "noop", depends_on=("b",)), StepSpec("b", "noop", depends_on=("a",))), "a"),
        ((StepSpec("a", "noop", depends_on=("zzz",)),), "a"),
        ((StepSpec("a", "noop"), StepSpec("a", "noop")), "a"),
        ((StepSpec("a", "noop"), StepSpec("b", "nope")), "b"),
        ((StepSpec("a", "noop", op_version="9"),), "a"),
        ((StepSpec("a", "noop", depends_on=("a",)),), "a"),
    ],
)
def test_bad_pipelines_are_invalid_plan_naming_the_step(steps: tuple[StepSpec, ...], culprit: str) -> None:
    with pytest.raises(KeelError) as caught:
        resolve_plan(PipelineSpec("p", "1", steps), _catalog("noop"))
    assert caught.value.code == "invalid_plan"
    assert caught.value.details["step_id"] == culprit
    assert culprit in caught.value.message


def test_topological_order_breaks_ties_by_declaration_order() -> None:
    steps = (
        StepSpec("c", "noop", depends_on=("a",)),
        StepSpec("b", "noop"),
        StepSpec("a", "noop"),
        StepSpec("d", "noop", depends_on=("b", "c")),
    )
    assert [s.step_id for s in topological_order(steps)] == ["b", "a", "c", "d"]


@settings(max_examples=100, deadline=None)
@given(plan=dags())
def test_topological_order_puts_dependencies_first(plan: Plan) -> None:
    seen: set[str] = set()
    for step in plan.steps:
        assert set(step.depends_on) <= seen
        seen.add(step.step_id)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(response=JSON, step=st.text(min_size=1, max_size=8), attempt=st.integers(0, 100))
def test_events_round_trip_through_their_encoding(response: Any, step: str, attempt: int) -> None:
    error = ErrorRecord("c", "op", True, "m", {"k": response})
    for event in (
        RunStarted("p", "sha256:m", "sha256:s", "parent", "key"),
        StepAttemptStarted(step, attempt, "sha256:b"),
        FactRecorded(step, attempt, "k", "ns", response),
        StepAttemptFailed(step, attempt, error),
        StepCompleted(step, attempt, "sha256:c"),
        RunCompleted(FAILED, "sha256:f", "why", error),
    ):
        assert decode_event(*encode_event(event)) == event


@given(data=st.dictionaries(st.text(max_size=5), JSON, max_size=5))
def test_canonical_json_ignores_key_order(data: dict[str, Any]) -> None:
    reordered = dict(reversed(list(data.items())))
    assert canonical_json_bytes(data) == canonical_json_bytes(reordered)
    assert b" " not in canonical_json_bytes({"a": [1, 2], "b": {"c": None}})


def test_event_readers_accept_unknown_fields_and_types() -> None:
    event = decode_event("StepCompleted", b'{"v":2,"step_id":"a","attempt":0,"snapshot_id":"s","new":1}')
    assert event == StepCompleted("a", 0, "s")
    assert fold([RunStarted("p", "m", "s0"), decode_event("ChildSpawned", b"{}")]).head_seq == 2


@pytest.mark.parametrize(
    "key",
    [
        "Authorization: Bearer abcdefghijklmnop",
        "password=hunter2",
        "api_key: 123",
        "sk-abcdefghijklmnopqrstuvwx",
        "AKIAABCDEFGHIJKLMNOP",
        "-----BEGIN RSA PRIVATE KEY-----",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    ],
)
def test_secret_looking_fact_keys_are_detected(key: str) -> None:
    assert looks_like_secret(key)


@pytest.mark.parametrize("key", ["fetch-user-42", "charge:order-7", "greeting", "password-reset-email:42"])
def test_ordinary_fact_keys_are_not_secrets(key: str) -> None:
    assert not looks_like_secret(key)
