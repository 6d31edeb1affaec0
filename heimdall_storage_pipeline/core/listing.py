"""Bucket listing streamed into an inventory manifest, in bounded chunks (pages from ``list_objects_v2``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from heimdall_storage_pipeline.core.clock import Clock, utc_now
from heimdall_storage_pipeline.core.list_objects_v2 import (
    DEFAULT_WORKERS,
    S3_MAX_KEYS,
    VERSIONED,
    ListObjectsV2,
    listing_batches,
)
from heimdall_storage_pipeline.core.manifests import INVENTORY_SCHEMA, VERSIONS_SCHEMA, ManifestStore
from heimdall_storage_pipeline.core.s3 import S3Settings, s3_errors

LISTING_CHUNK = 50_000  # rows buffered before a Parquet row group is written


@dataclass(frozen=True)
class InventoryResult:
    bucket: str
    object_count: int
    total_bytes: int
    manifest_uri: str
    started_at: datetime
    listed_at: datetime  # when the listing finished; references must be read after this
    listing_seconds: float
    versioning: str = "Off"  # Enabled, Suspended, Off (never enabled) or Unknown (the key may not ask)
    versions_manifest_uri: str = ""  # every version and delete marker, for a versioned bucket
    noncurrent_versions: int = 0  # versions that are not the latest (delete markers excluded)
    noncurrent_bytes: int = 0
    delete_markers: int = 0

    @property
    def keys_per_second(self) -> float:
        return self.object_count / self.listing_seconds if self.listing_seconds > 0 else 0.0


def list_bucket_to_manifest(
    settings: S3Settings,
    bucket: str,
    store: ManifestStore,
    run_id: str,
    clock: Clock = utc_now,
    max_keys: int = S3_MAX_KEYS,
    workers: int = DEFAULT_WORKERS,
) -> InventoryResult:
    """List every object of ``bucket`` into a new inventory manifest.

    ``max_keys`` stays at S3's 1000 unless the server honours more (SeaweedFS does); with
    ``workers`` > 1 the bucket is listed in prefix shards at once (see ``listing_batches``).
    A versioned (or suspended) bucket is also read with ListObjectVersions into a versions manifest
    and its figures; the inventory stays the current objects' listing, sharded as for any bucket.
    """
    if max_keys < 1:
        raise ValueError(f"max_keys must be positive, got {max_keys}")
    started_at = clock()
    uri = store.new_uri("inventory", bucket, started_at, run_id)
    began = time.perf_counter()
    object_count = total_bytes = 0
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    figures: dict[str, object] = {}
    with s3_errors(settings, bucket):
        lister = ListObjectsV2(settings, bucket)
        # A missing bucket, refused credentials or a server that is not S3 fail before a manifest is opened.
        next(lister.pages(max_keys=1))
        figures["versioning"] = lister.versioning()
        with store.writer(uri, INVENTORY_SCHEMA) as writer:
            for batch in listing_batches(lister, max_keys=max_keys, workers=workers):
                object_count += batch.num_rows
                total_bytes += pc.sum(batch.column(1)).as_py() or 0
                pending.append(batch)
                pending_rows += batch.num_rows
                # Row groups of about LISTING_CHUNK rows, whatever the page size.
                if pending_rows >= LISTING_CHUNK:
                    writer.write_table(pa.Table.from_batches(pending, INVENTORY_SCHEMA))
                    pending, pending_rows = [], 0
            writer.write_table(pa.Table.from_batches(pending, INVENTORY_SCHEMA))
        if figures["versioning"] in VERSIONED:
            figures.update(_list_versions(lister, store, store.new_uri("versions", bucket, started_at, run_id),
                                          max_keys))
    seconds = time.perf_counter() - began
    return InventoryResult(
        bucket=bucket,
        object_count=object_count,
        total_bytes=total_bytes,
        manifest_uri=uri,
        started_at=started_at,
        listed_at=clock(),
        listing_seconds=seconds,
        **figures,  # type: ignore[arg-type]
    )


def _list_versions(lister: ListObjectsV2, store: ManifestStore, uri: str, max_keys: int) -> dict[str, object]:
    """Every version and delete marker into the versions manifest at ``uri``, and their figures."""
    noncurrent = noncurrent_bytes = markers = 0
    with store.writer(uri, VERSIONS_SCHEMA) as writer:
        for page in lister.version_pages(max_keys=max_keys):
            writer.write_batch(page.versions)
            latest, marker = page.versions.column("is_latest"), page.versions.column("delete_marker")
            old = page.versions.filter(pc.and_(pc.invert(latest), pc.invert(marker)))
            noncurrent += old.num_rows
            noncurrent_bytes += pc.sum(old.column("size")).as_py() or 0
            markers += pc.sum(marker.cast(pa.int64())).as_py() or 0
    return {"versions_manifest_uri": uri, "noncurrent_versions": noncurrent, "noncurrent_bytes": noncurrent_bytes,
            "delete_markers": markers}
