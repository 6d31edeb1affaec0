"""The deletion audit log on real PostgreSQL: rows are written and marked exactly as given."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from heimdall_storage_pipeline.core.audit import _MARK, AuditLog, _nearby, array_literal, deletion_audit
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


def test_mark_touches_only_the_rows_it_names(db_engine):
    audit = AuditLog(db_engine)
    bucket = f"b-{secrets.token_hex(3)}"
    at = datetime(2026, 11, 25, tzinfo=UTC)
    candidates = [Candidate(key, 1, at, "e") for key in AWKWARD_KEYS]
    ids = {}
    for run_id, in_bucket in (("r1", bucket), ("r2", bucket), ("r1", bucket + "x")):
        ids[run_id, in_bucket] = audit.record_intent(run_id=run_id, job="j", bucket=in_bucket,
                                                     candidates=candidates, at=at)
    assert all(sorted(recorded) == sorted(AWKWARD_KEYS) for recorded in ids.values())
    first = ids["r1", bucket]
    audit.mark(ids=[first[key] for key in AWKWARD_KEYS[:6]], status="deleted", at=at)
    audit.mark(ids=[first[AWKWARD_KEYS[6]]], status="failed", at=None, error="AccessDenied")
    audit.mark(ids=[], status="deleted", at=at)

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


def test_marking_a_batch_finds_its_rows_through_the_primary_key_however_large_the_run(db_engine):
    """A run's rows are new to the planner's statistics: by (run_id, bucket, key = ANY) the update
    was planned as a scan of every row of the run, filtered, so each batch of a large deletion cost
    more than the one before. By id alone it was still a whole-table scan until the table was
    analysed and large (the planner's cost model expects disk reads, the pages are in memory):
    the range of the ids lets the primary key answer from the first batch on."""
    audit = AuditLog(db_engine)
    bucket = f"b-{secrets.token_hex(3)}"
    at = datetime(2026, 11, 25, tzinfo=UTC)
    for batch in range(20):
        ids = audit.record_intent(run_id="big", job="j", bucket=bucket, at=at, candidates=[
            Candidate(f"sessions/{batch:03d}-{index:05d}/websdr_1.npy", 1, at, "e") for index in range(1000)])
    with db_engine.begin() as connection:
        plan = "\n".join(connection.execute(sa.text("EXPLAIN " + _MARK), {
            "ids": array_literal(map(str, ids.values())), "lowest": min(ids.values()),
            "highest": max(ids.values()), "status": "deleted", "at": at, "error": None}).scalars())
    assert "Index Cond: ((id >= " in plan, plan
    assert "Seq Scan" not in plan, plan


def test_ids_far_apart_are_marked_by_separate_ranges() -> None:
    # One range per cluster: a range over the ids of runs long apart would read everything between.
    assert _nearby([5, 3, 1_000_000, 4, 1_000_002, 20_000]) == [[3, 4, 5], [20_000], [1_000_000, 1_000_002]]
    assert _nearby([]) == []
