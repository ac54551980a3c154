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
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from engine_service.domain import (
    CANCELED,
    COMPLETED,
    FAILED,
    RunCompleted,
    RunStarted,
    corrupt_event_error,
    encode_event,
)
from engine_service.domain.canonical import artifact_id_for_bytes, canonical_json_bytes
from engine_service.domain.child_runs import ChildLink
from engine_service.domain.context import SNAPSHOT_ARTIFACT_KIND
from engine_service.run_driver import now_us, run_stream_id
from keel_core.errors import ErrorCategory, KeelError

if TYPE_CHECKING:
    from engine_service.engine import Engine

log = logging.getLogger(__name__)

LEDGER_EVENT = "FailureLedgerEntry"
RUN_LEDGER_SUBJECT = "_run"
_EVENT_NAME = {COMPLETED: "RunCompleted", FAILED: "RunFailed", CANCELED: "RunCanceled"}
_MAX_DECISIONS = 20


def ledger_stream_id(run_id: str) -> str:
    """The store stream holding a run's failure ledger."""
    return f"ledger:{run_id}"


@dataclass(frozen=True)
class TerminalizeResult:
    """What Terminalize did: `transitioned` (False: the run was already terminal) and the status."""

    transitioned: bool
    status: str


@dataclass(frozen=True)
class LedgerEntry:
    """A divergence the engine could not repair, kept for a person."""

    step_id: str
    reason: str
    recorded_at: datetime | None


async def read_ledger(engine: Engine, run_id: str) -> list[LedgerEntry]:
    """A run's failure ledger, oldest first."""
    out = []
    seen: set[bytes] = set()
    for event in await engine.env.store.read(ledger_stream_id(run_id)):
        if event.payload in seen:
            continue  # the same entry twice: a retried append whose first answer was lost
        seen.add(event.payload)
        data = json.loads(event.payload.decode("utf-8")) if event.payload else {}
        at_us = data.get("at_us")
        when = datetime.fromtimestamp(at_us / 1e6, tz=UTC) if isinstance(at_us, int) else event.recorded_at
        out.append(
            LedgerEntry(str(data.get("step_id", RUN_LEDGER_SUBJECT)), str(data.get("reason", "")), when)
        )
    return out


async def terminalize(engine: Engine, run_id: str, status: str, reason: str) -> TerminalizeResult:
    """Move the run to `status` (TRANSITIONED once, NOOP when already terminal); cancel children by policy."""
    engine.terminalizing[run_id] += 1  # counted: concurrent Terminalizes of one run overlap
    try:
        result = await _decide_and_append(engine, run_id, status, reason)
    finally:
        engine.terminalizing[run_id] -= 1
        if engine.terminalizing[run_id] <= 0:
            del engine.terminalizing[run_id]
    # A repeated cancel closes children again (a child the first cancel could not reach, say);
    # a NOOP on a run that ended otherwise changes nothing.
    if result.status == CANCELED and status == CANCELED:
        # Shielded: a caller that gives up (its deadline, a disconnect) must not stop it halfway.
        closing = asyncio.ensure_future(_close_children(engine, run_id))
        closing.add_done_callback(_log_unwaited_failure)
        await asyncio.shield(closing)
    return result


def _log_unwaited_failure(closing: asyncio.Future[None]) -> None:
    if not closing.cancelled() and closing.exception() is not None:
        log.warning("%s", closing.exception())  # also raised to the caller, if it still waits


async def _decide_and_append(engine: Engine, run_id: str, status: str, reason: str) -> TerminalizeResult:
    for _ in range(_MAX_DECISIONS):
        await engine.stop_driver(run_id)
        _, history = await engine.read_history(run_id, corrupt_ok=True)
        if history.terminal is not None:
            return TerminalizeResult(False, history.terminal.status)
        if history.corrupt is not None and status == COMPLETED:
            # Canceling or failing a run whose history cannot be read is an operator's way out;
            # completing it would claim a result nobody can check.
            raise corrupt_event_error(run_stream_id(run_id), history.corrupt_seq, history.corrupt)
        ledger_head, _ = await engine.env.store.head(ledger_stream_id(run_id))
        terminal = RunCompleted(
            status, history.last_checkpoint, reason, at_us=now_us(), has_ledger=ledger_head > 0
        )
        try:
            await engine.env.store.append(
                run_stream_id(run_id), [encode_event(terminal)], expected_seq=history.head_seq, status=status
            )
        except KeelError as error:
            if error.code == "sequence_conflict":
                continue  # someone appended since the read: decide again from the new head
            await _record_divergence(engine, run_id, status, error)
        return TerminalizeResult(True, status)
    raise _contended(f"run {run_id} kept changing while it was being terminalized")


