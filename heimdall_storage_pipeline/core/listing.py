"""Bucket listing streamed into an inventory manifest, in bounded chunks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa

from heimdall_storage_pipeline.core.clock import Clock, ensure_utc, utc_now
from heimdall_storage_pipeline.core.manifests import INVENTORY_SCHEMA, ManifestStore
from heimdall_storage_pipeline.core.s3 import (
    S3Settings,
    make_client,
    missing_bucket_error,
    s3_errors,
)

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

    @property
    def keys_per_second(self) -> float:
        return self.object_count / self.listing_seconds if self.listing_seconds > 0 else 0.0


def _chunk_batch(keys: list[str], sizes: list[int], modified: list[datetime], etags: list[str]) -> pa.RecordBatch:
    return pa.record_batch(
        [
            pa.array(keys, pa.string()),
            pa.array(sizes, pa.int64()),
            pa.array(modified, INVENTORY_SCHEMA.field("last_modified").type),
            pa.array(etags, pa.string()),
        ],
        schema=INVENTORY_SCHEMA,
    )


def list_bucket_to_manifest(
    settings: S3Settings,
    bucket: str,
    store: ManifestStore,
    run_id: str,
    clock: Clock = utc_now,
) -> InventoryResult:
    """List every object of ``bucket`` into a new inventory manifest."""
    client = make_client(settings)
    started_at = clock()
    uri = store.new_uri("inventory", bucket, started_at, run_id)
    began = time.perf_counter()
    object_count = total_bytes = 0
    keys: list[str] = []
    sizes: list[int] = []
    modified: list[datetime] = []
    etags: list[str] = []
    with s3_errors(settings, bucket):
        # Fail on a missing bucket before a manifest is opened.
        if not client.bucket_exists(bucket):
            raise missing_bucket_error(settings, bucket)
        with store.writer(uri, INVENTORY_SCHEMA) as writer:
            for obj in client.list_objects(bucket, recursive=True):
                if obj.is_dir:
                    continue
                keys.append(obj.object_name)
                sizes.append(obj.size or 0)
                modified.append(ensure_utc(obj.last_modified, f"last_modified of {obj.object_name!r}"))
                etags.append((obj.etag or "").strip('"'))
                if len(keys) >= LISTING_CHUNK:
                    object_count += len(keys)
                    total_bytes += sum(sizes)
                    writer.write_batch(_chunk_batch(keys, sizes, modified, etags))
                    keys, sizes, modified, etags = [], [], [], []
            object_count += len(keys)
            total_bytes += sum(sizes)
            writer.write_batch(_chunk_batch(keys, sizes, modified, etags))
    seconds = time.perf_counter() - began
    return InventoryResult(
        bucket=bucket,
        object_count=object_count,
        total_bytes=total_bytes,
        manifest_uri=uri,
        started_at=started_at,
        listed_at=clock(),
        listing_seconds=seconds,
    )
