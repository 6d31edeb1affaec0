"""bucket_inventory's two ways: a full listing, or the previous manifest with the bucket's events applied.

``take_inventory`` decides (``core.events.choose_inventory``), falls back to a full listing whenever the
incremental path cannot be trusted, and reconciles every full listing with the event-maintained
inventory it replaces (drift).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import dagster as dg
import duckdb
import sqlalchemy as sa

from heimdall_storage_pipeline.core.clock import as_utc, utc_now
from heimdall_storage_pipeline.core.errors import StorageCleanupError, redact
from heimdall_storage_pipeline.core.events import (
    FULL,
    INCREMENTAL,
    EventLog,
    StreamState,
    choose_inventory,
    inventory_drift,
    merge_events,
)
from heimdall_storage_pipeline.core.listing import InventoryResult, list_bucket_to_manifest
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.policy import BucketPolicy
from heimdall_storage_pipeline.core.references import make_engine
from heimdall_storage_pipeline.core.s3 import S3Settings
from heimdall_storage_pipeline.defs import metadata as md

INVENTORY_DRIFT = "inventory_drift"
# Carried from the reconciling full listing to the incremental inventories built on it.
DRIFT_KEYS = ("drift_count", "drift_missing_count", "drift_extra_count", "drift_sample", "reconciled_at")


def drift_check_spec(partitions_def: dg.PartitionsDefinition) -> dg.AssetCheckSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)  # partitioned checks are "preview" in Dagster 1.13
        return dg.AssetCheckSpec(
            INVENTORY_DRIFT, asset="bucket_inventory", partitions_def=partitions_def,
            description="Keys the event-maintained inventory and the latest full listing disagree on: "
                        "WARN above 0, ERROR above the policy's drift_error_keys.")


def drift_check_result(metadata: dict[str, Any], error_above: int) -> dg.AssetCheckResult:
    if "drift_count" not in metadata:
        return dg.AssetCheckResult(check_name=INVENTORY_DRIFT, passed=True,
                                   description="no event-maintained inventory reconciled yet")
    count = int(metadata["drift_count"])
    return dg.AssetCheckResult(
        check_name=INVENTORY_DRIFT, passed=count == 0,
        severity=dg.AssetCheckSeverity.ERROR if count > error_above else dg.AssetCheckSeverity.WARN,
        description=f"{count} keys differ between the event-maintained inventory and the full listing of "
                    f"{as_utc(metadata['reconciled_at']).isoformat()} ({metadata['drift_missing_count']} missed "
                    f"creates, {metadata['drift_extra_count']} missed deletes; ERROR above {error_above})",
        metadata={"drift_count": dg.MetadataValue.int(count),
                  "drift_sample": dg.MetadataValue.text(str(metadata["drift_sample"]))},
    )


def _first_line(exc: BaseException) -> str:
    return redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def _stream(context: dg.AssetExecutionContext, events: EventLog, bucket: str) -> StreamState | None:
    try:
        return events.state(bucket)
    except sa.exc.SQLAlchemyError as exc:
        context.log.warning(f"cannot read the event stream of {bucket}, listing in full: {_first_line(exc)}")
        return None


def take_inventory(context: dg.AssetExecutionContext, s3: S3Settings, store: ManifestStore, bucket: BucketPolicy,
                   audit_url: str, previous: dict[str, Any] | None
                   ) -> tuple[InventoryResult, dict[str, dg.MetadataValue]]:
    """The inventory of ``bucket`` and its metadata beyond the listing's figures (mode, cursor, drift).

    ``previous``: the metadata of the bucket's latest inventory, if any.
    """
    engine = make_engine(audit_url)
    try:
        events = EventLog(engine)
        stream = _stream(context, events, bucket.name)
        mode, reason = choose_inventory(previous, stream, bucket.full_listing_every, utc_now())
        if mode == INCREMENTAL and previous is not None and stream is not None:
            try:
                return _incremental(context, store, events, stream, previous, reason)
            except (StorageCleanupError, sa.exc.SQLAlchemyError, duckdb.Error) as exc:
                reason = f"the incremental inventory failed ({_first_line(exc)})"
        context.log.info(f"{bucket.name}: full listing: {reason}")
        return _full(context, s3, store, events, bucket.name, previous, reason)
    finally:
        engine.dispose()


def _stream_metadata(mode: str, reason: str, stream: StreamState, cursor: int, applied: int,
                     full_listing_at: Any) -> dict[str, dg.MetadataValue]:
    return {
        "mode": dg.MetadataValue.text(mode),
        "mode_reason": dg.MetadataValue.text(reason),
        "cursor": dg.MetadataValue.int(cursor),
        "event_epoch": dg.MetadataValue.int(stream.epoch),
        "events_applied": dg.MetadataValue.int(applied),
        "full_listing_at": md.timestamp(full_listing_at),
    }


def _incremental(context: dg.AssetExecutionContext, store: ManifestStore, events: EventLog, stream: StreamState,
                 previous: dict[str, Any], reason: str) -> tuple[InventoryResult, dict[str, dg.MetadataValue]]:
    started_at, began, cursor = utc_now(), time.perf_counter(), int(previous["cursor"])
    applied = events.read(stream.bucket, cursor, stream.last_seq)
    uri = store.new_uri("inventory", stream.bucket, started_at, context.run.run_id)
    count, total = merge_events(store, str(previous["manifest_uri"]), applied, uri)
    result = InventoryResult(stream.bucket, count, total, uri, started_at, utc_now(), time.perf_counter() - began)
    pruned = events.prune(stream.bucket, cursor)
    context.log.info(f"{stream.bucket}: incremental inventory: {applied.num_rows} events after cursor {cursor} "
                     f"applied to {previous['manifest_uri']} ({pruned} folded events pruned)")
    carried = {key: previous[key] for key in DRIFT_KEYS if key in previous}
    return result, {**_stream_metadata(INCREMENTAL, reason, stream, stream.last_seq, applied.num_rows,
                                       previous["full_listing_at"]), **_drift_metadata(carried)}


def _drift_metadata(values: dict[str, Any]) -> dict[str, dg.MetadataValue]:
    if "drift_count" not in values:
        return {}
    return {
        **{key: dg.MetadataValue.int(int(values[key])) for key in DRIFT_KEYS[:3]},
        "drift_sample": dg.MetadataValue.text(str(values["drift_sample"])),
        "reconciled_at": md.timestamp(values["reconciled_at"]),
    }


def _full(context: dg.AssetExecutionContext, s3: S3Settings, store: ManifestStore, events: EventLog, bucket: str,
          previous: dict[str, Any] | None, reason: str) -> tuple[InventoryResult, dict[str, dg.MetadataValue]]:
    stream = _stream(context, events, bucket)  # read just before the listing: its events are all applied after
    result = list_bucket_to_manifest(s3, bucket, store, context.run.run_id)
    if stream is None:
        return result, {"mode": dg.MetadataValue.text(FULL), "mode_reason": dg.MetadataValue.text(reason)}
    metadata = _stream_metadata(FULL, reason, stream, stream.last_seq, 0, result.started_at)
    if previous is None or "cursor" not in previous or int(previous["cursor"]) > stream.last_seq:
        return result, metadata
    try:
        after = events.state(bucket) or stream
        in_flight = events.read(bucket, stream.last_seq, after.last_seq, strict=False).column("key").to_pylist()
        derived = events.read(bucket, int(previous["cursor"]), stream.last_seq, strict=False)
        drift = inventory_drift(store, result.manifest_uri, str(previous["manifest_uri"]), derived, in_flight)
        events.prune(bucket, int(previous["cursor"]))
    except (StorageCleanupError, sa.exc.SQLAlchemyError, duckdb.Error) as exc:
        context.log.warning(f"{bucket}: cannot compare with the event-maintained inventory: "
                            f"{_first_line(exc)}")
        return result, metadata
    level = context.log.warning if drift.count else context.log.info
    level(f"{bucket}: reconciliation: {drift.missing} listed keys the events missed, {drift.extra} keys the "
          f"events kept that are gone" + (f", e.g. {', '.join(drift.sample[:3])}" if drift.sample else ""))
    return result, {**metadata, **_drift_metadata({
        "drift_count": drift.count, "drift_missing_count": drift.missing, "drift_extra_count": drift.extra,
        "drift_sample": ", ".join(drift.sample), "reconciled_at": result.listed_at})}
