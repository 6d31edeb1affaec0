"""Wall-clock schedules in an explicit time zone (the predecessor ran "every 24 h from start-up")."""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import dagster as dg

from heimdall_storage_pipeline.defs.automation.settings import default_status, schedule_timezone

SCAN_JOB = "storage_scan_job"
TRIGGER_TAG = "heimdall/trigger"
# Scan runs carrying this tag are followed by a cleanup of their diffs (scan_cleanup_chain_sensor).
CHAIN_TAG = "heimdall/cleanup-after-scan"
DAILY_CLEANUP = "daily_orphan_cleanup"
HOURLY_SCAN = "hourly_storage_scan"
DAILY_CLEANUP_HOUR = 3


def _tick_time(context: dg.ScheduleEvaluationContext, timezone: str) -> datetime:
    """The tick's scheduled time in ``timezone``; now (to the minute) when evaluated by hand."""
    tick = context.scheduled_execution_time or datetime.now(UTC).replace(second=0, microsecond=0)
    return tick.astimezone(ZoneInfo(timezone))


def _stamp(tick: datetime) -> str:
    # UTC, so that the repeated hour of a DST change still gets distinct, stable keys.
    return tick.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")


def build_schedules(partitions_def: dg.PartitionsDefinition) -> list[dg.ScheduleDefinition]:
    timezone = schedule_timezone()
    status = default_status()

    @dg.schedule(
        name=HOURLY_SCAN,
        cron_schedule="0 * * * *",
        job_name=SCAN_JOB,
        execution_timezone=timezone,
        default_status=status,
        description="Scan every bucket on the hour: one run per bucket partition.",
    )
    def hourly_storage_scan(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
        stamp = _stamp(_tick_time(context, timezone))
        return [
            dg.RunRequest(run_key=f"{HOURLY_SCAN}:{bucket}:{stamp}", partition_key=bucket,
                          tags={TRIGGER_TAG: HOURLY_SCAN})
            for bucket in partitions_def.get_partition_keys()
        ]

    @dg.schedule(
        name=DAILY_CLEANUP,
        cron_schedule=f"0 {DAILY_CLEANUP_HOUR} * * *",
        job_name=SCAN_JOB,
        execution_timezone=timezone,
        default_status=status,
        description=(
            "03:00 wall-clock: a fresh scan of every bucket; scan_cleanup_chain_sensor then cleans "
            "each diff it produces (dry run unless HEIMDALL_CLEANUP_DRY_RUN=false)."
        ),
    )
    def daily_orphan_cleanup(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
        tick = _tick_time(context, timezone)
        if (tick.hour, tick.minute) != (DAILY_CLEANUP_HOUR, 0):
            # Only a 03:00 local tick starts the nightly cleanup, whatever evaluates this schedule.
            return dg.SkipReason(f"{tick.isoformat()} is not {DAILY_CLEANUP_HOUR:02d}:00 in {timezone}")
        stamp = _stamp(tick)
        return [
            dg.RunRequest(run_key=f"{DAILY_CLEANUP}:{bucket}:{stamp}", partition_key=bucket,
                          tags={TRIGGER_TAG: DAILY_CLEANUP, CHAIN_TAG: DAILY_CLEANUP})
            for bucket in partitions_def.get_partition_keys()
        ]

    return [hourly_storage_scan, daily_orphan_cleanup]
