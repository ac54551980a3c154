"""The live progress display of `keel run --wait`: every step and child run with state, attempt, elapsed time.

Events come from WatchRun (no polling); each one triggers a GetRun whose answer is drawn. On a
terminal the picture is redrawn in place by rich's Live (and ticks twice a second so elapsed times
move); it is cut to the terminal's height, because a live block taller than the screen cannot be
redrawn over itself and would stack copies of itself in the scrollback. When the run ends, the whole
picture is printed once. Otherwise (a pipe, a file, TERM=dumb) one plain line is appended whenever a
step or child changes state or attempt, so logs stay readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TextIO

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from keel_client.aio import AsyncKeelClient
from keel_client.display import (
    child_label,
    run_clock,
    seconds,
    sorted_children,
    span,
    step_elapsed,
    step_label,
)
from keel_client.models import ChildRun, Run, RunStatus

TICK_SECONDS = 0.5
MAX_CHILDREN_SHOWN = 20
COLUMNS = ("", "OP", "STATUS", "ATTEMPT", "ELAPSED")
# How each status reads at a glance; a console without colour (NO_COLOR, a dumb terminal) drops them.
STATUS_STYLES = {
    "running": "cyan",
    "retrying": "yellow",
    "pending": "dim",
    "completed": "green",
    "failed": "bold red",
    "canceled": "magenta",
    "canceling": "magenta",
    "waiting": "blue",
}


@dataclass(frozen=True)
class RunPicture:
    """One state of a run as a rich renderable: a header line, then a row per step and child run.

    Rendered cut to the console's height (`fit`), with a last line saying how many rows are not
    shown; `fit=False` renders every row, for the final picture that is printed once.
    """

    header: str
    rows: tuple[tuple[str, ...], ...]
    hidden_children: int = 0
    fit: bool = True

    def lines(self) -> list[str]:
        """The picture as plain text lines, uncut (for tests and for logs)."""
        console = Console(width=200, color_system=None, file=io.StringIO(), highlight=False)
        with console.capture() as capture:
            console.print(RunPicture(self.header, self.rows, self.hidden_children, fit=False))
        return [line.rstrip() for line in capture.get().splitlines()]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """The header, the table of rows, and a note for what did not fit."""
        rows = list(self.rows)
        notes = [f"  ... and {self.hidden_children} more child runs"] if self.hidden_children else []
        if self.fit:
            # The header, the column titles and a note take three lines; one more stays free so the
            # cursor never sits below the screen's last line.
            room = max(1, options.size.height - 4)
            if len(rows) > room:
                cut = len(rows) - room + self.hidden_children
                rows, notes = rows[:room], [f"  ... {cut} more rows (keel get shows all)"]
        table = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 2, 0, 0), header_style="")
        for title in COLUMNS:
            table.add_column(title, no_wrap=True, overflow="ellipsis")
        for row in rows:
            label, op_id, status, attempt, elapsed = row
            style = STATUS_STYLES.get(status.split(" ", 1)[0], "")  # "waiting for signal x": waiting
            table.add_row(label, op_id, Text(status, style=style), attempt, elapsed)
        yield Group(
            Text(self.header, no_wrap=True, overflow="ellipsis"),
            Padding(table, (0, 0, 0, 2)),
            *(Text(note, no_wrap=True, overflow="ellipsis") for note in notes),
        )


class ProgressView:
    """Draws successive states of one run to `out`: live in place on a TTY, as appended lines otherwise.

    Use as a context manager (or call close()): the live display ends by printing the final picture.
    """

    def __init__(
        self,
        out: TextIO,
        *,
        in_place: bool,
        clock: Callable[[], datetime] | None = None,
        console: Console | None = None,
    ) -> None:
        self._out = out
        self._in_place = in_place
        self._clock = clock or (lambda: datetime.now(UTC))
        self._console = console
        self._owns_console = False
        self._live: Live | None = None
        self._last: RunPicture | None = None
        self._seen: dict[str, tuple[str, str]] = {}
        self._retried: dict[str, int] = {}  # per step: the last failed attempt shown as retried
        self.ticks = in_place  # redraw on a timer too, so that elapsed times move

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def draw(self, run: Run, children: dict[str, Run]) -> None:
        """Show `run` (and its children's runs, by child run id)."""
        if not self._in_place:
            for line in self._changes(run, children):
                self._out.write(line + "\n")
            self._out.flush()
            return
        self._last = self.picture(run, children)
        if self._console is None:
            self._console = Console(file=self._out, highlight=False)
            self._owns_console = True
        if self._owns_console:
            _fit_to_terminal(self._console, self._out)
        if self._live is None:
            console = self._console
            self._live = Live(
                self._last,
                console=console,
                auto_refresh=False,  # follow_run's ticks redraw; no thread of rich's own
                vertical_overflow="crop",  # and RunPicture fits itself to the height first
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start(refresh=True)
        else:
            self._live.update(self._last, refresh=True)

    def close(self) -> None:
        """End the live display, leaving the whole final picture on the screen once."""
        if self._live is None:
            return
        live, self._live = self._live, None
        if self._last is not None:
            live.update(RunPicture(self._last.header, self._last.rows, self._last.hidden_children, fit=False))
        live.stop()

    def picture(self, run: Run, children: dict[str, Run]) -> RunPicture:
        """The header, then a row per step and per child run (children in natural order)."""
        now = run_clock(run, self._clock())
        header = (
            f"run {run.run_id}  {run.op_id}  {run.status.value}  "
            f"{seconds(span(run.created_at, run.completed_at, now))}"
        )
        rows: list[tuple[str, ...]] = []
        for step in run.steps:
            last = step.last_attempt
            rows.append(
                (
                    f"step {step.step_id}",
                    step.op_id,
                    step_label(run, step),
                    str(last.attempt) if last else "-",
                    seconds(step_elapsed(step, now)),
                )
            )
        for child in _shown_children(run):
            child_run = children.get(child.child_run_id)
            attempt, elapsed = "-", "-"
            if child_run is not None:
                attempt = _child_attempt(child_run)
                elapsed = seconds(span(child_run.created_at, child_run.completed_at, now))
            rows.append((f"child {child.fact_key}", child.op_id, child_label(run, child), attempt, elapsed))
        return RunPicture(header, tuple(rows), max(0, len(run.children) - MAX_CHILDREN_SHOWN))

    def block(self, run: Run, children: dict[str, Run]) -> list[str]:
        """The full picture as plain text lines."""
        return self.picture(run, children).lines()

    def _changes(self, run: Run, children: dict[str, Run]) -> list[str]:
        now = run_clock(run, self._clock())
        lines = []
        for step in run.steps:
            last = step.last_attempt
            attempt = str(last.attempt) if last else "-"
            key, label = f"step {step.step_id}", step_label(run, step)
            # A failed attempt whose retry started before a state was seen still shows as retried.
            for earlier in step.attempts[:-1]:
                if self._retried.get(key, -1) < earlier.attempt:
                    self._retried[key] = earlier.attempt
                    self._seen[key] = ("retrying", str(earlier.attempt))
                    elapsed = seconds(span(earlier.started_at, earlier.finished_at, now))
                    lines.append(f"{key}: retrying (attempt {earlier.attempt}, {elapsed})")
            if self._seen.get(key) != (label, attempt):
                self._seen[key] = (label, attempt)
                if last is None:
                    lines.append(f"{key}: {label}")
                else:
                    elapsed = seconds(step_elapsed(step, now))
                    lines.append(f"{key}: {label} (attempt {attempt}, {elapsed})")
                    if label == "retrying":
                        self._retried[key] = last.attempt
        for child in sorted_children(run):
            child_run = children.get(child.child_run_id)
            attempt = _child_attempt(child_run) if child_run else "-"
            key, label = f"child {child.fact_key}", child_label(run, child)
            if self._seen.get(key) != (label, attempt):
                self._seen[key] = (label, attempt)
                elapsed = (
                    seconds(span(child_run.created_at, child_run.completed_at, now)) if child_run else "-"
                )
                lines.append(f"{key} ({child.op_id}): {label} (attempt {attempt}, {elapsed})")
        status_key = "run"
        if self._seen.get(status_key) != (run.status.value, "") and run.status is not RunStatus.RUNNING:
            self._seen[status_key] = (run.status.value, "")
            lines.append(
                f"run {run.run_id}: {run.status.value} ({seconds(span(run.created_at, run.completed_at))})"
            )
        return lines


def _fit_to_terminal(console: Console, out: TextIO) -> None:
    # The size of the terminal itself, read at each frame so a resize is followed. rich (like
    # shutil) would prefer LINES and COLUMNS from the environment, which go stale when exported:
    # a view that believes the screen is taller than it is stacks copies of itself.
    try:
        size = os.get_terminal_size(out.fileno())
    except (AttributeError, OSError, ValueError):
        return
    if size.columns > 0 and size.lines > 0:
        console.size = (size.columns, size.lines)


def _shown_children(run: Run) -> Iterator[ChildRun]:
    # The first MAX_CHILDREN_SHOWN in natural order: each is fetched with a GetRun on every redraw.
    yield from sorted_children(run)[:MAX_CHILDREN_SHOWN]


def _child_attempt(child: Run) -> str:
    attempts = [step.last_attempt.attempt for step in child.steps if step.last_attempt is not None]
    return str(max(attempts)) if attempts else "-"


async def _children(client: AsyncKeelClient, run: Run) -> dict[str, Run]:
    runs = await asyncio.gather(
        *(client.get_run(child.child_run_id) for child in _shown_children(run)),
        return_exceptions=True,
    )
    return {run.run_id: run for run in runs if isinstance(run, Run)}


async def follow_run(client: AsyncKeelClient, run_id: str, view: ProgressView | None) -> Run:
    """Follow a run until it is terminal, drawing it on `view` (if any) as it changes; returns the end."""
    changed = asyncio.Event()
    changed.set()
    watch_done = asyncio.Event()

    async def watch() -> None:
        try:
            async for _event in client.watch_run(run_id):
                changed.set()
        finally:
            watch_done.set()
            changed.set()

    watcher = asyncio.create_task(watch())
    try:
        while True:
            if view is not None and view.ticks and not watch_done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), TICK_SECONDS)
            else:
                await changed.wait()
            changed.clear()
            run = await client.get_run(run_id)
            if view is not None:
                view.draw(run, await _children(client, run))
            if watch_done.is_set():
                break
        failure = watcher.exception() if watcher.done() else None
        if failure is not None:
            raise failure
        # The stream ended after the terminal event; the run now answers as terminal.
        if not run.is_terminal:
            awaited = await client.await_run(run_id)
            run = awaited.run or run
            if view is not None:
                view.draw(run, await _children(client, run))
        return run
    finally:
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher
