"""The scan -> cleanup chain, the orphan growth sensor and the run-failure sensor on a real instance."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import dagster as dg
import pytest
import sqlalchemy as sa

from heimdall_storage_pipeline.defs.automation.schedules import CHAIN_TAG, DAILY_CLEANUP
from heimdall_storage_pipeline.defs.automation.sensors import (
    DIFF_TAG,
    RUN_FAILURES,
    build_orphan_growth_sensor,
    build_run_failure_sensor,
    build_scan_cleanup_chain_sensor,
)
from heimdall_storage_pipeline.defs.automation.settings import AutomationSettingError
from heimdall_storage_pipeline.defs.partitions import bucket_partitions
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS
from heimdall_storage_pipeline_tests.conftest import ScanHarness, key_source
from heimdall_storage_pipeline_tests.defs.automation.support import run_request, scan, seed_bucket, tick
from heimdall_storage_pipeline_tests.helpers import make_reference_table


@pytest.fixture
def two_buckets(
    harness_factory: Callable, make_bucket: Callable[[str], str], seaweed: SeaweedFS, db_engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[ScanHarness, str, str]:
    """Bucket ``big`` has 3 x 1000 orphan bytes, ``small`` 1 x 100; both mostly referenced."""
    for name in ("HEIMDALL_CLEANUP_DRY_RUN", "HEIMDALL_ORPHAN_GROWTH_BYTES"):
        monkeypatch.delenv(name, raising=False)
    client = seaweed.client()
    big, small = make_bucket("big"), make_bucket("small")
    refs = [f"s3://{big}/{k}" for k in seed_bucket(client, big, referenced=8, orphans=3, size=1000)]
    refs += [f"s3://{small}/{k}" for k in seed_bucket(client, small, referenced=8, orphans=1, size=100)]
    query = make_reference_table(db_engine, "refs_sensors", refs)
    harness = harness_factory({b: {"min_age": "1s", "references": [key_source(query, "uri")]} for b in (big, small)})
    return harness, big, small


def test_chain_cleans_each_daily_diff_once(two_buckets: tuple[ScanHarness, str, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    harness, big, small = two_buckets
    sensor = build_scan_cleanup_chain_sensor()
    scan(harness, small)  # an hourly scan: not followed by a cleanup
    assert tick(sensor, harness.instance).run_requests == []

    scan(harness, big, tags={CHAIN_TAG: DAILY_CLEANUP})
    first = tick(sensor, harness.instance)
    assert len(first.run_requests) == 1
    request = first.run_requests[0]
    diff_id = request.tags[DIFF_TAG]
    assert request.job_name == "delete_orphans_job"
    assert request.run_key == f"daily_orphan_cleanup:{big}:diff-{diff_id}"
    assert request.run_config == {"ops": {"delete_orphans": {"config": {"dry_run": True, "buckets": [big]}}}}
    # With the cursor nothing is requested again; without it, the same run key (deduped by the daemon).
    assert tick(sensor, harness.instance, first.cursor).run_requests == []
    assert [r.run_key for r in tick(sensor, harness.instance).run_requests] == [request.run_key]

    # The requested run, executed with its config: a dry run over the diff's eligible orphans.
    assert run_request(harness, request).success
    deletions = harness.metadata("orphan_deletions", big)
    assert deletions["dry_run"] is True and deletions["would_delete_count"] == 3 and deletions["deleted_count"] == 0

    # A later daily diff gets its own (single) cleanup; live only when the setting says so.
    monkeypatch.setenv("HEIMDALL_CLEANUP_DRY_RUN", "false")
    scan(harness, big, tags={CHAIN_TAG: DAILY_CLEANUP})
    second = tick(sensor, harness.instance, first.cursor)
    assert [r.run_config["ops"]["delete_orphans"]["config"]["dry_run"] for r in second.run_requests] == [False]
    assert second.run_requests[0].run_key != request.run_key
    monkeypatch.setenv("HEIMDALL_CLEANUP_DRY_RUN", "flase")
    scan(harness, big, tags={CHAIN_TAG: DAILY_CLEANUP})
    with pytest.raises(AutomationSettingError, match="flase"):
        tick(sensor, harness.instance, second.cursor)


def test_growth_sensor_requests_a_cleanup_above_the_threshold(
    two_buckets: tuple[ScanHarness, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    harness, big, small = two_buckets
    monkeypatch.setenv("HEIMDALL_ORPHAN_GROWTH_BYTES", "1000")
    sensor = build_orphan_growth_sensor(bucket_partitions(harness.policy))
    assert tick(sensor, harness.instance).run_requests == []  # nothing scanned yet
    scan(harness, big)
    scan(harness, small)

    first = tick(sensor, harness.instance)
    assert [r.run_config["ops"]["delete_orphans"]["config"] for r in first.run_requests] == [
        {"dry_run": True, "buckets": [big]}]
    assert first.run_requests[0].run_key.startswith(f"orphan_growth_sensor:{big}:diff-")
    seen = json.loads(first.cursor or "{}")
    assert set(seen) == {big, small}
    assert tick(sensor, harness.instance, first.cursor).run_requests == []  # same diffs: nothing new

    scan(harness, big)  # a new diff, still above the threshold: one new request
    again = tick(sensor, harness.instance, first.cursor)
    assert [r.partition_key or r.run_config["ops"]["delete_orphans"]["config"]["buckets"][0]
            for r in again.run_requests] == [big]
    # Diffs of the nightly chain are left to the chain sensor.
    scan(harness, big, tags={CHAIN_TAG: DAILY_CLEANUP})
    assert tick(sensor, harness.instance, again.cursor).run_requests == []


def test_run_failure_sensor_summarises_and_records_failures(
    harness_factory: Callable, make_bucket: Callable[[str], str]
) -> None:
    bucket = make_bucket("fail")
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source("SELECT 'x'")]}})
    # The test policy lacks the purge's bucket: the run fails inside the op.
    result = harness.purge(str(uuid.uuid4()), dry_run=True, raise_on_error=False)
    assert not result.success
    run = harness.instance.get_run_by_id(result.run_id)
    assert run is not None
    failure = next(iter(harness.instance.all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)))
    context = dg.build_run_status_sensor_context(
        sensor_name="storage_run_failure_sensor", dagster_event=failure.get_dagster_event(),
        dagster_instance=harness.instance, dagster_run=run,
    ).for_run_failure()

    build_run_failure_sensor()(context)

    records = harness.instance.fetch_observations(dg.AssetKey(RUN_FAILURES), limit=10).records
    assert len(records) == 1
    metadata = {k: v.value for k, v in records[0].asset_observation.metadata.items()}
    assert metadata["job"] == "purge_dataset_job" and metadata["run_id"] == result.run_id
    summary = str(metadata["summary"])
    assert "\n" not in summary
    assert summary.startswith(f"purge_dataset_job run {result.run_id}")
    assert "purge_dataset_op: " in summary and "PolicyError" in summary
    assert "'heimdall-synthetic-iq' is not in the policy" in summary
    # The exporter's count of failed runs per job sees it too.
    assert harness.instance.get_runs_count(
        dg.RunsFilter(job_name="purge_dataset_job", statuses=[dg.DagsterRunStatus.FAILURE])) == 1
