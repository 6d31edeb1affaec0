"""The scan and a dry-run cleanup on two Celery workers (RabbitMQ broker, PostgreSQL instance, s3:// manifests)
give the same results as an in-process run of the same jobs on the same data."""

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from kombu import Connection

from heimdall_storage_pipeline.core.clock import isoformat_utc, utc_now
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.defs.executors import (
    CELERY_BACKEND_ENV,
    CELERY_BROKER_ENV,
    CELERY_QUEUE_ENV,
    DEFAULT_CELERY_BROKER,
    EXECUTOR_ENV,
    RESULT_QUEUE_EXPIRES_SECONDS,
    CelerySettings,
    ExecutorSelectionError,
    job_from_env,
    scale_out_executor,
)
from heimdall_storage_pipeline.local.postgres import create_database, drop_database
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS
from heimdall_storage_pipeline_tests.conftest import key_source, write_policy
from heimdall_storage_pipeline_tests.helpers import make_reference_table, put_objects

BROKER = os.environ.get("HEIMDALL_TEST_CELERY_BROKER", DEFAULT_CELERY_BROKER)
REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_START_SECONDS = 90.0
WORKER_STOP_SECONDS = 30.0
MIN_AGE_SECONDS = 1
SCAN = "storage_scan_job"
CLEANUP = "delete_orphans_job"
DIFF_COUNTS = (
    "object_count", "total_bytes", "referenced_count", "orphan_count", "orphan_bytes", "eligible_orphan_count",
    "eligible_orphan_bytes", "young_orphan_count", "young_orphan_bytes", "unparseable_object_count",
    "dangling_reference_count", "health_status", "orphan_share_count", "orphan_share_bytes",
)
DELETION_COUNTS = (
    "dry_run", "candidates", "deleted_count", "deleted_bytes", "would_delete_count", "would_delete_bytes",
    "failed_count", "batches",
)


