"""The scan through Dagster on a real instance, against the real SeaweedFS and PostgreSQL."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.compute as pc
import pytest
import sqlalchemy as sa
import yaml

from heimdall_storage_pipeline.core.clock import as_utc, isoformat_utc, utc_now
from heimdall_storage_pipeline.core.diff import compute_orphan_diff
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.policy import default_policy_path
from heimdall_storage_pipeline.defs.build import build_definitions
from heimdall_storage_pipeline.defs.resources import ReferenceDatabaseResource, S3Resource
from heimdall_storage_pipeline.local import heimdall_db
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS, free_ports
from heimdall_storage_pipeline_tests.conftest import ScanHarness, key_source, write_policy
from heimdall_storage_pipeline_tests.helpers import (
    make_reference_table,
    manifest_files,
    materialization_count,
    orphan_rows,
    put_objects,
    run_event_log_text,
    step_failure_message,
)

ALL = ["bucket_inventory", "referenced_keys", "orphan_diff"]
SIDECAR = {"name": "sidecar", "match": r"^(.+)\.npy$", "companion": r"\1_metadata.json"}
HarnessFactory = Callable[..., ScanHarness]
MakeBucket = Callable[[str], str]


def far_future() -> str:
    """As far ahead as a scan accepts (a minute, within the clock skew): objects a second old count as old."""
    return isoformat_utc(utc_now() + timedelta(minutes=1))


def store_of(harness: ScanHarness) -> ManifestStore:
    return harness.resources["manifests"].store()


def rebuild(harness: ScanHarness, **resources: Any) -> None:
    """Swap resources (a wrong secret, a dead database) and rebuild the definitions."""
    harness.resources.update(resources)
    harness.defs = build_definitions(harness.policy, harness.resources)


def test_every_reference_format_and_the_companion_rule(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, seaweed: SeaweedFS, db_engine: sa.Engine
) -> None:
    bucket, other = make_bucket("fmt"), make_bucket("other")
    referenced = ["k/key-ref.npy", "k/uri-ref.npy", "k/bk-ref.npy", "k/json-obj-1.npy", "k/json-obj-2.npy",
                  "k/json-arr-1.npy", "k/json-arr-2.npy"]
    kept_sidecar = "k/uri-ref_metadata.json"
    orphans = ["k/orphan-a.npy", "k/orphan-b.npy", "k/orphan-a_metadata.json", "k/plain-orphan.bin"]
    client = seaweed.client()
    put_objects(client, bucket, [*referenced, kept_sidecar], size=10)
    put_objects(client, bucket, orphans, size=100)
    put_objects(client, other, ["k/orphan-a.npy"])  # the other-bucket reference is real there

    sources = [
        key_source(make_reference_table(db_engine, "t_key", ["k/key-ref.npy", None, "k/missing.npy"]), "key"),
        key_source(make_reference_table(
            db_engine, "t_uri", [f"s3://{bucket}/k/uri-ref.npy", f"s3://{other}/k/orphan-a.npy"]), "uri"),
        key_source(make_reference_table(
            db_engine, "t_bk", [f"{bucket}/k/bk-ref.npy", f"{other}/k/orphan-b.npy"]), "bucket_key"),
        key_source(make_reference_table(
            db_engine, "t_jobj", [{"RX_001": "k/json-obj-1.npy", "RX_004": "k/json-obj-2.npy"}], "jsonb"),
            "key", container="json"),
        key_source(make_reference_table(
            db_engine, "t_jarr", [["k/json-arr-1.npy", "k/json-arr-2.npy"]], "jsonb"),
            "key", container="json"),
    ]
    harness = harness_factory({bucket: {"min_age": "1s", "references": sources, "companions": [SIDECAR]}})

    diff = harness.scan(bucket, as_of=far_future())

    assert orphan_rows(store_of(harness), diff["manifest_uri"]) == dict.fromkeys(orphans, True)
    refs = harness.metadata("referenced_keys", bucket)
    assert refs["referenced_count"] == 8  # the seven objects and the missing one
    assert refs["other_bucket_reference_count"] == 2
    assert refs["unparseable_reference_count"] == 0
    references = store_of(harness).read_table(refs["manifest_uri"])
    assert set(references.column("source").to_pylist()) == {source["name"] for source in sources}
    assert diff["object_count"] == 12
    assert diff["total_bytes"] == 8 * 10 + 4 * 100
    assert diff["referenced_count"] == 8
    assert (diff["orphan_count"], diff["orphan_bytes"]) == (4, 400)
    assert (diff["eligible_orphan_count"], diff["eligible_orphan_bytes"]) == (4, 400)
    assert diff["young_orphan_count"] == 0
    assert diff["dangling_reference_count"] == 1
    assert json.loads(diff["dangling_sample"]) == ["k/missing.npy"]


def test_unparseable_references_are_counted_sampled_and_protect_nothing(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, seaweed: SeaweedFS, db_engine: sa.Engine
) -> None:
    bucket = make_bucket("unparse")
    put_objects(seaweed.client(), bucket, ["x.npy", "y.npy", "z.npy", "w.npy", "v.npy"])
    bad_keys = ["a/../x.npy", "./y.npy", "", "bad/\x01ctl"]
    keys = key_source(make_reference_table(db_engine, "t_bad_keys", bad_keys))
    uris = key_source(make_reference_table(db_engine, "t_bad_uris", ["z.npy", f"s3://{bucket}"]), "uri")
    # JSON text: one value is not JSON at all, one array holds a number next to a good key.
    jsons = key_source(make_reference_table(db_engine, "t_bad_json", ["w.npy", '[1, "v.npy"]']),
                       container="json")
    harness = harness_factory({bucket: {"min_age": "1s", "references": [keys, uris, jsons]}})

    diff = harness.scan(bucket, as_of=far_future())

    refs = harness.metadata("referenced_keys", bucket)
    assert refs["unparseable_reference_count"] == 8
    sample = json.loads(refs["unparseable_sample"])
    assert len(sample) == 8
    assert f"{keys['name']}: 'a/../x.npy' (contains a '.' or '..' path segment)" in sample
    assert f"{uris['name']}: 'z.npy' (not an s3:// URI)" in sample
    assert f"{jsons['name']}: 'w.npy' (not valid JSON)" in sample
    assert f"{jsons['name']}: 1 (not a string: int)" in sample
    assert refs["referenced_count"] == 1
    assert orphan_rows(store_of(harness), diff["manifest_uri"]) == dict.fromkeys(
        ["x.npy", "y.npy", "z.npy", "w.npy"], True
    )


def test_a_listed_key_that_cannot_be_normalised_is_reported_never_eligible(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, seaweed: SeaweedFS, db_engine: sa.Engine
) -> None:
    bucket = make_bucket("badkey")
    weird = ["ctl/\x01name.npy", "tab\tkey.npy"]
    put_objects(seaweed.client(), bucket, [*weird, "fine.npy", "kept.npy"])
    source = key_source(make_reference_table(db_engine, "t_refs", ["kept.npy", "tab\tkey.npy"]))
    harness = harness_factory({bucket: {"min_age": "1s", "references": [source]}})

    diff = harness.scan(bucket, as_of=far_future())

    assert diff["unparseable_object_count"] == 2
    assert sorted(json.loads(diff["unparseable_object_sample"])) == sorted(weird)
    assert orphan_rows(store_of(harness), diff["manifest_uri"]) == {
        "ctl/\x01name.npy": False, "tab\tkey.npy": False, "fine.npy": True,
    }
    assert (diff["eligible_orphan_count"], diff["young_orphan_count"]) == (1, 0)
    assert harness.metadata("referenced_keys", bucket)["unparseable_reference_count"] == 1


def test_keys_with_spaces_unicode_plus_percent_and_slashes(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, seaweed: SeaweedFS, db_engine: sa.Engine
) -> None:
    bucket = make_bucket("chars")
    client = seaweed.client()
    # SeaweedFS stores "dbl//slash.npy" as "dbl/slash.npy" and "/lead.npy" as "lead.npy".
    referenced_as_stored = ["a%20b", "plus+sign", "ünïcödé/ké y.npy", "dbl//slash.npy", "/lead.npy",
                            "trailing space ", "enc oded+plus%.npy"]
    decoys = ["a b", "plus sign", "enc%20oded%2Bplus%25.npy"]
    put_objects(client, bucket, [*referenced_as_stored, *decoys])
    listed = {obj.object_name for obj in client.list_objects(bucket, recursive=True)}
    assert {"dbl/slash.npy", "lead.npy"} <= listed

    plain = key_source(make_reference_table(
        db_engine, "t_plain", ["a%20b", "plus+sign", "ünïcödé/ké y.npy", "dbl//slash.npy", "/lead.npy",
                               "trailing space "]))
    decoded = key_source(make_reference_table(
        db_engine, "t_encoded", [f"s3://{bucket}/enc%20oded%2Bplus%25.npy"]), "uri", percent_decode=True)
    harness = harness_factory({bucket: {"min_age": "1s", "references": [plain, decoded]}})

    diff = harness.scan(bucket, as_of=far_future())

    assert orphan_rows(store_of(harness), diff["manifest_uri"]) == dict.fromkeys(decoys, True)
    assert diff["dangling_reference_count"] == 0
    assert diff["referenced_count"] == 7


def test_object_exactly_at_the_age_boundary(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, seaweed: SeaweedFS, db_engine: sa.Engine
) -> None:
    bucket = make_bucket("age")
    client = seaweed.client()
    put_objects(client, bucket, ["orphan.npy", "kept.npy"])
    source = key_source(make_reference_table(db_engine, "t_refs", ["kept.npy"]))
    harness = harness_factory({bucket: {"min_age": "1s", "references": [source]}})
    harness.materialize(["bucket_inventory", "referenced_keys"], bucket)
    inventory = store_of(harness).read_table(harness.metadata("bucket_inventory", bucket)["manifest_uri"])
    row = inventory.filter(pc.equal(inventory.column("key"), "orphan.npy")).to_pylist()[0]
    last_modified: datetime = row["last_modified"]
    assert last_modified == client.stat_object(bucket, "orphan.npy").last_modified
    assert last_modified.tzinfo is not None

    boundary = last_modified + timedelta(seconds=1)
    harness.materialize(["orphan_diff"], bucket, as_of=isoformat_utc(boundary))
    at_boundary = harness.metadata("orphan_diff", bucket)
    harness.materialize(["orphan_diff"], bucket, as_of=isoformat_utc(boundary - timedelta(microseconds=1)))
    just_before = harness.metadata("orphan_diff", bucket)

    assert as_utc(at_boundary["as_of"]) == boundary
    assert at_boundary["min_age_seconds"] == 1
    assert (at_boundary["eligible_orphan_count"], at_boundary["young_orphan_count"]) == (1, 0)
    assert orphan_rows(store_of(harness), at_boundary["manifest_uri"]) == {"orphan.npy": True}
    assert (just_before["eligible_orphan_count"], just_before["young_orphan_count"]) == (0, 1)
    assert orphan_rows(store_of(harness), just_before["manifest_uri"]) == {"orphan.npy": False}


def test_young_orphans_are_kept_and_health_is_computed(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, seaweed: SeaweedFS, db_engine: sa.Engine
) -> None:
    bucket = make_bucket("young")
    client = seaweed.client()
    put_objects(client, bucket, ["ref-1", "ref-2", "ref-3"], size=300)
    put_objects(client, bucket, ["new-1", "new-2"], size=50)  # 100 of 1000 bytes: 10 %, "warning"
    source = key_source(make_reference_table(db_engine, "t_refs", ["ref-1", "ref-2", "ref-3"]))
    harness = harness_factory({bucket: {"min_age": "1d", "references": [source]}})

    diff = harness.scan(bucket)  # as_of defaults to now

    assert (diff["orphan_count"], diff["orphan_bytes"]) == (2, 100)
    assert (diff["eligible_orphan_count"], diff["eligible_orphan_bytes"]) == (0, 0)
    assert (diff["young_orphan_count"], diff["young_orphan_bytes"]) == (2, 100)
    assert diff["orphan_share_bytes"] == pytest.approx(0.10)
    assert diff["orphan_share_count"] == pytest.approx(0.4)
    assert diff["health_status"] == "warning"
    assert diff["age_histogram"].records[0].data == {"age": "0-1 d", "objects": 2, "size": "100 B", "bytes": 100}
    assert diff["largest_eligible_orphans"].records == []
    assert abs(as_utc(diff["as_of"]) - utc_now()) < timedelta(minutes=5)
    assert orphan_rows(store_of(harness), diff["manifest_uri"]) == {"new-1": False, "new-2": False}


def test_scan_metadata_is_complete_and_consistent(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, seaweed: SeaweedFS, db_engine: sa.Engine
) -> None:
    bucket = make_bucket("meta")
    put_objects(seaweed.client(), bucket, ["ref.npy"], size=10)
    put_objects(seaweed.client(), bucket, ["big.npy"], size=500)
    put_objects(seaweed.client(), bucket, ["small.npy"], size=20)
    source = key_source(make_reference_table(db_engine, "t_refs", ["ref.npy"]))
    harness = harness_factory({bucket: {"min_age": "1s", "references": [source]}})

    diff = harness.scan(bucket, as_of=far_future())

    inventory = harness.metadata("bucket_inventory", bucket)
    refs = harness.metadata("referenced_keys", bucket)
    for key in ("object_count", "total_bytes", "manifest_uri", "listed_at", "listing_seconds",
                "keys_per_second"):
        assert key in inventory
    for key in ("referenced_count", "other_bucket_reference_count", "unparseable_reference_count",
                "unparseable_sample", "snapshot_at", "manifest_uri"):
        assert key in refs
    for key in ("as_of", "object_count", "total_bytes", "referenced_count", "orphan_count", "orphan_bytes",
                "eligible_orphan_count", "eligible_orphan_bytes", "young_orphan_count", "orphan_share_bytes",
                "orphan_share_count", "health_status", "dangling_reference_count", "dangling_sample",
                "inventory_listed_at", "references_snapshot_at", "manifest_uri"):
        assert key in diff
    assert (inventory["object_count"], inventory["total_bytes"]) == (3, 530)
    assert store_of(harness).read_table(inventory["manifest_uri"]).num_rows == 3
    assert as_utc(inventory["listed_at"]) <= as_utc(refs["snapshot_at"])
    assert diff["inventory_listed_at"] == inventory["listed_at"]
    assert diff["references_snapshot_at"] == refs["snapshot_at"]
    assert diff["inventory_manifest_uri"] == inventory["manifest_uri"]
    assert diff["orphan_share_bytes"] == pytest.approx(520 / 530)
    assert diff["health_status"] == "critical"
    assert [(r.data["key"], r.data["bytes"]) for r in diff["largest_eligible_orphans"].records] == [
        ("big.npy", 500), ("small.npy", 20)]
    assert diff["age_histogram"].records[0].data == {"age": "0-1 d", "objects": 2, "size": "520 B", "bytes": 520}


def test_scan_metadata_is_typed_for_the_ui(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, seaweed: SeaweedFS, db_engine: sa.Engine
) -> None:
    """Times are timestamps, manifests paths with Dagster's row count and URI, sizes and shares readable."""
    bucket = make_bucket("typed")
    put_objects(seaweed.client(), bucket, ["ref.npy", "ref-2.npy"], size=10)
    put_objects(seaweed.client(), bucket, ["big.npy"], size=3 * 1024)
    source = key_source(make_reference_table(db_engine, "t_refs", ["ref.npy", "ref-2.npy", "ref.npy"]))
    harness = harness_factory({bucket: {"min_age": "1s", "references": [source]}})
    harness.scan(bucket, as_of=far_future())
    store = store_of(harness)

    def entries(asset: str) -> dict[str, dg.MetadataValue]:
        record = harness.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[bucket]), limit=1).records[0]
        assert record.asset_materialization is not None
        return dict(record.asset_materialization.metadata)

    inventory, refs, diff = entries("bucket_inventory"), entries("referenced_keys"), entries("orphan_diff")
    for values, keys in ((inventory, ("listing_started_at", "listed_at")),
                         (refs, ("snapshot_at", "inventory_listed_at")),
                         (diff, ("as_of", "inventory_listed_at", "references_snapshot_at"))):
        for key in keys:
            assert isinstance(values[key], dg.TimestampMetadataValue), key
    assert diff["inventory_listed_at"] == inventory["listed_at"]
    for values in (inventory, refs, diff):
        uri = values["manifest_uri"]
        assert isinstance(uri, dg.PathMetadataValue)
        assert values["dagster/uri"].value == Path(uri.value).as_uri()
        assert values["dagster/row_count"].value == store.read_table(uri.value).num_rows
    assert (inventory["dagster/row_count"].value, diff["dagster/row_count"].value) == (3, 1)
    assert isinstance(diff["references_manifest_uri"], dg.PathMetadataValue)
    assert (inventory["total_bytes"].value, inventory["total_size"].value) == (3092, "3.0 KiB")
    assert (diff["orphan_bytes"].value, diff["orphan_size"].value) == (3072, "3.0 KiB")
    assert diff["eligible_orphan_size"].value == "3.0 KiB" and diff["young_orphan_size"].value == "0 B"
    assert diff["orphan_share_bytes"].value == pytest.approx(3072 / 3092)
    assert diff["orphan_share_bytes_percent"].value == "99.4 %"
    assert diff["orphan_share_count_percent"].value == "33.3 %"
    largest = diff["largest_eligible_orphans"]
    assert isinstance(largest, dg.TableMetadataValue) and largest.schema.columns[0].name == "key"
    assert largest.records[0].data["size"] == "3.0 KiB"
    assert largest.records[0].data["last_modified"].endswith("Z")
    assert isinstance(diff["age_histogram"], dg.TableMetadataValue)
    # The catalog lists each manifest's columns.
    specs = {spec.key.path[0]: spec for spec in harness.defs.resolve_all_asset_specs()}
    columns = specs["bucket_inventory"].metadata["dagster/column_schema"].columns
    assert [(c.name, c.type) for c in columns] == [
        ("key", "string"), ("size", "int64"), ("last_modified", "timestamp[us, tz=UTC]"), ("etag", "string")]
    assert [c.name for c in specs["orphan_deletions"].metadata["dagster/column_schema"].columns][-1] == "outcome"


