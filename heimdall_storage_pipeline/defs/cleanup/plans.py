"""Plans in the instance: found by id through the dry run's orphan_deletions, and described for review."""

from __future__ import annotations

from datetime import datetime

import dagster as dg

from heimdall_storage_pipeline.core.clock import as_utc, isoformat_utc
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.plans import Plan, PlanRefusedError, plan_bucket, summarize_plan
from heimdall_storage_pipeline.defs.materializations import ORPHAN_DELETIONS

_PAGE = 100
_SEARCHED = 10_000  # materializations of one bucket looked through, newest first


def find_plan(instance: dg.DagsterInstance, plan_id: str) -> tuple[Plan, dict[str, object]]:
    """The plan ``plan_id`` and its dry run's whole metadata; refuses an id no dry run recorded."""
    bucket = plan_bucket(plan_id)
    records_filter = dg.AssetRecordsFilter(asset_key=dg.AssetKey(ORPHAN_DELETIONS), asset_partitions=[bucket])
    cursor, searched = None, 0
    while searched < _SEARCHED:
        page = instance.fetch_materializations(records_filter, limit=_PAGE, cursor=cursor, ascending=False)
        for record in page.records:
            materialization = record.asset_materialization
            metadata = {key: value.value for key, value in materialization.metadata.items()} if materialization else {}
            if metadata.get("plan_id") == plan_id and metadata.get("dry_run") is True:
                return Plan.from_metadata(plan_id, metadata), metadata
        searched += len(page.records)
        if not page.has_more:
            break
        cursor = page.cursor
    raise PlanRefusedError(
        f"no dry run of {bucket} recorded plan {plan_id}; run a dry run of {bucket} and take the plan_id "
        f"from its orphan_deletions metadata"
    )


def describe_plan(plan: Plan, metadata: dict[str, object], store: ManifestStore, now: datetime,
                  applied: tuple[str, datetime] | None) -> str:
    """What ``heimdall-storage plan show`` prints: the figures, the verdict, the largest keys, the ages."""
    summary = summarize_plan(store, plan.manifest_uri, now)
    lines = [
        f"plan {plan.plan_id}",
        f"  bucket          {plan.bucket}",
        f"  made at         {isoformat_utc(plan.created_at)} ({now - plan.created_at} ago)",
        f"  from the diff   as of {isoformat_utc(as_utc(metadata['diff_as_of'], 'diff_as_of'))}: "
        f"{plan.diff_manifest_uri}",
        f"  keys            {plan.keys} ({plan.bytes} bytes)",
        f"  guard verdict   {metadata.get('guard_verdict', 'pass')}",
        f"  manifest        {plan.manifest_uri}",
        f"  sha-256         {plan.digest}",
        "  applied         " + (f"by run {applied[0]} at {isoformat_utc(applied[1])}" if applied else "no"),
        "",
        "largest keys:",
        *(f"  {c.size:>14}  {isoformat_utc(c.last_modified)}  {c.key}" for c in summary.largest),
        "ages:",
        *(f"  {label:>9}  {count:>10} objects  {size:>14} bytes" for label, count, size in summary.age_histogram),
    ]
    if not applied:
        lines += ["", "to apply it (a live run; each key is re-validated just before its delete):",
                  f"  heimdall-storage plan show {plan.plan_id} --apply-config apply.yaml",
                  "  dagster job execute -m heimdall_storage_pipeline.definitions -j delete_orphans_job -c apply.yaml"]
    return "\n".join(lines)


def apply_config(plan_id: str) -> dict[str, object]:
    """The run config of a live run that applies ``plan_id``."""
    return {"ops": {"delete_orphans": {"config": {"dry_run": False, "plan": plan_id}}}}
