"""Node workers (clients/node/worker.js) as real processes against a real engine and store.

A pipeline mixes steps the engine runs itself with a step a Node worker process runs and one a
Python worker process runs; a Node worker SIGKILLed in the middle of a task leaves its recorded
fact to the worker that takes the next attempt, which is served it without executing it again (the
workers' transport writes every real execution to a ledger file that the test reads); and a Node
worker paused (SIGSTOP) past its lease and then resumed finds its task stale and changes nothing;
a Node worker given SIGTERM with a task still running past its grace hands it back (`worker_shutdown`)
and exits, and the next worker is served its fact; a Node worker reads a context too large to travel
inline through GetArtifact; a cancel of the run aborts a Node worker's handler; a Node worker whose
engine is SIGKILLed mid-task and restarted finishes the task through it; and a Node worker reaches
an engine serving TLS with its bearer token (and says so when its token is refused).

Needs `node` and `npm ci` in clients/node, as tests/client/test_node_client.py does (skipped loudly
without them on a developer machine, failed in CI).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from keel_client import AsyncKeelClient, KeelClient, TlsConfig

from engine_service import EngineConfig, start_engine
from engine_service.runtime.task_board import MAX_INLINE_CONTEXT_BYTES
from keel_core.security import TlsFiles
from store_service.server import StoreConfig, start_store
from tests.client.test_node_client import NODE_CLIENT, _node_or_skip
from tests.engine.processes import start_engine_process, start_store_process
from tests.test_security import TOKEN, TestCa

HERE = Path(__file__).resolve().parent
NODE_WORKER = HERE / "node_worker_process.js"
PYTHON_WORKER = HERE / "python_worker_process.py"


class Processes:
    """Worker processes started by one test; each is stopped (SIGTERM, then SIGKILL) at its end."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Start a worker process and wait for the line that says it is polling."""
        process = subprocess.Popen(
            list(args),
            cwd=NODE_CLIENT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={key: value for key, value in os.environ.items() if not key.startswith("KEEL_")},
        )
        self.started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("WORKER "), f"{args} did not start: {line!r} {self.stderr_of(process)}"
        return process

    @staticmethod
    def stderr_of(process: subprocess.Popen[str]) -> str:
        """What a process that has ended wrote to stderr."""
        if process.poll() is None or process.stderr is None:
            return ""
        return process.stderr.read()

    def stop_all(self) -> None:
        """SIGTERM every process still running (a graceful shutdown), then make sure it is gone."""
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Worker processes, stopped after the test."""
    running = Processes()
    try:
        yield running
    finally:
        running.stop_all()


def node_worker(
    processes: Processes, engine: str, queue: str, worker_id: str, ledger: Path, *flags: str
) -> subprocess.Popen[str]:
    """A Node worker process on `queue`."""
    return processes.start(_node_or_skip(), str(NODE_WORKER), engine, queue, worker_id, str(ledger), *flags)


def attempts_of(run: Any, step_id: str) -> list[Any]:
    """The attempts of one step of a run."""
    return list(next(step for step in run.steps if step.step_id == step_id).attempts)


def test_pipeline_mixing_in_process_node_worker_and_python_worker_steps(
    engine_address: str, processes: Processes, tmp_path: Path
) -> None:
    node_queue, python_queue = f"node-{uuid.uuid4().hex[:8]}", f"py-{uuid.uuid4().hex[:8]}"
    node_worker(processes, engine_address, node_queue, "node-1", tmp_path / "ledger")
    processes.start(sys.executable, str(PYTHON_WORKER), engine_address, python_queue, "python-1")
    pipeline = {
        "pipeline_id": "three-kinds-of-steps",
        "steps": [
            {"step_id": "a", "op_id": "keel.echo", "op_config": {"x": 1}},
            {"step_id": "enrich", "op_id": "node.enrich", "task_queue": node_queue, "depends_on": ["a"]},
            {
                "step_id": "total",
                "op_id": "py.total",
                "task_queue": python_queue,
                "op_config": {"add": 1},
                "depends_on": ["enrich"],
            },
            {
                "step_id": "done",
                "op_id": "keel.transform",
                "op_config": {"fields": {"node_n": "$context.enrich.n", "py_total": "$context.total.total"}},
                "depends_on": ["total"],
            },
        ],
    }
    with KeelClient(engine_address) as client:
        started = client.start_run(pipeline, input={"n": 21}, context={"origin": "pytest"})
        run = client.await_run(started.run_id, max_wait=120).run
        declared = {(op.op_id, op.task_queue, op.description) for op in client.list_ops() if op.task_queue}
    assert ("node.enrich", node_queue, "Doubles n") in declared  # as the Node worker declared it
    assert run is not None
    assert run.status.name == "COMPLETED", run.error
    assert run.final_snapshot == {
        "origin": "pytest",
        "a": {"input": {"n": 21}, "config": {"x": 1}},
        "enrich": {"n": 42, "saw": ["a", "origin"], "by": "node-1"},
        "total": {"total": 43, "lang": "python", "saw": ["a", "enrich", "origin"]},
        "done": {"node_n": 42, "py_total": 43},
    }
    ran_on = {
        step: [(a.task_queue, a.worker_id) for a in attempts_of(run, step)]
        for step in ("a", "enrich", "total")
    }
    assert ran_on == {
        "a": [("", "")],
        "enrich": [(node_queue, "node-1")],
        "total": [(python_queue, "python-1")],
    }


def test_node_worker_killed_mid_task_leaves_its_facts_to_the_next_attempt(
    engine_address: str, processes: Processes, tmp_path: Path
) -> None:
    queue = f"node-{uuid.uuid4().hex[:8]}"
    ledger = tmp_path / "ledger"
    doomed = node_worker(processes, engine_address, queue, "doomed", ledger, "--hang-after-first")
    pipeline = {
        "pipeline_id": "node-worker-killed",
        "steps": [
            # The claim expires 3 s after the last heartbeat of a worker that died.
            {"step_id": "work", "op_id": "node.ledgered", "task_queue": queue, "heartbeat_timeout": "3s"},
        ],
    }
    with KeelClient(engine_address) as client:
        started = client.start_run(pipeline)
        assert doomed.stdout is not None
        assert doomed.stdout.readline().split() == ["HUNG", started.run_id, "0"]
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        node_worker(processes, engine_address, queue, "survivor", ledger)
        run = client.await_run(started.run_id, max_wait=120).run
    assert run is not None
    assert run.status.name == "COMPLETED", run.error
    # Each call executed once: the first by the killed worker, the second by the survivor.
    assert ledger.read_text().splitlines() == [
        f"first:{started.run_id} doomed 0",
        f"second:{started.run_id} survivor 1",
    ]
    assert run.final_snapshot["work"] == {
        "first": {"what": "first", "by": "doomed", "attempt": 0},
        "second": {"what": "second", "by": "survivor", "attempt": 1},
        "attempt": 1,
        "by": "survivor",
    }
    dead, retried = attempts_of(run, "work")
    assert (dead.worker_id, dead.error.code if dead.error else None) == ("doomed", "task_lease_expired")
    assert (retried.worker_id, retried.status.name) == ("survivor", "COMPLETED")


def test_node_worker_sigterm_hands_a_task_still_running_after_the_grace_back_to_the_next_worker(
    engine_address: str, processes: Processes, tmp_path: Path
) -> None:
    queue = f"node-{uuid.uuid4().hex[:8]}"
    ledger = tmp_path / "ledger"
    leaving = node_worker(processes, engine_address, queue, "leaving", ledger, "--hang-after-first")
    pipeline = {
        "pipeline_id": "node-worker-sigterm",
        # The claim would outlive the test: only the hand-back can end attempt 0.
        "steps": [
            {"step_id": "work", "op_id": "node.ledgered", "task_queue": queue, "heartbeat_timeout": "600s"}
        ],
    }
    with KeelClient(engine_address) as client:
        started = client.start_run(pipeline)
        assert leaving.stdout is not None
        assert leaving.stdout.readline().split() == ["HUNG", started.run_id, "0"]
        leaving.send_signal(signal.SIGTERM)  # its grace (shutdownGraceMs) is 2 s; the task hangs
        out, _ = leaving.communicate(timeout=60)
        assert leaving.returncode == 0 and "STOPPED" in out
        node_worker(processes, engine_address, queue, "next", ledger)
        run = client.await_run(started.run_id, max_wait=120).run
    assert run is not None
    assert run.status.name == "COMPLETED", run.error
    # The first call ran once, on the worker that left; the next worker was served it.
    assert ledger.read_text().splitlines() == [
        f"first:{started.run_id} leaving 0",
        f"second:{started.run_id} next 1",
    ]
    handed_back, retried = attempts_of(run, "work")
    assert (handed_back.worker_id, handed_back.error.code if handed_back.error else None) == (
        "leaving",
        "worker_shutdown",
    )
    assert (retried.worker_id, retried.status.name) == ("next", "COMPLETED")


def test_a_cancel_of_the_run_aborts_the_node_workers_handler(
    engine_address: str, processes: Processes, tmp_path: Path
) -> None:
    queue = f"node-{uuid.uuid4().hex[:8]}"
    ledger = tmp_path / "ledger"
    # It heartbeats every third of a second: the cancel reaches it on the next heartbeat.
    worker = node_worker(processes, engine_address, queue, "canceled", ledger)
    pipeline = {
        "pipeline_id": "node-worker-cancel",
        "steps": [
            {"step_id": "w", "op_id": "node.until_aborted", "task_queue": queue, "heartbeat_timeout": "1s"}
        ],
    }
    with KeelClient(engine_address) as client:
        started = client.start_run(pipeline)
        assert worker.stdout is not None
        assert worker.stdout.readline().split() == ["WAITING", started.run_id]
        client.cancel(started.run_id)
        deadline = time.monotonic() + 60  # bounds the wait; no timing claim
        while not ledger.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        run = client.get_run(started.run_id)
    assert run.status.name == "CANCELED"
    assert ledger.read_text().splitlines() == [f"aborted {started.run_id} cancelRequested=true"]


def test_node_worker_reads_a_context_too_large_to_inline_through_get_artifact(
    engine_address: str, processes: Processes, tmp_path: Path
) -> None:
    queue = f"node-{uuid.uuid4().hex[:8]}"
    node_worker(processes, engine_address, queue, "measurer", tmp_path / "ledger")
    # Two echoes of an input under the input's own limit (1 MiB) make a context larger than a task
    # carries inline: the worker must fetch it with GetArtifact.
    blob = "x" * (MAX_INLINE_CONTEXT_BYTES // 2 + 1)
    pipeline = {
        "pipeline_id": "node-big-context",
        "steps": [
            {"step_id": "a", "op_id": "keel.echo"},
            {"step_id": "b", "op_id": "keel.echo"},
            {"step_id": "m", "op_id": "node.measure", "task_queue": queue, "depends_on": ["a", "b"]},
        ],
    }
    with KeelClient(engine_address) as client:
        started = client.start_run(pipeline, input={"blob": blob})
        run = client.await_run(started.run_id, max_wait=120).run
    assert run is not None
    assert run.status.name == "COMPLETED", run.error
    assert run.final_snapshot["m"] == {"sizes": [len(blob), len(blob)]}


def test_node_worker_paused_past_its_lease_finds_its_task_stale_and_changes_nothing(
    engine_address: str, processes: Processes, tmp_path: Path
) -> None:
    queue = f"node-{uuid.uuid4().hex[:8]}"
    ledger = tmp_path / "ledger"
    # One task at a time: while it is stopped, no poll of its own is waiting for the next attempt.
    paused = node_worker(
        processes, engine_address, queue, "paused", ledger, "--pause-after-first", "--concurrency", "1"
    )
    pipeline = {
        "pipeline_id": "node-worker-paused",
        "steps": [
            {"step_id": "work", "op_id": "node.ledgered", "task_queue": queue, "heartbeat_timeout": "3s"}
        ],
    }
    with KeelClient(engine_address) as client:
        started = client.start_run(pipeline)
        assert paused.stdout is not None and paused.stderr is not None
        assert paused.stdout.readline().split() == ["PAUSING", started.run_id, "0"]
        paused.send_signal(signal.SIGSTOP)
        node_worker(processes, engine_address, queue, "survivor", ledger)
        run = client.await_run(started.run_id, max_wait=120).run
        assert run is not None
        assert run.status.name == "COMPLETED", run.error
        # Let the paused worker go on as if nothing had happened: every write it tries is refused.
        paused.send_signal(signal.SIGCONT)
        stale = f"task {started.run_id}/work attempt 0 is stale"
        said = ""
        while stale not in said:
            line = paused.stderr.readline()
            assert line, f"the paused worker ended without finding its task stale: {said}"
            said += line
        after = client.get_run(started.run_id)
    assert after.head_seq == run.head_seq, "the paused worker changed the run"
    assert after.final_snapshot == run.final_snapshot
    assert run.final_snapshot["work"] == {
        "first": {"what": "first", "by": "paused", "attempt": 0},
        "second": {"what": "second", "by": "survivor", "attempt": 1},
        "attempt": 1,
        "by": "survivor",
    }
    lines = ledger.read_text().splitlines()
    assert lines[:2] == [f"first:{started.run_id} paused 0", f"second:{started.run_id} survivor 1"]
    # Resumed, the paused worker may have made its second call before it heard that its claim was
    # gone (the one case a paused process repeats a call: docs/workers.md); it recorded nothing.
    assert lines[2:] in ([], [f"second:{started.run_id} paused 0"])
    dead, retried = attempts_of(run, "work")
    assert (dead.worker_id, dead.error.code if dead.error else None) == ("paused", "task_lease_expired")
    assert retried.worker_id == "survivor"


@pytest.fixture
async def secure_engine(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A store and an engine serving TLS (certificate for 127.0.0.1) and a bearer token: (address, CA)."""
    ca = TestCa(tmp_path, "node-worker-ca")
    server = ca.issue("engine", server=True)
    store = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store")))
    engine = await start_engine(
        EngineConfig(
            listen="127.0.0.1:0",
            store=f"127.0.0.1:{store.port}",
            failpoints="",
            tls=TlsFiles(server.cert, server.key),
            auth_token=TOKEN,
        )
    )
    try:
        yield f"127.0.0.1:{engine.port}", ca.cert
    finally:
        await engine.drain(0.5)
        await store.drain(0.5)


