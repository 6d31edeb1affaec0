"""Batched deletion on real SeaweedFS and PostgreSQL: races, faults, resume, the audit log."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pyarrow.compute as pc
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from minio.deleteobjects import DeleteObject

from heimdall_storage_pipeline.core import deletion
from heimdall_storage_pipeline.core.deletion import DeleteError, DeleteIfUnchanged, delete_batch, too_many_failures
from heimdall_storage_pipeline.core.errors import (
    ReferenceDatabaseError,
    StorageAccessDeniedError,
    StorageUnreachableError,
)
from heimdall_storage_pipeline.core.references import make_engine, read_only_snapshot
from heimdall_storage_pipeline.core.safety import Candidate
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS
from heimdall_storage_pipeline_tests.cleanup_support import (
    CoreRig,
    add_refs,
    bucket_policy,
    listed_keys,
    make_rig,
    put,
    refs_table,
)

OLD = timedelta(days=31)  # the deletion clock's lead over real time: everything is old


@pytest.fixture
def rig(seaweed: SeaweedFS, db_engine: sa.Engine, tmp_path: Path) -> CoreRig:
    return make_rig(seaweed.settings(), db_engine, tmp_path / "manifests")


def _world(rig: CoreRig, seaweed: SeaweedFS, make_bucket: Callable[[str], str], referenced: int,
           orphans: int) -> tuple[str, str, list[str], list[str]]:
    bucket = make_bucket("del")
    client = seaweed.client()
    table = refs_table(rig.engine)
    kept = [f"data/kept-{i}.npy" for i in range(referenced)]
    dead = [f"data/orphan-{i}.npy" for i in range(orphans)]
    for key in kept + dead:
        put(client, bucket, key)
    add_refs(rig.engine, table, kept)
    return bucket, table, kept, dead


def test_live_run_deletes_old_orphans_only_and_records_each(rig, seaweed, make_bucket, monkeypatch):
    monkeypatch.setattr(deletion, "PROGRESS_SECONDS", 3600.0)
    bucket, table, kept, dead = _world(rig, seaweed, make_bucket, referenced=3, orphans=5)
    policy = bucket_policy(bucket, table)
    rig.offset = OLD
    report = rig.delete(policy, rig.scan(policy), batch_size=2)

    assert listed_keys(seaweed.client(), bucket) == set(kept)
    assert report.outcomes["deleted"] == 5 and report.batches == 3
    rows = rig.audit_rows(bucket)
    assert {r.key for r in rows if r.status == "deleted"} == set(dead)
    assert all(r.deleted_at is not None and r.deleted_at.tzinfo is not None for r in rows)
    # Progress: the first batch, then at most one line per PROGRESS_SECONDS, and the last batch.
    progress = [line for line in rig.logs if ": batch " in line]
    assert [line.split(": ")[1] for line in progress] == ["batch 1 of ?", "batch 3 of ?"]
    assert "5 keys so far, 5 deleted (" in progress[-1] and "keys/s" in progress[-1]


def test_young_objects_are_skipped_at_delete_time_even_if_the_diff_called_them_eligible(
    rig, seaweed, make_bucket
):
    bucket, table, _, dead = _world(rig, seaweed, make_bucket, referenced=1, orphans=3)
    policy = bucket_policy(bucket, table)
    # The diff looks 31 days ahead (all eligible); the deletion uses the real clock (all young).
    orphans_uri = rig.scan(policy, as_of=rig.clock() + OLD)
    report = rig.delete(policy, orphans_uri)
    assert report.outcomes["skipped_young"] == 3 and report.outcomes["deleted"] == 0
    assert set(dead) <= listed_keys(seaweed.client(), bucket)
    assert rig.audit_rows(bucket) == []


def test_races_after_the_scan_row_inserted_and_object_overwritten_are_skipped(rig, seaweed, make_bucket):
    bucket, table, _, dead = _world(rig, seaweed, make_bucket, referenced=1, orphans=4)
    policy = bucket_policy(bucket, table)
    rig.offset = OLD
    orphans_uri = rig.scan(policy)
    client = seaweed.client()
    add_refs(rig.engine, table, [dead[0]])  # referenced again
    put(client, bucket, dead[1], b"new content")  # overwritten
    client.remove_object(bucket, dead[2])  # already gone
    report = rig.delete(policy, orphans_uri)

    assert report.outcomes["skipped_referenced"] == 1
    assert report.outcomes["skipped_changed"] == 1
    assert report.outcomes["skipped_missing"] == 1
    assert report.outcomes["deleted"] == 1
    assert listed_keys(client, bucket) >= {dead[0], dead[1]}
    assert dead[3] not in listed_keys(client, bucket)


def test_a_batch_that_waited_past_the_age_bound_is_checked_again_before_its_delete(
    rig, seaweed, make_bucket, monkeypatch
):
    bucket, table, _, dead = _world(rig, seaweed, make_bucket, referenced=1, orphans=4)
    policy = bucket_policy(bucket, table)
    rig.offset = OLD
    orphans_uri = rig.scan(policy)
    client = seaweed.client()
    monkeypatch.setattr(deletion, "REVALIDATION_MAX_AGE", -1.0)  # every wait outlives the check
    checks = []

    @contextmanager
    def references(engine: sa.Engine) -> Iterator[sa.Connection]:
        checks.append(engine)
        if len(checks) == 2:  # between the first check and the delete, the application links one
            add_refs(rig.engine, table, [dead[0]])
        with read_only_snapshot(engine) as connection:
            yield connection

    report = rig.delete(policy, orphans_uri, references=references)

    assert len(checks) == 2 and report.revalidated_again == len(dead)
    assert report.outcomes["skipped_referenced"] == 1 and report.outcomes["deleted"] == 3
    assert dead[0] in listed_keys(client, bucket) and not set(dead[1:]) & listed_keys(client, bucket)
    rows = {r.key: r for r in rig.audit_rows(bucket)}
    assert (rows[dead[0]].status, rows[dead[0]].error) == ("not_deleted", "skipped_referenced when checked again")
    assert {rows[key].status for key in dead[1:]} == {"deleted"}


def test_with_conditional_deletes_an_object_rewritten_between_its_check_and_its_delete_is_kept(
    rig, seaweed, make_bucket, monkeypatch
):
    """The DeleteObjects request carries each object's ETag as a condition; SeaweedFS refuses
    to delete an object whose content changed after the fresh stat."""
    bucket, table, _, dead = _world(rig, seaweed, make_bucket, referenced=1, orphans=4)
    policy = bucket_policy(bucket, table)
    rig.offset = OLD
    orphans_uri = rig.scan(policy)
    client = seaweed.client()
    real_delete_batch = deletion.delete_batch

    def rewrite_then_delete(*args: object, **kwargs: object) -> dict[str, DeleteError]:
        put(client, bucket, dead[0], b"new content, uploaded after the check")
        return real_delete_batch(*args, **kwargs)

    monkeypatch.setattr(deletion, "delete_batch", rewrite_then_delete)
    report = rig.delete(policy, orphans_uri, conditional_deletes=True)

    assert report.outcomes["skipped_changed"] == 1 and report.outcomes["deleted"] == 3
    assert report.count(deletion.Outcome.FAILED) == 0 and report.failures == []
    assert client.get_object(bucket, dead[0]).data == b"new content, uploaded after the check"
    assert not set(dead[1:]) & listed_keys(client, bucket)
    rows = {r.key: r for r in rig.audit_rows(bucket)}
    assert rows[dead[0]].status == "not_deleted" and rows[dead[0]].deleted_at is None
    assert rows[dead[0]].error.startswith("skipped_changed when deleted (PreconditionFailed:")
    assert {rows[key].status for key in dead[1:]} == {"deleted"}


def test_conditional_delete_entries_name_the_etag_only_when_there_is_one(seaweed, make_bucket):
    bucket = make_bucket("cond")
    client = seaweed.client()
    for key in ("same", "other", "unconditional"):
        put(client, bucket, key)
    etag = client.stat_object(bucket, "same").etag.strip('"')
    errors = delete_batch(client, bucket, [DeleteIfUnchanged("same", etag=etag),
                                           DeleteIfUnchanged("other", etag="0" * 32),
                                           DeleteIfUnchanged("unconditional")], log=lambda _: None)
    assert set(errors) == {"other"} and errors["other"].code == "PreconditionFailed"
    assert listed_keys(client, bucket) == {"other"}


def test_request_slots_bound_the_deletes_in_flight_while_later_batches_revalidate(rig, seaweed, make_bucket,
                                                                                   monkeypatch):
    bucket, table, _, dead = _world(rig, seaweed, make_bucket, referenced=1, orphans=12)
    policy = bucket_policy(bucket, table)
    rig.offset = OLD
    orphans_uri = rig.scan(policy)
    in_flight, most = 0, 0
    lock = threading.Lock()
    real_delete_batch = deletion.delete_batch

    def counting_delete_batch(*args: object, **kwargs: object) -> dict[str, str]:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            return real_delete_batch(*args, **kwargs)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(deletion, "delete_batch", counting_delete_batch)
    report = rig.delete(policy, orphans_uri, batch_size=1, workers=2)

    assert report.outcomes["deleted"] == len(dead) and report.batches == len(dead)
    assert 1 <= most <= 2
    assert not set(dead) & listed_keys(seaweed.client(), bucket)


def test_dry_run_deletes_nothing_and_its_manifest_equals_what_a_live_run_deletes(rig, seaweed, make_bucket):
    bucket, table, _, dead = _world(rig, seaweed, make_bucket, referenced=2, orphans=7)
    policy = bucket_policy(bucket, table)
    rig.offset = OLD
    orphans_uri = rig.scan(policy)
    before = listed_keys(seaweed.client(), bucket)
    dry = rig.delete(policy, orphans_uri, dry_run=True, batch_size=3, audit=None)
    assert listed_keys(seaweed.client(), bucket) == before
    assert rig.audit_rows(bucket) == []
    manifest = rig.store.read_table(dry.manifest_uri)
    would = set(manifest.filter(pc.equal(manifest.column("outcome"), "would_delete")).column("key").to_pylist())
    assert would == set(dead) and len(manifest) == len(dead)

    live = rig.delete(policy, orphans_uri)
    deleted = rig.store.read_table(live.manifest_uri)
    assert set(deleted.filter(pc.equal(deleted.column("outcome"), "deleted")).column("key").to_pylist()) == would


def test_unreachable_database_at_revalidation_deletes_nothing(rig, seaweed, make_bucket):
    bucket, table, _, dead = _world(rig, seaweed, make_bucket, referenced=1, orphans=3)
    policy = bucket_policy(bucket, table)
    rig.offset = OLD
    orphans_uri = rig.scan(policy)
    gone = make_engine("postgresql+psycopg2://heimdall:s3cr3t-pw@127.0.0.1:1/heimdall")
    with pytest.raises(ReferenceDatabaseError) as raised:
        rig.delete(policy, orphans_uri, engine=gone)
    assert "s3cr3t-pw" not in str(raised.value) and "HEIMDALL_DATABASE_URL" in str(raised.value)
    assert set(dead) <= listed_keys(seaweed.client(), bucket)
    assert rig.audit_rows(bucket) == []


def test_a_run_that_died_between_intent_and_delete_is_reconciled_and_finished(rig, seaweed, make_bucket):
    bucket, table, _, dead = _world(rig, seaweed, make_bucket, referenced=1, orphans=4)
    policy = bucket_policy(bucket, table)
    rig.offset = OLD
    orphans_uri = rig.scan(policy)
    client = seaweed.client()
    # A killed run: intent recorded for two objects, only the first delete went through.
    stats = {k: client.stat_object(bucket, k) for k in dead[:2]}
    rig.audit.record_intent(
        run_id="dead-run", job="test", bucket=bucket, at=rig.clock(),
        candidates=[Candidate(k, s.size, s.last_modified, s.etag) for k, s in stats.items()],
    )
    client.remove_object(bucket, dead[0])

    report = rig.delete(policy, orphans_uri)
    assert report.reconciled == {"deleted": 1, "not_deleted": 1}
    assert report.outcomes["skipped_missing"] == 1 and report.outcomes["deleted"] == 3
    assert not set(dead) & listed_keys(client, bucket)
    rows = rig.audit_rows(bucket)
    assert not [r for r in rows if r.status == "pending"]
    # Every object is recorded as deleted exactly once.
    deleted = [r.key for r in rows if r.status == "deleted"]
    assert sorted(deleted) == sorted(dead)


@pytest.fixture
def private_seaweed(tmp_path_factory: pytest.TempPathFactory):
    server = SeaweedFS(workdir=tmp_path_factory.mktemp("seaweed-faults")).start()
    yield server
    server.stop()


def test_seaweedfs_stopped_mid_run_then_relaunched_completes_with_a_consistent_audit(
    private_seaweed, db_engine, tmp_path
):
    rig = make_rig(private_seaweed.settings(), db_engine, tmp_path / "manifests")
    client = private_seaweed.client()
    bucket = f"faults-{secrets.token_hex(3)}"
    client.make_bucket(bucket)
    table = refs_table(db_engine)
    dead = [f"o/{i:03d}.npy" for i in range(9)]
    for key in dead:
        put(client, bucket, key)
    add_refs(db_engine, table, ["o/keep.npy"])
    put(client, bucket, "o/keep.npy")
    policy = bucket_policy(bucket, table)
    rig.offset = OLD
    orphans_uri = rig.scan(policy)

    def stop_after_first_batch(line: str) -> None:
        if "batch 1 of" in line:
            private_seaweed.stop()

    with pytest.raises(StorageUnreachableError) as raised:
        rig.delete(policy, orphans_uri, batch_size=3, log=stop_after_first_batch, workers=1,
                   revalidate_ahead=0)
    assert private_seaweed.secret_key not in str(raised.value)
    private_seaweed.start()
    assert len(listed_keys(client, bucket)) == 7  # batch 1 went, the rest waits

    rig.delete(policy, orphans_uri, batch_size=3)
    assert listed_keys(client, bucket) == {"o/keep.npy"}
    rows = rig.audit_rows(bucket)
    assert sorted(r.key for r in rows if r.status == "deleted") == sorted(dead)
    assert not [r for r in rows if r.status == "pending"]


class _FlakyClient:
    """Pure retry logic: fails with SlowDown twice, then reports one per-key error."""

    def __init__(self) -> None:
        self.calls = 0

    def remove_objects(self, bucket, objects):
        from minio.error import S3Error

        self.calls += 1
        if self.calls <= 2:
            raise S3Error(None, "SlowDown", "reduce your request rate", bucket, "", "", bucket, None)
        names = [o.name for o in objects]

        class _Err:
            name, code, message = names[0], "AccessDenied", "denied"

        return iter([_Err()])


def test_delete_batch_retries_transient_errors_and_returns_per_key_errors():
    client = _FlakyClient()
    waits: list[float] = []
    errors = delete_batch(client, "b", [DeleteObject("k1"), DeleteObject("k2")], log=lambda _: None,
                          sleep=waits.append)
    assert client.calls == 3 and errors == {"k1": DeleteError("AccessDenied", "denied")}
    assert str(errors["k1"]) == "AccessDenied: denied"
    assert len(waits) == 2 and all(w > 0 for w in waits)


def test_rejected_credentials_delete_nothing_and_do_not_leak_the_secret(rig, seaweed, make_bucket):
    bucket, table, _, dead = _world(rig, seaweed, make_bucket, referenced=1, orphans=2)
    policy = bucket_policy(bucket, table)
    rig.offset = OLD
    orphans_uri = rig.scan(policy)
    with pytest.raises(StorageAccessDeniedError) as raised:
        rig.delete(policy, orphans_uri, s3=seaweed.settings(secret_key="wrong-secret-value"))
    assert "wrong-secret-value" not in str(raised.value) and "MINIO_SECRET_KEY" in str(raised.value)
    assert set(dead) <= listed_keys(seaweed.client(), bucket)
    assert rig.audit_rows(bucket) == []


@pytest.mark.parametrize(("failed", "batch", "stops"), [(0, 10, False), (1, 10, False), (2, 10, True),
                                                        (1, 1, True), (100, 1000, False), (101, 1000, True)])
def test_the_bucket_stops_when_more_than_ten_percent_of_a_batch_fails(failed, batch, stops):
    assert too_many_failures(failed, batch) is stops


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plan=st.lists(
        st.tuples(
            st.sampled_from(["referenced", "orphan"]),
            st.sampled_from(["none", "row_added", "overwritten", "removed", "reuploaded_same"]),
        ),
        min_size=1, max_size=14,
    ),
    old=st.booleans(),
    batch_size=st.integers(min_value=1, max_value=5),
)
def test_property_nothing_referenced_young_or_changed_is_deleted_and_every_clean_orphan_is(
    rig, seaweed, make_bucket, plan, old, batch_size
):
    bucket = make_bucket("prop")
    client = seaweed.client()
    table = refs_table(rig.engine)
    keys = [f"p/{i}/{kind}.npy" for i, (kind, _) in enumerate(plan)]
    for key in keys:
        put(client, bucket, key)
    add_refs(rig.engine, table, [k for k, (kind, _) in zip(keys, plan, strict=True) if kind == "referenced"])
    policy = bucket_policy(bucket, table, batch_size=batch_size)
    rig.offset = OLD if old else timedelta(0)
    orphans_uri = rig.scan(policy, as_of=rig.clock() + OLD)  # the diff calls every orphan eligible

    for key, (_, change) in zip(keys, plan, strict=True):
        if change == "row_added":
            add_refs(rig.engine, table, [key])
        elif change == "overwritten":
            put(client, bucket, key, b"different bytes")
        elif change == "removed":
            client.remove_object(bucket, key)
        elif change == "reuploaded_same":
            client.remove_object(bucket, key)
            put(client, bucket, key)  # same bytes, same etag: an identical orphan
    rig.delete(policy, orphans_uri)
    remaining = listed_keys(client, bucket)

    for key, (kind, change) in zip(keys, plan, strict=True):
        protected = kind == "referenced" or change in ("row_added", "overwritten") or not old
        if change == "reuploaded_same" and old and not protected:
            # Byte-identical and, on the shifted clock, old: indistinguishable from the
            # original. In real time a re-upload is fresh and the minimum age protects it
            # (test_young_objects_are_skipped_at_delete_time...).
            continue
        if change == "removed":
            assert key not in remaining
        elif protected:
            assert key in remaining, f"{key} ({kind}, {change}, old={old}) was deleted"
        elif change == "none":
            assert key not in remaining, f"eligible unchanged orphan {key} survived"
    deleted = {r.key for r in rig.audit_rows(bucket) if r.status == "deleted"}
    assert deleted == set(keys) - remaining - {k for k, (_, c) in zip(keys, plan, strict=True) if c == "removed"}
