"""Faults as an operator meets them, through the CLI and the daemon on real servers: two live
cleanups launched at once, a run killed mid-query, credentials with every awkward character."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from heimdall_storage_pipeline.core.audit import deletion_audit
from heimdall_storage_pipeline.local.postgres import create_database, drop_database
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS
from heimdall_storage_pipeline_tests.conftest import key_source, write_policy
from heimdall_storage_pipeline_tests.defs.automation.test_ui_e2e import _psycopg2_url
from heimdall_storage_pipeline_tests.helpers import make_reference_table, put_objects

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODULE = ("-m", "heimdall_storage_pipeline.definitions")
PASSWORD = "p@ss/w:rd#x%?y z"  # every character a URL parser trips over


@dataclass
class Shell:
    env: dict[str, str]
    home: Path
    bucket: str

    def start(self, *command: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen([str(BIN / command[0]), *command[1:]], cwd=REPO, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / command[0]), *command[1:]], cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=300, check=False)

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))


def _until(what: str, probe: Callable[[], object], seconds: float) -> object:
    deadline = time.monotonic() + seconds
    while not (found := probe()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)  # poll interval, not synchronisation
    return found


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture
def shell(tmp_path: Path, pg_admin_url: str, seaweed: SeaweedFS, database_url: str, make_bucket: Callable[[str], str],
          db_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shell]:
    """The README's environment over a PostgreSQL-backed instance whose daemon polls run monitoring every second."""
    bucket = make_bucket("faults")
    dagster_db = create_database(pg_admin_url, prefix="dagster_faults")
    home = tmp_path / "dagster_home"
    home.mkdir()
    instance_config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    assert instance_config["run_monitoring"]["enabled"] is True  # as shipped
    instance_config["run_monitoring"]["poll_interval_seconds"] = 1
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "HEIMDALL_", "DAGSTER_"))}
    env.update({**seaweed.env(), "DAGSTER_HOME": str(home), "DAGSTER_PG_URL": _psycopg2_url(dagster_db),
                "HEIMDALL_DATABASE_URL": database_url, "HEIMDALL_AUDIT_DB_URL": database_url,
                "HEIMDALL_MANIFEST_ROOT": str(tmp_path / "manifests"), "HEIMDALL_AUTOMATION_STATUS": "stopped"})
    monkeypatch.setenv("DAGSTER_PG_URL", env["DAGSTER_PG_URL"])
    try:
        yield Shell(env, home, bucket)
    finally:
        drop_database(pg_admin_url, dagster_db)


def _policy(shell: Shell, tmp_path: Path, query: str, **source: object) -> None:
    path = write_policy(tmp_path, {shell.bucket: {"min_age": "1s", "batch_size": 50,
                                                  "references": [{**key_source(query), **source}]}})
    shell.env["HEIMDALL_STORAGE_POLICY"] = str(path)


def test_two_live_cleanups_launched_at_once_never_delete_a_key_twice(shell, tmp_path, seaweed, db_engine):
    client = seaweed.client()
    put_objects(client, shell.bucket, [f"gone/{i:04d}.npy" for i in range(1500)])
    put_objects(client, shell.bucket, ["kept/0.npy"])
    _policy(shell, tmp_path, make_reference_table(db_engine, "refs_race", ["kept/0.npy"]))
    scan = shell.run("dagster", "job", "execute", *MODULE, "-j", "storage_scan_job", "--tags",
                     json.dumps({"dagster/partition": shell.bucket}))
    assert scan.returncode == 0, scan.stderr[-3000:]
    config = tmp_path / "live.yaml"
    config.write_text(yaml.safe_dump({"ops": {"delete_orphans": {"config": {
        "dry_run": False, "allow_mass_delete": True, "lock_wait_seconds": 0, "delete_concurrency": 1}}}}))
    runs = [shell.start("dagster", "job", "execute", *MODULE, "-j", "delete_orphans_job", "-c", str(config),
                        log=tmp_path / f"cleanup-{i}.log") for i in range(2)]
    for run in runs:
        run.wait(timeout=600)
    logs = [(tmp_path / f"cleanup-{i}.log").read_text() for i in range(2)]
    with db_engine.connect() as connection:
        deleted = connection.execute(sa.select(deletion_audit.c.key, sa.func.count()).where(
            deletion_audit.c.bucket == shell.bucket, deletion_audit.c.status == "deleted",
        ).group_by(deletion_audit.c.key)).all()
    assert len(deleted) == 1500 and {count for _, count in deleted} == {1}
    assert {o.object_name for o in client.list_objects(shell.bucket, recursive=True)} == {"kept/0.npy"}
    # Whichever came second either found the bucket held, or cleaned after the first and found nothing left.
    assert [run.returncode for run in runs].count(0) >= 1
    for run, log in zip(runs, logs, strict=True):
        if run.returncode != 0:
            assert f"another cleanup of '{shell.bucket}' is running" in log


