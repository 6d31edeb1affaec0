"""The production topology on real processes: compose.yaml's services, each its own process on loopback.

The code server (gRPC), the webserver and the daemon (both loading the code from the code server through
the image's workspace.yaml) and the metrics exporter run with the commands and environments compose.yaml
gives them, read through ``docker-compose config``, against a PostgreSQL-backed instance (the shipped
dagster.yaml), a SeaweedFS of their own and a Heimdall-shaped database seeded as the demo seeds it.
Through the UI's GraphQL the test turns the nightly schedule and the chain sensor on and triggers the
schedule's 03:00 tick; the daemon launches the scan through the code server, the chain sensor launches
a dry-run cleanup, GraphQL shows the runs and the exporter serves the figures. One bucket is enabled
(the synthetic IQ one: JSON references, a deleted dataset's objects, a dangling row): every run is a
process that imports Dagster, and the per-bucket fan-out is the schedules' own tests' subject.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import requests
import sqlalchemy as sa
import yaml
from dagster_graphql import DagsterGraphQLClient

from heimdall_storage_pipeline.core.clock import utc_now
from heimdall_storage_pipeline.defs.automation.schedules import CHAIN_TAG, DAILY_CLEANUP, SCAN_JOB
from heimdall_storage_pipeline.defs.automation.sensors import DELETE_JOB, DIFF_TAG, DRY_RUN_TAG
from heimdall_storage_pipeline.defs.materializations import latest_metadata
from heimdall_storage_pipeline.local import heimdall_db
from heimdall_storage_pipeline.local.demo import DEMO_MIN_AGE_SECONDS, write_demo_policy
from heimdall_storage_pipeline.local.postgres import create_database, drop_database
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS, free_ports
from heimdall_storage_pipeline_tests.defs.automation.test_ui_e2e import _psycopg2_url
from heimdall_storage_pipeline_tests.defs.test_celery_executor import BROKER, _delete_queue, _require_broker
from heimdall_storage_pipeline_tests.deploy.support import (
    REPO,
    LocalService,
    compose_services,
    local_workspace,
    option,
    stop_all,
    wait_for,
)
from heimdall_storage_pipeline_tests.events_support import minio_notification, minio_record, stream
from heimdall_storage_pipeline_tests.exporter.support import http_get, http_json, parse_metrics, sample

TOPOLOGY = ("code-server", "webserver", "daemon", "exporter")
LOCATION = "heimdall_storage_pipeline"
REPOSITORY = "__repository__"  # the repository a Definitions object becomes
CHAIN_SENSOR = "scan_cleanup_chain_sensor"
SENSOR_NAME_TAG = "dagster/sensor_name"  # Dagster's tag on every run a sensor requested
BUCKET = heimdall_db.SYNTHETIC_BUCKET
MANIFEST_BUCKET = "heimdall-storage-manifests"
START_SECONDS = 180
RUNS_SECONDS = 300
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")

WORKSPACE_QUERY = """
query { workspaceOrError { __typename ... on Workspace { locationEntries {
  name loadStatus displayMetadata { key value }
  locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""
START_SCHEDULE = """
mutation ($selector: ScheduleSelector!) { startSchedule(scheduleSelector: $selector) {
  __typename ... on ScheduleStateResult { scheduleState { status } } ... on PythonError { message } } }
"""
START_SENSOR = """
mutation ($selector: SensorSelector!) { startSensor(sensorSelector: $selector) {
  __typename ... on Sensor { sensorState { status } } ... on PythonError { message } } }
"""
SCHEDULE_TICK = """
mutation ($selector: ScheduleSelector!, $timestamp: Float) {
  scheduleDryRun(selectorData: $selector, timestamp: $timestamp) {
    __typename
    ... on DryRunInstigationTick { evaluationResult {
      runRequests { runKey jobName runConfigYaml tags { key value } } skipReason error { message } } }
    ... on PythonError { message } } }
"""
RUNS_QUERY = """
query ($filter: RunsFilter) { runsOrError(filter: $filter) { __typename ... on Runs { results {
  runId jobName status tags { key value }
  repositoryOrigin { repositoryLocationName repositoryLocationMetadata { key value } } } } } }
"""


class Topology:
    """The four services, the UI's GraphQL endpoint and the instance they share."""

    def __init__(self, services: dict[str, LocalService], instance: dg.DagsterInstance, code_server_port: int):
        self.services = services
        self.instance = instance
        self.code_server_port = code_server_port
        self.ui_port = int(services["webserver"].port or 0)
        self.ui = f"http://127.0.0.1:{self.ui_port}"
        self.exporter = f"http://127.0.0.1:{services['exporter'].port}"

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{service.log_tail(3000)}" for name, service in self.services.items())

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        response = requests.post(f"{self.ui}/graphql", json={"query": query, "variables": variables}, timeout=60)
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body["errors"]
        return dict(body["data"])

    def runs(self, run_ids: list[str] | None = None, **tags: str) -> list[dict[str, Any]]:
        """The runs the UI lists for these ids and tags."""
        runs_filter: dict[str, Any] = {"tags": [{"key": k, "value": v} for k, v in tags.items()]}
        if run_ids:
            runs_filter["runIds"] = run_ids
        return list(self.graphql(RUNS_QUERY, filter=runs_filter)["runsOrError"]["results"])

    def run_events(self, run_id: str) -> str:
        return "\n".join(f"{e.dagster_event_type}: {e.message}" for e in self.instance.all_logs(run_id))[-6000:]


@dataclass
class HeimdallWorld:
    seaweed: SeaweedFS
    seeded: heimdall_db.SeededWorld
    seeded_at: datetime


@pytest.fixture
def heimdall_world(tmp_path: Path, database_url: str) -> Iterator[HeimdallWorld]:
    """A SeaweedFS of its own (Heimdall's fixed bucket names) seeded like the demo, and its database."""
    seaweed = SeaweedFS(workdir=tmp_path / "seaweedfs").start()
    try:
        client = seaweed.client()
        engine = sa.create_engine(database_url)
        seeded = heimdall_db.SeededWorld()
        heimdall_db.seed_old_objects(engine, client, seeded)
        engine.dispose()
        client.make_bucket(MANIFEST_BUCKET)
        yield HeimdallWorld(seaweed, seeded, utc_now())
    finally:
        seaweed.stop()


@pytest.fixture
def topology(
    tmp_path: Path, pg_admin_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch,
    heimdall_world: HeimdallWorld,
) -> Iterator[Topology]:
    seaweed = heimdall_world.seaweed
    dagster_db = _psycopg2_url(create_database(pg_admin_url, prefix="dagster_topology"))
    # What an operator puts in deploy/docker/.env, pointed at this machine's servers.
    variables = {
        **seaweed.env(),
        "HEIMDALL_DATABASE_URL": database_url,
        "DAGSTER_PG_URL": dagster_db,
        "HEIMDALL_STORAGE_POLICY": str(_one_bucket_policy(tmp_path / "policy.yaml")),
        "HEIMDALL_MANIFEST_ROOT": f"s3://{MANIFEST_BUCKET}/pipeline",
        # Loaded switched off, so that the test turns on what it drives (and no hourly tick interferes).
        "HEIMDALL_AUTOMATION_STATUS": "stopped",
    }
    compose_model = compose_services(variables)
    assert set(TOPOLOGY) <= set(compose_model), sorted(compose_model)

    listening = ("code-server", "webserver", "exporter")
    ports = dict(zip((option(compose_model[name]["command"], "--port") for name in listening),
                     free_ports(len(listening)), strict=True))
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")  # the image's DAGSTER_HOME holds both files
    local_workspace(home / "workspace.yaml", ports, compose_model)
    container_home = compose_model["code-server"]["environment"]["DAGSTER_HOME"]
    services = {
        name: LocalService.from_compose(name, compose_model[name], ports, {container_home: str(home)}, tmp_path)
        for name in TOPOLOGY
    }
    code_server_port = ports[option(compose_model["code-server"]["command"], "--port")]
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_db)
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        # compose's order: the webserver and the daemon wait for a healthy code server.
        services["code-server"].start().wait_healthy(START_SECONDS)
        for name in ("webserver", "daemon", "exporter"):
            services[name].start()
        for name in ("webserver", "daemon", "exporter"):
            services[name].wait_healthy(START_SECONDS)
        yield Topology(services, instance, code_server_port)
    finally:
        stop_all([services[name] for name in reversed(TOPOLOGY)])
        instance.dispose()
        drop_database(pg_admin_url, dagster_db)


def _one_bucket_policy(path: Path) -> Path:
    """The demo's policy (Heimdall's, minimum ages in seconds) with only BUCKET enabled."""
    document = yaml.safe_load(write_demo_policy(path).read_text())
    for name, bucket in document["buckets"].items():
        bucket["enabled"] = name == BUCKET
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _three_am_tick() -> float:
    """A moment just before today's 03:00 UTC: the nightly schedule's next tick from there is 03:00."""
    return datetime.combine(utc_now().date(), time(3), tzinfo=UTC).timestamp() - 60


def _finished(topology: Topology, run_ids: list[str] | None = None, **tags: str) -> list[dict[str, Any]] | None:
    """The runs with these ids and tags once there are some and all have finished."""
    runs = topology.runs(run_ids, **tags)
    return runs if runs and all(run["status"] in FINISHED for run in runs) else None


def _assert_through_code_server(topology: Topology, run: dict[str, Any]) -> None:
    assert run["status"] == "SUCCESS", f"{run['jobName']} {run['runId']}:\n{topology.run_events(run['runId'])}"
    origin = run["repositoryOrigin"]
    metadata = {entry["key"]: entry["value"] for entry in origin["repositoryLocationMetadata"]}
    # Loaded from the gRPC server, not from a module in the webserver's or the daemon's process.
    assert origin["repositoryLocationName"] == LOCATION
    assert (metadata.get("host"), metadata.get("port")) == ("127.0.0.1", str(topology.code_server_port)), metadata
    # Queued by whoever asked for it, then dequeued and launched by the daemon's run coordinator.
    kinds = [e.dagster_event_type for e in topology.instance.all_logs(run["runId"]) if e.is_dagster_event]
    assert kinds.index(dg.DagsterEventType.RUN_ENQUEUED) < kinds.index(dg.DagsterEventType.RUN_STARTING) \
        < kinds.index(dg.DagsterEventType.RUN_START), kinds


@pytest.mark.timeout(900)
def test_compose_services_run_the_nightly_chain_end_to_end(
    topology: Topology, heimdall_world: HeimdallWorld
) -> None:
    world = heimdall_world.seeded
    client = heimdall_world.seaweed.client()
    objects_before = len(list(client.list_objects(BUCKET, recursive=True)))
    orphans = world.old_orphans[BUCKET]

    # The UI sees one code location, served by the code server over gRPC.
    def loaded() -> list[dict[str, Any]] | None:
        entries = topology.graphql(WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
        done = all(entry["loadStatus"] == "LOADED" for entry in entries)
        return entries if done else None

    (entry,) = wait_for("the code location to load in the webserver", START_SECONDS, loaded, topology.logs)
    assert entry["name"] == LOCATION and entry["locationOrLoadError"]["__typename"] == "RepositoryLocation", entry
    assert {"key": "port", "value": str(topology.code_server_port)} in entry["displayMetadata"]

    # Turn the nightly schedule and the chain sensor on, as an operator does in the UI.
    location = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}
    schedule = {**location, "scheduleName": DAILY_CLEANUP}
    started = topology.graphql(START_SCHEDULE, selector=schedule)["startSchedule"]
    assert started == {"__typename": "ScheduleStateResult", "scheduleState": {"status": "RUNNING"}}, started
    started = topology.graphql(START_SENSOR, selector={**location, "sensorName": CHAIN_SENSOR})["startSensor"]
    assert started == {"__typename": "Sensor", "sensorState": {"status": "RUNNING"}}, started

    # The seeded orphans must be past the demo policy's minimum age when the scan measures them.
    old_enough_at = heimdall_world.seeded_at + timedelta(seconds=DEMO_MIN_AGE_SECONDS + 1)
    wait_for("the seeded objects to pass the minimum age", DEMO_MIN_AGE_SECONDS + 5,
             lambda: utc_now() >= old_enough_at)

    # Trigger the schedule's 03:00 tick: the code server evaluates it; its run request is submitted as
    # the UI's "launch" does, and the daemon's run queue launches it through the code server.
    tick = topology.graphql(SCHEDULE_TICK, selector=schedule, timestamp=_three_am_tick())["scheduleDryRun"]
    evaluation = tick["evaluationResult"]
    assert evaluation["error"] is None and evaluation["skipReason"] is None, evaluation
    (request,) = evaluation["runRequests"]
    tags = {tag["key"]: tag["value"] for tag in request["tags"]}
    assert tags["dagster/partition"] == BUCKET and tags[CHAIN_TAG] == DAILY_CLEANUP, tags
    assert request["jobName"] in (None, SCAN_JOB), request  # None: the schedule's own job
    scan_id = DagsterGraphQLClient("127.0.0.1", port_number=topology.ui_port, timeout=60).submit_job_execution(
        SCAN_JOB, repository_location_name=LOCATION, repository_name=REPOSITORY,
        run_config=yaml.safe_load(request["runConfigYaml"]) or {}, tags=tags,
    )

    (scan,) = wait_for("the scan", RUNS_SECONDS, lambda: _finished(topology, [scan_id]), topology.logs)
    _assert_through_code_server(topology, scan)
    diff_record = next(record for record in topology.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("orphan_diff"), asset_partitions=[BUCKET]), limit=10,
    ).records if record.run_id == scan_id)

    # The chain sensor (run by the daemon, evaluated in the code server) requests the dry-run cleanup.
    (cleanup,) = wait_for("the chain sensor's cleanup", RUNS_SECONDS,
                          lambda: _finished(topology, **{SENSOR_NAME_TAG: CHAIN_SENSOR,
                                                         DIFF_TAG: str(diff_record.storage_id)}),
                          topology.logs)
    assert cleanup["jobName"] == DELETE_JOB and {"key": DRY_RUN_TAG, "value": "true"} in cleanup["tags"], cleanup
    _assert_through_code_server(topology, cleanup)

    diff = latest_metadata(topology.instance, "orphan_diff", BUCKET)
    deletions = latest_metadata(topology.instance, "orphan_deletions", BUCKET)
    assert diff is not None and diff["orphan_count"] == diff["eligible_orphan_count"] == len(orphans), diff
    assert deletions is not None and deletions["dry_run"] is True, deletions
    assert deletions["would_delete_count"] == len(orphans) and deletions["deleted_count"] == 0, deletions
    assert len(list(client.list_objects(BUCKET, recursive=True))) == objects_before  # a dry run deletes nothing

    # The exporter serves what the runs recorded (it reuses a snapshot for a few seconds: poll).
    def figures() -> dict[Any, float] | None:
        status, body = http_get(f"{topology.exporter}/metrics")
        metrics = parse_metrics(body.decode()) if status == 200 else {}
        return metrics if sample("heimdall_storage_last_cleanup_dry_run", bucket=BUCKET) in metrics else None

    metrics = wait_for("the exporter to serve the cleanup", 60, figures, topology.logs)
    assert metrics[sample("heimdall_storage_total_objects", bucket=BUCKET)] == objects_before
    assert metrics[sample("heimdall_storage_orphan_files", bucket=BUCKET)] == len(orphans)
    assert metrics[sample("heimdall_storage_eligible_orphan_files", bucket=BUCKET)] == len(orphans)
    assert metrics[sample("heimdall_storage_dangling_references", bucket=BUCKET)] == len(world.dangling[BUCKET]) == 1
    assert metrics[sample("heimdall_storage_last_cleanup_dry_run", bucket=BUCKET)] == 1
    assert metrics[sample("heimdall_storage_last_cleanup_deleted_files", bucket=BUCKET)] == 0
    status, storage = http_json(f"{topology.exporter}/metrics/storage")
    assert status == 200 and set(storage["buckets"]) == {BUCKET} and storage["total_orphans"] == len(orphans)
    assert http_json(f"{topology.exporter}/healthz") == (200, {"status": "ok"})


def test_the_celery_worker_service_starts_and_answers_its_health_check(
    tmp_path: Path, seaweed: SeaweedFS, pg_admin_url: str
) -> None:
    """Profile celery: the worker's command from compose.yaml consumes its queue on the broker and answers pings."""
    _require_broker()
    queue = f"heimdall-test-{secrets.token_hex(6)}"
    variables = {
        **seaweed.env(), "HEIMDALL_DATABASE_URL": pg_admin_url, "DAGSTER_PG_URL": pg_admin_url,
        "HEIMDALL_EXECUTOR": "celery", "HEIMDALL_CELERY_BROKER": BROKER, "HEIMDALL_CELERY_QUEUE": queue,
    }
    service = compose_services(variables, profiles=["celery"])["celery-worker"]
    assert option(service["command"], "--queues") == queue
    home = tmp_path / "dagster_home"
    home.mkdir()
    paths = {service["environment"]["DAGSTER_HOME"]: str(home)}
    worker = LocalService.from_compose("celery-worker", service, {}, paths, tmp_path)
    try:
        assert "celery-worker: healthy" in worker.start().wait_healthy(START_SECONDS)
    finally:
        stop_all([worker])
        _delete_queue(queue)
    assert worker.process is not None and worker.process.returncode == 0, worker.log_tail()  # a warm shutdown


def test_the_events_service_stores_a_notification_and_answers_its_health_check(
    tmp_path: Path, pg_admin_url: str
) -> None:
    """Profile events: the receiver's command from compose.yaml, its token and database (HEIMDALL_AUDIT_DB_URL
    empty: DAGSTER_PG_URL) from the environment, stores a MinIO notification and passes the image's health check."""
    events_db = _psycopg2_url(create_database(pg_admin_url, prefix="events_topology"))
    token = secrets.token_hex(24)
    variables = {
        # Required by compose.yaml for the other services; the receiver touches none of them.
        "MINIO_ENDPOINT": "127.0.0.1:9", "MINIO_ACCESS_KEY": "unused", "MINIO_SECRET_KEY": "unused",
        "HEIMDALL_DATABASE_URL": pg_admin_url,
        "DAGSTER_PG_URL": events_db, "HEIMDALL_EVENTS_TOKEN": token,
        "HEIMDALL_STORAGE_POLICY": str(_one_bucket_policy(tmp_path / "policy.yaml")),
    }
    service = compose_services(variables, profiles=["events"])["events"]
    assert service["environment"]["HEIMDALL_AUDIT_DB_URL"] == ""
    (port,) = free_ports(1)
    receiver = LocalService.from_compose("events", service, {option(service["command"], "--port"): port}, {},
                                         tmp_path)
    try:
        assert "events: healthy" in receiver.start().wait_healthy(START_SECONDS)
        url = f"http://127.0.0.1:{port}/minio"
        body = minio_notification(minio_record(BUCKET, "synthetic/a/0/RX_001.npy", "s3:ObjectCreated:Put",
                                               utc_now(), size=3, etag="abc"))
        assert requests.post(url, json=body, timeout=30).status_code == 401
        answer = requests.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert (answer.status_code, answer.json()) == (200, {"stored": 1, "duplicates": 0, "ignored": 0})
        state = stream(events_db, BUCKET)
        assert state is not None and state.last_seq == 1 and state.alive, state
    finally:
        stop_all([receiver])
        drop_database(pg_admin_url, events_db)
    assert receiver.process is not None and receiver.process.returncode == 0, receiver.log_tail()