def test_empty_bucket(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, db_engine: sa.Engine
) -> None:
    bucket = make_bucket("empty")
    source = key_source(make_reference_table(db_engine, "t_refs", ["gone.npy"]))
    harness = harness_factory({bucket: {"min_age": "1s", "references": [source]}})

    diff = harness.scan(bucket, as_of=far_future())

    assert harness.metadata("bucket_inventory", bucket)["object_count"] == 0
    assert (diff["object_count"], diff["total_bytes"], diff["orphan_count"]) == (0, 0, 0)
    assert (diff["orphan_share_bytes"], diff["orphan_share_count"]) == (0.0, 0.0)
    assert diff["health_status"] == "healthy"
    assert diff["dangling_reference_count"] == 1
    assert orphan_rows(store_of(harness), diff["manifest_uri"]) == {}


def test_missing_bucket_fails_clearly_and_writes_nothing(
    harness_factory: HarnessFactory, tmp_path: Path
) -> None:
    bucket = f"t-missing-{secrets.token_hex(4)}"
    harness = harness_factory({bucket: {"min_age": "1d", "references": [key_source("SELECT 'a'")]}})

    result = harness.materialize(ALL, bucket, raise_on_error=False)

    assert not result.success
    message = step_failure_message(result, "bucket_inventory")
    assert f"bucket {bucket!r} does not exist" in message
    assert "create it" in message and "enabled: false" in message
    assert manifest_files(tmp_path / "manifests") == []
    for asset in ALL:
        assert materialization_count(harness.instance, asset, bucket) == 0


