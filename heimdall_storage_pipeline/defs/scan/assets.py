"""The scan: bucket_inventory -> referenced_keys -> orphan_diff, one partition per bucket."""

from datetime import timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from heimdall_storage_pipeline.core.clock import as_utc, check_as_of, parse_utc, utc_now
from heimdall_storage_pipeline.core.diff import (
    check_snapshot_order,
    compute_orphan_diff,
    dumps_sample,
)
from heimdall_storage_pipeline.core.events import INCREMENTAL
from heimdall_storage_pipeline.core.list_objects_v2 import VERSIONED
from heimdall_storage_pipeline.core.manifests import (
    INVENTORY_SCHEMA,
    ORPHANS_SCHEMA,
    REFERENCES_SCHEMA,
    ManifestStore,
)
from heimdall_storage_pipeline.core.policy import format_duration
from heimdall_storage_pipeline.core.references import describe_engine, read_references_to_manifest
from heimdall_storage_pipeline.defs import metadata as md
from heimdall_storage_pipeline.defs.automation.checks import orphan_diff_check_results, orphan_diff_check_specs
from heimdall_storage_pipeline.defs.materializations import latest_metadata, require_metadata
from heimdall_storage_pipeline.defs.resources import (
    AuditDatabaseResource,
    ManifestStoreResource,
    ReferenceDatabaseResource,
    S3Resource,
    StoragePolicyResource,
)
from heimdall_storage_pipeline.defs.scan.inventory import drift_check_result, drift_check_spec, take_inventory

SCAN_GROUP = "storage_scan"
SCAN_ASSETS = ("bucket_inventory", "referenced_keys", "orphan_diff")


class OrphanDiffConfig(dg.Config):
    as_of: str | None = Field(
        default=None,
        description="ISO-8601 UTC time the orphans' ages are measured at (default: now)",
    )


def _prune_old_manifests(
    context: dg.AssetExecutionContext, store: ManifestStore, bucket: str, retention_days: int, new_uri: str
) -> int:
    """Drop this bucket's manifests past retention, keeping the latest of every stage."""
    expired = store.expired(bucket, utc_now(), timedelta(days=retention_days))
    if not expired:
        return 0  # nothing past retention: no instance reads for the manifests to keep
    keep = {new_uri}
    for asset in SCAN_ASSETS:
        metadata = latest_metadata(context.instance, asset, bucket) or {}
        keep.update(str(metadata[k]) for k in metadata if k.endswith("manifest_uri"))
    removed = store.remove([uri for uri in expired if uri not in keep])
    if removed:
        context.log.info(f"pruned {len(removed)} manifest(s) older than {retention_days} days for {bucket}")
    return len(removed)


VERSION_FIGURES = ("noncurrent_versions", "noncurrent_bytes", "delete_markers")


def _versioning_metadata(figures: dict[str, Any]) -> dict[str, dg.MetadataValue]:
    """The bucket's versioning state and, for a versioned bucket, the bytes it keeps besides current objects
    and their manifest (left out otherwise: storage_history and the exporter read their absence as "not known")."""
    versioning = dg.MetadataValue.text(str(figures.get("versioning", "Off")))
    if versioning.value not in VERSIONED or not figures.get("versions_manifest_uri"):
        return {"versioning": versioning}
    return {"versioning": versioning, **{name: dg.MetadataValue.int(int(figures[name])) for name in VERSION_FIGURES},
            "noncurrent_size": md.size(int(figures["noncurrent_bytes"])),
            "versions_manifest_uri": md.manifest(str(figures["versions_manifest_uri"]))}


