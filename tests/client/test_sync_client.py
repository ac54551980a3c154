"""KeelClient (blocking) against a real engine and store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from keel_client import (
    InputTooLarge,
    InvalidArgument,
    InvalidArgumentError,
    InvalidPlan,
    InvalidRunId,
    KeelClient,
    NotFoundError,
    ResourceExhaustedError,
    RunAlreadyExists,
    RunNotFound,
    RunStatus,
    StepStatus,
)

from tests.client.conftest import pipeline, step

TWO_STEPS = pipeline(
    "sync-two-steps",
    step("first", "keel.echo", {"n": 1}),
    step(
        "second",
        "keel.transform",
        {"fields": {"n": "$context.first.config.n", "who": "$input.who"}},
        ("first",),
    ),
)


@pytest.fixture
def keel(engine_address: str) -> Iterator[KeelClient]:
    with KeelClient(engine_address) as client:
        yield client


def test_start_then_await_returns_the_completed_run_with_its_final_snapshot(keel: KeelClient) -> None:
    started = keel.start_run(TWO_STEPS, input={"who": "ada"}, context={"tenant": "t1"})
    assert started.created
    uuid.UUID(started.run_id)  # the client picked a UUID, so a retried start is idempotent
    awaited = keel.await_run(started.run_id)
    assert awaited.done
    run = awaited.run
    assert run is not None
    assert run.status is RunStatus.COMPLETED
    assert run.is_terminal
    assert run.final_snapshot == {
        "tenant": "t1",
        "first": {"input": {"who": "ada"}, "config": {"n": 1}},
        "second": {"n": 1, "who": "ada"},
    }
    assert [(s.step_id, s.status) for s in run.steps] == [
        ("first", StepStatus.COMPLETED),
        ("second", StepStatus.COMPLETED),
    ]
    assert run.step("first").attempts[0].attempt == 0
    assert run.created_at is not None and run.completed_at is not None
    assert run.completed_at >= run.created_at


def test_get_run_matches_what_await_returned(keel: KeelClient) -> None:
    started = keel.start_run(TWO_STEPS, input={"who": "bob"})
    awaited = keel.await_run(started.run_id)
    assert keel.get_run(started.run_id) == awaited.run


def test_start_with_wait_returns_the_terminal_run(keel: KeelClient) -> None:
    started = keel.start_run(op="keel.echo", op_config={"single": True}, input=[1, 2], wait=True)
    assert started.run is not None
    assert started.run.status is RunStatus.COMPLETED
    assert started.run.final_snapshot == {"main": {"input": [1, 2], "config": {"single": True}}}


def test_watch_run_yields_every_event_in_order_and_ends_after_the_terminal_one(keel: KeelClient) -> None:
    started = keel.start_run(TWO_STEPS, input={"who": "cy"})
    events = list(keel.watch_run(started.run_id))
    assert [event.seq for event in events] == list(range(1, len(events) + 1))
    assert events[0].type == "RunStarted"
    assert events[-1].type == "RunCompleted"
    assert [e.data["step_id"] for e in events if e.type == "StepCompleted"] == ["first", "second"]
    assert events[-1].seq == keel.get_run(started.run_id).head_seq
    # Resuming the stream after an event delivers only what follows it.
    tail = list(keel.watch_run(started.run_id, after_seq=events[1].seq))
    assert tail == events[2:]


def test_list_runs_filters_by_status_and_pages(keel: KeelClient) -> None:
    ids = {keel.start_run(TWO_STEPS, input={"who": str(n)}, wait=True).run_id for n in range(3)}
    completed = keel.list_runs(statuses=["completed"], page_size=1000)
    assert ids <= {summary.run_id for summary in completed.runs}
    assert all(summary.status is RunStatus.COMPLETED for summary in completed.runs)
    assert ids.isdisjoint(summary.run_id for summary in keel.list_runs(statuses=[RunStatus.FAILED]).runs)
    first = keel.list_runs(page_size=2)
    assert len(first.runs) == 2 and first.next_page_token is not None
    second = keel.list_runs(page_size=2, page_token=first.next_page_token)
    assert {r.run_id for r in first.runs}.isdisjoint(r.run_id for r in second.runs)
    assert len(list(keel.iter_runs(limit=3, page_size=2))) == 3


def test_a_step_that_fails_for_good_fails_the_run_with_its_error(keel: KeelClient) -> None:
    failing = pipeline(
        "sync-failing", step("boom", "keel.fail_n_times", {"n": 5, "retryable": False, "code": "bad"})
    )
    run = keel.start_run(failing, wait=True).run
    assert run is not None
    assert run.status is RunStatus.FAILED
    boom = run.step("boom")
    assert boom.status is StepStatus.FAILED
    assert boom.last_error is not None and boom.last_error.code == "bad"
    assert not boom.last_error.retryable


def test_a_retryable_failure_is_retried_and_the_attempts_are_recorded(keel: KeelClient) -> None:
    flaky = pipeline("sync-flaky", step("flaky", "keel.fail_n_times", {"n": 2}))
    run = keel.start_run(flaky, run_config={"retry_policy": {"initial_backoff": 0.01}}, wait=True).run
    assert run is not None and run.status is RunStatus.COMPLETED
    attempts = run.step("flaky").attempts
    assert [(a.attempt, a.status) for a in attempts] == [
        (0, StepStatus.FAILED),
        (1, StepStatus.FAILED),
        (2, StepStatus.COMPLETED),
    ]
    assert attempts[0].error is not None and attempts[0].error.code == "flaky"


def test_unknown_run_id_raises_run_not_found(keel: KeelClient) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(RunNotFound) as caught:
        keel.get_run(missing)
    assert isinstance(caught.value, NotFoundError)
    assert caught.value.code == "run_not_found"
    assert caught.value.category == "not_found"
    assert not caught.value.retryable
    with pytest.raises(RunNotFound):
        list(keel.watch_run(missing))
    with pytest.raises(RunNotFound):
        keel.await_run(missing)


def test_cyclic_plan_raises_invalid_plan_naming_the_step(keel: KeelClient) -> None:
    cyclic = pipeline(
        "cyclic", step("a", "keel.echo", depends_on=("b",)), step("b", "keel.echo", depends_on=("a",))
    )
    with pytest.raises(InvalidPlan) as caught:
        keel.start_run(cyclic)
    assert isinstance(caught.value, InvalidArgumentError)
    assert "a" in caught.value.message


def test_unknown_op_raises_invalid_plan(keel: KeelClient) -> None:
    with pytest.raises(InvalidPlan) as caught:
        keel.start_run(pipeline("unknown-op", step("x", "no.such.op")))
    assert "no.such.op" in caught.value.message


def test_same_run_id_and_manifest_returns_the_existing_run(keel: KeelClient) -> None:
    run_id = str(uuid.uuid4())
    first = keel.start_run(TWO_STEPS, input={"who": "dee"}, run_id=run_id)
    second = keel.start_run(TWO_STEPS, input={"who": "dee"}, run_id=run_id)
    assert (first.created, second.created) == (True, False)
    assert first.manifest_id == second.manifest_id


def test_same_run_id_with_another_manifest_raises_run_already_exists(keel: KeelClient) -> None:
    run_id = str(uuid.uuid4())
    keel.start_run(TWO_STEPS, input={"who": "eve"}, run_id=run_id)
    with pytest.raises(RunAlreadyExists) as caught:
        keel.start_run(TWO_STEPS, input={"who": "someone else"}, run_id=run_id)
    assert caught.value.code == "run_already_exists"


def test_bad_pipeline_is_refused_before_sending(keel: KeelClient) -> None:
    with pytest.raises(InvalidArgument, match="pipeline"):
        keel.start_run({"pipeline_id": "x", "steps": [{"step_id": "a", "op_id": "keel.echo", "bogus": 1}]})
    with pytest.raises(InvalidArgument, match="2\\*\\*53"):
        keel.start_run(TWO_STEPS, input={"big": 2**60})


def test_list_ops_includes_the_builtin_ops(keel: KeelClient) -> None:
    ops = {(op.op_id, op.op_version) for op in keel.list_ops()}
    assert {("keel.echo", "1"), ("keel.sleep", "1"), ("keel.fail_n_times", "1")} <= ops


def test_await_run_with_max_wait_answers_not_done_for_a_running_run(keel: KeelClient) -> None:
    slow = pipeline("sync-slow", step("nap", "keel.sleep", {"seconds": 2}))
    started = keel.start_run(slow)
    awaited = keel.await_run(started.run_id, max_wait=0.05)
    assert not awaited.done
    assert awaited.run is not None and awaited.run.status is RunStatus.RUNNING
    assert keel.await_run(started.run_id).done


def test_malformed_run_id_raises_invalid_run_id(keel: KeelClient) -> None:
    with pytest.raises(InvalidRunId) as caught:
        keel.get_run("not-a-uuid")
    assert "not-a-uuid" in caught.value.message


def test_oversized_input_raises_input_too_large_with_the_limit(keel: KeelClient) -> None:
    with pytest.raises(InputTooLarge) as caught:
        keel.start_run(TWO_STEPS, input={"blob": "x" * (2 * 1024 * 1024)})
    assert int(caught.value.details["limit"]) < 2 * 1024 * 1024 < int(caught.value.details["size"])


def test_a_message_beyond_the_channel_limit_raises_resource_exhausted(keel: KeelClient) -> None:
    with pytest.raises(ResourceExhaustedError):
        keel.start_run(TWO_STEPS, input={"blob": "x" * (17 * 1024 * 1024)})
