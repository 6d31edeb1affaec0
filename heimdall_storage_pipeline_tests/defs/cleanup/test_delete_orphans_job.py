"""delete_orphans_job and purge_dataset_job through Dagster, on the real servers."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

import dagster as dg
import pyarrow.compute as pc
import pytest
import sqlalchemy as sa

from heimdall_storage_pipeline.core import deletion
from heimdall_storage_pipeline.core.audit import AuditLog
from heimdall_storage_pipeline.core.clock import utc_now
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.local.heimdall_db import SYNTHETIC_BUCKET
from heimdall_storage_pipeline_tests.cleanup_support import listed_keys, put
from heimdall_storage_pipeline_tests.conftest import key_source

MIN_AGE_SECONDS = 1


def wait_until_old(client, bucket: str) -> None:
    """Let real time pass the minimum age: the job re-validates with the real clock."""
    newest = max(o.last_modified for o in client.list_objects(bucket, recursive=True))
    remaining = (newest + timedelta(seconds=MIN_AGE_SECONDS + 1) - utc_now()).total_seconds()
    if remaining > 0:
        time.sleep(remaining)


@pytest.fixture
def world(harness_factory, make_bucket, seaweed, db_engine):
    """A bucket with 6 referenced objects and 4 orphans, scanned."""
    bucket = make_bucket("job")
    client = seaweed.client()
    with db_engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE refs (k text)"))
        for i in range(6):
            connection.execute(sa.text("INSERT INTO refs VALUES (:k)"), {"k": f"kept/{i}.npy"})
    for i in range(6):
        put(client, bucket, f"kept/{i}.npy")
    orphans = [f"gone/{i}.npy" for i in range(4)]
    for key in orphans:
        put(client, bucket, key)
    harness = harness_factory({bucket: {"min_age": f"{MIN_AGE_SECONDS}s", "batch_size": 3,
                                        "references": [key_source("SELECT k FROM refs")]}})
    wait_until_old(client, bucket)
    harness.scan(bucket)
    return harness, bucket, client, orphans


def _audit_keys(harness, bucket: str) -> list[str]:
    engine = sa.create_engine(harness.database_url)
    try:
        return sorted(AuditLog(engine).deleted_keys(bucket))
    finally:
        engine.dispose()


def test_default_config_is_a_dry_run_with_a_full_manifest(world):
    harness, bucket, client, orphans = world
    before = listed_keys(client, bucket)
    harness.delete()
    assert listed_keys(client, bucket) == before
    meta = harness.metadata("orphan_deletions", bucket)
    assert meta["dry_run"] is True and meta["would_delete_count"] == 4 and meta["deleted_count"] == 0
    manifest = ManifestStore(str(harness.resources["manifests"].root)).read_table(meta["manifest_uri"])
    assert sorted(manifest.column("key").to_pylist()) == sorted(orphans)
    assert set(manifest.column("outcome").to_pylist()) == {"would_delete"}
    assert _audit_keys(harness, bucket) == []


def test_live_run_deletes_the_dry_run_set_and_audits_it(world):
    harness, bucket, client, orphans = world
    harness.delete()
    dry = harness.metadata("orphan_deletions", bucket)
    store = ManifestStore(str(harness.resources["manifests"].root))
    would = set(store.read_table(dry["manifest_uri"]).column("key").to_pylist())
    assert would == set(orphans)
    harness.delete(dry_run=False)
    live = harness.metadata("orphan_deletions", bucket)
    assert live["dry_run"] is False and live["deleted_count"] == 4 and live["deleted_bytes"] > 0
    assert live["guards_overridden"] == [] and live["batches"] == 2
    assert not would & listed_keys(client, bucket)
    assert _audit_keys(harness, bucket) == sorted(would)
    table = store.read_table(live["manifest_uri"])
    assert set(table.filter(pc.equal(table.column("outcome"), "deleted")).column("key").to_pylist()) == would


def test_max_objects_caps_the_candidates(world):
    harness, bucket, client, _ = world
    harness.delete(dry_run=False, max_objects=1, batch_size=1)
    meta = harness.metadata("orphan_deletions", bucket)
    assert meta["candidates"] == 1 and meta["deleted_count"] == 1
    assert len(listed_keys(client, bucket)) == 9


def test_conditional_deletes_keep_an_object_rewritten_after_its_check(world, monkeypatch):
    harness, bucket, client, orphans = world
    real_delete_batch = deletion.delete_batch

    def rewrite_then_delete(*args: object, **kwargs: object) -> dict[str, deletion.DeleteError]:
        put(client, bucket, orphans[0], b"rewritten after the check")
        return real_delete_batch(*args, **kwargs)

    monkeypatch.setattr(deletion, "delete_batch", rewrite_then_delete)
    harness.delete(dry_run=False, conditional_deletes=True)
    meta = harness.metadata("orphan_deletions", bucket)
    assert meta["skipped_changed"] == 1 and meta["deleted_count"] == 3 and meta["failed_count"] == 0
    assert orphans[0] in listed_keys(client, bucket)


def test_missing_diff_is_refused_for_that_bucket(harness_factory, make_bucket):
    bucket = make_bucket("nodiff")
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source("SELECT 'x'")]}})
    result = harness.delete(raise_on_error=False, dry_run=False)
    assert not result.success
    failure = _failure_text(result)
    assert "no orphan_diff" in failure and "storage_scan_job" in failure


def test_stale_diff_is_refused_and_nothing_deleted(world):
    harness, bucket, client, _ = world
    before = listed_keys(client, bucket)
    diff = harness.metadata("orphan_diff", bucket)
    listed_at = dg.MetadataValue.text("2020-01-01T00:00:00Z")
    # A diff whose listing is years old, recorded like any other materialization.
    harness.instance.report_runless_asset_event(dg.AssetMaterialization(
        "orphan_diff", partition=bucket,
        metadata={**{k: v for k, v in diff.items() if not isinstance(v, dict | list)},
                  "inventory_listed_at": listed_at, "references_snapshot_at": listed_at},
    ))
    result = harness.delete(raise_on_error=False, dry_run=False)
    assert not result.success and "max_diff_age_minutes" in _failure_text(result)
    assert listed_keys(client, bucket) == before


@pytest.mark.parametrize(
    ("config", "problem"),
    [({"batch_size": 0}, "batch_size"), ({"batch_size": 5000}, "batch_size"),
     ({"max_objects": -1}, "max_objects"), ({"max_delete_fraction": -0.5}, "max_delete_fraction")],
)
def test_bad_config_is_rejected_before_any_io(harness_factory, make_bucket, config, problem):
    bucket = make_bucket("cfg")
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source("SELECT 'x'")]}})
    with pytest.raises(Exception) as raised:
        harness.delete(**config)
    assert problem in str(raised.value)
    assert harness.instance.fetch_materializations(dg.AssetKey("orphan_deletions"), limit=1).records == []


def test_unknown_bucket_is_rejected_naming_the_known_ones(harness_factory, make_bucket):
    bucket = make_bucket("known")
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source("SELECT 'x'")]}})
    result = harness.delete(raise_on_error=False, buckets=["no-such-bucket"])
    assert not result.success
    assert "no-such-bucket" in _failure_text(result) and bucket in _failure_text(result)


def _failure_text(result: dg.ExecuteInProcessResult) -> str:
    texts = []
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            texts.append(error.message if error else "")
            user = event.step_failure_data.user_failure_data
            if user is not None:
                texts.append(user.description or "")
                texts.append(json.dumps({k: str(v.value) for k, v in user.metadata.items()}))
    return "\n".join(texts)


@pytest.fixture
def heimdall_world(harness_factory, seaweed, db_engine):
    """The shipped synthetic-IQ reference source against Heimdall's schema."""
    from heimdall_storage_pipeline.core.policy import load_policy

    client = seaweed.client()
    if not client.bucket_exists(SYNTHETIC_BUCKET):
        client.make_bucket(SYNTHETIC_BUCKET)
    source = load_policy().bucket(SYNTHETIC_BUCKET).references[0]
    harness = harness_factory({SYNTHETIC_BUCKET: {"min_age_days": 30, "references": [
        {"name": source.name, "query": source.query, "format": "key", "container": "json"}]}})
    datasets = {}
    with db_engine.begin() as connection:
        for label in ("purged", "kept"):
            dataset_id = uuid.uuid4()
            connection.execute(sa.text("INSERT INTO heimdall.synthetic_datasets (id, name, dataset_type) "
                                       "VALUES (:id, :n, 'iq_raw')"), {"id": dataset_id, "n": label})
            for sample in range(3):
                key = f"synthetic/{dataset_id}/{sample}/RX_001.npy"
                put(client, SYNTHETIC_BUCKET, key)
                connection.execute(sa.text("INSERT INTO heimdall.synthetic_iq_samples (dataset_id, "
                                           "sample_idx, iq_storage_paths) VALUES (:d, :i, :p)"),
                                   {"d": dataset_id, "i": sample, "p": json.dumps({"RX_001": key})})
            datasets[label] = str(dataset_id)
    legacy = f"synthetic/dataset-{datasets['purged']}/9/RX_002.npy"
    put(client, SYNTHETIC_BUCKET, legacy)
    return harness, client, datasets, legacy


