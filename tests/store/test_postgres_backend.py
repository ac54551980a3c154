"""The StoreBackend suite bound, unchanged, to PostgreSQL: one fresh schema per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from store_service.backend import StoreBackend
from store_service.postgres import PostgresStoreBackend
from tests.store.backend_suite import StoreBackendSuite
from tests.store.postgres_schemas import fresh_schema, postgres_artifact_rows

pytestmark = pytest.mark.postgres


@pytest.fixture(autouse=True)
def _postgres_reachable(postgres_dsn: str) -> str:
    """Resolve the DSN fixture up front: its probe cannot run inside the test's event loop."""
    return postgres_dsn


@pytest.fixture(autouse=True)
async def pg_schema(postgres_dsn: str) -> AsyncIterator[str]:
    """A schema of this test's own, dropped after it (autouse: the suite asks for it by name from
    inside its async `backend` fixture, where an async fixture can no longer be set up)."""
    async with fresh_schema(postgres_dsn) as schema:
        yield schema


class PostgresTables:
    """Counts rows in the test's schema, on a connection of the test's own."""

    async def count_artifact_rows(self, request: pytest.FixtureRequest) -> tuple[int, int]:
        """(artifact rows, artifact chunk rows) in this test's schema."""
        dsn: str = request.getfixturevalue("postgres_dsn")
        schema: str = request.getfixturevalue("pg_schema")
        return await postgres_artifact_rows(dsn, schema)


class TestPostgresBackend(PostgresTables, StoreBackendSuite):
    """Every contract test on PostgreSQL with full durability (synchronous_commit=on)."""

    def create_backend(self, request: pytest.FixtureRequest) -> StoreBackend:
        """A backend on this test's schema; a second call reaches the same schema."""
        dsn: str = request.getfixturevalue("postgres_dsn")
        schema: str = request.getfixturevalue("pg_schema")
        return PostgresStoreBackend(dsn, schema=schema, durability="full")


class TestPostgresNormalDurability(PostgresTables, StoreBackendSuite):
    """The same contract with synchronous_commit=off and one writer: semantics must not change."""

    def create_backend(self, request: pytest.FixtureRequest) -> StoreBackend:
        """A backend on this test's schema with durability 'normal' and a single writer."""
        dsn: str = request.getfixturevalue("postgres_dsn")
        schema: str = request.getfixturevalue("pg_schema")
        return PostgresStoreBackend(dsn, schema=schema, durability="normal", writers=1)
