"""Asset checks on ``orphan_diff``, one evaluation per bucket partition, in the diff's own step.

The checks read the figures the diff records in its materialization metadata; they compute
nothing of their own, so the UI, the exporter and the checks cannot disagree. They are the
diff's ``check_specs`` and the diff returns their results: a step of their own each cost a
scan three more steps' events and three reads of the metadata just written.
"""

import json
import warnings
from typing import Any

import dagster as dg

from heimdall_storage_pipeline.core.units import format_percent

ORPHAN_DIFF = "orphan_diff"
ORPHAN_RATIO_HEALTH = "orphan_ratio_health"
REFERENCES_PRESENT = "references_present"
DANGLING_REFERENCES = "dangling_references"


def orphan_ratio_result(metadata: dict[str, Any]) -> dg.AssetCheckResult:
    """Healthy passes; warning (10-25 % orphaned bytes) fails with WARN, critical with ERROR."""
    status = str(metadata["health_status"])
    share = float(metadata["orphan_share_bytes"])
    noncurrent = int(metadata.get("noncurrent_bytes", 0))
    # A versioned bucket's health counts its noncurrent versions too (every byte on disk).
    wasted = (int(metadata["orphan_bytes"]) + noncurrent) / (int(metadata["total_bytes"]) + noncurrent or 1)
    on_disk = f", {format_percent(wasted)} with noncurrent versions" if noncurrent else ""
    return dg.AssetCheckResult(
        check_name=ORPHAN_RATIO_HEALTH,
        passed=status == "healthy",
        severity=dg.AssetCheckSeverity.ERROR if status == "critical" else dg.AssetCheckSeverity.WARN,
        description=f"{format_percent(share)} of the bytes are orphaned{on_disk}: {status}",
        metadata={
            "health_status": dg.MetadataValue.text(status),
            "orphan_share_bytes": dg.MetadataValue.float(share),
            "orphan_share_bytes_percent": dg.MetadataValue.text(format_percent(share)),
            "object_count": dg.MetadataValue.int(int(metadata["object_count"])),
        },
    )


def references_present_result(metadata: dict[str, Any]) -> dg.AssetCheckResult:
    """A bucket holding objects but no referenced key means a wrong or empty reference set."""
    objects, referenced = int(metadata["object_count"]), int(metadata["referenced_count"])
    passed = objects == 0 or referenced > 0
    description = (
        f"{referenced} referenced keys for {objects} objects"
        if passed
        else f"the bucket holds {objects} objects but the reference set is empty: a wrong database, "
        f"an empty restore or a renamed column? No cleanup runs on this diff"
    )
    return dg.AssetCheckResult(
        check_name=REFERENCES_PRESENT,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata={
            "object_count": dg.MetadataValue.int(objects),
            "referenced_count": dg.MetadataValue.int(referenced),
        },
    )


def _sample(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    try:
        parsed = json.loads(str(value or "[]"))
    except ValueError:
        return [str(value)]
    return [str(v) for v in parsed] if isinstance(parsed, list) else [str(parsed)]


def dangling_references_result(metadata: dict[str, Any]) -> dg.AssetCheckResult:
    """Rows that name objects which do not exist: WARN, with a sample of the keys."""
    count = int(metadata["dangling_reference_count"])
    sample = _sample(metadata.get("dangling_sample"))
    return dg.AssetCheckResult(
        check_name=DANGLING_REFERENCES,
        passed=count == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{count} references name objects that do not exist"
        + (f", e.g. {', '.join(sample[:3])}" if sample else ""),
        metadata={
            "dangling_reference_count": dg.MetadataValue.int(count),
            "dangling_sample": dg.MetadataValue.json(sample),
        },
    )


# The checks that refuse a cleanup of the diff when they fail with ERROR.
BLOCKING_CHECK_RESULTS = {REFERENCES_PRESENT: references_present_result}


def orphan_diff_check_specs(partitions_def: dg.PartitionsDefinition) -> list[dg.AssetCheckSpec]:
    """The diff's checks, partitioned like it so the UI shows them per bucket; ``references_present``
    is blocking: the chain and the cleanup refuse a diff it failed."""
    with warnings.catch_warnings():
        # Partitioned asset checks are "preview" in Dagster 1.13; they are what shows a result per bucket.
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return [
            dg.AssetCheckSpec(ORPHAN_RATIO_HEALTH, asset=ORPHAN_DIFF, partitions_def=partitions_def,
                              description="Share of orphaned bytes: WARN at 10-25 %, ERROR above."),
            dg.AssetCheckSpec(REFERENCES_PRESENT, asset=ORPHAN_DIFF, partitions_def=partitions_def, blocking=True,
                              description="A non-empty bucket must have references; blocks cleanups when it fails."),
            dg.AssetCheckSpec(DANGLING_REFERENCES, asset=ORPHAN_DIFF, partitions_def=partitions_def,
                              description="Rows that point at objects that do not exist (WARN, with a sample)."),
        ]


def orphan_diff_check_results(metadata: dict[str, Any]) -> list[dg.AssetCheckResult]:
    """The three checks' results from the diff's metadata values."""
    return [orphan_ratio_result(metadata), references_present_result(metadata), dangling_references_result(metadata)]


def latest_diff_record(instance: dg.DagsterInstance, bucket: str) -> dg.EventLogRecord | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(ORPHAN_DIFF), asset_partitions=[bucket]),
        limit=1,
        ascending=False,
    ).records
    return records[0] if records else None


def diff_blocked(record: dg.EventLogRecord, bucket: str) -> str | None:
    """Why the diff materialized in ``record`` must not be cleaned, or None when it may be.

    The blocking checks are evaluated again from the diff's own metadata (the figures the diff's
    step evaluated them from), so no event-log read is needed; a diff without those figures fails
    closed.
    """
    event = record.asset_materialization
    metadata = {key: value.value for key, value in event.metadata.items()} if event else {}
    for name, evaluate in BLOCKING_CHECK_RESULTS.items():
        try:
            evaluation = evaluate(metadata)
        except (KeyError, TypeError, ValueError):
            return (
                f"the orphan_diff of {bucket!r} from run {record.run_id} lacks the figures of its {name} check; "
                f"run storage_scan_job for it again"
            )
        if not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR:
            return (
                f"the blocking check {name} failed on the orphan_diff of {bucket!r} from run "
                f"{record.run_id}: {evaluation.description}; fix the reference source and scan again"
            )
    return None


def blocking_check_failed(instance: dg.DagsterInstance, bucket: str) -> str | None:
    """Why the latest orphan_diff of ``bucket`` must not be cleaned, or None when it may be.

    For ``delete_orphans``: call it per bucket before deleting and refuse the bucket with
    the returned reason. No diff at all returns None (the staleness guard refuses that).
    """
    record = latest_diff_record(instance, bucket)
    return diff_blocked(record, bucket) if record is not None else None
