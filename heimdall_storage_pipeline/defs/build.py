"""Builds the Definitions for a storage policy, so tests can use a policy of their own."""

from __future__ import annotations

import dagster as dg

from heimdall_storage_pipeline.core.manifests import DELETIONS_SCHEMA
from heimdall_storage_pipeline.core.policy import StoragePolicy
from heimdall_storage_pipeline.defs import metadata as md
from heimdall_storage_pipeline.defs.automation.definitions import build_automation
from heimdall_storage_pipeline.defs.capacity import build_history_schedule, storage_history, storage_history_job
from heimdall_storage_pipeline.defs.cleanup.jobs import (
    ORPHAN_DELETIONS,
    delete_orphans_job,
    purge_dataset_job,
    restore_quarantined_job,
)
from heimdall_storage_pipeline.defs.executors import scale_out_executor
from heimdall_storage_pipeline.defs.partitions import bucket_partitions
from heimdall_storage_pipeline.defs.resources import resources_from_env
from heimdall_storage_pipeline.defs.scan.assets import build_scan_assets, build_scan_job


def build_definitions(
    policy: StoragePolicy, resources: dict[str, dg.ConfigurableResource] | None = None
) -> dg.Definitions:
    partitions = bucket_partitions(policy)
    # Materialized by the deletion and purge jobs' ops, one event per bucket and run.
    orphan_deletions = dg.AssetSpec(
        ORPHAN_DELETIONS,
        deps=["orphan_diff"],
        partitions_def=partitions,
        group_name="storage_cleanup",
        description="What each cleanup run deleted, skipped and failed, per bucket.",
        metadata={md.COLUMN_SCHEMA: md.column_schema(DELETIONS_SCHEMA)},
    )
    automation = build_automation(partitions)  # schedules, sensors, checks, prefix_cleanup_job
    executor = scale_out_executor()  # None: Dagster's default; HEIMDALL_EXECUTOR=celery: Celery workers
    return dg.Definitions(
        assets=[*build_scan_assets(partitions), orphan_deletions, storage_history, *automation.assets],
        jobs=[
            build_scan_job(executor),
            delete_orphans_job if executor is None else delete_orphans_job.with_executor_def(executor),
            purge_dataset_job,
            restore_quarantined_job,
            storage_history_job,
            *automation.jobs,
        ],
        schedules=[*automation.schedules, build_history_schedule()],
        sensors=automation.sensors,
        # A run's steps share its process: a scan is three short steps (plus its checks), and a
        # subprocess per step cost more start-up than the steps' work. Celery, when selected, overrides.
        executor=dg.in_process_executor,
        resources=resources if resources is not None else resources_from_env(policy.source),
    )
