"""Settings checked before a command opens anything: each problem named in one line, with its fix."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DAGSTER_HOME = "DAGSTER_HOME"
# With SQLAlchemy 2.1 a bare postgresql:// means psycopg 3, which is not installed.
_DRIVERLESS = ("postgresql://", "postgres://")


def _env_references(node: Any) -> Iterator[str]:
    """The variables a Dagster config file reads (``{env: NAME}``), in file order."""
    if isinstance(node, dict):
        if set(node) == {"env"} and isinstance(node["env"], str):
            yield node["env"]
            return
        for value in node.values():
            yield from _env_references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _env_references(value)


def dagster_instance_problem(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the instance of ``$DAGSTER_HOME`` cannot be opened as configured, or None.

    Catches what Dagster would only report as a configuration error's repr: a variable that
    ``dagster.yaml`` reads and nobody set.
    """
    home = environ.get(DAGSTER_HOME)
    if not home:
        return f"{DAGSTER_HOME} is not set; point it at the pipeline's instance directory (it holds dagster.yaml)"
    if not Path(home).is_dir():
        return f"{DAGSTER_HOME}={home} is not a directory; point it at the pipeline's instance directory"
    config = Path(home) / "dagster.yaml"
    if not config.is_file():
        return None  # Dagster's default: a local SQLite instance in DAGSTER_HOME
    try:
        document = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        return f"{config} cannot be read as YAML ({str(exc).splitlines()[0]}); fix or replace it"
    for name in _env_references(document):
        value = environ.get(name)
        if not value:
            return f"{name} is not set; dagster.yaml reads it"
        if value.startswith(_DRIVERLESS):
            return (f"{name} starts with {value.split('://', 1)[0]}://, which SQLAlchemy reads as psycopg 3 (not "
                    f"installed); write postgresql+psycopg2://...")
    return None


def database_url_problem(url: str, setting: str) -> str | None:
    """Why ``url`` (given as ``setting``) is not a SQLAlchemy URL of a PostgreSQL database, or None."""
    example = "postgresql+psycopg2://user:password@host:5432/database"
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        return f"{setting} is not a database URL; write {example}"
    if backend != "postgresql":
        return f"{setting} names a {backend} database, not PostgreSQL; write {example}"
    return None
