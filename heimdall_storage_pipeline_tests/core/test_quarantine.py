"""Quarantine on a real SeaweedFS: moves keep bytes and metadata, expire, survive a kill, and restore."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import urllib3
from minio.commonconfig import ENABLED, CopySource, Filter
from minio.deleteobjects import DeleteError
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule
from minio.versioningconfig import VersioningConfig

from heimdall_storage_pipeline.core import deletion
from heimdall_storage_pipeline.core import quarantine as quarantine_module
from heimdall_storage_pipeline.core.audit import AuditLog, Mark
from heimdall_storage_pipeline.core.clock import utc_now
from heimdall_storage_pipeline.core.deletion import DeletionAbortedError, delete_batch
from heimdall_storage_pipeline.core.errors import StorageCleanupError
from heimdall_storage_pipeline.core.policy import Quarantine
from heimdall_storage_pipeline.core.quarantine import (
    check_only_copies,
    expire_and_count,
    move_id,
    restore_one,
    rule_id,
    set_expiry_rule,
)
from heimdall_storage_pipeline.core.safety import Candidate
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS
from heimdall_storage_pipeline_tests.cleanup_support import CoreRig, add_refs, bucket_policy, make_rig, refs_table

OLD = timedelta(days=31)


@pytest.fixture
def rig(seaweed: SeaweedFS, db_engine: sa.Engine, tmp_path: Path) -> CoreRig:
    return make_rig(seaweed.settings(), db_engine, tmp_path / "manifests")


def _world(rig: CoreRig, seaweed: SeaweedFS, make_bucket, quarantine: Quarantine, orphans: int = 3):
    bucket = make_bucket("q")
    client = seaweed.client()
    table = refs_table(rig.engine)
    bodies = {f"data/orphan-{i}.npy": secrets.token_bytes(100 + i) for i in range(orphans)}
    bodies["data/kept.npy"] = b"kept"
    for key, body in bodies.items():
        client.put_object(bucket, key, io.BytesIO(body), len(body), content_type="application/x-npy",
                          metadata={"x-amz-meta-origin": "sensor-7"})
    add_refs(rig.engine, table, ["data/kept.npy"])
    policy = replace(bucket_policy(bucket, table), quarantine=quarantine)
    return bucket, client, policy, bodies


def _copies(rig: CoreRig, bucket: str, run_id: str | None = None) -> dict[str, str]:
    """Each moved key's quarantine key, as the audit log records it (of one run, or of the moves that stand)."""
    return {r.key: r.quarantine_key for r in rig.audit_rows(bucket)
            if r.run_id == run_id or (run_id is None and r.status == "deleted")}


class _CopiesWith:
    """A real client whose server-side copies go through ``copy(real, where, key, source)``."""

    def __init__(self, real, copy) -> None:
        self.real, self.copy = real, copy

    def __getattr__(self, name):
        return getattr(self.real, name)

    def copy_object(self, where, key, source):
        return self.copy(self.real, where, key, source)


