"""The event-driven path on real PostgreSQL and SeaweedFS: migration, trigger, sensor, run, outbox."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import dagster as dg
import pytest
import sqlalchemy as sa
from minio import Minio

from heimdall_storage_pipeline.core.migrations import apply_migrations
from heimdall_storage_pipeline.defs.automation.outbox import OutboxEventError, owned_prefixes
from heimdall_storage_pipeline.defs.automation.sensors import (
    ATTEMPT_TAG,
    EVENT_TAG,
    build_dataset_deletion_sensor,
)
from heimdall_storage_pipeline.defs.resources import ReferenceDatabaseResource
from heimdall_storage_pipeline.local.heimdall_db import AUDIO_BUCKET, SYNTHETIC_BUCKET, put
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS
from heimdall_storage_pipeline_tests.conftest import ScanHarness
from heimdall_storage_pipeline_tests.defs.automation.support import run_request, tick

SHIPPED_SOURCE = {"name": "samples", "query": "SELECT iq_storage_paths FROM heimdall.synthetic_iq_samples",
                  "format": "key", "container": "json"}


def _dataset(engine: sa.Engine, client: Minio, samples: int, layout: str = "{id}") -> tuple[str, list[str]]:
    """A dataset with ``samples`` rows, two receivers each, and its objects (uploaded just now)."""
    dataset_id = str(uuid.uuid4())
    keys = []
    with engine.begin() as db:
        db.execute(sa.text("INSERT INTO heimdall.synthetic_datasets (id, name, dataset_type) "
                           "VALUES (:id, 'test', 'iq_raw')"), {"id": dataset_id})
        for sample in range(samples):
            paths = {rx: f"synthetic/{layout.format(id=dataset_id)}/{sample}/{rx}.npy" for rx in ("RX_001", "RX_004")}
            for key in paths.values():
                put(client, SYNTHETIC_BUCKET, key)
            keys += paths.values()
            db.execute(sa.text("INSERT INTO heimdall.synthetic_iq_samples (dataset_id, sample_idx, iq_storage_paths) "
                               "VALUES (:d, :i, :p)"), {"d": dataset_id, "i": sample, "p": json.dumps(paths)})
    return dataset_id, keys


def _listed(client: Minio, prefix: str) -> set[str]:
    return {o.object_name for o in client.list_objects(SYNTHETIC_BUCKET, prefix=prefix, recursive=True)}


def _events(engine: sa.Engine) -> list[sa.Row]:
    with engine.connect() as db:
        return list(db.execute(sa.text("SELECT * FROM heimdall.storage_cleanup_events ORDER BY id")))


@pytest.fixture
def world(harness_factory: Callable, seaweed: SeaweedFS, database_url: str, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[ScanHarness, Minio]:
    monkeypatch.setenv("HEIMDALL_CLEANUP_DRY_RUN", "false")
    client = seaweed.client()
    for bucket in (SYNTHETIC_BUCKET, AUDIO_BUCKET):  # the triggers record Heimdall's real bucket names
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    harness = harness_factory({SYNTHETIC_BUCKET: {"min_age": "30d", "references": [SHIPPED_SOURCE]}})
    return harness, client


def test_a_deleted_dataset_is_cleaned_end_to_end(world: tuple[ScanHarness, Minio], db_engine: sa.Engine) -> None:
    harness, client = world
    sensor = build_dataset_deletion_sensor()
    reference_db = ReferenceDatabaseResource(url=harness.database_url)
    before = sensor(dg.build_sensor_context(instance=harness.instance, resources={"reference_db": reference_db}))
    assert isinstance(before, dg.SkipReason) and "heimdall-storage migrate" in (before.skip_message or "")
    apply_migrations(db_engine, "heimdall")
    assert apply_migrations(db_engine, "heimdall") == []  # applied once: one trigger per table
    with db_engine.connect() as db:
        triggers = db.execute(sa.text("SELECT count(*) FROM pg_trigger WHERE tgname = 'storage_cleanup_after_delete'"))
        assert triggers.scalar_one() == 2

    doomed, doomed_keys = _dataset(db_engine, client, samples=3)
    kept, kept_keys = _dataset(db_engine, client, samples=2)
    # An object under the doomed prefix that another dataset's row still names must survive.
    shared = f"synthetic/{doomed}/shared/RX_009.npy"
    put(client, SYNTHETIC_BUCKET, shared)
    with db_engine.begin() as db:
        db.execute(sa.text("INSERT INTO heimdall.synthetic_iq_samples (dataset_id, sample_idx, iq_storage_paths) "
                           "VALUES (:d, 99, :p)"), {"d": kept, "p": json.dumps({"RX_009": shared})})
    legacy, legacy_keys = _dataset(db_engine, client, samples=1, layout="dataset-{id}")
    assert _listed(client, f"synthetic/dataset-{legacy}/") == set(legacy_keys)

    with db_engine.begin() as db:  # Heimdall deletes the rows (cascading to the samples)
        db.execute(sa.text("DELETE FROM heimdall.synthetic_datasets WHERE id IN (:a, :b)"), {"a": doomed, "b": legacy})
    events = _events(db_engine)
    assert sorted((e.entity_type, str(e.entity_id), e.bucket, e.processed_at) for e in events) == sorted(
        ("synthetic_dataset", i, SYNTHETIC_BUCKET, None) for i in (doomed, legacy))
    by_entity = {str(e.entity_id): e for e in events}
    assert list(by_entity[doomed].prefixes) == [f"synthetic/{doomed}/", f"synthetic/dataset-{doomed}/"]

    first = tick(sensor, harness.instance, reference_db=reference_db)
    assert len(first.run_requests) == 2
    requests = {r.run_config["ops"]["prefix_cleanup"]["config"]["entity_id"]: r for r in first.run_requests}
    request = requests[doomed]
    event_id = by_entity[doomed].id
    assert request.job_name == "prefix_cleanup_job"
    assert request.run_key == f"outbox-event-{event_id}-attempt-1"
    assert request.run_config["ops"]["prefix_cleanup"]["config"] == {
        "event_id": event_id, "entity_type": "synthetic_dataset", "entity_id": doomed, "bucket": SYNTHETIC_BUCKET,
        "prefixes": [f"synthetic/{doomed}/", f"synthetic/dataset-{doomed}/"], "dry_run": False}
    # Nothing is requested twice, and nothing is processed before its run succeeded.
    second = tick(sensor, harness.instance, first.cursor, reference_db=reference_db)
    assert second.run_requests == []
    assert all(e.processed_at is None for e in _events(db_engine))

    # Attempt 1 of the doomed dataset fails (a tampered prefix); the sensor retries it as attempt 2.
    failed = run_request(harness, request, raise_on_error=False, prefixes=["synthetic/"])
    assert not failed.success
    assert _listed(client, f"synthetic/{doomed}/") == {*doomed_keys, shared}
    assert run_request(harness, requests[legacy]).success
    third = tick(sensor, harness.instance, second.cursor, reference_db=reference_db)
    assert [(r.tags[EVENT_TAG], r.tags[ATTEMPT_TAG]) for r in third.run_requests] == [(str(event_id), "2")]
    rows = {e.id: e for e in _events(db_engine)}
    assert rows[event_id].attempts == 1 and rows[event_id].processed_at is None
    assert rows[by_entity[legacy].id].processed_at is not None
    assert _listed(client, f"synthetic/dataset-{legacy}/") == set()

    # Attempt 2 runs with the sensor's config: young objects go (the owner is gone), the referenced one stays.
    retry = run_request(harness, third.run_requests[0])
    assert retry.success
    assert _listed(client, f"synthetic/{doomed}/") == {shared}
    assert _listed(client, f"synthetic/{kept}/") == set(kept_keys)
    deletions = harness.metadata("orphan_deletions", SYNTHETIC_BUCKET)
    assert deletions["deleted_count"] == len(doomed_keys) and deletions["skipped_referenced"] == 1
    assert deletions["event_id"] == event_id

    fourth = tick(sensor, harness.instance, third.cursor, reference_db=reference_db)
    assert fourth.run_requests == []
    done = {e.id: e for e in _events(db_engine)}[event_id]
    assert done.processed_at is not None and done.processed_run_id == retry.run_id
    assert done.processed_dry_run is False
    assert tick(sensor, harness.instance, fourth.cursor, reference_db=reference_db).run_requests == []
    assert json.loads(fourth.cursor or "{}")["pending"] == {}


def test_a_row_that_is_back_is_not_cleaned(world: tuple[ScanHarness, Minio], db_engine: sa.Engine) -> None:
    harness, client = world
    apply_migrations(db_engine, "heimdall")
    dataset_id, keys = _dataset(db_engine, client, samples=1)
    with db_engine.begin() as db:
        db.execute(sa.text("DELETE FROM heimdall.synthetic_datasets WHERE id = :id"), {"id": dataset_id})
        # restored (without its samples) before the cleanup ran: its objects are not known dead
        db.execute(sa.text("INSERT INTO heimdall.synthetic_datasets (id, name, dataset_type) "
                           "VALUES (:id, 'restored', 'iq_raw')"), {"id": dataset_id})
    reference_db = ReferenceDatabaseResource(url=harness.database_url)
    result = tick(build_dataset_deletion_sensor(), harness.instance, reference_db=reference_db)
    assert run_request(harness, result.run_requests[0]).success
    assert _listed(client, f"synthetic/{dataset_id}/") == set(keys)


def test_the_audio_trigger_records_its_prefixes(database_url: str, db_engine: sa.Engine) -> None:
    apply_migrations(db_engine, "heimdall")
    audio_id = str(uuid.uuid4())
    with db_engine.begin() as db:
        db.execute(sa.text("INSERT INTO heimdall.audio_library (id, filename) VALUES (:id, 'a.wav')"), {"id": audio_id})
        db.execute(sa.text("DELETE FROM heimdall.audio_library WHERE id = :id"), {"id": audio_id})
    (event,) = _events(db_engine)
    assert (event.entity_type, str(event.entity_id), event.bucket, list(event.prefixes)) == (
        "audio", audio_id, AUDIO_BUCKET, [f"{audio_id}/", f"imported/{audio_id}/"])
    assert owned_prefixes("audio", audio_id, AUDIO_BUCKET, tuple(event.prefixes)) == tuple(event.prefixes)
    with pytest.raises(OutboxEventError, match="refusing"):
        owned_prefixes("audio", audio_id, AUDIO_BUCKET, ("",))
