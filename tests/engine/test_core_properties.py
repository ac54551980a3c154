"""Property tests of the pure core: fold, next_action, plans, backoff, secrets, canonical JSON."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
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
    RunSteps,
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
    step_context,
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


OUTCOMES = st.sampled_from(["ok", "ok", "retryable", "fatal", "crash"])


class Simulation:
    """A run driven through next_action like the driver does: every ready step starts at once.

    Which running step settles next comes from `picks`, how from `outcomes` (then all `ok`);
    `crash` kills the engine: every attempt in flight is left open (an orphan).
    """

    def __init__(self, plan: Plan, max_attempts: int, outcomes: list[str], picks: list[int]) -> None:
        self.plan = plan
        self.config = RunConfig(retry_policy=RetryPolicy(max_attempts=max_attempts, initial_backoff_ms=10))
        self.events: list[KernelEvent] = [RunStarted("p", "sha256:m", "snap0")]
        self.actions: list[Any] = []
        self.running: dict[str, RunStep] = {}
        self.crashes: list[tuple[dict[str, RunStep], Any]] = []  # in flight at a crash, the next action
        self.most_in_flight = 0
        self._outcomes = iter(outcomes)
        self._picks = iter(picks)

    def run(self) -> Simulation:
        for _ in range(1000):
            action = next_action(fold(self.events), self.plan, self.config, frozenset(self.running))
            self.actions.append(action)
            if self.crashes and self.crashes[-1][1] is None:
                self.crashes[-1] = (self.crashes[-1][0], action)
            match action:
                case AlreadyTerminal():
                    return self
                case CompleteRun() if self.running:
                    self.running.clear()  # the driver stops the other branches first
                case CompleteRun():
                    why = ErrorRecord("branch_canceled", "cancelled", False, "canceled")
                    self.events += [StepAttemptFailed(a.step_id, a.attempt, why) for a in action.cancel]
                    self.events.append(
                        RunCompleted(action.status, action.final_snapshot_id, action.reason, action.error)
                    )
                case RunSteps(steps=steps):
                    for step in steps:
                        started = StepAttemptStarted(step.step_id, step.attempt, step.base_snapshot_id)
                        self.events.append(started)
                        self.running[step.step_id] = step
                    self.most_in_flight = max(self.most_in_flight, len(self.running))
                    self._settle_one()
        raise AssertionError("the run did not terminate")

    def _settle_one(self) -> None:
        assert self.running, "the decision left nothing to run or wait for"
        step = list(self.running.values())[next(self._picks, 0) % len(self.running)]
        outcome = next(self._outcomes, "ok")
        if outcome == "crash":
            self.crashes.append((dict(self.running), None))
            self.running.clear()
            return
        del self.running[step.step_id]
        if outcome == "ok":
            self.events.append(StepCompleted(step.step_id, step.attempt, f"snap-{step.step_id}"))
        else:
            error = ErrorRecord("boom", "op", outcome == "retryable", "boom")
            self.events.append(StepAttemptFailed(step.step_id, step.attempt, error))


def _simulate(plan: Plan, max_attempts: int, outcomes: list[str], picks: list[int] = []) -> Simulation:  # noqa: B006
    return Simulation(plan, max_attempts, outcomes, picks).run()


PICKS = st.lists(st.integers(0, 5), max_size=30)


@settings(max_examples=300, deadline=None)
@given(plan=dags(), max_attempts=st.integers(1, 4), outcomes=st.lists(OUTCOMES, max_size=30), picks=PICKS)
def test_driving_next_action_terminates_with_each_step_completed_once_after_its_dependencies(
    plan: Plan, max_attempts: int, outcomes: list[str], picks: list[int]
) -> None:
    events = _simulate(plan, max_attempts, outcomes, picks).events
    history = fold(events)
    assert history.terminal is not None
    assert isinstance(events[-1], RunCompleted)
    completed = [e.step_id for e in events if isinstance(e, StepCompleted)]
    assert len(completed) == len(set(completed))
    for step_id in completed:
        deps = plan.step(step_id).depends_on
        assert set(deps) <= set(completed[: completed.index(step_id)])
    if history.terminal.status == COMPLETED:
        assert sorted(completed) == sorted(plan.step_ids)
        assert not history.open_attempts
    else:
        assert history.terminal.status == FAILED
        assert history.terminal.error is not None and history.terminal.error.code == "boom"
        error = history.terminal.error
        last = [e for e in events if isinstance(e, StepAttemptFailed) and e.error == error][-1]
        assert (not last.error.retryable) or last.attempt + 1 >= max_attempts
        assert not history.open_attempts  # every other branch was recorded as canceled


@settings(max_examples=300, deadline=None)
@given(plan=dags(), max_attempts=st.integers(1, 4), outcomes=st.lists(OUTCOMES, max_size=30), picks=PICKS)
def test_a_step_never_starts_before_its_dependencies_completed(
    plan: Plan, max_attempts: int, outcomes: list[str], picks: list[int]
) -> None:
    events = _simulate(plan, max_attempts, outcomes, picks).events
    done: set[str] = set()
    for event in events:
        if isinstance(event, StepAttemptStarted):
            assert set(plan.step(event.step_id).depends_on) <= done
            assert event.step_id not in done
        elif isinstance(event, StepCompleted):
            done.add(event.step_id)


@settings(max_examples=300, deadline=None)
@given(
    plan=dags(),
    max_parallel=st.integers(1, 3),
    outcomes=st.lists(OUTCOMES, max_size=30),
    picks=PICKS,
)
def test_never_more_than_max_parallel_attempts_in_flight(
    plan: Plan, max_parallel: int, outcomes: list[str], picks: list[int]
) -> None:
    limited = replace(plan, max_parallel=max_parallel)
    run = _simulate(limited, 3, outcomes, picks)
    assert run.most_in_flight <= max_parallel
    for cut in range(1, len(run.events) + 1):
        assert len(fold(run.events[:cut]).open_attempts) <= max_parallel


@settings(max_examples=300, deadline=None)
@given(plan=dags(), outcomes=st.lists(OUTCOMES, max_size=30), picks=PICKS)
def test_after_a_crash_every_orphan_attempt_is_resumed_as_attempt_plus_one_from_its_base(
    plan: Plan, outcomes: list[str], picks: list[int]
) -> None:
    run = _simulate(plan, 3, outcomes, picks)
    for in_flight, following in run.crashes:
        assert isinstance(following, RunSteps)  # no failure can be pending at a crash: none was exhausted
        resumed = {step.step_id: step for step in following.steps}
        for step_id, lost in in_flight.items():
            assert resumed[step_id] == RunStep(step_id, lost.attempt + 1, lost.base_snapshot_id)


@settings(max_examples=300, deadline=None)
@given(plan=dags(), max_attempts=st.integers(1, 4), outcomes=st.lists(OUTCOMES, max_size=30), picks=PICKS)
def test_attempt_numbers_of_a_step_strictly_increase_from_zero(
    plan: Plan, max_attempts: int, outcomes: list[str], picks: list[int]
) -> None:
    events = _simulate(plan, max_attempts, outcomes, picks).events
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
    picks=PICKS,
    cut=st.integers(0, 60),
)
def test_fold_of_a_prefix_extended_by_the_rest_equals_the_fold_of_the_whole(
    plan: Plan, max_attempts: int, outcomes: list[str], picks: list[int], cut: int
) -> None:
    events = _simulate(plan, max_attempts, outcomes, picks).events
    cut = min(cut, len(events))
    assert fold(events[:cut]).extend(events[cut:]) == fold(events)


def _first_recorded(events: list[KernelEvent]) -> dict[str, Any]:
    """The facts a history must show: the first response under each key, in recording order."""
    facts: dict[str, Any] = {}
    for event in events:
        if isinstance(event, FactRecorded):
            facts.setdefault(event.fact_key, event.response)
    return facts


@settings(max_examples=300, deadline=None)
@given(
    keys=st.lists(st.sampled_from("abcdefg"), max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=5),
    forks=st.lists(st.sampled_from("aefgh"), min_size=1, max_size=4),
)
def test_each_history_sees_the_first_fact_per_key_of_its_own_events_however_cut_or_forked(
    keys: list[str], cuts: list[int], forks: list[str]
) -> None:
    # Histories of one run share their facts' storage: extending one (even one that was extended
    # before, as a fork) must never show another's facts, nor hide its own.
    events: list[KernelEvent] = [RunStarted("p", "m", "s0")]
    events += [FactRecorded("s", 0, key, "ns", n) for n, key in enumerate(keys)]
    marks = sorted({min(cut, len(events)) for cut in cuts} | {0, len(events)})
    histories = [fold([])]
    for start, end in itertools.pairwise(marks):
        histories.append(histories[-1].extend(events[start:end]))
    fork_events = [FactRecorded("t", 0, key, "ns", -1) for key in forks]
    forked = [history.extend(fork_events) for history in histories]
    for mark, history, fork in zip(marks, histories, forked, strict=True):
        own = _first_recorded(events[:mark])
        assert {key: fact.response for key, fact in history.facts.items()} == own
        assert list(history.facts) == list(own) and len(history.facts) == len(own)
        for key in forks:  # a fork's facts stay its own
            assert (key in history.facts) == (key in own)
            assert (
                history.facts.get(key) is None if key not in own else history.facts[key].response == own[key]
            )
        with_fork = _first_recorded([*events[:mark], *fork_events])
        assert {key: fact.response for key, fact in fork.facts.items()} == with_fork
    assert histories[-1] == fold(events)


def test_a_historys_facts_can_be_walked_while_later_histories_are_made_from_it() -> None:
    history = fold(
        [RunStarted("p", "m", "s0"), FactRecorded("s", 0, "a", "ns", 1), FactRecorded("s", 0, "b", "ns", 2)]
    )
    latest, walked = history, []
    for key in history.facts:  # the newest history's storage grows meanwhile
        walked.append(key)
        latest = latest.extend([FactRecorded("s", 0, f"later-{key}", "ns", 3)])
    assert walked == ["a", "b"]
    assert list(latest.facts) == ["a", "b", "later-a", "later-b"]


@settings(max_examples=200, deadline=None)
@given(
    plan=dags(),
    max_attempts=st.integers(1, 4),
    outcomes=st.lists(OUTCOMES, max_size=20),
    picks=PICKS,
    cut=st.integers(1, 60),
)
def test_next_action_on_any_prefix_never_reruns_a_completed_step(
    plan: Plan, max_attempts: int, outcomes: list[str], picks: list[int], cut: int
) -> None:
    events = _simulate(plan, max_attempts, outcomes, picks).events
    prefix = events[: min(cut, len(events))]
    history = fold(prefix)
    config = RunConfig(retry_policy=RetryPolicy(max_attempts=max_attempts))
    action = next_action(history, plan, config)
    if isinstance(action, RunSteps):
        for step in action.steps:
            assert step.step_id not in history.completed_steps
            assert step.attempt > history.last_attempt.get(step.step_id, -1)


def test_terminal_run_is_left_alone() -> None:
    plan = resolve_plan(PipelineSpec("p", "1", (StepSpec("a", "noop"),)), _catalog("noop"))
    terminal = RunCompleted(COMPLETED, "snapA")
    events: list[KernelEvent] = [RunStarted("p", "m", "s0"), StepCompleted("a", 0, "snapA"), terminal]
    assert next_action(fold(events), plan, RunConfig()) == AlreadyTerminal(terminal)
    # Events after the terminal one never change the history.
    later = fold([*events, StepAttemptStarted("a", 5, "x")])
    assert later.terminal == terminal and not later.open_attempts


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
    assert set(history.open_attempts) == {"b"}
    assert next_action(history, plan, RunConfig()) == RunSteps((RunStep("b", 1, "sA"),))
    assert history.facts["k"].response == {"x": 1}


def _fork_plan(max_parallel: int = 0) -> Plan:
    """a and b independent; c depends on both."""
    steps = (StepSpec("a", "noop"), StepSpec("b", "noop"), StepSpec("c", "noop", depends_on=("a", "b")))
    return resolve_plan(PipelineSpec("p", "1", steps, max_parallel), _catalog("noop"))


def test_independent_steps_are_ready_together_and_a_join_waits_for_both() -> None:
    plan = _fork_plan()
    started: list[KernelEvent] = [RunStarted("p", "m", "s0")]
    both_ready = RunSteps((RunStep("a", 0, "s0"), RunStep("b", 0, "s0")))
    assert next_action(fold(started), plan, RunConfig()) == both_ready
    running = [*started, StepAttemptStarted("a", 0, "s0"), StepAttemptStarted("b", 0, "s0")]
    assert next_action(fold(running), plan, RunConfig(), {"a", "b"}) == RunSteps(())
    one_done = [*running, StepCompleted("a", 0, "sA")]
    assert next_action(fold(one_done), plan, RunConfig(), {"b"}) == RunSteps(())
    both = [*one_done, StepCompleted("b", 0, "sAB")]
    assert next_action(fold(both), plan, RunConfig()) == RunSteps((RunStep("c", 0, "sAB"),))


def test_max_parallel_one_runs_one_ready_step_at_a_time() -> None:
    plan = _fork_plan(max_parallel=1)
    events: list[KernelEvent] = [RunStarted("p", "m", "s0")]
    assert next_action(fold(events), plan, RunConfig()) == RunSteps((RunStep("a", 0, "s0"),))
    events.append(StepAttemptStarted("a", 0, "s0"))
    assert next_action(fold(events), plan, RunConfig(), {"a"}) == RunSteps(())


def test_after_a_crash_both_orphan_branches_resume_as_attempt_plus_one_from_their_bases() -> None:
    events: list[KernelEvent] = [
        RunStarted("p", "m", "s0"),
        StepAttemptStarted("a", 0, "s0"),
        StepAttemptStarted("b", 0, "s0"),
        StepAttemptFailed("b", 0, ErrorRecord("boom", "op", True, "once")),
        StepAttemptStarted("b", 1, "s0"),
    ]
    history = fold(events)
    assert set(history.open_attempts) == {"a", "b"}
    action = next_action(history, _fork_plan(), RunConfig())
    assert action == RunSteps((RunStep("a", 1, "s0"), RunStep("b", 2, "s0")))


def test_a_branch_failing_for_good_fails_the_run_and_cancels_the_open_sibling() -> None:
    error = ErrorRecord("bad", "op", False, "no")
    events: list[KernelEvent] = [
        RunStarted("p", "m", "s0"),
        StepAttemptStarted("a", 0, "s0"),
        StepAttemptStarted("b", 0, "s0"),
        StepAttemptFailed("b", 0, error),
    ]
    action = next_action(fold(events), _fork_plan(), RunConfig(), {"a"})
    assert isinstance(action, CompleteRun) and action.status == FAILED and action.error == error
    assert [(open_.step_id, open_.attempt) for open_ in action.cancel] == [("a", 0)]


def test_a_step_sees_the_initial_context_and_its_ancestors_only() -> None:
    steps = (
        StepSpec("a", "noop"),
        StepSpec("b", "noop"),
        StepSpec("c", "noop", depends_on=("a",)),
        StepSpec("d", "noop", depends_on=("c",)),
    )
    plan = resolve_plan(PipelineSpec("p", "1", steps), _catalog("noop"))
    assert plan.ancestors == {"a": set(), "b": set(), "c": {"a"}, "d": {"a", "c"}}
    initial = {"x": 1, "b": "initial"}
    checkpoint = {"x": 1, "b": "from b", "a": "from a", "c": "from c"}
    seen_by_d = {"x": 1, "b": "initial", "a": "from a", "c": "from c"}
    assert step_context(initial, checkpoint, plan.ancestors["d"]) == seen_by_d
    assert step_context(initial, checkpoint, plan.ancestors["b"]) == initial


def test_max_parallel_is_left_out_of_the_manifest_json_when_unset_and_negative_is_invalid() -> None:
    steps = (StepSpec("a", "noop"),)
    assert "max_parallel" not in PipelineSpec("p", "1", steps).to_json()
    assert PipelineSpec.from_json(PipelineSpec("p", "1", steps, 2).to_json()).max_parallel == 2
    with pytest.raises(KeelError) as caught:
        resolve_plan(PipelineSpec("p", "1", steps, -1), _catalog("noop"))
    assert caught.value.code == "invalid_plan" and "max_parallel" in caught.value.message


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
    assert next_action(fold(events), plan, config3) == RunSteps((RunStep("a", 2, "s0", 200),))


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
    pipeline = PipelineSpec("p", "1", steps)
    for _ in range(2):  # and again: a pipeline object keeps its order once found, never a refusal
        with pytest.raises(KeelError) as caught:
            resolve_plan(pipeline, _catalog("noop"))
        assert caught.value.code == "invalid_plan"
        assert caught.value.details["step_id"] == culprit
        assert culprit in caught.value.message


# Declared out of order, with ties: run in the order b, a, c, d.
TIED_STEPS = (
    StepSpec("c", "noop", depends_on=("a",)),
    StepSpec("b", "noop"),
    StepSpec("a", "noop"),
    StepSpec("d", "noop", depends_on=("b", "c")),
)


def test_a_pipeline_resolved_again_is_checked_again_against_the_ops() -> None:
    pipeline = PipelineSpec("p", "1", TIED_STEPS)
    first, again = (resolve_plan(pipeline, _catalog("noop")) for _ in range(2))
    assert again == first and again.steps is first.steps and again.ancestors is first.ancestors
    assert [s.step_id for s in again.steps] == ["b", "a", "c", "d"]
    assert again.ancestors == {
        "b": frozenset(),
        "a": frozenset(),
        "c": frozenset({"a"}),
        "d": frozenset({"a", "b", "c"}),
    }
    with pytest.raises(KeelError) as caught:  # its order is kept; the ops it names are asked each time
        resolve_plan(pipeline, _catalog("other"))
    assert caught.value.code == "invalid_plan" and caught.value.details["step_id"] == "c"


def test_topological_order_breaks_ties_by_declaration_order() -> None:
    assert [s.step_id for s in topological_order(TIED_STEPS)] == ["b", "a", "c", "d"]


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


@settings(max_examples=300, deadline=None)
@given(
    data=st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
        max_leaves=20,
    )
)
def test_canonical_json_is_what_json_dumps_makes_with_the_canonical_options(data: Any) -> None:
    # The encoder is made once (not at every call, as JSONEncoder.encode makes it); its bytes are
    # the same, bare strings, floats and every unicode character included.
    expected = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert canonical_json_bytes(data) == expected.encode("utf-8")


def test_a_value_refused_midway_leaves_nothing_behind_for_the_next() -> None:
    # The encoder made once keeps the containers it is inside to refuse cycles; a value refused
    # midway would leave its containers there, and the same containers encoded next would be taken
    # for a cycle.
    shared: dict[str, Any] = {"rows": [1, 2]}
    value: dict[str, Any] = {"a": shared, "b": [shared, {"c": float("nan")}]}
    with pytest.raises(KeelError) as refused:
        canonical_json_bytes(value)
    assert refused.value.code == "invalid_json"
    value["b"].pop()
    assert canonical_json_bytes(value) == b'{"a":{"rows":[1,2]},"b":[{"rows":[1,2]}]}'
    cycle: list[Any] = [1]
    cycle.append(cycle)
    with pytest.raises(KeelError, match="Circular reference"):
        canonical_json_bytes({"x": cycle})
    cycle.pop()
    assert canonical_json_bytes({"x": cycle}) == b'{"x":[1]}'


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
