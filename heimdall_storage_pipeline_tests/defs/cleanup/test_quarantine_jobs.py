"""Quarantine through delete_orphans_job and restore_quarantined_job, on the real servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import sqlalchemy as sa
from minio.commonconfig import CopySource

from heimdall_storage_pipeline.core.audit import AuditLog
from heimdall_storage_pipeline.core.clock import utc_now
from heimdall_storage_pipeline.core.quarantine import move_id
from heimdall_storage_pipeline.core.safety import Candidate
from heimdall_storage_pipeline.defs.cleanup import jobs
from heimdall_storage_pipeline_tests.cleanup_support import listed_keys, put
from heimdall_storage_pipeline_tests.conftest import key_source
from heimdall_storage_pipeline_tests.defs.cleanup.test_delete_orphans_job import wait_until_old


def restore(harness, raise_on_error: bool = True, **config) -> dg.ExecuteInProcessResult:
    return harness.defs.resolve_job_def("restore_quarantined_job").execute_in_process(
        instance=harness.instance, run_config={"ops": {"restore_quarantined": {"config": config}}},
        raise_on_error=raise_on_error)


def observation(harness, bucket: str) -> dict:
    records = harness.instance.fetch_observations(dg.AssetKey("orphan_deletions"), limit=1).records
    return {k: v.value for k, v in records[0].asset_observation.metadata.items()}


def test_a_whole_cleanup_run_is_restored_in_one_launch_after_a_dry_run(
        harness_factory, make_bucket, seaweed, db_engine):
    bucket, holding = make_bucket("qjob"), make_bucket("qhold")
    client = seaweed.client()
    with db_engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE refs (k text)"))
        connection.execute(sa.text("INSERT INTO refs VALUES ('kept.npy')"))
    keys = ["kept.npy", "a.npy", "b.npy", "c.npy"]
    for key in keys:
        put(client, bucket, key, key.encode() * 10)
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source("SELECT k FROM refs")],
                                        "quarantine": {"bucket": holding, "keep_days": 30}}})
    wait_until_old(client, bucket)
    harness.scan(bucket)
    cleanup = harness.delete(dry_run=False, allow_mass_delete=True)
    meta = harness.metadata("orphan_deletions", bucket)
    assert meta["deleted_count"] == 3 and listed_keys(client, bucket) == {"kept.npy"}
    assert (meta["quarantined_objects"], meta["quarantined_bytes"]) == (3, 3 * 50)
    assert meta["quarantine_location"] == f"{holding}/{bucket}/"
    assert client.get_bucket_lifecycle(holding).rules[0].expiration.days == 30

    put(client, bucket, "c.npy", b"a newer c")
    restore(harness, bucket=bucket, run_id=cleanup.run_id)  # a dry run by default
    assert listed_keys(client, bucket) == {"kept.npy", "c.npy"}
    assert (observation(harness, bucket)["restore_would_restore"], observation(harness, bucket)["restore_refused"]) \
        == (2, 1)
    restore(harness, bucket=bucket, run_id=cleanup.run_id, dry_run=False)
    seen = observation(harness, bucket)
    assert (seen["restore_restored"], seen["restore_refused"]) == (2, 1)
    assert "a newer object sits at 'c.npy'" in seen["restore_refusals"]["c.npy"]
    assert listed_keys(client, bucket) == set(keys)
    assert client.get_object(bucket, "a.npy").read() == b"a.npy" * 10
    first = _folder(harness, cleanup)
    assert {o.object_name for o in client.list_objects(holding, recursive=True)} == {f"{bucket}/{first}/c.npy"}
    # Restored moves are marked in the audit log: a second launch finds nothing left to restore but c.npy.
    restore(harness, bucket=bucket, run_id=cleanup.run_id, dry_run=False)
    seen = observation(harness, bucket)
    assert (seen["restore_refused"], seen["restore_restored"]) == (1, 0)

    # The newer c.npy is orphaned too: the next cleanup moves it, into its own run's folder, beside the first.
    wait_until_old(client, bucket)
    harness.scan(bucket)
    again = harness.delete(dry_run=False, allow_mass_delete=True)
    assert harness.metadata("orphan_deletions", bucket)["deleted_count"] == 3  # a, b (restored) and c
    second = _folder(harness, again)
    assert second != first and listed_keys(client, bucket) == {"kept.npy"}
    assert {o.object_name for o in client.list_objects(holding, recursive=True)} == {
        f"{bucket}/{first}/c.npy", *(f"{bucket}/{second}/{key}" for key in ("a.npy", "b.npy", "c.npy"))}
    restore(harness, bucket=bucket, run_id=cleanup.run_id, dry_run=False)  # the first life of c.npy
    assert observation(harness, bucket)["restore_restored"] == 1
    assert client.get_object(bucket, "c.npy").read() == b"c.npy" * 10
    restore(harness, bucket=bucket, keys=["c.npy"])  # its latest move: refused, the first life is back
    assert "a newer object sits at 'c.npy'" in observation(harness, bucket)["restore_refusals"]["c.npy"]


def _folder(harness, run: dg.ExecuteInProcessResult) -> str:
    """The quarantine folder of a cleanup run: when it started, then its short id."""
    started = harness.instance.get_run_record_by_id(run.run_id).start_time
    folder = move_id(datetime.fromtimestamp(started, UTC), run.run_id)
    assert folder.endswith(f"Z-{run.run_id[:8]}")
    return folder


def test_restore_needs_exactly_one_selection(harness_factory, make_bucket):
    bucket = make_bucket("qsel")
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source("SELECT 'x'")]}})
    result = restore(harness, raise_on_error=False, bucket=bucket)
    assert not result.success
    assert "exactly one of keys, run_id or plan" in str(result.failure_data_for_node("restore_quarantined"))


def test_a_dry_run_restore_ignores_a_busy_bucket_and_a_live_one_fails_with_one_line(
        harness_factory, make_bucket, db_engine, monkeypatch):
    bucket = make_bucket("qbusy")
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source("SELECT 'x'")],
                                        "quarantine": {"prefix": "q/", "keep_days": 30}}})
    monkeypatch.setattr(jobs, "DEFAULT_LOCK_WAIT_SECONDS", 0)
    with AuditLog(db_engine).exclusive(bucket, run_id="someone-else", wait=timedelta(0)):
        assert restore(harness, bucket=bucket, keys=["a.npy"]).success  # a dry run takes no lock
        live = restore(harness, raise_on_error=False, bucket=bucket, keys=["a.npy"], dry_run=False)
    assert not live.success
    failure = live.failure_data_for_node("restore_quarantined").user_failure_data
    assert failure.description.startswith(f"another cleanup of {bucket!r} is running")


def _bucket_with_refs(bucket: str, seaweed, db_engine, table: str, keys: list[str]):
    """``bucket`` holding ``keys`` (10 copies of its name each), the first referenced from ``table``."""
    client = seaweed.client()
    with db_engine.begin() as connection:
        connection.execute(sa.text(f"CREATE TABLE {table} (k text)"))
        connection.execute(sa.text(f"INSERT INTO {table} VALUES (:k)"), {"k": keys[0]})
    for key in keys:
        put(client, bucket, key, key.encode() * 10)
    return bucket, client


def test_a_quarantine_prefix_over_existing_data_is_refused_before_anything_moves(
        harness_factory, make_bucket, seaweed, db_engine):
    bucket, client = _bucket_with_refs(make_bucket("qover"), seaweed, db_engine, "refs_over",
                                       ["data/kept.npy", "a.npy"])
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source("SELECT k FROM refs_over")],
                                        "quarantine": {"prefix": "data/", "keep_days": 1}}})
    wait_until_old(client, bucket)
    harness.scan(bucket)
    result = harness.delete(raise_on_error=False, dry_run=False, allow_mass_delete=True)
    assert not result.success
    assert "holds 1+ objects no move put there (first: 'data/kept.npy')" in str(
        result.failure_data_for_node("delete_orphans"))
    assert listed_keys(client, bucket) == {"data/kept.npy", "a.npy"}


def test_a_move_that_died_between_copy_and_delete_does_not_block_the_next_cleanup(
        harness_factory, make_bucket, seaweed, db_engine):
    bucket, client = _bucket_with_refs(make_bucket("qdead"), seaweed, db_engine, "refs_dead",
                                       ["kept.npy", "a.npy", "b.npy"])
    # A run copied a.npy to its folder and died before the delete: its row is pending, its copy in place.
    stat = client.stat_object(bucket, "a.npy")
    client.copy_object(bucket, "q/dead-run/a.npy", CopySource(bucket, "a.npy"))
    AuditLog(db_engine).record_intent(
        run_id="dead-run", job="delete_orphans_job", bucket=bucket, at=utc_now(),
        candidates=[Candidate("a.npy", stat.size, stat.last_modified, stat.etag)],
        quarantine=lambda key: (bucket, f"q/dead-run/{key}"))
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source("SELECT k FROM refs_dead")],
                                        "quarantine": {"prefix": "q/", "keep_days": 30}}})
    wait_until_old(client, bucket)
    harness.scan(bucket)
    cleanup = harness.delete(raise_on_error=False, dry_run=False, allow_mass_delete=True)
    assert cleanup.success, cleanup.failure_data_for_node("delete_orphans")
    assert harness.metadata("orphan_deletions", bucket)["deleted_count"] == 2
    folder = _folder(harness, cleanup)
    assert listed_keys(client, bucket) == {"kept.npy", f"q/{folder}/a.npy", f"q/{folder}/b.npy"}
