"""How the CLI shows runs, steps, events and ops to a person: aligned tables and short lines, no colour;
and how it reads the durations a person types."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from keel_client.models import (
    ChildRun,
    ErrorDetail,
    OpInfo,
    ParentClosePolicy,
    QueueInfo,
    Run,
    RunEvent,
    RunStatus,
    RunSummary,
    StepState,
    StepStatus,
    StepWait,
)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Rows under headers, each column as wide as its widest cell (the last column is not padded)."""
    widths = [len(header) for header in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(widths[index]) for index, cell in enumerate(row[:-1])]
        lines.append((indent + "  ".join([*cells, row[-1]])).rstrip())
    return lines


def when(moment: datetime | None) -> str:
    """A timestamp as `YYYY-MM-DD HH:MM:SS.mmmZ` (UTC), or `-`."""
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION_EXAMPLES = "90s, 30m, 1.5h, 2d"


def duration_of(text: str) -> timedelta | None:
    """A duration as a person types it (a number and a unit: 90s, 30m, 1.5h, 2d), or None if `text`
    is not one (the CLI's and the console's time filters take both durations and ages)."""
    found = _DURATION.fullmatch(text.strip())
    if found is None:
        return None
    return timedelta(seconds=float(found.group(1)) * _UNIT_SECONDS[found.group(2)])


def seconds(value: float | None) -> str:
    """A duration for people: `85ms`, `1.24s`, `3m05s`."""
    if value is None:
        return "-"
    value = max(0.0, value)
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 60:
        return f"{value:.2f}s"
    minutes, rest = divmod(int(value), 60)
    return f"{minutes}m{rest:02d}s"


def span(start: datetime | None, end: datetime | None, now: datetime | None = None) -> float | None:
    """Seconds from `start` to `end` (or to `now` while unfinished); None without a start."""
    if start is None:
        return None
    finish = end or now
    if finish is None:
        return None
    return (finish - start).total_seconds()


def step_elapsed(step: StepState, now: datetime | None = None) -> float | None:
    """Seconds from the step's first attempt to the end of its last (or to `now` while one runs)."""
    if not step.attempts:
        return None
    return span(step.attempts[0].started_at, step.attempts[-1].finished_at, now)


def natural_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """A sort key that orders digit runs by value: `child.2` before `child.10`."""
    parts = re.split(r"(\d+)", text)
    return tuple((1, int(part), "") if part.isdigit() else (0, 0, part) for part in parts if part)


def sorted_children(run: Run) -> list[ChildRun]:
    """The run's children in natural order of their fact keys (`pack.child.2` before `pack.child.10`)."""
    return sorted(run.children, key=lambda child: natural_key(child.fact_key))


def step_label(run: Run, step: StepState) -> str:
    """The step's status for people: `canceled` for a step a canceled run left unfinished, and
    `waiting for signal NAME [until TIME]` while its attempt waits for a signal.

    The engine has no canceled step status: a cancel cuts the running attempt (shown as failed, or
    still running) and leaves later steps pending; none of them failed, and none will run.
    """
    if run.status is RunStatus.CANCELED and step.status is not StepStatus.COMPLETED:
        return "canceled"
    if step.reused_from_run_id:
        return "reused"  # a rerun copied its output: it completed in the run it reran
    waiting = step.waiting_for_signal
    if waiting is not None and not run.is_terminal:
        until = (
            f" until {waiting.timeout_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z" if waiting.timeout_at else ""
        )
        return f"waiting for signal {waiting.name}{until}"
    last = step.last_attempt
    if step.status is StepStatus.WAITING and last is not None and last.wait is not None:
        return wait_label(last.wait)
    return step.status.value


def wait_label(wait: StepWait) -> str:
    """What a waiting step waits for, for people: `waiting (timer until 12:00:03Z)`."""
    what = wait.kind
    name = wait.detail.get("name")
    if isinstance(name, str) and name:
        what += f" {name}"
    if wait.until is not None:
        what += f" until {wait.until.astimezone(UTC):%H:%M:%S}Z"
    return f"waiting ({what})"


