"""Versioned buckets on a real SeaweedFS: version listing, figures, and deletion that frees the disk."""

from __future__ import annotations

import io
import secrets
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED
from minio.error import S3Error
from minio.versioningconfig import VersioningConfig

from heimdall_storage_pipeline.core import deletion, revalidation
from heimdall_storage_pipeline.core.clock import utc_now
from heimdall_storage_pipeline.core.deletion import delete_candidates, delete_noncurrent, keys_with_noncurrent
from heimdall_storage_pipeline.core.diff import compute_orphan_diff
from heimdall_storage_pipeline.core.list_objects_v2 import ListObjectsV2
from heimdall_storage_pipeline.core.listing import list_bucket_to_manifest
from heimdall_storage_pipeline.core.policy import BucketPolicy
from heimdall_storage_pipeline.core.references import read_references_to_manifest
from heimdall_storage_pipeline.core.safety import Candidate
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS
from heimdall_storage_pipeline_tests.cleanup_support import CoreRig, add_refs, bucket_policy, make_rig, refs_table
from heimdall_storage_pipeline_tests.events_support import wait_for

OLD = timedelta(days=31)

ODD = ["with space", "plus+sign", "100%", "ünïcødé/日本.npy", "a&b<c>"]


@pytest.fixture
def rig(seaweed: SeaweedFS, db_engine: sa.Engine, tmp_path: Path) -> CoreRig:
    return make_rig(seaweed.settings(), db_engine, tmp_path / "manifests")


def versioned_bucket(seaweed: SeaweedFS, make_bucket: Callable[[str], str]) -> str:
    bucket = make_bucket("ver")
    seaweed.client().set_bucket_versioning(bucket, VersioningConfig(ENABLED))
    return bucket


def put(client: Minio, bucket: str, key: str, size: int) -> None:
    client.put_object(bucket, key, io.BytesIO(secrets.token_bytes(size)), size)


def server_versions(client: Minio, bucket: str) -> list[tuple[str, str | None, bool, bool, int]]:
    """The server's own version listing: (key, version id, latest, delete marker, size)."""
    return sorted((o.object_name, o.version_id, o.is_latest == "true", o.is_delete_marker, o.size or 0)
                  for o in client.list_objects(bucket, include_version=True, recursive=True))


def figures(versions: list[tuple[str, str | None, bool, bool, int]]) -> dict[str, int]:
    return {
        "noncurrent_versions": sum(1 for v in versions if not v[2] and not v[3]),
        "noncurrent_bytes": sum(v[4] for v in versions if not v[2] and not v[3]),
        "delete_markers": sum(1 for v in versions if v[3]),
    }


def test_versioned_listing_matches_the_servers_version_listing(rig, seaweed, make_bucket):
    bucket = versioned_bucket(seaweed, make_bucket)
    client = seaweed.client()
    for size in (10, 20, 30):
        put(client, bucket, "data/orphan.npy", size)
    client.remove_object(bucket, "data/orphan.npy")  # a delete marker on top
    for key in ODD:
        put(client, bucket, key, 5)
        put(client, bucket, key, 7)
    result = list_bucket_to_manifest(rig.s3, bucket, rig.store, "run", max_keys=3)  # several pages

    versions = server_versions(client, bucket)
    assert result.versioning == "Enabled"
    assert {k: getattr(result, k) for k in figures(versions)} == figures(versions)
    assert figures(versions) == {"noncurrent_versions": 3 + len(ODD), "noncurrent_bytes": 60 + 5 * len(ODD),
                                 "delete_markers": 1}
    table = rig.store.read_table(result.versions_manifest_uri)
    assert sorted(zip(*(table.column(c).to_pylist() for c in ("key", "version_id", "is_latest", "delete_marker",
                                                              "size")), strict=True)) == versions
    # The inventory holds the current versions only: keys byte-identical, the deleted key absent.
    inventory = rig.store.read_table(result.manifest_uri)
    assert sorted(inventory.column("key").to_pylist()) == sorted(ODD)
    assert result.total_bytes == 7 * len(ODD)