def _read(client, bucket: str, key: str) -> bytes:
    response = client.get_object(bucket, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def test_a_live_cleanup_moves_orphans_with_bytes_and_metadata_and_the_next_scan_ignores_them(rig, seaweed, make_bucket):
    quarantine = Quarantine(keep_days=7, prefix="heimdall-quarantine/")
    bucket, client, policy, bodies = _world(rig, seaweed, make_bucket, quarantine)
    rig.offset = OLD
    report = rig.delete(policy, rig.scan(policy), run_id="0123abcd-ef45-6789-abcd-ef0123456789")
    assert report.outcomes["deleted"] == 3
    listed = {o.object_name for o in client.list_objects(bucket, recursive=True)}
    (folder,) = {key.split("/")[1] for key in listed if key.startswith("heimdall-quarantine/")}
    assert re.fullmatch(r"\d{8}T\d{6}Z-0123abcd", folder)  # the run's start (UTC) and its short id
    moved = {f"heimdall-quarantine/{folder}/{key}" for key in bodies if "orphan" in key}
    assert listed == {"data/kept.npy"} | moved
    for key in moved:
        original = key.removeprefix(f"heimdall-quarantine/{folder}/")
        assert _read(client, bucket, key) == bodies[original]
        stat = client.stat_object(bucket, key)
        assert stat.content_type == "application/x-npy" and stat.metadata["X-Amz-Meta-Origin"] == "sensor-7"
    rows = rig.audit_rows(bucket)
    assert {(r.key, r.status, r.quarantine_bucket, r.quarantine_key) for r in rows} == {
        (key.removeprefix(f"heimdall-quarantine/{folder}/"), "deleted", bucket, key) for key in moved}
    # Quarantined objects are not orphans of the bucket: a second cleanup leaves them alone.
    again = rig.delete(policy, rig.scan(policy))
    assert again.candidates == 0


def test_expiry_rule_is_set_and_the_job_expires_what_the_server_leaves(rig, seaweed, make_bucket):
    quarantine_bucket = make_bucket("qb")
    quarantine = Quarantine(keep_days=3, bucket=quarantine_bucket)
    bucket, client, policy, _ = _world(rig, seaweed, make_bucket, quarantine)
    other = Rule(ENABLED, rule_filter=Filter(prefix="logs/"), rule_id="someone-elses", expiration=Expiration(days=90))
    client.set_bucket_lifecycle(quarantine_bucket, LifecycleConfig([other]))
    assert set_expiry_rule(client, bucket, quarantine) and set_expiry_rule(client, bucket, quarantine)  # idempotent
    rules = {rule.rule_id: rule for rule in client.get_bucket_lifecycle(quarantine_bucket).rules}
    assert set(rules) == {"someone-elses", rule_id(bucket)}
    assert (rules[rule_id(bucket)].rule_filter.prefix, rules[rule_id(bucket)].expiration.days) == (f"{bucket}/", 3)

    rig.offset = OLD
    rig.delete(policy, rig.scan(policy), move_id="m1")
    # Not a move's copy: an object someone put under the location, and one that replaced a copy.
    client.put_object(quarantine_bucket, f"{bucket}/someone-elses.npy", io.BytesIO(b"data"), 4)
    client.put_object(quarantine_bucket, f"{bucket}/m1/data/orphan-2.npy", io.BytesIO(b"replaced"), 8)
    with pytest.raises(StorageCleanupError, match=r"holds 2\+ objects no move put there .*nothing was moved"):
        check_only_copies(rig.s3, bucket, quarantine, AuditLog(rig.engine))
    delete = lambda on, objects: delete_batch(client, on, objects, print)  # noqa: E731
    expire = lambda now, dry_run: expire_and_count(  # noqa: E731
        rig.s3, client, bucket, quarantine, now, dry_run=dry_run, delete=delete, audit=AuditLog(rig.engine),
        run_id="expiry-run", job="delete_orphans_job")
    now = utc_now()
    fresh = expire(now, dry_run=False)
    assert (fresh.objects, fresh.bytes, fresh.expired, fresh.foreign) == (2, 100 + 101, 0, 2) and fresh.oldest <= now
    later = now + timedelta(days=3, seconds=1)
    dry = expire(later, dry_run=True)
    assert (dry.objects, dry.expired, dry.expired_bytes) == (0, 2, 201)
    assert len(list(client.list_objects(quarantine_bucket, recursive=True))) == 4
    expired = expire(later, dry_run=False)
    assert (expired.objects, expired.expired, expired.foreign) == (0, 2, 2)
    assert {o.object_name for o in client.list_objects(quarantine_bucket, recursive=True)} == {
        f"{bucket}/someone-elses.npy", f"{bucket}/m1/data/orphan-2.npy"}
    assert _read(client, quarantine_bucket, f"{bucket}/m1/data/orphan-2.npy") == b"replaced"
    assert sorted((r.key, r.status, r.run_id) for r in rig.audit_rows(quarantine_bucket)) == [
        (f"{bucket}/m1/data/orphan-{i}.npy", "deleted", "expiry-run") for i in range(2)]


_KILLED_RUN = """
import json, os, signal, sys
from datetime import timedelta
from dataclasses import replace
import sqlalchemy as sa
import urllib3
from heimdall_storage_pipeline.core import deletion
from heimdall_storage_pipeline.core import quarantine as quarantine_module
from heimdall_storage_pipeline.core.policy import Quarantine
from heimdall_storage_pipeline.core.s3 import S3Settings
from heimdall_storage_pipeline_tests.cleanup_support import bucket_policy, make_rig
args = json.loads(sys.argv[1])
real_copy = deletion.copy_to_quarantine
def copy_then_die(*a, **k):
    real_copy(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # after the copy, before the delete
deletion.copy_to_quarantine = copy_then_die
rig = make_rig(S3Settings(**args["s3"]), sa.create_engine(args["db"]), args["root"])
rig.offset = timedelta(days=31)
policy = replace(bucket_policy(args["bucket"], args["table"]), quarantine=Quarantine(keep_days=7, prefix="q/"))
rig.delete(policy, args["orphans"], run_id="killed-run")
"""


def _killed_move(rig, seaweed, make_bucket, database_url, tmp_path):
    """A world scanned with old orphans, then a live move SIGKILLed between its copies and its delete."""
    quarantine = Quarantine(keep_days=7, prefix="q/")
    bucket, client, policy, bodies = _world(rig, seaweed, make_bucket, quarantine)
    rig.offset = OLD
    orphans = rig.scan(policy)
    args = {"s3": {"endpoint": seaweed.endpoint, "access_key": seaweed.access_key, "secret_key": seaweed.secret_key},
            "db": database_url, "root": str(tmp_path / "manifests"), "bucket": bucket,
            "table": policy.references[0].query.split()[-1], "orphans": orphans}
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(args)], timeout=120,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert killed.returncode == -9
    return bucket, client, policy, bodies, orphans


