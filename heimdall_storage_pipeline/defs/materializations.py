"""Reading earlier stages' results through public DagsterInstance methods."""

from __future__ import annotations

from typing import Any

import dagster as dg

from heimdall_storage_pipeline.core.errors import StaleInputError


def latest_metadata(instance: dg.DagsterInstance, asset: str, partition: str) -> dict[str, Any] | None:
    """The metadata values of the latest materialization of ``asset`` for ``partition``."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]),
        limit=1,
        ascending=False,
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    metadata = records[0].asset_materialization.metadata
    return {key: value.value for key, value in metadata.items()}


def require_metadata(instance: dg.DagsterInstance, asset: str, partition: str, needed_by: str) -> dict[str, Any]:
    metadata = latest_metadata(instance, asset, partition)
    if metadata is None:
        raise StaleInputError(
            f"{needed_by} for bucket {partition!r} needs a materialization of {asset}, and there is "
            f"none; run storage_scan_job for this bucket"
        )
    return metadata