def test_sibling_keys_of_a_versioned_bucket_are_all_listed_in_both_manifests(rig, seaweed, make_bucket):
    # SeaweedFS 4.48 drops 'k' from version pages of a few keys ending between 'k' and 'k-2'; the
    # inventory comes from the object listing, which keeps it.
    bucket = versioned_bucket(seaweed, make_bucket)
    keys = ["x/k", "x/k-2", "x/k.3", "x/k/4", "x/ka"]
    for key in keys:
        put(seaweed.client(), bucket, key, 1)
        put(seaweed.client(), bucket, key, 2)
    for max_keys in (4, 1000):
        result = list_bucket_to_manifest(rig.s3, bucket, rig.store, "run", max_keys=max_keys)
        assert sorted(rig.store.read_table(result.manifest_uri).column("key").to_pylist()) == keys
    assert sorted(set(rig.store.read_table(result.versions_manifest_uri).column("key").to_pylist())) == keys
    assert result.noncurrent_versions == len(keys)


def test_an_unversioned_bucket_is_listed_as_before(rig, seaweed, make_bucket):
    bucket = make_bucket("plain")
    put(seaweed.client(), bucket, "x.npy", 3)
    result = list_bucket_to_manifest(rig.s3, bucket, rig.store, "run")
    assert (result.versioning, result.versions_manifest_uri, result.noncurrent_bytes) == ("Off", "", 0)
    assert ListObjectsV2(rig.s3, bucket).versioning() == "Off"


def scan(rig: CoreRig, policy: BucketPolicy) -> tuple[str, str]:
    """The orphan manifest and the versions manifest of a fresh scan."""
    run_id = secrets.token_hex(8)
    inventory = list_bucket_to_manifest(rig.s3, policy.name, rig.store, run_id)
    references = read_references_to_manifest(rig.engine, policy, rig.store, run_id)
    diff = compute_orphan_diff(bucket=policy, store=rig.store, inventory_uri=inventory.manifest_uri,
                               references_uri=references.manifest_uri, as_of=rig.clock(), run_id=run_id)
    return diff.manifest_uri, inventory.versions_manifest_uri


def three_versions_and_a_marker(client: Minio, bucket: str, key: str, marker_on_top: bool) -> int:
    """Versions of 10, 20 and 30 bytes with a delete marker among them (or on top); returns their bytes."""
    put(client, bucket, key, 10)
    put(client, bucket, key, 20)
    if not marker_on_top:
        client.remove_object(bucket, key)
    put(client, bucket, key, 30)
    if marker_on_top:
        client.remove_object(bucket, key)
    return 60


def test_an_orphan_loses_every_version_and_its_bytes_leave_the_version_listing(rig, seaweed, make_bucket):
    bucket = versioned_bucket(seaweed, make_bucket)
    client = seaweed.client()
    table = refs_table(rig.engine)
    orphan_bytes = three_versions_and_a_marker(client, bucket, "data/orphan.npy", marker_on_top=False)
    put(client, bucket, "data/kept.npy", 4)
    put(client, bucket, "data/kept.npy", 5)
    add_refs(rig.engine, table, ["data/kept.npy"])
    policy = bucket_policy(bucket, table)  # no noncurrent_min_age: only orphans go
    before = server_versions(client, bucket)
    assert len([v for v in before if v[0] == "data/orphan.npy"]) == 4

    rig.offset = OLD
    orphans, _ = scan(rig, policy)
    dry = rig.delete(policy, orphans, dry_run=True)
    assert (dry.outcomes["would_delete"], dry.would_delete_bytes) == (1, orphan_bytes), dry
    report = rig.delete(policy, orphans)

    after = server_versions(client, bucket)
    assert (report.outcomes["deleted"], report.deleted_bytes) == (1, orphan_bytes)
    assert after == [v for v in before if v[0] != "data/orphan.npy"]  # the referenced key keeps both versions
    assert figures(before)["noncurrent_bytes"] - figures(after)["noncurrent_bytes"] == 10 + 20
    (row,) = rig.audit_rows(bucket)
    assert row.status == "deleted" and sorted(row.version_ids) == sorted(v[1] for v in before if v[0] == row.key)


def test_noncurrent_versions_go_only_past_noncurrent_min_age_and_current_ones_stay(rig, seaweed, make_bucket):
    bucket = versioned_bucket(seaweed, make_bucket)
    client = seaweed.client()
    table = refs_table(rig.engine)
    for size in (4, 5, 6):
        put(client, bucket, "data/kept.npy", size)
    dead_bytes = three_versions_and_a_marker(client, bucket, "data/dead.npy", marker_on_top=True)
    add_refs(rig.engine, table, ["data/kept.npy"])
    policy = replace(bucket_policy(bucket, table), noncurrent_min_age=timedelta(days=1))
    before = server_versions(client, bucket)
    _, versions = scan(rig, policy)
    keys = list(keys_with_noncurrent(rig.store, versions))
    assert keys == ["data/dead.npy", "data/kept.npy"]

    young = delete_noncurrent(rig.context(), policy, keys, dry_run=False, batch_size=1000)
    assert (young.versions, young.delete_markers) == (0, 0) and server_versions(client, bucket) == before

    rig.offset = timedelta(days=2)
    dry = delete_noncurrent(rig.context(), policy, keys, dry_run=True, batch_size=1000)
    assert server_versions(client, bucket) == before
    report = delete_noncurrent(rig.context(), policy, keys, dry_run=False, batch_size=1000)
    after = server_versions(client, bucket)
    assert (dry.versions, dry.bytes, dry.delete_markers) == (report.versions, report.bytes, report.delete_markers)
    # The dead key is gone with its marker; the referenced key keeps exactly its current version.
    assert after == [v for v in before if v[0] == "data/kept.npy" and v[2]]
    assert (report.versions, report.bytes, report.delete_markers) == (5, dead_bytes + 4 + 5, 1)
    assert {k: figures(before)[k] - figures(after)[k] for k in figures(after)} == {
        "noncurrent_versions": report.versions, "noncurrent_bytes": report.bytes,
        "delete_markers": report.delete_markers}
    rows = rig.audit_rows(bucket)
    assert {(r.key, r.status, len(r.version_ids)) for r in rows} == {("data/dead.npy", "deleted", 4),
                                                                    ("data/kept.npy", "deleted", 2)}


def test_a_key_that_may_not_ask_for_versioning_lists_the_bucket_as_before(rig, seaweed, make_bucket, monkeypatch):
    bucket = make_bucket("noask")
    put(seaweed.client(), bucket, "x.npy", 3)
    real_get = ListObjectsV2.get

    def denied(self: ListObjectsV2, query: dict[str, str]) -> bytes:
        if "versioning" in query:
            response = urllib3.HTTPResponse(body=b"", status=403)
            raise S3Error(response, "AccessDenied", "denied", bucket, "req", "host", bucket_name=bucket)
        return real_get(self, query)

    monkeypatch.setattr(ListObjectsV2, "get", denied)
    result = list_bucket_to_manifest(rig.s3, bucket, rig.store, "run")
    assert (result.versioning, result.object_count, result.versions_manifest_uri) == ("Unknown", 1, "")


@pytest.mark.parametrize("page_size", [1000, 4])
def test_fresh_versions_from_one_bounded_listing_match_each_keys_own_listing(seaweed, make_bucket, monkeypatch,
                                                                              page_size):
    bucket = versioned_bucket(seaweed, make_bucket)
    client = seaweed.client()
    wanted = [*(f"batch/k{i:02d}" for i in range(12)), "batch/k05/child", "other/far-away"]
    for index, key in enumerate([*wanted, "batch/k03-sibling", "batch/k07x"]):
        for size in range(1 + index % 3):
            put(client, bucket, key, size + 1)
    client.remove_object(bucket, "batch/k04")  # a delete marker on top
    lister = ListObjectsV2(seaweed.settings(), bucket)
    one_by_one = {key: revalidation._versions_of(lister, key) for key in [*wanted, "batch/missing"]}
    real_pages = ListObjectsV2.version_pages
    monkeypatch.setattr(ListObjectsV2, "version_pages",
                        lambda self, **kw: real_pages(self, **{**kw, "max_keys": page_size}))
    listed = revalidation.fresh_versions(lister, [*wanted, "batch/missing"])
    assert listed == one_by_one
    assert listed["batch/k04"][0].delete_marker and listed["batch/missing"] == []
    assert all(v.noncurrent_since is not None for versions in listed.values() for v in versions if not v.is_latest)