async def test_node_worker_over_tls_with_the_engines_token(
    secure_engine: tuple[str, Path], tmp_path: Path
) -> None:
    node = _node_or_skip()
    address, ca = secure_engine
    queue = f"node-{uuid.uuid4().hex[:8]}"

    async def worker(worker_id: str, token: str) -> asyncio.subprocess.Process:
        # The engine lives on this test's event loop: the worker's output is read without blocking it.
        process = await asyncio.create_subprocess_exec(
            node, str(NODE_WORKER), address, queue, worker_id, str(tmp_path / "ledger"),
            "--ca", str(ca), "--token", token, cwd=NODE_CLIENT, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        assert (await process.stdout.readline()).startswith(b"WORKER ")
        return process

    refused = await worker("refused", "wrong")
    good = await worker("trusted", TOKEN)
    try:
        # A wrong token: every poll is refused, and the worker says so (it keeps trying).
        assert refused.stderr is not None
        said = b""
        while b"PollTask refused: unauthenticated" not in said:
            line = await refused.stderr.readline()
            assert line, f"the worker with a wrong token ended: {said!r}"
            said += line
        pipeline = {
            "pipeline_id": "node-worker-tls",
            "steps": [{"step_id": "enrich", "op_id": "node.enrich", "task_queue": queue}],
        }
        async with AsyncKeelClient(address, tls=TlsConfig(ca_file=ca), token=TOKEN) as client:
            started = await client.start_run(pipeline, input={"n": 5})
            run = (await client.await_run(started.run_id, max_wait=60)).run
        assert run is not None and run.status.name == "COMPLETED", run
        assert run.final_snapshot["enrich"] == {"n": 10, "saw": [], "by": "trusted"}
    finally:
        for process in (refused, good):
            process.send_signal(signal.SIGTERM)
            await process.communicate()
        assert good.returncode == 0


async def test_node_worker_rides_out_its_engine_killed_and_restarted_mid_task(tmp_path: Path) -> None:
    node = _node_or_skip()
    store = await start_store_process(tmp_path / "store")
    engines = [await start_engine_process(store.address, engine_id="first", lease_ttl=1.0)]
    queue, ledger = f"node-{uuid.uuid4().hex[:8]}", tmp_path / "ledger"
    worker = await asyncio.create_subprocess_exec(
        node, str(NODE_WORKER), engines[0].address, queue, "rider", str(ledger), "--pause-after-first",
        cwd=NODE_CLIENT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        assert (await worker.stdout.readline()).startswith(b"WORKER ")
        step = {"step_id": "work", "op_id": "node.ledgered", "task_queue": queue}
        pipeline = {"pipeline_id": "node-worker-engine-killed", "steps": [step]}
        async with AsyncKeelClient(engines[0].address) as client:
            started = await client.start_run(pipeline)
        assert (await worker.stdout.readline()).split() == [b"PAUSING", started.run_id.encode(), b"0"]
        # The engine the worker talks to (and that drives the run) dies with the task half done,
        # and comes back on the same address; the worker goes on through UNAVAILABLE.
        await engines[0].kill()
        restart = ("--listen", engines[0].address)
        engines.append(await start_engine_process(store.address, engine_id="second", extra_args=restart))
        worker.send_signal(signal.SIGCONT)
        async with AsyncKeelClient(engines[1].address) as client:
            awaited = await client.await_run(started.run_id, max_wait=120)
        run = awaited.run
        assert run is not None and run.status.name == "COMPLETED", run
        assert ledger.read_text().splitlines() == [
            f"first:{started.run_id} rider 0",
            f"second:{started.run_id} rider 0",
        ]
        assert [(a.worker_id, a.status.name) for a in attempts_of(run, "work")] == [("rider", "COMPLETED")]
        assert run.final_snapshot["work"]["by"] == "rider"
    finally:
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
        await worker.wait()
        for engine in engines:
            await engine.kill()
        await store.kill()


def test_node_worker_example_runs_against_the_engine(engine_address: str) -> None:
    node = _node_or_skip()
    done = subprocess.run(
        [node, "examples/worker.js"],
        cwd=NODE_CLIENT,
        env={
            **os.environ,
            "KEEL_ENGINE": engine_address,
            "KEEL_TASK_QUEUE": f"example-{uuid.uuid4().hex[:8]}",
        },
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " completed; step quote ran on " in done.stdout
    assert '"total": 3' in done.stdout