def _prefix_keys(client, dataset_id: str) -> set[str]:
    return {o.object_name for prefix in (f"synthetic/{dataset_id}/", f"synthetic/dataset-{dataset_id}/")
            for o in client.list_objects(SYNTHETIC_BUCKET, prefix=prefix, recursive=True)}


def test_purge_dry_run_then_live_and_unknown_id(heimdall_world, db_engine):
    harness, client, datasets, legacy = heimdall_world
    purged, kept = datasets["purged"], datasets["kept"]
    doomed = _prefix_keys(client, purged)
    assert legacy in doomed and len(doomed) == 4

    harness.purge(purged)  # dry run
    meta = harness.metadata("orphan_deletions", SYNTHETIC_BUCKET)
    assert meta["dry_run"] is True and meta["would_delete_count"] == 4 and meta["sample_rows"] == 3
    assert _prefix_keys(client, purged) == doomed
    with db_engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM heimdall.synthetic_iq_samples "
                                          "WHERE dataset_id = :d"), {"d": purged}).scalar() == 3

    harness.purge(purged, dry_run=False)
    meta = harness.metadata("orphan_deletions", SYNTHETIC_BUCKET)
    assert meta["deleted_count"] == 4 and meta["failed_count"] == 0
    assert _prefix_keys(client, purged) == set()
    assert len(_prefix_keys(client, kept)) == 3  # the other dataset is untouched
    with db_engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM heimdall.synthetic_datasets "
                                          "WHERE id = :d"), {"d": purged}).scalar() == 0
    assert _audit_keys(harness, SYNTHETIC_BUCKET) == sorted(doomed)

    missing = str(uuid.uuid4())
    result = harness.purge(missing, dry_run=False, raise_on_error=False)
    assert not result.success and f"no synthetic dataset with id {missing}" in _failure_text(result)
    assert harness.purge("not-a-uuid", raise_on_error=False).success is False
