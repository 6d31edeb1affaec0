"""End to end through the real UI server: ``dagster dev`` (webserver + daemon) on a PostgreSQL instance.

A scan, a dry-run cleanup (a plan) and live runs applying that plan are launched with run config
through DagsterGraphQLClient, as the launchpad does, queued by the repo's dagster.yaml
(QueuedRunCoordinator), run by the daemon, and each cleanup's orphan_deletions metadata is read
back from the shared PostgreSQL event log. Headless Chromium loads the asset graph, the diff's and the
plan's pages and finds them rendered: typed times, sizes, shares and tables, no error banner.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest
import requests
import sqlalchemy as sa
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError
from sqlalchemy.engine import make_url

from heimdall_storage_pipeline.defs.materializations import latest_metadata
from heimdall_storage_pipeline.local.browser import ERROR_MARKERS, dismiss_first_visit, rendered_text
from heimdall_storage_pipeline.local.postgres import create_database, drop_database
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS, free_ports
from heimdall_storage_pipeline_tests.conftest import key_source, write_policy
from heimdall_storage_pipeline_tests.defs.automation.support import seed_bucket, soon
from heimdall_storage_pipeline_tests.helpers import make_reference_table

REPO = Path(__file__).resolve().parents[3]
DAGSTER = str(Path(sys.executable).parent / "dagster")
START_SECONDS = 180
RUN_SECONDS = 240


def _psycopg2_url(url: str) -> str:
    """Name the driver: with SQLAlchemy 2.1 a bare postgresql:// means psycopg 3, which is not installed."""
    return make_url(url).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def _wait(what: str, deadline: float, probe: Callable[[], object], log: Path,
          server: subprocess.Popen[bytes] | None = None) -> object:
    """Poll ``probe`` until it returns something truthy; fail with the server log at the deadline."""
    while True:
        if server is not None and server.poll() is not None:
            pytest.fail(f"dagster dev exited with {server.returncode}:\n{log.read_text()[-6000:]}")
        try:
            found = probe()
        except (requests.RequestException, DagsterGraphQLClientError):
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; dagster dev log:\n{log.read_text()[-6000:]}")
        time.sleep(0.5)  # poll interval, not synchronisation


@pytest.fixture
def dagster_dev(
    tmp_path: Path, pg_admin_url: str, seaweed: SeaweedFS, database_url: str, monkeypatch: pytest.MonkeyPatch,
    make_bucket: Callable[[str], str], db_engine: sa.Engine,
) -> Iterator[tuple[DagsterGraphQLClient, dg.DagsterInstance, str, Path, str]]:
    bucket = make_bucket("ui")
    refs = seed_bucket(seaweed.client(), bucket, referenced=6, orphans=2)
    query = make_reference_table(db_engine, "refs_ui", refs)
    policy = write_policy(tmp_path, {bucket: {"min_age": "1s", "references": [key_source(query)]}})

    dagster_db = create_database(pg_admin_url, prefix="dagster_e2e")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "HEIMDALL_", "DAGSTER_"))}
    env.update(seaweed.env())
    env.update({
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_URL": _psycopg2_url(dagster_db),
        "HEIMDALL_DATABASE_URL": database_url,
        "HEIMDALL_AUDIT_DB_URL": database_url,
        "HEIMDALL_STORAGE_POLICY": str(policy),
        "HEIMDALL_MANIFEST_ROOT": str(tmp_path / "manifests"),
        # Schedules and sensors stay off: this test drives the runs itself.
        "HEIMDALL_AUTOMATION_STATUS": "stopped",
    })
    (port,) = free_ports(1)
    log = tmp_path / "dagster-dev.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [DAGSTER, "dev", "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO / "workspace.yaml")],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait("the webserver", time.monotonic() + START_SECONDS,
              lambda: requests.get(f"http://127.0.0.1:{port}/server_info", timeout=5).ok, log, server)
        monkeypatch.setenv("DAGSTER_PG_URL", _psycopg2_url(dagster_db))
        instance = dg.DagsterInstance.from_config(str(home))
        try:
            yield (DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=60), instance, bucket, log,
                   f"http://127.0.0.1:{port}")
        finally:
            instance.dispose()
    finally:
        # dagster dev shuts its webserver, daemon and code server down on SIGTERM; signal the group.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        drop_database(pg_admin_url, dagster_db)


def _launch(client: DagsterGraphQLClient, log: Path, job: str, run_config: dict, tags: dict | None = None) -> str:
    # The code location may still be loading right after the webserver answers.
    return str(_wait(f"{job} to be accepted", time.monotonic() + START_SECONDS,
                     lambda: client.submit_job_execution(job, run_config=run_config, tags=tags), log))


