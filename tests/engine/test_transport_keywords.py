"""Transports get the deduplication keywords they accept, and four-argument ones keep working."""

from __future__ import annotations

from typing import Any

from engine_service.domain.transports import TransportRegistry, accepted_keywords


class FourArguments:
    """Written for the original signature."""

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        return {"got": [namespace, request, fact_key, run_id]}


class Named:
    """Names only the fencing value."""

    async def call(
        self, namespace: str, request: Any, fact_key: str, run_id: str, *, fencing: int = 0
    ) -> Any:
        return {"fencing": fencing}


class Everything:
    """Takes whatever keywords come."""

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str, **dedup: Any) -> Any:
        return dedup


async def test_each_transport_gets_the_keywords_it_accepts() -> None:
    registry = TransportRegistry()
    registry.register("old", FourArguments())
    registry.register("named", Named())
    registry.register("all", Everything())
    got = await registry.call("old", {"a": 1}, "k", "r", step_id="s", attempt=2, fencing=7)
    assert got == {"got": ["old", {"a": 1}, "k", "r"]}
    assert await registry.call("named", {}, "k", "r", step_id="s", attempt=2, fencing=7) == {"fencing": 7}
    got = await registry.call("all", {}, "k", "r", step_id="s", attempt=2, fencing=7)
    assert got == {"step_id": "s", "attempt": 2, "fencing": 7}


def test_accepted_keywords_are_looked_up_from_the_signature() -> None:
    assert accepted_keywords(FourArguments()) == frozenset()
    assert accepted_keywords(Named()) == {"fencing"}
    assert accepted_keywords(Everything()) == {"step_id", "attempt", "fencing"}


async def test_a_merged_registry_keeps_what_each_transport_accepts() -> None:
    first, second = TransportRegistry(), TransportRegistry()
    first.register("old", FourArguments())
    second.register("all", Everything())
    merged = first.merged(second)
    assert await merged.call("all", {}, "k", "r", step_id="s", attempt=0, fencing=3) == {
        "step_id": "s",
        "attempt": 0,
        "fencing": 3,
    }
    assert await merged.call("old", {}, "k", "r", step_id="s", attempt=0, fencing=3) == {
        "got": ["old", {}, "k", "r"]
    }
