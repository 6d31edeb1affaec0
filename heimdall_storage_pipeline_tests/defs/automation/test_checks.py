"""Asset checks on real orphan_diff materializations: healthy, warning, critical, and the blocking check."""

from __future__ import annotations

from collections.abc import Callable

import dagster as dg
import pytest
import sqlalchemy as sa

from heimdall_storage_pipeline.defs.automation.checks import (
    DANGLING_REFERENCES,
    ORPHAN_RATIO_HEALTH,
    REFERENCES_PRESENT,
    blocking_check_failed,
)
from heimdall_storage_pipeline.defs.automation.schedules import CHAIN_TAG, DAILY_CLEANUP
from heimdall_storage_pipeline.defs.automation.sensors import build_scan_cleanup_chain_sensor
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS
from heimdall_storage_pipeline_tests.conftest import key_source
from heimdall_storage_pipeline_tests.defs.automation.support import scan, seed_bucket, tick
from heimdall_storage_pipeline_tests.helpers import make_reference_table


def _evaluations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations() if e.asset_key == dg.AssetKey("orphan_diff")}


def test_checks_on_healthy_warning_and_critical_buckets(
    harness_factory: Callable, make_bucket: Callable[[str], str], seaweed: SeaweedFS, db_engine: sa.Engine
) -> None:
    client = seaweed.client()
    healthy, warning, critical = make_bucket("healthy"), make_bucket("warning"), make_bucket("critical")
    references: list[str] = []
    # 10 referenced objects each; orphans of 0 %, ~15 % and ~50 % of the bytes.
    for bucket, orphans in ((healthy, 0), (warning, 2), (critical, 10)):
        references += [f"s3://{bucket}/{key}" for key in seed_bucket(client, bucket, referenced=10, orphans=orphans)]
    references.append(f"s3://{warning}/ref/missing-1.npy")  # a row whose object does not exist
    query = make_reference_table(db_engine, "refs_checks", references)
    harness = harness_factory({b: {"min_age": "1s", "references": [key_source(query, "uri")]}
                               for b in (healthy, warning, critical)})

    results = {bucket: scan(harness, bucket) for bucket in (healthy, warning, critical)}

    for bucket, result in results.items():
        # All three checks ran in the diff's own run, for this bucket's partition.
        evaluations = _evaluations(result)
        assert set(evaluations) == {ORPHAN_RATIO_HEALTH, REFERENCES_PRESENT, DANGLING_REFERENCES}
        assert {e.partition for e in evaluations.values()} == {bucket}
        assert evaluations[REFERENCES_PRESENT].passed
        assert blocking_check_failed(harness.instance, bucket) is None

    ratio = {b: _evaluations(r)[ORPHAN_RATIO_HEALTH] for b, r in results.items()}
    assert ratio[healthy].passed
    assert not ratio[warning].passed and ratio[warning].severity == dg.AssetCheckSeverity.WARN
    assert "warning" in (ratio[warning].description or "")
    assert not ratio[critical].passed and ratio[critical].severity == dg.AssetCheckSeverity.ERROR
    assert ratio[critical].metadata["orphan_share_bytes"].value == pytest.approx(0.5)

    dangling = {b: _evaluations(r)[DANGLING_REFERENCES] for b, r in results.items()}
    assert dangling[healthy].passed and dangling[critical].passed
    assert not dangling[warning].passed and dangling[warning].severity == dg.AssetCheckSeverity.WARN
    assert dangling[warning].metadata["dangling_sample"].value == ["ref/missing-1.npy"]


def test_the_blocking_check_stops_the_chain_and_the_cleanup(
    harness_factory: Callable, make_bucket: Callable[[str], str], seaweed: SeaweedFS, db_engine: sa.Engine
) -> None:
    bucket = make_bucket("norefs")
    seed_bucket(seaweed.client(), bucket, referenced=0, orphans=5)
    query = make_reference_table(db_engine, "refs_empty", [])  # an empty restore, say
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source(query)]}})

    result = scan(harness, bucket, tags={CHAIN_TAG: DAILY_CLEANUP}, raise_on_error=False)

    # The diff is recorded (the UI shows it), but the blocking check fails the scan run ...
    assert harness.metadata("orphan_diff", bucket)["orphan_count"] == 5
    evaluation = _evaluations(result)[REFERENCES_PRESENT]
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR and evaluation.blocking
    assert not result.success
    reason = blocking_check_failed(harness.instance, bucket)
    assert reason is not None and "references_present" in reason and "5 objects" in reason
    # ... so the nightly chain requests no cleanup for it.
    assert tick(build_scan_cleanup_chain_sensor(), harness.instance).run_requests == []

    # A manual cleanup refuses the bucket and deletes nothing.
    cleanup = harness.delete(buckets=[bucket], dry_run=False, raise_on_error=False)
    assert not cleanup.success
    assert "references_present" in str(cleanup.failure_data_for_node("delete_orphans").error)
    assert sum(1 for _ in seaweed.client().list_objects(bucket, recursive=True)) == 5


def test_allow_mass_delete_overrides_the_blocking_check_and_records_it(
    harness_factory: Callable, make_bucket: Callable[[str], str], seaweed: SeaweedFS, db_engine: sa.Engine
) -> None:
    # Issue 3: allow_mass_delete overrides the empty-reference-set guard, and the run records
    # the override; the blocking check is the same condition seen by the UI and the chain.
    bucket = make_bucket("override")
    seed_bucket(seaweed.client(), bucket, referenced=0, orphans=3)
    query = make_reference_table(db_engine, "refs_empty2", [])
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source(query)]}})
    scan(harness, bucket, raise_on_error=False)

    cleanup = harness.delete(buckets=[bucket], dry_run=True, allow_mass_delete=True)

    assert cleanup.success
    overridden = harness.metadata("orphan_deletions", bucket)["guards_overridden"]
    assert "blocking_check" in overridden and "empty_reference_set" in overridden
    assert sum(1 for _ in seaweed.client().list_objects(bucket, recursive=True)) == 3


def test_a_diff_without_the_blocking_checks_figures_blocks_its_cleanup() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization("orphan_diff", partition="bare", metadata={"orphan_count": 3})
        )
        reason = blocking_check_failed(instance, "bare")
    assert reason is not None and "lacks the figures of its references_present check" in reason
