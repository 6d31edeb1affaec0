"""Versioned-bucket and quarantine figures: metadata in, gauges and /metrics/storage out."""

from __future__ import annotations

import dagster as dg

from heimdall_storage_pipeline.exporter.collector import render_metrics
from heimdall_storage_pipeline.exporter.state import GIB, collect_storage_snapshot
from heimdall_storage_pipeline_tests.exporter.support import (
    parse_metrics,
    record,
    record_cleanup,
    record_scan,
    sample,
)


def test_noncurrent_and_quarantine_figures_are_exported_and_unknown_ones_left_out() -> None:
    with dg.instance_for_test() as instance:
        record_scan(instance, "versioned", objects=2, total_bytes=GIB, orphans=1, orphan_bytes=GIB // 2)
        record_scan(instance, "plain", objects=1, total_bytes=GIB, orphans=0, orphan_bytes=0)
        record(instance, "bucket_inventory", "versioned", {
            "object_count": dg.MetadataValue.int(2), "total_bytes": dg.MetadataValue.int(GIB),
            "listed_at": dg.MetadataValue.text("2026-11-01T03:00:00Z"), "versioning": dg.MetadataValue.text("Enabled"),
            "noncurrent_versions": dg.MetadataValue.int(7), "noncurrent_bytes": dg.MetadataValue.int(3 * GIB),
            "delete_markers": dg.MetadataValue.int(2),
        })
        record_cleanup(instance, "plain", deleted=0, deleted_bytes=0)
        record(instance, "orphan_deletions", "versioned", {
            "dry_run": dg.MetadataValue.bool(False), "deleted_count": dg.MetadataValue.int(1),
            "deleted_bytes": dg.MetadataValue.int(GIB // 2), "quarantined_objects": dg.MetadataValue.int(4),
            "quarantined_bytes": dg.MetadataValue.int(GIB), "quarantine_oldest": dg.MetadataValue.timestamp(1.8e9),
        })
        snapshot = collect_storage_snapshot(instance)
    metrics = parse_metrics(render_metrics(snapshot).decode())
    assert metrics[sample("heimdall_storage_noncurrent_bytes", bucket="versioned")] == 3 * GIB
    assert metrics[sample("heimdall_storage_noncurrent_versions", bucket="versioned")] == 7
    assert metrics[sample("heimdall_storage_delete_markers", bucket="versioned")] == 2
    assert metrics[sample("heimdall_storage_disk_usage_gb", bucket="versioned")] == 4.0  # every byte on disk
    assert metrics[sample("heimdall_storage_disk_usage_gb", bucket="plain")] == 1.0
    assert metrics[sample("heimdall_storage_quarantined_objects", bucket="versioned")] == 4
    assert metrics[sample("heimdall_storage_quarantined_bytes", bucket="versioned")] == GIB
    assert metrics[sample("heimdall_storage_quarantine_oldest_timestamp_seconds", bucket="versioned")] == 1.8e9
    # A bucket without versioning or quarantine figures has no such samples, never zeros.
    assert sample("heimdall_storage_noncurrent_bytes", bucket="plain") not in metrics
    assert sample("heimdall_storage_quarantined_bytes", bucket="plain") not in metrics
    versioned = snapshot.to_json()["buckets"]["versioned"]
    assert (versioned["noncurrent_versions"], versioned["noncurrent_size_gb"], versioned["delete_markers"]) == (7, 3, 2)
    assert (versioned["quarantined_objects"], versioned["quarantined_size_gb"]) == (4, 1)
    assert versioned["quarantine_oldest_at"].startswith("2027-01-15")
