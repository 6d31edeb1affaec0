"""Helpers for the automation tests: scans with tags, sensor ticks, seeded buckets."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import dagster as dg
from minio import Minio

from heimdall_storage_pipeline.core.clock import isoformat_utc, utc_now
from heimdall_storage_pipeline_tests.conftest import ScanHarness
from heimdall_storage_pipeline_tests.helpers import put_objects


def soon() -> str:
    """An as_of a minute ahead, within the clock skew a scan accepts: objects a second old are old enough."""
    return isoformat_utc(utc_now() + timedelta(minutes=1))


def scan(harness: ScanHarness, bucket: str, tags: dict[str, str] | None = None,
         raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    """The whole storage_scan_job (assets and checks) for one bucket, as a scheduled run would be."""
    return harness.defs.resolve_job_def("storage_scan_job").execute_in_process(
        partition_key=bucket,
        instance=harness.instance,
        run_config={"ops": {"orphan_diff": {"config": {"as_of": soon()}}}},
        tags=tags or {},
        raise_on_error=raise_on_error,
    )


def tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, cursor: str | None = None,
         **resources: Any) -> dg.SensorResult:
    """Evaluate a sensor once, as the daemon would, and return its result."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources or None)
    result = sensor(context)
    assert isinstance(result, dg.SensorResult), result
    return result


def run_request(harness: ScanHarness, request: dg.RunRequest, raise_on_error: bool = True,
                **config_override: Any) -> dg.ExecuteInProcessResult:
    """Execute a sensor's run request in-process with its own run config and tags."""
    run_config = request.run_config
    if config_override:
        (op_name, op_config), = run_config["ops"].items()
        run_config = {"ops": {op_name: {"config": {**op_config["config"], **config_override}}}}
    return harness.defs.resolve_job_def(request.job_name).execute_in_process(
        instance=harness.instance, run_config=run_config, tags=dict(request.tags),
        raise_on_error=raise_on_error,
    )


def seed_bucket(client: Minio, bucket: str, referenced: int, orphans: int, size: int = 100,
                orphan_size: int | None = None) -> list[str]:
    """``referenced`` objects named by the references, ``orphans`` that are not; returns the referenced keys."""
    keys = [f"ref/{i:03d}.npy" for i in range(referenced)]
    put_objects(client, bucket, keys, size)
    put_objects(client, bucket, [f"orphan/{i:03d}.npy" for i in range(orphans)], orphan_size or size)
    return keys