def test_a_move_killed_between_copy_and_delete_resumes_without_loss_or_duplicates(
        rig, seaweed, make_bucket, database_url, tmp_path):
    bucket, client, policy, bodies, orphans = _killed_move(rig, seaweed, make_bucket, database_url, tmp_path)
    killed = _copies(rig, bucket, "killed-run")
    assert set(killed) == {key for key in bodies if "orphan" in key}
    listed = {o.object_name for o in client.list_objects(bucket, recursive=True)}
    assert listed == set(bodies) | set(killed.values())  # copied, not deleted
    assert {r.status for r in rig.audit_rows(bucket)} == {"pending"}

    report = rig.delete(policy, orphans)  # the next run settles the dead one, then moves each object once
    assert report.reconciled == {"deleted": 0, "not_deleted": 3} and report.outcomes["deleted"] == 3
    moved = _copies(rig, bucket)
    assert set(moved) == set(killed) and not set(moved.values()) & set(killed.values())  # a folder of its own
    listed = {o.object_name for o in client.list_objects(bucket, recursive=True)}
    assert listed == {"data/kept.npy"} | set(moved.values())  # the dead run's copies are gone
    for key, copy in moved.items():
        assert _read(client, bucket, copy) == bodies[key]
    assert sorted((r.run_id == "killed-run", r.status) for r in rig.audit_rows(bucket)) == [
        (False, "deleted")] * 3 + [(True, "not_deleted")] * 3


def test_restore_is_byte_identical_and_never_overwrites_a_newer_object(rig, seaweed, make_bucket):
    quarantine = Quarantine(keep_days=7, prefix="q/")
    bucket, client, policy, bodies = _world(rig, seaweed, make_bucket, quarantine)
    rig.offset = OLD
    run_id = secrets.token_hex(8)
    rig.delete(policy, rig.scan(policy), run_id=run_id, move_id="m1")
    client.put_object(bucket, "data/orphan-0.npy", io.BytesIO(b"newer"), 5)  # re-uploaded since
    audit = AuditLog(rig.engine)
    moved = audit.moved(bucket, run_id=run_id)
    assert sorted(m.key for m in moved) == sorted(key for key in bodies if "orphan" in key)
    assert [(m.key, m.quarantine) for m in audit.moved(bucket, keys=["data/orphan-1.npy", "data/kept.npy"])] == [
        ("data/orphan-1.npy", (bucket, "q/m1/data/orphan-1.npy"))]
    dry = {m.key: restore_one(client, bucket, m, dry_run=True) for m in moved}
    assert dry["data/orphan-1.npy"] == dry["data/orphan-2.npy"] == "would_restore"
    assert dry["data/orphan-0.npy"].startswith("refused: a newer object sits at 'data/orphan-0.npy'")
    outcomes = {m.key: restore_one(client, bucket, m, dry_run=False) for m in moved}
    assert outcomes == {**dry, "data/orphan-1.npy": "restored", "data/orphan-2.npy": "restored"}
    assert _read(client, bucket, "data/orphan-0.npy") == b"newer"
    for key in ("data/orphan-1.npy", "data/orphan-2.npy"):
        assert _read(client, bucket, key) == bodies[key]
        assert client.stat_object(bucket, key).metadata["X-Amz-Meta-Origin"] == "sensor-7"
    listed = {o.object_name for o in client.list_objects(bucket, recursive=True)}
    assert listed == set(bodies) | {"q/m1/data/orphan-0.npy"}  # the refused one stays in quarantine


