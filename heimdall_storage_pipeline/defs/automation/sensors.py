"""Sensors: scan -> cleanup chain, orphan growth, dataset deletions (outbox) and run failures.

Every sensor stays cheap: a few indexed event-log or outbox queries per tick, never a
bucket listing.
"""

import json
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from heimdall_storage_pipeline.defs.automation.checks import (
    ORPHAN_DIFF,
    diff_blocked,
    latest_diff_record,
)
from heimdall_storage_pipeline.defs.automation.outbox import (
    OutboxEvent,
    fetch_event,
    fetch_new_events,
    mark_processed,
    outbox_exists,
    record_failure,
)
from heimdall_storage_pipeline.defs.automation.prefix_cleanup import PREFIX_CLEANUP_JOB, PREFIX_CLEANUP_OP
from heimdall_storage_pipeline.defs.automation.schedules import CHAIN_TAG, SCAN_JOB, TRIGGER_TAG
from heimdall_storage_pipeline.defs.automation.settings import (
    cleanup_dry_run,
    default_sensor_status,
    orphan_growth_threshold,
)
from heimdall_storage_pipeline.defs.resources import ReferenceDatabaseResource

DELETE_JOB = "delete_orphans_job"
DIFF_TAG = "heimdall/orphan-diff-storage-id"
DRY_RUN_TAG = "heimdall/dry-run"
EVENT_TAG = "heimdall/outbox-event"
ATTEMPT_TAG = "heimdall/outbox-attempt"
RUN_FAILURES = "storage_run_failures"
MONITORED_JOBS = (SCAN_JOB, DELETE_JOB, "purge_dataset_job", PREFIX_CLEANUP_JOB)
CHAIN_BATCH = 100
OUTBOX_BATCH = 50
MAX_EVENT_ATTEMPTS = 3


def cleanup_request(bucket: str, record: dg.EventLogRecord, trigger: str, dry_run: bool) -> dg.RunRequest:
    """One delete_orphans run for one bucket; the run key is the diff's, so a diff is cleaned at most once."""
    return dg.RunRequest(
        run_key=f"{trigger}:{bucket}:diff-{record.storage_id}",
        job_name=DELETE_JOB,
        run_config={"ops": {"delete_orphans": {"config": {"dry_run": dry_run, "buckets": [bucket]}}}},
        tags={TRIGGER_TAG: trigger, DIFF_TAG: str(record.storage_id), DRY_RUN_TAG: str(dry_run).lower()},
    )


def build_scan_cleanup_chain_sensor() -> dg.SensorDefinition:
    @dg.sensor(
        name="scan_cleanup_chain_sensor",
        job_name=DELETE_JOB,
        minimum_interval_seconds=30,
        default_status=default_sensor_status(),
        description="Cleans each bucket's diff produced by the daily_orphan_cleanup scan, once.",
    )
    def scan_cleanup_chain_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        after = int(context.cursor) if context.cursor else None
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(ORPHAN_DIFF), after_storage_id=after),
            limit=CHAIN_BATCH,
            ascending=True,
        ).records
        cursor = after
        requests: dict[str, dg.RunRequest] = {}
        for record in records:
            run = context.instance.get_run_by_id(record.run_id)
            bucket = record.partition_key
            if run is None or bucket is None or run.tags.get(CHAIN_TAG) is None:
                cursor = record.storage_id  # an hourly or manual scan: not ours to clean
                continue
            if not run.is_finished:
                break  # its checks may not have run yet: look again next tick
            cursor = record.storage_id
            if not run.is_success:
                context.log.warning(f"{bucket}: scan run {run.run_id} ended {run.status.value}; no cleanup")
                continue
            reason = diff_blocked(record, bucket)
            if reason:
                context.log.warning(f"{bucket}: {reason}")
                continue
            # A later diff of the same bucket in this batch supersedes an earlier one.
            requests[bucket] = cleanup_request(bucket, record, run.tags[CHAIN_TAG], cleanup_dry_run())
        if not requests:
            return dg.SensorResult(
                skip_reason=dg.SkipReason("no finished daily scan diff to clean"),
                cursor=str(cursor) if cursor is not None else None,
            )
        return dg.SensorResult(run_requests=list(requests.values()),
                               cursor=str(cursor) if cursor is not None else None)

    return scan_cleanup_chain_sensor


