"""Builds the Definitions for a storage policy, so tests can use a policy of their own."""

from __future__ import annotations

import dagster as dg

from heimdall_storage_pipeline.core.policy import StoragePolicy
from heimdall_storage_pipeline.defs.partitions import bucket_partitions
from heimdall_storage_pipeline.defs.resources import resources_from_env
from heimdall_storage_pipeline.defs.scan.assets import build_scan_assets, build_scan_job


def build_definitions(
    policy: StoragePolicy, resources: dict[str, dg.ConfigurableResource] | None = None
) -> dg.Definitions:
    partitions = bucket_partitions(policy)
    return dg.Definitions(
        assets=build_scan_assets(partitions),
        jobs=[build_scan_job()],
        resources=resources if resources is not None else resources_from_env(policy.source),
    )
