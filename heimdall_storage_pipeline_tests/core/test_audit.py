"""The deletion audit log on real PostgreSQL: rows are written and marked exactly as given."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from heimdall_storage_pipeline.core.audit import AuditLog, deletion_audit
from heimdall_storage_pipeline.core.safety import Candidate

# Characters an array literal or a bind must escape, and the widest values.
AWKWARD_KEYS = ['a"b', "c\\d", "e,f", "{g}", "h i ", "NULL", "ü/日本.npy", "", "j'k", "x" * 1024]


def _rows(engine: sa.Engine, bucket: str) -> dict[str, sa.Row]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(deletion_audit).where(deletion_audit.c.bucket == bucket)).all()
    return {row.key: row for row in rows}


def test_intent_rows_hold_every_field_exactly(db_engine):
    audit = AuditLog(db_engine)
    bucket = f"b-{secrets.token_hex(3)}"
    at = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    candidates = [
        Candidate(key, size=index * 2**33, last_modified=at - timedelta(days=index, microseconds=index),
                  etag=f'"{index}"' if index % 2 else "")
        for index, key in enumerate(AWKWARD_KEYS)
    ]
    audit.record_intent(run_id="r1", job="delete_orphans_job", bucket=bucket, candidates=candidates, at=at)
    rows = _rows(db_engine, bucket)
    assert sorted(rows) == sorted(AWKWARD_KEYS)
    for candidate in candidates:
        row = rows[candidate.key]
        assert (row.size, row.etag, row.last_modified, row.status, row.intent_at, row.job) == (
            candidate.size, candidate.etag, candidate.last_modified, "pending", at, "delete_orphans_job")
        assert row.last_modified.utcoffset() == timedelta(0)


def test_mark_touches_only_the_named_keys_of_that_run_and_bucket(db_engine):
    audit = AuditLog(db_engine)
    bucket = f"b-{secrets.token_hex(3)}"
    at = datetime(2026, 11, 25, tzinfo=UTC)
    candidates = [Candidate(key, 1, at, "e") for key in AWKWARD_KEYS]
    for run_id, in_bucket in (("r1", bucket), ("r2", bucket), ("r1", bucket + "x")):
        audit.record_intent(run_id=run_id, job="j", bucket=in_bucket, candidates=candidates, at=at)
    audit.mark(run_id="r1", bucket=bucket, keys=AWKWARD_KEYS[:6], status="deleted", at=at)
    audit.mark(run_id="r1", bucket=bucket, keys=[AWKWARD_KEYS[6]], status="failed", at=None, error="AccessDenied")
    audit.mark(run_id="r1", bucket=bucket, keys=[], status="deleted", at=at)

    with db_engine.connect() as connection:
        rows = connection.execute(
            sa.select(deletion_audit).where(deletion_audit.c.bucket.in_([bucket, bucket + "x"]))
        ).all()
    changed = {(r.run_id, r.bucket, r.key): (r.status, r.error, r.deleted_at) for r in rows if r.status != "pending"}
    assert changed == {
        **{("r1", bucket, key): ("deleted", None, at) for key in AWKWARD_KEYS[:6]},
        ("r1", bucket, AWKWARD_KEYS[6]): ("failed", "AccessDenied", None),
    }
    assert len(rows) == 3 * len(AWKWARD_KEYS)