def test_unreachable_database_fails_clearly_without_the_password(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, seaweed: SeaweedFS, tmp_path: Path
) -> None:
    bucket = make_bucket("nodb")
    put_objects(seaweed.client(), bucket, ["a.npy"])
    harness = harness_factory({bucket: {"min_age": "1d", "references": [key_source("SELECT 'a.npy'")]}})
    password = "Pw-" + secrets.token_urlsafe(12)
    (closed_port,) = free_ports(1)
    rebuild(harness, reference_db=ReferenceDatabaseResource(
        url=f"postgresql://heimdall:{password}@127.0.0.1:{closed_port}/heimdall"))

    result = harness.materialize(ALL, bucket, raise_on_error=False)

    assert not result.success
    message = step_failure_message(result, "referenced_keys")
    assert "ReferenceDatabaseError" in message
    where = f"postgresql+psycopg2://heimdall:***@127.0.0.1:{closed_port}/heimdall"
    assert f"cannot read the reference database at {where}" in message
    assert "HEIMDALL_DATABASE_URL" in message
    assert password not in run_event_log_text(harness.instance, result.run_id)
    assert materialization_count(harness.instance, "bucket_inventory", bucket) == 1
    assert materialization_count(harness.instance, "referenced_keys", bucket) == 0
    assert materialization_count(harness.instance, "orphan_diff", bucket) == 0
    assert not (tmp_path / "manifests" / "references").exists()
    assert not (tmp_path / "manifests" / "orphans").exists()


