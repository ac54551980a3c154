"""What an engine's run drivers share: its event log, ops, transports and failpoints."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from engine_service.domain.history import WaitingAttempt
from engine_service.domain.ops import OpRegistry
from engine_service.domain.transports import TransportRegistry
from engine_service.domain.waits import WaitOutcome
from engine_service.failpoints import Failpoints
from engine_service.runtime.signals import SignalInbox, SignalWakeups
from engine_service.runtime.task_board import TaskBoard
from engine_service.store.port import EventLog

# How long a parked driver (a drain, a cancel) keeps trying to make what it decided durable.
PARK_FLUSH_SECONDS = 1.0

# Ends a waiting attempt early when it can (a signal arrived, a remote task finished): given the run
# id and the attempt, its outcome, or None while it still waits. Registered per wait kind.
WaitResolver = Callable[[str, WaitingAttempt], Awaitable[WaitOutcome | None]]


@dataclass
class RunEnvironment:
    """What drivers share: the store, ops, transports and failpoints of one engine."""

    store: EventLog
    ops: OpRegistry
    transports: TransportRegistry
    failpoints: Failpoints
    # Runs' inboxes and this engine's one wake-up subscription (set by the Engine when left out).
    signals: Signals | None = field(default=None)
    # Remote step attempts (tasks in the store); made on first use unless the engine gives its own.
    task_board: TaskBoard | None = None
    # wait kind -> what may end such a wait before its due time (engine_service.runtime.parking)
    wait_resolvers: dict[str, WaitResolver] = field(default_factory=dict)

    @property
    def tasks(self) -> TaskBoard:
        """The engine's task board."""
        if self.task_board is None:
            self.task_board = TaskBoard(self.store)
        return self.task_board


@dataclass
class Signals:
    """Signals as an engine's drivers use them: the inboxes, and the wake-ups of waits."""

    inbox: SignalInbox
    wakeups: SignalWakeups
