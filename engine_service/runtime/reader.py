"""Reading runs back from the event log: histories, manifests, snapshots, child links, the ledger.

Manifests and snapshots are content-addressed (an id always names the same bytes), and a terminal
run's stream never changes again, so what was read or written once is kept in small LRUs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from engine_service.domain import (
    RunHistory,
    RunManifest,
    RunStarted,
    StoredEvent,
    corrupt_event_error,
    decode_event,
    fold,
)
from engine_service.domain.canonical import parse_json_bytes
from engine_service.domain.child_runs import ChildLink, child_links
from engine_service.domain.streams import (
    children_stream_id,
    ledger_stream_id,
    run_status_of_label,
    run_stream_id,
)
from engine_service.store.port import EventLog, StreamEvent
from keel_core.clock import us_of
from keel_core.errors import ErrorCategory, KeelError, not_found
from keel_core.recent import Recent

# The subject of a ledger entry about the run as a whole (not one of its steps).
RUN_LEDGER_SUBJECT = "_run"
# Links held per run (RunReader.note_links): a fan-out's, not a large one's.
MAX_HELD_LINKS = 256


@dataclass(frozen=True)
class LedgerEntry:
    """A divergence the engine could not repair, kept for a person."""

    step_id: str
    reason: str
    recorded_at: datetime | None


def stored_events(raw: Sequence[StreamEvent]) -> list[StoredEvent]:
    """Store events decoded into kernel events."""
    return [StoredEvent(e.seq, decode_event(e.type, e.payload), e.recorded_at) for e in raw]


class RunReader:
    """Reads of runs, with caches of what never changes."""

    def __init__(self, store: EventLog) -> None:
        self.store = store
        # Content-addressed, so never stale: final snapshots of runs it finished, manifests it used.
        self._final_snapshots: Recent[str, Any] = Recent(1000)
        self._manifests: Recent[str, RunManifest] = Recent(1000)
        # Every event of runs this engine started and finished, with their fold: a terminal run's
        # stream never changes again, so its view needs no read of it (nor a fold).
        self._finished_runs: Recent[str, tuple[tuple[StoredEvent, ...], RunHistory]] = Recent(1000)
        # Their children as of their terminal append, when known without a read: none linked (the
        # append found the children stream empty), or every link one this engine appended.
        self._links_at_end: Recent[str, list[ChildLink]] = Recent(1000)
        # The links this engine appended to runs' children streams, by seq (see `links_appended`).
        self._appended_links: Recent[str, dict[int, tuple[str, bytes]]] = Recent(1000)
        # When run streams were created, by the store's clock, held while the driver here that
        # created each one drives it (`note_created`): the stream is that run's for as long.
        self._created_us: Recent[str, int] = Recent(1000)

    async def read_history(
        self, run_id: str, *, corrupt_ok: bool = False
    ) -> tuple[list[StoredEvent], RunHistory]:
        """A run's events and their fold (`run_not_found` if it has none).

        A history with an event that did not decode is DATA_LOSS `corrupt_event` unless `corrupt_ok`
        (Terminalize, which may still cancel or fail the run): nothing shows, resumes or waits for
        a run that cannot be read.
        """
        events = stored_events(await self.store.read(run_stream_id(run_id)))
        if not events:
            raise not_found("run_not_found", f"run {run_id} does not exist", run_id=run_id)
        history = fold(e.event for e in events)
        if history.corrupt is not None and not corrupt_ok:
            raise corrupt_event_error(run_stream_id(run_id), history.corrupt_seq, history.corrupt)
        return events, history

    def finished_run(self, run_id: str) -> tuple[tuple[StoredEvent, ...], RunHistory] | None:
        """Every event of a run this engine started and finished, with their fold, if still held."""
        return self._finished_runs.get(run_id)

    def forget(self, run_id: str) -> None:
        """Drop what is held of a run (it was deleted)."""
        self._finished_runs.drop(run_id)
        self._created_us.drop(run_id)
        self._links_at_end.drop(run_id)
        self._appended_links.drop(run_id)

    def remember_finished(
        self,
        run_id: str,
        events: Sequence[StoredEvent],
        history: RunHistory,
        *,
        links: list[ChildLink] | None = None,
    ) -> None:
        """Keep the events of a run this engine started and finished with their fold (`history`),
        and its children as of its terminal append when they are known (`links_appended`)."""
        self._finished_runs.put(run_id, (tuple(events), history))
        if links is not None:
            self._links_at_end.put(run_id, links)
        else:  # an earlier run of this id (deleted elsewhere since) may have left its own
            self._links_at_end.drop(run_id)

    def links_at_end(self, run_id: str) -> list[ChildLink] | None:
        """The children of a run this engine saw end, when known without a read (None: read them)."""
        return self._links_at_end.get(run_id)

    def note_links(self, parent_run_id: str, first_seq: int, links: Sequence[tuple[str, bytes]]) -> None:
        """Hold links (ChildLinked events) this engine just appended at `first_seq` and on."""
        held = self._appended_links.get(parent_run_id)
        if held is None:
            if first_seq != 1:  # links before these are not this engine's: never all known
                return
            held = {}
            self._appended_links.put(parent_run_id, held)
        if len(held) + len(links) > MAX_HELD_LINKS:
            # Past the bound, none: later notes start past seq 1 and are not held, the links are read.
            self._appended_links.drop(parent_run_id)
            return
        held.update(enumerate(links, first_seq))

    def start_linking(self, run_id: str) -> None:
        """A run of this id starts here: links held from an earlier run of the id are not its."""
        self._appended_links.drop(run_id)
        self._links_at_end.drop(run_id)
        self._created_us.drop(run_id)

    def note_created(self, run_id: str, at_us: int) -> None:
        """A driver here created the run's stream at `at_us` (its first append's commit time).

        Held only while that driver is the run's driver here (`Drivers.spawn` to `Drivers._done`), so
        only it reads the time: a resumption or a wake-up of the run here finds it busy. Once it ended,
        another engine may delete the run and start its id again, and the stream is read. Should that
        happen while the driver still lives (a cancel from another engine, a lost lease), what the
        driver decides from the time is fenced like all it writes: by its lease and its stream head.
        """
        self._created_us.put(run_id, at_us)

    def stopped_driving(self, run_id: str) -> None:
        """The run's driver here ended: its stream's creation time is let go."""
        self._created_us.drop(run_id)

    def links_appended(self, run_id: str, children_head: int | None) -> list[ChildLink] | None:
        """The run's children when its children stream, `children_head` events long, holds only
        links this engine appended (so their content is known); None otherwise. The run's held
        links are let go: it ended."""
        held = self._appended_links.get(run_id)
        self._appended_links.drop(run_id)
        if children_head == 0:
            return []
        if held is None or children_head is None or len(held) != children_head:
            return None
        if min(held) != 1 or max(held) != children_head:  # distinct seqs: exactly 1..head
            return None
        return child_links(held[seq] for seq in range(1, children_head + 1))

    async def run_status(self, run_id: str) -> str | None:
        """The run's terminal status, as its stream's label says (None: not terminal, or no run)."""
        _, label = await self.store.head(run_stream_id(run_id))
        return run_status_of_label(label)

    async def manifest(self, manifest_id: str) -> RunManifest:
        """A manifest artifact, read back and checked against its id."""
        known = self._manifests.get(manifest_id)
        if known is None:
            data = await self.store.get_artifact(manifest_id)
            try:
                known = RunManifest.from_bytes(data)
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
                raise KeelError(
                    "corrupt_artifact",
                    f"artifact {manifest_id} is not a run manifest ({type(error).__name__}: {error})",
                    category=ErrorCategory.DATA_LOSS,
                    details={"artifact_id": manifest_id},
                ) from None
            self._manifests.put(manifest_id, known)
        return known

    def remember_manifest(self, manifest_id: str, manifest: RunManifest) -> None:
        """Keep a manifest this engine stored."""
        self._manifests.put(manifest_id, manifest)

    async def final_snapshot(self, snapshot_id: str) -> Any:
        """A snapshot: a final one or a checkpoint (content-addressed, so cached by id)."""
        known = self._final_snapshots.get(snapshot_id)
        if known is None:
            known = parse_json_bytes(await self.store.get_artifact(snapshot_id))
            self._final_snapshots.put(snapshot_id, known)
        return known

    def remember_final_snapshot(self, snapshot_id: str, snapshot: Any) -> None:
        """Keep the final snapshot of a run this engine finished."""
        self._final_snapshots.put(snapshot_id, snapshot)

    async def started_manifest_id(self, run_id: str) -> str | None:
        """The manifest id the run was started with (None: it was never started)."""
        first = await self.store.read(run_stream_id(run_id), limit=1)
        event = decode_event(first[0].type, first[0].payload) if first else None
        if first and not isinstance(event, RunStarted):
            return "?"  # not a run Keel started: matches no manifest
        return event.manifest_id if isinstance(event, RunStarted) else None

    async def created_at_us(self, run_id: str) -> int | None:
        """When the run stream was created (its first event's commit time, by the store's clock):
        held while a driver here that created it drives it, else read."""
        held = self._created_us.get(run_id)
        if held is not None:
            return held
        first = await self.store.read(run_stream_id(run_id), limit=1)
        when = first[0].recorded_at if first else None
        return us_of(when) if when else None

    async def links(self, parent_run_id: str) -> list[ChildLink]:
        """The parent's children, as its children stream links them (by fact key)."""
        events = await self.store.read(children_stream_id(parent_run_id))
        return child_links((event.type, event.payload) for event in events)

    async def link_of(self, parent_run_id: str, child_run_id: str) -> ChildLink | None:
        """The parent's link of this child, if the parent has one."""
        links = await self.links(parent_run_id)
        return next((link for link in links if link.child_run_id == child_run_id), None)

    async def has_ledger(self, run_id: str) -> bool:
        """Whether the run's failure ledger has any entry."""
        head, _ = await self.store.head(ledger_stream_id(run_id))
        return head > 0

    async def ledger(self, run_id: str) -> list[LedgerEntry]:
        """A run's failure ledger, oldest first."""
        out = []
        seen: set[bytes] = set()
        for event in await self.store.read(ledger_stream_id(run_id)):
            if event.payload in seen:
                # The same entry twice: a retried append whose first answer was lost, kept by a store
                # older than append keys (or written before them).
                continue
            seen.add(event.payload)
            data = json.loads(event.payload.decode("utf-8")) if event.payload else {}
            at_us = data.get("at_us")
            when = (
                datetime.fromtimestamp(at_us / 1e6, tz=UTC) if isinstance(at_us, int) else event.recorded_at
            )
            subject = str(data.get("step_id", RUN_LEDGER_SUBJECT))
            out.append(LedgerEntry(subject, str(data.get("reason", "")), when))
        return out
