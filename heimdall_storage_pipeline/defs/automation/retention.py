"""event_log_retention_job: old runs leave the instance, what the pipeline reads back stays.

Every run adds events and Dagster keeps them for ever. This job deletes the runs created before
``keep_days`` ago, with their events and materializations, except the runs that hold what the
pipeline reads back: each bucket's latest inventory, diff and cleanup record, and its latest two
reference sets (the reference-drop guard compares them). Runs still in progress are kept.
"""

from datetime import timedelta

import dagster as dg
from pydantic import Field

from heimdall_storage_pipeline.core.clock import utc_now
from heimdall_storage_pipeline.defs.materializations import ORPHAN_DELETIONS
from heimdall_storage_pipeline.defs.resources import StoragePolicyResource

EVENT_LOG_RETENTION_JOB = "event_log_retention_job"
WEEKLY_RETENTION = "weekly_event_log_retention"
# Latest materializations per bucket that scans, cleanups, guards and the exporter read back.
KEPT_LATEST = {"bucket_inventory": 1, "referenced_keys": 2, "orphan_diff": 1, ORPHAN_DELETIONS: 1}
_PAGE = 500


class EventLogRetentionConfig(dg.Config):
    keep_days: int = Field(default=90, ge=7, description="delete runs created more than this many days ago")
    dry_run: bool = Field(default=True, description="only count what would be deleted")


def _protected_runs(instance: dg.DagsterInstance, buckets: set[str]) -> set[str]:
    protected: set[str] = set()
    for asset, count in KEPT_LATEST.items():
        for bucket in buckets:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[bucket]),
                limit=count, ascending=False,
            ).records
            protected.update(record.run_id for record in records)
    return protected


@dg.op(description="Delete runs older than keep_days, keeping those that hold what the pipeline reads back.")
def purge_old_runs(context: dg.OpExecutionContext, config: EventLogRetentionConfig,
                   policy: StoragePolicyResource) -> None:
    instance = context.instance
    cutoff = utc_now() - timedelta(days=config.keep_days)
    protected = _protected_runs(instance, {bucket.name for bucket in policy.load().buckets}) | {context.run.run_id}
    old: list[str] = []
    cursor = None
    while True:
        records = instance.get_run_records(dg.RunsFilter(created_before=cutoff), limit=_PAGE, cursor=cursor)
        if not records:
            break
        old += [r.dagster_run.run_id for r in records
                if r.dagster_run.is_finished and r.dagster_run.run_id not in protected]
        cursor = records[-1].dagster_run.run_id
    for run_id in [] if config.dry_run else old:
        instance.delete_run(run_id)
    context.log.info(
        f"{len(old)} run(s) created before {cutoff.isoformat()} {'would be' if config.dry_run else 'were'} "
        f"deleted; {len(protected) - 1} kept because they hold the latest inventory, references, diff or cleanup "
        f"of a bucket"
    )


@dg.job(name=EVENT_LOG_RETENTION_JOB, tags={"heimdall/kind": "maintenance"},
        description="Delete old runs and their events from the instance (dry run unless dry_run: false).")
def event_log_retention_job() -> None:
    purge_old_runs()


weekly_event_log_retention = dg.ScheduleDefinition(
    name=WEEKLY_RETENTION,
    job=event_log_retention_job,
    cron_schedule="0 4 * * 0",
    run_config={"ops": {"purge_old_runs": {"config": {"keep_days": 90, "dry_run": False}}}},
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Sundays 04:00 UTC: delete runs older than 90 days (off until switched on in the UI).",
)
