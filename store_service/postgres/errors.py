"""What asyncpg's exceptions mean to the store: the one place driver errors become Keel errors.

A lost, refused or shutting-down connection is an outage of a dependency, not a bad request: it
becomes a retryable UNAVAILABLE `store_unavailable`. Unique-key and deadlock failures of an append
are a race lost to another replica, which the backend retries itself. Anything else is a bug and
is left as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncpg

from keel_core.errors import KeelError, unavailable

# "PostgreSQL cannot be reached or cannot serve right now", not "this request is wrong": lost or
# refused connections, a server shutting down or starting up, exhausted resources, and rolled-back
# transactions (serialization, deadlock) that a retry resolves.
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    # asyncpg's protocol can end up confused when the server terminates a session just as a query
    # starts (MagicStack/asyncpg#784): a lost connection in disguise.
    asyncpg.InternalClientError,
)

# A connection that died under a query (terminated, server shut down): a fresh one may work.
CONNECTION_DIED: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    ConnectionResetError,
)

# How an append group that raced another replica's writes on the same streams fails: a primary
# key catches it. Groups lock stream rows in stream order, so a deadlock should not happen; if a
# writer outside the store causes one, it is a lost race all the same.
LOST_RACE: tuple[type[BaseException], ...] = (
    asyncpg.UniqueViolationError,
    asyncpg.exceptions.DeadlockDetectedError,
)


def is_lost_connection(error: BaseException) -> bool:
    """Whether `error` says the connection it happened on is dead (so another one may work)."""
    if isinstance(error, asyncpg.InterfaceError):
        # Other interface errors are misuse ("another operation is in progress"), not outages.
        return "closed" in str(error)
    return isinstance(error, CONNECTION_DIED)


def translate_error(error: BaseException) -> BaseException:
    """The error callers should see for a driver error: `store_unavailable` if it is an outage."""
    if isinstance(error, KeelError):
        return error
    if is_lost_connection(error) or isinstance(error, _UNAVAILABLE_ERRORS):
        what = f"{type(error).__name__}: {error}".strip()
        return unavailable(
            "store_unavailable",
            f"the store's PostgreSQL database cannot be reached or cannot serve now ({what}); retry shortly",
        )
    return error


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Re-raise driver errors from the block as `translate_error` says."""
    try:
        yield
    except Exception as error:
        translated = translate_error(error)
        if translated is error:
            raise
        raise translated from error


__all__ = ["CONNECTION_DIED", "LOST_RACE", "database_errors", "is_lost_connection", "translate_error"]
