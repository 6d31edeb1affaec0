"""SQL migrations for the Heimdall database (the outbox the event-driven cleanup reads).

Each ``*.sql`` file here is idempotent and applied in name order, each in one transaction.
"""

from __future__ import annotations

from importlib import resources

import sqlalchemy as sa

from heimdall_storage_pipeline.core.errors import database_error
from heimdall_storage_pipeline.core.references import make_engine


def migration_scripts() -> list[tuple[str, str]]:
    """``(name, sql)`` of every shipped migration, in the order they are applied."""
    folder = resources.files(__package__)
    scripts = sorted(entry for entry in folder.iterdir() if entry.name.endswith(".sql"))
    return [(entry.name, entry.read_text(encoding="utf-8")) for entry in scripts]


def apply_migration(database_url: str) -> None:
    """Apply every migration to the Heimdall database at ``database_url``; safe to repeat."""
    engine = make_engine(database_url)
    try:
        for name, sql in migration_scripts():
            try:
                with engine.begin() as connection:
                    # psycopg2 runs a multi-statement script (with $$ function bodies) as is.
                    connection.exec_driver_sql(sql)
            except sa.exc.DBAPIError as exc:
                raise database_error(
                    engine, f"apply migration {name}", exc,
                    "run it on Heimdall's database (schema heimdall with its tables) as a role that may "
                    "create tables and triggers there",
                ) from None
    finally:
        engine.dispose()