def test_wrong_s3_secret_is_rejected_without_leaking_it(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, seaweed: SeaweedFS, tmp_path: Path
) -> None:
    bucket = make_bucket("secret")
    harness = harness_factory({bucket: {"min_age": "1d", "references": [key_source("SELECT 'a.npy'")]}})
    wrong = "Wrong-" + secrets.token_urlsafe(16)
    s3 = S3Resource(endpoint=seaweed.endpoint, access_key=seaweed.access_key, secret_key=wrong)
    rebuild(harness, s3=s3, manifests=harness.resources["manifests"].model_copy(update={"s3": s3}))

    result = harness.materialize(["bucket_inventory"], bucket, raise_on_error=False)

    assert not result.success
    message = step_failure_message(result, "bucket_inventory")
    assert "StorageAccessDeniedError" in message
    assert "refused the credentials" in message and "MINIO_SECRET_KEY" in message
    assert bucket in message
    assert wrong not in run_event_log_text(harness.instance, result.run_id)
    assert manifest_files(tmp_path / "manifests") == []
    assert materialization_count(harness.instance, "bucket_inventory", bucket) == 0


def test_references_older_than_the_inventory_fail_the_diff(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, seaweed: SeaweedFS, tmp_path: Path
) -> None:
    bucket = make_bucket("order")
    put_objects(seaweed.client(), bucket, ["a.npy", "b.npy"])
    harness = harness_factory({bucket: {"min_age": "1s", "references": [key_source("SELECT 'a.npy'")]}})
    harness.materialize(["bucket_inventory", "referenced_keys"], bucket)
    harness.materialize(["bucket_inventory"], bucket)  # a newer listing than the snapshot

    result = harness.materialize(["orphan_diff"], bucket, raise_on_error=False)

    assert not result.success
    message = step_failure_message(result, "orphan_diff")
    assert "StaleInputError" in message
    assert "older than the inventory listing" in message
    assert "Re-materialize referenced_keys" in message
    assert materialization_count(harness.instance, "orphan_diff", bucket) == 0
    assert not (tmp_path / "manifests" / "orphans").exists()

    # Doing what the message says fixes it.
    harness.materialize(["referenced_keys", "orphan_diff"], bucket, as_of=far_future())
    assert harness.metadata("orphan_diff", bucket)["eligible_orphan_count"] == 1


