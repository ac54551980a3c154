"""The task board: remote step attempts as tasks in the store, and the driver's wait for their outcome.

The driving engine calls `schedule` once the attempt's StepAttemptStarted is durable: the task
stream is created with an append that expects no stream, so a crash can never issue one attempt
twice (a second `schedule`, by a driver that adopted the attempt after a crash, finds the task and
waits for it). A hint naming the task goes to the queue's stream (`queue:<name>`), where every
engine's pollers are subscribed; the truth stays the task stream and its index attributes. The
hint stream keeps only its recent hints (a follower reads it from its head on).

`outcome` waits for the task's outcome without polling: the events this engine appends to the
task stream are handed over in the process (`EventLog.local`), and the stream is followed in the
store too (a subscription) when the outcome may come through another engine. It also
ends the task itself when a deadline passes (schedule-to-start, start-to-close, the claim's
lease): TaskExpired, appended with a compare-and-swap at the head it read, so a worker's
outcome that landed first wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from engine_service.domain import artifact_id_for_bytes, canonical_json_bytes
from engine_service.domain.canonical import parse_json_bytes
from engine_service.domain.events import ErrorRecord
from engine_service.domain.history import OpenAttempt
from engine_service.domain.streams import (
    TASK_COMPLETED_LABEL,
    TASK_ENQUEUED,
    TASK_EXPIRED_LABEL,
    TASK_FAILED_LABEL,
    TASK_OPEN_LABEL,
    queue_stream_id,
    task_stream_id,
)
from engine_service.domain.tasks import (
    CLAIMED,
    OP_ATTRIBUTE,
    PENDING,
    QUEUE_ATTRIBUTE,
    RUN_ENDED,
    STATE_ATTRIBUTE,
    TaskCompleted,
    TaskEvent,
    TaskExpired,
    TaskFailed,
    TaskReleased,
    TaskScheduled,
    TaskState,
    decode_task_event,
    encode_task_event,
    fold_task,
    next_deadline,
    op_key,
)
from engine_service.store.port import FOREVER, EventLog, StreamEvent
from keel_core.clock import now_us
from keel_core.errors import KeelError
from keel_core.recent import Recent

log = logging.getLogger(__name__)

# How long `TaskBoard.outcome` waits for a task's outcome on this engine's own appends alone before
# following its stream in the store too; and for how long after a task this engine waited for was
# claimed through another engine (workers served by several engines) it follows the store at once.
FOLLOW_STORE_AFTER = 0.2
CLAIMED_ELSEWHERE_MEMORY_US = 600 * 1_000_000
# A task's body (op config, input, context, facts) travels inline in TaskScheduled up to this size;
# a larger one is an artifact stored with the same append.
MAX_INLINE_BODY_BYTES = 256 * 1024
# A context larger than this is not put in the Task message: the worker reads it with GetArtifact.
MAX_INLINE_CONTEXT_BYTES = 1024 * 1024
BODY_ARTIFACT_KIND = "task-body"
CONTEXT_ARTIFACT_KIND = "task-context"
# A queue's hint stream keeps its last KEEP_HINTS to KEEP_HINTS + TRIM_HINTS_EVERY hints.
TRIM_HINTS_EVERY = 1000
KEEP_HINTS = 1000


def outcome_label(event: TaskEvent) -> str:
    """The task stream's status label after `event` (its outcome, or still open)."""
    match event:
        case TaskCompleted():
            return TASK_COMPLETED_LABEL
        case TaskFailed():
            return TASK_FAILED_LABEL
        case TaskExpired():
            return TASK_EXPIRED_LABEL
    return TASK_OPEN_LABEL


def task_attributes(scheduled: TaskScheduled, state: str) -> dict[str, str]:
    """The index entries of a task stream: its queue, op, and whether a worker holds it."""
    return {
        QUEUE_ATTRIBUTE: scheduled.task_queue,
        OP_ATTRIBUTE: op_key(scheduled.op_id, scheduled.op_version),
        STATE_ATTRIBUTE: state,
    }


def due_of(state: TaskState) -> int:
    """The task stream's due time in the store's index: its next deadline (0: none, or it ended)."""
    deadline = next_deadline(state)
    return deadline.at_us if deadline is not None else 0


