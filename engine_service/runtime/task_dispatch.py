"""How one engine hands a queue's tasks to the workers long-polling it: one dispatcher per queue.

Pollers (PollTask calls) wait in line; the queue's dispatcher gives each hinted task to one free
poller and claims it for that poller (claims of different tasks run at once), so that the pollers
of one engine never race each other for a task (every lost race costs a read and a failed
compare-and-swap). Which tasks there are comes from hints: this engine's drivers hint
the tasks they create at once (with the task's first event, so the claim needs no read), and a
subscription to the queue's stream (`queue:<name>`, one per queue per engine) brings the hints of
every other engine. The store's index of a queue's pending tasks is listed when the dispatcher
starts, and again when a poller arrives at most every LIST_SECONDS, for the tasks whose hint was
lost (an engine that died between creating a task and hinting it). No timer polls the store.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from engine_service.domain.canonical import parse_json_bytes
from engine_service.domain.streams import TASK_OPEN_LABEL, TASK_STREAM_PREFIX, queue_stream_id
from engine_service.domain.tasks import OP_ATTRIBUTE, PENDING, QUEUE_ATTRIBUTE, STATE_ATTRIBUTE
from engine_service.runtime.task_board import Hint
from engine_service.store.port import EventLog
from keel_core.clock import now_us

log = logging.getLogger(__name__)

LIST_SECONDS = 5.0
RELIST_SECONDS = 1.0  # after a failed listing or a lost subscription
_PAGE = 100
_RECENT = 4096


@dataclass
class Poller:
    """A PollTask waiting for a task: who asks, for which ops (empty: any), and where its task goes."""

    worker_id: str
    wanted: frozenset[str]
    result: asyncio.Future[object]
    busy: bool = False  # a claim for it is being written
    since_us: int = field(default_factory=now_us)  # when the poll began

    def wants(self, op: str) -> bool:
        """Whether this poller takes a task of `op` (`op_id@version`)."""
        return not self.wanted or op in self.wanted


CLAIM_WON = "won"
CLAIM_GONE = "gone"  # not claimable (any more): claimed elsewhere, ended, or never there
CLAIM_NOT_FOR = "not_for"  # claimable, but not by this poller's worker (it once claimed it and went quiet)

# Claims `hint`'s task for the poller (setting its result); says how that went.
Claim = Callable[[Hint, Poller], Awaitable[str]]


class QueueDispatcher:
    """The pollers of one queue on this engine, the tasks hinted to it, and the loop pairing them."""

    def __init__(self, store: EventLog, queue: str, claim: Claim, *, patience: float) -> None:
        self.store = store
        self.queue = queue
        self.claim = claim
        self.patience = patience
        self.pollers: collections.deque[Poller] = collections.deque()
        self.hints: collections.deque[Hint] = collections.deque()
        self._hinted: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._unwanted: list[Hint] = []  # hints no waiting poller's ops matched
        self._excluded: dict[str, set[int]] = {}  # task stream -> the polls (ids) it is not given to
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._listed_at = -1e9

    def add(self, poller: Poller) -> None:
        """A poller waits here until its `result` is set (or it gives up and cancels it)."""
        self.pollers.append(poller)
        self.hints.extend(self._unwanted)  # a new poller may want what nobody did
        self._unwanted.clear()
        if time.monotonic() - self._listed_at > LIST_SECONDS:
            self._listed_at = -1e9  # list again before the next claim
        if self._follower is None:
            self._follower = asyncio.create_task(self._follow(), name=f"queue {self.queue} hints")
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._dispatch(), name=f"queue {self.queue} dispatch")
        self._wake.set()

    def hint(self, hint: Hint) -> bool:
        """A task appeared in the queue (once per task, unless `again`: a released claim).

        True when a poller here is free to take it at once (more free pollers wanting its op than
        hints waiting): the hint then need not reach other engines.
        """
        if hint.stream_id in self._hinted and not hint.again:
            return False
        self._hinted[hint.stream_id] = None
        if len(self._hinted) > _RECENT:
            self._hinted.popitem(last=False)
        free = sum(1 for p in self.pollers if not p.busy and not p.result.done() and p.wants(hint.op))
        self.hints.append(hint)
        self._wake.set()
        return free >= len(self.hints)

    async def _dispatch(self) -> None:
        claims: set[asyncio.Task[None]] = set()
        try:
            while True:
                while self.pollers and self.pollers[0].result.done():
                    self.pollers.popleft()
                waiting = [p for p in self.pollers if not p.result.done()]
                if not waiting and not claims:
                    return  # restarted by the next poller
                if self._listed_at < 0:
                    await self._list()
                free = [p for p in waiting if not p.busy]
                if not self.hints or not free:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                hint = self.hints.popleft()
                excluded = self._excluded.get(hint.stream_id, set())
                poller = next((p for p in free if p.wants(hint.op) and id(p) not in excluded), None)
                if poller is None:
                    self._unwanted.append(hint)
                    continue
                poller.busy = True
                claim = asyncio.create_task(self._claim_one(hint, poller))
                claims.add(claim)
                claim.add_done_callback(claims.discard)
        finally:
            for claim in claims:
                claim.cancel()

    async def _claim_one(self, hint: Hint, poller: Poller) -> None:
        try:
            outcome = await self.claim(hint, poller)
        except Exception as error:  # the store away: the pollers' own deadlines end their wait
            log.info("queue %s: claiming %s failed: %s", self.queue, hint.stream_id, error)
            await asyncio.sleep(0.5)
            self.hints.appendleft(hint)
        else:
            if outcome == CLAIM_NOT_FOR:
                self._excluded.setdefault(hint.stream_id, set()).add(id(poller))
                if len(self._excluded) > _RECENT:
                    self._excluded.pop(next(iter(self._excluded)))
                self.hints.appendleft(hint)
        finally:
            poller.busy = False
            self._wake.set()

    async def _list(self) -> None:
        self._listed_at = time.monotonic()
        try:
            listed, _ = await self.store.list_streams(
                prefix=TASK_STREAM_PREFIX,
                statuses=[TASK_OPEN_LABEL],
                attributes={QUEUE_ATTRIBUTE: self.queue, STATE_ATTRIBUTE: PENDING},
                page_size=_PAGE,
                patience=self.patience,
            )
        except Exception as error:
            log.info(
                "queue %s: listing pending tasks failed (%s); again in %g s",
                self.queue,
                error,
                RELIST_SECONDS,
            )
            # Whatever asked for the listing (a follower that missed hints, say) still needs it.
            asyncio.get_running_loop().call_later(RELIST_SECONDS, self._list_again)
            return
        known = {hint.stream_id for hint in self.hints}
        for summary in reversed(listed):  # oldest first
            if summary.stream_id not in known:
                self.hints.append(Hint(summary.stream_id, summary.attributes.get(OP_ATTRIBUTE, "")))

    def _list_again(self) -> None:
        """List the queue's index before the next claim."""
        self._listed_at = -1e9
        self._wake.set()

    async def _follow(self) -> None:
        stream_id = queue_stream_id(self.queue)
        while True:
            try:
                head, _ = await self.store.head(stream_id)
                subscription = self.store.subscribe(stream_id, after_seq=head)
                seen = head
                async with contextlib.aclosing(subscription):
                    async for event in subscription:
                        if event.seq != seen + 1:  # trimmed before this engine read them: list
                            self._list_again()
                        seen = event.seq
                        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                            data = parse_json_bytes(event.payload)
                            self.hint(Hint(str(data["task"]), str(data["op"]), data.get("again") is True))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the store away: listing still finds the tasks when it is back
                log.info(
                    "queue %s: following hints failed (%s); again in %g s", self.queue, error, RELIST_SECONDS
                )
                self._list_again()
                await asyncio.sleep(RELIST_SECONDS)

    async def close(self) -> None:
        """Stop dispatching and following."""
        for task in (self._loop, self._follower):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


class QueueDispatchers:
    """This engine's dispatcher of each queue that pollers asked for."""

    def __init__(self, store: EventLog, claim: Claim, *, patience: float) -> None:
        self.store = store
        self.claim = claim
        self.patience = patience
        self.queues: dict[str, QueueDispatcher] = {}

    def of(self, queue: str) -> QueueDispatcher:
        """The queue's dispatcher (made on first use)."""
        dispatcher = self.queues.get(queue)
        if dispatcher is None:
            dispatcher = self.queues[queue] = QueueDispatcher(
                self.store, queue, self.claim, patience=self.patience
            )
        return dispatcher

    def hint(self, queue: str, hint: Hint) -> bool:
        """A task appeared in `queue`; True when a poller here takes it at once (see QueueDispatcher.hint)."""
        dispatcher = self.queues.get(queue)
        return dispatcher is not None and dispatcher.hint(hint)

    async def close(self) -> None:
        """Stop every dispatcher."""
        for dispatcher in list(self.queues.values()):
            await dispatcher.close()
