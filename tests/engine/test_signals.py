"""Signals in one process (real gRPC store and engine): SignalRun, StartRun.signals, keel.wait_signal.

Each signal must be delivered exactly once: the tests count the consuming facts in the run stream
(FactRecorded with namespace keel.signal) besides what the steps returned.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from keel.engine.v1 import engine_pb2
from keel.store.v1 import store_pb2

from engine_service.runtime import signals as runtime_signals
from keel_core.json_values import from_value, to_value
from keel_core.status import from_rpc_error
from tests.engine.conftest import Cluster, gate
from tests.engine.processes import eventually


def wait_step(
    step_id: str, name: str, *, timeout: float | None = None, depends_on: tuple[str, ...] = ()
) -> Any:
    """A keel.wait_signal step."""
    config: dict[str, Any] = {"name": name}
    if timeout is not None:
        config["timeout_seconds"] = timeout
    return engine_pb2.Step(
        step_id=step_id, op_id="keel.wait_signal", op_config=to_value(config), depends_on=list(depends_on)
    )


def pipeline(*steps: engine_pb2.Step) -> engine_pb2.Pipeline:
    """A pipeline of these steps."""
    return engine_pb2.Pipeline(pipeline_id="signals", steps=list(steps))


async def run_events(cluster: Cluster, run_id: str, prefix: str = "run:") -> list[tuple[str, dict[str, Any]]]:
    """(type, payload) of every event of the run's stream (or its inbox with prefix `signals:`)."""
    reply = await cluster.store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"{prefix}{run_id}"))
    return [(e.type, json.loads(e.payload)) for e in reply.events]


async def consumed(cluster: Cluster, run_id: str) -> list[dict[str, Any]]:
    """The signals the run's waits consumed (their facts), in order."""
    events = await run_events(cluster, run_id)
    return [
        data["response"]
        for kind, data in events
        if kind == "FactRecorded" and data["namespace"] == "keel.signal"
    ]


async def signal(
    cluster: Cluster, run_id: str, name: str, payload: Any, signal_id: str = ""
) -> engine_pb2.SignalRunResponse:
    """SignalRun."""
    return await cluster.stub.SignalRun(
        engine_pb2.SignalRunRequest(run_id=run_id, name=name, payload=to_value(payload), signal_id=signal_id)
    )


async def finished(cluster: Cluster, run_id: str) -> engine_pb2.Run:
    """The run once terminal."""
    reply = await cluster.stub.AwaitRun(
        engine_pb2.AwaitRunRequest(run_id=run_id, timeout=duration_pb2.Duration(seconds=60))
    )
    assert reply.done
    return reply.run


async def waiting_step(cluster: Cluster, run_id: str, step_id: str) -> engine_pb2.StepState:
    """The step once GetRun shows it waiting for a signal."""
    found: list[engine_pb2.StepState] = []

    async def check() -> bool:
        run = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
        step = next(s for s in run.steps if s.step_id == step_id)
        if step.HasField("waiting_for_signal"):
            found.append(step)
        return bool(found)

    await eventually(check, f"step {step_id} waits for a signal", within=30, poll=0.02)
    return found[0]


def output(run: engine_pb2.Run, step_id: str) -> Any:
    """What a step returned (from the final snapshot)."""
    return from_value(run.final_snapshot)[step_id]


async def test_signal_sent_during_the_wait_is_its_output_and_consumed_once(cluster: Cluster) -> None:
    started = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(pipeline=pipeline(wait_step("approve", "approval", timeout=3600)))
    )
    run_id = started.run_id
    step = await waiting_step(cluster, run_id, "approve")
    assert step.waiting_for_signal.name == "approval"
    assert step.waiting_for_signal.fact_key == "approve.signal"
    assert step.waiting_for_signal.HasField("timeout_at")
    sent = await signal(cluster, run_id, "approval", {"by": "ada"}, "sig-1")
    assert sent.created and sent.signal_id == "sig-1" and sent.inbox_seq == 1
    run = await finished(cluster, run_id)
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    assert output(run, "approve") == {"by": "ada"}
    assert not any(s.HasField("waiting_for_signal") for s in run.steps)
    assert [c["signal_id"] for c in await consumed(cluster, run_id)] == ["sig-1"]


async def test_signal_sent_before_the_run_reaches_its_wait_is_kept_until_consumed(cluster: Cluster) -> None:
    door = f"before-{uuid.uuid4()}"
    hold = engine_pb2.Step(step_id="hold", op_id="test.gated", op_config=to_value({"gate": door}))
    started = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(pipeline=pipeline(hold, wait_step("go", "go", depends_on=("hold",))))
    )
    await gate(door).wait_for(1)
    await signal(cluster, started.run_id, "go", [1, 2, 3], "early")
    gate(door).opened.set()
    run = await finished(cluster, started.run_id)
    assert output(run, "go") == [1, 2, 3]
    assert [c["signal_id"] for c in await consumed(cluster, started.run_id)] == ["early"]