def child_label(run: Run, child: ChildRun) -> str:
    """The child's status for people: `canceling` for a child its canceled parent has not ended yet.

    A cancel reaches a parent's children (those with the `cancel` policy) just after the parent
    ends, so its last picture would otherwise show them running on.
    """
    cancels = child.parent_close_policy is ParentClosePolicy.CANCEL and not child.status.is_terminal
    return "canceling" if run.status is RunStatus.CANCELED and cancels else child.status.value


def run_clock(run: Run, now: datetime | None) -> datetime | None:
    """The moment elapsed times are measured to: the run's end once it is terminal, else `now`.

    An attempt a cancel cut has no end of its own; without this its time would grow forever.
    """
    return run.completed_at if run.is_terminal and run.completed_at is not None else now


def error_line(error: ErrorDetail | None) -> str:
    """An error as `code: message`, or empty."""
    if error is None:
        return ""
    return f"{error.code}: {error.message}"


def compact_json(value: Any) -> str:
    """JSON on one line, keys sorted."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def pretty_json(value: Any) -> str:
    """JSON indented by two, keys sorted."""
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False)


def step_rows(run: Run, now: datetime | None = None) -> list[list[str]]:
    """One row per step: id, op, status, attempt, elapsed, last error."""
    rows = []
    now = run_clock(run, now)
    for step in run.steps:
        last = step.last_attempt
        rows.append(
            [
                step.step_id,
                f"{step.op_id}@{step.op_version}" if step.op_version else step.op_id,
                step_label(run, step),
                str(last.attempt) if last is not None else "-",
                seconds(step_elapsed(step, now)),
                error_line(step.last_error),
            ]
        )
    return rows


INLINE_INPUT_CHARS = 80

STEP_HEADERS = ("STEP", "OP", "STATUS", "ATTEMPT", "ELAPSED", "LAST ERROR")


def run_lines(run: Run, now: datetime | None = None) -> list[str]:
    """The whole run for `keel get`: header fields, steps, children, failure ledger, final snapshot."""
    lines = [
        f"run        {run.run_id}",
        f"pipeline   {run.op_id}",  # a lone op's id for a single-op run
        f"status     {run.status.value}",
        f"manifest   {run.manifest_id}",
        f"created    {when(run.created_at)}",
        f"updated    {when(run.updated_at)}",
    ]
    if run.completed_at is not None:
        lines.append(
            f"completed  {when(run.completed_at)} ({seconds(span(run.created_at, run.completed_at))})"
        )
    if run.parent_run_id:
        lines.append(f"parent     {run.parent_run_id} (fact key {run.parent_fact_key})")
    if run.rerun_of_run_id:
        lines.append(f"rerun of   {run.rerun_of_run_id} from step {run.rerun_from_step_id}")
    if run.reruns:
        lines.append(f"reruns     {', '.join(run.reruns)}")
    if run.reason:
        lines.append(f"reason     {run.reason}")
    if run.error is not None:
        lines.append(f"error      {error_line(run.error)}")
    lines.append(f"events     {run.head_seq}")
    if run.labels:
        lines.append(f"labels     {label_text(run.labels)}")
    given = compact_json(run.input)
    # A short input fits on its line; a long one gets its own section, indented like the snapshot.
    lines.append(f"input      {given}" if len(given) <= INLINE_INPUT_CHARS else "input      (below)")
    if run.steps:
        lines += ["", "steps:", *table(STEP_HEADERS, step_rows(run, now), indent="  ")]
    remote = [
        [step.step_id, str(a.attempt), a.task_queue, a.worker_id or "-", a.status.value, error_line(a.error)]
        for step in run.steps
        for a in step.attempts
        if a.task_queue
    ]
    if remote:
        remote_headers = ("STEP", "ATTEMPT", "QUEUE", "WORKER", "STATUS", "ERROR")
        lines += ["", "remote attempts:", *table(remote_headers, remote, indent="  ")]
    if run.children:
        rows = [
            [c.fact_key, c.op_id, child_label(run, c), c.parent_close_policy.value, c.child_run_id]
            for c in sorted_children(run)
        ]
        headers = ("FACT KEY", "OP", "STATUS", "ON CANCEL", "RUN ID")
        lines += ["", "children:", *table(headers, rows, indent="  ")]
    if run.failure_ledger:
        rows = [[entry.step_id, when(entry.recorded_at), entry.reason] for entry in run.failure_ledger]
        lines += ["", "failure ledger:", *table(("STEP", "RECORDED", "REASON"), rows, indent="  ")]
    if len(given) > INLINE_INPUT_CHARS:
        lines += ["", "input:", *("  " + line for line in pretty_json(run.input).splitlines())]
    if run.final_snapshot is not None:
        lines += [
            "",
            "final snapshot:",
            *("  " + line for line in pretty_json(run.final_snapshot).splitlines()),
        ]
    return lines


def label_text(labels: Mapping[str, str]) -> str:
    """Labels as `k=v,k2=v2` (sorted by key), or `-`."""
    return ",".join(f"{key}={labels[key]}" for key in sorted(labels)) or "-"


LS_HEADERS = ("RUN ID", "PIPELINE", "STATUS", "STARTED", "DURATION", "LABELS", "PARENT")


def summary_lines(runs: Sequence[RunSummary], now: datetime | None = None) -> list[str]:
    """`keel ls`: a table of runs, newest first. A terminal run's duration is from its start to its
    end; a running one's, to `now` (so far)."""
    now = now or datetime.now(UTC)
    rows = [
        [
            run.run_id,
            run.pipeline_id or "-",
            run.status.value,
            when(run.created_at),
            seconds(span(run.created_at, run.updated_at if run.status is not RunStatus.RUNNING else now)),
            label_text(run.labels),
            run.parent_run_id or "-",
        ]
        for run in runs
    ]
    return table(LS_HEADERS, rows)