async def _record_divergence(engine: Engine, run_id: str, status: str, error: KeelError) -> None:
    message = f"terminal run status persisted but {_EVENT_NAME[status]} append failed: {error.message}"
    entry = {"v": 1, "step_id": RUN_LEDGER_SUBJECT, "reason": message, "at_us": now_us()}
    try:
        await engine.env.store.append(
            ledger_stream_id(run_id),
            [(LEDGER_EVENT, canonical_json_bytes(entry))],
            expected_seq=None,
            expected_any=True,
        )
    except KeelError as ledger_error:
        log.error(
            "run %s: %s; the failure ledger write failed too: %s", run_id, message, ledger_error.message
        )
        raise KeelError(
            "terminal_append_failed",
            f"{message}; writing the failure ledger also failed: {ledger_error.message}",
            category=ErrorCategory.UNAVAILABLE,
            retryable=True,
            details={"run_id": run_id},
        ) from error
    log.error("run %s: %s (recorded in its failure ledger)", run_id, message)
    raise KeelError(
        "terminal_append_failed",
        message,
        category=ErrorCategory.UNAVAILABLE,
        retryable=True,
        details={"run_id": run_id},
    ) from error


async def _close_children(engine: Engine, run_id: str) -> None:
    """Cancel the parent's unfinished children whose policy is `cancel` (recursively).

    The children are the parent's links, so a child spawned by the RPC, on another engine, or whose
    start a crash interrupted is closed too; spawns in flight here land (or fail) first.
    """
    await engine.children.settle(run_id)
    links = await engine.children.links(run_id)
    doomed = [link for link in links if link.closed_by(CANCELED)]
    results = await asyncio.gather(*(cancel_child(engine, link) for link in doomed), return_exceptions=True)
    failed = {
        link.child_run_id: result.message if isinstance(result, KeelError) else repr(result)
        for link, result in zip(doomed, results, strict=True)
        if isinstance(result, BaseException)
    }
    if failed:
        # The parent is canceled; the caller learns that closing it is not finished, and a repeated
        # cancel (a NOOP for the parent) closes what is left.
        raise KeelError(
            "children_not_closed",
            f"run {run_id} is canceled, but {len(failed)} of its children could not be canceled yet "
            f"({'; '.join(f'{child}: {why}' for child, why in sorted(failed.items()))}); "
            "cancel the run again to close them",
            category=ErrorCategory.UNAVAILABLE,
            retryable=True,
            details={"run_id": run_id, "child_run_ids": ",".join(sorted(failed))},
        )


def _contended(what: str) -> KeelError:
    return KeelError(
        "terminalize_contended", f"{what}; try again", category=ErrorCategory.CONFLICT, retryable=True
    )


async def cancel_child(engine: Engine, link: ChildLink) -> None:
    """Cancel a linked child as its parent's cancel does; one never started is recorded canceled unrun."""
    for _ in range(_MAX_DECISIONS):
        try:
            await terminalize(engine, link.child_run_id, CANCELED, link.close_reason)
            return
        except KeelError as error:
            if error.code != "run_not_found":
                raise
        if await _cancel_unstarted(engine, link):
            return
    raise _contended(f"child run {link.child_run_id} kept changing while it was being canceled")


async def _cancel_unstarted(engine: Engine, link: ChildLink) -> bool:
    """Create the never-started child as canceled (False: it started meanwhile)."""
    manifest = await engine.manifest(link.child_manifest_id)
    snapshot = canonical_json_bytes(manifest.initial_context)
    snapshot_id = artifact_id_for_bytes(snapshot)
    at_us = now_us()
    started = RunStarted(
        link.op_id, link.child_manifest_id, snapshot_id, link.parent_run_id, link.fact_key, at_us=at_us
    )
    canceled = RunCompleted(CANCELED, snapshot_id, link.close_reason, at_us=at_us)
    try:
        await engine.env.store.append(
            run_stream_id(link.child_run_id),
            [encode_event(started), encode_event(canceled)],
            expected_seq=None,
            status=CANCELED,
            artifacts=[(SNAPSHOT_ARTIFACT_KIND, snapshot)],
        )
    except KeelError as error:
        if error.code == "sequence_conflict":
            return False
        raise
    log.info("child %s of run %s was canceled before it started", link.child_run_id, link.parent_run_id)
    return True
