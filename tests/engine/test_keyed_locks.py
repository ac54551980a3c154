"""KeyedLocks: one holder per key at a time, keys independent, nothing kept once nobody holds or waits."""

from __future__ import annotations

import asyncio

import pytest

from engine_service.runtime.registry import KeyedLocks


async def test_a_key_is_held_by_one_block_at_a_time_in_arrival_order_and_others_keys_are_free() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    release_first = asyncio.Event()

    async def block(name: str, key: str, until: asyncio.Event | None = None) -> None:
        async with locks.hold(key):
            order.append(f"{name} in")
            if until is not None:
                await until.wait()
            order.append(f"{name} out")

    first = asyncio.create_task(block("first", "a", release_first))
    await asyncio.sleep(0)
    second, third = asyncio.create_task(block("second", "a")), asyncio.create_task(block("third", "a"))
    await block("other key", "b")  # not held up by the holder of "a"
    assert order == ["first in", "other key in", "other key out"]
    release_first.set()
    await asyncio.gather(first, second, third)
    assert order[3:] == ["first out", "second in", "second out", "third in", "third out"]
    assert locks._locks == {}


async def test_a_block_cancelled_while_waiting_leaves_the_lock_to_the_others_and_nothing_behind() -> None:
    locks = KeyedLocks()
    release = asyncio.Event()
    entered: list[str] = []

    async def block(name: str, until: asyncio.Event | None = None) -> None:
        async with locks.hold("a"):
            entered.append(name)
            if until is not None:
                await until.wait()

    holder = asyncio.create_task(block("holder", release))
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(block("cancelled"))
    waiter = asyncio.create_task(block("waiter"))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    release.set()
    await asyncio.gather(holder, waiter)
    assert entered == ["holder", "waiter"]
    assert locks._locks == {}


async def test_a_block_that_raises_releases_the_key() -> None:
    locks = KeyedLocks()
    with pytest.raises(RuntimeError):
        async with locks.hold("a"):
            raise RuntimeError("the block failed")
    assert locks._locks == {}
    async with locks.hold("a"):  # free again
        pass
