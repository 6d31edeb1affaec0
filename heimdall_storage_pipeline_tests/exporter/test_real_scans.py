"""The exporter after real scans and a real cleanup: every figure equals the materializations."""

from __future__ import annotations

import json

import sqlalchemy as sa

from heimdall_storage_pipeline.exporter.collector import render_metrics
from heimdall_storage_pipeline.exporter.state import collect_storage_snapshot
from heimdall_storage_pipeline_tests.cleanup_support import put
from heimdall_storage_pipeline_tests.conftest import key_source
from heimdall_storage_pipeline_tests.defs.cleanup.test_delete_orphans_job import wait_until_old
from heimdall_storage_pipeline_tests.exporter.support import parse_metrics, sample

GIB = 1024**3


def test_metrics_and_json_equal_real_scan_and_cleanup_metadata(harness_factory, make_bucket, seaweed, db_engine):
    scanned, never_scanned = make_bucket("exp"), make_bucket("never")
    client = seaweed.client()
    with db_engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE refs (k text)"))
        connection.execute(sa.text("INSERT INTO refs VALUES ('a/1.npy'), ('a/2.npy'), ('a/3.npy'), ('gone.npy')"))
    for key, body in (("a/1.npy", b"x" * 100), ("a/2.npy", b"x" * 100), ("a/3.npy", b"x" * 100),
                      ("b/1.npy", b"y" * 40)):
        put(client, scanned, key, body)
    harness = harness_factory({
        name: {"min_age": "1s", "references": [key_source("SELECT k FROM refs")]}
        for name in (scanned, never_scanned)
    })
    wait_until_old(client, scanned)
    diff = harness.scan(scanned)
    harness.delete(buckets=[scanned], dry_run=False)
    inventory = harness.metadata("bucket_inventory", scanned)
    deletions = harness.metadata("orphan_deletions", scanned)
    assert deletions["deleted_count"] == 1 and deletions["deleted_bytes"] == 40

    snapshot = collect_storage_snapshot(harness.instance, buckets=[scanned, never_scanned])
    metrics = parse_metrics(render_metrics(snapshot).decode())

    def value(name: str, bucket: str = scanned, **labels: str) -> float:
        return metrics[sample(name, bucket=bucket, **labels)]

    assert value("heimdall_storage_total_objects") == inventory["object_count"] == 4
    assert value("heimdall_storage_bucket_size_gb") == inventory["total_bytes"] / GIB
    assert value("heimdall_storage_referenced_objects") == diff["referenced_count"] == 4
    assert value("heimdall_storage_orphan_files") == diff["orphan_count"] == 1
    assert value("heimdall_storage_orphan_size_gb") == diff["orphan_bytes"] / GIB
    assert value("heimdall_storage_dangling_references") == diff["dangling_reference_count"] == 1
    assert value("heimdall_storage_health_status", status=diff["health_status"]) == 1
    assert value("heimdall_storage_last_cleanup_deleted_files") == deletions["deleted_count"]
    assert value("heimdall_storage_deleted_bytes_total") == deletions["deleted_bytes"]
    # Never scanned: unknown, and no figure that could be mistaken for an empty bucket.
    assert value("heimdall_storage_health_status", never_scanned, status="unknown") == 1
    assert sample("heimdall_storage_total_objects", bucket=never_scanned) not in metrics

    body = json.loads(json.dumps(snapshot.to_json()))
    bucket = body["buckets"][scanned]
    assert bucket["orphans"] == diff["orphan_count"] and bucket["status"] == diff["health_status"]
    assert bucket["total_objects"] == inventory["object_count"] and bucket["data_age_seconds"] >= 0
    assert body["total_orphans"] == diff["orphan_count"]
    assert body["buckets"][never_scanned]["status"] == "unknown"
    assert {"status", "total_size_gb", "total_orphans", "orphan_size_gb", "orphan_percentage", "as_of"} <= set(body)
