"""The deletion audit log in PostgreSQL, written ahead of every DeleteObjects request.

Each batch is first recorded as ``pending`` (committed), then deleted, then marked
``deleted``, ``not_deleted`` or ``failed``. A run that dies between the two leaves ``pending``
rows; the next run reconciles them against the bucket (gone: ``deleted``; still there:
``not_deleted``), so the log matches the bucket whatever happened.

Pending rows are found through a small table of open intents (one row per batch, written with
the batch's rows and removed with their final marks), not through an index on ``status``:
with ``status`` in no index and over half of each page left free, a mark is a HOT update that
touches no index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine

from heimdall_storage_pipeline.core.clock import ensure_utc
from heimdall_storage_pipeline.core.errors import StorageCleanupError
from heimdall_storage_pipeline.core.migrations import apply_migrations
from heimdall_storage_pipeline.core.quarantine import Moved, checked_object_remains
from heimdall_storage_pipeline.core.safety import Candidate, FreshStat

# The tables' layout is in migrations/audit/*.sql; these describe them for queries.
metadata = sa.MetaData()
deletion_audit = sa.Table(
    "heimdall_storage_deletion_audit",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("job", sa.String(64), nullable=False),
    sa.Column("bucket", sa.String(63), nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("etag", sa.Text, nullable=False),
    sa.Column("last_modified", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending, deleted, failed, not_deleted
    sa.Column("error", sa.Text),
    sa.Column("intent_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("deleted_at", sa.DateTime(timezone=True)),
    sa.Column("plan_id", sa.Text),  # the plan a live run applied, if any
    sa.Column("version_ids", postgresql.ARRAY(sa.Text)),  # the versions deleted, on a versioned bucket
    sa.Column("quarantine_bucket", sa.Text),  # where a quarantined object was moved
    sa.Column("quarantine_key", sa.Text),
)
# Batches whose rows may still be pending: written in the intent's transaction, removed in the
# one that gives the last of its rows a final status. At most a few rows per running deletion.
open_intents = sa.Table(
    "heimdall_storage_deletion_open_intents",
    metadata,
    sa.Column("first_id", sa.BigInteger, primary_key=True),  # the batch's audit row ids ...
    sa.Column("last_id", sa.BigInteger, nullable=False),  # ... lie in first_id..last_id
    sa.Column("bucket", sa.String(63), nullable=False),
)
# Each plan is applied at most once: the first live run that names it claims it here.
plan_applications = sa.Table(
    "heimdall_storage_plan_applications",
    metadata,
    sa.Column("plan_id", sa.Text, primary_key=True),
    sa.Column("bucket", sa.String(63), nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)


_INSERT_PENDING = f"""
WITH intent AS (
  INSERT INTO {deletion_audit.name} (run_id, job, bucket, key, size, etag, last_modified, status, intent_at,
                                     plan_id, version_ids, quarantine_bucket, quarantine_key)
  SELECT :run_id, :job, :bucket, c.key, c.size, c.etag, c.last_modified, 'pending', :at, :plan_id,
         string_to_array(nullif(c.versions, ''), ' '), :quarantine_bucket, nullif(c.moved_to, '')
  FROM unnest(CAST(:keys AS text[]), CAST(:sizes AS bigint[]), CAST(:etags AS text[]),
              CAST(:modified AS timestamptz[]), CAST(:versions AS text[]), CAST(:moved_to AS text[]))
       AS c(key, size, etag, last_modified, versions, moved_to)
  RETURNING key, id
), opened AS (
  INSERT INTO {open_intents.name} (first_id, last_id, bucket)
  SELECT min(id), max(id), :bucket FROM intent
)
SELECT key, id FROM intent
"""
# Every open intent of the bucket, with its rows that are still pending (none: a.id is NULL).
_PENDING = f"""
SELECT o.first_id, a.id, a.run_id, a.key, a.etag, a.last_modified, a.quarantine_bucket, a.quarantine_key,
       a.version_ids