def test_on_a_versioned_bucket_a_move_keeps_the_current_version_and_frees_every_other(rig, seaweed, make_bucket):
    quarantine = Quarantine(keep_days=7, prefix="q/")
    bucket, client, policy, _ = _world(rig, seaweed, make_bucket, quarantine, orphans=1)
    client.set_bucket_versioning(bucket, VersioningConfig(ENABLED))
    client.put_object(bucket, "data/orphan-0.npy", io.BytesIO(b"second"), 6)
    rig.offset = OLD
    report = rig.delete(policy, rig.scan(policy), move_id="m1")
    assert (report.outcomes["deleted"], report.deleted_bytes) == (1, 100 + 6)
    versions = sorted((o.object_name, o.is_latest) for o in client.list_objects(bucket, include_version=True,
                                                                                  recursive=True))
    assert versions == [("data/kept.npy", "true"), ("q/m1/data/orphan-0.npy", "true")]
    assert _read(client, bucket, "q/m1/data/orphan-0.npy") == b"second"


def test_a_reference_added_while_the_copies_are_made_keeps_the_original_and_drops_its_copy(
        rig, seaweed, make_bucket, monkeypatch):
    quarantine = Quarantine(keep_days=7, prefix="q/")
    bucket, client, policy, bodies = _world(rig, seaweed, make_bucket, quarantine)
    rig.offset = OLD
    orphans = rig.scan(policy)
    table = policy.references[0].query.split()[-1]
    real_copy = deletion.copy_to_quarantine

    def copy_then_reference(*args, **kwargs):
        errors = real_copy(*args, **kwargs)
        add_refs(rig.engine, table, ["data/orphan-1.npy"])  # referenced while the batch was being copied
        return errors

    monkeypatch.setattr(deletion, "copy_to_quarantine", copy_then_reference)
    monkeypatch.setattr(deletion, "REVALIDATION_MAX_AGE", 0.0)  # the copies took longer than the bound
    report = rig.delete(policy, orphans, move_id="m1")
    assert report.outcomes["deleted"] == 2
    assert _read(client, bucket, "data/orphan-1.npy") == bodies["data/orphan-1.npy"]
    listed = {o.object_name for o in client.list_objects(bucket, recursive=True)}
    assert listed == {"data/kept.npy", "data/orphan-1.npy", "q/m1/data/orphan-0.npy", "q/m1/data/orphan-2.npy"}
    statuses = {r.key: r.status for r in rig.audit_rows(bucket)}
    assert statuses == {"data/orphan-0.npy": "deleted", "data/orphan-1.npy": "not_deleted",
                        "data/orphan-2.npy": "deleted"}


