"""Finding a plan by its id in the instance: the dry run's orphan_deletions materialization."""

from __future__ import annotations

import dagster as dg

from heimdall_storage_pipeline.core.plans import Plan, PlanRefusedError, plan_bucket
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
