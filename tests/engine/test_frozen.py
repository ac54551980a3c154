"""The hot path's frozen-dataclass builders make what `__init__` and `replace` make."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, cast

import pytest

from engine_service.domain.events import (
    ErrorRecord,
    KernelEvent,
    ParkStep,
    RunCompleted,
    RunParked,
    RunResumed,
    RunStarted,
    SignalAwaited,
    StepAttemptFailed,
    StepAttemptStarted,
    StepCompleted,
    StepWaiting,
    stamped,
)
from engine_service.domain.frozen import build, with_changes
from engine_service.domain.history import RunHistory, fold

ERROR = ErrorRecord("boom", "transient", True, "it failed", {"k": 1})
STAMPABLE: list[Any] = [  # the stampable kinds of KernelEvent
    RunStarted("op", "sha256:m", "sha256:s", labels={"team": "a"}, trace_context={"traceparent": "x"}),
    StepAttemptStarted("a", 0, "sha256:s"),
    StepAttemptFailed("a", 0, ERROR, worker_id="w"),
    StepCompleted("a", 1, "sha256:t", worker_id="w"),
    RunCompleted("completed", "sha256:t", has_ledger=True),
    StepWaiting("a", 1, ParkStep("timer", until_us=5)),
    RunParked(7),
    RunResumed(),
    SignalAwaited("a", 1, "k", "approve", deadline_us=9),
]


def test_every_stampable_event_kind_is_covered() -> None:
    stampable = {
        kind for kind in typing.get_args(KernelEvent) if "at_us" in {f.name for f in dataclasses.fields(kind)}
    }
    assert stampable == {type(event) for event in STAMPABLE}


@pytest.mark.parametrize("event", STAMPABLE, ids=lambda e: type(e).__name__)
def test_stamping_is_replace(event: Any) -> None:
    stamp = cast(Any, stamped(event, 1234))
    assert stamp == dataclasses.replace(event, at_us=1234)
    assert type(stamp) is type(event) and vars(stamp) == vars(dataclasses.replace(event, at_us=1234))
    assert event.at_us == 0  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        stamp.at_us = 5
    assert stamped(stamp, 99) is stamp  # a stamped event keeps its time


def test_a_built_history_is_the_constructors() -> None:
    events = [*STAMPABLE[:4], STAMPABLE[4]]
    history = fold(events)
    again = RunHistory(**{f.name: getattr(history, f.name) for f in dataclasses.fields(RunHistory)})
    assert history == again and vars(history) == vars(again)
    with pytest.raises(dataclasses.FrozenInstanceError):
        history.head_seq = 1  # type: ignore[misc]


def test_build_and_with_changes_match_init_and_replace() -> None:
    built = build(
        StepCompleted, step_id="a", attempt=2, snapshot_id="s", at_us=3, worker_id="", reused_from_run_id=""
    )
    assert built == StepCompleted("a", 2, "s", at_us=3) and vars(built) == vars(
        StepCompleted("a", 2, "s", at_us=3)
    )
    changed = with_changes(built, attempt=5)
    assert changed == dataclasses.replace(built, attempt=5) and built.attempt == 2