def build_orphan_growth_sensor(partitions_def: dg.PartitionsDefinition) -> dg.SensorDefinition:
    @dg.sensor(
        name="orphan_growth_sensor",
        job_name=DELETE_JOB,
        minimum_interval_seconds=300,
        default_status=default_sensor_status(),
        description="Requests a cleanup of a bucket whose eligible orphan bytes exceed "
        "HEIMDALL_ORPHAN_GROWTH_BYTES (default 50 GiB).",
    )
    def orphan_growth_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        threshold = orphan_growth_threshold()
        seen: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
        requests: list[dg.RunRequest] = []
        for bucket in partitions_def.get_partition_keys():
            record = latest_diff_record(context.instance, bucket)
            if record is None or seen.get(bucket) == record.storage_id:
                continue
            run = context.instance.get_run_by_id(record.run_id)
            if run is not None and not run.is_finished:
                continue  # decide once its checks have run
            seen[bucket] = record.storage_id
            if run is None or not run.is_success or run.tags.get(CHAIN_TAG) is not None:
                continue  # a failed scan, or one the nightly chain cleans anyway
            materialization = record.asset_materialization
            assert materialization is not None
            eligible = int(materialization.metadata["eligible_orphan_bytes"].value)  # type: ignore[arg-type]
            if eligible <= threshold:
                continue
            reason = diff_blocked(record, bucket)
            if reason:
                context.log.warning(f"{bucket}: {reason}")
                continue
            context.log.info(f"{bucket}: {eligible} eligible orphan bytes exceed {threshold}; cleaning")
            requests.append(cleanup_request(bucket, record, "orphan_growth_sensor", cleanup_dry_run()))
        cursor = json.dumps(seen, sort_keys=True)
        if not requests:
            skip = dg.SkipReason(f"no bucket above {threshold} eligible orphan bytes")
            return dg.SensorResult(skip_reason=skip, cursor=cursor)
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    return orphan_growth_sensor


def event_request(event: OutboxEvent, attempt: int, dry_run: bool) -> dg.RunRequest:
    config = {
        "event_id": event.id,
        "entity_type": event.entity_type,
        "entity_id": event.entity_id,
        "bucket": event.bucket,
        "prefixes": list(event.prefixes),
        "dry_run": dry_run,
    }
    return dg.RunRequest(
        run_key=f"outbox-event-{event.id}-attempt-{attempt}",
        job_name=PREFIX_CLEANUP_JOB,
        run_config={"ops": {PREFIX_CLEANUP_OP: {"config": config}}},
        tags={EVENT_TAG: str(event.id), ATTEMPT_TAG: str(attempt), DRY_RUN_TAG: str(dry_run).lower(),
              TRIGGER_TAG: "dataset_deletion_sensor"},
    )


def _event_run(instance: dg.DagsterInstance, event_id: int, attempt: int) -> dg.DagsterRun | None:
    records = instance.get_run_records(
        filters=dg.RunsFilter(tags={EVENT_TAG: str(event_id), ATTEMPT_TAG: str(attempt)}), limit=1
    )
    return records[0].dagster_run if records else None


