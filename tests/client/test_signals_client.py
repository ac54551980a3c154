"""Signals from the clients: `signal_run` (blocking and asyncio), `start_run(signals=...)`, `keel signal`,
`keel run --signal`, and the live view of a step waiting for a signal; against real services."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from typing import Any

import pytest
from keel_client import (
    AsyncKeelClient,
    InvalidSignal,
    KeelClient,
    Run,
    RunNotFound,
    RunStatus,
    RunTerminal,
    Signal,
    SignalTooLarge,
)

from tests.client.conftest import KEEL, pipeline, run_keel, step


def waits(*names: str) -> dict[str, object]:
    """A pipeline of keel.wait_signal steps, one after the other, step i waiting for names[i]."""
    steps = []
    for index, name in enumerate(names):
        after = (f"w{index - 1}",) if index else ()
        steps.append(step(f"w{index}", "keel.wait_signal", {"name": name, "timeout_seconds": 3600}, after))
    return pipeline("client-signals", *steps)


def waiting(keel: KeelClient, run_id: str, step_id: str) -> Run:
    """The run once its step `step_id` waits for a signal (bounded; no timing claim)."""
    deadline = time.monotonic() + 30
    while True:
        run = keel.get_run(run_id)
        if next(s for s in run.steps if s.step_id == step_id).waiting_for_signal is not None:
            return run
        assert time.monotonic() < deadline, f"step {step_id} never waited"
        time.sleep(0.02)


def test_signal_run_delivers_once_per_id_and_get_run_shows_the_wait(engine_address: str) -> None:
    with KeelClient(engine_address) as keel:
        started = keel.start_run(waits("go", "go"))
        run = waiting(keel, started.run_id, "w0")
        wait = run.steps[0].waiting_for_signal
        assert wait is not None and wait.name == "go" and wait.fact_key == "w0.signal"
        assert wait.timeout_at is not None and wait.since is not None
        first = keel.signal_run(started.run_id, "go", {"n": 1}, signal_id="fixed")
        repeat = keel.signal_run(started.run_id, "go", {"n": 1}, signal_id="fixed")
        assert first.created and not repeat.created and first.inbox_seq == repeat.inbox_seq == 1
        waiting(keel, started.run_id, "w1")
        chosen = keel.signal_run(started.run_id, "go", {"n": 2})  # the client picks the id
        assert chosen.created and uuid.UUID(chosen.signal_id)
        done = keel.await_run(started.run_id).run
        assert done is not None and done.status is RunStatus.COMPLETED
        assert done.final_snapshot["w0"] == {"n": 1} and done.final_snapshot["w1"] == {"n": 2}
        with pytest.raises(RunTerminal):
            keel.signal_run(started.run_id, "go", 3)
        with pytest.raises(RunNotFound):
            keel.signal_run(str(uuid.uuid4()), "go", 3)
        with pytest.raises(InvalidSignal):
            keel.signal_run(started.run_id, "", 3)
        with pytest.raises(SignalTooLarge):
            keel.signal_run(started.run_id, "go", "x" * (300 * 1024))


async def test_async_client_sends_signals_with_the_start_and_after_it(engine_address: str) -> None:
    async with AsyncKeelClient(engine_address) as keel:
        run_id = str(uuid.uuid4())
        starting: list[Any] = [Signal("a", 1), {"name": "b", "payload": [2]}]
        await keel.start_run(waits("a", "b", "c"), run_id=run_id, signals=starting)
        again = await keel.start_run(waits("a", "b", "c"), run_id=run_id, signals=starting)
        assert not again.created
        sent = await keel.signal_run(run_id, "c", {"three": 3})
        assert sent.inbox_seq == 3  # the retried start's signals were delivered once
        awaited = await keel.await_run(run_id)
        assert awaited.run is not None
        assert [awaited.run.final_snapshot[f"w{i}"] for i in range(3)] == [1, [2], {"three": 3}]


def test_keel_signal_and_keel_run_with_signals(engine_address: str, tmp_path: Any) -> None:
    path = tmp_path / "waits.json"
    path.write_text(
        json.dumps(
            {"pipeline": waits("first", "second", "third"), "signals": [{"name": "first", "payload": 1}]}
        )
    )
    started = run_keel("run", str(path), "--signal", 'second={"two": 2}', "--json", engine=engine_address)
    assert started.code == 0, started.stderr
    run_id = json.loads(started.stdout)["run_id"]
    sent = run_keel("signal", run_id, "third", "--data", '{"x": 1}', "--id", "cli-1", engine=engine_address)
    assert sent.code == 0, sent.stderr
    assert sent.stdout.strip() == f"signal third sent cli-1 to run {run_id}"
    repeat = run_keel("signal", run_id, "third", "--id", "cli-1", "--json", engine=engine_address)
    assert repeat.code == 0, repeat.stderr
    assert json.loads(repeat.stdout) == {
        "run_id": run_id,
        "signal_id": "cli-1",
        "created": False,
        "inbox_seq": 3,
    }
    followed = run_keel("wait", run_id, engine=engine_address)
    assert followed.code == 0, followed.stderr
    bad = run_keel("signal", run_id, "go", "--data", "{not json", engine=engine_address)
    assert bad.code == 1 and bad.stderr.startswith("keel: error: --data is not JSON")
    ended = run_keel("signal", run_id, "go", engine=engine_address)
    assert ended.code == 1 and "is completed" in ended.stderr and "Traceback" not in ended.stderr


def test_keel_wait_shows_a_step_waiting_for_its_signal_until_it_comes(engine_address: str) -> None:
    with KeelClient(engine_address) as keel:
        started = keel.start_run(waits("approval"))
        waiting(keel, started.run_id, "w0")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")} | {
            "KEEL_ENGINE": engine_address
        }
        follower = subprocess.Popen(
            [str(KEEL), "wait", started.run_id],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        try:
            assert follower.stdout is not None
            first = follower.stdout.readline()  # the view's first picture: the step waits
            assert first.startswith("step w0: waiting for signal approval until "), first
            keel.signal_run(started.run_id, "approval", "yes")
            rest = follower.stdout.read()
            assert follower.wait(timeout=60) == 0
        finally:
            follower.kill()
    assert "step w0: completed (attempt 0" in rest


def test_progress_lines_name_the_signal_a_step_waits_for(engine_address: str) -> None:
    from keel_client.display import step_label

    with KeelClient(engine_address) as keel:
        started = keel.start_run(waits("approval"))
        run = waiting(keel, started.run_id, "w0")
        label = step_label(run, run.steps[0])
        assert label.startswith("waiting for signal approval until ") and label.endswith("Z")
        keel.cancel(started.run_id)