def _until_done(client: DagsterGraphQLClient, instance: dg.DagsterInstance, run_id: str, log: Path,
                expect: dg.DagsterRunStatus = dg.DagsterRunStatus.SUCCESS) -> None:
    status = _wait(f"run {run_id}", time.monotonic() + RUN_SECONDS,
                   lambda: (s := client.get_run_status(run_id)) in (
                       dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED) and s,
                   log)
    if status != expect:
        events = "\n".join(e.message for e in instance.all_logs(run_id) if e.message)
        pytest.fail(f"run {run_id} ended {status}:\n{events[-6000:]}")


def _assert_the_browser_renders_the_lineage_and_metadata(base: str, bucket: str, plan_id: str) -> None:
    """Headless Chromium loads the real pages: the asset graph, the diff's typed metadata, the plan."""
    dismiss_first_visit(base)
    pages = {
        "lineage": rendered_text(f"{base}/assets/orphan_deletions?view=lineage&lineageScope=upstream&lineageDepth=4"),
        "diff": rendered_text(f"{base}/assets/orphan_diff?partition={bucket}"),
        "plan": rendered_text(f"{base}/assets/orphan_deletions?partition={bucket}"),
    }
    for name, text in pages.items():
        assert not [marker for marker in ERROR_MARKERS if marker in text], f"{name} page shows an error: {text[:3000]}"
    for asset in ("bucket_inventory", "referenced_keys", "orphan_diff", "orphan_deletions", "storage_scan"):
        assert f"| {asset} |" in pages["lineage"], f"{asset} is not in the asset graph: {pages['lineage'][:3000]}"
    diff = pages["diff"]
    assert "| Row count | 2 |" in diff  # dagster/row_count: the orphan manifest's rows
    assert re.search(r"\| as_of \| [^|]+ \| [A-Z][a-z]{2} \d{1,2}(, \d{4})?, \d{1,2}:\d{2}:\d{2} [AP]M UTC \|",
                     diff), diff[:3000]
    assert re.search(r"\| orphan_share_bytes_percent \| [^|]+ \| \d+\.\d % \|", diff)
    assert re.search(r"\| total_size \| [^|]+ \| \d+(\.\d)? (B|KiB) \|", diff)
    # The tables render as tables: their column headers, then a row of cells.
    assert re.search(r"\| age_histogram \| [^|]+ \| Show schema \| age \| objects \| size \| bytes \| 0-1 d \|", diff)
    assert re.search(r"\| largest_eligible_orphans \| [^|]+ \| Show schema \| key \| size \| bytes \| last_modified \|",
                     diff)
    plan = pages["plan"]
    assert "| plan_id | " in plan and f"| {plan_id} |" in plan
    assert re.search(r"\| plan_largest \| [^|]+ \| Show schema \| key \| size \| bytes \| last_modified \|", plan)


@pytest.mark.timeout(600)
def test_scan_plan_and_apply_through_the_ui_server(
    dagster_dev: tuple[DagsterGraphQLClient, dg.DagsterInstance, str, Path, str], seaweed: SeaweedFS
) -> None:
    client, instance, bucket, log, base = dagster_dev
    scan_id = _launch(client, log, "storage_scan_job",
                      {"ops": {"orphan_diff": {"config": {"as_of": soon()}}}}, {"dagster/partition": bucket})
    _until_done(client, instance, scan_id, log)
    diff = latest_metadata(instance, "orphan_diff", bucket)
    assert diff is not None and diff["eligible_orphan_count"] == 2

    cleanup_id = _launch(client, log, "delete_orphans_job",
                         {"ops": {"delete_orphans": {"config": {"dry_run": True, "buckets": [bucket]}}}})
    _until_done(client, instance, cleanup_id, log)
    run = instance.get_run_by_id(cleanup_id)
    assert run is not None and run.tags.get("heimdall/kind") == "cleanup"

    deletions = latest_metadata(instance, "orphan_deletions", bucket)
    assert deletions is not None
    assert deletions["dry_run"] is True
    assert deletions["candidates"] == 2 and deletions["would_delete_count"] == 2 and deletions["deleted_count"] == 0
    # A dry run: every object is still there.
    assert sum(1 for _ in seaweed.client().list_objects(bucket, recursive=True)) == 8
    _assert_the_browser_renders_the_lineage_and_metadata(base, bucket, deletions["plan_id"])

    # The dry run is a plan; the launchpad's config names it in a live run, which deletes its keys once.
    apply = {"ops": {"delete_orphans": {"config": {"dry_run": False, "plan": deletions["plan_id"]}}}}
    _until_done(client, instance, _launch(client, log, "delete_orphans_job", apply), log)
    applied = latest_metadata(instance, "orphan_deletions", bucket)
    assert applied is not None and (applied["plan_id"], applied["deleted_count"]) == (deletions["plan_id"], 2)
    assert sum(1 for _ in seaweed.client().list_objects(bucket, recursive=True)) == 6
    _until_done(client, instance, _launch(client, log, "delete_orphans_job", apply), log, dg.DagsterRunStatus.FAILURE)
    refused = latest_metadata(instance, "orphan_deletions", bucket)
    assert refused is not None and refused["refused"] is True and "already applied" in refused["refusal_reason"]