def test_orphan_diff_without_upstream_says_what_to_run(
    harness_factory: HarnessFactory, make_bucket: MakeBucket
) -> None:
    bucket = make_bucket("noinv")
    harness = harness_factory({bucket: {"min_age": "1d", "references": [key_source("SELECT 'a'")]}})
    result = harness.materialize(["orphan_diff"], bucket, raise_on_error=False)
    message = step_failure_message(result, "orphan_diff")
    assert "needs a materialization of bucket_inventory" in message and "storage_scan_job" in message


def test_manifests_on_s3(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, seaweed: SeaweedFS, db_engine: sa.Engine
) -> None:
    bucket, manifest_bucket = make_bucket("s3man"), make_bucket("manifests")
    put_objects(seaweed.client(), bucket, ["ref.npy", "orphan.npy"])
    source = key_source(make_reference_table(db_engine, "t_refs", ["ref.npy"]))
    harness = harness_factory({bucket: {"min_age": "1s", "references": [source]}},
                              manifest_root=f"s3://{manifest_bucket}/heimdall/manifests")

    diff = harness.scan(bucket, as_of=far_future())

    prefix = f"s3://{manifest_bucket}/heimdall/manifests/"
    assert diff["manifest_uri"].startswith(prefix + f"orphans/{bucket}/")
    assert diff["inventory_manifest_uri"].startswith(prefix + f"inventory/{bucket}/")
    assert diff["references_manifest_uri"].startswith(prefix + f"references/{bucket}/")
    assert orphan_rows(store_of(harness), diff["manifest_uri"]) == {"orphan.npy": True}
    stored = {obj.object_name for obj in seaweed.client().list_objects(manifest_bucket, recursive=True)}
    assert len(stored) == 3


