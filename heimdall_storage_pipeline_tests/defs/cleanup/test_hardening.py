"""What a hostile operator found, each on the real servers: concurrent cleanups, slow or failing
reference queries, a future as_of."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from heimdall_storage_pipeline.core.audit import AuditLog
from heimdall_storage_pipeline.core.clock import isoformat_utc, utc_now
from heimdall_storage_pipeline.core.references import make_engine
from heimdall_storage_pipeline.local.heimdall_db import SYNTHETIC_BUCKET
from heimdall_storage_pipeline_tests.cleanup_support import listed_keys, put
from heimdall_storage_pipeline_tests.conftest import key_source
from heimdall_storage_pipeline_tests.defs.cleanup.test_delete_orphans_job import (
    MIN_AGE_SECONDS,
    _failure_text,
    heimdall_world,  # noqa: F401  (a fixture)
    wait_until_old,
)


@pytest.fixture
def world(harness_factory, make_bucket, seaweed, db_engine):
    """3 referenced objects and 2 orphans, scanned; the source reads a view the test may slow down."""
    bucket = make_bucket("hard")
    client = seaweed.client()
    with db_engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE refs (k text)"))
        connection.execute(sa.text("CREATE VIEW refs_view AS SELECT k FROM refs"))
        for i in range(3):
            connection.execute(sa.text("INSERT INTO refs VALUES (:k)"), {"k": f"kept/{i}.npy"})
    for key in [f"kept/{i}.npy" for i in range(3)] + ["gone/0.npy", "gone/1.npy"]:
        put(client, bucket, key)
    source = {**key_source("SELECT k FROM refs_view"), "name": "refs_view.k", "statement_timeout": "1s"}
    harness = harness_factory({bucket: {"min_age": f"{MIN_AGE_SECONDS}s", "references": [source]}})
    wait_until_old(client, bucket)
    harness.scan(bucket)
    return harness, bucket, client


def test_a_live_cleanup_leaves_a_bucket_another_cleanup_holds(world):
    harness, bucket, client = world
    audit = AuditLog(make_engine(harness.database_url))
    with audit.exclusive(bucket, run_id="the-other-run", wait=timedelta(0)):
        result = harness.delete(raise_on_error=False, dry_run=False, lock_wait_seconds=1)
        assert harness.delete().success  # a dry run deletes nothing and needs no lock
    assert not result.success
    text = _failure_text(result)
    assert f"another cleanup of '{bucket}' is running (heimdall-cleanup the-other-run)" in text
    meta = harness.metadata("orphan_deletions", bucket)
    assert meta["dry_run"] is True  # the dry run's record came after the refusal's
    assert len(listed_keys(client, bucket)) == 5
    assert harness.delete(dry_run=False).success  # released: the next live run cleans it
    assert len(listed_keys(client, bucket)) == 3


def test_the_purge_takes_the_same_lock(heimdall_world, db_engine):  # noqa: F811
    harness, _, datasets, _ = heimdall_world
    audit = AuditLog(make_engine(harness.database_url))
    with audit.exclusive(SYNTHETIC_BUCKET, run_id="nightly", wait=timedelta(0)):
        result = harness.purge(datasets["purged"], dry_run=False, raise_on_error=False)
    assert not result.success and "another cleanup of 'heimdall-synthetic-iq' is running" in _failure_text(result)
    with db_engine.connect() as connection:  # the purge changed nothing, rows included
        assert connection.execute(sa.text("SELECT count(*) FROM heimdall.synthetic_datasets WHERE id = :d"),
                                  {"d": datasets["purged"]}).scalar() == 1


def test_a_slow_reference_recheck_is_cancelled_and_named(world, db_engine):
    harness, bucket, client = world
    with db_engine.begin() as connection:  # the source now takes far longer than its 1 s limit
        connection.execute(sa.text("CREATE OR REPLACE VIEW refs_view AS SELECT k FROM refs, pg_sleep(30)"))
    result = harness.delete(raise_on_error=False, dry_run=False)
    text = _failure_text(result)
    assert not result.success
    assert f"bucket '{bucket}', source 'refs_view.k'" in text and "statement_timeout" in text
    assert "Traceback" not in text.split("bucket(s) were not cleaned:")[-1]
    assert len(listed_keys(client, bucket)) == 5


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("DROP VIEW refs_view", "a table it reads does not exist"),
        ("CREATE OR REPLACE VIEW refs_view AS SELECT k FROM refs FOR SHARE", "read-only snapshot refuses"),
    ],
    ids=["table gone", "writes in a read-only snapshot"],
)
def test_reference_query_errors_are_one_line_with_the_fix(world, db_engine, change, expected):
    harness, bucket, client = world
    with db_engine.begin() as connection:
        connection.execute(sa.text(change))
    result = harness.delete(raise_on_error=False, dry_run=False)
    text = _failure_text(result)
    assert not result.success and "source 'refs_view.k'" in text and expected in text
    assert "sqlalchemy" not in json.dumps(text).lower()
    assert len(listed_keys(client, bucket)) == 5


def test_an_as_of_in_the_future_is_refused(world):
    harness, bucket, _ = world
    result = harness.materialize(["orphan_diff"], bucket, as_of=isoformat_utc(utc_now() + timedelta(hours=1)),
                                 raise_on_error=False)
    assert not result.success
    failure = "\n".join(e.step_failure_data.error.cause.message for e in result.all_events if e.is_step_failure)
    assert "is in the future" in failure and "as_of" in failure
    # Within the clock skew a machine may have, it is accepted.
    assert harness.materialize(["orphan_diff"], bucket,
                               as_of=isoformat_utc(utc_now() + timedelta(minutes=1))).success
