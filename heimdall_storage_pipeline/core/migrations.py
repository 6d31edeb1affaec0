"""The project's own tables, created and changed by numbered SQL files applied once each.

Two targets: ``audit`` (the deletion audit, in the audit database; applied whenever an audit log
is opened) and ``heimdall`` (the outbox and its triggers in Heimdall's database; applied by
``heimdall-storage migrate``). Each target keeps a ledger of the files it has applied; every
file is also safe to apply again, so databases migrated before the ledger existed need nothing.
"""

from __future__ import annotations

from importlib import resources

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from heimdall_storage_pipeline.core.errors import database_error

# Where each target records what it has applied: in the schema its migrations may write to.
LEDGERS = {"audit": "heimdall_storage_schema_migrations", "heimdall": "heimdall.storage_schema_migrations"}
_FIX = {
    "audit": "check HEIMDALL_AUDIT_DB_URL (or DAGSTER_PG_URL) and that its role may create tables",
    "heimdall": "run it on Heimdall's database (schema heimdall with its tables) as a role that may "
                "create tables and triggers there",
}


def migration_scripts(target: str) -> list[tuple[str, str]]:
    """``(name, sql)`` of the target's migrations, in the order they are applied."""
    folder = resources.files("heimdall_storage_pipeline.migrations").joinpath(target)
    return sorted((entry.name, entry.read_text(encoding="utf-8"))
                  for entry in folder.iterdir() if entry.name.endswith(".sql"))


def _applied(connection: sa.Connection, ledger: str) -> set[str]:
    if connection.execute(sa.text("SELECT to_regclass(:ledger)"), {"ledger": ledger}).scalar() is None:
        return set()
    return set(connection.execute(sa.text(f"SELECT name FROM {ledger}")).scalars())


def apply_migrations(engine: Engine, target: str) -> list[str]:
    """Apply the target's migrations not yet applied; returns their names. One query when current."""
    ledger, scripts = LEDGERS[target], migration_scripts(target)
    try:
        with engine.connect() as connection:
            if {name for name, _ in scripts} <= _applied(connection, ledger):
                return []
        with engine.begin() as connection:
            # Concurrent openers migrate one after the other; the later ones find the work done.
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:ledger))"), {"ledger": ledger})
            if target == "heimdall":
                connection.execute(sa.text("CREATE SCHEMA IF NOT EXISTS heimdall"))
            connection.execute(sa.text(
                f"CREATE TABLE IF NOT EXISTS {ledger} (name text PRIMARY KEY, applied_at timestamptz NOT NULL "
                f"DEFAULT now())"))
            done = _applied(connection, ledger)
            applied = []
            for name, sql in scripts:
                if name not in done:
                    # psycopg2 runs a multi-statement script (with $$ bodies) as is.
                    connection.exec_driver_sql(sql)
                    connection.execute(sa.text(f"INSERT INTO {ledger} (name) VALUES (:name)"), {"name": name})
                    applied.append(name)
            return applied
    except sa.exc.DBAPIError as exc:
        raise database_error(engine, f"apply the {target} migrations", exc, _FIX[target]) from None
