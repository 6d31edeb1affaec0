"""Guards that inform a dry run, and plan -> review -> apply, on the real servers."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from datetime import timedelta

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from minio import Minio

from heimdall_storage_pipeline.core.audit import deletion_audit, plan_application
from heimdall_storage_pipeline.core.clock import isoformat_utc, utc_now
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.plans import write_plan_csv
from heimdall_storage_pipeline.defs.cleanup.plans import describe_plan, find_plan
from heimdall_storage_pipeline_tests.cleanup_support import listed_keys, put
from heimdall_storage_pipeline_tests.conftest import ScanHarness, key_source
from heimdall_storage_pipeline_tests.defs.cleanup.test_delete_orphans_job import (
    MIN_AGE_SECONDS,
    _failure_text,
    wait_until_old,
)

SIDECAR = {"name": "sidecar", "match": r"^(.+)\.npy$", "companion": r"\1_metadata.json"}
REFERENCED = ["a/1.npy", "a/2.npy"]
ORPHANS = [f"b/{i}.npy" for i in range(1, 6)] + ["b/1_metadata.json"]


@dataclass
class World:
    harness: ScanHarness
    bucket: str
    client: Minio
    engine: sa.Engine

    def refs(self, *statements: str) -> None:
        with self.engine.begin() as connection:
            for statement in statements:
                connection.execute(sa.text(statement))

    def dry_run(self, **config: object) -> dict:
        result = self.harness.delete(**config)
        assert result.success
        return self.harness.metadata("orphan_deletions", self.bucket)

    def apply(self, plan: str, **config: object) -> dg.ExecuteInProcessResult:
        return self.harness.delete(raise_on_error=False, dry_run=False, plan=plan, **config)

    def store(self) -> ManifestStore:
        return ManifestStore(str(self.harness.resources["manifests"].root))

    def audit_rows(self) -> list[sa.Row]:
        with self.engine.connect() as connection:
            return connection.execute(sa.select(deletion_audit).where(deletion_audit.c.bucket == self.bucket)).all()


@pytest.fixture
def world(harness_factory, make_bucket, seaweed, db_engine) -> World:
    """2 referenced recordings (one with its kept sidecar) and 6 eligible orphans of 9 objects: 67 %."""
    bucket = make_bucket("plan")
    client = seaweed.client()
    with db_engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE refs (k text)"))
        for key in REFERENCED:
            connection.execute(sa.text("INSERT INTO refs VALUES (:k)"), {"k": key})
    for key in [*REFERENCED, "a/1_metadata.json", *ORPHANS]:
        put(client, bucket, key)
    harness = harness_factory({bucket: {"min_age": f"{MIN_AGE_SECONDS}s", "batch_size": 2, "companions": [SIDECAR],
                                        "references": [key_source("SELECT k FROM refs")]}})
    wait_until_old(client, bucket)
    harness.scan(bucket)
    return World(harness, bucket, client, db_engine)


def _warnings(harness: ScanHarness, result: dg.ExecuteInProcessResult) -> list[str]:
    return [entry.user_message for entry in harness.instance.all_logs(result.run_id)
            if entry.level == logging.WARNING]


def _exported(world: World) -> tuple[float, float, bool, str]:
    """What the exporter says of the latest cleanup: refused, would refuse, and the JSON's refusal."""
    from heimdall_storage_pipeline.exporter.collector import render_metrics
    from heimdall_storage_pipeline.exporter.state import collect_storage_snapshot
    from heimdall_storage_pipeline_tests.exporter.support import parse_metrics, sample

    snapshot = collect_storage_snapshot(world.harness.instance, buckets=[world.bucket])
    metrics = parse_metrics(render_metrics(snapshot).decode())
    bucket = snapshot.to_json()["buckets"][world.bucket]
    return (metrics[sample("heimdall_storage_last_cleanup_refused", bucket=world.bucket)],
            metrics[sample("heimdall_storage_last_cleanup_would_refuse", bucket=world.bucket)],
            bucket["last_cleanup_refused"], bucket["last_cleanup_refusal_reason"] or "")


