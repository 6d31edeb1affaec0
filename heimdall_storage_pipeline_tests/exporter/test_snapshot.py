"""The snapshot and its metrics against a real (SQLite-backed) Dagster instance."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from heimdall_storage_pipeline.exporter.collector import (
    InstanceProvider,
    SnapshotSource,
    describe_failure,
    render_metrics,
)
from heimdall_storage_pipeline.exporter.state import (
    ORPHAN_DIFF,
    InstanceHistory,
    collect_storage_snapshot,
)
from heimdall_storage_pipeline_tests.exporter.support import (
    GIB,
    PG_PASSWORD,
    parse_metrics,
    postgres_url,
    record_cleanup,
    record_scan,
    sample,
)

CONTRACT_METRICS = (
    "heimdall_storage_disk_usage_gb",
    "heimdall_storage_bucket_size_gb",
    "heimdall_storage_orphan_files",
    "heimdall_storage_orphan_size_gb",
    "heimdall_storage_total_objects",
    "heimdall_storage_referenced_objects",
)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def test_every_metric_equals_the_latest_materialization(instance: dg.DagsterInstance) -> None:
    # An older scan whose figures must not show.
    record_scan(instance, "bucket-a", objects=1, total_bytes=1, orphans=0, orphan_bytes=0)
    scan = record_scan(
        instance,
        "bucket-a",
        objects=1000,
        total_bytes=120 * GIB,
        orphans=300,
        orphan_bytes=36 * GIB,
        eligible=200,
        eligible_bytes=30 * GIB,
        young=100,
        dangling=4,
        unparseable=7,
    )
    record_cleanup(instance, "bucket-a", deleted=5, deleted_bytes=500, dry_run=True)
    record_cleanup(
        instance,
        "bucket-a",
        deleted=150,
        deleted_bytes=20 * GIB,
        failed=2,
        skipped={"referenced": 1, "young": 3},
    )
    snapshot = collect_storage_snapshot(instance)
    metrics = parse_metrics(render_metrics(snapshot).decode())
    inventory, references, diff = (
        scan["bucket_inventory"],
        scan["referenced_keys"],
        scan["orphan_diff"],
    )

    def value(name: str, **labels: str) -> float:
        return metrics[sample(name, bucket="bucket-a", **labels)]

    assert value("heimdall_storage_disk_usage_gb") == inventory["total_bytes"] / GIB == 120
    assert value("heimdall_storage_bucket_size_gb") == inventory["total_bytes"] / GIB
    assert value("heimdall_storage_total_objects") == inventory["object_count"] == 1000
    assert value("heimdall_storage_referenced_objects") == diff["referenced_count"] == 700
    assert value("heimdall_storage_orphan_files") == diff["orphan_count"] == 300
    assert value("heimdall_storage_orphan_size_gb") == diff["orphan_bytes"] / GIB == 36
    assert value("heimdall_storage_orphan_share_ratio") == pytest.approx(0.3)
    assert value("heimdall_storage_orphan_share_ratio") == diff["orphan_share_bytes"]
    assert diff["health_status"] == "critical"
    assert value("heimdall_storage_health_status", status="critical") == 1
    for other in ("healthy", "warning", "unknown"):
        assert value("heimdall_storage_health_status", status=other) == 0
    assert value("heimdall_storage_eligible_orphan_files") == diff["eligible_orphan_count"]
    assert value("heimdall_storage_eligible_orphan_bytes") == diff["eligible_orphan_bytes"]
    assert value("heimdall_storage_young_orphan_files") == diff["young_orphan_count"] == 100
    assert value("heimdall_storage_dangling_references") == diff["dangling_reference_count"]
    assert value("heimdall_storage_unparseable_references") == 7
    assert references["unparseable_reference_count"] == 7

    latest_diff = instance.fetch_materializations(ORPHAN_DIFF, limit=1).records[0]
    assert value("heimdall_storage_last_scan_timestamp_seconds") == latest_diff.timestamp
    cleanup = instance.fetch_materializations(dg.AssetKey("orphan_deletions"), limit=1).records[0]
    assert value("heimdall_storage_last_cleanup_timestamp_seconds") == cleanup.timestamp
    assert value("heimdall_storage_last_cleanup_dry_run") == 0
    assert value("heimdall_storage_last_cleanup_deleted_files") == 150
    assert value("heimdall_storage_last_cleanup_deleted_bytes") == 20 * GIB
    assert value("heimdall_storage_last_cleanup_failed_files") == 2
    assert value("heimdall_storage_last_cleanup_skipped_files", reason="referenced") == 1
    assert value("heimdall_storage_last_cleanup_skipped_files", reason="young") == 3
    assert value("heimdall_storage_last_cleanup_skipped_files", reason="missing") == 0
    # The dry run deleted nothing, so only the real run counts.
    assert value("heimdall_storage_deleted_files_total") == 150
    assert value("heimdall_storage_deleted_bytes_total") == 20 * GIB


def test_labels_carry_no_object_keys(instance: dg.DagsterInstance) -> None:
    record_scan(instance, "bucket-a", objects=10, total_bytes=100, orphans=1, orphan_bytes=1, dangling=1)
    text = render_metrics(collect_storage_snapshot(instance)).decode()
    assert "synthetic/gone.npy" not in text and "not a key" not in text
    labels = {key for (_, pairs) in parse_metrics(text) for key, _ in pairs}
    assert labels <= {"bucket", "status", "reason", "job"}


def test_never_scanned_bucket_is_unknown_not_zero(instance: dg.DagsterInstance) -> None:
    record_scan(instance, "bucket-a", objects=10, total_bytes=100, orphans=1, orphan_bytes=1)
    snapshot = collect_storage_snapshot(instance, ["bucket-new"])
    metrics = parse_metrics(render_metrics(snapshot).decode())
    assert snapshot.buckets["bucket-new"].status == "unknown"
    assert metrics[sample("heimdall_storage_health_status", bucket="bucket-new", status="unknown")] == 1
    for name in (*CONTRACT_METRICS, "heimdall_storage_last_scan_timestamp_seconds"):
        assert sample(name, bucket="bucket-new") not in metrics, name
        assert sample(name, bucket="bucket-a") in metrics, name
    storage = snapshot.to_json()["buckets"]["bucket-new"]
    assert storage["status"] == "unknown"
    assert storage["size_gb"] is None and storage["orphans"] is None
    assert storage["data_age_seconds"] is None


def test_listed_but_not_diffed_bucket_has_size_but_unknown_health(
    instance: dg.DagsterInstance,
) -> None:
    record_scan(instance, "bucket-a", objects=10, total_bytes=2 * GIB, orphans=0, orphan_bytes=0)
    inventory = {"object_count": dg.MetadataValue.int(4), "total_bytes": dg.MetadataValue.int(GIB)}
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key="bucket_inventory", partition="bucket-b", metadata=inventory)
    )
    snapshot = collect_storage_snapshot(instance)
    metrics = parse_metrics(render_metrics(snapshot).decode())
    assert metrics[sample("heimdall_storage_bucket_size_gb", bucket="bucket-b")] == 1
    assert sample("heimdall_storage_orphan_files", bucket="bucket-b") not in metrics
    assert snapshot.buckets["bucket-b"].status == "unknown"
    # A bucket nobody can call healthy makes the whole store not healthy either.
    assert snapshot.status == "unknown"


def test_storage_json_contract(instance: dg.DagsterInstance) -> None:
    record_scan(instance, "bucket-a", objects=100, total_bytes=8 * GIB, orphans=10, orphan_bytes=GIB)
    record_scan(instance, "bucket-b", objects=50, total_bytes=2 * GIB, orphans=5, orphan_bytes=GIB)
    now = datetime.now(UTC) + timedelta(minutes=10)
    snapshot = collect_storage_snapshot(instance, ["bucket-new"], clock=lambda: now)
    body = snapshot.to_json()

    # 20 % orphaned overall would be a warning, but the worst bucket (50 %) decides.
    assert snapshot.buckets["bucket-b"].status == "critical"
    assert body["status"] == "critical"
    assert {
        "status",
        "total_size_gb",
        "total_orphans",
        "orphan_size_gb",
        "orphan_percentage",
        "buckets",
        "as_of",
    } <= set(body)
    assert body["as_of"] == now.isoformat().replace("+00:00", "Z")
    assert body["total_size_gb"] == 10
    assert body["total_orphans"] == 15
    assert body["orphan_size_gb"] == 2
    assert body["orphan_percentage"] == pytest.approx(20)
    assert set(body["buckets"]) == {"bucket-a", "bucket-b", "bucket-new"}
    bucket_a = body["buckets"]["bucket-a"]
    assert bucket_a["status"] == "warning"
    assert bucket_a["size_gb"] == 8
    assert bucket_a["orphans"] == 10
    assert bucket_a["orphan_size_gb"] == 1
    assert bucket_a["orphan_percentage"] == pytest.approx(12.5)
    assert bucket_a["as_of"] == "2026-11-01T03:00:00Z"
    scanned_at = (
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=ORPHAN_DIFF, asset_partitions=["bucket-a"]), limit=1
        )
        .records[0]
        .timestamp
    )
    assert bucket_a["data_age_seconds"] == pytest.approx(now.timestamp() - scanned_at)
    assert bucket_a["data_age_seconds"] >= 600


def test_no_bucket_at_all_is_unknown(instance: dg.DagsterInstance) -> None:
    body = collect_storage_snapshot(instance).to_json()
    assert body["status"] == "unknown"
    assert body["buckets"] == {}
    assert body["total_size_gb"] is None and body["orphan_percentage"] is None


def test_deletion_totals_sum_every_real_run_incrementally(instance: dg.DagsterInstance) -> None:
    totals = InstanceHistory()
    record_scan(instance, "bucket-a", objects=10, total_bytes=100, orphans=5, orphan_bytes=50)
    record_cleanup(instance, "bucket-a", deleted=2, deleted_bytes=20)
    record_cleanup(instance, "bucket-a", deleted=9, deleted_bytes=90, dry_run=True)
    assert collect_storage_snapshot(instance, history=totals).buckets["bucket-a"].deleted_files_total == 2
    record_cleanup(instance, "bucket-a", deleted=3, deleted_bytes=30)
    bucket = collect_storage_snapshot(instance, history=totals).buckets["bucket-a"]
    assert (bucket.deleted_files_total, bucket.deleted_bytes_total) == (5, 50)
    # A fresh total over the whole history agrees with the incremental one.
    fresh = collect_storage_snapshot(instance).buckets["bucket-a"]
    assert (fresh.deleted_files_total, fresh.deleted_bytes_total) == (5, 50)


def test_deletion_totals_page_through_long_histories(instance: dg.DagsterInstance) -> None:
    for _ in range(5):
        record_cleanup(instance, "bucket-a", deleted=1, deleted_bytes=10)
    record_cleanup(instance, "bucket-b", deleted=7, deleted_bytes=70)
    totals = InstanceHistory(page_size=2)  # four pages
    totals.refresh(instance)
    assert (totals.files["bucket-a"], totals.bytes["bucket-a"]) == (5, 50)
    assert (totals.files["bucket-b"], totals.bytes["bucket-b"]) == (7, 70)


@dg.op
def _fail() -> None:
    raise RuntimeError("storage unreachable")


@dg.op
def _succeed() -> None:
    return None


def test_failed_runs_are_counted_per_job(instance: dg.DagsterInstance) -> None:
    failing_cleanup = dg.GraphDefinition(name="delete_orphans_job", node_defs=[_fail]).to_job()
    passing_scan = dg.GraphDefinition(name="storage_scan_job", node_defs=[_succeed]).to_job()
    for _ in range(2):
        assert not failing_cleanup.execute_in_process(instance=instance, raise_on_error=False).success
    assert passing_scan.execute_in_process(instance=instance).success
    metrics = parse_metrics(render_metrics(collect_storage_snapshot(instance)).decode())
    assert metrics[sample("heimdall_storage_failed_runs_total", job="delete_orphans_job")] == 2
    assert metrics[sample("heimdall_storage_failed_runs_total", job="storage_scan_job")] == 0
    assert metrics[sample("heimdall_storage_failed_runs_total", job="purge_dataset_job")] == 0


def test_snapshot_source_reuses_a_fresh_snapshot_and_rereads_a_stale_one(
    instance: dg.DagsterInstance,
) -> None:
    ticks = iter([0.0, 1.0, 10.0, 10.0])
    source = SnapshotSource(InstanceProvider(lambda: instance), ttl_seconds=5, monotonic=lambda: next(ticks))
    record_scan(instance, "bucket-a", objects=10, total_bytes=100, orphans=1, orphan_bytes=1)
    first = source.get()
    record_scan(instance, "bucket-a", objects=20, total_bytes=100, orphans=2, orphan_bytes=1)
    assert source.get() is first  # within the cache lifetime
    assert source.get().buckets["bucket-a"].orphan_files == 2  # read again afterwards


def test_failure_descriptions_carry_no_credentials() -> None:
    url = postgres_url("heimdall")
    exc = RuntimeError(
        f"(psycopg2.OperationalError) could not connect to {url} password={PG_PASSWORD}\n[SQL: SELECT 1]"
    )
    reason = describe_failure(exc, secrets=("other-secret",))
    assert PG_PASSWORD not in reason
    assert "postgres:***@127.0.0.1" in reason
    assert "[SQL" not in reason
    assert "other-secret" not in describe_failure(RuntimeError("token other-secret"), ("other-secret",))
