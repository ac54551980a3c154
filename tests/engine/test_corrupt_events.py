"""A run stream holding an event the engine cannot decode (junk appended through the store).

Every RPC that needs the run's history answers DATA_LOSS `corrupt_event` naming the stream and the
sequence; the run is still listed, and an operator can still cancel or fail it.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from keel.engine.v1 import engine_pb2
from keel.store.v1 import store_pb2

from engine_service.domain import (
    CorruptEvent,
    RunCompleted,
    RunStarted,
    StepAttemptStarted,
    decode_event,
    fold,
)
from keel_core.json_values import to_value
from keel_core.status import from_rpc_error
from tests.engine.conftest import Cluster, gate

JUNK = [
    ("RunStarted", b"\xff\xfe not utf-8"),
    ("RunStarted", b"not json"),
    ("StepCompleted", b"[1, 2]"),
    ("StepAttemptStarted", b'{"v": 1, "step_id": "main"}'),
    ("StepAttemptFailed", b'{"v": 1, "step_id": "main", "attempt": "one", "error": {}}'),
    ("RunCompleted", b'{"v": 1, "status": "exploded"}'),
    (
        "FactRecorded",
        b'{"v": 1, "step_id": "s", "attempt": 0, "fact_key": "k", "namespace": "n", "response": NaN}',
    ),
    (
        "StepAttemptFailed",
        b'{"v": 1, "step_id": "s", "attempt": 0, "error": {"details": {"n": 36893488147419103232}}}',
    ),
    ("RunStarted", b"[" * 100_000),
]


@pytest.mark.parametrize(("type_name", "payload"), JUNK, ids=[f"{t} {p[:12]!r}" for t, p in JUNK])
def test_junk_decodes_as_a_corrupt_event_saying_why(type_name: str, payload: bytes) -> None:
    event = decode_event(type_name, payload)
    assert isinstance(event, CorruptEvent) and event.type == type_name and event.why


def test_a_payload_after_a_byte_order_mark_is_a_corrupt_event_saying_so() -> None:
    event = decode_event("RunStarted", b'\xef\xbb\xbf{"v": 1}')
    assert isinstance(event, CorruptEvent) and "byte-order mark" in event.why


def test_the_fold_stops_at_a_corrupt_event_but_a_later_terminal_one_ends_the_run() -> None:
    started = RunStarted("keel.echo", "sha256:m", "sha256:s")
    corrupt = CorruptEvent("StepCompleted", "missing field 'snapshot_id'")
    history = fold([started, corrupt, StepAttemptStarted("main", 0, "sha256:s")])
    assert history.corrupt == corrupt and history.corrupt_seq == 2 and history.head_seq == 3
    assert not history.open_attempts and not history.is_terminal  # nothing applied past it
    canceled = RunCompleted("canceled", "sha256:s", "operator")
    assert history.extend([canceled]).terminal == canceled
    # Junk after the terminal event changes nothing: the run ended before it.
    after = fold([started, canceled, corrupt])
    assert after.corrupt is None and after.terminal == canceled


async def _append_junk(cluster: Cluster, run_id: str, type_name: str, payload: bytes, *, new: bool) -> int:
    """Append one event to `run:<run_id>` as any store client can; returns its sequence."""
    answer = await cluster.store_stub.AppendEvents(
        store_pb2.AppendEventsRequest(
            stream_id=f"run:{run_id}",
            expected_kind=store_pb2.EXPECTED_KIND_NO_STREAM if new else store_pb2.EXPECTED_KIND_ANY,
            events=[store_pb2.EventData(type=type_name, payload=payload)],
        )
    )
    return answer.first_seq


async def _data_loss(call: Any, run_id: str, seq: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            async for _ in call:
                pass
        else:
            await call
    error = caught.value
    assert error.code() == grpc.StatusCode.DATA_LOSS, error.details()
    info = from_rpc_error(error)
    assert info.code == "corrupt_event"
    assert info.details["stream_id"] == f"run:{run_id}" and info.details["seq"] == str(seq)
    assert f"event {seq} " in (error.details() or "") and f"run:{run_id}" in (error.details() or "")


async def _every_reader_is_data_loss(cluster: Cluster, run_id: str, seq: int) -> None:
    stub = cluster.stub
    await _data_loss(stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id)), run_id, seq)
    await _data_loss(stub.ResumeRun(engine_pb2.ResumeRunRequest(run_id=run_id)), run_id, seq)
    # A timeout: a run this engine drives is awaited on its driver, which meets the junk only at its
    # next append (its op here waits at a gate); the run is then read back, and that read fails.
    patience = duration_pb2.Duration(seconds=1)
    await _data_loss(stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id, timeout=patience)), run_id, seq)
    await _data_loss(stub.WatchRun(engine_pb2.WatchRunRequest(run_id=run_id)), run_id, seq)
    target = engine_pb2.TERMINAL_TARGET_COMPLETED
    await _data_loss(
        stub.Terminalize(engine_pb2.TerminalizeRequest(run_id=run_id, target=target)), run_id, seq
    )


async def _listed_status(cluster: Cluster, run_id: str) -> int:
    page = await cluster.stub.ListRuns(engine_pb2.ListRunsRequest(page_size=1000))
    return next(run.status for run in page.runs if run.run_id == run_id)


async def _event_types(cluster: Cluster, run_id: str) -> list[str]:
    page = await cluster.store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run_id}"))
    return [event.type for event in page.events]


@pytest.mark.parametrize(
    ("target", "status"),
    [
        (engine_pb2.TERMINAL_TARGET_CANCELED, engine_pb2.RUN_STATUS_CANCELED),
        (engine_pb2.TERMINAL_TARGET_FAILED, engine_pb2.RUN_STATUS_FAILED),
    ],
    ids=["canceled", "failed"],
)
async def test_a_run_stream_of_junk_is_data_loss_listable_and_terminalizable(
    cluster: Cluster, target: int, status: int
) -> None:
    run_id = str(uuid.uuid4())
    seq = await _append_junk(cluster, run_id, "RunStarted", b"not json", new=True)
    await _every_reader_is_data_loss(cluster, run_id, seq)
    assert await _event_types(cluster, run_id) == ["RunStarted"]  # the refusals wrote nothing
    assert await _listed_status(cluster, run_id) == engine_pb2.RUN_STATUS_RUNNING
    request = engine_pb2.TerminalizeRequest(run_id=run_id, target=target, reason="history unreadable")  # type: ignore[arg-type]
    done = await cluster.stub.Terminalize(request)
    assert done.outcome == engine_pb2.TERMINALIZE_OUTCOME_TRANSITIONED and done.status == status
    assert await _event_types(cluster, run_id) == ["RunStarted", "RunCompleted"]
    assert await _listed_status(cluster, run_id) == status
    again = await cluster.stub.Terminalize(request)
    assert again.outcome == engine_pb2.TERMINALIZE_OUTCOME_NOOP and again.status == status
    # Still unreadable, terminal or not: a view of it would be a guess.
    await _data_loss(cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id)), run_id, seq)


async def test_junk_appended_to_a_running_run_is_data_loss_and_it_can_be_canceled(cluster: Cluster) -> None:
    name = f"corrupt-{uuid.uuid4()}"
    door = gate(name)
    config = engine_pb2.SingleOp(op_id="test.gated", op_config=to_value({"gate": name}))
    started = await cluster.stub.StartRun(engine_pb2.StartRunRequest(op=config))
    run_id = started.run_id
    await door.wait_for(1)
    seq = await _append_junk(cluster, run_id, "StepCompleted", b'{"v": 1}', new=False)
    await _every_reader_is_data_loss(cluster, run_id, seq)
    canceled = await cluster.stub.Terminalize(
        engine_pb2.TerminalizeRequest(run_id=run_id, target=engine_pb2.TERMINAL_TARGET_CANCELED)
    )
    assert canceled.outcome == engine_pb2.TERMINALIZE_OUTCOME_TRANSITIONED
    assert run_id in door.cancelled  # the op was stopped, not left running
    types = await _event_types(cluster, run_id)
    assert types[seq - 1] == "StepCompleted" and types[-1] == "RunCompleted"
    assert types.count("RunCompleted") == 1
    assert await _listed_status(cluster, run_id) == engine_pb2.RUN_STATUS_CANCELED


async def test_junk_in_a_runs_children_stream_links_no_child_and_getrun_still_answers(
    cluster: Cluster,
) -> None:
    run = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"), wait=True)
    )
    await cluster.store_stub.AppendEvents(
        store_pb2.AppendEventsRequest(
            stream_id=f"children:{run.run_id}",
            expected_kind=store_pb2.EXPECTED_KIND_ANY,
            events=[store_pb2.EventData(type="ChildLinked", payload=b"not json")],
        )
    )
    got = await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run.run_id))
    assert got.run.status == engine_pb2.RUN_STATUS_COMPLETED and list(got.run.children) == []


async def test_await_child_naming_an_artifact_that_is_no_manifest_is_invalid_argument(
    cluster: Cluster,
) -> None:
    put = await cluster.store_stub.PutArtifact(
        iter([store_pb2.PutArtifactRequest(kind="manifest", data=b"not a manifest")])
    )
    child = str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cluster.stub.AwaitChild(
            engine_pb2.AwaitChildRequest(child_run_id=child, child_manifest_id=put.artifact_id)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(caught.value).code == "child_run_request_invalid"
    assert put.artifact_id in (caught.value.details() or "")
    heads = await cluster.store_stub.HeadSeq(store_pb2.HeadSeqRequest(stream_id=f"run:{child}"))
    assert heads.head_seq == 0  # nothing was started
