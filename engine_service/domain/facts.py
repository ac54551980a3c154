"""What a fact key may be: the one rule for I/O calls (`ctx.io.call`) and child spawns alike.

A fact key names a recorded answer within its run and is itself recorded (in FactRecorded, a
child's link and RunStarted), so a key is refused before anything is written when it is empty,
longer than MAX_FACT_KEY_CHARS, or looks like it carries a credential. The key is never repeated
in the refusal's message: a secret must not reach logs either.
"""

from __future__ import annotations

from engine_service.domain.secrets import looks_like_secret
from keel_core.errors import invalid_argument

# A name, not a payload: long enough for `fetch:<url>` or a composite id, short enough that
# events and log lines carrying it stay small.
MAX_FACT_KEY_CHARS = 512


def check_fact_key(fact_key: str, what: str) -> None:
    """Raise INVALID_ARGUMENT unless `fact_key` may be recorded; `what` names the call in messages."""
    if not fact_key:
        raise invalid_argument("missing_fact_key", f"{what} needs a fact key (a name for it)")
    if len(fact_key) > MAX_FACT_KEY_CHARS:
        raise invalid_argument(
            "fact_key_too_long",
            f"{what}: the fact key is {len(fact_key)} characters; the limit is {MAX_FACT_KEY_CHARS} "
            "(a fact key names the call; put data in the request)",
            length=len(fact_key),
            limit=MAX_FACT_KEY_CHARS,
        )
    if looks_like_secret(fact_key):
        raise invalid_argument(
            "secrets_detected",
            f"{what}: the fact key looks like it contains a secret (a password, token or API key); "
            "nothing was recorded",
        )