@pytest.mark.timeout(600)
def test_a_killed_run_is_failed_and_its_query_cancelled(shell, tmp_path, seaweed, db_engine):
    put_objects(seaweed.client(), shell.bucket, ["a.npy"])
    # A source that would run for ten minutes: the scan hangs in referenced_keys.
    _policy(shell, tmp_path, "SELECT 'a.npy' FROM pg_sleep(600)", statement_timeout="1d")
    daemon = shell.start("dagster-daemon", "run", "-w", str(REPO / "workspace.yaml"), log=tmp_path / "daemon.log")
    scan = shell.start("dagster", "job", "execute", *MODULE, "-j", "storage_scan_job", "--tags",
                       json.dumps({"dagster/partition": shell.bucket, "dagster/max_runtime": "20"}),
                       log=tmp_path / "scan.log")
    sleeping = sa.text("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(600)%' "
                       "AND state = 'active' AND pid <> pg_backend_pid()")

    def sleepers() -> int:
        with db_engine.connect() as connection:
            return int(connection.execute(sleeping).scalar() or 0)

    try:
        with shell.instance() as instance:
            _until("the scan to hang in its reference query", sleepers, 180)
            (run,) = instance.get_runs(dg.RunsFilter(job_name="storage_scan_job"))
            assert run.status == dg.DagsterRunStatus.STARTED
            os.killpg(scan.pid, signal.SIGKILL)
            scan.wait(timeout=30)
            # The server notices the client is gone instead of sleeping on for ten minutes.
            _until("the orphaned query to be cancelled", lambda: sleepers() == 0, 60)
            # The daemon's run monitoring fails the dead run once it outlives its max runtime.
            _until("the killed run to be marked failed", lambda: instance.get_run_by_id(run.run_id).status
                   == dg.DagsterRunStatus.FAILURE, 180)
    finally:
        _stop(daemon)
        if scan.poll() is None:
            os.killpg(scan.pid, signal.SIGKILL)


def test_a_password_with_every_awkward_character_never_shows(shell, tmp_path, seaweed, db_engine):
    put_objects(seaweed.client(), shell.bucket, ["a.npy"])
    _policy(shell, tmp_path, "SELECT 'a.npy'")
    unreachable = f"postgresql+psycopg2://heimdall:{PASSWORD}@127.0.0.1:1/heimdall"
    shell.env.update({"HEIMDALL_DATABASE_URL": unreachable, "HEIMDALL_AUDIT_DB_URL": unreachable})
    outputs = []
    scan = shell.run("dagster", "job", "execute", *MODULE, "-j", "storage_scan_job", "--tags",
                     json.dumps({"dagster/partition": shell.bucket}))
    live = tmp_path / "live.yaml"
    live.write_text(yaml.safe_dump({"ops": {"delete_orphans": {"config": {"dry_run": False}}}}))
    cleanup = shell.run("dagster", "job", "execute", *MODULE, "-j", "delete_orphans_job", "-c", str(live))
    show = shell.run("heimdall-storage", "plan", "show", f"{shell.bucket}:00000000")
    migrate = shell.run("heimdall-storage", "migrate")
    for done in (scan, cleanup, show, migrate):
        assert done.returncode != 0
        outputs += [done.stdout, done.stderr]
    assert "127.0.0.1:1" in scan.stdout + scan.stderr  # the failure names where it went
    with shell.instance() as instance:
        runs = instance.get_runs()
        assert len(runs) == 2
        for run in runs:
            outputs += [json.dumps(entry.to_json()) for entry in instance.all_logs(run.run_id)]
            export = tmp_path / f"{run.run_id}.gz"
            done = shell.run("dagster", "debug", "export", run.run_id, str(export))
            assert done.returncode == 0, done.stderr[-2000:]
            outputs.append(gzip.decompress(export.read_bytes()).decode("utf-8", "replace"))
    outputs += [path.read_text("utf-8", "replace") for path in shell.home.rglob("*") if path.is_file()
                and path.suffix in (".out", ".err", ".log", ".complete", "")]
    for text in outputs:
        for fragment in (PASSWORD, "ss/w:rd#x", "rd#x%?y", "%?y z", "p%40ss"):
            assert fragment not in text, f"{fragment!r} leaked"
