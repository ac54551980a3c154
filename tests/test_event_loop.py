"""--event-loop: both services choose asyncio's loop or uvloop, from the flag or the environment.

The end-to-end test starts a real store and engine on uvloop and runs a pipeline through them.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from keel_client import KeelClient, RunStatus

from engine_service.server import parse_args as engine_args
from keel_core.serving import DEFAULT_EVENT_LOOP, event_loop_factory, run_service
from store_service.server import parse_args as store_args
from tests.subprocess_services import BIN, running_service

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (pip install -e '.[dev]')")


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_factory_per_choice() -> None:
    assert event_loop_factory("asyncio") is None
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    assert event_loop_factory("auto") is uvloop.new_event_loop  # installed here
    with pytest.raises(ValueError, match="unknown event loop 'tokio'"):
        event_loop_factory("tokio")


def test_run_service_runs_on_the_chosen_loop() -> None:
    seen: list[str] = []

    async def record() -> None:
        seen.append(await loop_module())

    run_service(record(), "uvloop")
    run_service(record(), "asyncio")
    assert seen[0].startswith("uvloop")
    assert seen[1].startswith("asyncio")


@pytest.mark.parametrize("parse", [store_args, engine_args], ids=["store", "engine"])
def test_flag_and_environment(
    parse: Callable[[Sequence[str] | None], argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = "KEEL_STORE" if parse is store_args else "KEEL_ENGINE"
    for name in ("KEEL_EVENT_LOOP", f"{prefix}_EVENT_LOOP"):
        monkeypatch.delenv(name, raising=False)
    assert parse([]).event_loop == DEFAULT_EVENT_LOOP
    monkeypatch.setenv("KEEL_EVENT_LOOP", "uvloop")
    assert parse([]).event_loop == "uvloop"
    monkeypatch.setenv(f"{prefix}_EVENT_LOOP", "asyncio")  # the service's own variable wins
    assert parse([]).event_loop == "asyncio"
    assert parse(["--event-loop", "auto"]).event_loop == "auto"  # and the flag wins over both
    monkeypatch.setenv(f"{prefix}_EVENT_LOOP", "uvlop")
    with pytest.raises(SystemExit):
        parse([])


def test_both_services_on_uvloop_complete_a_run(tmp_path: Path) -> None:
    pipeline = {
        "pipeline_id": "loops",
        "steps": [
            {"step_id": "a", "op_id": "keel.echo"},
            {"step_id": "b", "op_id": "keel.echo", "depends_on": ["a"]},
        ],
    }
    store_cmd = [str(BIN / "store-service"), "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)]
    engine_cmd = [str(BIN / "engine-service"), "--listen", "127.0.0.1:0", "--log-level", "debug"]
    log = (tmp_path / "engine.log").open("wb")
    with (
        log,
        running_service([*store_cmd, "--event-loop", "uvloop"], {}, "store-service listening on") as store,
        running_service(
            engine_cmd,
            {"KEEL_ENGINE_STORE": store, "KEEL_EVENT_LOOP": "uvloop"},
            "engine-service listening on",
            stderr=log,
        ) as engine,
        KeelClient(engine) as keel,
    ):
        started = keel.start_run(pipeline, input={"n": 1}, wait=True, deadline=60)
        assert started.run is not None
        assert started.run.status is RunStatus.COMPLETED
    assert "event loop: uvloop (uvloop)" in (tmp_path / "engine.log").read_text()


def test_uvloop_missing_is_a_clear_error(tmp_path: Path) -> None:
    """With uvloop hidden from the interpreter, --event-loop uvloop fails at start-up and says why."""
    hide = "import sys; sys.modules['uvloop'] = None; "
    for module, code in (("store_service.server", 1), ("engine_service.server", 2)):
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                f"{hide}from {module} import main; "
                f"raise SystemExit(main(['--listen', '127.0.0.1:0', '--event-loop', 'uvloop']))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert done.returncode == code, done.stderr
        assert "uvloop is not installed" in done.stderr
