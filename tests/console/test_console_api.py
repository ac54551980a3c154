"""The console's HTTP API against a real engine: errors are explained, actions need the console's header,
a run's events arrive as Server-Sent Events; and `engine-service --console` serves the same console."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from keel_client import KeelClient, RunStatus
from keel_client.local_cluster import LocalCluster

from keel_core.launcher import launcher_env
from tests.console.conftest import KEEL, unique
from tests.test_security import TestCa


def http(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET (or POST `body` as JSON) and return the status and the body, errors included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers=headers or {}, method="GET" if body is None else "POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def error_of(payload: bytes) -> dict[str, str]:
    """The `error` object of an API answer."""
    error: dict[str, str] = json.loads(payload)["error"]
    return error


ACTION = {"content-type": "application/json", "x-keel-console": "1"}


def test_info_names_the_engine_and_the_actions(console_url: str, console_cluster: LocalCluster) -> None:
    status, payload = http(f"{console_url}/api/info")
    info = json.loads(payload)
    assert status == 200
    assert info["engine"] == console_cluster.engine_address
    assert {"cancel", "terminalize", "rerun", "signal", "queues"} <= set(info["actions"])


def test_bad_filters_are_400_with_the_reason(console_url: str) -> None:
    for query, named in (
        ("since=soon", "since"),
        ("status=sleeping", "status"),
        ("label=novalue", "label"),
        ("lineage=cousins", "lineage"),
        ("page_size=0", "page_size"),
        ("min_duration=forever", "min_duration"),
        ("min_duration=2h&max_duration=1h", "min_duration"),
    ):
        status, payload = http(f"{console_url}/api/runs?{query}")
        assert status == 400, query
        assert error_of(payload)["message"].startswith(named), query
    # The engine's own refusal (a label key it does not accept) comes through with its reason.
    status, payload = http(f"{console_url}/api/runs?label=-bad-=x")
    assert status == 400
    assert error_of(payload)["code"] == "invalid_labels"


def test_unknown_run_is_404_run_not_found(console_url: str) -> None:
    status, payload = http(f"{console_url}/api/runs/6f1c2b9e-3d4a-4e5f-9a8b-7c6d5e4f3a2b")
    assert status == 404
    assert error_of(payload)["code"] == "run_not_found"


def test_actions_without_the_console_header_are_refused(
    console_url: str, keel: KeelClient, tmp_path: Path
) -> None:
    started = keel.start_run(
        {
            "pipeline_id": unique("guard"),
            "steps": [
                {"step_id": "s", "op_id": "test.gated_call", "op_config": {"gate": str(tmp_path / "gate")}}
            ],
        }
    )
    status, payload = http(
        f"{console_url}/api/runs/{started.run_id}/cancel", {}, {"content-type": "application/json"}
    )
    assert status == 403 and error_of(payload)["code"] == "forbidden"
    assert keel.get_run(started.run_id).status == RunStatus.RUNNING
    status, payload = http(
        f"{console_url}/api/runs/{started.run_id}/terminalize", {"target": "sideways"}, ACTION
    )
    assert status == 400 and "target" in error_of(payload)["message"]
    status, payload = http(f"{console_url}/api/runs/{started.run_id}/cancel", {"reason": "api test"}, ACTION)
    assert status == 200 and json.loads(payload) == {"outcome": "transitioned", "status": "canceled"}
    status, payload = http(f"{console_url}/api/runs/{started.run_id}/cancel", {}, ACTION)
    assert status == 200 and json.loads(payload)["outcome"] == "noop"


def test_run_events_stream_as_server_sent_events(console_url: str, keel: KeelClient) -> None:
    done = keel.start_run(
        {"pipeline_id": unique("sse"), "steps": [{"step_id": "a", "op_id": "keel.echo"}]}, wait=True
    )
    assert done.run is not None
    status, payload = http(f"{console_url}/api/runs/{done.run_id}/events")
    assert status == 200
    blocks = [block for block in payload.decode().split("\n\n") if block]
    events = [json.loads(block.split("data: ", 1)[1]) for block in blocks if block.startswith("id: ")]
    assert [event["seq"] for event in events] == list(range(1, done.run.head_seq + 1))
    assert events[0]["type"] == "RunStarted" and events[-1]["type"] == "RunCompleted"
    assert blocks[-1].startswith("event: end")
    # Resuming after the last event (what a reconnecting EventSource asks) gives only the end.
    status, payload = http(
        f"{console_url}/api/runs/{done.run_id}/events", headers={"last-event-id": str(done.run.head_seq)}
    )
    assert payload.decode().startswith("event: end")
    status, payload = http(f"{console_url}/api/runs/6f1c2b9e-3d4a-4e5f-9a8b-7c6d5e4f3a2b/events")
    assert "event: failure" in payload.decode() and "run_not_found" in payload.decode()


def test_run_json_has_each_steps_dependencies_and_output(console_url: str, keel: KeelClient) -> None:
    done = keel.start_run(
        {
            "pipeline_id": unique("outputs"),
            "steps": [
                {"step_id": "a", "op_id": "keel.echo", "op_config": {"x": 1}},
                {"step_id": "b", "op_id": "keel.echo", "depends_on": ["a"]},
            ],
        },
        input={"n": 7},
        wait=True,
    )
    status, payload = http(f"{console_url}/api/runs/{done.run_id}")
    run = json.loads(payload)["run"]
    assert status == 200 and run["input"] == {"n": 7}
    steps = {step["step_id"]: step for step in run["steps"]}
    assert steps["b"]["depends_on"] == ["a"] and steps["a"]["depends_on"] == []
    assert steps["a"]["has_output"] and steps["a"]["output"] == run["final_snapshot"]["a"]


def test_pages_are_served(console_url: str) -> None:
    for path in ("/runs", "/runs/anything", "/static/app.js", "/static/style.css"):
        status, _ = http(f"{console_url}{path}")
        assert status == 200, path


@pytest.mark.slow
def test_engine_serves_the_console_itself(console_cluster: LocalCluster, tmp_path: Path) -> None:
    """`engine-service --console`: a second engine on the same store (requiring a bearer token)
    serves the console, which sees the store's runs through that engine's gRPC API with the
    engine's token, and stops with it."""
    token = console_cluster.store_token
    engine_token = "console-test-token"
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "engine-service"),
            "--listen",
            "127.0.0.1:0",
            "--store",
            console_cluster.store_address,
            "--console",
            "127.0.0.1:0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={
            **os.environ,
            **launcher_env(),
            "KEEL_ENGINE_STORE_AUTH_TOKEN": token,
            # The engine requires a token; its console presents it.
            "KEEL_ENGINE_AUTH_TOKEN": engine_token,
        },
    )
    try:
        assert process.stdout is not None
        listening = process.stdout.readline()
        assert listening.startswith("engine-service listening on "), listening
        console = process.stdout.readline()
        assert console.startswith("engine-service console on http://127.0.0.1:"), console
        url = console.split()[-1]
        status, payload = http(f"{url}/api/info")
        assert status == 200 and json.loads(payload)["engine"] == listening.split()[-1]
        with KeelClient(listening.split()[-1], token=engine_token) as keel:
            done = keel.start_run(
                {"pipeline_id": unique("embedded"), "steps": [{"step_id": "a", "op_id": "keel.echo"}]},
                wait=True,
            )
        status, payload = http(f"{url}/api/runs/{done.run_id}")
        assert status == 200 and json.loads(payload)["run"]["status"] == "completed"
        process.terminate()
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def test_engine_console_flag_refuses_tls(console_cluster: LocalCluster, tmp_path: Path) -> None:
    """--console beside --tls is refused at start, saying what to do instead (`keel ui --tls-ca`)."""
    ca = TestCa(tmp_path, "console-ca")
    server = ca.issue("engine", server=True)
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "engine-service"),
            "--listen",
            "127.0.0.1:0",
            "--store",
            console_cluster.store_address,
            "--tls-cert",
            str(server.cert),
            "--tls-key",
            str(server.key),
            "--console",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "KEEL_ENGINE_STORE_AUTH_TOKEN": console_cluster.store_token},
    )
    assert done.returncode == 2
    assert "--console serves a plaintext engine only" in done.stderr
    assert "console on" not in done.stdout


