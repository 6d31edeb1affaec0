"""storage_history: each day's figures per bucket as a Parquet table, and the growth and forecast computed from it.

The day's rows come from the latest bucket_inventory and orphan_diff of each bucket recorded that day
(UTC) and the bytes its live cleanups deleted, read through public DagsterInstance methods, so any
past day that the event log still holds can be backfilled.
"""

import base64
import math
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import dagster as dg
import pyarrow as pa

from heimdall_storage_pipeline.core import capacity
from heimdall_storage_pipeline.core.units import format_bytes
from heimdall_storage_pipeline.defs import metadata as md
from heimdall_storage_pipeline.defs.automation.settings import default_status
from heimdall_storage_pipeline.defs.materializations import ORPHAN_DELETIONS
from heimdall_storage_pipeline.defs.resources import ManifestStoreResource, StoragePolicyResource

STORAGE_HISTORY = "storage_history"
HISTORY_START = "2026-01-01"  # the first day a backfill can reach
HISTORY_SCHEDULE = "daily_storage_history"
history_partitions = dg.DailyPartitionsDefinition(start_date=HISTORY_START, end_offset=1)  # today too
_TRENDS_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("bucket", "string"),
    dg.TableColumn("stored", "string", description="binary units"),
    dg.TableColumn("stored_bytes", "int"),
    dg.TableColumn("orphan_bytes", "int"),
    *(dg.TableColumn(name, "float", description="bytes per day") for name in capacity.RATES),
    dg.TableColumn("leak", "bool", description="7-day orphan inflow above twice its norm"),
])


def _day_filter(asset: str, day: date, buckets: list[str] | None = None) -> dg.AssetRecordsFilter:
    start = datetime.combine(day, time(), UTC).timestamp()
    return dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=buckets, after_timestamp=start,
                                 before_timestamp=start + 86400)


def _records(instance: dg.DagsterInstance, asset: str, day: date) -> Iterator[dg.EventLogRecord]:
    """Every materialization of ``asset`` recorded on ``day`` (UTC), oldest first."""
    cursor = None
    while True:
        page = instance.fetch_materializations(_day_filter(asset, day), limit=1000, cursor=cursor, ascending=True)
        yield from page.records
        if not page.has_more:
            return
        cursor = page.cursor


def _latest(
    instance: dg.DagsterInstance, asset: str, day: date, buckets: Iterable[str]
) -> dict[str, tuple[float, dict[str, Any]]]:
    """Per bucket: when its latest materialization of the day was recorded, and its metadata values.

    One read per bucket, of one event: a day holds 24 hourly scans of each.
    """
    found = {}
    for bucket in sorted(buckets):
        records = instance.fetch_materializations(_day_filter(asset, day, [bucket]), limit=1).records
        event = records[0].asset_materialization if records else None
        if event is not None:
            found[bucket] = (records[0].timestamp, {key: value.value for key, value in event.metadata.items()})
    return found


def day_rows(instance: dg.DagsterInstance, day: date, buckets: Iterable[str]) -> list[dict[str, Any]]:
    """One row per bucket of ``buckets`` scanned on ``day``: the diff's figures (the listing's without a diff)."""
    inventories = _latest(instance, "bucket_inventory", day, buckets)
    diffs = _latest(instance, "orphan_diff", day, buckets)
    deleted: dict[str, int] = {}
    for record in _records(instance, ORPHAN_DELETIONS, day):
        event = record.asset_materialization
        values = {key: value.value for key, value in event.metadata.items()} if event else {}
        if event and event.partition and values.get("dry_run") is False:  # a dry run deleted nothing
            deleted[event.partition] = deleted.get(event.partition, 0) + int(values.get("deleted_bytes") or 0)
    rows = []
    for bucket in sorted(set(inventories) | set(diffs)):
        recorded, figures = diffs.get(bucket) or inventories[bucket]
        inventory = inventories.get(bucket, (0.0, {}))[1]
        noncurrent = figures.get("noncurrent_bytes", inventory.get("noncurrent_bytes"))
        rows.append({
            "day": day, "bucket": bucket, "object_count": figures.get("object_count"),
            "total_bytes": figures.get("total_bytes"), "orphan_bytes": figures.get("orphan_bytes"),
            "eligible_bytes": figures.get("eligible_orphan_bytes"), "noncurrent_bytes": noncurrent,
            "deleted_bytes": deleted.get(bucket, 0), "scanned_at": datetime.fromtimestamp(recorded, UTC),
        })
    return rows


def _rate(value: float | None) -> dg.MetadataValue:
    return dg.MetadataValue.float(round(value, 1)) if value is not None else dg.MetadataValue.null()


def _trend_record(trend: capacity.Trend) -> dg.TableRecord:
    return dg.TableRecord({
        "bucket": trend.bucket, "stored": format_bytes(trend.stored_bytes), "stored_bytes": trend.stored_bytes,
        "orphan_bytes": trend.orphan_bytes, "leak": trend.leak,
        **{name: None if rate is None else round(rate, 1)
           for name, rate in ((name, getattr(trend, name)) for name in capacity.RATES)},
    })


