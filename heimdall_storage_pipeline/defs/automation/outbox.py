"""The outbox ``heimdall.storage_cleanup_events``: what the triggers record, and who owns which prefix.

The prefixes an entity owns are derived here from its type and id, never taken from the
row alone: an event row someone inserted by hand cannot widen a cleanup.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from heimdall_storage_pipeline.core.purge import dataset_prefixes

OUTBOX_TABLE = "heimdall.storage_cleanup_events"


@dataclass(frozen=True)
class EntityKind:
    """A kind of Heimdall row that owns object prefixes in one bucket."""

    table: str
    bucket: str
    prefixes: Callable[[str], tuple[str, ...]]


def audio_prefixes(audio_id: str) -> tuple[str, ...]:
    """Preprocessed and imported chunks of one audio_library row."""
    return (f"{audio_id}/", f"imported/{audio_id}/")


ENTITY_KINDS: dict[str, EntityKind] = {
    "synthetic_dataset": EntityKind("heimdall.synthetic_datasets", "heimdall-synthetic-iq", dataset_prefixes),
    "audio": EntityKind("heimdall.audio_library", "heimdall-audio-chunks", audio_prefixes),
}


class OutboxEventError(ValueError):
    """An outbox event that does not describe a known entity's own prefixes."""


@dataclass(frozen=True)
class OutboxEvent:
    id: int
    entity_type: str
    entity_id: str
    bucket: str
    prefixes: tuple[str, ...]
    deleted_at: datetime


def owned_prefixes(
    entity_type: str, entity_id: str, bucket: str, prefixes: tuple[str, ...]
) -> tuple[str, ...]:
    """The prefixes the entity really owns; refuses an event whose bucket or prefixes differ."""
    kind = ENTITY_KINDS.get(entity_type)
    if kind is None:
        raise OutboxEventError(f"unknown entity type {entity_type!r}; known: {', '.join(ENTITY_KINDS)}")
    try:
        canonical = str(uuid.UUID(entity_id))
    except ValueError:
        raise OutboxEventError(f"entity id {entity_id!r} is not a UUID") from None
    expected = kind.prefixes(canonical)
    if bucket != kind.bucket or tuple(prefixes) != expected:
        raise OutboxEventError(
            f"the event names {bucket}/{list(prefixes)}, but a {entity_type} {canonical} owns exactly "
            f"{kind.bucket}/{list(expected)}; refusing to clean anything else"
        )
    return expected


def outbox_exists(engine: Engine) -> bool:
    with engine.connect() as connection:
        found = connection.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": OUTBOX_TABLE})
        return bool(found.scalar_one())


def _event(row: sa.Row) -> OutboxEvent:
    return OutboxEvent(id=int(row.id), entity_type=row.entity_type, entity_id=str(row.entity_id),
                       bucket=row.bucket, prefixes=tuple(row.prefixes), deleted_at=row.deleted_at)


_COLUMNS = "id, entity_type, entity_id, bucket, prefixes, deleted_at"


def fetch_new_events(engine: Engine, after_id: int, limit: int) -> list[OutboxEvent]:
    """Unprocessed events after ``after_id``, oldest first (one indexed query)."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(f"SELECT {_COLUMNS} FROM {OUTBOX_TABLE} WHERE id > :after AND processed_at IS NULL "
                    f"ORDER BY id LIMIT :limit"),
            {"after": after_id, "limit": limit},
        )
        return [_event(row) for row in rows]


def fetch_event(engine: Engine, event_id: int) -> OutboxEvent | None:
    with engine.connect() as connection:
        row = connection.execute(sa.text(f"SELECT {_COLUMNS} FROM {OUTBOX_TABLE} WHERE id = :id"),
                                 {"id": event_id}).first()
    return _event(row) if row is not None else None


def mark_processed(engine: Engine, event_id: int, run_id: str, dry_run: bool) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.text(f"UPDATE {OUTBOX_TABLE} SET processed_at = now(), processed_run_id = :run, "
                    f"processed_dry_run = :dry, last_error = NULL WHERE id = :id AND processed_at IS NULL"),
            {"id": event_id, "run": run_id, "dry": dry_run},
        )


def record_failure(engine: Engine, event_id: int, run_id: str, error: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.text(f"UPDATE {OUTBOX_TABLE} SET attempts = attempts + 1, last_error = :error WHERE id = :id"),
            {"id": event_id, "error": f"run {run_id}: {error}"[:2000]},
        )


def entity_row_exists(engine: Engine, entity_type: str, entity_id: str) -> bool:
    """Whether the entity's row is (again) in its table, read fresh."""
    table = ENTITY_KINDS[entity_type].table  # from our own mapping, never from the event
    with engine.connect() as connection:
        return connection.execute(
            sa.text(f"SELECT EXISTS (SELECT 1 FROM {table} WHERE id = :id)"), {"id": entity_id}
        ).scalar_one()