def test_inventory_prunes_old_manifests_but_keeps_the_latest(
    harness_factory: HarnessFactory, make_bucket: MakeBucket, seaweed: SeaweedFS
) -> None:
    bucket = make_bucket("prune")
    put_objects(seaweed.client(), bucket, ["a.npy"])
    harness = harness_factory({bucket: {"min_age": "1d", "references": [key_source("SELECT 'a.npy'")]}},
                              manifest_retention_days=14)
    harness.scan(bucket)
    store = store_of(harness)
    latest = {asset: harness.metadata(asset, bucket)["manifest_uri"] for asset in ALL}
    # A stale manifest that is still the latest of orphan_diff (e.g. the diff failed since), and junk.
    old = utc_now() - timedelta(days=30)
    latest_but_old = store.new_uri("orphans", bucket, old, "oldrun00")
    junk = [store.new_uri(kind, bucket, old - timedelta(days=1), "junkrun0")
            for kind in ("inventory", "references")]
    for uri in [latest_but_old, *junk]:
        store.write_table(uri, store.read_table(latest["orphan_diff"]))
    harness.instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key="orphan_diff", partition=bucket, metadata={"manifest_uri": latest_but_old}))

    harness.materialize(["bucket_inventory"], bucket)

    new_inventory = harness.metadata("bucket_inventory", bucket)
    assert new_inventory["pruned_manifests"] == 2
    for uri in junk:
        assert not Path(uri).exists()
    kept = [latest_but_old, latest["referenced_keys"], new_inventory["manifest_uri"], latest["orphan_diff"]]
    for uri in kept:
        assert Path(uri).exists(), uri