def test_restore_looks_for_a_newer_object_right_before_the_copy_and_records_before_removing_the_copy(
        rig, seaweed, make_bucket, monkeypatch):
    quarantine = Quarantine(keep_days=7, prefix="q/")
    bucket, client, policy, bodies = _world(rig, seaweed, make_bucket, quarantine, orphans=2)
    rig.offset = OLD
    run_id = secrets.token_hex(8)
    rig.delete(policy, rig.scan(policy), run_id=run_id, move_id="m1")
    moved = {m.key: m for m in AuditLog(rig.engine).moved(bucket, run_id=run_id)}
    real_stat = quarantine_module._stat

    def upload_while_looking(on, bucket_name, key):
        found = real_stat(on, bucket_name, key)
        if key == "q/m1/data/orphan-0.npy":  # an upload lands while the quarantine copy is looked at
            client.put_object(bucket, "data/orphan-0.npy", io.BytesIO(b"newer"), 5)
        return found

    monkeypatch.setattr(quarantine_module, "_stat", upload_while_looking)
    outcome = restore_one(client, bucket, moved["data/orphan-0.npy"], dry_run=False)
    assert outcome.startswith("refused: a newer object sits at")
    assert _read(client, bucket, "data/orphan-0.npy") == b"newer"

    def cannot_discard(*args):
        raise StorageCleanupError("could not remove 1 quarantine copies")

    monkeypatch.setattr(quarantine_module, "discard_copies", cannot_discard)
    recorded, warnings = [], []
    outcome = restore_one(client, bucket, moved["data/orphan-1.npy"], dry_run=False,
                          restored=lambda: recorded.append(True), warn=warnings.append)
    assert outcome == "restored" and recorded == [True]
    assert warnings and "quarantine copy stays" in warnings[0]
    assert _read(client, bucket, "data/orphan-1.npy") == bodies["data/orphan-1.npy"]


def test_a_copy_that_times_out_fails_its_key_only_and_copies_use_a_longer_bounded_timeout(
        rig, seaweed, make_bucket, monkeypatch):
    quarantine = Quarantine(keep_days=7, prefix="q/")
    bucket, client, policy, bodies = _world(rig, seaweed, make_bucket, quarantine, orphans=12)
    rig.offset = OLD
    real_copy, timeouts = quarantine_module.copy_to_quarantine, []

    def times_out_on_one(real, where, key, source):
        if key.endswith("orphan-1.npy"):
            raise urllib3.exceptions.ReadTimeoutError(None, key, "Read timed out.")
        return real.copy_object(where, key, source)

    def copy_with_timeout(copier, *args):
        timeouts.append(copier._http.connection_pool_kw["timeout"].read_timeout)
        return real_copy(_CopiesWith(copier, times_out_on_one), *args)

    monkeypatch.setattr(deletion, "copy_to_quarantine", copy_with_timeout)
    report = rig.delete(policy, rig.scan(policy))
    assert (report.outcomes["deleted"], report.outcomes["failed"]) == (11, 1)
    assert "ReadTimeoutError" in report.failures[0]
    assert timeouts and all(t == quarantine_module.COPY_READ_TIMEOUT for t in timeouts)
    assert _read(client, bucket, "data/orphan-1.npy") == bodies["data/orphan-1.npy"]
    assert {r.key: r.status for r in rig.audit_rows(bucket)}["data/orphan-1.npy"] == "failed"


def test_a_copy_is_removed_only_where_the_checked_original_still_sits_at_its_key(
        rig, seaweed, make_bucket, monkeypatch):
    quarantine = Quarantine(keep_days=7, prefix="q/")
    bucket, client, policy, bodies = _world(rig, seaweed, make_bucket, quarantine, orphans=20)
    rig.offset = OLD
    real_delete = deletion.delete_batch

    def gone_yet_failed(client_, on, objects, log, sleep, before_attempt):
        # orphan-0: the server deletes it but reports an error; orphan-1: really refused.
        def without_orphan_1(sent):
            return [o for o in before_attempt(sent) if o.name != "data/orphan-1.npy"]

        errors = real_delete(client_, on, objects, log, sleep, without_orphan_1)
        return {**errors, **{key: DeleteError("InternalError", "try again", key, None)
                             for key in ("data/orphan-0.npy", "data/orphan-1.npy")}}

    monkeypatch.setattr(deletion, "delete_batch", gone_yet_failed)
    report = rig.delete(policy, rig.scan(policy), move_id="m1")
    # orphan-0 left its key and its copy holds it: deleted, in the report and manifest as in the audit log.
    assert (report.outcomes["deleted"], report.outcomes["failed"]) == (19, 1)
    assert [failure.split(":")[0] for failure in report.failures] == ["data/orphan-1.npy"]
    manifest = rig.store.read_table(report.manifest_uri).to_pylist()
    assert {row["key"]: row["outcome"] for row in manifest if row["key"] in (
        "data/orphan-0.npy", "data/orphan-1.npy")} == {"data/orphan-0.npy": "deleted", "data/orphan-1.npy": "failed"}
    listed = {o.object_name for o in client.list_objects(bucket, recursive=True)}
    assert "data/orphan-0.npy" not in listed and _read(client, bucket, "q/m1/data/orphan-0.npy") == bodies[
        "data/orphan-0.npy"]  # the only copy left is kept
    assert "data/orphan-1.npy" in listed and "q/m1/data/orphan-1.npy" not in listed  # a duplicate goes
    statuses = {r.key: r.status for r in rig.audit_rows(bucket)}
    assert (statuses["data/orphan-0.npy"], statuses["data/orphan-1.npy"]) == ("deleted", "failed")
    assert [m.key for m in AuditLog(rig.engine).moved(bucket, keys=["data/orphan-0.npy"])] == ["data/orphan-0.npy"]


