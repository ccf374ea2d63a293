"""SQL storage backends (SQLite through aiosqlite, PostgreSQL through asyncpg)
on SQLAlchemy 2 async Core: one code path, dialect-specific DDL only for the
full-text index."""

from storage.sql.db import Database
from storage.sql.directory import SqlDirectory
from storage.sql.mailstore import SqlMailStore
from storage.sql.queue import OutboundQueue, QueuedMessage, QueuedRecipient

__all__ = [
    "Database",
    "OutboundQueue",
    "QueuedMessage",
    "QueuedRecipient",
    "SqlDirectory",
    "SqlMailStore",
]