def build_scan_assets(partitions_def: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    @dg.asset(
        partitions_def=partitions_def,
        group_name=SCAN_GROUP,
        kinds={"s3", "parquet"},
        pool="s3_listing",
        metadata={md.COLUMN_SCHEMA: md.column_schema(INVENTORY_SCHEMA)},
        check_specs=[drift_check_spec(partitions_def)],
        description="Every object of the bucket (key, size, last_modified UTC, etag) in a Parquet manifest: "
                    "a full listing, or the previous one with the bucket's events applied.",
    )
    def bucket_inventory(
        context: dg.AssetExecutionContext,
        s3: S3Resource,
        manifests: ManifestStoreResource,
        policy: StoragePolicyResource,
        audit_db: AuditDatabaseResource,
    ) -> dg.MaterializeResult:
        bucket = context.partition_key
        storage_policy = policy.load()
        bucket_policy = storage_policy.bucket(bucket)  # refuse a partition the policy no longer has
        store = manifests.store()
        previous = latest_metadata(context.instance, "bucket_inventory", bucket)
        result, stream_metadata = take_inventory(context, s3.settings(), store, bucket_policy, audit_db.url,
                                                 previous)
        context.log.info(
            f"inventoried {result.object_count} objects ({result.total_bytes} bytes) of {bucket} in "
            f"{result.listing_seconds:.2f} s ({result.keys_per_second:.0f} keys/s)"
        )
        pruned = _prune_old_manifests(
            context, store, bucket, storage_policy.manifest_retention_days, result.manifest_uri
        )
        return dg.MaterializeResult(
            metadata={
                "object_count": dg.MetadataValue.int(result.object_count),
                "total_bytes": dg.MetadataValue.int(result.total_bytes),
                "total_size": md.size(result.total_bytes),
                "manifest_uri": md.manifest(result.manifest_uri),
                **md.manifest_entries(result.manifest_uri, result.object_count),
                "listing_started_at": md.timestamp(result.started_at),
                "listed_at": md.timestamp(result.listed_at),
                "listing_seconds": dg.MetadataValue.float(round(result.listing_seconds, 4)),
                "keys_per_second": dg.MetadataValue.float(round(result.keys_per_second, 1)),
                "endpoint": dg.MetadataValue.text(s3.settings().endpoint_url),
                "pruned_manifests": dg.MetadataValue.int(pruned),
                **stream_metadata,
                # An incremental inventory lists no versions: the last full listing's figures carry over.
                **_versioning_metadata((previous or {})
                                       if getattr(stream_metadata.get("mode"), "value", None) == INCREMENTAL
                                       else vars(result)),
            },
            check_results=[drift_check_result({k: v.value for k, v in stream_metadata.items()},
                                              bucket_policy.drift_error_keys)],
        )

    @dg.asset(
        partitions_def=partitions_def,
        group_name=SCAN_GROUP,
        kinds={"postgres", "parquet"},
        pool="reference_db",
        metadata={md.COLUMN_SCHEMA: md.column_schema(REFERENCES_SCHEMA)},
        deps=[bucket_inventory],
        description=(
            "Normalised keys the database references, read in one snapshot taken after the "
            "inventory listing finished."
        ),
    )
    def referenced_keys(
        context: dg.AssetExecutionContext,
        reference_db: ReferenceDatabaseResource,
        manifests: ManifestStoreResource,
        policy: StoragePolicyResource,
    ) -> dg.MaterializeResult:
        bucket = context.partition_key
        bucket_policy = policy.load().bucket(bucket)
        inventory = require_metadata(context.instance, "bucket_inventory", bucket, "referenced_keys")
        engine = reference_db.engine()
        store = manifests.store()
        context.log.info(
            f"reading the references of {bucket} from {describe_engine(engine)}: "
            + ", ".join(f"{source.name} (time limit {format_duration(source.statement_timeout)})"
                        for source in bucket_policy.references)
        )
        try:
            result = read_references_to_manifest(engine, bucket_policy, store, context.run.run_id)
        finally:
            engine.dispose()
        check_snapshot_order(as_utc(inventory["listed_at"], "listed_at"), result.snapshot_at)
        context.log.info(
            f"{result.referenced_count} distinct keys of {bucket} referenced "
            f"({result.other_bucket_reference_count} references to other buckets, "
            f"{result.unparseable_reference_count} unparseable) from {describe_engine(engine)}"
        )
        return dg.MaterializeResult(
            metadata={
                "referenced_count": dg.MetadataValue.int(result.referenced_count),
                "reference_rows": dg.MetadataValue.int(result.reference_rows),
                "other_bucket_reference_count": dg.MetadataValue.int(result.other_bucket_reference_count),
                "unparseable_reference_count": dg.MetadataValue.int(result.unparseable_reference_count),
                "unparseable_sample": dg.MetadataValue.text(dumps_sample(result.unparseable_sample)),
                "snapshot_at": md.timestamp(result.snapshot_at),
                "inventory_listed_at": md.timestamp(inventory["listed_at"]),
                "read_seconds": dg.MetadataValue.float(round(result.read_seconds, 4)),
                "sources": dg.MetadataValue.text(", ".join(s.name for s in bucket_policy.references)),
                "manifest_uri": md.manifest(result.manifest_uri),
                **md.manifest_entries(result.manifest_uri, md.manifest_rows(store, result.manifest_uri)),
            }
        )

    @dg.asset(
        partitions_def=partitions_def,
        group_name=SCAN_GROUP,
        kinds={"parquet"},
        deps=[referenced_keys],
        metadata={md.COLUMN_SCHEMA: md.column_schema(ORPHANS_SCHEMA)},
        check_specs=orphan_diff_check_specs(partitions_def),
        description=(
            "Objects no reference names, split into eligible (old enough) and young orphans, "
            "with the bucket's health and its dangling references."
        ),
    )
    def orphan_diff(
        context: dg.AssetExecutionContext,
        config: OrphanDiffConfig,
        manifests: ManifestStoreResource,
        policy: StoragePolicyResource,
    ) -> dg.MaterializeResult:
        bucket = context.partition_key
        bucket_policy = policy.load().bucket(bucket)
        inventory = require_metadata(context.instance, "bucket_inventory", bucket, "orphan_diff")
        references = require_metadata(context.instance, "referenced_keys", bucket, "orphan_diff")
        listed_at = as_utc(inventory["listed_at"], "listed_at")
        snapshot_at = as_utc(references["snapshot_at"], "snapshot_at")
        check_snapshot_order(listed_at, snapshot_at)
        as_of = check_as_of(parse_utc(config.as_of, "as_of"), utc_now()) if config.as_of else utc_now()
        result = compute_orphan_diff(
            bucket=bucket_policy,
            store=manifests.store(),
            inventory_uri=inventory["manifest_uri"],
            references_uri=references["manifest_uri"],
            as_of=as_of,
            run_id=context.run.run_id,
            versions={name: int(inventory.get(name, 0)) for name in VERSION_FIGURES},
        )
        context.log.info(
            f"{bucket}: {result.orphan_count} orphans ({result.orphan_bytes} bytes), "
            f"{result.eligible_orphan_count} eligible, {result.young_orphan_count} young, "
            f"health {result.health_status}"
        )
        metadata: dict[str, dg.MetadataValue] = {
            "as_of": md.timestamp(result.as_of),
            "min_age_seconds": dg.MetadataValue.int(int(bucket_policy.min_age.total_seconds())),
            "object_count": dg.MetadataValue.int(result.object_count),
            "total_bytes": dg.MetadataValue.int(result.total_bytes),
            "total_size": md.size(result.total_bytes),
            "referenced_count": dg.MetadataValue.int(result.referenced_count),
            "orphan_count": dg.MetadataValue.int(result.orphan_count),
            "orphan_bytes": dg.MetadataValue.int(result.orphan_bytes),
            "orphan_size": md.size(result.orphan_bytes),
            "eligible_orphan_count": dg.MetadataValue.int(result.eligible_orphan_count),
            "eligible_orphan_bytes": dg.MetadataValue.int(result.eligible_orphan_bytes),
            "eligible_orphan_size": md.size(result.eligible_orphan_bytes),
            "young_orphan_count": dg.MetadataValue.int(result.young_orphan_count),
            "young_orphan_bytes": dg.MetadataValue.int(result.young_orphan_bytes),
            "young_orphan_size": md.size(result.young_orphan_bytes),
            "unparseable_object_count": dg.MetadataValue.int(result.unparseable_object_count),
            "unparseable_object_sample": dg.MetadataValue.text(
                dumps_sample(result.unparseable_object_sample)
            ),
            "orphan_share_bytes": dg.MetadataValue.float(result.orphan_share_bytes),
            "orphan_share_bytes_percent": md.percent(result.orphan_share_bytes),
            "orphan_share_count": dg.MetadataValue.float(result.orphan_share_count),
            "orphan_share_count_percent": md.percent(result.orphan_share_count),
            "health_status": dg.MetadataValue.text(result.health_status),
            **_versioning_metadata(inventory),  # the inventory's figures, with the versions manifest
            "dangling_reference_count": dg.MetadataValue.int(result.dangling_reference_count),
            "dangling_sample": dg.MetadataValue.text(dumps_sample(result.dangling_sample)),
            "age_histogram": md.age_table(
                (str(row["age"]), int(row["count"]), int(row["bytes"])) for row in result.age_histogram
            ),
            "largest_eligible_orphans": md.largest_table(
                (str(row["key"]), int(row["size"]), row["last_modified"]) for row in result.largest_eligible
            ),
            "inventory_listed_at": md.timestamp(listed_at),
            "references_snapshot_at": md.timestamp(snapshot_at),
            "inventory_manifest_uri": md.manifest(inventory["manifest_uri"]),
            "references_manifest_uri": md.manifest(references["manifest_uri"]),
            "manifest_uri": md.manifest(result.manifest_uri),
            **md.manifest_entries(result.manifest_uri, result.orphan_count),
        }
        return dg.MaterializeResult(
            metadata=metadata,
            check_results=orphan_diff_check_results({key: value.value for key, value in metadata.items()}),
        )

    return [bucket_inventory, referenced_keys, orphan_diff]


def build_scan_job(executor_def: dg.ExecutorDefinition | None = None):
    return dg.define_asset_job(
        "storage_scan_job",
        selection=dg.AssetSelection.groups(SCAN_GROUP),
        description="List the bucket, read its references after the listing, and diff them.",
        # A scan that outlives this is failed by the daemon's run monitoring (dagster.yaml).
        tags={"heimdall/kind": "scan", "dagster/max_runtime": str(2 * 3600)},
        executor_def=executor_def,
    )
