"""Workers and engines killed and paused mid-task (real processes): no task lost, no fact repeated."""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from keel_client import AsyncKeelClient

from tests.engine.processes import (
    ServiceProcess,
    eventually,
    start_engine_process,
    start_postgres_store_process,
    start_store_process,
)
from tests.workers.conftest import Workers, finished, ledger_lines

WITHIN = 60.0  # bounds each wait; no timing claim


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    """A store-service subprocess on SQLite."""
    process = await start_store_process(tmp_path / "store")
    try:
        yield process
    finally:
        await process.kill()


def remote_pipeline(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"pipeline_id": "remote", "steps": list(steps)}


async def _run(client: AsyncKeelClient, run_id: str) -> Any:
    return await client.get_run(run_id)


async def test_worker_killed_mid_task_another_worker_takes_attempt_plus_one_with_its_facts(
    store: ServiceProcess, workers: Workers
) -> None:
    engine = await start_engine_process(store.address)
    try:
        first = await workers.start(engine.address, "pay-q", "worker-a")
        async with AsyncKeelClient(engine.address) as client:
            step = {
                "step_id": "pay",
                "op_id": "slow_pay",
                "task_queue": "pay-q",
                "op_config": {"hang_attempts": [0]},
                "heartbeat_timeout": "1s",
            }
            started = await client.start_run(remote_pipeline(step), input={"amount": 5})
            run_id = started.run_id
            await eventually(
                lambda: ledger_lines(workers.ledger, "paid"),
                "worker A recorded its payment",
                within=WITHIN,
                poll=0.05,
            )
            await first.stop()  # SIGKILL mid-task, after its fact was recorded
            second = await workers.start(engine.address, "pay-q", "worker-b")
            run = await finished(client, run_id)
            assert run.status.name == "COMPLETED", run
            assert run.final_snapshot["pay"]["attempt"] == 1
            assert run.final_snapshot["pay"]["receipt"] == {"paid": 5}
            # The payment ran once: worker B was served the fact worker A recorded.
            assert ledger_lines(workers.ledger, "pay") == [f"pay pay:{run_id}:pay"]
            attempts = run.steps[0].attempts
            assert [a.attempt for a in attempts] == [0, 1]
            assert attempts[0].error is not None and attempts[0].error.code == "task_lease_expired"
            assert attempts[1].worker_id == second.worker_id
    finally:
        await engine.kill()


async def test_a_worker_killed_mid_task_on_a_step_without_timeouts_frees_it_after_the_engines_default(
    store: ServiceProcess, workers: Workers
) -> None:
    """No step timeout at all: the engine's default heartbeat timeout (here 1 s, by its flag; 60 s by
    default) ends the dead worker's claim, and the attempt is retried, rather than waiting for ever."""
    engine = await start_engine_process(store.address, extra_args=("--task-heartbeat-timeout", "1"))
    try:
        first = await workers.start(engine.address, "pay-q", "worker-a")
        async with AsyncKeelClient(engine.address) as client:
            step = {
                "step_id": "pay",
                "op_id": "slow_pay",
                "task_queue": "pay-q",
                "op_config": {"hang_attempts": [0]},
            }
            started = await client.start_run(remote_pipeline(step), input={"amount": 3})
            run_id = started.run_id
            await eventually(
                lambda: ledger_lines(workers.ledger, "paid"),
                "worker A recorded its payment",
                within=WITHIN,
                poll=0.05,
            )
            await first.stop()  # SIGKILL mid-task: it will never heartbeat again
            second = await workers.start(engine.address, "pay-q", "worker-b")
            run = await finished(client, run_id)
            assert run.status.name == "COMPLETED", run
            attempts = run.steps[0].attempts
            assert [a.attempt for a in attempts] == [0, 1]
            assert attempts[0].error is not None and attempts[0].error.code == "task_lease_expired"
            assert "1000 ms (the engine's default heartbeat timeout)" in attempts[0].error.message
            assert attempts[1].worker_id == second.worker_id
            assert ledger_lines(workers.ledger, "pay") == [f"pay pay:{run_id}:pay"]  # paid once
    finally:
        await engine.kill()


