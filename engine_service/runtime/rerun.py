"""RerunRun: a new run of a terminal run's manifest that reuses what the run did before a step.

What the new run's first append holds is decided by engine_service.domain.rerun; this module reads
the old run, checks the request, links the reused steps' children to the new run and hands the
first append to the kernel, which appends it and drives the run like any other.

Order of writes: the children links first (an append that lists nothing until the run exists:
a children stream is read only through its run), then the run stream in one append. A retried
rerun with the same `run_id_new` finds its run and answers it; links appended twice are read once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from engine_service.domain import Plan, RunManifest, RunStarted
from engine_service.domain.canonical import parse_json_bytes
from engine_service.domain.manifest import RunStart
from engine_service.domain.rerun import check_rerun, is_same_rerun, rerun_start
from engine_service.domain.streams import children_stream_id, run_stream_id
from engine_service.runtime.reader import RunReader, stored_events
from engine_service.store.port import EventLog
from keel_core import tracing
from keel_core.clock import now_us
from keel_core.errors import ErrorCategory, KeelError
from keel_core.ids import new_run_id

log = logging.getLogger(__name__)


class RerunKernel(Protocol):
    """What a rerun needs of the kernel."""

    def plan_for(self, manifest: RunManifest) -> Plan:
        """The manifest's resolved plan."""
        ...

    async def start_prepared(self, run_id: str, manifest: RunManifest, plan: Plan, start: RunStart) -> bool:
        """Append the first batch and drive the run; False if the run exists."""
        ...

    async def resume_run(self, run_id: str, *, created_at_us: int | None = None) -> bool:
        """Drive the run if nobody does."""
        ...


class Reruns:
    """RerunRun for one engine."""

    def __init__(self, store: EventLog, reader: RunReader, kernel: RerunKernel) -> None:
        self.store = store
        self.reader = reader
        self.kernel = kernel

    async def rerun(
        self,
        run_id: str,
        from_step_id: str,
        run_id_new: str | None,
        trace_context: Mapping[str, str] | None = None,
    ) -> tuple[str, bool]:
        """Rerun `run_id` from `from_step_id` as `run_id_new` (a fresh id when None).

        Returns the new run's id and whether this call created it (False: `run_id_new` is the same
        rerun already). Nothing is written on bad input.
        """
        if run_id_new is not None and await self._existing(run_id_new, run_id, from_step_id):
            return run_id_new, False
        _, old = await self.reader.read_history(run_id)
        assert old.started is not None
        manifest = await self.reader.manifest(old.started.manifest_id)
        plan = self.kernel.plan_for(manifest)
        check_rerun(plan, old, run_id, from_step_id)
        checkpoint = parse_json_bytes(await self.store.get_artifact(old.last_checkpoint))
        prepared = rerun_start(
            plan,
            old,
            run_id,
            dict(checkpoint),
            manifest.initial_context,
            from_step_id,
            at_us=now_us(),
            manifest_bytes=manifest.canonical_bytes(),
            # The RerunRun span when this engine records spans, else the caller's trace context.
            trace_context=tracing.current_carrier() or trace_context,
        )
        new_id = run_id_new or new_run_id()
        if prepared.reused_children:
            links = [
                link
                for link in await self.reader.links(run_id)
                if link.child_run_id in prepared.reused_children
            ]
            if links:
                at_us = now_us()
                await self.store.append(
                    children_stream_id(new_id),
                    [link.encode(at_us) for link in links],
                    expected_seq=None,
                    expected_any=True,
                )
        if not await self.kernel.start_prepared(new_id, manifest, plan, prepared.start):
            await self._existing(new_id, run_id, from_step_id)  # a concurrent twin won, or another run
            return new_id, False
        log.info(
            "run %s: rerun of %s from step %r (%d step(s) reused)",
            new_id,
            run_id,
            from_step_id,
            len(prepared.reused_steps),
        )
        return new_id, True

    async def _existing(self, run_id_new: str, run_id: str, from_step_id: str) -> bool:
        """True when `run_id_new` is this rerun already (driven if nobody drives it); False when it
        does not exist; `run_already_exists` when it is another run."""
        first = stored_events(await self.store.read(run_stream_id(run_id_new), limit=1))
        if not first:
            return False
        started = first[0].event
        if isinstance(started, RunStarted) and is_same_rerun(started, run_id, from_step_id):
            await self.kernel.resume_run(run_id_new)
            return True
        raise KeelError(
            "run_already_exists",
            f"run {run_id_new} already exists and is not the rerun of run {run_id} from step "
            f"{from_step_id!r}; use a new run id",
            category=ErrorCategory.ALREADY_EXISTS,
            details={"run_id": run_id_new},
        )