def event_line(event: RunEvent) -> str:
    """`keel history`: one event as `seq  time  Type  field=value ...`."""
    # Which step and attempt first, the format version last: the order a reader scans in.
    order = {"step_id": 0, "attempt": 1, "v": 3}
    keys = sorted(event.data, key=lambda key: (order.get(key, 2), key))
    fields = " ".join(
        f"{key}={event.data[key] if isinstance(event.data[key], str) else compact_json(event.data[key])}"
        for key in keys
    )
    return f"{event.seq:>5}  {when(event.recorded_at)}  {event.type:<20}  {fields}".rstrip()


def op_lines(ops: Sequence[OpInfo]) -> list[str]:
    """`keel ops`: ops and versions, and the task queue of those workers declared ("-": the engine's)."""
    return table(
        ("OP", "VERSION", "QUEUE", "DESCRIPTION"),
        [[op.op_id, op.op_version, op.task_queue or "-", op.description] for op in ops],
    )


def queue_lines(queues: Sequence[QueueInfo], now: datetime | None = None) -> list[str]:
    """`keel queues`: each task queue's backlog, running tasks and recent workers with their ops."""
    if not queues:
        return ["no task queues (no remote tasks open, no worker polling in the last minute)"]
    now = now or datetime.now(UTC)
    rows = []
    for queue in queues:
        workers = ", ".join(
            f"{w.worker_id} ({seconds(span(w.last_seen, now))} ago: {' '.join(w.ops) or 'any op'})"
            for w in queue.workers
        )
        rows.append([queue.task_queue, str(queue.backlog), str(queue.running), workers or "-"])
    return table(("QUEUE", "BACKLOG", "RUNNING", "WORKERS (LAST POLL: OPS)"), rows)