async def test_worker_paused_past_its_lease_then_completing_is_stale_and_changes_nothing(
    store: ServiceProcess, workers: Workers
) -> None:
    engine = await start_engine_process(store.address)
    try:
        paused = await workers.start(engine.address, "pay-q", "worker-a")
        async with AsyncKeelClient(engine.address) as client:
            step = {
                "step_id": "pay",
                "op_id": "slow_pay",
                "task_queue": "pay-q",
                "op_config": {"sleep": 1.5},
                "heartbeat_timeout": "1s",
            }
            started = await client.start_run(remote_pipeline(step), input={"amount": 7})
            run_id = started.run_id
            await eventually(
                lambda: ledger_lines(workers.ledger, "paid"), "worker A is working", within=WITHIN, poll=0.02
            )
            paused.signal(signal.SIGSTOP)
            other = await workers.start(engine.address, "pay-q", "worker-b")
            run = await finished(client, run_id)
            assert run.status.name == "COMPLETED", run
            assert run.steps[0].attempts[-1].worker_id == other.worker_id
            head = run.head_seq
            paused.signal(signal.SIGCONT)  # it finishes its sleep, or heartbeats first: either is refused
            await eventually(
                lambda: "is stale" in paused.log_text(), "worker A heard task_stale", within=WITHIN, poll=0.05
            )
            after = await client.get_run(run_id)
            assert after.head_seq == head
            assert after.final_snapshot == run.final_snapshot
            assert run.final_snapshot["pay"]["attempt"] == 1  # the other worker's outcome
            assert ledger_lines(workers.ledger, "pay") == [f"pay pay:{run_id}:pay"]
    finally:
        await engine.kill()


async def _engine_killed_while_workers_busy(store_address: str, workers: Workers, tmp_path: Path) -> None:
    driving = await start_engine_process(store_address, engine_id="driving", lease_ttl=1.0)
    survivor = await start_engine_process(store_address, engine_id="survivor", lease_ttl=1.0)
    try:
        await workers.start(survivor.address, "busy-q", "worker-a")
        await workers.start(survivor.address, "busy-q", "worker-b")
        steps: list[dict[str, Any]] = [
            {"step_id": f"s{i}", "op_id": "slow_pay", "task_queue": "busy-q", "op_config": {"sleep": 1.0}}
            for i in range(4)
        ]
        steps.append(
            {
                "step_id": "after",
                "op_id": "slow_pay",
                "task_queue": "busy-q",
                "depends_on": [s["step_id"] for s in steps],
            }
        )
        run_id = str(uuid.uuid4())
        async with AsyncKeelClient(driving.address) as client:
            await client.start_run(remote_pipeline(*steps), input={"amount": 1}, run_id=run_id)
        await eventually(
            lambda: len(ledger_lines(workers.ledger, "paid")) >= 2,
            "workers are busy",
            within=WITHIN,
            poll=0.02,
        )
        await driving.kill()
        async with AsyncKeelClient(survivor.address) as client:
            run = await finished(client, run_id)
        assert run.status.name == "COMPLETED", run
        assert sorted(run.final_snapshot) == ["after", "s0", "s1", "s2", "s3"]
        # Every step's task ran once, as attempt 0: none was lost or issued twice.
        starts = sorted(tuple(line.split()[2:]) for line in ledger_lines(workers.ledger, "start"))
        assert starts == [(s, "0") for s in ["after", "s0", "s1", "s2", "s3"]]
        assert len(ledger_lines(workers.ledger, "pay")) == 5
        assert all(len(step.attempts) == 1 for step in run.steps)
    finally:
        await driving.kill()
        await survivor.kill()


async def test_engine_killed_while_workers_busy_loses_no_task_sqlite(
    store: ServiceProcess, workers: Workers, tmp_path: Path
) -> None:
    await _engine_killed_while_workers_busy(store.address, workers, tmp_path)


async def test_engine_killed_while_workers_busy_loses_no_task_postgres(
    postgres_dsn: str, workers: Workers, tmp_path: Path
) -> None:
    pg_store = await start_postgres_store_process(postgres_dsn, f"workers_{uuid.uuid4().hex[:8]}")
    try:
        await _engine_killed_while_workers_busy(pg_store.address, workers, tmp_path)
    finally:
        await pg_store.kill()
