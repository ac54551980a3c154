"""A transport call in flight when the run's driver is stopped (engine_service.runtime.run_io).

A stop because this engine can no longer vouch for the run's lease (lost, or its trust ran out) is
not a takeover: the call goes on and its answer is recorded, so the run never calls it again. Any
other stop (an operator's cancel, a drain) while the lease holds cuts the call. Driven through
RunFacts with a stand-in for the driver, to stop it at the exact moment that matters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest

import engine_service.builtin_ops  # noqa: F401  (registers keel.echo)
from engine_service.domain import (
    BuildProvenance,
    FactRecorded,
    KernelEvent,
    RunHistory,
    RunManifest,
    make_run_config,
    resolve_plan,
    single_op_pipeline,
)
from engine_service.domain.ops import DEFAULT_REGISTRY, OpRegistry
from engine_service.domain.transports import TransportRegistry
from engine_service.failpoints import Failpoints
from engine_service.runtime.driver import RunDriver
from engine_service.runtime.environment import RunEnvironment
from engine_service.runtime.heartbeat import Heartbeat
from engine_service.runtime.leases import Lease
from engine_service.runtime.run_io import AttemptOf, RunFacts
from engine_service.store.memory import InMemoryEventLog
from keel_core.errors import KeelError


class HeldCall:
    """A transport whose call stays in flight until the test releases it."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0
        self.answered = 0

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        self.calls += 1
        self.entered.set()
        await self.release.wait()
        self.answered += 1
        return {"echo": request}


class Driver:
    """What RunFacts needs of a run's driver: records decided events, flushes at once."""

    def __init__(self, transport: HeldCall) -> None:
        transports = TransportRegistry()
        transports.register("held", transport)
        self.run_id = "run-1"
        self.env = RunEnvironment(InMemoryEventLog(), OpRegistry(), transports, Failpoints())
        self.manifest = cast(RunManifest, SimpleNamespace(run_config=SimpleNamespace(execution_mode="")))
        self.lease: Lease | None = Lease(self.run_id, 10.0, cast(Heartbeat, None))
        self.history = RunHistory()
        self.recorded: list[KernelEvent] = []
        self.refused = False  # another branch's confirm was refused: the driver is stopping

    def record(
        self,
        events: Sequence[KernelEvent],
        *,
        label: str | None = None,
        artifacts: Sequence[tuple[str, bytes]] = (),
        linger: bool = True,
    ) -> None:
        self.recorded.extend(events)

    async def flush(self) -> None:
        return None

    def flushing(self) -> asyncio.Future[None]:
        flushed = asyncio.get_running_loop().create_future()
        flushed.set_result(None)
        return flushed

    async def confirm_lease(self) -> None:
        assert self.lease is not None and self.lease.is_valid()

    def lease_in_doubt(self) -> bool:
        return self.lease is not None and (self.refused or not self.lease.is_valid())


async def call_in_flight() -> tuple[HeldCall, Driver, asyncio.Task[Any]]:
    transport = HeldCall()
    driver = Driver(transport)
    facts = RunFacts(driver)
    op = asyncio.ensure_future(facts.fact(AttemptOf("step", 0, 3), "held", {"n": 1}, "the-call"))
    await transport.entered.wait()
    return transport, driver, op


def untrusted(lease: Lease | None) -> None:
    """Make an implicit lease's trust run out (as a pause or a slow store would), without losing it."""
    assert lease is not None
    lease._born -= 60.0
    assert not lease.is_valid() and not lease.lost


def lost(driver: Driver) -> None:
    """The lease was lost (handed over, or its record refused)."""
    assert driver.lease is not None
    driver.lease.lost = True


def refused_though_trusted(driver: Driver) -> None:
    """A branch's confirm was refused (the trust had run out), then the lease's record landed and it
    is trusted again: the stop that follows is still this engine letting go of the run, not a
    takeover, so a call made meanwhile must be recorded rather than dropped (and made again later)."""
    driver.refused = True
    assert driver.lease is not None and driver.lease.is_valid()


