"""Terminalize: move a run to a terminal status exactly once, and the failure ledger behind it.

Order matters for fencing: this engine's driver of the run is stopped first (its running op is
cancelled, its decided events flushed), then RunCompleted is appended at the head just read. Any
other writer (a driver on another engine, a late flush) makes that append a `sequence_conflict`,
and the whole decision is taken again from a fresh read: the run is terminalized at most once.

When the terminal append fails for another reason after the decision was taken, the divergence is
written to the run's failure ledger (a second stream, `ledger:<run id>`) and the call fails with
the same message; a retry once the store recovers transitions the run (or finds it terminal).

A run whose stream holds an event that does not decode (history.fold) can be canceled or failed:
RunCompleted is appended after the corrupt event, with the last checkpoint read before it. It
cannot be completed (DATA_LOSS `corrupt_event`).

Canceling a run closes its children whose policy is `cancel` (read from its children stream, so
whatever spawned them and on whichever engine), recursively.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from engine_service.domain import CANCELED, COMPLETED, FAILED, RunCompleted, corrupt_event_error, encode_event
from engine_service.domain.canonical import canonical_json_bytes
from engine_service.domain.child_runs import ChildLink, parent_nudge
from engine_service.domain.manifest import run_start
from engine_service.domain.streams import FAILURE_LEDGER_ENTRY, ledger_stream_id, run_label, run_stream_id
from engine_service.runtime.reader import RUN_LEDGER_SUBJECT, RunReader
from engine_service.runtime.registry import RunRegistry
from engine_service.runtime.task_board import TaskBoard
from engine_service.store.port import EventLog
from keel_core.clock import now_us
from keel_core.errors import ErrorCategory, KeelError

log = logging.getLogger(__name__)

# How a divergence names the terminal append that failed (these names are in existing ledgers).
_EVENT_NAME = {COMPLETED: "RunCompleted", FAILED: "RunFailed", CANCELED: "RunCanceled"}
_MAX_DECISIONS = 20


@dataclass(frozen=True)
class TerminalizeResult:
    """What Terminalize did: `transitioned` (False: the run was already terminal) and the status."""

    transitioned: bool
    status: str


def _contended(what: str) -> KeelError:
    return KeelError(
        "terminalize_contended", f"{what}; try again", category=ErrorCategory.CONFLICT, retryable=True
    )


def _terminal_append_failed(message: str, run_id: str) -> KeelError:
    return KeelError(
        "terminal_append_failed",
        message,
        category=ErrorCategory.UNAVAILABLE,
        retryable=True,
        details={"run_id": run_id},
    )


class Terminalizer:
    """Terminalizes runs of one engine's store, stopping this engine's driver of the run first."""

    def __init__(self, store: EventLog, registry: RunRegistry, reader: RunReader) -> None:
        self.store = store
        self.registry = registry
        self.reader = reader
        # The engine's task board: a terminalized run's open remote attempts are ended (run_ended).
        self.tasks: TaskBoard | None = None
        # Told the parent run id when a child run was terminalized here (the parent may wait for it).
        self.on_terminal: Callable[[str], None] | None = None

    async def terminalize(self, run_id: str, status: str, reason: str = "") -> TerminalizeResult:
        """Move the run to `status` (TRANSITIONED once, NOOP when terminal); cancel children by policy."""
        with self.registry.terminalizing_run(run_id):
            result = await self._decide_and_append(run_id, status, reason)
        # A repeated cancel closes children again (a child the first cancel could not reach, say);
        # a NOOP on a run that ended otherwise changes nothing.
        if result.status == CANCELED and status == CANCELED:
            # Shielded: a caller that gives up (its deadline, a disconnect) must not stop it halfway.
            closing = asyncio.ensure_future(self._close_children(run_id))
            closing.add_done_callback(_log_unwaited_failure)
            await asyncio.shield(closing)
        return result

    async def _decide_and_append(self, run_id: str, status: str, reason: str) -> TerminalizeResult:
        for _ in range(_MAX_DECISIONS):
            await self.registry.stop_driver(run_id)
            _, history = await self.reader.read_history(run_id, corrupt_ok=True)
            if history.terminal is not None:
                return TerminalizeResult(False, history.terminal.status)
            if history.corrupt is not None and status == COMPLETED:
                # Canceling or failing a run whose history cannot be read is an operator's way out;
                # completing it would claim a result nobody can check.
                raise corrupt_event_error(run_stream_id(run_id), history.corrupt_seq, history.corrupt)
            has_ledger = await self.reader.has_ledger(run_id)
            terminal = RunCompleted(
                status, history.last_checkpoint, reason, at_us=now_us(), has_ledger=has_ledger
            )
            try:
                await self.store.append(
                    run_stream_id(run_id),
                    [encode_event(terminal)],
                    expected_seq=history.head_seq,
                    status=run_label(status),
                    # A parked run leaves the due-time index with its terminal event.
                    due_at_us=0 if history.parked is not None else None,
                    nudges=parent_nudge(history.started, terminal.at_us),
                )
            except KeelError as error:
                if error.code == "sequence_conflict":
                    continue  # someone appended since the read: decide again from the new head
                await self._record_divergence(run_id, status, error)
            if self.tasks is not None and history.open_attempts:
                await self.tasks.close_open_tasks(run_id, list(history.open_attempts.values()))
            started = history.started
            if self.on_terminal is not None and started is not None and started.parent_run_id:
                self.on_terminal(started.parent_run_id)
            return TerminalizeResult(True, status)
        raise _contended(f"run {run_id} kept changing while it was being terminalized")

    async def _record_divergence(self, run_id: str, status: str, error: KeelError) -> None:
        message = f"terminal run status persisted but {_EVENT_NAME[status]} append failed: {error.message}"
        entry = {"v": 1, "step_id": RUN_LEDGER_SUBJECT, "reason": message, "at_us": now_us()}
        try:
            await self.store.append(
                ledger_stream_id(run_id),
                [(FAILURE_LEDGER_ENTRY, canonical_json_bytes(entry))],
                expected_seq=None,
                expected_any=True,
            )
        except KeelError as ledger_error:
            log.error(
                "run %s: %s; the failure ledger write failed too: %s", run_id, message, ledger_error.message
            )
            raise _terminal_append_failed(
                f"{message}; writing the failure ledger also failed: {ledger_error.message}", run_id
            ) from error
        log.error("run %s: %s (recorded in its failure ledger)", run_id, message)
        raise _terminal_append_failed(message, run_id) from error

    async def close_children(self, run_id: str) -> None:
        """Cancel the run's unfinished children whose policy is `cancel` (a run that timed out)."""
        await self._close_children(run_id)

    async def _close_children(self, run_id: str) -> None:
        """Cancel the parent's unfinished children whose policy is `cancel` (recursively).

        The children are the parent's links, so a child spawned by the RPC, on another engine, or
        whose start a crash interrupted is closed too; spawns in flight here land (or fail) first.
        """
        await self.registry.settle_spawns(run_id)
        links = await self.reader.links(run_id)
        doomed = [link for link in links if link.closed_by(CANCELED)]
        results = await asyncio.gather(*(self.cancel_child(link) for link in doomed), return_exceptions=True)
        failed = {
            link.child_run_id: result.message if isinstance(result, KeelError) else repr(result)
            for link, result in zip(doomed, results, strict=True)
            if isinstance(result, BaseException)
        }
        if failed:
            # The parent is canceled; the caller learns that closing it is not finished, and a
            # repeated cancel (a NOOP for the parent) closes what is left.
            raise KeelError(
                "children_not_closed",
                f"run {run_id} is canceled, but {len(failed)} of its children could not be canceled yet "
                f"({'; '.join(f'{child}: {why}' for child, why in sorted(failed.items()))}); "
                "cancel the run again to close them",
                category=ErrorCategory.UNAVAILABLE,
                retryable=True,
                details={"run_id": run_id, "child_run_ids": ",".join(sorted(failed))},
            )

    async def cancel_child(self, link: ChildLink) -> None:
        """Cancel a linked child as its parent's cancel does; one never started is recorded canceled unrun."""
        for _ in range(_MAX_DECISIONS):
            try:
                await self.terminalize(link.child_run_id, CANCELED, link.close_reason)
                return
            except KeelError as error:
                if error.code != "run_not_found":
                    raise
            if await self._cancel_unstarted(link):
                return
        raise _contended(f"child run {link.child_run_id} kept changing while it was being canceled")

    async def _cancel_unstarted(self, link: ChildLink) -> bool:
        """Create the never-started child as canceled (False: it started meanwhile)."""
        manifest = await self.reader.manifest(link.child_manifest_id)
        at_us = now_us()
        start = run_start(
            manifest,
            manifest_id=link.child_manifest_id,
            parent=(link.parent_run_id, link.fact_key),
            manifest_stored=True,
            at_us=at_us,
        )
        canceled = RunCompleted(CANCELED, start.snapshot_id, link.close_reason, at_us=at_us)
        try:
            await self.store.append(
                run_stream_id(link.child_run_id),
                [encode_event(start.started), encode_event(canceled)],
                expected_seq=None,
                status=run_label(CANCELED),
                artifacts=start.artifacts,
                attributes=start.attributes,
            )
        except KeelError as error:
            if error.code == "sequence_conflict":
                return False
            raise
        log.info("child %s of run %s was canceled before it started", link.child_run_id, link.parent_run_id)
        return True


def _log_unwaited_failure(closing: asyncio.Future[None]) -> None:
    if not closing.cancelled() and closing.exception() is not None:
        log.warning("%s", closing.exception())  # also raised to the caller, if it still waits