def test_a_dry_run_tells_what_each_guard_would_do_and_succeeds(world: World) -> None:
    result = world.harness.delete()
    assert result.success
    dry = world.harness.metadata("orphan_deletions", world.bucket)
    assert dry["refused"] is False and dry["would_delete_count"] == 6
    assert dry["guard_verdict"].startswith("would refuse: max_delete_fraction: 6 eligible orphans are 66.7%")
    assert any("a live run would refuse: max_delete_fraction" in w for w in _warnings(world.harness, result))
    assert sorted(world.store().read_table(dry["manifest_uri"]).column("key").to_pylist()) == sorted(ORPHANS)
    assert dry["plan_id"] == f"{world.bucket}:{result.run_id[:8]}" and len(dry["plan_digest"]) == 64
    assert _exported(world)[:3] == (0.0, 1.0, False)
    assert len(dry["plan_largest"].records) == 6 and len(dry["plan_age_histogram"].records) == 6
    assert dry["plan_age_histogram"].records[0].data == {"age": "0-1 d", "objects": 6, "size": "42 B", "bytes": 42}

    live = world.harness.delete(raise_on_error=False, dry_run=False)
    assert not live.success and "max_delete_fraction" in _failure_text(live) and "plan:" in _failure_text(live)
    refused = world.harness.metadata("orphan_deletions", world.bucket)
    assert refused["refused"] is True and refused["dry_run"] is False and refused["deleted_count"] == 0
    assert "max_delete_fraction" in refused["refusal_reason"]
    assert len(listed_keys(world.client, world.bucket)) == 9
    exported = _exported(world)
    assert exported[:3] == (1.0, 0.0, True) and "max_delete_fraction" in exported[3]

    # The reference source "breaks": an empty reference set, a drop, the blocking check.
    world.refs("DELETE FROM refs")
    world.harness.materialize(["bucket_inventory", "referenced_keys", "orphan_diff"], world.bucket,
                              raise_on_error=False)
    broken = world.harness.delete()
    assert broken.success
    verdict = world.harness.metadata("orphan_deletions", world.bucket)["guard_verdict"]
    for guard in ("max_delete_fraction", "empty_reference_set", "reference_drop", "blocking_check"):
        assert guard in verdict
        assert any(f"would refuse: {guard}" in w for w in _warnings(world.harness, broken))
    live = world.harness.delete(raise_on_error=False, dry_run=False)
    assert not live.success
    reason = world.harness.metadata("orphan_deletions", world.bucket)["refusal_reason"]
    assert all(guard in reason for guard in ("empty_reference_set", "reference_drop", "blocking_check"))

    overridden = world.dry_run(allow_mass_delete=True)
    assert overridden["guard_verdict"].startswith("pass: allow_mass_delete overrides")
    assert sorted(overridden["guards_overridden"]) == [
        "blocking_check", "empty_reference_set", "max_delete_fraction", "reference_drop"]
    assert len(listed_keys(world.client, world.bucket)) == 9


def _review(world: World, plan_id: str) -> tuple[str, list[dict[str, str]]]:
    """What ``heimdall-storage plan show`` prints, and its CSV."""
    plan, metadata = find_plan(world.harness.instance, plan_id)
    out = io.StringIO()
    write_plan_csv(world.store(), plan, out)
    text = describe_plan(plan, metadata, world.store(), utc_now(), plan_application(world.engine, plan_id))
    return text, list(csv.DictReader(io.StringIO(out.getvalue())))


def test_applying_a_plan_deletes_exactly_its_keys_once(world: World) -> None:
    plan = world.dry_run()
    text, rows = _review(world, plan["plan_id"])
    assert f"plan {plan['plan_id']}" in text and "keys            6 (42 bytes)" in text and "applied         no" in text
    assert "guard verdict   would refuse: max_delete_fraction" in text and "--apply-config" in text
    assert sorted(row["key"] for row in rows) == sorted(ORPHANS) and {row["size"] for row in rows} == {"7"}
    put(world.client, world.bucket, "b/9.npy")  # a new orphan after the plan: not in it
    applied = world.apply(plan["plan_id"])
    assert applied.success, _failure_text(applied)
    live = world.harness.metadata("orphan_deletions", world.bucket)
    assert live["plan_id"] == plan["plan_id"] and live["deleted_count"] == 6 and live["guard_verdict"] == "pass"
    assert listed_keys(world.client, world.bucket) == {*REFERENCED, "a/1_metadata.json", "b/9.npy"}
    rows = world.audit_rows()
    assert sorted(row.key for row in rows) == sorted(ORPHANS)
    assert {(row.plan_id, row.status) for row in rows} == {(plan["plan_id"], "deleted")}

    assert f"applied         by run {applied.run_id}" in _review(world, plan["plan_id"])[0]
    again = world.apply(plan["plan_id"])
    assert not again.success and "already applied by run " + applied.run_id in _failure_text(again)
    refused = world.harness.metadata("orphan_deletions", world.bucket)
    assert refused["refused"] is True and refused["plan_id"] == plan["plan_id"]


