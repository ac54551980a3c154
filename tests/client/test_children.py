"""Child runs and terminalization through the Python client and `keel cancel`, against real services."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from keel_client import (
    ChildRunConflict,
    InvalidArgumentError,
    KeelClient,
    ParentClosePolicy,
    ParentRunCanceled,
    RunNotFound,
    RunStatus,
    SecretsDetected,
)
from keel_client.models import TerminalizeOutcome

from tests.client.conftest import run_keel


@pytest.fixture
def keel(engine_address: str) -> Iterator[KeelClient]:
    """A client of the session's engine."""
    with KeelClient(engine_address) as client:
        yield client


def parent(keel: KeelClient) -> str:
    """A finished run to spawn children under."""
    return keel.start_run(op="keel.echo", wait=True).run_id


def test_spawn_child_and_await_child_return_the_childs_result(keel: KeelClient) -> None:
    parent_id = parent(keel)
    child = keel.spawn_child(
        parent_id, "double", "keel.transform", op_config={"fields": {"x": "$input"}}, input=5
    )
    assert child.child_run_id == str(uuid.uuid5(uuid.UUID(parent_id), "double"))
    result = keel.await_child(child.child_run_id, child.child_manifest_id)
    assert result.status == RunStatus.COMPLETED
    assert result.final_snapshot["main"] == {"x": 5}
    run = keel.get_run(child.child_run_id)
    assert (run.parent_run_id, run.parent_fact_key) == (parent_id, "double")
    again = keel.spawn_child(
        parent_id, "double", "keel.transform", op_config={"fields": {"x": "$input"}}, input=5
    )
    assert again == child
    with pytest.raises(ChildRunConflict):
        keel.spawn_child(parent_id, "double", "keel.echo")
    with pytest.raises(SecretsDetected):
        keel.spawn_child(parent_id, "token=ghp_0123456789abcdefghijklmnopqrstuvwxyz", "keel.echo")


def test_children_of_a_canceled_parent_by_policy_through_the_client_and_keel_get(
    keel: KeelClient, engine_address: str
) -> None:
    parent_id = keel.start_run(op="keel.sleep", op_config={"seconds": 600}).run_id
    doomed = keel.spawn_child(parent_id, "doomed", "keel.sleep", op_config={"seconds": 600})
    kept = keel.spawn_child(
        parent_id,
        "kept",
        "keel.sleep",
        op_config={"seconds": 600},
        parent_close_policy=ParentClosePolicy.ABANDON,
    )
    keel.cancel(parent_id)
    children = keel.get_run(parent_id).children
    assert [(c.fact_key, c.status, c.parent_close_policy) for c in children] == [
        ("doomed", RunStatus.CANCELED, ParentClosePolicy.CANCEL),
        ("kept", RunStatus.RUNNING, ParentClosePolicy.ABANDON),
    ]
    shown = run_keel("get", parent_id, engine=engine_address).stdout
    assert "FACT KEY  OP          STATUS    ON CANCEL  RUN ID" in shown
    assert f"doomed    keel.sleep  canceled  cancel     {doomed.child_run_id}" in shown
    assert f"kept      keel.sleep  running   abandon    {kept.child_run_id}" in shown
    with pytest.raises(ParentRunCanceled):
        keel.spawn_child(parent_id, "late", "keel.echo")
    keel.cancel(kept.child_run_id)
    assert keel.await_child(kept.child_run_id, parent_run_id=parent_id).status == RunStatus.CANCELED


def test_a_fan_out_parent_lists_its_children(keel: KeelClient) -> None:
    started = keel.start_run(
        op="keel.fan_out", op_config={"op_id": "keel.echo", "inputs": ["a", "b"]}, wait=True
    )
    assert started.run is not None
    assert started.run.status == RunStatus.COMPLETED
    assert [r["input"] for r in started.run.final_snapshot["main"]["results"]] == ["a", "b"]
    assert [(c.fact_key, c.status) for c in started.run.children] == [
        ("main.child.0", RunStatus.COMPLETED),
        ("main.child.1", RunStatus.COMPLETED),
    ]


def test_terminalize_is_transitioned_once_then_noop(keel: KeelClient) -> None:
    run_id = keel.start_run(op="keel.sleep", op_config={"seconds": 600}).run_id
    first = keel.terminalize(run_id, "failed", reason="operator")
    second = keel.cancel(run_id)
    assert (first.outcome, first.status) == (TerminalizeOutcome.TRANSITIONED, RunStatus.FAILED)
    assert (second.outcome, second.status) == (TerminalizeOutcome.NOOP, RunStatus.FAILED)
    assert keel.get_run(run_id).reason == "operator"
    with pytest.raises(InvalidArgumentError):
        keel.terminalize(run_id, "failed")
    with pytest.raises(RunNotFound):
        keel.cancel(str(uuid.uuid4()))


def test_keel_cancel_stops_a_sleeping_run_and_its_children(keel: KeelClient, engine_address: str) -> None:
    config = {"op_id": "keel.sleep", "op_config": {"seconds": 600}, "count": 2}
    run_id = keel.start_run(op="keel.fan_out", op_config=config).run_id
    result = run_keel("cancel", run_id, "--reason", "enough", engine=engine_address)
    assert result.code == 0, result.stderr
    assert f"run {run_id} is now canceled" in result.stdout
    again = run_keel("cancel", run_id, engine=engine_address)
    assert f"run {run_id} was already canceled" in again.stdout
    run = keel.get_run(run_id)
    assert run.status == RunStatus.CANCELED
    children = [str(uuid.uuid5(uuid.UUID(run_id), f"main.child.{i}")) for i in range(2)]
    for child in children:
        try:
            status = keel.get_run(child).status
        except RunNotFound:
            continue  # the cancel came before this spawn: there is no child to close
        assert status == RunStatus.CANCELED
