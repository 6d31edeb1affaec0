"""Manifest stores: a local directory and s3:// on the real SeaweedFS."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from pyarrow import fs as pafs

from heimdall_storage_pipeline.core.errors import ManifestError
from heimdall_storage_pipeline.core.manifests import INVENTORY_SCHEMA, REFERENCES_SCHEMA, ManifestStore, in_background
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS

NOW = datetime(2026, 3, 1, 3, 0, tzinfo=UTC)


class Boom(RuntimeError):
    pass


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ManifestStore:
    if request.param == "local":
        return ManifestStore(root=str(tmp_path / "manifests"))
    seaweed: SeaweedFS = request.getfixturevalue("seaweed")
    make_bucket: Callable[[str], str] = request.getfixturevalue("make_bucket")
    return ManifestStore(root=f"s3://{make_bucket('manifests')}/scan/prefix", s3=seaweed.settings())


def listed(store: ManifestStore) -> list[str]:
    """Every file under the store's root, as URIs."""
    filesystem, base = store._filesystem()
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(store._to_uri(info.path) for info in infos if info.type == pafs.FileType.File)


def inventory_table(keys: list[str]) -> pa.Table:
    return pa.table(
        {"key": keys, "size": [1] * len(keys), "last_modified": [NOW] * len(keys), "etag": ["e"] * len(keys)},
        schema=INVENTORY_SCHEMA,
    )


def test_write_then_read_round_trip(store: ManifestStore) -> None:
    uri = store.new_uri("inventory", "bkt", NOW, "run-1234567890")
    assert uri.startswith(store.root.rstrip("/") + "/inventory/bkt/20260301T030000000000Z-run-1234")
    table = inventory_table(["a", "b/ü c+%"])
    store.write_table(uri, table)
    assert store.read_table(uri).equals(table)
    assert [batch.num_rows for batch in store.iter_batches(uri, batch_size=1)] == [1, 1]
    assert listed(store) == [uri]


def test_uris_are_never_reused(store: ManifestStore) -> None:
    assert store.new_uri("orphans", "bkt", NOW, "run") != store.new_uri("orphans", "bkt", NOW, "run")


def test_unknown_kind_is_refused(store: ManifestStore) -> None:
    with pytest.raises(ValueError, match="unknown manifest kind"):
        store.new_uri("bogus", "bkt", NOW, "run")


def test_a_failing_write_leaves_no_file(store: ManifestStore) -> None:
    uri = store.new_uri("references", "bkt", NOW, "run")
    with pytest.raises(Boom), store.writer(uri, REFERENCES_SCHEMA) as writer:
        writer.write_table(pa.table({"key": ["half"], "source": ["s"]}, schema=REFERENCES_SCHEMA))
        raise Boom("the database went away mid-read")
    assert listed(store) == []
    with pytest.raises(ManifestError, match="cannot read manifest"):
        store.read_table(uri)


def test_prune_drops_old_manifests_but_keeps_the_latest(store: ManifestStore) -> None:
    old_kept = store.new_uri("inventory", "bkt", NOW - timedelta(days=30), "latest")
    old_dropped = [store.new_uri(kind, "bkt", NOW - timedelta(days=15), "old")
                   for kind in ("inventory", "orphans")]
    recent = store.new_uri("references", "bkt", NOW - timedelta(days=13), "recent")
    other_bucket = store.new_uri("inventory", "other", NOW - timedelta(days=30), "other")
    for uri in [old_kept, *old_dropped, recent, other_bucket]:
        store.write_table(uri, inventory_table(["k"]))

    removed = store.prune("bkt", NOW, timedelta(days=14), keep={old_kept})

    assert sorted(removed) == sorted(old_dropped)
    assert listed(store) == sorted([old_kept, recent, other_bucket])


def test_prune_of_an_empty_store_removes_nothing(store: ManifestStore) -> None:
    assert store.prune("bkt", NOW, timedelta(days=1), keep=set()) == []


def test_local_store_needs_an_absolute_path() -> None:
    with pytest.raises(ManifestError, match="absolute path or s3://"):
        ManifestStore(root="relative/manifests").new_uri("inventory", "bkt", NOW, "run")


def test_file_uri_root_is_accepted(tmp_path: Path) -> None:
    store = ManifestStore(root=f"file://{tmp_path}")
    uri = store.new_uri("inventory", "bkt", NOW, "run")
    store.write_table(uri, inventory_table(["k"]))
    assert store.read_table(uri).num_rows == 1


def test_s3_store_without_settings_says_what_to_configure() -> None:
    with pytest.raises(ManifestError, match="MINIO_ENDPOINT"):
        ManifestStore(root="s3://somewhere/prefix").new_uri("inventory", "bkt", NOW, "run")


def test_s3_read_error_hides_the_secret(seaweed: SeaweedFS, make_bucket: Callable[[str], str]) -> None:
    store = ManifestStore(root=f"s3://{make_bucket('manifests')}/p", s3=seaweed.settings())
    missing = store.new_uri("orphans", "bkt", NOW, "run")
    with pytest.raises(ManifestError) as raised:
        store.read_table(missing)
    assert missing in str(raised.value)
    assert "re-materialize" in str(raised.value)
    assert seaweed.secret_key not in str(raised.value)


def test_a_background_writer_writes_every_batch_in_order_and_raises_its_failure(tmp_path) -> None:
    store = ManifestStore(str(tmp_path))
    uri = store.new_uri("references", "b", datetime(2026, 1, 1, tzinfo=UTC), "run")
    batches = [pa.record_batch({"key": [f"k{i}-{j}" for j in range(3)], "source": ["s"] * 3}, schema=REFERENCES_SCHEMA)
               for i in range(20)]
    with store.writer(uri, REFERENCES_SCHEMA) as parquet, in_background(parquet, depth=2) as writer:
        for batch in batches:
            writer.write_batch(batch)
    assert store.read_table(uri).column("key").to_pylist() == [k for b in batches for k in b.column("key").to_pylist()]

    class FailingWriter:
        def write_batch(self, batch: pa.RecordBatch) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), in_background(FailingWriter(), depth=1) as writer:  # type: ignore[arg-type]
        for batch in batches:  # fails at a later write_batch or at the end; never blocks
            writer.write_batch(batch)


def test_the_storage_history_is_one_file_per_day_replaced_when_rebuilt(store: ManifestStore) -> None:
    from datetime import date

    from heimdall_storage_pipeline.core.capacity import HISTORY_SCHEMA

    def day_table(day: date, total: int) -> pa.Table:
        return pa.Table.from_pylist([{"day": day, "bucket": "bkt", "total_bytes": total}], schema=HISTORY_SCHEMA)

    assert store.read_history(HISTORY_SCHEMA).num_rows == 0
    first, second = date(2026, 3, 1), date(2026, 3, 2)
    store.write_table(store.history_uri(first), day_table(first, 1))
    store.write_table(store.history_uri(second), day_table(second, 2))
    store.write_table(store.history_uri(second), day_table(second, 3))  # the day rebuilt
    assert store.history_uri(first) == store.root.rstrip("/") + "/history/2026-03-01.parquet"
    assert store.read_history(HISTORY_SCHEMA).column("total_bytes").to_pylist() == [1, 3]
    store.prune("bkt", NOW + timedelta(days=400), timedelta(days=1), keep=set())  # the history is no manifest
    assert len(listed(store)) == 2