def test_keys_that_changed_since_the_plan_are_kept(world: World) -> None:
    plan = world.dry_run()
    world.refs("INSERT INTO refs VALUES ('b/1.npy')")  # referenced now, and so is its sidecar
    put(world.client, world.bucket, "b/2.npy", b"overwritten")
    world.client.remove_object(world.bucket, "b/3.npy")
    assert world.apply(plan["plan_id"]).success
    live = world.harness.metadata("orphan_deletions", world.bucket)
    assert (live["skipped_referenced"], live["skipped_changed"], live["skipped_missing"], live["deleted_count"]) == (
        2, 1, 1, 2)
    assert listed_keys(world.client, world.bucket) >= {"b/1.npy", "b/1_metadata.json", "b/2.npy"}
    assert not {"b/4.npy", "b/5.npy"} & listed_keys(world.client, world.bucket)
    table = world.store().read_table(live["manifest_uri"])
    outcomes = dict(zip(table.column("key").to_pylist(), table.column("outcome").to_pylist(), strict=True))
    assert outcomes["b/1_metadata.json"] == "skipped_referenced" and outcomes["b/3.npy"] == "skipped_missing"


def test_a_plan_answers_the_size_guard_but_not_a_broken_reference_source(world: World) -> None:
    world.refs("DELETE FROM refs")
    world.harness.materialize(["bucket_inventory", "referenced_keys", "orphan_diff"], world.bucket,
                              raise_on_error=False)
    plan = world.dry_run()
    applied = world.apply(plan["plan_id"])
    assert not applied.success
    assert "A plan does not answer empty_reference_set, reference_drop, blocking_check" in _failure_text(applied)
    assert len(listed_keys(world.client, world.bucket)) == 9
    # Refused before it was claimed: with the override, the same plan can still be applied.
    assert world.apply(plan["plan_id"], allow_mass_delete=True).success
    assert world.harness.metadata("orphan_deletions", world.bucket)["guards_overridden"] == [
        "empty_reference_set", "reference_drop", "blocking_check"]


def test_plans_that_may_not_be_applied_are_refused_with_nothing_deleted(world: World, make_bucket) -> None:
    plan = world.dry_run()
    plan_id = plan["plan_id"]
    before = listed_keys(world.client, world.bucket)

    def refused(expected: str, plan_id: str = plan_id, **config: object) -> None:
        result = world.apply(plan_id, **config)
        assert not result.success and expected in _failure_text(result), _failure_text(result)
        assert listed_keys(world.client, world.bucket) == before

    refused("is not a plan id", plan_id="yesterday's plan")
    refused(f"no dry run of {world.bucket} recorded plan {world.bucket}:00000000",
            plan_id=f"{world.bucket}:00000000")
    other = make_bucket("other")
    refused(f"plan {plan_id} is of bucket {world.bucket}, not of {other}", buckets=[other])
    dry = world.harness.delete(raise_on_error=False, plan=plan_id)
    assert not dry.success and "a plan is applied by a live run" in _failure_text(dry)

    # Too old: the same plan recorded two days ago under another id.
    stale_id = f"{world.bucket}:01d01d00"
    world.harness.instance.report_runless_asset_event(dg.AssetMaterialization(
        "orphan_deletions", partition=world.bucket, metadata={
            **{key: value for key, value in plan.items() if isinstance(value, str | int | float | bool)},
            "plan_id": stale_id, "completed_at": isoformat_utc(utc_now() - timedelta(days=2))}))
    refused("old, more than max_plan_age_minutes allows", plan_id=stale_id)

    # A manifest that is not the reviewed one.
    manifest = plan["manifest_uri"]
    table = world.store().read_table(manifest)
    extra = pa.table({name: [table.column(name)[0].as_py()] for name in table.column_names}, schema=table.schema)
    pq.write_table(pa.concat_tables([table, extra.set_column(0, "key", pa.array(["a/1.npy"]))]), manifest)
    refused("is not the one that was reviewed")

    # Superseded: a scan ran since the plan was made.
    world.harness.scan(world.bucket)
    refused("no longer the latest")
    assert world.audit_rows() == []


def test_sensor_launched_dry_runs_succeed_with_the_verdict(world: World, monkeypatch) -> None:
    from heimdall_storage_pipeline.defs.automation.sensors import build_orphan_growth_sensor
    from heimdall_storage_pipeline.defs.partitions import bucket_partitions
    from heimdall_storage_pipeline_tests.defs.automation.support import run_request, tick

    monkeypatch.setenv("HEIMDALL_ORPHAN_GROWTH_BYTES", "1")
    monkeypatch.delenv("HEIMDALL_CLEANUP_DRY_RUN", raising=False)
    sensor = build_orphan_growth_sensor(bucket_partitions(world.harness.policy))
    (request,) = tick(sensor, world.harness.instance).run_requests
    assert run_request(world.harness, request).success
    meta = world.harness.metadata("orphan_deletions", world.bucket)
    assert meta["dry_run"] is True and meta["guard_verdict"].startswith("would refuse: max_delete_fraction")
    outcomes = world.store().read_table(meta["manifest_uri"]).column("outcome")
    assert pc.sum(pc.equal(outcomes, "would_delete")).as_py() == 6
