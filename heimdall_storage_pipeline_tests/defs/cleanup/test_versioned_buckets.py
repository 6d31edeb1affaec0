"""Versioned buckets through the scan and delete_orphans_job: figures, the policy note, the noncurrent pass."""

from __future__ import annotations

import time
from datetime import timedelta

import sqlalchemy as sa
from minio.commonconfig import ENABLED
from minio.versioningconfig import VersioningConfig

from heimdall_storage_pipeline.core.clock import utc_now
from heimdall_storage_pipeline.defs.automation.checks import orphan_ratio_result
from heimdall_storage_pipeline_tests.conftest import key_source
from heimdall_storage_pipeline_tests.core.test_versions import figures, put, server_versions


def _world(harness_factory, make_bucket, seaweed, db_engine, **settings):
    bucket = make_bucket("vjob")
    client = seaweed.client()
    client.set_bucket_versioning(bucket, VersioningConfig(ENABLED))
    with db_engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE refs (k text)"))
        connection.execute(sa.text("INSERT INTO refs VALUES ('kept.npy')"))
    for size in (4, 5, 6):
        put(client, bucket, "kept.npy", size)
    for size in (10, 20):
        put(client, bucket, "orphan.npy", size)
    put(client, bucket, "dead.npy", 7)
    client.remove_object(bucket, "dead.npy")
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source("SELECT k FROM refs")],
                                        **settings}})
    # The job measures ages with the real clock: let two seconds pass the newest version.
    newest = max(v.last_modified for v in client.list_objects(bucket, include_version=True, recursive=True))
    while utc_now() < newest + timedelta(seconds=2):
        time.sleep(0.2)
    return harness, bucket, client


def test_scan_figures_match_the_servers_version_listing_and_health_counts_them(
        harness_factory, make_bucket, seaweed, db_engine):
    harness, bucket, client = _world(harness_factory, make_bucket, seaweed, db_engine)
    diff = harness.scan(bucket)
    inventory = harness.metadata("bucket_inventory", bucket)
    expected = figures(server_versions(client, bucket))
    assert expected == {"noncurrent_versions": 4, "noncurrent_bytes": 4 + 5 + 10 + 7, "delete_markers": 1}
    for metadata in (inventory, diff):
        assert metadata["versioning"] == "Enabled"
        assert {name: metadata[name] for name in expected} == expected
    assert (diff["object_count"], diff["total_bytes"], diff["orphan_bytes"]) == (2, 6 + 20, 20)
    # Health over every byte on disk: (20 + 26) / (26 + 26) wasted, where current objects alone say 20 / 26.
    assert diff["health_status"] == "critical"


def test_without_noncurrent_min_age_only_orphans_go_and_the_run_says_what_to_set(
        harness_factory, make_bucket, seaweed, db_engine):
    harness, bucket, client = _world(harness_factory, make_bucket, seaweed, db_engine)
    harness.scan(bucket)
    before = server_versions(client, bucket)
    harness.delete(dry_run=False, allow_mass_delete=True)
    meta = harness.metadata("orphan_deletions", bucket)
    assert (meta["deleted_count"], meta["deleted_bytes"]) == (1, 30)
    assert "Set 'noncurrent_min_age'" in meta["versioning_note"] and bucket in meta["versioning_note"]
    assert server_versions(client, bucket) == [v for v in before if v[0] != "orphan.npy"]


def test_with_noncurrent_min_age_the_bucket_keeps_only_current_referenced_versions(
        harness_factory, make_bucket, seaweed, db_engine):
    harness, bucket, client = _world(harness_factory, make_bucket, seaweed, db_engine, noncurrent_min_age="1s")
    before = figures(server_versions(client, bucket))
    harness.scan(bucket)
    harness.delete()  # a dry run removes nothing
    dry = harness.metadata("orphan_deletions", bucket)
    assert figures(server_versions(client, bucket)) == before
    harness.delete(dry_run=False, allow_mass_delete=True)
    meta = harness.metadata("orphan_deletions", bucket)
    assert server_versions(client, bucket) == [v for v in server_versions(client, bucket) if v[0] == "kept.npy"]
    assert [(v[0], v[2], v[4]) for v in server_versions(client, bucket)] == [("kept.npy", True, 6)]
    assert (meta["noncurrent_versions_removed"], meta["noncurrent_bytes_removed"], meta["delete_markers_removed"]) \
        == (dry["noncurrent_versions_removed"], dry["noncurrent_bytes_removed"], dry["delete_markers_removed"]) \
        == (3, 4 + 5 + 7, 1)
    # Orphan versions (30 bytes) plus the noncurrent pass: every byte the scan counted as waste is gone.
    assert meta["deleted_bytes"] + meta["noncurrent_bytes_removed"] == 30 + 16
    after = harness.scan(bucket)
    assert {name: after[name] for name in before} == figures(server_versions(client, bucket)) == {
        "noncurrent_versions": 0, "noncurrent_bytes": 0, "delete_markers": 0}



def test_the_health_check_names_the_share_with_noncurrent_versions(harness_factory, make_bucket, seaweed, db_engine):
    harness, bucket, _ = _world(harness_factory, make_bucket, seaweed, db_engine)
    result = orphan_ratio_result(harness.scan(bucket))
    assert result.description == "76.9 % of the bytes are orphaned, 88.5 % with noncurrent versions: critical"