async def test_a_repeated_signal_id_is_answered_ok_and_delivered_once(cluster: Cluster) -> None:
    started = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(
            pipeline=pipeline(wait_step("first", "go"), wait_step("second", "go", depends_on=("first",)))
        )
    )
    run_id = started.run_id
    first = await signal(cluster, run_id, "go", "a", "same")
    again = await signal(cluster, run_id, "go", "a", "same")
    assert first.created and not again.created and again.inbox_seq == first.inbox_seq
    await waiting_step(cluster, run_id, "second")  # the first wait took "same"; the repeat is not another
    await signal(cluster, run_id, "go", "b", "other")
    run = await finished(cluster, run_id)
    assert (output(run, "first"), output(run, "second")) == ("a", "b")
    assert [c["signal_id"] for c in await consumed(cluster, run_id)] == ["same", "other"]
    assert len(await run_events(cluster, run_id, "signals:")) == 2


async def test_signals_of_one_name_are_consumed_in_the_order_sent_and_others_wait(cluster: Cluster) -> None:
    started = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(
            pipeline=pipeline(
                wait_step("a", "x"),
                wait_step("b", "x", depends_on=("a",)),
                wait_step("c", "y"),
                wait_step("d", "end"),  # keeps the run going until every "x" was sent
            )
        )
    )
    for n, name in enumerate(["y", "x", "x", "x", "end"]):
        await signal(cluster, started.run_id, name, n)
    run = await finished(cluster, started.run_id)
    assert (output(run, "a"), output(run, "b"), output(run, "c"), output(run, "d")) == (1, 2, 0, 4)
    inbox = await run_events(cluster, started.run_id, "signals:")
    assert len(inbox) == 5  # the last "x" stays unconsumed
    assert sorted(c["inbox_seq"] for c in await consumed(cluster, started.run_id)) == [1, 2, 3, 5]


async def test_a_wait_times_out_as_configured_and_the_retry_policy_decides(cluster: Cluster) -> None:
    once = engine_pb2.RunConfig(retry_policy=engine_pb2.RetryPolicy(max_attempts=1))
    started = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(pipeline=pipeline(wait_step("w", "never", timeout=0.2)), run_config=once)
    )
    run = await finished(cluster, started.run_id)
    assert run.status == engine_pb2.RUN_STATUS_FAILED
    assert run.error.code == "signal_timeout" and run.error.retryable
    events = await run_events(cluster, started.run_id)
    # The attempt parked on a signal wait whose deadline is 0.2 s after the op returned it.
    attempt_at = next(data["at_us"] for kind, data in events if kind == "StepAttemptStarted")
    waiting = next(data for kind, data in events if kind == "StepWaiting")
    wait = waiting["wait"]
    assert wait["kind"] == "signal"
    assert wait["detail"] == {"name": "never", "fact_key": "w.signal", "timeout_seconds": 0.2}
    assert attempt_at <= wait["until_us"] - 200_000 <= waiting["at_us"]
    assert wait["error"]["code"] == "signal_timeout" and wait["error"]["retryable"]
    failed_at = next(data["at_us"] for kind, data in events if kind == "StepAttemptFailed")
    assert failed_at >= wait["until_us"]  # never before its deadline
    assert not any(kind == "SignalAwaited" for kind, _ in events)


async def test_a_timed_out_wait_is_retried_with_a_fresh_deadline_and_gets_a_later_signal(
    cluster: Cluster,
) -> None:
    twice = engine_pb2.RunConfig(retry_policy=engine_pb2.RetryPolicy(max_attempts=2))
    started = await cluster.stub.StartRun(
        # Long enough for each attempt to park (and for GetRun to see the second one waiting).
        engine_pb2.StartRunRequest(pipeline=pipeline(wait_step("w", "late", timeout=3.0)), run_config=twice)
    )
    run_id = started.run_id

    async def retrying() -> bool:
        run = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
        return len(run.steps[0].attempts) == 2 and run.steps[0].HasField("waiting_for_signal")

    twice_config = twice  # the second attempt waits 3 s again: a stalled machine may still miss it
    await eventually(retrying, "the second attempt waits", within=30, poll=0.01)
    await signal(cluster, run_id, "late", "ok")
    run = await finished(cluster, run_id)
    if run.status == engine_pb2.RUN_STATUS_COMPLETED:
        assert output(run, "w") == "ok"
    else:  # the signal came after the second deadline: it stays in the inbox
        assert run.error.code == "signal_timeout" and twice_config.retry_policy.max_attempts == 2
        assert await consumed(cluster, run_id) == []


async def test_start_run_signals_are_delivered_with_the_start_and_once_per_retried_start(
    cluster: Cluster,
) -> None:
    run_id = str(uuid.uuid4())
    request = engine_pb2.StartRunRequest(
        pipeline=pipeline(wait_step("first", "go"), wait_step("second", "go", depends_on=("first",))),
        run_id=run_id,
        signals=[engine_pb2.SignalInput(name="go", payload=to_value({"n": 1}))],
    )
    assert (await cluster.stub.StartRun(request)).created
    again = await cluster.stub.StartRun(request)  # a retried start: the same signal, not a second one
    assert not again.created
    assert len(await run_events(cluster, run_id, "signals:")) == 1
    more = engine_pb2.StartRunRequest()
    more.CopyFrom(request)
    del more.signals[:]
    more.signals.append(engine_pb2.SignalInput(name="go", payload=to_value({"n": 2}), signal_id="two"))
    await cluster.stub.StartRun(more)  # the run exists: its signal is delivered to it
    run = await finished(cluster, run_id)
    assert (output(run, "first"), output(run, "second")) == ({"n": 1}, {"n": 2})
    assert len(await consumed(cluster, run_id)) == 2


