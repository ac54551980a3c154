"""The live progress display of `keel run --wait`: every step and child run with state, attempt, elapsed time.

Events come from WatchRun (no polling); each one triggers a GetRun whose answer is drawn. On a
terminal the block is redrawn in place (and ticks twice a second so elapsed times move); otherwise
one plain line is appended whenever a step or child changes state or attempt, so logs stay readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO

from keel_client.aio import AsyncKeelClient
from keel_client.display import seconds, span, step_elapsed, table
from keel_client.models import Run, RunStatus

TICK_SECONDS = 0.5
MAX_CHILDREN_SHOWN = 20


class ProgressView:
    """Draws successive states of one run to `out`, in place on a TTY, as appended lines otherwise."""

    def __init__(
        self,
        out: TextIO,
        *,
        in_place: bool,
        clock: Callable[[], datetime] | None = None,
        screen: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self._out = out
        self._in_place = in_place
        self._screen = screen or _terminal_size
        self._clock = clock or (lambda: datetime.now(UTC))
        self._drawn_lines = 0
        self._seen: dict[str, tuple[str, str]] = {}
        self.ticks = in_place  # redraw on a timer too, so that elapsed times move

    def draw(self, run: Run, children: dict[str, Run]) -> None:
        """Show `run` (and its children's runs, by child run id)."""
        if self._in_place:
            self._redraw(self.block(run, children))
        else:
            for line in self._changes(run, children):
                self._out.write(line + "\n")
        self._out.flush()

    def block(self, run: Run, children: dict[str, Run]) -> list[str]:
        """The full picture: a run header, then a row per step and per child run."""
        now = self._clock()
        header = (
            f"run {run.run_id}  {run.op_id}  {run.status.value}  "
            f"{seconds(span(run.created_at, run.completed_at, now))}"
        )
        rows = []
        for step in run.steps:
            last = step.last_attempt
            rows.append(
                [
                    f"step {step.step_id}",
                    step.op_id,
                    step.status.value,
                    str(last.attempt) if last else "-",
                    seconds(step_elapsed(step, now)),
                ]
            )
        for child in run.children[:MAX_CHILDREN_SHOWN]:
            child_run = children.get(child.child_run_id)
            attempt, elapsed = "-", "-"
            if child_run is not None:
                attempt = _child_attempt(child_run)
                elapsed = seconds(span(child_run.created_at, child_run.completed_at, now))
            rows.append([f"child {child.fact_key}", child.op_id, child.status.value, attempt, elapsed])
        lines = [header, *table(("", "OP", "STATUS", "ATTEMPT", "ELAPSED"), rows, indent="  ")]
        hidden = len(run.children) - MAX_CHILDREN_SHOWN
        if hidden > 0:
            lines.append(f"  ... and {hidden} more child runs")
        return lines

    def _redraw(self, lines: list[str]) -> None:
        # Moving the cursor up only works within the screen: a block taller than the terminal, or a
        # line that wraps, would be redrawn below itself. So the block is cut to fit.
        columns, rows = self._screen()
        if len(lines) > rows - 1:
            hidden = len(lines) - (rows - 2)
            lines = [*lines[: rows - 2], f"  ... {hidden} more lines (keel get shows all)"]
        lines = [line[: columns - 1] for line in lines]
        if self._drawn_lines:
            # Back to the first line of the previous block, then clear to the end of the screen.
            self._out.write(f"\x1b[{self._drawn_lines}F\x1b[J")
        self._out.write("\n".join(lines) + "\n")
        self._drawn_lines = len(lines)

    def _changes(self, run: Run, children: dict[str, Run]) -> list[str]:
        now = self._clock()
        lines = []
        for step in run.steps:
            last = step.last_attempt
            attempt = str(last.attempt) if last else "-"
            key = f"step {step.step_id}"
            if self._seen.get(key) != (step.status.value, attempt):
                self._seen[key] = (step.status.value, attempt)
                if last is None:
                    lines.append(f"{key}: {step.status.value}")
                else:
                    elapsed = seconds(step_elapsed(step, now))
                    lines.append(f"{key}: {step.status.value} (attempt {attempt}, {elapsed})")
        for child in run.children:
            child_run = children.get(child.child_run_id)
            attempt = _child_attempt(child_run) if child_run else "-"
            key = f"child {child.fact_key}"
            if self._seen.get(key) != (child.status.value, attempt):
                self._seen[key] = (child.status.value, attempt)
                elapsed = (
                    seconds(span(child_run.created_at, child_run.completed_at, now)) if child_run else "-"
                )
                lines.append(f"{key} ({child.op_id}): {child.status.value} (attempt {attempt}, {elapsed})")
        status_key = "run"
        if self._seen.get(status_key) != (run.status.value, "") and run.status is not RunStatus.RUNNING:
            self._seen[status_key] = (run.status.value, "")
            lines.append(
                f"run {run.run_id}: {run.status.value} ({seconds(span(run.created_at, run.completed_at))})"
            )
        return lines


def _terminal_size() -> tuple[int, int]:
    size = shutil.get_terminal_size()
    return size.columns, size.lines


def _child_attempt(child: Run) -> str:
    attempts = [step.last_attempt.attempt for step in child.steps if step.last_attempt is not None]
    return str(max(attempts)) if attempts else "-"


async def _children(client: AsyncKeelClient, run: Run) -> dict[str, Run]:
    runs = await asyncio.gather(
        *(client.get_run(child.child_run_id) for child in run.children[:MAX_CHILDREN_SHOWN]),
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