@pytest.mark.parametrize(
    "doubt",
    [lambda driver: untrusted(driver.lease), lost, refused_though_trusted],
    ids=["trust-ran-out", "lease-lost", "refused-though-trusted-again"],
)
async def test_a_call_in_flight_when_the_lease_is_in_doubt_answers_and_is_recorded(
    doubt: Callable[[Driver], None],
) -> None:
    transport, driver, op = await call_in_flight()
    doubt(driver)
    op.cancel()  # the driver is stopped: this engine may no longer vouch for the run
    await asyncio.sleep(0)
    transport.release.set()
    with pytest.raises(asyncio.CancelledError):
        await op
    assert (transport.calls, transport.answered) == (1, 1)
    assert driver.recorded == [FactRecorded("step", 0, "the-call", "held", {"echo": {"n": 1}})]


async def test_a_driver_refused_once_starts_no_call_though_its_lease_is_trusted_again() -> None:
    lease = Lease("run-1", 10.0, cast(Heartbeat, None))
    env = RunEnvironment(InMemoryEventLog(), OpRegistry(), TransportRegistry(), Failpoints())
    manifest = RunManifest(
        single_op_pipeline("keel.echo", "1", None),
        None,
        {},
        make_run_config(),
        BuildProvenance("t", "3", "x"),
    )
    plan = resolve_plan(manifest.pipeline, DEFAULT_REGISTRY)
    driver = RunDriver(env, "run-1", manifest, plan, RunHistory(), lease=lease)
    untrusted(lease)
    with pytest.raises(KeelError) as refused:
        await driver.confirm_lease()
    assert refused.value.code == "lease_lost"
    lease._born = time.monotonic()  # trusted again (its record landed late, say)
    assert lease.is_valid()
    with pytest.raises(KeelError) as again:
        await driver.confirm_lease()
    assert again.value.code == "lease_lost"
    assert driver.lease_in_doubt()


async def test_a_cancel_while_the_lease_holds_cuts_the_call_and_records_nothing() -> None:
    transport, driver, op = await call_in_flight()
    op.cancel()  # an operator's cancel, a drain: the lease is fine
    with pytest.raises(asyncio.CancelledError):
        await op
    transport.release.set()
    await asyncio.sleep(0)
    assert (transport.calls, transport.answered) == (1, 0)
    assert driver.recorded == []


async def test_a_second_cancel_cuts_a_call_kept_through_the_first() -> None:
    transport, driver, op = await call_in_flight()
    untrusted(driver.lease)
    op.cancel()
    await asyncio.sleep(0)
    op.cancel()  # then a drain gives up on it
    with pytest.raises(asyncio.CancelledError):
        await op
    transport.release.set()
    await asyncio.sleep(0)
    assert (transport.calls, transport.answered) == (1, 0)
    assert driver.recorded == []


async def two_callers_of_one_key() -> tuple[HeldCall, Driver, asyncio.Task[Any], asyncio.Task[Any]]:
    """One call in flight and a second caller of its key waiting for it."""
    transport = HeldCall()
    driver = Driver(transport)
    facts = RunFacts(driver)
    first = asyncio.ensure_future(facts.fact(AttemptOf("step", 0, 3), "held", {"n": 1}, "the-call"))
    await transport.entered.wait()
    second = asyncio.ensure_future(facts.fact(AttemptOf("step", 0, 3), "held", {"n": 1}, "the-call"))
    await asyncio.sleep(0)  # the second caller finds the call in flight and waits for it
    return transport, driver, first, second


@pytest.mark.parametrize("lease_in_doubt", [True, False], ids=["lease-in-doubt", "lease-holds"])
async def test_a_second_caller_of_a_key_in_flight_stopped_leaves_the_call_to_the_first(
    lease_in_doubt: bool,
) -> None:
    # The call belongs to its first caller. A second caller of the key that is stopped while the
    # lease holds stops waiting at once; while the lease is in doubt it waits, as the first caller
    # would, until the answer is kept. Either way the first caller gets the answer, recorded once.
    transport, driver, first, second = await two_callers_of_one_key()
    if lease_in_doubt:
        untrusted(driver.lease)
    second.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    assert second.done() is not lease_in_doubt
    transport.release.set()
    assert await first == {"echo": {"n": 1}}
    with pytest.raises(asyncio.CancelledError):
        await second
    assert (transport.calls, transport.answered) == (1, 1)
    assert driver.recorded == [FactRecorded("step", 0, "the-call", "held", {"echo": {"n": 1}})]
