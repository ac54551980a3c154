"""An op's I/O: `io.call` answers become facts of the run, durable before the op sees them.

`io.call` answers from the facts already in the stream when the key is there (no transport call);
otherwise it calls the transport (in replay mode: takes the fact of the replayed run) and appends
FactRecorded *before* returning the answer to the op. That append does not need the lease: it is a
compare-and-swap at the head the driver wrote, which lands unless someone else appended since, so
an answer is kept through a lapse of the lease (a pause, the store away) with nobody taking over,
and through a store outage (retried until it lands; a cancel because the lease was lost waits for
it). Transports get `step_id`, `attempt` and `fencing` (the seq of the attempt's
StepAttemptStarted) when they accept them (engine_service.domain.transports).

The driver (engine_service.runtime.driver) holds a RunFacts and gives each op attempt a RunIo;
RunFacts reaches the driver through the narrow `RunWriter` Protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from engine_service.domain import (
    FactRecorded,
    KernelEvent,
    RunHistory,
    RunManifest,
    canonical_json_bytes,
    fold,
)
from engine_service.domain.canonical import json_copy
from engine_service.domain.child_runs import AWAIT_NAMESPACE, SPAWN_NAMESPACE
from engine_service.domain.events import decode_event
from engine_service.domain.facts import check_fact_key
from engine_service.domain.run_config import REPLAY
from engine_service.domain.streams import run_stream_id
from engine_service.failpoints import (
    AFTER_CHILD_AWAIT_RECORDED,
    AFTER_CHILD_SPAWN_RECORDED,
    AFTER_FACT_RECORDED,
    PAUSE_BEFORE_TRANSPORT_CALL,
)
from engine_service.runtime.environment import PARK_FLUSH_SECONDS, RunEnvironment
from engine_service.runtime.futures import run_telling
from engine_service.runtime.leases import Lease
from engine_service.store.port import FOREVER
from keel_core.errors import ErrorCategory, KeelError
from keel_core.json_rules import MAX_JSON_DEPTH, check_json, nests_too_deeply

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_FACT_BYTES = 1024 * 1024 - 64 * 1024  # room for the FactRecorded envelope


def io_error(code: str, message: str) -> KeelError:
    """What an op's call or output that cannot be recorded fails with (not retryable)."""
    return KeelError(code, message, category=ErrorCategory.FAILED_PRECONDITION, retryable=False)


def _answer_refused(namespace: str, refused: KeelError) -> KeelError:
    """Why a transport's answer fails its attempt: not JSON, or too deep for FactRecorded to hold."""
    if not nests_too_deeply(refused):
        why = f"the {namespace!r} transport answered with a value that is not JSON"
    elif namespace == AWAIT_NAMESPACE:
        # The answer holds the child's final context (final_snapshot), which holds its output.
        why = (
            "the awaited child run's output (or its initial context) nests too deeply for its parent to "
            "record it: FactRecorded holds the await's answer one level down, the answer holds the "
            "child's final context one level down and the context its output one more, so an awaited "
            f"child's output nests at most {MAX_JSON_DEPTH - 3} levels"
        )
    else:
        why = (
            f"the {namespace!r} transport answered with a value that nests too deeply to be recorded: "
            f"FactRecorded holds an answer one level down, so it nests at most {MAX_JSON_DEPTH - 1} levels"
        )
    return io_error("transport_response_invalid", f"{why}: {refused.message}")


@dataclass(frozen=True)
class AttemptOf:
    """The attempt an I/O call belongs to; `fencing` is the seq of its StepAttemptStarted."""

    step_id: str
    attempt: int
    fencing: int


class RunWriter(Protocol):
    """What recording an answer needs of the run's driver."""

    run_id: str
    env: RunEnvironment
    manifest: RunManifest
    lease: Lease | None
    history: RunHistory

    def record(
        self,
        events: Sequence[KernelEvent],
        *,
        label: str | None = None,
        artifacts: Sequence[tuple[str, bytes]] = (),
        linger: bool = True,
    ) -> None:
        """Decide `events`: fold them in now, append them with the next flush."""
        ...

    async def flush(self) -> None:
        """Make every decided event durable."""
        ...

    def flushing(self) -> asyncio.Future[None]:
        """`flush` as a future (the append itself, when one takes what is pending), for a caller
        that never cancels it (a driver that stops cancels its appends itself)."""
        ...

    async def confirm_lease(self) -> None:
        """Raise `lease_lost` unless the run's lease is held and valid."""
        ...

    def lease_in_doubt(self) -> bool:
        """Whether this engine can no longer vouch for the run's lease (lost, untrusted or refused)."""
        ...