def test_after_a_crash_a_copy_whose_original_was_replaced_is_kept(rig, seaweed, make_bucket, database_url, tmp_path):
    bucket, client, policy, bodies, orphans = _killed_move(rig, seaweed, make_bucket, database_url, tmp_path)
    client.put_object(bucket, "data/orphan-0.npy", io.BytesIO(b"new"), 3)  # uploaded after the crash
    report = rig.delete(policy, orphans)
    assert report.reconciled == {"deleted": 1, "not_deleted": 2}
    assert _read(client, bucket, "data/orphan-0.npy") == b"new"
    assert _read(client, bucket, _copies(rig, bucket, "killed-run")["data/orphan-0.npy"]) == bodies["data/orphan-0.npy"]
    assert report.outcomes["skipped_changed"] == 1 and report.outcomes["deleted"] == 2


def test_a_key_moved_re_uploaded_and_orphaned_again_is_moved_again_and_both_copies_restore(
        rig, seaweed, make_bucket):
    quarantine = Quarantine(keep_days=7, prefix="q/")
    bucket, client, policy, bodies = _world(rig, seaweed, make_bucket, quarantine)
    rig.offset = OLD
    first, second = secrets.token_hex(8), secrets.token_hex(8)
    rig.delete(policy, rig.scan(policy), run_id=first)
    client.put_object(bucket, "data/orphan-0.npy", io.BytesIO(b"second life"), 11)  # re-uploaded, orphaned again
    report = rig.delete(policy, rig.scan(policy), run_id=second)
    assert (report.candidates, report.outcomes["deleted"]) == (1, 1)

    key = "data/orphan-0.npy"
    copies = [_copies(rig, bucket, run)[key] for run in (first, second)]
    assert copies[0] != copies[1] and all(copy.endswith(f"/{key}") for copy in copies)
    assert _read(client, bucket, copies[0]) == bodies[key] and _read(client, bucket, copies[1]) == b"second life"
    assert sorted((r.run_id, r.status) for r in rig.audit_rows(bucket) if r.key == key) == sorted(
        [(first, "deleted"), (second, "deleted")])
    audit = AuditLog(rig.engine)
    # Both are copies a move made: the quarantine is still only copies, and both count, none expires yet.
    check_only_copies(rig.s3, bucket, quarantine, audit)
    figures = expire_and_count(rig.s3, client, bucket, quarantine, utc_now(), dry_run=True,
                               delete=lambda on, objects: {}, audit=audit, run_id="count", job="test")
    assert (figures.objects, figures.expired, figures.foreign) == (4, 0, 0)

    older = [m for m in audit.moved(bucket, run_id=first) if m.key == key]
    latest = audit.moved(bucket, keys=[key])
    assert [m.quarantine[1] for m in older] == [copies[0]] and [m.quarantine[1] for m in latest] == [copies[1]]
    assert [restore_one(client, bucket, m, dry_run=True) for m in older + latest] == ["would_restore"] * 2
    assert restore_one(client, bucket, latest[0], dry_run=False) == "restored"  # by key: its latest move
    assert _read(client, bucket, key) == b"second life"
    assert restore_one(client, bucket, older[0], dry_run=False).startswith("refused: a newer object sits at")
    client.remove_object(bucket, key)  # an operator wants the first life back
    assert restore_one(client, bucket, older[0], dry_run=False) == "restored"
    assert _read(client, bucket, key) == bodies[key]


