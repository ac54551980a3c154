"""The live progress display and the readable output, drawn from hand-made runs (no engine needed)."""

from __future__ import annotations

import dataclasses
import io
from datetime import UTC, datetime, timedelta

from keel_client.display import event_line, run_lines, seconds, table
from keel_client.models import (
    ChildRun,
    ErrorDetail,
    ParentClosePolicy,
    Run,
    RunEvent,
    RunStatus,
    StepAttempt,
    StepState,
    StepStatus,
)
from keel_client.progress import ProgressView
from rich.console import Console

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


def terminal(out: io.StringIO, height: int) -> Console:
    """A console that behaves as a terminal of 80 columns and `height` lines, writing to `out`."""
    return Console(file=out, force_terminal=True, width=80, height=height, color_system=None)


def frames(written: str) -> list[list[str]]:
    """What rich's Live wrote, split into the frames it drew (each starts by going back over the last)."""
    body = written.replace("\x1b[?25l", "").replace("\x1b[?25h", "")
    chunks = body.split("\r")
    return [chunk.replace("\x1b[2K", "").replace("\x1b[1A", "").rstrip("\n").split("\n") for chunk in chunks]


def test_the_picture_has_a_header_and_a_row_per_step_and_child() -> None:
    lines = ProgressView(io.StringIO(), in_place=True, clock=lambda: at(500)).block(RUNNING, {})
    assert lines[0] == "run r-1  demo  running  500ms"
    assert lines[1].split() == ["OP", "STATUS", "ATTEMPT", "ELAPSED"]
    assert lines[2].split() == ["step", "fetch", "keel.echo", "completed", "0", "20ms"]
    assert lines[3].split() == ["step", "flaky", "keel.fail_n_times", "running", "1", "480ms"]
    assert lines[4].split() == ["step", "last", "keel.echo", "pending", "-", "-"]
    assert lines[5].split() == ["child", "invoice-1", "keel.echo", "running", "-", "-"]
    assert len(lines) == 6
    assert all("\x1b[" not in line for line in lines)


def test_in_place_view_redraws_exactly_over_the_previous_block() -> None:
    out = io.StringIO()
    view = ProgressView(out, in_place=True, clock=lambda: at(500), console=terminal(out, 24))
    view.draw(RUNNING, {})
    first = out.getvalue()
    first_lines = first.replace("\x1b[?25l", "").split("\n")
    assert first_lines[0] == "run r-1  demo  running  500ms"
    assert len(first_lines) == 6
    view.draw(DONE, {})
    redraw = out.getvalue()[len(first) :]
    # Back to the first line of the previous block, erasing each line on the way up.
    assert redraw.startswith("\r" + "\x1b[2K\x1b[1A" * (len(first_lines) - 1) + "\x1b[2K")
    assert redraw.count("run r-1") == 1
    assert "run r-1  demo  completed  900ms" in redraw
    view.close()
    assert out.getvalue().endswith("\x1b[?25h")  # the cursor is shown again
    assert [frame[0].strip() for frame in frames(out.getvalue())] == [
        "run r-1  demo  running  500ms",
        "run r-1  demo  completed  900ms",
        "run r-1  demo  completed  900ms",
    ]


def fan_out_run(status: RunStatus, count: int) -> Run:
    children = tuple(
        ChildRun(f"c-{n}", f"pack.child.{n}", "keel.echo", RunStatus.RUNNING) for n in range(count)
    )
    return dataclasses.replace(a_run(status, RUNNING.steps, children), completed_at=None)


def test_a_picture_taller_than_the_terminal_is_cut_to_fit_and_never_stacks() -> None:
    out = io.StringIO()
    view = ProgressView(out, in_place=True, clock=lambda: at(500), console=terminal(out, 10))
    tall = fan_out_run(RunStatus.RUNNING, 30)
    for _ in range(3):
        view.draw(tall, {})
    drawn = frames(out.getvalue())
    assert len(drawn) == 3
    for frame in drawn:
        assert len(frame) <= 9  # one line of the 10 stays free
        assert frame[0].startswith("run r-1  demo  running")
        assert frame[-1].strip() == "... 27 more rows (keel get shows all)"  # 3 steps + 30 children - 6 shown
    # Each redraw climbs exactly over the frame before it, so nothing is left above.
    redraws = out.getvalue().split("\r")[1:]
    for before, redraw in zip(drawn, redraws, strict=False):
        assert redraw.count("\x1b[1A") == len(before) - 1
    view.close()
    final = frames(out.getvalue())[-1]
    # The end is printed once, whole: every step and child (the first 20 of them).
    assert final[0].startswith("run r-1  demo  running")
    assert len(final) == 2 + 3 + 20 + 1
    assert final[-1].strip() == "... and 10 more child runs"


def test_children_are_sorted_naturally_everywhere() -> None:
    keys = ["item-10", "item-2", "item-1", "b", "item-2a", "a"]
    run = a_run(
        RunStatus.RUNNING,
        (),
        tuple(ChildRun(f"c-{key}", key, "keel.echo", RunStatus.RUNNING) for key in keys),
    )
    expected = ["a", "b", "item-1", "item-2", "item-2a", "item-10"]
    picture = ProgressView(io.StringIO(), in_place=True, clock=lambda: at(500)).block(run, {})
    assert [line.split()[1] for line in picture[2:]] == expected
    out = io.StringIO()
    ProgressView(out, in_place=False, clock=lambda: at(500)).draw(run, {})
    assert [line.split()[1] for line in out.getvalue().splitlines()] == expected
    listed = run_lines(run)
    start = listed.index("children:") + 2
    assert [line.split()[0] for line in listed[start : start + len(keys)]] == expected


