"""Alembic's entry point, for `convnet.feedback.store.upgrade` only: it hands over an open
connection in `config.attributes["connection"]` (there is no alembic.ini and no offline mode).

The whole upgrade runs in one transaction that first takes a lock, so workers and replicas that
start together migrate one after the other: the later ones find the schema at head and do
nothing. SQLite: the engine begins every transaction with BEGIN IMMEDIATE (the write lock).
PostgreSQL: a transaction-scoped advisory lock.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

MIGRATION_LOCK = 0x636E6E66  # advisory lock key on PostgreSQL ("cnnf")

connection = context.config.attributes["connection"]
with connection.begin():
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    context.configure(connection=connection, transactional_ddl=True)
    context.run_migrations()