def test_rerun_needs_a_step_and_a_terminal_run(console_url: str, keel: KeelClient, tmp_path: Path) -> None:
    started = keel.start_run(
        {
            "pipeline_id": unique("rerun-api"),
            "steps": [
                {"step_id": "s", "op_id": "test.gated_call", "op_config": {"gate": str(tmp_path / "gate")}}
            ],
        }
    )
    url = f"{console_url}/api/runs/{started.run_id}/rerun"
    status, payload = http(url, {}, ACTION)
    assert status == 400 and error_of(payload)["message"].startswith("from_step_id")
    status, payload = http(url, {"from_step_id": "s"}, ACTION)
    assert status == 409, payload  # FAILED_PRECONDITION: the run has not ended
    (tmp_path / "gate").touch()
    keel.await_run(started.run_id)
    status, payload = http(url, {"from_step_id": "nope"}, ACTION)
    assert status == 404 and error_of(payload)["code"] == "step_not_found"
    status, payload = http(url, {"from_step_id": "s"}, ACTION)
    assert status == 200 and json.loads(payload)["created"] is True
    assert keel.get_run(json.loads(payload)["run_id"]).rerun_of_run_id == started.run_id


def test_queues_answer_as_json(console_url: str) -> None:
    status, payload = http(f"{console_url}/api/queues")
    assert status == 200 and isinstance(json.loads(payload)["queues"], list)