def test_an_undelete_between_listing_and_delete_keeps_the_version_it_made_current(rig, seaweed, make_bucket,
                                                                                   monkeypatch):
    bucket = versioned_bucket(seaweed, make_bucket)
    client = seaweed.client()
    table = refs_table(rig.engine)
    three_versions_and_a_marker(client, bucket, "data/undeleted.npy", marker_on_top=True)
    for size in (4, 5):
        put(client, bucket, "data/other.npy", size)
    policy = replace(bucket_policy(bucket, table), noncurrent_min_age=timedelta(days=1))
    _, versions = scan(rig, policy)
    keys = list(keys_with_noncurrent(rig.store, versions))
    rig.offset = timedelta(days=2)
    real_fresh_versions = deletion.fresh_versions
    listings = []

    def undelete_after_the_first_listing(lister: ListObjectsV2, batch: list[str]) -> dict:
        found = real_fresh_versions(lister, batch)
        if not listings:  # someone removes the delete marker right after the pass listed the versions
            (marker,) = [v for v in found["data/undeleted.npy"] if v.delete_marker]
            client.remove_object(bucket, "data/undeleted.npy", version_id=marker.version_id)
        listings.append(batch)
        return found

    monkeypatch.setattr(deletion, "fresh_versions", undelete_after_the_first_listing)
    monkeypatch.setattr(deletion, "REVALIDATION_MAX_AGE", 0.0)  # every listing counts as too old
    report = delete_noncurrent(rig.context(), policy, keys, dry_run=False, batch_size=1000)

    after = server_versions(client, bucket)
    # The undeleted key keeps every version, the 30-byte one current again; the other key lost its old one.
    assert sorted((v[4], v[2], v[3]) for v in after if v[0] == "data/undeleted.npy") == [
        (10, False, False), (20, False, False), (30, True, False)]
    assert [(v[2], v[4]) for v in after if v[0] == "data/other.npy"] == [(True, 5)]
    assert (report.versions, report.delete_markers) == (1, 0)
    rows = {r.key: r for r in rig.audit_rows(bucket)}
    assert rows["data/undeleted.npy"].status == "not_deleted" and rows["data/other.npy"].status == "deleted"
    assert "when checked again" in rows["data/undeleted.npy"].error
    assert len(listings) == 2  # listed again before the request


def test_the_same_bytes_uploaded_again_after_the_check_make_the_key_changed(rig, seaweed, make_bucket, monkeypatch):
    bucket = versioned_bucket(seaweed, make_bucket)
    client = seaweed.client()
    body = b"the same bytes"
    for _ in range(2):
        client.put_object(bucket, "data/orphan.npy", io.BytesIO(body), len(body))
    policy = bucket_policy(bucket, refs_table(rig.engine))
    rig.offset = OLD
    orphans, _ = scan(rig, policy)
    scanned = client.stat_object(bucket, "data/orphan.npy").last_modified
    real_revalidate = deletion._revalidate

    def upload_again_after_the_check(*args: object, **kwargs: object) -> tuple:
        checked = real_revalidate(*args, **kwargs)
        # A new second, so that the new version's Last-Modified differs from the scanned one.
        wait_for(lambda: utc_now().replace(microsecond=0) > scanned, "a new second on the clock")
        client.put_object(bucket, "data/orphan.npy", io.BytesIO(body), len(body))
        return checked

    monkeypatch.setattr(deletion, "_revalidate", upload_again_after_the_check)
    before = server_versions(client, bucket)
    report = rig.delete(policy, orphans)

    assert report.outcomes == {"skipped_changed": 1}, report
    after = server_versions(client, bucket)  # the young version and the old ones all stay
    assert len(after) == 3 and {v[1] for v in before} < {v[1] for v in after}
    assert rig.audit_rows(bucket) == []


def test_pending_rows_of_the_noncurrent_pass_are_settled_by_their_versions(rig, seaweed, make_bucket):
    bucket = versioned_bucket(seaweed, make_bucket)
    client = seaweed.client()
    for key in ("data/went.npy", "data/stayed.npy", "data/half.npy"):
        for size in (1, 2, 3):
            put(client, bucket, key, size)
    noncurrent = {key: tuple(v[1] for v in server_versions(client, bucket) if v[0] == key and not v[2])
                  for key in ("data/went.npy", "data/stayed.npy", "data/half.npy")}
    # A noncurrent pass records its intent, then dies: after its request for one key, during another's.
    rig.audit.record_intent(run_id="crashed/noncurrent", job="test", bucket=bucket, at=rig.clock(), candidates=[
        Candidate(key, 3, rig.clock(), "", ids) for key, ids in noncurrent.items()])
    for version_id in noncurrent["data/went.npy"]:
        client.remove_object(bucket, "data/went.npy", version_id=version_id)
    client.remove_object(bucket, "data/half.npy", version_id=noncurrent["data/half.npy"][0])

    policy = bucket_policy(bucket, refs_table(rig.engine))
    report = delete_candidates(rig.context(), policy, [], dry_run=False, batch_size=10)

    assert report.reconciled == {"deleted": 1, "not_deleted": 1, "failed": 1}
    assert {r.key: r.status for r in rig.audit_rows(bucket)} == {
        "data/went.npy": "deleted", "data/stayed.npy": "not_deleted", "data/half.npy": "failed"}
    assert rig.audit.pending(bucket) == ([], [])