def history_metadata(history: capacity.History, capacity_bytes: int | None) -> dict[str, dg.MetadataValue]:
    """The trends, forecast and chart as typed metadata; numbers under stable keys for plots and the exporter."""
    found = capacity.trends(history)
    if not found:
        return {"forecast": dg.MetadataValue.text("no figures yet: scan the buckets")}
    total = found[-1]
    outlook = capacity.forecast(total, capacity_bytes) if capacity_bytes else None
    metadata: dict[str, dg.MetadataValue] = {
        "total_bytes": dg.MetadataValue.int(total.stored_bytes),
        "total_size": md.size(total.stored_bytes),
        "growth_bytes_per_day_7d": _rate(total.growth_7d),
        "growth_bytes_per_day_30d": _rate(total.growth_30d),
        "orphan_inflow_bytes_per_day_7d": _rate(total.inflow_7d),
        "orphan_inflow_bytes_per_day_30d": _rate(total.inflow_30d),
        "orphan_inflow_norm_bytes_per_day": _rate(total.inflow_norm),
        "leaking_buckets": dg.MetadataValue.text(", ".join(t.bucket for t in found[:-1] if t.leak)),
        "trends": dg.MetadataValue.table([_trend_record(t) for t in found], schema=_TRENDS_SCHEMA),
        "forecast": dg.MetadataValue.text(capacity.forecast_text(outlook, capacity_bytes)),
    }
    if total.orphan_bytes is not None:
        metadata["orphan_bytes"] = dg.MetadataValue.int(total.orphan_bytes)
    if capacity_bytes:
        metadata["capacity_bytes"] = dg.MetadataValue.int(capacity_bytes)
    if outlook is not None:
        metadata["free_bytes"] = dg.MetadataValue.int(outlook.free_bytes)
        # Only finite days: "never" has no number (the forecast's text says it), and Dagster plots numbers.
        for key, days in (("days_until_full", outlook.days), ("days_until_full_earliest", outlook.earliest),
                          ("days_until_full_latest", outlook.latest)):
            if math.isfinite(days):
                metadata[key] = dg.MetadataValue.float(round(days, 2))
    png = capacity.chart_png(history, capacity_bytes, outlook)
    metadata["chart"] = dg.MetadataValue.md(f"![stored vs orphaned bytes](data:image/png;base64,"
                                            f"{base64.b64encode(png).decode()})")
    return metadata


@dg.asset(
    partitions_def=history_partitions,
    group_name="storage_capacity",
    kinds={"parquet"},
    deps=[dg.AssetDep(name, partition_mapping=dg.AllPartitionMapping())
          for name in ("bucket_inventory", "orphan_diff", ORPHAN_DELETIONS)],
    metadata={md.COLUMN_SCHEMA: md.column_schema(capacity.HISTORY_SCHEMA)},
    description="Per bucket and day: stored bytes and objects, orphaned, eligible, noncurrent and deleted bytes; "
                "with the growth, the orphan inflow and the days until the disk is full.",
)
def storage_history(
    context: dg.AssetExecutionContext, manifests: ManifestStoreResource, policy: StoragePolicyResource
) -> dg.MaterializeResult:
    day = date.fromisoformat(context.partition_key)
    store = manifests.store()
    loaded = policy.load()
    rows = day_rows(context.instance, day, [bucket.name for bucket in loaded.buckets])
    uri = store.history_uri(day)
    store.write_table(uri, pa.Table.from_pylist(rows, schema=capacity.HISTORY_SCHEMA))
    history = capacity.by_bucket(store.read_history(capacity.HISTORY_SCHEMA), until=day)
    metadata = history_metadata(history, loaded.capacity_bytes)
    context.log.info(f"{day}: {len(rows)} bucket(s); {metadata['forecast'].value}")
    return dg.MaterializeResult(metadata={
        "buckets": dg.MetadataValue.int(len(rows)),
        "deleted_bytes": dg.MetadataValue.int(sum(row["deleted_bytes"] for row in rows)),
        **metadata,
        "manifest_uri": md.manifest(uri),
        **md.manifest_entries(uri, len(rows)),
    })


storage_history_job = dg.define_asset_job(
    "storage_history_job", selection=[STORAGE_HISTORY],
    description="Record a day of the storage history and recompute the growth and the forecast.",
    tags={"heimdall/kind": "history", "dagster/max_runtime": str(3600)},
)


def build_history_schedule() -> dg.ScheduleDefinition:
    @dg.schedule(
        name=HISTORY_SCHEDULE, cron_schedule="15 0 * * *", job=storage_history_job, execution_timezone="UTC",
        default_status=default_status(), description="00:15 UTC: the day that just ended, once its scans are in.",
    )
    def daily_storage_history(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        tick = context.scheduled_execution_time or datetime.now(UTC)
        key = (tick.astimezone(UTC).date() - timedelta(days=1)).isoformat()
        return dg.RunRequest(run_key=f"{HISTORY_SCHEDULE}:{key}", partition_key=key)

    return daily_storage_history