async def test_bad_signal_requests_fail_with_their_reason_and_write_nothing(cluster: Cluster) -> None:
    started = await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=pipeline(wait_step("w", "go"))))
    run_id = started.run_id
    bad: list[tuple[engine_pb2.SignalRunRequest, grpc.StatusCode, str]] = [
        (
            engine_pb2.SignalRunRequest(run_id="nope", name="go"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_run_id",
        ),
        (
            engine_pb2.SignalRunRequest(run_id=str(uuid.uuid4()), name="go"),
            grpc.StatusCode.NOT_FOUND,
            "run_not_found",
        ),
        (
            engine_pb2.SignalRunRequest(run_id=run_id, name=""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_signal",
        ),
        (
            engine_pb2.SignalRunRequest(run_id=run_id, name="a b"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_signal",
        ),
        (
            engine_pb2.SignalRunRequest(run_id=run_id, name="go", signal_id="has space"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_signal",
        ),
        (
            engine_pb2.SignalRunRequest(run_id=run_id, name="go", signal_id="x" * 129),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_signal",
        ),
        (
            engine_pb2.SignalRunRequest(run_id=run_id, name="go", signal_id="DB_PASSWORD=hunter2hunter2"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "secrets_detected",
        ),
        (
            engine_pb2.SignalRunRequest(run_id=run_id, name="go", payload=to_value("x" * (256 * 1024))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "signal_too_large",
        ),
    ]
    nan = engine_pb2.SignalRunRequest(run_id=run_id, name="go")
    nan.payload.number_value = float("nan")
    bad.append((nan, grpc.StatusCode.INVALID_ARGUMENT, "invalid_json"))
    for request, code, reason in bad:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await cluster.stub.SignalRun(request)
        assert failed.value.code() == code, request
        assert _reason(failed.value) == reason, request
    assert await run_events(cluster, run_id, "signals:") == []
    await signal(cluster, run_id, "go", None)
    await finished(cluster, run_id)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await signal(cluster, run_id, "go", "late")
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(ended.value) == "run_terminal"
    assert len(await run_events(cluster, run_id, "signals:")) == 1


async def test_bad_start_signals_fail_and_write_nothing(cluster: Cluster) -> None:
    run_id = str(uuid.uuid4())
    too_many = [engine_pb2.SignalInput(name="go") for _ in range(101)]
    for signals, reason in [
        ([engine_pb2.SignalInput(name="")], "invalid_signal"),
        ([engine_pb2.SignalInput(name="go", signal_id="a b")], "invalid_signal"),
        ([engine_pb2.SignalInput(name="go", payload=to_value("x" * (256 * 1024)))], "signal_too_large"),
        (too_many, "invalid_signal"),
    ]:
        request = engine_pb2.StartRunRequest(
            pipeline=pipeline(wait_step("w", "go")), run_id=run_id, signals=signals
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await cluster.stub.StartRun(request)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _reason(failed.value) == reason
    assert await run_events(cluster, run_id) == []
    assert await run_events(cluster, run_id, "signals:") == []
    # A start that names an existing run with another manifest writes no signal either.
    await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(pipeline=pipeline(wait_step("w", "go")), run_id=run_id)
    )
    other = engine_pb2.StartRunRequest(
        pipeline=pipeline(wait_step("w", "other")), run_id=run_id, signals=[engine_pb2.SignalInput(name="go")]
    )
    with pytest.raises(grpc.aio.AioRpcError) as exists:
        await cluster.stub.StartRun(other)
    assert _reason(exists.value) == "run_already_exists"
    assert await run_events(cluster, run_id, "signals:") == []


def _reason(error: grpc.aio.AioRpcError) -> str:
    return from_rpc_error(error).code


async def test_the_wakeup_stream_is_trimmed_and_waits_still_hear_their_signals(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime_signals, "TRIM_EVERY", 2)
    monkeypatch.setattr(runtime_signals, "KEEP_WAKEUPS", 1)
    started = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(
            pipeline=pipeline(
                *(wait_step(f"w{i}", "go", depends_on=(f"w{i - 1}",) if i else ()) for i in range(5))
            )
        )
    )
    for n in range(5):
        await waiting_step(cluster, started.run_id, f"w{n}")
        await signal(cluster, started.run_id, "go", n)
    run = await finished(cluster, started.run_id)
    assert [output(run, f"w{i}") for i in range(5)] == list(range(5))

    async def trimmed() -> bool:
        reply = await cluster.store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id="signal-wakeups"))
        return reply.head_seq == 5 and len(reply.events) < 5

    await eventually(trimmed, "signal-wakeups is trimmed", within=30, poll=0.02)
