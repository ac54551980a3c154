"""The `keel` CLI driven as a subprocess against a real engine and store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from keel_client import KeelClient, RunStatus

from tests.client.conftest import KEEL, pipeline, run_keel, step

GOOD: dict[str, Any] = {
    "pipeline": pipeline(
        "cli-good",
        step("hello", "keel.echo", {"greeting": "hi"}),
        step(
            "shape",
            "keel.transform",
            {"fields": {"who": "$input.who", "tenant": "$context.tenant"}},
            ("hello",),
        ),
    ),
    "input": {"who": "ada"},
    "context": {"tenant": "acme"},
}
FAILING = pipeline(
    "cli-failing", step("boom", "keel.fail_n_times", {"n": 1, "retryable": False, "code": "broken"})
)


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    return path


@pytest.fixture
def failing_file(tmp_path: Path) -> Path:
    path = tmp_path / "failing.json"
    path.write_text(json.dumps(FAILING))
    return path


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("keel: ")
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_run_wait_shows_progress_and_the_final_snapshot_and_exits_zero(
    engine_address: str, good_file: Path
) -> None:
    result = run_keel("run", str(good_file), "--wait", engine=engine_address)
    assert result.code == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert out.startswith("started run ")
    assert "step hello: completed (attempt 0" in out
    assert "step shape: completed (attempt 0" in out
    assert "\x1b[" not in out  # not a terminal: plain appended lines, no cursor movement
    snapshot = json.loads(out[out.index("\n{") :])
    assert snapshot["shape"] == {"who": "ada", "tenant": "acme"}


def test_run_wait_of_a_failing_pipeline_exits_one_and_says_why(
    engine_address: str, failing_file: Path
) -> None:
    result = run_keel("run", str(failing_file), "--wait", engine=engine_address)
    assert result.code == 1
    assert "step boom: failed (attempt 0" in result.stdout
    assert_one_line_error(result.stderr, "failed", "boom")


def test_run_wait_json_prints_the_terminal_run_as_json(engine_address: str, good_file: Path) -> None:
    result = run_keel("run", str(good_file), "--wait", "--json", engine=engine_address)
    assert result.code == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["status"] == "completed"
    assert [s["step_id"] for s in run["steps"]] == ["hello", "shape"]
    assert run["final_snapshot"]["hello"] == {"input": {"who": "ada"}, "config": {"greeting": "hi"}}


def test_run_wait_json_of_a_failing_pipeline_still_prints_json_and_exits_one(
    engine_address: str, failing_file: Path
) -> None:
    result = run_keel("run", str(failing_file), "--wait", "--json", engine=engine_address)
    assert result.code == 1
    run = json.loads(result.stdout)
    assert run["status"] == "failed"
    assert run["steps"][0]["last_error"]["code"] == "broken"


def test_input_context_and_run_id_flags_reach_the_run(engine_address: str, good_file: Path) -> None:
    run_id = str(uuid.uuid4())
    args = (
        "run",
        str(good_file),
        "--input",
        '{"who": "bob"}',
        "--context",
        '{"tenant": "t9"}',
        "--run-id",
        run_id,
    )
    first = run_keel(*args, "--json", engine=engine_address)
    assert first.code == 0, first.stderr
    started = json.loads(first.stdout)
    assert started["run_id"] == run_id and started["created"] is True
    again = run_keel(*args, engine=engine_address)
    assert again.code == 0
    assert again.stdout.strip() == f"already exists: run {run_id}"
    with KeelClient(engine_address) as keel:
        run = keel.await_run(run_id).run
    assert run is not None and run.final_snapshot["shape"] == {"who": "bob", "tenant": "t9"}


def test_get_history_ls_print_tables_and_json(engine_address: str, good_file: Path) -> None:
    run = json.loads(run_keel("run", str(good_file), "--wait", "--json", engine=engine_address).stdout)
    run_id = run["run_id"]

    got = run_keel("get", run_id, engine=engine_address)
    assert got.code == 0
    assert f"run        {run_id}" in got.stdout
    assert "status     completed" in got.stdout
    assert "STEP   OP                STATUS     ATTEMPT" in got.stdout
    assert json.loads(run_keel("get", run_id, "--json", engine=engine_address).stdout) == run

    history = run_keel("history", run_id, engine=engine_address)
    assert history.code == 0
    lines = history.stdout.strip().splitlines()
    assert len(lines) == run["head_seq"]
    assert "RunStarted" in lines[0] and "RunCompleted" in lines[-1]
    assert "step_id=hello attempt=0" in lines[1]
    events = json.loads(run_keel("history", run_id, "--json", engine=engine_address).stdout)
    assert [event["seq"] for event in events] == list(range(1, run["head_seq"] + 1))
    assert events[-1]["type"] == "RunCompleted"

    listed = run_keel("ls", "--status", "completed", "--limit", "1000", engine=engine_address)
    assert listed.code == 0
    assert listed.stdout.splitlines()[0].split() == [
        "RUN",
        "ID",
        "PIPELINE",
        "STATUS",
        "STARTED",
        "DURATION",
        "LABELS",
        "PARENT",
    ]
    assert run_id in listed.stdout
    summaries = json.loads(run_keel("ls", "--json", "--limit", "1000", engine=engine_address).stdout)
    assert run_id in {summary["run_id"] for summary in summaries}
    assert json.loads(run_keel("ls", "--json", "--limit", "1", engine=engine_address).stdout)[0].keys() >= {
        "run_id",
        "status",
    }
    failed_only = json.loads(run_keel("ls", "--json", "--status", "failed", engine=engine_address).stdout)
    assert all(summary["status"] == "failed" for summary in failed_only)


def test_ops_lists_builtin_ops(engine_address: str) -> None:
    table = run_keel("ops", engine=engine_address)
    assert table.code == 0
    assert table.stdout.splitlines()[0].split() == ["OP", "VERSION", "QUEUE", "DESCRIPTION"]
    assert "keel.echo" in table.stdout
    ops = json.loads(run_keel("ops", "--json", engine=engine_address).stdout)
    assert {"op_id": "keel.sleep", "op_version": "1"}.items() <= next(
        op for op in ops if op["op_id"] == "keel.sleep"
    ).items()


@pytest.mark.parametrize("command", ["get", "history", "wait"])
def test_unknown_run_id_is_one_line_on_stderr_and_exit_one(engine_address: str, command: str) -> None:
    missing = str(uuid.uuid4())
    result = run_keel(command, missing, engine=engine_address)
    assert result.code == 1
    assert result.stdout == ""
    assert_one_line_error(result.stderr, "run_not_found", missing)


def test_invalid_plan_is_one_line(engine_address: str, tmp_path: Path) -> None:
    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text(
        yaml.safe_dump(
            pipeline(
                "c", step("a", "keel.echo", depends_on=("b",)), step("b", "keel.echo", depends_on=("a",))
            )
        )
    )
    result = run_keel("run", str(cyclic), engine=engine_address)
    assert result.code == 1
    assert_one_line_error(result.stderr, "invalid_plan")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("steps: [unclosed", "not valid YAML"), ("- just\n- a list\n", "must hold a pipeline object")],
)
def test_unreadable_pipeline_file_is_one_line(
    engine_address: str, tmp_path: Path, content: str, fragment: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    result = run_keel("run", str(path), engine=engine_address)
    assert result.code == 1
    assert_one_line_error(result.stderr, fragment)
    missing = run_keel("run", str(tmp_path / "absent.yaml"), engine=engine_address)
    assert_one_line_error(missing.stderr, "cannot read")


def test_bad_input_json_is_one_line(engine_address: str, good_file: Path) -> None:
    result = run_keel("run", str(good_file), "--input", "{nope", engine=engine_address)
    assert result.code == 1
    assert_one_line_error(result.stderr, "--input is not JSON")


def test_unreachable_engine_is_one_line_with_a_hint() -> None:
    result = run_keel("ops", "--engine", "127.0.0.1:1")
    assert result.code == 1
    assert_one_line_error(result.stderr, "unavailable", "keel up")


def test_help_documents_the_environment_variables() -> None:
    result = run_keel("--help")
    assert result.code == 0
    for name in ("KEEL_ENGINE", "KEEL_DATA_DIR", "KEEL_TOKEN", "exit status"):
        assert name in result.stdout
    assert "KEEL_ENGINE" in run_keel("run", "--help").stdout


def test_keel_up_serves_both_until_sigterm_then_stops_them(tmp_path: Path) -> None:
    up = subprocess.Popen(
        [str(KEEL), "up", "--json", "--data-dir", str(tmp_path), "--store-listen", "127.0.0.1:0",
         "--engine-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        ready = json.loads(up.stdout.readline())
        with KeelClient(ready["engine"]) as keel:
            run = keel.start_run(
                GOOD["pipeline"], input={"who": "up"}, context={"tenant": "x"}, wait=True
            ).run
        assert run is not None and run.status is RunStatus.COMPLETED
        assert (tmp_path / "store").is_dir()
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        for pid in (ready["store_pid"], ready["engine_pid"]):
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" in status.read_text()
    except FileNotFoundError:
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="the launcher is watched on Linux only")
def test_services_stop_when_keel_up_is_killed(tmp_path: Path) -> None:
    up = subprocess.Popen(
        [str(KEEL), "up", "--json", "--data-dir", str(tmp_path), "--store-listen", "127.0.0.1:0",
         "--engine-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert up.stdout is not None
    ready = json.loads(up.stdout.readline())
    pids = (ready["store_pid"], ready["engine_pid"])
    up.kill()
    up.wait()
    deadline = time.monotonic() + 60
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if not _gone(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "services outlived a killed `keel up`"


def test_keel_demo_runs_the_demo_pipeline_and_exits_zero() -> None:
    result = run_keel("demo", timeout=120)
    assert result.code == 0, result.stderr
    assert "step flaky: retrying (attempt 0" in result.stdout
    assert "step flaky: completed (attempt 1" in result.stdout
    assert " completed in " in result.stdout
    assert '"looked_up": "ada"' in result.stdout


def test_keel_module_runs_as_a_script() -> None:
    done = subprocess.run([sys.executable, "-m", "keel_client.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "keel" in done.stdout


def test_keel_up_on_a_taken_port_is_one_line_naming_the_service(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_keel(
            "up",
            "--data-dir",
            str(tmp_path),
            "--store-listen",
            "127.0.0.1:0",
            "--engine-listen",
            f"127.0.0.1:{port}",
        )
    assert result.code == 1
    assert_one_line_error(result.stderr, "engine-service exited with code", str(port), "engine-service.log")