CANCELED = dataclasses.replace(
    a_run(
        RunStatus.CANCELED,
        (
            RUNNING.steps[0],
            # The engine shows the attempt the cancel cut as failed, its attempt never finished.
            StepState(
                "flaky", "keel.fail_n_times", "1", StepStatus.FAILED,
                (attempt(0, StepStatus.FAILED, 20, 30, "flaky"), attempt(1, StepStatus.RUNNING, 130, None)),
                ErrorDetail("flaky", "failure", True, "flaky happened"),
            ),
            RUNNING.steps[2],
        ),
        (
            ChildRun("c-1", "invoice-1", "keel.echo", RunStatus.CANCELED),
            # Not reached by the cancel yet, and one the cancel leaves alone.
            ChildRun("c-2", "invoice-2", "keel.echo", RunStatus.RUNNING),
            ChildRun("c-3", "invoice-3", "keel.echo", RunStatus.RUNNING, ParentClosePolicy.ABANDON),
        ),
    ),
    reason="canceled by operator",
)  # fmt: skip


def test_steps_a_canceled_run_left_unfinished_show_as_canceled_and_its_children_as_canceling() -> None:
    def late() -> datetime:
        return at(60_000)  # long after the cancel

    lines = ProgressView(io.StringIO(), in_place=True, clock=late).block(CANCELED, {})
    assert lines[0] == "run r-1  demo  canceled  900ms"
    assert lines[2].split() == ["step", "fetch", "keel.echo", "completed", "0", "20ms"]
    # Timed to the cancel, not to now: a cut attempt has no end of its own.
    assert lines[3].split() == ["step", "flaky", "keel.fail_n_times", "canceled", "1", "880ms"]
    assert lines[4].split() == ["step", "last", "keel.echo", "canceled", "-", "-"]
    assert lines[5].split() == ["child", "invoice-1", "keel.echo", "canceled", "-", "-"]
    assert lines[6].split() == ["child", "invoice-2", "keel.echo", "canceling", "-", "-"]
    assert lines[7].split() == ["child", "invoice-3", "keel.echo", "running", "-", "-"]
    assert len(lines) == 8
    out = io.StringIO()
    view = ProgressView(out, in_place=False, clock=late)
    view.draw(RUNNING, {})
    first = len(out.getvalue().splitlines())
    view.draw(CANCELED, {})
    added = out.getvalue().splitlines()[first:]
    assert added == [
        "step flaky: canceled (attempt 1, 880ms)",
        "step last: canceled",
        "child invoice-1 (keel.echo): canceled (attempt -, -)",
        "child invoice-2 (keel.echo): canceling (attempt -, -)",
        "child invoice-3 (keel.echo): running (attempt -, -)",
        "run r-1: canceled (900ms)",
    ]
    steps = [line.split() for line in run_lines(CANCELED, late())]
    assert ["flaky", "keel.fail_n_times@1", "canceled", "1", "880ms", "flaky:", "flaky", "happened"] in steps
    assert ["last", "keel.echo@1", "canceled", "-", "-"] in steps
    assert ["invoice-2", "keel.echo", "canceling", "cancel", "c-2"] in steps
    assert ["invoice-3", "keel.echo", "running", "abandon", "c-3"] in steps


def test_running_steps_show_elapsed_time_that_moves() -> None:
    now = [at(500)]
    out = io.StringIO()
    view = ProgressView(out, in_place=True, clock=lambda: now[0], console=terminal(out, 24))
    view.draw(RUNNING, {})
    now[0] = at(2_130)
    view.draw(RUNNING, {})
    flaky = [next(line for line in frame if "flaky" in line).split() for frame in frames(out.getvalue())]
    assert flaky == [
        ["step", "flaky", "keel.fail_n_times", "running", "1", "480ms"],
        ["step", "flaky", "keel.fail_n_times", "running", "1", "2.11s"],
    ]
    assert view.ticks


def test_appending_view_prints_a_line_per_change_only() -> None:
    out = io.StringIO()
    view = ProgressView(out, in_place=False, clock=lambda: at(500))
    view.draw(RUNNING, {})
    view.draw(RUNNING, {})
    first = out.getvalue().splitlines()
    assert first == [
        "step fetch: completed (attempt 0, 20ms)",
        "step flaky: retrying (attempt 0, 10ms)",
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


def test_a_retry_first_seen_after_it_began_still_shows_the_failed_attempt_once() -> None:
    # Under load a watch can deliver the failure and the retry's start in one update: the
    # appended lines must still say that attempt 0 failed and was retried, and say it only once.
    out = io.StringIO()
    view = ProgressView(out, in_place=False, clock=lambda: at(500))
    flaky = RUNNING.steps[1]
    failed_only = dataclasses.replace(
        RUNNING, steps=(dataclasses.replace(flaky, status=StepStatus.RETRYING, attempts=flaky.attempts[:1]),)
    )
    view.draw(failed_only, {})
    view.draw(dataclasses.replace(RUNNING, steps=(flaky,)), {})
    assert [line for line in out.getvalue().splitlines() if "flaky" in line] == [
        "step flaky: retrying (attempt 0, 10ms)",
        "step flaky: running (attempt 1, 480ms)",
    ]


def test_run_lines_show_steps_children_and_snapshot() -> None:
    text = "\n".join(run_lines(DONE))
    assert "pipeline   demo" in text.splitlines()  # its pipeline id, under the name `keel ls` uses
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
