"""Signals: named JSON payloads sent to a run, kept in its inbox until a wait consumes them.

A run's inbox is its own stream (`signals:<run id>`, engine_service.domain.streams), written by
whoever serves SignalRun, never by the run's driver, so a signal never races the run's one writer.
Each signal is one `SignalSent` event; its `signal_id` makes sending idempotent (a signal id
already in the inbox is not appended again).

A wait consumes one signal: the first one in inbox order with the wanted name that no earlier
wait of the run consumed. Consuming is recorded in the *run* stream as a fact
(`FactRecorded{namespace: "keel.signal", response: {signal_id, name, payload, inbox_seq}}`) under
the wait's fact key, durable before the op sees the payload: a resumed run finds the fact and gets
the same payload, and the signal it names is never consumed again. Everything here is pure.

`keel.wait_signal` parks its attempt on a `signal` wait (`signal_park`): `StepWaiting` records the
name, the fact key and the deadline (`until_us`, the wait's timeout); `signal_wait_outcome` is
what its resolver decides from the run's history and inbox.

    SignalSent  {v, signal_id, name, payload, at_us?}
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engine_service.domain import streams
from engine_service.domain.canonical import canonical_json_bytes
from engine_service.domain.events import (
    EVENT_FORMAT_VERSION,
    ErrorRecord,
    FactRecorded,
    ParkStep,
    SignalAwaited,
)
from engine_service.domain.history import RunHistory, WaitingAttempt
from engine_service.domain.secrets import looks_like_secret
from engine_service.domain.waits import SIGNAL, WaitOutcome
from keel_core.errors import ErrorCategory, KeelError, invalid_argument
from keel_core.json_rules import check_json

# The FactRecorded namespace of a consumed signal.
SIGNAL_NAMESPACE = "keel.signal"
SIGNAL_SENT = streams.SIGNAL_SENT
SIGNAL_WOKEN = streams.SIGNAL_WOKEN

MAX_SIGNAL_NAME_CHARS = 128
MAX_SIGNAL_ID_CHARS = 128
# A payload travels in one inbox event and then in one FactRecorded (1 MiB each at most).
MAX_SIGNAL_PAYLOAD_BYTES = 256 * 1024
# Signals a run's inbox keeps (consumed ones included): past this, SignalRun is refused.
MAX_INBOX_SIGNALS = 10_000
# Signals one StartRun may carry.
MAX_START_SIGNALS = 100
# The longest wait a timeout may ask for: about 10 years.
MAX_WAIT_SECONDS = 315_360_000.0

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@-]*")
_ID = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class Signal:
    """A signal in a run's inbox (`inbox_seq` is its sequence number there)."""

    signal_id: str
    name: str
    payload: Any
    inbox_seq: int = 0
    at_us: int = 0

    def consumed_json(self) -> dict[str, Any]:
        """What the consuming FactRecorded records (and a resumed wait returns the payload of)."""
        return {
            "signal_id": self.signal_id,
            "name": self.name,
            "payload": self.payload,
            "inbox_seq": self.inbox_seq,
        }


def encode_signal(signal: Signal) -> tuple[str, bytes]:
    """The SignalSent event of a signal: type name and payload bytes."""
    data: dict[str, Any] = {
        "v": EVENT_FORMAT_VERSION,
        "signal_id": signal.signal_id,
        "name": signal.name,
        "payload": signal.payload,
    }
    if signal.at_us:
        data["at_us"] = signal.at_us
    return SIGNAL_SENT, canonical_json_bytes(data)


def decode_signal(seq: int, type_name: str, data: Mapping[str, Any]) -> Signal | None:
    """The signal of an inbox event (None: not a SignalSent, or one that does not decode)."""
    if type_name != SIGNAL_SENT:
        return None
    signal_id, name = data.get("signal_id"), data.get("name")
    if not isinstance(signal_id, str) or not isinstance(name, str):
        return None
    at_us = data.get("at_us", 0)
    return Signal(signal_id, name, data.get("payload"), seq, at_us if isinstance(at_us, int) else 0)


def check_signal_name(name: str, field: str = "name") -> str:
    """`name` when it may name a signal; INVALID_ARGUMENT `invalid_signal` otherwise."""
    if not name or len(name) > MAX_SIGNAL_NAME_CHARS or not _NAME.fullmatch(name):
        raise invalid_argument(
            "invalid_signal",
            f"{field} must be 1 to {MAX_SIGNAL_NAME_CHARS} characters of [A-Za-z0-9_.:/@-] starting "
            "with a letter or digit",
            field=field,
        )
    return name


def check_signal_id(signal_id: str, field: str = "signal_id") -> str:
    """`signal_id` when it may be recorded; INVALID_ARGUMENT `invalid_signal` otherwise (never echoed)."""
    if len(signal_id) > MAX_SIGNAL_ID_CHARS or not _ID.fullmatch(signal_id):
        raise invalid_argument(
            "invalid_signal",
            f"{field} must be 1 to {MAX_SIGNAL_ID_CHARS} printable ASCII characters without spaces",
            field=field,
        )
    if looks_like_secret(signal_id):
        raise invalid_argument(
            "secrets_detected",
            f"{field} looks like it contains a secret (a password, token or API key); nothing was recorded",
            field=field,
        )
    return signal_id


def check_signal_payload(payload: Any, field: str = "payload") -> Any:
    """`payload` when it is JSON of at most MAX_SIGNAL_PAYLOAD_BYTES; INVALID_ARGUMENT otherwise."""
    # Consumed, it is recorded two levels down: FactRecorded{response: {payload}} (SignalSent: one).
    check_json(payload, field, within=2)
    size = len(canonical_json_bytes(payload))
    if size > MAX_SIGNAL_PAYLOAD_BYTES:
        raise invalid_argument(
            "signal_too_large",
            f"{field} is {size} bytes of JSON; the limit is {MAX_SIGNAL_PAYLOAD_BYTES}",
            field=field,
            size=size,
            limit=MAX_SIGNAL_PAYLOAD_BYTES,
        )
    return payload


