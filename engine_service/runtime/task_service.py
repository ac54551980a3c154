"""What WorkerService does, over the store: hand out tasks, and take a claim's heartbeats, facts and outcome.

Any engine serves any worker: a task's truth is its stream (engine_service.domain.tasks), written
with a compare-and-swap at the head just read, so two engines (or a worker retrying) never write
one task twice. Every call with a token checks the claim first (`check_claim`: `task_stale` when
it is not current) and writes nothing when its request is bad.

PollTask waits without polling the store: a poller registers with the queue's `QueueWaiters`
before listing the queue's pending tasks (the store indexes task streams by queue and state), then
waits for a hint, which comes from this engine's drivers at once and from other engines through
the queue stream (one subscription per queue per engine). A hint is handed to one waiter; a
waiter that leaves without using its hint passes it on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from engine_service.domain import ErrorRecord, canonical_json_bytes
from engine_service.domain.facts import check_fact_key
from engine_service.domain.streams import (
    TASK_OPEN_LABEL,
    TASK_STREAM_PREFIX,
    WORKER_SEEN,
    WORKER_STREAM_PREFIX,
    run_status_of_label,
    run_stream_id,
    worker_stream_id,
)
from engine_service.domain.tasks import (
    CLAIMED,
    DEFAULT_TASK_HEARTBEAT_MS,
    OP_DESCRIPTIONS_ATTRIBUTE,
    PENDING,
    QUEUE_ATTRIBUTE,
    RUN_ENDED,
    STATE_ATTRIBUTE,
    TaskClaimed,
    TaskCompleted,
    TaskEvent,
    TaskExpired,
    TaskFactRecorded,
    TaskFailed,
    TaskHeartbeat,
    TaskReleased,
    TaskScheduled,
    TaskState,
    TaskToken,
    check_claim,
    check_queue_name,
    decode_op_descriptions,
    encode_op_descriptions,
    encode_task_event,
    fold_task,
    heartbeat_ms_of,
    lease_deadline_after,
    op_key,
    same_completion,
)
from engine_service.runtime.task_board import Hint, TaskBoard, due_of, task_attributes
from engine_service.runtime.task_dispatch import (
    CLAIM_GONE,
    CLAIM_NOT_FOR,
    CLAIM_WON,
    Poller,
    QueueDispatchers,
)
from keel_core.clock import now_us
from keel_core.errors import ErrorCategory, KeelError, invalid_argument
from keel_core.json_rules import check_json

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 4 * 1024 * 1024
MAX_FACT_BYTES = 1024 * 1024 - 64 * 1024  # as for io.call: room for the event's envelope
MAX_NAME_CHARS = 128
MAX_ERROR_MESSAGE_CHARS = 8192
# A worker's poll is recorded (worker:<id>) at most this often per engine; ListQueues shows the
# workers recorded within WORKER_SEEN_WITHIN.
WORKER_RECORD_SECONDS = 10.0
WORKER_SEEN_WITHIN = timedelta(seconds=60)
# How many times a write retries after another write to the task landed first.
_CAS_TRIES = 20
_KNOWN_STATES = 10_000


@dataclass(frozen=True)
class ClaimedTask:
    """A task claimed for a worker: its claim token, what it is, and what the worker needs."""

    token: TaskToken
    scheduled: TaskScheduled
    body: dict[str, Any]
    lease_deadline_us: int
    worker_id: str
    heartbeat_ms: int  # the claim's heartbeat timeout (the step's, else the engine's default; 0: none)


@dataclass(frozen=True)
class WorkerSeen:
    """A worker that polled a queue recently."""

    worker_id: str
    task_queue: str
    last_seen: datetime | None
    ops: tuple[tuple[str, str], ...]
    descriptions: Mapping[str, str] = field(default_factory=dict)  # by op_key: what its ops do


@dataclass
class QueueView:
    """A queue as ListQueues shows it."""

    task_queue: str
    backlog: int = 0
    running: int = 0
    workers: list[WorkerSeen] = field(default_factory=list)


class TaskService:
    """WorkerService's logic: every method validates its whole request before it writes."""

    def __init__(
        self,
        board: TaskBoard,
        *,
        patience: float = 10.0,
        default_heartbeat_ms: int = DEFAULT_TASK_HEARTBEAT_MS,
    ) -> None:
        self.board = board
        # The heartbeat timeout of remote steps that set none (0: such claims never expire).
        self.default_heartbeat_ms = default_heartbeat_ms
        self.store = board.store
        self.patience = patience
        self.dispatchers = QueueDispatchers(board.store, self._claim_for, patience=patience)
        board.on_hint = self.dispatchers.hint
        self._recorded_workers: dict[tuple[str, str], float] = {}
        self._releases: set[asyncio.Future[None]] = set()
        # Task states as this engine last wrote or handed them out (see _state).
        self._states: collections.OrderedDict[str, TaskState] = collections.OrderedDict()
        # Told the run id when a worker ended a task here (the kernel wakes a run parked on it).
        self.on_ended: Callable[[str], None] | None = None
        # Observers (metrics): each claim this engine made, with its schedule-to-start seconds.
        self.on_claimed: list[Callable[[TaskScheduled, float], None]] = []

    # --- PollTask --------------------------------------------------------------------------------

    async def poll(
        self,
        queue: str,
        worker_id: str,
        ops: Sequence[tuple[str, str]],
        wait_seconds: float,
        descriptions: Mapping[str, str] | None = None,
    ) -> ClaimedTask | None:
        """Claim a task of `queue` for `worker_id` (one of `ops`; none: any), waiting up to `wait_seconds`;
        `descriptions` (by `op_key`) are what the worker says its ops do, for ListOps."""
        check_queue_name(queue)
        check_name(worker_id, "worker_id")
        for op_id, _ in ops:
            check_name(op_id, "ops[].op_id")
        wanted = frozenset(op_key(op_id, version or "1") for op_id, version in ops)
        await self._record_worker(queue, worker_id, ops, descriptions or {})
        poller = Poller(worker_id, wanted, asyncio.get_running_loop().create_future())
        self.dispatchers.of(queue).add(poller)
        try:
            claimed = await asyncio.wait_for(asyncio.shield(poller.result), wait_seconds)
        except TimeoutError:
            poller.result.cancel()
            return None
        except asyncio.CancelledError:
            # The worker went away: a task claimed for it meanwhile goes back to the queue.
            if poller.result.done() and not poller.result.cancelled():
                self._release_later(_claimed(poller.result.result()))
            poller.result.cancel()
            raise
        return _claimed(claimed)

    async def _claim_for(self, hint: Hint, poller: Poller) -> str:
        """Claim `hint`'s task for `poller` (setting its result): CLAIM_WON, CLAIM_GONE or CLAIM_NOT_FOR."""
        if hint.scheduled is not None and not hint.again:
            state = fold_task([hint.scheduled])  # hinted by this engine as it created it: no read
        else:
            state, run_label = await asyncio.gather(
                self.board.read(hint.stream_id, patience=self.patience), self._run_label_of(hint.stream_id)
            )
            if run_status_of_label(run_label) is not None and state.scheduled is not None:
                await self._close_for_ended_run(hint.stream_id, state)
                return CLAIM_GONE
        scheduled = state.scheduled
        if scheduled is None or state.claim or state.outcome is not None:
            return CLAIM_GONE
        released_at = state.released_workers.get(poller.worker_id, 0)
        if released_at and poller.since_us <= released_at:
            return CLAIM_NOT_FOR  # a poll of a worker that claimed it and went quiet: a stale poll
        now = now_us()
        heartbeat_ms = heartbeat_ms_of(scheduled.timeouts, self.default_heartbeat_ms)
        lease_deadline = now + heartbeat_ms * 1000 if heartbeat_ms else 0
        claim = TaskClaimed(poller.worker_id, now, lease_deadline, heartbeat_ms)
        try:
            await self.store.append(
                hint.stream_id,
                [encode_task_event(claim)],
                expected_seq=state.head_seq,
                status=TASK_OPEN_LABEL,
                attributes=task_attributes(scheduled, CLAIMED),
                patience=self.patience,
                due_at_us=due_of(state.extend([claim])),
            )
        except KeelError as error:
            if error.code == "sequence_conflict":
                return CLAIM_GONE  # another engine's worker won it
            raise
        self.board.claimed_here(hint.stream_id, state.head_seq + 1)
        token = TaskToken(scheduled.run_id, scheduled.step_id, scheduled.attempt, state.head_seq + 1)
        body = await self._body_for_worker(state)
        claimed = ClaimedTask(token, scheduled, body, lease_deadline, poller.worker_id, heartbeat_ms)
        if poller.result.done():  # it gave up while the claim was written
            self._release_later(claimed)
            return CLAIM_GONE
        self._remember(hint.stream_id, state.extend([claim]))
        poller.result.set_result(claimed)
        for observe in self.on_claimed:
            observe(scheduled, max(0.0, (now - scheduled.at_us) / 1e6))
        return CLAIM_WON

    async def _body_for_worker(self, state: TaskState) -> dict[str, Any]:
        """The task's body, with facts recorded in the task under a claim released since."""
        assert state.scheduled is not None
        body = dict(await self.board.body(state.scheduled, patience=self.patience))
        if state.facts:
            known = {fact.get("fact_key") for fact in body.get("facts", ())}
            extra = [
                {"namespace": f.namespace, "fact_key": f.fact_key, "response": f.response}
                for f in state.facts.values()
                if f.fact_key not in known
            ]
            body["facts"] = [*body.get("facts", ()), *extra]
        return body

    def _release_later(self, claimed: ClaimedTask) -> None:
        releasing = asyncio.ensure_future(self._release(claimed))
        self._releases.add(releasing)
        releasing.add_done_callback(self._releases.discard)

    async def _release(self, claimed: ClaimedTask) -> None:
        token = claimed.token
        try:
            state = await self.board.read(token.stream_id, patience=self.patience)
            if state.claim != token.claim or state.outcome is not None or state.scheduled is None:
                return
            released = TaskReleased(token.claim, claimed.worker_id, now_us())
            await self.store.append(
                token.stream_id,
                [encode_task_event(released)],
                expected_seq=state.head_seq,
                status=TASK_OPEN_LABEL,
                attributes=task_attributes(state.scheduled, PENDING),
                patience=self.patience,
                due_at_us=due_of(state.extend([released])),
            )
            log.info("task %s: released (its poll ended before the worker heard of it)", token.stream_id)
            await self.board.hint(state.scheduled, token.stream_id, again=True)
        except KeelError as error:
            log.info("task %s: not released (%s); its timeouts decide it", token.stream_id, error.message)

    async def _run_label_of(self, task_stream: str) -> str:
        run_id = task_stream.removeprefix(TASK_STREAM_PREFIX).split(":", 1)[0]
        _, label = await self.store.head(run_stream_id(run_id), patience=self.patience)
        return label

    async def _close_for_ended_run(self, stream_id: str, state: TaskState) -> None:
        """A task of a run that ended: closed, so that no worker takes it and ListQueues counts it no more."""
        error = ErrorRecord(RUN_ENDED, "cancelled", False, "the run ended before the task did")
        with contextlib.suppress(KeelError):
            await self.board.end(stream_id, state, TaskExpired(error, now_us()))

    async def _record_worker(
        self, queue: str, worker_id: str, ops: Sequence[tuple[str, str]], descriptions: Mapping[str, str]
    ) -> None:
        key = (queue, worker_id)
        now = time.monotonic()
        if now - self._recorded_workers.get(key, -1e9) < WORKER_RECORD_SECONDS:
            return
        self._recorded_workers[key] = now
        declared = ",".join(f"{op_id}@{version or '1'}" for op_id, version in ops)
        attributes = {QUEUE_ATTRIBUTE: queue, "ops": declared[:1000]}
        described = encode_op_descriptions(descriptions)
        if described:
            attributes[OP_DESCRIPTIONS_ATTRIBUTE] = described
        try:
            result = await self.store.append(
                worker_stream_id(worker_id),
                [(WORKER_SEEN, canonical_json_bytes({"v": 1, "queue": queue, "at_us": now_us()}))],
                expected_seq=None,
                expected_any=True,
                status=TASK_OPEN_LABEL,
                attributes=attributes,
                patience=self.patience,
            )
            if result.head_seq > 100:  # only the last poll matters: keep the stream short
                await self.store.trim(worker_stream_id(worker_id), result.head_seq, patience=self.patience)
        except KeelError as error:
            log.info("worker %s: its poll was not recorded: %s", worker_id, error.message)

    # --- calls with a token ----------------------------------------------------------------------

    async def _state(self, token: TaskToken, *, fresh: bool) -> TaskState:
        """The task's state: this engine's copy when it handed out or last wrote this claim, else read.

        A copy may be behind (another engine took a heartbeat, the driver ended the task): a write
        at its head then meets `sequence_conflict`, and callers read afresh before any refusal.
        """
        if not fresh:
            known = self._states.get(token.stream_id)
            if known is not None and known.claim == token.claim:
                return known
        state = await self.board.read(token.stream_id, patience=self.patience)
        self._remember(token.stream_id, state)
        return state

    def _remember(self, stream_id: str, state: TaskState) -> None:
        self._states[stream_id] = state
        self._states.move_to_end(stream_id)
        while len(self._states) > _KNOWN_STATES:
            self._states.popitem(last=False)

    async def _write(self, token: TaskToken, state: TaskState, event: TaskEvent) -> bool:
        """Append `event` at `state`'s head: False when something else landed first (read again)."""
        assert state.scheduled is not None
        try:
            if isinstance(event, TaskCompleted | TaskFailed | TaskExpired):
                await self.board.end(token.stream_id, state, event)
            else:
                await self.store.append(
                    token.stream_id,
                    [encode_task_event(event)],
                    expected_seq=state.head_seq,
                    status=TASK_OPEN_LABEL,
                    patience=self.patience,
                    # A heartbeat moves the task's lease deadline in the due-time index.
                    due_at_us=due_of(state.extend([event])) if isinstance(event, TaskHeartbeat) else None,
                )
        except KeelError as error:
            if error.code == "sequence_conflict":
                self._states.pop(token.stream_id, None)
                return False
            raise
        self._remember(token.stream_id, state.extend([event]))
        return True

    async def _claimed_state(self, token: TaskToken, fresh: bool) -> tuple[TaskState, bool]:
        """(state, fresh) of a current claim; a refusal (`task_stale`...) only follows a fresh read."""
        state = await self._state(token, fresh=fresh)
        try:
            check_claim(state, token, now_us())
        except KeelError:
            if fresh:
                raise
            return await self._claimed_state(token, True)
        return state, fresh

    async def heartbeat(self, token: TaskToken) -> tuple[bool, int]:
        """(cancel_requested, lease deadline in µs, 0: none) for a current claim."""
        fresh = False
        for _ in range(_CAS_TRIES):
            (state, fresh), run_label = await asyncio.gather(
                self._claimed_state(token, fresh), self._run_label_of(token.stream_id)
            )
            if run_status_of_label(run_label) is not None:
                await self._close_for_ended_run(token.stream_id, state)
                return True, 0
            deadline = lease_deadline_after(state, now_us())
            if not deadline:
                return False, 0
            if await self._write(token, state, TaskHeartbeat(token.claim, deadline, now_us())):
                return False, deadline
            fresh = True
        raise _busy()

    async def record_fact(
        self, token: TaskToken, namespace: str, fact_key: str, response: Any
    ) -> tuple[Any, bool]:
        """(the recorded answer, whether it was recorded before) for RecordFact."""
        check_name(namespace, "namespace")
        check_fact_key(fact_key, "RecordFact")
        check_json(response, "response", within=1)  # FactRecorded holds it one level down
        size = len(canonical_json_bytes(response))
        if size > MAX_FACT_BYTES:
            raise invalid_argument(
                "fact_too_large", f"the response is {size} bytes of JSON; the limit is {MAX_FACT_BYTES}"
            )
        fresh = False
        for _ in range(_CAS_TRIES):
            state, fresh = await self._claimed_state(token, fresh)
            found, earlier = await self._recorded(state, fact_key)
            if found:
                return earlier, True
            if await self._replaying(state):
                raise KeelError(
                    "replay_fact_missing",
                    f"RecordFact: the run replays another run, which recorded no fact under this key "
                    f"(namespace {namespace!r}); a replay makes no new calls",
                    category=ErrorCategory.FAILED_PRECONDITION,
                )
            if await self._write(
                token, state, TaskFactRecorded(token.claim, namespace, fact_key, response, now_us())
            ):
                return response, False
            fresh = True
        raise _busy()

    async def _recorded(self, state: TaskState, fact_key: str) -> tuple[bool, Any]:
        """(True, answer) when the key is recorded in the task or was in the run when it was scheduled."""
        if fact_key in state.facts:
            return True, state.facts[fact_key].response
        assert state.scheduled is not None
        body = await self.board.body(state.scheduled, patience=self.patience)
        for fact in body.get("facts", ()):
            if fact.get("fact_key") == fact_key:
                return True, fact.get("response")
        return False, None

    async def _replaying(self, state: TaskState) -> bool:
        assert state.scheduled is not None
        return (await self.board.body(state.scheduled, patience=self.patience)).get("replay") is True

    async def complete(self, token: TaskToken, output: Any) -> None:
        """CompleteTask: the claim's output ends the task (the same again answers OK)."""
        check_json(output, "output", within=1)  # the run's context holds it one level down
        size = len(canonical_json_bytes(output))
        if size > MAX_OUTPUT_BYTES:
            raise invalid_argument(
                "output_too_large",
                f"the output is {size} bytes of JSON; the limit is {MAX_OUTPUT_BYTES} "
                "(store large data elsewhere and return a reference)",
                size=size,
                limit=MAX_OUTPUT_BYTES,
            )
        await self._end(token, TaskCompleted(token.claim, output, now_us()), output)

    async def fail(self, token: TaskToken, error: ErrorRecord) -> None:
        """FailTask: the claim's error ends the task."""
        check_name(error.code, "error.code")
        if len(error.message) > MAX_ERROR_MESSAGE_CHARS:
            error = ErrorRecord(
                error.code, error.category, error.retryable, error.message[:MAX_ERROR_MESSAGE_CHARS]
            )
        check_json(error.details, "error.details", within=2)  # the events hold {"error": {"details": ...}}
        await self._end(token, TaskFailed(token.claim, error, now_us()), None)

    async def _end(self, token: TaskToken, event: TaskCompleted | TaskFailed, output: Any) -> None:
        """Write the claim's outcome. A terminalized run's tasks were ended by Terminalize: stale."""
        fresh = False
        for _ in range(_CAS_TRIES):
            state = await self._state(token, fresh=fresh)
            if isinstance(event, TaskCompleted) and same_completion(state, token, output):
                return  # a retried CompleteTask
            if not fresh:
                try:
                    check_claim(state, token, now_us())
                except KeelError:
                    fresh = True
                    continue
            check_claim(state, token, now_us())
            if await self._write(token, state, event):
                if self.on_ended is not None:
                    self.on_ended(token.run_id)  # a run parked on this task wakes
                return
            fresh = True
        raise _busy()

    async def artifact(self, token: TaskToken, artifact_id: str) -> bytes:
        """An artifact of the claim's task (its context or body), for GetArtifact."""
        state, _ = await self._claimed_state(token, False)
        assert state.scheduled is not None
        if artifact_id not in {state.scheduled.context_artifact_id, state.scheduled.body_artifact_id} - {""}:
            raise KeelError(
                "artifact_not_found",
                "the task has no artifact with this id",
                category=ErrorCategory.NOT_FOUND,
            )
        return await self.store.get_artifact(artifact_id, patience=self.patience)

    # --- ListQueues ------------------------------------------------------------------------------

    async def list_queues(self) -> list[QueueView]:
        """Every queue with open tasks or recent workers: backlog, running, workers and their ops."""
        queues: dict[str, QueueView] = {}
        async for summary in self._all(TASK_STREAM_PREFIX, [TASK_OPEN_LABEL]):
            name = summary.attributes.get(QUEUE_ATTRIBUTE, "")
            if not name:
                continue
            view = queues.setdefault(name, QueueView(name))
            if summary.attributes.get(STATE_ATTRIBUTE) == CLAIMED:
                view.running += 1
            else:
                view.backlog += 1
        for seen in await self.workers_seen():
            queues.setdefault(seen.task_queue, QueueView(seen.task_queue)).workers.append(seen)
        return [queues[name] for name in sorted(queues)]

    async def workers_seen(self) -> list[WorkerSeen]:
        """The workers that polled within WORKER_SEEN_WITHIN, with their queue and ops."""
        since = datetime.now(UTC) - WORKER_SEEN_WITHIN
        found: list[WorkerSeen] = []
        async for summary in self._all(WORKER_STREAM_PREFIX, []):
            if summary.updated_at is None or summary.updated_at < since:
                continue
            ops = tuple(
                (op.rpartition("@")[0], op.rpartition("@")[2])
                for op in summary.attributes.get("ops", "").split(",")
                if "@" in op
            )
            found.append(
                WorkerSeen(
                    summary.stream_id.removeprefix(WORKER_STREAM_PREFIX),
                    summary.attributes.get(QUEUE_ATTRIBUTE, ""),
                    summary.updated_at,
                    ops,
                    decode_op_descriptions(summary.attributes.get(OP_DESCRIPTIONS_ATTRIBUTE, "")),
                )
            )
        return sorted(found, key=lambda w: (w.task_queue, w.worker_id))

    async def _all(self, prefix: str, statuses: list[str]) -> Any:
        token = ""
        for _ in range(100):  # at most 100,000 streams
            page, token = await self.store.list_streams(
                prefix=prefix, statuses=statuses, page_size=1000, page_token=token, patience=self.patience
            )
            for summary in page:
                yield summary
            if not token:
                return

    async def close(self) -> None:
        """Stop dispatching and following queues."""
        await self.dispatchers.close()


def _claimed(result: object) -> ClaimedTask:
    assert isinstance(result, ClaimedTask)
    return result


def check_name(value: str, what: str) -> str:
    """A required name of 1 to MAX_NAME_CHARS characters without control characters."""
    if not value or len(value) > MAX_NAME_CHARS or any(ord(c) < 32 for c in value):
        raise invalid_argument(
            "invalid_argument", f"{what} must be 1 to {MAX_NAME_CHARS} characters without control characters"
        )
    return value


def _busy() -> KeelError:
    return KeelError(
        "task_busy",
        "the task kept changing while this call tried to write it; try again",
        category=ErrorCategory.UNAVAILABLE,
        retryable=True,
    )
