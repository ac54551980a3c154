"""How a run executes: execution mode, retry policy, and the backoff between attempts."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from keel_core.errors import invalid_argument

LIVE = "live"
REPLAY = "replay"
EXECUTION_MODES = (LIVE, REPLAY)

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_INITIAL_BACKOFF_MS = 100
DEFAULT_MAX_BACKOFF_MS = 10_000
DEFAULT_MULTIPLIER = 2.0
MAX_ATTEMPTS_LIMIT = 1000


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per step (the first included) and the exponential backoff between them."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial_backoff_ms: int = DEFAULT_INITIAL_BACKOFF_MS
    max_backoff_ms: int = DEFAULT_MAX_BACKOFF_MS
    multiplier: float = DEFAULT_MULTIPLIER

    def backoff_ms(self, attempt: int) -> int:
        """The delay before running `attempt` (0 for the first attempt, growing per retry, capped)."""
        if attempt <= 0:
            return 0
        try:
            delay = self.initial_backoff_ms * (self.multiplier ** (attempt - 1))
        except OverflowError:  # far past the cap: a large multiplier or attempt number
            return self.max_backoff_ms
        return int(min(delay, self.max_backoff_ms))

    def to_json(self) -> dict[str, Any]:
        """The policy as manifest JSON."""
        return {
            "max_attempts": self.max_attempts,
            "initial_backoff_ms": self.initial_backoff_ms,
            "max_backoff_ms": self.max_backoff_ms,
            "multiplier": self.multiplier,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> RetryPolicy:
        """A policy read back from manifest JSON."""
        return RetryPolicy(
            max_attempts=int(data["max_attempts"]),
            initial_backoff_ms=int(data["initial_backoff_ms"]),
            max_backoff_ms=int(data["max_backoff_ms"]),
            multiplier=float(data["multiplier"]),
        )


@dataclass(frozen=True)
class RunConfig:
    """A run's execution settings; part of its manifest."""

    execution_mode: str = LIVE
    retry_policy: RetryPolicy = RetryPolicy()
    replay_of_run_id: str = ""
    # The run's deadline from its start, in ms (0: none); left out of the manifest JSON when 0,
    # so that manifests written before it existed keep their ids.
    execution_timeout_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        """The config as manifest JSON."""
        out: dict[str, Any] = {
            "execution_mode": self.execution_mode,
            "retry_policy": self.retry_policy.to_json(),
        }
        if self.replay_of_run_id:
            out["replay_of_run_id"] = self.replay_of_run_id
        if self.execution_timeout_ms:
            out["execution_timeout_ms"] = self.execution_timeout_ms
        return out

    @staticmethod
    def from_json(data: dict[str, Any]) -> RunConfig:
        """A config read back from manifest JSON."""
        return RunConfig(
            execution_mode=str(data["execution_mode"]),
            retry_policy=RetryPolicy.from_json(data["retry_policy"]),
            replay_of_run_id=str(data.get("replay_of_run_id", "")),
            execution_timeout_ms=int(data.get("execution_timeout_ms", 0)),
        )


def make_run_config(
    *,
    execution_mode: str = LIVE,
    max_attempts: int = 0,
    initial_backoff_ms: int | None = None,
    max_backoff_ms: int | None = None,
    multiplier: float = 0.0,
    replay_of_run_id: str = "",
    execution_timeout_ms: int = 0,
) -> RunConfig:
    """A validated RunConfig with defaults for unset (zero) fields; bad values are `invalid_argument`."""
    if execution_mode not in EXECUTION_MODES:
        raise invalid_argument(
            "invalid_argument", f"execution_mode {execution_mode!r} is not one of {EXECUTION_MODES}"
        )
    if max_attempts < 0 or max_attempts > MAX_ATTEMPTS_LIMIT:
        raise invalid_argument(
            "invalid_argument", f"retry_policy.max_attempts must be 0..{MAX_ATTEMPTS_LIMIT}"
        )
    initial = DEFAULT_INITIAL_BACKOFF_MS if initial_backoff_ms is None else initial_backoff_ms
    maximum = DEFAULT_MAX_BACKOFF_MS if max_backoff_ms is None else max_backoff_ms
    if initial < 0 or maximum < 0:
        raise invalid_argument("invalid_argument", "retry_policy backoffs must not be negative")
    if maximum < initial:
        raise invalid_argument("invalid_argument", "retry_policy.max_backoff must be >= initial_backoff")
    if not math.isfinite(multiplier) or (multiplier != 0.0 and multiplier < 1.0):
        raise invalid_argument(
            "invalid_argument", "retry_policy.multiplier must be >= 1 (0 means the default of 2)"
        )
    if execution_timeout_ms < 0:
        raise invalid_argument("invalid_argument", "run_config.execution_timeout must not be negative")
    if execution_mode == REPLAY:
        if not replay_of_run_id:
            raise invalid_argument(
                "invalid_argument", "execution mode replay needs run_config.replay_of_run_id"
            )
        parse_run_id(replay_of_run_id, field="run_config.replay_of_run_id")
    elif replay_of_run_id:
        raise invalid_argument(
            "invalid_argument", "replay_of_run_id is only valid with execution mode replay"
        )
    policy = RetryPolicy(
        max_attempts=max_attempts or DEFAULT_MAX_ATTEMPTS,
        initial_backoff_ms=initial,
        max_backoff_ms=maximum,
        multiplier=multiplier or DEFAULT_MULTIPLIER,
    )
    return RunConfig(
        execution_mode=execution_mode,
        retry_policy=policy,
        replay_of_run_id=replay_of_run_id,
        execution_timeout_ms=execution_timeout_ms,
    )


def parse_run_id(text: str, *, field: str = "run_id") -> str:
    """`text` as a canonical lowercase UUID string, or `invalid_run_id`."""
    try:
        parsed = uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        raise invalid_argument("invalid_run_id", f"{field} {text!r} is not a UUID") from None
    if str(parsed) != text.lower() or len(text) != 36:
        raise invalid_argument("invalid_run_id", f"{field} {text!r} must be a UUID in its 36-character form")
    return str(parsed)