def check_wait_timeout(timeout: Any, field: str) -> float | None:
    """A wait's timeout in seconds (None: wait for ever); `op_config_invalid` when it is not one."""
    if timeout is None:
        return None
    number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if not number or not 0 < timeout <= MAX_WAIT_SECONDS:
        raise KeelError(
            "op_config_invalid",
            f"{field} must be a number of seconds above 0 and at most {MAX_WAIT_SECONDS:.0f}",
            category=ErrorCategory.FAILED_PRECONDITION,
        )
    return float(timeout)


def start_signal_id(index: int, name: str, payload: Any) -> str:
    """The id of StartRun's signal `index` when the client gave none: from its place and content,
    so that a retried start delivers it once (starting is idempotent by run id)."""
    digest = hashlib.sha256(canonical_json_bytes([name, payload])).hexdigest()[:32]
    return f"start-{index}-{digest}"


def inbox_full(run_id: str, count: int) -> KeelError:
    """RESOURCE_EXHAUSTED `signal_inbox_full`: the run's inbox holds MAX_INBOX_SIGNALS signals."""
    return KeelError(
        "signal_inbox_full",
        f"run {run_id} has received {count} signals; the limit is {MAX_INBOX_SIGNALS}",
        category=ErrorCategory.RESOURCE_EXHAUSTED,
        details={"run_id": run_id, "limit": MAX_INBOX_SIGNALS},
    )


def consumed_signal_ids(facts: Iterable[FactRecorded]) -> frozenset[str]:
    """The signal ids the run's waits consumed (their facts)."""
    out: set[str] = set()
    for fact in facts:
        if fact.namespace == SIGNAL_NAMESPACE and isinstance(fact.response, dict):
            signal_id = fact.response.get("signal_id")
            if isinstance(signal_id, str):
                out.add(signal_id)
    return frozenset(out)


def next_signal(inbox: Iterable[Signal], consumed: frozenset[str], name: str) -> Signal | None:
    """The signal a wait for `name` consumes now: the first one in inbox order nobody consumed."""
    for signal in inbox:
        if signal.name == name and signal.signal_id not in consumed:
            return signal
    return None


def payload_of(fact: FactRecorded) -> Any:
    """The payload a consumed signal's fact holds."""
    response = fact.response
    return response.get("payload") if isinstance(response, dict) else None


def wait_deadline_us(history: RunHistory, wait: SignalAwaited) -> int:
    """When the wait `wait` (not recorded yet, deadline from now) times out.

    A wait recorded under the same fact key by an attempt that never failed (its engine died
    inside it) keeps its deadline: a rerun after a crash waits only what is left. After a failed
    attempt (a timeout that is retried, say) the wait starts over.
    """
    earlier = history.signal_waits.get(wait.fact_key)
    if earlier is None or earlier.name != wait.name:
        return wait.deadline_us
    failure = history.last_failure.get(earlier.step_id)
    if failure is not None and failure.attempt >= earlier.attempt:
        return wait.deadline_us
    return earlier.deadline_us


def signal_park(
    history: RunHistory,
    step_id: str,
    attempt: int,
    name: str,
    fact_key: str,
    seconds: float | None,
    timeout_error: ErrorRecord,
    now_us: int,
) -> ParkStep:
    """The `signal` wait of `keel.wait_signal`: until its deadline (none: 0), failing with
    `timeout_error` then. An older wait of this fact key that its engine died inside (a
    `SignalAwaited` of a stream written before waits parked) keeps its deadline."""
    deadline = now_us + int(seconds * 1_000_000) if seconds is not None else 0
    wait = SignalAwaited(step_id, attempt, fact_key, name, deadline, at_us=now_us)
    deadline = wait_deadline_us(history, wait)
    detail: dict[str, Any] = {"name": name, "fact_key": fact_key}
    if seconds is not None:
        detail["timeout_seconds"] = seconds
    return ParkStep(SIGNAL, until_us=deadline, error=timeout_error if deadline else None, detail=detail)


def signal_wait_outcome(
    history: RunHistory, inbox: Iterable[Signal], waiting: WaitingAttempt
) -> WaitOutcome | None:
    """How a `signal` wait ends now: the payload of the signal consumed under its fact key (its fact
    first, when this consumes it), or None while no signal for it is in the inbox.

    The caller records the outcome's fact with no await after this: the consumed set is read from
    `history` here, so two waits of one run never take the same signal.
    """
    name = str(waiting.wait.detail.get("name", ""))
    fact_key = str(waiting.wait.detail.get("fact_key", ""))
    recorded = history.facts.get(fact_key)
    if recorded is not None and recorded.namespace != SIGNAL_NAMESPACE:
        message = f"wait_signal: fact key {fact_key!r} holds the answer of a {recorded.namespace!r} call"
        category = ErrorCategory.FAILED_PRECONDITION.value
        return WaitOutcome(error=ErrorRecord("fact_key_conflict", category, False, message))
    if recorded is not None:
        return WaitOutcome(output=payload_of(recorded))
    signal = next_signal(inbox, consumed_signal_ids(history.facts.values()), name)
    if signal is None:
        return None
    fact = FactRecorded(waiting.step_id, waiting.attempt, fact_key, SIGNAL_NAMESPACE, signal.consumed_json())
    return WaitOutcome(output=signal.payload, facts=(fact,))