def build_dataset_deletion_sensor() -> dg.SensorDefinition:
    @dg.sensor(
        name="dataset_deletion_sensor",
        job_name=PREFIX_CLEANUP_JOB,
        minimum_interval_seconds=30,
        default_status=default_sensor_status(),
        description="Cleans the prefixes of deleted datasets and audio (outbox "
        "heimdall.storage_cleanup_events); marks an event processed once its run succeeded.",
    )
    def dataset_deletion_sensor(
        context: dg.SensorEvaluationContext, reference_db: ReferenceDatabaseResource
    ) -> dg.SensorResult | dg.SkipReason:
        # Cursor: the last event id requested, and the attempt each unfinished event is on.
        state: dict[str, Any] = json.loads(context.cursor) if context.cursor else {}
        last_id = int(state.get("last_id", 0))
        pending: dict[str, int] = {str(k): int(v) for k, v in state.get("pending", {}).items()}
        engine = reference_db.engine()
        try:
            if not outbox_exists(engine):
                return dg.SkipReason("heimdall.storage_cleanup_events is missing; apply the migration with "
                                     "`heimdall-storage migrate`")
            requests: list[dg.RunRequest] = []
            for event_id, attempt in list(pending.items()):
                run = _event_run(context.instance, int(event_id), attempt)
                if run is None or not run.is_finished:
                    continue  # not launched yet, or still running
                if run.is_success:
                    mark_processed(engine, int(event_id), run.run_id, run.tags.get(DRY_RUN_TAG) != "false")
                    del pending[event_id]
                    continue
                record_failure(engine, int(event_id), run.run_id, f"run ended {run.status.value}")
                event = fetch_event(engine, int(event_id))
                if event is None or attempt >= MAX_EVENT_ATTEMPTS:
                    context.log.error(f"outbox event {event_id}: {attempt} cleanup runs failed (last "
                                      f"{run.run_id}); left unprocessed")
                    del pending[event_id]
                    continue
                pending[event_id] = attempt + 1
                requests.append(event_request(event, attempt + 1, cleanup_dry_run()))
            for event in fetch_new_events(engine, last_id, OUTBOX_BATCH):
                requests.append(event_request(event, 1, cleanup_dry_run()))
                pending[str(event.id)] = 1
                last_id = event.id
        finally:
            engine.dispose()
        cursor = json.dumps({"last_id": last_id, "pending": pending}, sort_keys=True)
        if not requests:
            return dg.SensorResult(skip_reason=dg.SkipReason(f"no new outbox event; {len(pending)} pending"),
                                   cursor=cursor)
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    return dataset_deletion_sensor


def _run_buckets(run: dg.DagsterRun) -> str:
    partition = run.tags.get("dagster/partition")
    if partition:
        return partition
    op_config = next(iter((run.run_config or {}).get("ops", {}).values()), {}).get("config", {})
    buckets = op_config.get("buckets") or ([op_config["bucket"]] if op_config.get("bucket") else [])
    return ",".join(buckets) if buckets else "all buckets"


def failure_summary(run: dg.DagsterRun, step_failures: list[dg.DagsterEvent], fallback: str) -> str:
    """One line: job, run, buckets and the first failed step's error."""
    reason = fallback
    if step_failures:
        event = step_failures[0]
        error = event.step_failure_data.error if event.step_failure_data else None
        while error is not None and error.cause is not None:
            error = error.cause  # the user's exception, not Dagster's "error occurred in op" wrapper
        reason = f"{event.step_key}: {error.message if error else event.message}"
    first_line = next((line for line in str(reason).splitlines() if line.strip()), "unknown error").strip()
    return f"{run.job_name} run {run.run_id} ({_run_buckets(run)}) failed: {first_line[:300]}"


def build_run_failure_sensor() -> dg.SensorDefinition:
    @dg.run_failure_sensor(
        name="storage_run_failure_sensor",
        default_status=default_sensor_status(),
        description="Logs a one-line summary of each failed scan, cleanup or purge run and records it as an "
        f"observation of {RUN_FAILURES} for the metrics exporter.",
    )
    def storage_run_failure_sensor(context: dg.RunFailureSensorContext) -> None:
        run = context.dagster_run
        if run.job_name not in MONITORED_JOBS:
            return
        failures = list(context.get_step_failure_events())
        summary = failure_summary(run, failures, context.failure_event.message or "")
        context.log.error(summary)
        context.instance.report_runless_asset_event(dg.AssetObservation(
            asset_key=RUN_FAILURES,
            metadata={
                "job": dg.MetadataValue.text(run.job_name),
                "run_id": dg.MetadataValue.text(run.run_id),
                "buckets": dg.MetadataValue.text(_run_buckets(run)),
                "summary": dg.MetadataValue.text(summary),
                "observed_at": dg.MetadataValue.text(datetime.now(UTC).isoformat()),
            },
        ))

    return storage_run_failure_sensor


RUN_FAILURES_SPEC = dg.AssetSpec(
    RUN_FAILURES,
    group_name="storage_automation",
    description="One observation per failed scan, cleanup or purge run (job, run_id, buckets, summary).",
)
