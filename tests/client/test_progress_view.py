"""The live progress display and the readable output, drawn from hand-made runs (no engine needed)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from keel_client.display import event_line, run_lines, seconds, table
from keel_client.models import (
    ChildRun,
    ErrorDetail,
    Run,
    RunEvent,
    RunStatus,
    StepAttempt,
    StepState,
    StepStatus,
)
from keel_client.progress import ProgressView

T0 = datetime(2026, 11, 24, 4, 0, 0, tzinfo=UTC)


def at(ms: int) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def attempt(number: int, status: StepStatus, start: int, end: int | None, code: str = "") -> StepAttempt:
    error = ErrorDetail(code, "failure", True, f"{code} happened") if code else None
    return StepAttempt(number, status, at(start), at(end) if end is not None else None, error)


def a_run(status: RunStatus, steps: tuple[StepState, ...], children: tuple[ChildRun, ...] = ()) -> Run:
    return Run(
        run_id="r-1", op_id="demo", manifest_id="sha256:m", status=status, parent_run_id=None,
        parent_fact_key=None, created_at=T0, updated_at=at(900),
        completed_at=at(900) if status.is_terminal else None, steps=steps, children=children,
        failure_ledger=(), final_snapshot={"a": 1} if status.is_terminal else None, final_snapshot_id=None,
        reason=None, error=None, head_seq=7,
    )  # fmt: skip


RUNNING = a_run(
    RunStatus.RUNNING,
    (
        StepState(
            "fetch", "keel.echo", "1", StepStatus.COMPLETED, (attempt(0, StepStatus.COMPLETED, 0, 20),), None
        ),
        StepState(
            "flaky", "keel.fail_n_times", "1", StepStatus.RUNNING,
            (attempt(0, StepStatus.FAILED, 20, 30, "flaky"), attempt(1, StepStatus.RUNNING, 130, None)),
            ErrorDetail("flaky", "failure", True, "flaky happened"),
        ),
        StepState("last", "keel.echo", "1", StepStatus.PENDING, (), None),
    ),
    (ChildRun("c-1", "invoice-1", "keel.echo", RunStatus.RUNNING),),
)  # fmt: skip
DONE = a_run(
    RunStatus.COMPLETED,
    tuple(
        StepState(
            s.step_id, s.op_id, "1", StepStatus.COMPLETED, (attempt(0, StepStatus.COMPLETED, 0, 20),), None
        )
        for s in RUNNING.steps
    ),
    (ChildRun("c-1", "invoice-1", "keel.echo", RunStatus.COMPLETED),),
)


def test_in_place_view_redraws_the_block_over_the_previous_one() -> None:
    out = io.StringIO()
    view = ProgressView(out, in_place=True, clock=lambda: at(500))
    view.draw(RUNNING, {})
    first = out.getvalue()
    assert "\x1b[" not in first
    lines = first.splitlines()
    assert lines[0] == "run r-1  demo  running  500ms"
    assert lines[2].split() == ["step", "fetch", "keel.echo", "completed", "0", "20ms"]
    assert lines[3].split() == ["step", "flaky", "keel.fail_n_times", "running", "1", "480ms"]
    assert lines[4].split() == ["step", "last", "keel.echo", "pending", "-", "-"]
    assert lines[5].split() == ["child", "invoice-1", "keel.echo", "running", "-", "-"]
    view.draw(DONE, {})
    redraw = out.getvalue()[len(first) :]
    assert redraw.startswith(f"\x1b[{len(lines)}F\x1b[J")
    assert "run r-1  demo  completed  900ms" in redraw


def test_appending_view_prints_a_line_per_change_only() -> None:
    out = io.StringIO()
    view = ProgressView(out, in_place=False, clock=lambda: at(500))
    view.draw(RUNNING, {})
    view.draw(RUNNING, {})
    first = out.getvalue().splitlines()
    assert first == [
        "step fetch: completed (attempt 0, 20ms)",
        "step flaky: running (attempt 1, 480ms)",
        "step last: pending",
        "child invoice-1 (keel.echo): running (attempt -, -)",
    ]
    view.draw(DONE, {"c-1": DONE})
    added = out.getvalue().splitlines()[len(first) :]
    assert added == [
        "step flaky: completed (attempt 0, 20ms)",
        "step last: completed (attempt 0, 20ms)",
        "child invoice-1 (keel.echo): completed (attempt 0, 900ms)",
        "run r-1: completed (900ms)",
    ]


def test_run_lines_show_steps_children_and_snapshot() -> None:
    text = "\n".join(run_lines(DONE))
    assert "status     completed" in text
    assert "completed  2026-11-24 04:00:00.900Z (900ms)" in text
    assert "invoice-1" in text and '"a": 1' in text


def test_event_line_puts_step_and_attempt_first() -> None:
    event = RunEvent(3, "StepCompleted", {"v": 1, "snapshot_id": "s", "attempt": 0, "step_id": "a"}, at(5))
    assert (
        event_line(event)
        == "    3  2026-11-24 04:00:00.005Z  StepCompleted         step_id=a attempt=0 snapshot_id=s v=1"
    )


def test_seconds_and_table_formatting() -> None:
    assert [seconds(v) for v in (None, 0.0123, 1.5, 125)] == ["-", "12ms", "1.50s", "2m05s"]
    assert table(("A", "B"), [["long value", "x"]]) == ["A           B", "long value  x"]
