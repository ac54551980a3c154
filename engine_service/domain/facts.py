"""Fact keys: the one rule for which keys may name a recorded fact (an I/O answer, a child run).

A fact key is persisted in the run's stream (FactRecorded, a child's link and run id), so it must
name the call and must not carry a credential. The rule is the same wherever a key arrives; only
the error's category is the caller's: a key inside a run fails the step (FAILED_PRECONDITION,
recorded), a key in an RPC request is the caller's to change (INVALID_ARGUMENT).
"""

from __future__ import annotations

from engine_service.domain.secrets import looks_like_secret
from keel_core.errors import ErrorCategory, KeelError


def check_fact_key(fact_key: str, *, needed_by: str, category: ErrorCategory) -> None:
    """Raise `missing_fact_key` or `secrets_detected` (not retryable) unless `fact_key` may be recorded.

    `needed_by` says what needs the key, for the message ("io.call('x')", "spawning a child run").
    The key itself is never repeated in a message: it must not reach a log or an event.
    """
    if not fact_key:
        raise KeelError(
            "missing_fact_key", f"{needed_by} needs a fact key (a name for it)", category=category
        )
    if looks_like_secret(fact_key):
        raise KeelError(
            "secrets_detected",
            "the fact key looks like it contains a secret; nothing was recorded",
            category=category,
        )
