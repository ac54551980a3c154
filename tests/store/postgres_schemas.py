"""Throw-away PostgreSQL schemas, so each test has its own tables and parallel runs never collide."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg


@asynccontextmanager
async def fresh_schema(dsn: str, random_bytes: int = 6) -> AsyncIterator[str]:
    """The name of a schema no one uses yet (`keel_test_<random hex>`), dropped with its contents after."""
    schema = f"keel_test_{secrets.token_hex(random_bytes)}"
    try:
        yield schema
    finally:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()


async def postgres_artifact_rows(dsn: str, schema: str) -> tuple[int, int]:
    """(artifact rows, artifact chunk rows) in `schema`, read on a connection of its own."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        artifacts = await conn.fetchval(f"SELECT count(*) FROM {schema}.artifacts")
        chunks = await conn.fetchval(f"SELECT count(*) FROM {schema}.artifact_chunks")
    finally:
        await conn.close()
    return int(artifacts), int(chunks)