def test_an_unreachable_engine_is_503_unavailable(tmp_path: Path) -> None:
    """The console starts without its engine and says, per call, that the engine cannot be reached."""
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        engine = f"127.0.0.1:{reserved.getsockname()[1]}"
        process = subprocess.Popen(
            [str(KEEL), "ui", "--listen", "127.0.0.1:0", "--engine", engine],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **launcher_env()},
        )
        try:
            assert process.stdout is not None
            url = process.stdout.readline().split()[4]
            status, payload = http(f"{url}/api/runs")
            assert status == 503 and error_of(payload)["code"] == "unavailable"
            status, _ = http(f"{url}/runs")
            assert status == 200
        finally:
            process.terminate()
            assert process.wait(30) == 0
            assert process.stdout is not None
            process.stdout.close()


def test_keel_ui_stops_when_its_launcher_dies(console_cluster: LocalCluster) -> None:
    """A `keel ui` started with the launcher's pid (as the tests start it) exits when that process
    is SIGKILLed, so a killed test run leaves no console behind."""
    launcher = (
        "import os, subprocess, sys\n"
        "from keel_core.launcher import launcher_env\n"
        "ui = subprocess.Popen([sys.argv[1], 'ui', '--listen', '127.0.0.1:0', '--engine', sys.argv[2]],\n"
        "                      stdout=subprocess.PIPE, text=True, env={**os.environ, **launcher_env()})\n"
        "print(ui.pid, ui.stdout.readline().split()[4], flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", launcher, str(KEEL), console_cluster.engine_address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None and parent.stdin is not None
    pid, url = parent.stdout.readline().split()
    assert http(f"{url}/api/info")[0] == 200
    parent.kill()
    parent.wait()
    parent.stdin.close()
    parent.stdout.close()
    # The console notices through a pidfd and exits; waiting for its pid (not a child of this process).
    # (A pidfd is readable once the process has exited, reaped or not: whoever adopted it reaps it.)
    try:
        pidfd = os.pidfd_open(int(pid))
    except ProcessLookupError:
        return  # already exited and reaped
    try:
        readable, _, _ = select.select([pidfd], [], [], 60)
    finally:
        os.close(pidfd)
    assert readable, "keel ui is still running after its launcher died"
    with contextlib.suppress(OSError):
        assert http(f"{url}/api/info")[0] != 200


def test_signal_needs_a_name_and_a_running_run(console_url: str, keel: KeelClient) -> None:
    started = keel.start_run(
        {
            "pipeline_id": unique("signal-api"),
            "steps": [{"step_id": "s", "op_id": "keel.wait_signal", "op_config": {"name": "go"}}],
        }
    )
    url = f"{console_url}/api/runs/{started.run_id}/signal"
    status, payload = http(url, {"payload": 1}, ACTION)
    assert status == 400 and error_of(payload)["message"].startswith("name")
    status, payload = http(url, {"name": "go", "payload": 1}, {"content-type": "application/json"})
    assert status == 403
    status, payload = http(url, {"name": "go", "payload": {"n": 1}, "signal_id": "sig-1"}, ACTION)
    assert status == 200 and json.loads(payload)["created"] is True
    status, payload = http(url, {"name": "go", "payload": {"n": 1}, "signal_id": "sig-1"}, ACTION)
    assert status == 200 and json.loads(payload)["created"] is False
    done = keel.await_run(started.run_id)
    assert done.run is not None and done.run.final_snapshot["s"] == {"n": 1}
    status, payload = http(url, {"name": "go"}, ACTION)
    assert status == 409 and error_of(payload)["code"] == "run_terminal"