@pytest.fixture
def private_seaweed(tmp_path: Path) -> Iterator[SeaweedFS]:
    """A SeaweedFS of this test's own, so that the shipped bucket names collide with no other test."""
    server = SeaweedFS(workdir=tmp_path / "private-seaweedfs").start()
    yield server
    server.stop()


def test_shipped_heimdall_policy_against_the_seeded_schema(
    private_seaweed: SeaweedFS, database_url: str, db_engine: sa.Engine, instance: dg.DagsterInstance,
    tmp_path: Path,
) -> None:
    """The shipped queries, bucket names and minimum ages, on Heimdall's schema."""
    shipped = yaml.safe_load(default_policy_path().read_text())
    policy_path = write_policy(tmp_path, shipped["buckets"], allow_short_min_age=False,
                               manifest_retention_days=shipped["manifest_retention_days"])
    harness = ScanHarness(policy_path, private_seaweed, database_url, str(tmp_path / "manifests"), instance)
    client = private_seaweed.client()
    world = heimdall_db.SeededWorld()
    heimdall_db.seed_old_objects(db_engine, client, world)
    heimdall_db.seed_young_objects(client, world)
    now = utc_now()
    expected_other_bucket = {heimdall_db.AUDIO_BUCKET: 1}
    expected_unparseable = {heimdall_db.SYNTHETIC_BUCKET: 1}

    for bucket in (heimdall_db.SYNTHETIC_BUCKET, heimdall_db.AUDIO_BUCKET, heimdall_db.RAW_BUCKET):
        orphans = world.old_orphans[bucket] | world.young_orphans[bucket]
        harness.materialize(ALL, bucket)
        diff = harness.metadata("orphan_diff", bucket)
        # 45 days on: past the 30-day buckets' minimum age, not past raw IQ's 60 days; 61: past both.
        # (A scan refuses an as_of in the future, so the diff of those days is computed directly.)
        for days, eligible in ((45, bucket != heimdall_db.RAW_BUCKET), (61, True)):
            later = compute_orphan_diff(
                bucket=harness.policy.bucket(bucket), store=store_of(harness),
                inventory_uri=harness.metadata("bucket_inventory", bucket)["manifest_uri"],
                references_uri=harness.metadata("referenced_keys", bucket)["manifest_uri"],
                as_of=now + timedelta(days=days), run_id=f"days-{days}")
            rows = orphan_rows(store_of(harness), later.manifest_uri)
            assert rows == dict.fromkeys(orphans, eligible), (bucket, days)
            assert not set(rows) & world.referenced[bucket]
        refs = harness.metadata("referenced_keys", bucket)
        assert refs["other_bucket_reference_count"] == expected_other_bucket.get(bucket, 0), bucket
        assert refs["unparseable_reference_count"] == expected_unparseable.get(bucket, 0), bucket
        assert diff["dangling_reference_count"] == len(world.dangling.get(bucket, ())), bucket
        assert set(json.loads(diff["dangling_sample"])) == world.dangling.get(bucket, set())
        assert diff["object_count"] == len(world.referenced[bucket]) + len(orphans)
        assert diff["min_age_seconds"] == (60 if bucket == heimdall_db.RAW_BUCKET else 30) * 86400
    assert now.tzinfo is UTC
