"""storage_history built from real scans and a real cleanup on a real instance, against SeaweedFS and PostgreSQL."""

from __future__ import annotations

import base64
import math
from datetime import UTC, datetime, timedelta

import dagster as dg
import pyarrow as pa
import sqlalchemy as sa

from heimdall_storage_pipeline.core import capacity
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.defs.capacity import HISTORY_SCHEDULE, STORAGE_HISTORY, history_partitions
from heimdall_storage_pipeline_tests.cleanup_support import put
from heimdall_storage_pipeline_tests.conftest import key_source
from heimdall_storage_pipeline_tests.defs.cleanup.test_delete_orphans_job import wait_until_old

CAPACITY = 2_000


def test_a_day_of_history_from_the_scans_and_the_cleanup(harness_factory, make_bucket, seaweed, db_engine):
    bucket = make_bucket("hist")
    client = seaweed.client()
    with db_engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE refs (k text)"))
        connection.execute(sa.text("INSERT INTO refs SELECT 'kept/' || i || '.npy' FROM generate_series(0, 5) i"))
    for i in range(6):
        put(client, bucket, f"kept/{i}.npy")
    for i in range(4):
        put(client, bucket, f"gone/{i}.npy")
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source("SELECT k FROM refs")]}},
                              capacity_bytes=CAPACITY)
    wait_until_old(client, bucket)
    first = harness.scan(bucket)
    harness.delete(dry_run=False)
    deleted = harness.metadata("orphan_deletions", bucket)
    harness.delete()  # a dry run deletes nothing and counts for nothing
    put(client, bucket, "new/orphan.npy")
    last = harness.scan(bucket)
    assert first["orphan_count"] == 4 and last["orphan_count"] == 1

    # Ten earlier days, as a backfill would have written them: 10 bytes stored and 1 orphaned more a day.
    store = ManifestStore(harness.resources["manifests"].root)
    today = datetime.fromtimestamp(
        harness.instance.get_latest_materialization_event(dg.AssetKey("orphan_diff")).timestamp, UTC).date()
    for back in range(10, 0, -1):
        day = today - timedelta(days=back)
        store.write_table(store.history_uri(day), pa.Table.from_pylist([{
            "day": day, "bucket": bucket, "object_count": 10, "total_bytes": last["total_bytes"] - 10 * back,
            "orphan_bytes": last["orphan_bytes"] - back, "deleted_bytes": 0}], schema=capacity.HISTORY_SCHEMA))

    job = harness.defs.resolve_job_def("storage_history_job")
    assert job.execute_in_process(partition_key=today.isoformat(), instance=harness.instance).success

    rows = store.read_history(capacity.HISTORY_SCHEMA).to_pylist()
    assert len(rows) == 11
    row = rows[-1]
    assert row["day"] == today and row["bucket"] == bucket
    assert (row["total_bytes"], row["object_count"]) == (last["total_bytes"], last["object_count"])
    assert (row["orphan_bytes"], row["eligible_bytes"]) == (last["orphan_bytes"], last["eligible_orphan_bytes"])
    assert row["deleted_bytes"] == deleted["deleted_bytes"] > 0 and row["noncurrent_bytes"] is None

    meta = harness.metadata(STORAGE_HISTORY, today.isoformat())
    assert meta["buckets"] == 1 and meta["dagster/row_count"] == 1 and meta["total_bytes"] == last["total_bytes"]
    # Yesterday -> today the gross stored bytes grew by 10 plus what was deleted.
    assert meta["growth_bytes_per_day_7d"] == round((7 * 10 + deleted["deleted_bytes"]) / 7, 1)
    assert meta["capacity_bytes"] == CAPACITY
    free = CAPACITY - last["total_bytes"]
    assert meta["free_bytes"] == free
    assert math.isclose(meta["days_until_full"], free / meta["growth_bytes_per_day_30d"], rel_tol=1e-3)
    assert meta["days_until_full_earliest"] <= meta["days_until_full"] <= meta["days_until_full_latest"]
    assert meta["forecast"].startswith("full in ")
    trends = {record.data["bucket"]: record.data for record in meta["trends"].records}
    assert set(trends) == {bucket, "total"} and trends[bucket]["stored_bytes"] == last["total_bytes"]
    png = base64.b64decode(meta["chart"].split("base64,", 1)[1].rstrip(")"))
    assert png.startswith(b"\x89PNG")

    # A day with no scans recorded: backfilled as an empty day, the forecast unchanged in kind.
    earlier = (today - timedelta(days=20)).isoformat()
    assert job.execute_in_process(partition_key=earlier, instance=harness.instance).success
    assert harness.metadata(STORAGE_HISTORY, earlier)["buckets"] == 0


def test_the_schedule_records_the_day_that_just_ended(harness_factory, make_bucket):
    harness = harness_factory({make_bucket("sched"): {"min_age": "1s", "references": [key_source("SELECT 'x'")]}})
    schedule = harness.defs.resolve_schedule_def(HISTORY_SCHEDULE)
    tick = datetime(2026, 12, 5, 0, 15, tzinfo=UTC)
    request = schedule(dg.build_schedule_context(instance=harness.instance, scheduled_execution_time=tick))
    assert request.partition_key == "2026-12-04"
    assert {"2026-12-04", "2026-12-05"} <= set(history_partitions.get_partition_keys(current_time=tick))
