"""Reading earlier stages' results through public DagsterInstance methods."""

from __future__ import annotations

from typing import Any

import dagster as dg

from heimdall_storage_pipeline.core.errors import StaleInputError

ORPHAN_DELETIONS = "orphan_deletions"  # what each cleanup run did (or refused), per bucket


def recent_metadata(
    instance: dg.DagsterInstance, asset: str, partition: str, limit: int
) -> list[dict[str, Any]]:
    """Metadata values of the latest ``limit`` materializations of ``asset`` for ``partition``, newest first."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]),
        limit=limit,
        ascending=False,
    ).records
    return [
        {key: value.value for key, value in record.asset_materialization.metadata.items()}
        for record in records
        if record.asset_materialization is not None
    ]


def latest_metadata(instance: dg.DagsterInstance, asset: str, partition: str) -> dict[str, Any] | None:
    """The metadata values of the latest materialization of ``asset`` for ``partition``."""
    found = recent_metadata(instance, asset, partition, limit=1)
    return found[0] if found else None


def require_metadata(instance: dg.DagsterInstance, asset: str, partition: str, needed_by: str) -> dict[str, Any]:
    metadata = latest_metadata(instance, asset, partition)
    if metadata is None:
        raise StaleInputError(
            f"{needed_by} for bucket {partition!r} needs a materialization of {asset}, and there is "
            f"none; run storage_scan_job for this bucket"
        )
    return metadata