FROM {open_intents.name} AS o
LEFT JOIN {deletion_audit.name} AS a ON a.id BETWEEN o.first_id AND o.last_id AND a.status = 'pending'
WHERE o.bucket = :bucket
"""
# By the range of the ids (one INSERT's, so close together), which the primary key's index scan
# reads; ``id + 0`` keeps the list a filter, so the plan does not hinge on how the planner prices
# index probes for rows its statistics have not seen yet (docs/performance.md, "Deletion").
_MARK = f"""
UPDATE {deletion_audit.name} SET status = :status, deleted_at = :at, error = :error
WHERE id BETWEEN :lowest AND :highest AND id + 0 = ANY(CAST(:ids AS bigint[]))
"""


# Who holds a bucket's lock: the application_name its session set.
_LOCK_HOLDER = """
SELECT a.application_name FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid = CAST(:space AS oid) AND l.objid = CAST(hashtext(:bucket) AS oid)
LIMIT 1
"""
_ID_GAP = 10_000  # ids further apart than this are marked by separate ranges


def _nearby(ids: list[int]) -> list[list[int]]:
    """``ids`` sorted and cut where two neighbours lie far apart: a batch's ids are one group, the
    pending rows of runs long apart (``reconcile``) several, so no range reads the rows between."""
    groups: list[list[int]] = []
    for id_ in sorted(ids):
        if groups and id_ - groups[-1][-1] <= _ID_GAP:
            groups[-1].append(id_)
        else:
            groups.append([id_])
    return groups


def array_literal(values: Iterable[str]) -> str:
    """``values`` as one PostgreSQL array literal (``'{"a","b"}'``), to bind as a single string.

    A driver binds a Python list as ``ARRAY['a', 'b', ...]``, one expression per element for
    PostgreSQL to parse; ``array_in`` reads one string in a single pass. Every element is quoted,
    so no key, however spelled, can end one early.
    """
    return "{" + ",".join('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for value in values) + "}"


@dataclass(frozen=True)
class PendingDeletion:
    id: int
    run_id: str
    key: str
    quarantine: tuple[str, str] | None = None  # where a move was copying the object to
    version_ids: tuple[str, ...] = ()  # the versions the delete named, on a versioned bucket
    etag: str = ""  # the object checked, which a move's copy holds
    last_modified: datetime | None = None


@dataclass(frozen=True)
class Mark:
    """A status for the audit rows ``ids`` (as returned by ``record_intent``)."""

    ids: list[int]
    status: str  # deleted, failed, not_deleted
    at: datetime | None = None  # deleted_at
    error: str | None = None


class BucketBusyError(StorageCleanupError):
    """Another cleanup run holds the bucket."""


# The first key of this project's advisory locks (b"HSCP"), so that they never meet anyone else's.
_LOCK_SPACE = 0x48534350


class AuditLog:
    """Append-mostly record of deletions; one row per object and run."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        apply_migrations(engine, "audit")

    @contextmanager
    def exclusive(self, bucket: str, *, run_id: str, wait: timedelta) -> Iterator[None]:
        """Hold the bucket's cleanup lock for the block: one cleanup per bucket, whatever launched it.

        A PostgreSQL advisory lock on a session of its own; another holder for longer than ``wait``
        raises ``BucketBusyError`` naming its run. The session is closed afterwards, which releases
        the lock even if the unlock could not be sent.
        """
        key = {"space": _LOCK_SPACE, "bucket": bucket}
        with self.engine.connect() as connection:
            try:
                connection = connection.execution_options(isolation_level="AUTOCOMMIT")
                connection.execute(sa.text("SELECT set_config('application_name', :name, false)"),
                                   {"name": f"heimdall-cleanup {run_id}"[:63]})
                if not self._lock(connection, key, wait):
                    holder = connection.execute(sa.text(_LOCK_HOLDER), key).scalar()
                    raise BucketBusyError(
                        f"another cleanup of {bucket!r} is running ({holder or 'a session that just ended'}) and "
                        f"held it for more than {wait}; this run left the bucket alone. Launch again when that "
                        f"run has finished"
                    )
                yield
            finally:
                connection.invalidate()

    @staticmethod
    def _lock(connection: sa.Connection, key: dict[str, object], wait: timedelta) -> bool:
        if wait <= timedelta(0):
            return bool(connection.execute(sa.text("SELECT pg_try_advisory_lock(:space, hashtext(:bucket))"), key)
                        .scalar())
        connection.execute(sa.text("SELECT set_config('lock_timeout', :ms, false)"),
                           {"ms": str(int(wait.total_seconds() * 1000))})
        try:
            connection.execute(sa.text("SELECT pg_advisory_lock(:space, hashtext(:bucket))"), key)
        except sa.exc.OperationalError as exc:
            if getattr(exc.orig, "pgcode", None) == "55P03":  # lock_not_available: lock_timeout passed
                return False
            raise
        return True

    def record_intent(self, *, run_id: str, job: str, bucket: str, candidates: Iterable[Candidate],
                      at: datetime, plan_id: str | None = None,
                      quarantine: Callable[[str], tuple[str, str]] | None = None) -> dict[str, int]:
        """Record ``candidates`` as pending, as one open intent; returns each key's audit row id.

        ``quarantine`` gives each key's quarantine bucket and key when the objects are moved, not deleted.
        """
        candidates = list(candidates)
        if not candidates:
            return {}
        # One statement over arrays, with any driver: cheaper than an executemany in every batch.
        with self.engine.begin() as connection:
            return dict(connection.execute(sa.text(_INSERT_PENDING), {
                "run_id": run_id, "job": job, "bucket": bucket, "at": at, "plan_id": plan_id,
                "keys": array_literal(c.key for c in candidates),
                "sizes": array_literal(str(c.size) for c in candidates),
                "etags": array_literal(c.etag for c in candidates),
                "modified": array_literal(ensure_utc(c.last_modified).isoformat() for c in candidates),
                # NULL arrays (unnest pads them with NULLs) where no key has versions or a quarantine.
                "versions": array_literal(" ".join(c.version_ids) for c in candidates)
                if any(c.version_ids for c in candidates) else None,
                "quarantine_bucket": quarantine(candidates[0].key)[0] if quarantine else None,
                "moved_to": array_literal(quarantine(c.key)[1] for c in candidates) if quarantine else None,
            }).all())

    def finish(self, marks: Iterable[Mark], *, intents: Iterable[int] = ()) -> None:
        """Apply ``marks`` and close ``intents`` (each by its smallest row id), in one transaction.

        Close an intent only together with the marks that leave none of its rows pending.
        """
        marks = [mark for mark in marks if mark.ids]
        intents = list(intents)
        if not marks and not intents:
            return
        with self.engine.begin() as connection:
            for mark in marks:
                for group in _nearby(mark.ids):
                    connection.execute(sa.text(_MARK), {
                        "ids": array_literal(map(str, group)), "lowest": group[0], "highest": group[-1],
                        "status": mark.status, "at": mark.at, "error": mark.error,
                    })
            if intents:
                connection.execute(sa.delete(open_intents).where(open_intents.c.first_id.in_(intents)))

    def pending(self, bucket: str) -> tuple[list[PendingDeletion], list[int]]:
        """The pending rows of ``bucket`` and the open intents (first row ids) that hold them."""
        with self.engine.connect() as connection:
            found = connection.execute(sa.text(_PENDING), {"bucket": bucket}).all()
        rows = {row.id: PendingDeletion(id=row.id, run_id=row.run_id, key=row.key,
                                        quarantine=(row.quarantine_bucket, row.quarantine_key)
                                        if row.quarantine_key else None,
                                        version_ids=tuple(row.version_ids or ()), etag=row.etag,
                                        last_modified=row.last_modified)
                for row in found if row.id is not None}
        return list(rows.values()), sorted({row.first_id for row in found})

    def reconcile(self, bucket: str, stat: Callable[[list[str]], dict[str, FreshStat | None]],
                  at: datetime, discard: Callable[[list[tuple[str, str]]], None] | None = None,
                  versions: Callable[[list[str]], dict[str, set[str]]] | None = None) -> dict[str, int]:
        """Settle ``pending`` rows left by a run that died mid-batch, and close their intents.

        A row that names versions is settled by them (``versions``: the version ids each key has
        now), not by its key, which a delete of noncurrent versions leaves in place: deleted when
        none remains, not deleted when all do, failed when some do.
        A move to quarantine that died between copy and delete left its original: ``discard`` removes
        the copy, so that the next run moves the object once, re-validated. A copy whose original is
        gone or replaced (by an upload since) holds the checked object: it is kept, the row ``deleted``;
        so is a copy whose versions are partly gone (the checked one may be among them).
        """
        pending, intents = self.pending(bucket)
        by_versions = [row for row in pending if row.version_ids]
        if by_versions and versions is None:
            raise ValueError("pending rows name versions: reconcile needs their versions")
        by_key = [row for row in pending if not row.version_ids]
        stats = stat(sorted({p.key for p in by_key})) if by_key else {}
        remaining = versions(sorted({p.key for p in by_versions})) if by_versions and versions else {}
        left = {row.id: len(remaining[row.key].intersection(row.version_ids)) for row in by_versions}

        def stayed(row: PendingDeletion) -> bool:
            if row.quarantine is None:
                return stats[row.key] is not None
            assert row.last_modified is not None
            return checked_object_remains(stats[row.key], row.etag, row.last_modified)

        gone = [row.id for row in by_key if not stayed(row)] + [i for i, n in left.items() if n == 0]
        partly = [row.id for row in by_versions if 0 < left[row.id] < len(row.version_ids)]
        still_there = [row.id for row in by_key if stayed(row)] + [
            row.id for row in by_versions if left[row.id] == len(row.version_ids)]
        kept = set(still_there)  # a copy of a partly deleted key stays: its checked version may be gone
        copies = [row.quarantine for row in pending if row.quarantine and row.id in kept]
        if copies and discard is not None:
            discard(copies)
        self.finish([Mark(gone, "deleted", at),
                     Mark(still_there, "not_deleted", None, "run ended before the delete"),
                     Mark(partly, "failed", None, "run ended during the delete: some of its versions remain")],
                    intents=intents)
        settled = {"deleted": len(gone), "not_deleted": len(still_there)}
        return settled | ({"failed": len(partly)} if partly else {})

    def moved(self, bucket: str, *, keys: list[str] | None = None, run_id: str | None = None,
              plan_id: str | None = None) -> list[Moved]:
        """The objects of ``bucket`` moved to quarantine (and not restored): the latest move of each of
        ``keys``, or every move of a cleanup run or of the run that applied a plan."""
        a = deletion_audit.c
        moved = (a.bucket == bucket, a.status == "deleted", a.quarantine_key.is_not(None))
        query = sa.select(a.id, a.key, a.size, a.etag, a.quarantine_bucket, a.quarantine_key).where(*moved)
        if keys is not None:
            latest = sa.select(sa.func.max(a.id)).where(*moved, a.key.in_(keys)).group_by(a.key)
            query = query.where(a.id.in_(latest)).order_by(a.key)
        else:
            query = query.where(a.run_id == run_id if run_id else a.plan_id == plan_id).order_by(a.id)
        with self.engine.connect() as connection:
            return [Moved(row.id, row.key, row.size, row.etag, (row.quarantine_bucket, row.quarantine_key))
                    for row in connection.execute(query)]

    def quarantine_copies(self, where: str, keys: list[str]) -> dict[str, list[tuple[str, int]]]:
        """Which of ``keys`` in bucket ``where`` a move put there: each one's moved ETags and sizes.

        Any status: a move's copy sits there before its row is settled (pending until the next run's
        reconcile, which comes after the location's check) and after a copy that failed by timing out.
        """
        a = deletion_audit.c
        query = sa.select(a.quarantine_key, a.etag, a.size).where(
            a.quarantine_bucket == where, a.quarantine_key.in_(keys))
        found: dict[str, list[tuple[str, int]]] = {}
        with self.engine.connect() as connection:
            for row in connection.execute(query):
                found.setdefault(row.quarantine_key, []).append((row.etag, row.size))
        return found

    def mark_restored(self, audit_id: int, at: datetime) -> None:
        """The moved object is back under its key (``deleted_at`` keeps when it had been moved)."""
        with self.engine.begin() as connection:
            connection.execute(sa.update(deletion_audit).where(deletion_audit.c.id == audit_id)
                               .values(status="restored", error=f"restored at {ensure_utc(at).isoformat()}"))

    def deleted_keys(self, bucket: str) -> set[str]:
        with self.engine.connect() as connection:
            return set(connection.execute(
                sa.select(deletion_audit.c.key)
                .where(deletion_audit.c.bucket == bucket, deletion_audit.c.status == "deleted")
            ).scalars())

    def claim_plan(self, plan_id: str, *, bucket: str, run_id: str, at: datetime) -> tuple[str, datetime] | None:
        """Record that ``run_id`` applies ``plan_id``; if another run did first, return its run id and time."""
        with self.engine.begin() as connection:
            claimed = connection.execute(
                pg_insert(plan_applications)
                .values(plan_id=plan_id, bucket=bucket, run_id=run_id, applied_at=ensure_utc(at))
                .on_conflict_do_nothing()
            ).rowcount
            if claimed:
                return None
            earlier = connection.execute(
                sa.select(plan_applications.c.run_id, plan_applications.c.applied_at)
                .where(plan_applications.c.plan_id == plan_id)
            ).one()
        return earlier.run_id, earlier.applied_at



def plan_application(engine: Engine, plan_id: str) -> tuple[str, datetime] | None:
    """The run that applied ``plan_id`` and when; None when no run did (or no cleanup ever ran here)."""
    with engine.connect() as connection:
        if connection.execute(sa.text("SELECT to_regclass(:t)"), {"t": plan_applications.name}).scalar() is None:
            return None
        row = connection.execute(
            sa.select(plan_applications.c.run_id, plan_applications.c.applied_at)
            .where(plan_applications.c.plan_id == plan_id)
        ).first()
    return (row.run_id, row.applied_at) if row else None
