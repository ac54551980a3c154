"""The operator's CLI: enums by proto name, syntax errors naming file and line, `keel get` shows the input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import UTC
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
import yaml
from keel.engine.v1 import engine_pb2
from keel_client import KeelClient, RunStatus
from keel_client.errors import InvalidArgumentError
from keel_client.models import (
    ExecutionMode,
    ParentClosePolicy,
    StepStatus,
    TerminalizeOutcome,
    TerminalTarget,
    parse_enum,
    proto_name,
)
from keel_client.wire import list_runs_request, run_config_message, spawn_child_request, terminalize_request

from tests.client.conftest import KEEL, pipeline, run_keel, step

ENUMS = (RunStatus, StepStatus, ExecutionMode, ParentClosePolicy, TerminalTarget, TerminalizeOutcome)


@pytest.mark.parametrize("kind", ENUMS)
def test_every_member_is_read_by_its_value_and_by_its_proto_name_in_any_case(kind: type[StrEnum]) -> None:
    proto_enum = engine_pb2.DESCRIPTOR.enum_types_by_name[kind.__name__]
    for member in kind:
        name = proto_name(member)
        assert name in proto_enum.values_by_name, f"{name} is not in engine.proto"
        for text in (member.value, member.value.upper(), name, name.lower(), f" {name} "):
            assert parse_enum(kind, text) is member


def test_an_unknown_enum_value_says_what_is_accepted() -> None:
    with pytest.raises(ValueError, match=r"expected one of running, completed.*RUN_STATUS_RUNNING"):
        parse_enum(RunStatus, "RUN_STATUS_BOGUS")
    # A prefix of another enum is not a way in.
    with pytest.raises(ValueError):
        parse_enum(RunStatus, "TERMINAL_TARGET_FAILED")


def test_requests_take_proto_names_and_refuse_nonsense_as_invalid_argument() -> None:
    assert list(list_runs_request(["RUN_STATUS_FAILED", "Canceled"], 10, None).statuses) == [
        engine_pb2.RUN_STATUS_FAILED,
        engine_pb2.RUN_STATUS_CANCELED,
    ]
    assert (
        terminalize_request("r", "terminal_target_canceled", "").target == engine_pb2.TERMINAL_TARGET_CANCELED
    )
    config = run_config_message({"execution_mode": "EXECUTION_MODE_REPLAY", "replay_of_run_id": "x"})
    assert config is not None and config.execution_mode == engine_pb2.EXECUTION_MODE_REPLAY
    spawn = spawn_child_request(
        "p", "k", "keel.echo", op_version="", op_config=None, input=None, context=None, run_config=None,
        parent_close_policy="PARENT_CLOSE_POLICY_ABANDON",  # type: ignore[arg-type]
    )  # fmt: skip
    assert spawn.parent_close_policy == engine_pb2.PARENT_CLOSE_POLICY_ABANDON
    for bad in (
        lambda: list_runs_request(["RUN_STATUS_PENDING"], 10, None),
        lambda: list_runs_request(["nope"], 10, None),
        lambda: terminalize_request("r", "RUN_STATUS_CANCELED", ""),
        lambda: run_config_message({"execution_mode": "fast"}),
    ):
        with pytest.raises(InvalidArgumentError):
            bad()


def test_cli_accepts_proto_names_for_status_target_and_execution_mode(
    engine_address: str, tmp_path: Path
) -> None:
    path = tmp_path / "live.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "pipeline": pipeline("cli-enum", step("a", "keel.echo", {"x": 1})),
                "run_config": {"execution_mode": "EXECUTION_MODE_LIVE"},
            }
        )
    )
    started = run_keel("run", str(path), "--wait", "--json", engine=engine_address)
    assert started.code == 0, started.stderr
    run_id = json.loads(started.stdout)["run_id"]
    listed = run_keel(
        "ls", "--json", "--limit", "1000", "--status", "run_status_COMPLETED", engine=engine_address
    )
    assert listed.code == 0, listed.stderr
    assert run_id in {summary["run_id"] for summary in json.loads(listed.stdout)}
    ended = run_keel("terminalize", run_id, "--target", "TERMINAL_TARGET_CANCELED", engine=engine_address)
    assert ended.code == 0, ended.stderr
    assert ended.stdout.strip() == f"run {run_id} was already completed; nothing changed"
    refused = run_keel("ls", "--status", "RUN_STATUS_PENDING", engine=engine_address)
    assert refused.code == 2
    assert "'RUN_STATUS_PENDING' is not one of running, completed, failed, canceled" in refused.stderr


@pytest.mark.parametrize(
    ("name", "content", "where", "problem"),
    [
        (
            "tabs.yaml",
            "pipeline:\n  pipeline_id: x\n  steps:\n   - step_id: a\n    op_id: b\n",
            ":5:5: ",
            "expected",
        ),
        ("flow.yml", "pipeline: {pipeline_id: x\nsteps: []\n", ":2:6: ", "expected ',' or '}'"),
        ("broken.json", '{"pipeline":\n  {"pipeline_id": }\n}', ":2:19: ", "Expecting value"),
    ],
)
def test_a_syntax_error_is_one_line_naming_the_file_line_and_column(
    engine_address: str, tmp_path: Path, name: str, content: str, where: str, problem: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    result = run_keel("run", str(path), engine=engine_address)
    assert result.code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"keel: error: {path}{where}not valid ")
    assert problem in lines[0]
    assert "<unicode string>" not in lines[0]


def test_get_shows_the_runs_input(engine_address: str, tmp_path: Path) -> None:
    echo = pipeline("cli-input", step("a", "keel.echo", {"x": 1}))
    path = tmp_path / "echo.yaml"
    path.write_text(yaml.safe_dump({"pipeline": echo}))
    given = {"who": "ada", "tags": ["a", "b"]}
    started = run_keel(
        "run", str(path), "--input", json.dumps(given), "--wait", "--json", engine=engine_address
    )
    assert started.code == 0, started.stderr
    run = json.loads(started.stdout)
    assert run["input"] == given
    got = run_keel("get", run["run_id"], engine=engine_address)
    assert 'input      {"tags":["a","b"],"who":"ada"}' in got.stdout.splitlines()
    long_input = {"text": "x" * 200}
    with KeelClient(engine_address) as keel:
        long_run = keel.start_run(echo, input=long_input, wait=True).run
        bare = keel.start_run(echo, wait=True).run
    assert long_run is not None and long_run.input == long_input
    assert bare is not None and bare.input is None
    lines = run_keel("get", long_run.run_id, engine=engine_address).stdout.splitlines()
    assert "input      (below)" in lines
    section = lines.index("input:")
    assert lines[section + 1 : section + 4] == ["  {", f'    "text": "{"x" * 200}"', "  }"]
    assert "input      null" in run_keel("get", bare.run_id, engine=engine_address).stdout.splitlines()


NOISY_OPS = """
import sys
import warnings

