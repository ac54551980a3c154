"""The PostgreSQL backend: asyncpg, group commit through one SQL function, LISTEN/NOTIFY wake-ups.

Only what PostgreSQL does differently lives here (`backend`, the driver `errors`, the LISTEN
`listener`, the `schema` migrations); the shared flow is `store_service.sql_backend`.
"""

from store_service.postgres.backend import DEFAULT_SCHEMA, Durability, PostgresStoreBackend

__all__ = ["DEFAULT_SCHEMA", "Durability", "PostgresStoreBackend"]
