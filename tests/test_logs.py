"""Both services log JSON lines on stderr; a run's lines carry its run_id, step_id and attempt."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from keel_client import KeelClient, RunStatus

from keel_core.logs import JsonFormatter, log_context
from tests.subprocess_services import BIN, running_service

PIPELINE = {
    "pipeline_id": "logged",
    "steps": [
        {"step_id": "flaky", "op_id": "keel.fail_n_times", "op_config": {"n": 1, "retryable": True}},
        {"step_id": "echo", "op_id": "keel.echo", "depends_on": ["flaky"]},
    ],
}


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a log file, each of which must be one JSON object."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path.name} is empty"
    entries = [json.loads(line) for line in lines]  # a line that is not JSON fails here
    for entry in entries:
        assert isinstance(entry, dict) and {"ts", "level", "logger", "msg"} <= entry.keys(), entry
    return entries


def test_a_runs_engine_log_lines_are_json_and_carry_run_step_and_attempt(tmp_path: Path) -> None:
    store_log = tmp_path / "store.log"
    engine_log = tmp_path / "engine.log"
    store_args = [str(BIN / "store-service"), "--listen=127.0.0.1:0", f"--data-dir={tmp_path / 'store'}"]
    with (
        store_log.open("wb") as store_err,
        engine_log.open("wb") as engine_err,
        running_service(store_args, {}, "store-service listening on", stderr=store_err) as store,
        running_service(
            [str(BIN / "engine-service")],
            {"KEEL_ENGINE_LISTEN": "127.0.0.1:0", "KEEL_ENGINE_STORE": store},
            "engine-service listening on",
            stderr=engine_err,
        ) as engine,
        KeelClient(engine) as client,
    ):
        started = client.start_run(
            PIPELINE, run_config={"retry_policy": {"initial_backoff": 0.01}}, wait=True
        )
        assert started.run is not None and started.run.status == RunStatus.COMPLETED
        run_id = started.run_id

    entries = json_lines(engine_log)
    mine = [entry for entry in entries if entry.get("run_id") == run_id]
    assert any(entry["msg"] == "run started" for entry in mine)
    assert any(entry["msg"] == "run finished: completed" for entry in mine)
    step_lines = {(entry.get("step_id"), entry.get("attempt"), entry["level"]) for entry in mine}
    assert ("flaky", 0, "warning") in step_lines  # the failed first attempt
    assert ("flaky", 1, "info") in step_lines  # the retry that completed
    assert ("echo", 0, "info") in step_lines
    assert all(entry["logger"] for entry in mine)

    store_entries = json_lines(store_log)
    assert any(entry["msg"].startswith("serving on") for entry in store_entries)


def test_log_context_nests_and_unwinds_and_exceptions_stay_on_one_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.logs.capture")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        with log_context(run_id="r1"):
            with log_context(step_id="s1", attempt=2):
                logger.info("inside")
            logger.info("outer", extra={"status": "ok"})
        logger.info("outside")
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    inside, outer, outside, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (inside["run_id"], inside["step_id"], inside["attempt"]) == ("r1", "s1", 2)
    assert outer["run_id"] == "r1" and "step_id" not in outer and outer["status"] == "ok"
    assert "run_id" not in outside
    assert failed["level"] == "error" and "ValueError: boom" in failed["exc"]


def test_a_lines_time_is_its_records_utc_time_to_the_millisecond() -> None:
    formatter = JsonFormatter()
    stamps = []
    for created in (0.0, 86_400.5, 86_400.25, 0.999):  # the second's text is kept between lines
        record = logging.makeLogRecord({"msg": "m", "created": created, "msecs": (created % 1) * 1000})
        stamps.append(json.loads(formatter.format(record))["ts"])
    assert stamps == [
        "1970-01-01T00:00:00.000Z",
        "1970-01-02T00:00:00.500Z",
        "1970-01-02T00:00:00.250Z",
        "1970-01-01T00:00:00.999Z",
    ]