print("noisy ops: a plain line on stdout", flush=True)
print("noisy ops: a plain line on stderr", file=sys.stderr, flush=True)
warnings.warn("noisy ops: a warning", UserWarning, stacklevel=1)
"""


def _log_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        entry = json.loads(line)  # every line, or the test fails here naming it
        assert isinstance(entry, dict), f"{path.name}:{number} is not a JSON object: {line}"
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), f"{path.name}:{number}: {line}"
        records.append(entry)
    return records


def test_keel_up_logs_hold_only_json_lines(tmp_path: Path) -> None:
    ops = tmp_path / "noisy_ops.py"
    ops.write_text(NOISY_OPS)
    up = subprocess.Popen(
        [str(KEEL), "up", "--json", "--data-dir", str(tmp_path / "data"), "--store-listen", "127.0.0.1:0",
         "--engine-listen", "127.0.0.1:0", "--ops", str(ops)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        ready = json.loads(up.stdout.readline())
        with KeelClient(ready["engine"]) as keel:
            run = keel.start_run(pipeline("logs", step("a", "keel.echo")), wait=True).run
        assert run is not None and run.status is RunStatus.COMPLETED
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    logs = tmp_path / "data" / "logs"
    store, engine = _log_records(logs / "store-service.log"), _log_records(logs / "engine-service.log")
    banners = [entry for entry in store if entry["msg"].startswith("store-service listening on ")]
    assert [(entry["level"], entry["stream"]) for entry in banners] == [("info", "stdout")]
    assert any(entry["msg"].startswith("engine-service listening on ") for entry in engine)
    by_message = {entry["msg"]: entry for entry in engine}
    assert by_message["noisy ops: a plain line on stdout"]["level"] == "info"
    assert by_message["noisy ops: a plain line on stderr"]["level"] == "error"
    warning = next(entry for entry in engine if "UserWarning: noisy ops: a warning" in entry["msg"])
    assert warning["level"] == "warning" and warning["logger"] == "engine-service.stderr"
    # The services' own records pass through untouched.
    assert any(entry["logger"] == "engine_service" and entry.get("stream") is None for entry in engine)


def test_a_service_that_dies_with_a_traceback_still_logs_json_and_is_named(tmp_path: Path) -> None:
    ops = tmp_path / "broken_ops.py"
    ops.write_text('raise RuntimeError("broken ops cannot load")\n')
    result = run_keel(
        "up", "--data-dir", str(tmp_path / "data"), "--store-listen", "127.0.0.1:0",
        "--engine-listen", "127.0.0.1:0", "--ops", str(ops),
    )  # fmt: skip
    assert result.code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("keel: error: engine-service exited with code 1: ")
    assert "RuntimeError: broken ops cannot load" in lines[0] and "engine-service.log" in lines[0]
    records = _log_records(tmp_path / "data" / "logs" / "engine-service.log")
    traceback = [entry for entry in records if entry.get("stream") == "stderr"]
    assert traceback[0]["msg"] == "Traceback (most recent call last):"
    assert traceback[-1]["msg"] == "RuntimeError: broken ops cannot load"
    assert all(entry["level"] == "error" for entry in traceback)


def test_run_wait_shows_the_steps_a_cancel_cut_as_canceled(engine_address: str, tmp_path: Path) -> None:
    path = tmp_path / "nap.yaml"
    nap = pipeline(
        "cli-cancel",
        step("nap", "keel.sleep_in_process", {"seconds": 300}),
        step("after", "keel.echo", None, ("nap",)),
    )
    path.write_text(yaml.safe_dump({"pipeline": nap}))
    follow = subprocess.Popen(
        [str(KEEL), "run", str(path), "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        env={**os.environ, "KEEL_ENGINE": engine_address},
    )  # fmt: skip
    try:
        assert follow.stdout is not None
        run_id = follow.stdout.readline().split()[-1]
        for line in follow.stdout:  # until the step is seen running: the cancel then cuts it
            if line.startswith("step nap: running"):
                break
        with KeelClient(engine_address) as keel:
            keel.terminalize(run_id, "TERMINAL_TARGET_CANCELED", reason="operator")
        rest = follow.stdout.read().splitlines()
        assert follow.wait(timeout=60) == 1
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert [line.split(" (")[0] for line in rest[:3]] == [
        "step nap: canceled",
        "step after: canceled",
        f"run {run_id}: canceled",
    ]
    assert not any("failed" in line or "running" in line for line in rest)


def test_get_shows_a_waiting_step_with_its_timer(engine_address: str) -> None:
    nap = pipeline("cli-wait", step("nap", "keel.sleep", {"seconds": 300}))
    with KeelClient(engine_address) as keel:
        run_id = keel.start_run(nap).run_id
        deadline = time.monotonic() + 60  # bounds the wait; no timing claim
        while keel.get_run(run_id).steps[0].status is not StepStatus.WAITING:
            assert time.monotonic() < deadline, "the step never waited"
            time.sleep(0.05)
        [attempt] = keel.get_run(run_id).steps[0].attempts
        assert attempt.wait is not None and attempt.wait.kind == "timer" and attempt.wait.until is not None
        until = attempt.wait.until.astimezone(UTC)
        shown = run_keel("get", run_id, engine=engine_address)
        keel.terminalize(run_id, "TERMINAL_TARGET_CANCELED", reason="seen")
    assert shown.code == 0, shown.stderr
    [row] = [line for line in shown.stdout.splitlines() if line.strip().startswith("nap ")]
    assert f"waiting (timer until {until:%H:%M:%S}Z)" in row
