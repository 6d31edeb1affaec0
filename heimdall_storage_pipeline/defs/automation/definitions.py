"""Everything the automation adds to the code location, for ``defs/build.py`` to register."""

from dataclasses import dataclass

import dagster as dg

from heimdall_storage_pipeline.defs.automation.prefix_cleanup import prefix_cleanup_job
from heimdall_storage_pipeline.defs.automation.retention import event_log_retention_job, weekly_event_log_retention
from heimdall_storage_pipeline.defs.automation.schedules import build_schedules
from heimdall_storage_pipeline.defs.automation.sensors import (
    RUN_FAILURES_SPEC,
    build_dataset_deletion_sensor,
    build_orphan_growth_sensor,
    build_run_failure_sensor,
    build_scan_cleanup_chain_sensor,
)


@dataclass(frozen=True)
class Automation:
    assets: list[dg.AssetSpec]
    jobs: list[dg.JobDefinition]
    schedules: list[dg.ScheduleDefinition]
    sensors: list[dg.SensorDefinition]


def build_automation(partitions_def: dg.PartitionsDefinition) -> Automation:
    """Schedules and sensors read their settings (HEIMDALL_*) here, at code-location load."""
    return Automation(
        assets=[RUN_FAILURES_SPEC],
        jobs=[prefix_cleanup_job, event_log_retention_job],
        schedules=[*build_schedules(partitions_def), weekly_event_log_retention],
        sensors=[
            build_scan_cleanup_chain_sensor(),
            build_orphan_growth_sensor(partitions_def),
            build_dataset_deletion_sensor(),
            build_run_failure_sensor(),
        ],
    )
