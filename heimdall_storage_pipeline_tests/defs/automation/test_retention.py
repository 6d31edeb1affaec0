"""event_log_retention_job: old runs go, the runs holding what the pipeline reads back stay."""

from __future__ import annotations

from datetime import timedelta

import dagster as dg

from heimdall_storage_pipeline.core.clock import utc_now
from heimdall_storage_pipeline.defs.automation import retention
from heimdall_storage_pipeline_tests.conftest import key_source
from heimdall_storage_pipeline_tests.defs.automation.support import scan, seed_bucket
from heimdall_storage_pipeline_tests.helpers import make_reference_table


def test_old_runs_are_deleted_but_the_latest_of_each_stage_is_kept(harness_factory, make_bucket, seaweed, db_engine,
                                                                  monkeypatch):
    bucket = make_bucket("retain")
    refs = seed_bucket(seaweed.client(), bucket, referenced=3, orphans=1)
    harness = harness_factory({bucket: {"min_age": "1s", "references": [
        key_source(make_reference_table(db_engine, "refs_retain", refs))]}})
    scans = [scan(harness, bucket).run_id for _ in range(3)]
    cleanups = [harness.delete().run_id for _ in range(2)]
    job = harness.defs.resolve_job_def(retention.EVENT_LOG_RETENTION_JOB)

    def purge(dry_run: bool) -> set[str]:
        job.execute_in_process(instance=harness.instance, run_config={
            "ops": {"purge_old_runs": {"config": {"keep_days": 7, "dry_run": dry_run}}}})
        return {run.run_id for run in harness.instance.get_runs(dg.RunsFilter(job_name=None))}

    monkeypatch.setattr(retention, "utc_now", lambda: utc_now() + timedelta(days=30))  # every run is old now
    before = set(scans + cleanups)
    assert before <= purge(dry_run=True)
    left = purge(dry_run=False)
    # The first scan's references are not among the latest two, the first dry run's record is not the latest.
    assert before & left == {*scans[1:], cleanups[1]}
    assert harness.metadata("orphan_diff", bucket)["eligible_orphan_count"] == 1
    assert harness.delete().success  # the cleanup still finds its diff and the guards their references