def decoded(events: list[StreamEvent]) -> list[TaskEvent | None]:
    """Task events from the store's records (None for one this engine cannot read)."""
    return [decode_task_event(e.type, e.payload) for e in events]


@dataclass(frozen=True)
class Hint:
    """A task appeared in a queue: who may take it."""

    stream_id: str
    op: str
    again: bool = False  # hinted before (a released claim)
    # The task's first event, when this engine just created it (its claim then needs no read).
    scheduled: TaskScheduled | None = None


class TaskBoard:
    """Task streams as the engine writes and reads them; `on_hint` tells this engine's pollers at once."""

    def __init__(self, store: EventLog, *, follow_store_after: float = FOLLOW_STORE_AFTER) -> None:
        self.store = store
        # How long `outcome` waits on this engine's own appends alone before following the store too.
        self.follow_store_after = follow_store_after
        self._claimed_elsewhere_us = 0  # when a task ended with another engine's claim (0: never)
        self._claims_here: Recent[str, int] = Recent(10_000)  # task stream -> claim seq appended here
        # This engine's pollers; True when one of them takes the task at once (no store hint needed).
        self.on_hint: Callable[[str, Hint], bool] | None = None
        self._hints: set[asyncio.Future[None]] = set()

    async def read(self, stream_id: str, *, patience: float | None = None) -> TaskState:
        """A task's state from its stream."""
        return fold_task(decoded(await self.store.read(stream_id, patience=patience)))

    async def body(self, scheduled: TaskScheduled, *, patience: float | None = None) -> dict[str, Any]:
        """What the worker needs ({op_config, input, context?, facts}), inline or from its artifact."""
        if scheduled.body is not None:
            return scheduled.body
        data = await self.store.get_artifact(scheduled.body_artifact_id, patience=patience)
        return dict(parse_json_bytes(data))

    async def schedule(
        self, scheduled: TaskScheduled, body: dict[str, Any], stream_id: str, *, adopted: bool
    ) -> TaskState:
        """Create the attempt's task unless it exists (`adopted`: it may); return its state."""
        if adopted:
            state = await self.read(stream_id, patience=FOREVER)
            if state.scheduled is not None:
                if not state.claim and state.outcome is None:
                    await self.hint(state.scheduled, stream_id, again=True)  # its hint may have been lost
                return state
        artifacts: list[tuple[str, bytes]] = []
        context_bytes = canonical_json_bytes(body.get("context"))
        context_artifact = ""
        if len(context_bytes) > MAX_INLINE_CONTEXT_BYTES:
            body = {key: value for key, value in body.items() if key != "context"}
            artifacts.append((CONTEXT_ARTIFACT_KIND, context_bytes))
            context_artifact = artifact_id_for_bytes(context_bytes)
        body_bytes = canonical_json_bytes(body)
        if len(body_bytes) > MAX_INLINE_BODY_BYTES:
            artifacts.append((BODY_ARTIFACT_KIND, body_bytes))
            event = replace(
                scheduled,
                body=None,
                body_artifact_id=artifact_id_for_bytes(body_bytes),
                context_artifact_id=context_artifact,
            )
        else:
            event = replace(scheduled, body=body, context_artifact_id=context_artifact)
        try:
            await self.store.append(
                stream_id,
                [encode_task_event(event)],
                expected_seq=None,
                status=TASK_OPEN_LABEL,
                artifacts=artifacts,
                attributes=task_attributes(event, PENDING),
                patience=FOREVER,
                due_at_us=due_of(fold_task([event])),
            )
        except KeelError as error:
            if error.code != "sequence_conflict":
                raise
            return await self.read(stream_id, patience=FOREVER)  # a takeover's schedule met the first
        await self.hint(event, stream_id, fresh=True)
        return fold_task([event])

    async def hint(
        self, scheduled: TaskScheduled, stream_id: str, *, again: bool = False, fresh: bool = False
    ) -> None:
        """Tell the queue's pollers (here at once, elsewhere through the queue stream) a task is there.

        `again`: the task was hinted before (a released claim): pollers take it up anew. `fresh`:
        just created by this engine, so `scheduled` is all its stream holds.
        """
        hint = Hint(
            stream_id, op_key(scheduled.op_id, scheduled.op_version), again, scheduled if fresh else None
        )
        if self.on_hint is not None and self.on_hint(scheduled.task_queue, hint):
            return  # a poller of this engine takes it; if it lets go, the release hints it again
        payload = canonical_json_bytes({"v": 1, "task": stream_id, "op": hint.op, "again": again})
        # In the background: the driver goes on waiting for the task while the hint is written.
        writing = asyncio.ensure_future(self._write_hint(scheduled.task_queue, stream_id, payload))
        self._hints.add(writing)
        writing.add_done_callback(self._hints.discard)

    async def _write_hint(self, queue: str, stream_id: str, payload: bytes) -> None:
        hints = queue_stream_id(queue)
        try:
            appended = await self.store.append(
                hints, [(TASK_ENQUEUED, payload)], expected_seq=None, expected_any=True
            )
        except Exception as error:  # a hint only: pollers list the queue's index too
            log.warning("queue hint for %s not written: %s", stream_id, error)
            return
        # The writer of every TRIM_HINTS_EVERY-th hint trims the stream to its last KEEP_HINTS:
        # followers read it from their head on, and one that lagged that far lists the queue.
        head = appended.head_seq
        if head % TRIM_HINTS_EVERY == 0 and head > KEEP_HINTS:
            try:
                await self.store.trim(hints, head - KEEP_HINTS)
            except Exception as error:  # the next trim takes these too
                log.info("queue %s: hints not trimmed below %d: %s", queue, head - KEEP_HINTS, error)

    async def end(self, stream_id: str, state: TaskState, event: TaskEvent) -> TaskState:
        """Append an outcome at the head `state` was read at (`sequence_conflict` if someone wrote since)."""
        assert state.scheduled is not None
        await self.store.append(
            stream_id,
            [encode_task_event(event)],
            expected_seq=state.head_seq,
            status=outcome_label(event),
            attributes=task_attributes(state.scheduled, CLAIMED if state.claim else PENDING),
            patience=FOREVER,
            due_at_us=0,
        )
        return state.extend([event])

    async def close_open_tasks(self, run_id: str, attempts: Sequence[OpenAttempt]) -> None:
        """End the tasks of a terminalized run's open attempts (best effort: heartbeats also tell)."""
        for attempt in attempts:
            stream_id = task_stream_id(run_id, attempt.step_id, attempt.attempt)
            try:
                state = await self.read(stream_id)
                if state.scheduled is not None and state.outcome is None:
                    error = ErrorRecord(RUN_ENDED, "cancelled", False, "the run was terminalized")
                    await self.end(stream_id, state, TaskExpired(error, now_us()))
            except KeelError as error:
                log.info("task %s of a terminalized run not closed: %s", stream_id, error.message)

    async def release(self, stream_id: str, state: TaskState) -> TaskState:
        """Give up a claim its worker never acknowledged: the task is pending again (hinted anew)."""
        assert state.scheduled is not None
        event = TaskReleased(state.claim, state.worker_id, now_us(), exclude=True)
        await self.store.append(
            stream_id,
            [encode_task_event(event)],
            expected_seq=state.head_seq,
            status=TASK_OPEN_LABEL,
            attributes=task_attributes(state.scheduled, PENDING),
            patience=FOREVER,
            due_at_us=due_of(state.extend([event])),
        )
        log.info("task %s: claim of %s released (never heard from it)", stream_id, state.worker_id)
        await self.hint(state.scheduled, stream_id, again=True)
        return state.extend([event])

    async def enforce_deadline(self, stream_id: str, state: TaskState) -> TaskState:
        """End the task (or release an unheard claim) if its next deadline passed; its state after."""
        deadline = next_deadline(state)
        if deadline is None or deadline.at_us > now_us():
            return state
        if deadline.release:
            return await self.release(stream_id, state)
        return await self.end(stream_id, state, TaskExpired(deadline.error, now_us()))

    async def outcome(self, stream_id: str, state: TaskState, *, within: float | None = None) -> TaskState:
        """Wait until the task has an outcome, ending it when a deadline passes first.

        `within`: give up after this many seconds and return the state as it is then (no outcome).

        Events this engine appends to the stream (the claim, the outcome of a worker it serves) are
        handed over at once (`EventLog.local`); the stream is followed in the store as well only
        after `follow_store_after` seconds without an outcome, or at once while tasks are known to
        be claimed through other engines (`follows_store_at_once`): a task ended through this
        engine, the common case, costs no subscription.
        """
        stop_at = None if within is None else time.monotonic() + within
        arrivals: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()
        unwatch = self.store.local.watch(stream_id, arrivals.put_nowait)
        reader: asyncio.Task[None] | None = None

        def follow_store() -> None:
            nonlocal reader
            reader = asyncio.create_task(self._follow(stream_id, state.head_seq, arrivals))

        timer = None
        if self.follows_store_at_once():
            follow_store()
        else:
            timer = asyncio.get_running_loop().call_later(self.follow_store_after, follow_store)
        try:
            while state.outcome is None:
                if stop_at is not None and time.monotonic() >= stop_at:
                    return state
                arrived = await self._next_arrival(stream_id, state, arrivals, stop_at)
                if arrived is None:
                    continue
                if isinstance(arrived, TaskState):
                    state = arrived
                    continue
                if isinstance(arrived, BaseException):
                    raise arrived
                if arrived.seq == state.head_seq + 1:
                    state = state.extend([decode_task_event(arrived.type, arrived.payload)])
                elif arrived.seq > state.head_seq + 1:  # a gap (resubscribed, or written elsewhere): read
                    state = await self.read(stream_id, patience=FOREVER)
            self._note_claimant(stream_id, state)
            return state
        finally:
            unwatch()
            if timer is not None:
                timer.cancel()
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader

    def follows_store_at_once(self) -> bool:
        """Whether a task's outcome is followed in the store at once: another engine claimed a task
        this engine waited for, less than CLAIMED_ELSEWHERE_MEMORY_US ago."""
        return (
            bool(self._claimed_elsewhere_us)
            and now_us() - self._claimed_elsewhere_us < CLAIMED_ELSEWHERE_MEMORY_US
        )

    def claimed_here(self, stream_id: str, claim_seq: int) -> None:
        """This engine appended the task's claim at `claim_seq` (before its worker was told of it)."""
        self._claims_here.put(stream_id, claim_seq)

    def _note_claimant(self, stream_id: str, state: TaskState) -> None:
        """Remember when a task this engine waited for ended under another engine's claim."""
        if state.claim and self._claims_here.get(stream_id) != state.claim:
            self._claimed_elsewhere_us = now_us()
        self._claims_here.drop(stream_id)

    async def _next_arrival(
        self,
        stream_id: str,
        state: TaskState,
        arrivals: asyncio.Queue[StreamEvent | BaseException],
        stop_at: float | None,
    ) -> StreamEvent | BaseException | TaskState | None:
        """The next event of the task; its state once this engine ended it at a passed deadline; or
        None when `stop_at` (monotonic) came first."""
        with contextlib.suppress(asyncio.QueueEmpty):
            return arrivals.get_nowait()
        deadline = next_deadline(state)
        grace = None if stop_at is None else max(0.0, stop_at - time.monotonic())
        timeout = None if deadline is None else (deadline.at_us - now_us()) / 1e6
        if timeout is None or timeout > 0 or (grace is not None and grace < timeout):
            limit = grace if timeout is None else (timeout if grace is None else min(grace, timeout))
            try:
                return await asyncio.wait_for(arrivals.get(), limit)
            except TimeoutError:
                return None
        try:
            return await self.enforce_deadline(stream_id, state)
        except KeelError as error:
            if error.code != "sequence_conflict":
                raise
            # What landed first (a heartbeat, the outcome) may be another engine's, not followed yet.
            return await self.read(stream_id, patience=FOREVER)

    async def _follow(
        self, stream_id: str, after_seq: int, arrivals: asyncio.Queue[StreamEvent | BaseException]
    ) -> None:
        subscription = self.store.subscribe(stream_id, after_seq=after_seq)
        try:
            async with contextlib.aclosing(subscription):
                async for event in subscription:
                    arrivals.put_nowait(event)
        except Exception as error:
            arrivals.put_nowait(error)
