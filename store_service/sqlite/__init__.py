"""The SQLite backend: one file in WAL mode, one writer thread with group commit, aiosqlite readers.

Only what SQLite does differently lives here; the shared flow is `store_service.sql_backend`.
"""

from store_service.sqlite.backend import DATABASE_FILE, SqliteStoreBackend, translate
from store_service.sqlite.writer import Durability

__all__ = ["DATABASE_FILE", "Durability", "SqliteStoreBackend", "translate"]