def test_an_object_already_at_a_moves_own_destination_is_never_overwritten(rig, seaweed, make_bucket):
    quarantine = Quarantine(keep_days=7, prefix="q/")
    bucket, client, policy, bodies = _world(rig, seaweed, make_bucket, quarantine, orphans=1)
    rig.offset = OLD
    orphans = rig.scan(policy)
    client.put_object(bucket, "q/m1/data/orphan-0.npy", io.BytesIO(b"already here"), 12)
    # The only candidate of its batch fails: the bucket stops, naming why.
    with pytest.raises(DeletionAbortedError, match="already exists, though this run's move alone"):
        rig.delete(policy, orphans, move_id="m1")
    assert [r.status for r in rig.audit_rows(bucket) if r.key == "data/orphan-0.npy"] == ["failed"]
    assert _read(client, bucket, "q/m1/data/orphan-0.npy") == b"already here"
    assert _read(client, bucket, "data/orphan-0.npy") == bodies["data/orphan-0.npy"]


def test_a_copy_at_the_old_layouts_location_is_restored_and_expired_by_its_recorded_location(
        rig, seaweed, make_bucket):
    # Before move ids, a move's copy sat at <prefix>/<key>; its audit row says so.
    quarantine = Quarantine(keep_days=7, prefix="q/")
    bucket, client, _, bodies = _world(rig, seaweed, make_bucket, quarantine, orphans=2)
    audit = AuditLog(rig.engine)
    moved_at = utc_now()
    candidates = []
    for key in ("data/orphan-0.npy", "data/orphan-1.npy"):
        stat = client.stat_object(bucket, key)
        client.copy_object(bucket, f"q/{key}", CopySource(bucket, key))
        client.remove_object(bucket, key)
        candidates.append(Candidate(key, stat.size, stat.last_modified, stat.etag))
    ids = audit.record_intent(run_id="old-layout-run", job="delete_orphans_job", bucket=bucket,
                              candidates=candidates, at=moved_at, quarantine=lambda key: (bucket, f"q/{key}"))
    audit.finish([Mark(list(ids.values()), "deleted", moved_at)], intents=[min(ids.values())])

    check_only_copies(rig.s3, bucket, quarantine, audit)  # old-layout copies are copies a move made
    (old,) = audit.moved(bucket, keys=["data/orphan-0.npy"])
    assert old.quarantine == (bucket, "q/data/orphan-0.npy")
    restored = restore_one(client, bucket, old, dry_run=False,
                           restored=lambda: audit.mark_restored(old.audit_id, utc_now()))
    assert restored == "restored"
    assert _read(client, bucket, "data/orphan-0.npy") == bodies["data/orphan-0.npy"]

    delete = lambda on, objects: delete_batch(client, on, objects, print)  # noqa: E731
    expired = expire_and_count(rig.s3, client, bucket, quarantine, moved_at + timedelta(days=7, seconds=1),
                               dry_run=False, delete=delete, audit=audit, run_id="expiry-run", job="test")
    assert (expired.expired, expired.foreign) == (1, 0)
    assert {o.object_name for o in client.list_objects(bucket, recursive=True)} == {
        "data/kept.npy", "data/orphan-0.npy"}


def test_move_ids_name_the_run_start_in_utc_and_the_short_run_id():
    started = datetime(2026, 12, 5, 23, 2, 44, 999_000, tzinfo=UTC)
    assert move_id(started, "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d") == "20261205T230244Z-1a2b3c4d"
    assert move_id(started, "a/b") == "20261205T230244Z-ab"
    assert Quarantine(keep_days=1, prefix="q").location("raw", "x/y.npy", "M") == ("raw", "q/M/x/y.npy")
    assert Quarantine(keep_days=1, bucket="hold").location("raw", "x/y.npy", "M") == ("hold", "raw/M/x/y.npy")
    assert Quarantine(keep_days=1, bucket="hold").root("raw") == ("hold", "raw/")