def _require_broker() -> None:
    try:
        with Connection(BROKER, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:  # any failure means the broker cannot be used
        pytest.fail(f"RabbitMQ is not reachable at {BROKER} ({exc}); it must run for this test")


def _delete_queue(queue: str) -> None:
    with Connection(BROKER, connect_timeout=5) as connection:
        connection.default_channel.queue_delete(queue)


@dataclass
class Worker:
    name: str
    log: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class CeleryWorkers:
    queue: str
    workers: list[Worker] = field(default_factory=list)

    @property
    def pids(self) -> set[int]:
        return {worker.process.pid for worker in self.workers}

    @property
    def names(self) -> set[str]:
        return {worker.name for worker in self.workers}

    def start(self, env: dict[str, str], log_dir: Path, count: int) -> None:
        for index in range(count):
            name = f"heimdall-test-{index}-{secrets.token_hex(3)}"
            log = log_dir / f"{name}.log"
            command = [
                sys.executable, "-m", "celery", "-A", "heimdall_storage_pipeline.defs.celery_worker", "worker",
                "--queues", self.queue, "--hostname", f"{name}@%h", "--pool", "solo", "--prefetch-multiplier", "1",
                "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
            ]
            with log.open("wb") as sink:
                process = subprocess.Popen(
                    command, env=env, cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
                )
            self.workers.append(Worker(name=name, log=log, process=process))

    def wait_ready(self, deadline_seconds: float) -> None:
        """Poll each worker's log for Celery's ``ready.`` line; fail early if one exits."""
        deadline = time.monotonic() + deadline_seconds
        pending = list(self.workers)
        while pending:
            for worker in list(pending):
                if worker.process.poll() is not None:
                    pytest.fail(f"worker {worker.name} exited with {worker.process.returncode}:\n{worker.log_text()}")
                if " ready." in worker.log_text():
                    pending.remove(worker)
            if pending and time.monotonic() > deadline:
                logs = "\n".join(f"--- {w.name}\n{w.log_text()[-3000:]}" for w in pending)
                pytest.fail(f"{len(pending)} worker(s) not ready after {deadline_seconds:.0f} s:\n{logs}")
            if pending:
                time.sleep(0.2)

    def stop(self, deadline_seconds: float) -> None:
        """Warm shutdown (SIGTERM to each worker's session), then SIGKILL past the deadline."""
        for worker in self.workers:
            if worker.process.poll() is None:
                os.killpg(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + deadline_seconds
        for worker in self.workers:
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait(timeout=10)


@pytest.fixture
def postgres_instance(pg_admin_url: str, tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance whose run, event-log and schedule storage live in a fresh PostgreSQL database."""
    url = create_database(pg_admin_url, prefix="heimdall_dagster")
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = {"storage": {"postgres": {"postgres_url": url}}, "telemetry": {"enabled": False}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        yield instance
    finally:
        instance.dispose()
        drop_database(pg_admin_url, url)


def _materializations(instance: dg.DagsterInstance, run_id: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = entry.asset_materialization
        assert materialization is not None
        found[materialization.asset_key.to_user_string()] = {k: v.value for k, v in materialization.metadata.items()}
    return found


def _step_pids(instance: dg.DagsterInstance, run_id: str) -> dict[str, int]:
    return {
        entry.step_key: entry.dagster_event.pid
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
        if entry.step_key and entry.dagster_event is not None and entry.dagster_event.pid is not None
    }


def _celery_hosts(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """Step key -> the worker hostname the step's 'Executing steps ... in celery worker' event names."""
    hosts: dict[str, str] = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = entry.dagster_event
        if event is not None and "in celery worker" in (event.message or ""):
            metadata = event.engine_event_data.metadata
            hosts[str(entry.step_key)] = str(metadata["Celery worker"].value)
    return hosts


@dataclass
class Outcome:
    diff: dict[str, Any]
    deletions: dict[str, Any]
    would_delete: set[str]
    orphans: set[str]
    scan_run_id: str
    cleanup_run_id: str


def _outcome(instance: dg.DagsterInstance, store: ManifestStore, scan_run_id: str, cleanup_run_id: str) -> Outcome:
    diff = _materializations(instance, scan_run_id)["orphan_diff"]
    deletions = _materializations(instance, cleanup_run_id)["orphan_deletions"]
    deleted = store.read_table(str(deletions["manifest_uri"]), columns=["key", "outcome"]).to_pylist()
    orphans = store.read_table(str(diff["manifest_uri"]), columns=["key"]).column("key").to_pylist()
    return Outcome(
        diff={k: diff[k] for k in DIFF_COUNTS},
        deletions={k: deletions[k] for k in DELETION_COUNTS},
        would_delete={row["key"] for row in deleted if row["outcome"] == "would_delete"},
        orphans=set(orphans),
        scan_run_id=scan_run_id,
        cleanup_run_id=cleanup_run_id,
    )


def test_scan_and_dry_run_cleanup_on_celery_workers_equal_an_in_process_run(
    seaweed: SeaweedFS,
    make_bucket: Callable[[str], str],
    database_url: str,
    db_engine: sa.Engine,
    postgres_instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _require_broker()
    bucket, manifest_bucket = make_bucket("celery"), make_bucket("manifests")
    kept = [f"kept/{i:03d}.npy" for i in range(12)]
    orphans = [f"gone/{i:03d}.npy" for i in range(5)] + ["gone/ünïcode key.npy", "gone/a+b (1).npy", "zz-top.npy"]
    put_objects(seaweed.client(), bucket, [*kept, *orphans])
    put_at = utc_now()
    query = make_reference_table(db_engine, f"refs_{secrets.token_hex(3)}", [*kept, "kept/missing.npy"])
    policy = write_policy(
        tmp_path, {bucket: {"min_age": f"{MIN_AGE_SECONDS}s", "batch_size": 3, "references": [key_source(query)]}}
    )
    queue = f"heimdall-test-{secrets.token_hex(6)}"  # one queue per test run: parallel runs never share steps
    env = {
        **seaweed.env(),
        "HEIMDALL_DATABASE_URL": database_url,
        "HEIMDALL_AUDIT_DB_URL": database_url,
        "HEIMDALL_MANIFEST_ROOT": f"s3://{manifest_bucket}/manifests",
        "HEIMDALL_STORAGE_POLICY": str(policy),
        "DAGSTER_HOME": str(postgres_instance.root_directory),
        CELERY_BROKER_ENV: BROKER,
        CELERY_BACKEND_ENV: "rpc://",
        CELERY_QUEUE_ENV: queue,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(EXECUTOR_ENV, raising=False)
    store = ManifestStore(root=env["HEIMDALL_MANIFEST_ROOT"], s3=seaweed.settings())

    workers = CeleryWorkers(queue=queue)
    try:
        # Workers boot while the in-process reference run goes.
        workers.start({**os.environ, EXECUTOR_ENV: "celery", "PYTHONUNBUFFERED": "1"}, tmp_path, count=2)

        # Every object must be past the minimum age: the cleanup re-validates with the real clock.
        remaining = MIN_AGE_SECONDS + 1 - (utc_now() - put_at).total_seconds()
        if remaining > 0:
            time.sleep(remaining)
        scan_config = {"ops": {"orphan_diff": {"config": {"as_of": isoformat_utc(utc_now())}}}}
        cleanup_config = {"ops": {"delete_orphans": {"config": {"buckets": [bucket]}}}}  # dry run by default

        scan_job = job_from_env(SCAN)
        assert scan_job.executor_def.name != "heimdall_celery"
        local_scan = scan_job.execute_in_process(instance=postgres_instance, partition_key=bucket,
                                                 run_config=scan_config)
        local_cleanup = job_from_env(CLEANUP).execute_in_process(instance=postgres_instance,
                                                                 run_config=cleanup_config)
        local = _outcome(postgres_instance, store, local_scan.run_id, local_cleanup.run_id)

        monkeypatch.setenv(EXECUTOR_ENV, "celery")
        assert job_from_env(SCAN).executor_def.name == "heimdall_celery"
        assert job_from_env(CLEANUP).executor_def.name == "heimdall_celery"
        workers.wait_ready(WORKER_START_SECONDS)
        celery_scan = dg.execute_job(
            dg.build_reconstructable_job("heimdall_storage_pipeline.defs.executors", "job_from_env", (SCAN,)),
            instance=postgres_instance, run_config=scan_config, tags={"dagster/partition": bucket},
        )
        assert celery_scan.success, [e.message for e in celery_scan.all_events if e.is_failure]
        celery_cleanup = dg.execute_job(
            dg.build_reconstructable_job("heimdall_storage_pipeline.defs.executors", "job_from_env", (CLEANUP,)),
            instance=postgres_instance, run_config=cleanup_config,
        )
        assert celery_cleanup.success, [e.message for e in celery_cleanup.all_events if e.is_failure]
        distributed = _outcome(postgres_instance, store, celery_scan.run_id, celery_cleanup.run_id)

        # The steps ran in the two workers, not in this process (RabbitMQ hands tasks round-robin to both).
        used: set[int] = set()
        for run_id, steps in ((celery_scan.run_id, 3), (celery_cleanup.run_id, 1)):
            pids = _step_pids(postgres_instance, run_id)
            hosts = _celery_hosts(postgres_instance, run_id)
            assert len(pids) >= steps and set(pids.values()) <= workers.pids, (pids, workers.pids)
            assert set(hosts) == set(pids) and {h.split("@")[0] for h in hosts.values()} <= workers.names
            used |= set(pids.values())
        assert used == workers.pids
        # Nothing went through an IO manager to a local disk: the only files under DAGSTER_HOME are the
        # instance config and the steps' captured stdout/stderr (compute logs).
        home = Path(postgres_instance.root_directory)
        files = [f.relative_to(home) for f in home.rglob("*") if f.is_file()]
        assert [f for f in files if f.name != "dagster.yaml" and "compute_logs" not in f.parts] == []
        assert set(_step_pids(postgres_instance, local_scan.run_id).values()) == {os.getpid()}
        assert celery_scan.dagster_run.tags["dagster/partition"] == bucket
    finally:
        workers.stop(WORKER_STOP_SECONDS)
        _delete_queue(queue)

    # Both runs diffed and dry-ran the same data to the same results, and the results are right.
    assert distributed.diff == local.diff
    assert distributed.deletions == local.deletions
    assert distributed.would_delete == local.would_delete == set(orphans)
    assert distributed.orphans == local.orphans == set(orphans)
    assert local.diff["dangling_reference_count"] == 1 and local.deletions["dry_run"] is True
    assert distributed.scan_run_id != local.scan_run_id


def test_executor_selection_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (EXECUTOR_ENV, CELERY_BROKER_ENV, CELERY_BACKEND_ENV, CELERY_QUEUE_ENV):
        monkeypatch.delenv(name, raising=False)
    assert scale_out_executor() is None
    monkeypatch.setenv(EXECUTOR_ENV, "Celery")
    executor = scale_out_executor()
    assert executor is not None and executor.name == "heimdall_celery"
    assert CelerySettings.from_env().executor_config() == {
        "broker": DEFAULT_CELERY_BROKER, "backend": "rpc://",
        "config_source": {"task_default_queue": "dagster", "result_expires": RESULT_QUEUE_EXPIRES_SECONDS},
    }
    monkeypatch.setenv(CELERY_BROKER_ENV, "pyamqp://heimdall:secret@rabbit:5672//")
    monkeypatch.setenv(CELERY_QUEUE_ENV, "heimdall")
    config = CelerySettings.from_env().executor_config()
    assert config["broker"] == {"env": CELERY_BROKER_ENV}  # read at run time, never stored in the job snapshot
    assert config["config_source"]["task_default_queue"] == "heimdall"
    monkeypatch.setenv(EXECUTOR_ENV, "k8s")
    with pytest.raises(ExecutorSelectionError, match="HEIMDALL_EXECUTOR"):
        scale_out_executor()