class RunFacts:
    """The facts of one run being driven: calls in flight, the replayed run's facts."""

    def __init__(self, run: RunWriter) -> None:
        self._run = run
        # Two concurrent calls with one key in one run make one transport call and share its fact.
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._replayed: dict[str, FactRecorded] | None = None
        # Answers recorded here whose append has not been seen to land: decided, maybe never durable.
        self._unsure: set[str] = set()

    async def fact(self, attempt: AttemptOf, namespace: str, request: Any, fact_key: str) -> Any:
        """The answer to an I/O call: recorded, replayed, or fetched and recorded first."""
        check_fact_key(fact_key, f"io.call({namespace!r})")
        recorded = self._run.history.facts.get(fact_key)
        if recorded is not None:
            if fact_key in self._unsure:
                # Held but maybe not durable (its append failed): durable first, or fail as it did.
                await self._keep_answer()
                self._unsure.discard(fact_key)
            return json_copy(recorded.response)
        inflight = self._inflight.get(fact_key)
        if inflight is not None:
            # The same call in flight (another branch's, say): its outcome. A cancel here stops
            # this wait only (the call is its caller's), but for the first one while the lease is
            # in doubt: as the call's own caller does, this one waits for the answer to be kept.
            response, cut_off = await self._outlast_lost_lease(
                inflight, _leave, "the same call was in flight"
            )
            if cut_off:
                raise asyncio.CancelledError
            return json_copy(response)
        # Made in the op's own task (cancelling the op cancels the call); a concurrent call with
        # this key waits for its outcome.
        outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[fact_key] = outcome
        try:
            response = await run_telling(outcome, self._fetch_fact(attempt, namespace, request, fact_key))
        finally:
            del self._inflight[fact_key]
        return json_copy(response)

    async def _fetch_fact(self, attempt: AttemptOf, namespace: str, request: Any, fact_key: str) -> Any:
        config = self._run.manifest.run_config
        cut_off = False
        if config.execution_mode == REPLAY:
            source = (await self._replayed_facts()).get(fact_key)
            if source is None:
                raise io_error(
                    "replay_fact_missing",
                    f"replay: run {config.replay_of_run_id} recorded no fact {fact_key!r}",
                )
            response = source.response
        else:
            transport = self._run.env.transports.get(namespace)
            if transport is None:
                raise io_error("unknown_namespace", f"no transport is registered for namespace {namespace!r}")
            await self._run.flush()
            self._run.env.failpoints.hit(PAUSE_BEFORE_TRANSPORT_CALL, attempt.step_id)
            request = copy.deepcopy(request)  # any Python value the op passed (an answer is JSON)
            calling = asyncio.ensure_future(self._call_transport(attempt, namespace, request, fact_key))
            response, cut_off = await self._outlast_lost_lease(calling, _cut, "a call was in flight")
            try:
                check_json(response, "answer", within=1)  # FactRecorded holds it one level down
                size = len(canonical_json_bytes(response))
            except KeelError as error:
                raise _answer_refused(namespace, error) from None
            if size > MAX_FACT_BYTES:
                raise io_error(
                    "transport_response_too_large",
                    f"the {namespace!r} transport answered {size} bytes; the fact limit is {MAX_FACT_BYTES}",
                )
        await self.record_answer(attempt, namespace, fact_key, response)
        if namespace == SPAWN_NAMESPACE:
            self._run.env.failpoints.hit(AFTER_CHILD_SPAWN_RECORDED)
        elif namespace == AWAIT_NAMESPACE:
            self._run.env.failpoints.hit(AFTER_CHILD_AWAIT_RECORDED)
        if cut_off:
            raise asyncio.CancelledError  # the driver was stopped meanwhile: the answer is kept
        return response

    async def _call_transport(self, attempt: AttemptOf, namespace: str, request: Any, fact_key: str) -> Any:
        """Confirm the lease, then enter the transport at once: nothing runs in between."""
        if self._run.lease is not None:
            # Last, right before the call: a side effect only while this engine holds the run.
            await self._run.confirm_lease()
        return await self._run.env.transports.call(
            namespace,
            request,
            fact_key,
            self._run.run_id,
            step_id=attempt.step_id,
            attempt=attempt.attempt,
            fencing=attempt.fencing,
        )

    async def record_answer(self, attempt: AttemptOf, namespace: str, fact_key: str, response: Any) -> None:
        """Decide FactRecorded for `response` now (before any await) and return once it is durable."""
        self._unsure.add(fact_key)
        self._run.record([FactRecorded(attempt.step_id, attempt.attempt, fact_key, namespace, response)])
        await self._keep_answer()  # the fact is durable before the op sees the answer
        self._unsure.discard(fact_key)
        self._run.env.failpoints.hit(AFTER_FACT_RECORDED, attempt.step_id)

    async def _keep_answer(self) -> None:
        """Append the answer just decided, not giving it up to a lost lease or the store being down.

        Only the run stream's compare-and-swap (a conflict: someone else appended) stops it. A cancel
        because the lease was lost waits for the append; any other (a drain, a foreign terminal
        event) waits at most PARK_FLUSH_SECONDS, like the flush of a parked run.
        """
        recording = self._run.flushing()
        _, cut_off = await self._outlast_lost_lease(recording, _give_up_answer, "recording an answer")
        if cut_off:
            raise asyncio.CancelledError

    async def _outlast_lost_lease(
        self, work: asyncio.Future[T], give_up: Callable[[asyncio.Future[T]], Awaitable[None]], doing: str
    ) -> tuple[T, bool]:
        """Wait for `work` through the first cancel that comes while the run's lease is lost or untrusted.

        Such a cancel (the lease could not be recorded or renewed, its trust ran out) is not a
        takeover: the answer of a call already made is worth keeping, and the run stream's
        compare-and-swap decides whether it may still be recorded. Any other cancel (a
        second one, a terminal cancel, a drain) hands `work` to `give_up` and is raised. Answers
        `work`'s result and whether a cancel is owed to the caller.
        """
        cut_off = False
        while not work.done():
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                if cut_off or not self._run.lease_in_doubt():
                    await give_up(work)
                    raise
                cut_off = True
                log.info("run %s: lease lost while %s; finishing that first", self._run.run_id, doing)
        return work.result(), cut_off

    async def replayed_facts(self) -> dict[str, FactRecorded]:
        """The facts of the run a replay replays (by fact key)."""
        return await self._replayed_facts()

    async def _replayed_facts(self) -> dict[str, FactRecorded]:
        if self._replayed is None:
            source = run_stream_id(self._run.manifest.run_config.replay_of_run_id)
            events = await self._run.env.store.read(source, patience=FOREVER)
            self._replayed = dict(fold(decode_event(e.type, e.payload) for e in events).facts)
        return self._replayed


class RunIo:
    """The `io` handle an op gets: calls become facts of its run."""

    def __init__(self, facts: RunFacts, step_id: str, attempt: int, fencing: int) -> None:
        self._facts = facts
        self._attempt_of = AttemptOf(step_id, attempt, fencing)

    async def call(self, namespace: str, request: Any, fact_key: str) -> Any:
        """Call the transport for `namespace`, or return the fact recorded under `fact_key`."""
        return await self._facts.fact(self._attempt_of, namespace, request, fact_key)


async def _give_up_answer(recording: asyncio.Future[None]) -> None:
    """Wait at most PARK_FLUSH_SECONDS more for an answer's append, then stop waiting for it.

    The append is left to run on: it is the run's, and may hold other events too (a branch stopped
    because another failed the run, whose RunCompleted comes after it). A driver that stops
    cancels its appends itself.
    """
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(asyncio.shield(recording), PARK_FLUSH_SECONDS)


async def _leave(inflight: asyncio.Future[Any]) -> None:
    """Stop waiting for a call made by another caller, leaving it to that caller."""


async def _cut(calling: asyncio.Future[Any]) -> None:
    """Cancel a transport call and wait for it to end."""
    calling.cancel()
    with contextlib.suppress(BaseException):
        await calling