def test_the_copies_of_a_move_killed_before_its_delete_do_not_block_the_next_cleanup(
        rig, seaweed, make_bucket, database_url, tmp_path):
    # The job checks the location for foreign objects before the deletion settles the dead run's rows.
    bucket, _, policy, _, orphans = _killed_move(rig, seaweed, make_bucket, database_url, tmp_path)
    audit = AuditLog(rig.engine)
    check_only_copies(rig.s3, bucket, policy.quarantine, audit)  # pending copies are a move's copies
    report = rig.delete(policy, orphans)
    assert report.outcomes["deleted"] == 3
    check_only_copies(rig.s3, bucket, policy.quarantine, audit)


def test_a_copy_that_fails_its_check_is_removed_and_does_not_block_the_next_cleanup(
        rig, seaweed, make_bucket, monkeypatch):
    quarantine = Quarantine(keep_days=7, prefix="q/")
    bucket, client, policy, bodies = _world(rig, seaweed, make_bucket, quarantine, orphans=12)
    rig.offset = OLD
    real_copy = quarantine_module.copy_to_quarantine

    def reports_another_etag(real, where, key, source):
        copied = real.copy_object(where, key, source)
        if key.endswith("orphan-1.npy"):  # written, but not what was checked
            return client.put_object(where, key, io.BytesIO(b"garbled"), 7)
        return copied

    monkeypatch.setattr(deletion, "copy_to_quarantine",
                        lambda copier, *a: real_copy(_CopiesWith(copier, reports_another_etag), *a))
    report = rig.delete(policy, rig.scan(policy), move_id="m1")
    assert (report.outcomes["deleted"], report.outcomes["failed"]) == (11, 1)
    assert _read(client, bucket, "data/orphan-1.npy") == bodies["data/orphan-1.npy"]
    listed = {o.object_name for o in client.list_objects(bucket, recursive=True)}
    assert "q/m1/data/orphan-1.npy" not in listed  # this run wrote it: removed
    check_only_copies(rig.s3, bucket, quarantine, AuditLog(rig.engine))


def test_a_key_too_long_for_its_quarantine_location_is_failed_by_name_and_left_in_place(rig, seaweed, make_bucket):
    quarantine = Quarantine(keep_days=7, prefix="q/")
    bucket, client, policy, _ = _world(rig, seaweed, make_bucket, quarantine, orphans=12)
    long_key = "data/" + "/".join(["é" * 49] * 10) + ".npy"  # fits S3's limit, but not under q/<move id>/
    move = "20261205T230244Z-1a2b3c4d"
    assert len(long_key.encode()) <= 1024 < len(f"q/{move}/{long_key}".encode())
    client.put_object(bucket, long_key, io.BytesIO(b"long"), 4)
    rig.offset = OLD
    report = rig.delete(policy, rig.scan(policy), move_id=move)
    assert (report.outcomes["deleted"], report.outcomes["failed"]) == (12, 1)
    assert "over S3's limit of 1024 bytes" in report.failures[0]
    assert _read(client, bucket, long_key) == b"long"
    assert {r.key: r.status for r in rig.audit_rows(bucket)}[long_key] == "failed"


def test_the_scan_leaves_out_the_quarantine_folder_only_not_keys_that_merely_start_like_it(
        rig, seaweed, make_bucket):
    quarantine = Quarantine(keep_days=7, prefix="heimdall-quarantine")  # no trailing '/'
    bucket, client, policy, _ = _world(rig, seaweed, make_bucket, quarantine, orphans=1)
    client.put_object(bucket, "heimdall-quarantine-old/x.npy", io.BytesIO(b"real data"), 9)
    rig.offset = OLD
    report = rig.delete(policy, rig.scan(policy), move_id="m1")
    assert (report.candidates, report.outcomes["deleted"]) == (2, 2)
    assert {o.object_name for o in client.list_objects(bucket, recursive=True)} == {
        "data/kept.npy", "heimdall-quarantine/m1/data/orphan-0.npy",
        "heimdall-quarantine/m1/heimdall-quarantine-old/x.npy"}
    assert rig.delete(policy, rig.scan(policy), move_id="m2").candidates == 0
