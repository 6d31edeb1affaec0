"""delete_orphans_job and purge_dataset_job: deletion behind a dry-run default."""

from datetime import timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from heimdall_storage_pipeline.core.clock import isoformat_utc, utc_now
from heimdall_storage_pipeline.core.deletion import (
    DELETE_WORKERS,
    DeletionContext,
    DeletionReport,
    candidates_from_orphans,
    delete_candidates,
)
from heimdall_storage_pipeline.core.errors import StorageCleanupError
from heimdall_storage_pipeline.core.guards import (
    GuardTrip,
    GuardTrippedError,
    check_diff_usable,
    mass_deletion_trips,
    refusal_message,
)
from heimdall_storage_pipeline.core.policy import (
    DELETE_OBJECTS_LIMIT,
    BucketPolicy,
    PolicyError,
    StoragePolicy,
)
from heimdall_storage_pipeline.core.purge import purge_dataset
from heimdall_storage_pipeline.core.safety import SKIP_OUTCOMES, Outcome
from heimdall_storage_pipeline.defs.automation.checks import blocking_check_failed
from heimdall_storage_pipeline.defs.materializations import latest_metadata, recent_metadata
from heimdall_storage_pipeline.defs.resources import (
    AuditDatabaseResource,
    ManifestStoreResource,
    ReferenceDatabaseResource,
    S3Resource,
    StoragePolicyResource,
)

ORPHAN_DELETIONS = "orphan_deletions"
CLEANUP_TAGS = {"heimdall/kind": "cleanup"}
PURGE_BUCKET = "heimdall-synthetic-iq"


class DeleteOrphansConfig(dg.Config):
    """Safe defaults: a dry run of every enabled bucket, refusing stale diffs and mass deletions."""

    dry_run: bool = Field(default=True, description="only record what would be deleted")
    buckets: list[str] = Field(default_factory=list, description="buckets to clean; empty means all enabled")
    batch_size: int | None = Field(
        default=None, ge=1, le=DELETE_OBJECTS_LIMIT,
        description="keys per DeleteObjects request (at most the bucket's policy batch_size)",
    )
    max_objects: int | None = Field(default=None, ge=0, description="cap on candidates per bucket")
    delete_concurrency: int = Field(
        default=DELETE_WORKERS, ge=1, le=32,
        description="DeleteObjects requests in flight per bucket (the load put on the S3 server)",
    )
    conditional_deletes: bool = Field(
        default=False,
        description="name each object's ETag as a DeleteObjects condition, so a server that implements "
        "conditional deletes keeps an object rewritten after its check (SeaweedFS: up to ~40 % more CPU per key)",
    )
    max_diff_age_minutes: int = Field(default=24 * 60, ge=1, description="refuse older diffs")
    max_delete_fraction: float = Field(
        default=0.5, gt=0, le=1, description="refuse when eligible orphans exceed this share"
    )
    allow_mass_delete: bool = Field(default=False, description="override the mass-deletion guards")


def _selected_buckets(policy: StoragePolicy, config: DeleteOrphansConfig) -> list[BucketPolicy]:
    """Validate the selection against the policy before any I/O."""
    if not config.buckets:
        return policy.enabled_buckets()
    try:
        selected = [policy.bucket(name) for name in config.buckets]
    except PolicyError as exc:
        raise dg.Failure(description=str(exc)) from None
    disabled = [bucket.name for bucket in selected if not bucket.enabled]
    if disabled:
        raise dg.Failure(f"bucket(s) {', '.join(disabled)} are disabled in {policy.source}; enable them first")
    if config.batch_size is not None:
        too_big = [b.name for b in selected if config.batch_size > b.batch_size]
        if too_big:
            raise dg.Failure(
                f"batch_size {config.batch_size} exceeds the policy's batch_size for {', '.join(too_big)}; "
                f"use at most the policy's value"
            )
    return selected


def record_deletions(
    context: dg.OpExecutionContext,
    bucket: str,
    report: DeletionReport,
    extra: dict[str, Any],
    guards_overridden: list[str] | None = None,
) -> None:
    """Log a one-line summary and materialize ``orphan_deletions`` for ``bucket``."""
    context.log.info(
        f"{bucket}: {report.count(Outcome.DELETED)} deleted ({report.deleted_bytes} bytes), "
        f"{report.count(Outcome.WOULD_DELETE)} would be deleted, skipped: "
        + ", ".join(f"{o.value} {report.count(o)}" for o in SKIP_OUTCOMES)
        + f", failed {report.count(Outcome.FAILED)}"
    )
    metadata = {
        "dry_run": dg.MetadataValue.bool(report.dry_run),
        "candidates": dg.MetadataValue.int(report.candidates),
        "deleted_count": dg.MetadataValue.int(report.count(Outcome.DELETED)),
        "deleted_bytes": dg.MetadataValue.int(report.deleted_bytes),
        "would_delete_count": dg.MetadataValue.int(report.count(Outcome.WOULD_DELETE)),
        "would_delete_bytes": dg.MetadataValue.int(report.would_delete_bytes),
        **{o.value: dg.MetadataValue.int(report.count(o)) for o in SKIP_OUTCOMES},
        "failed_count": dg.MetadataValue.int(report.count(Outcome.FAILED)),
        "failed_sample": dg.MetadataValue.json(report.failures),
        "guards_overridden": dg.MetadataValue.json(guards_overridden or []),
        "reconciled_pending": dg.MetadataValue.json(report.reconciled),
        "batches": dg.MetadataValue.int(report.batches),
        "seconds": dg.MetadataValue.float(round(report.seconds, 4)),
        "revalidation_seconds": dg.MetadataValue.float(round(report.revalidation_seconds, 4)),
        "delete_seconds": dg.MetadataValue.float(round(report.delete_seconds, 4)),
        "revalidated_again": dg.MetadataValue.int(report.revalidated_again),
        "manifest_uri": dg.MetadataValue.text(report.manifest_uri),
        "completed_at": dg.MetadataValue.text(isoformat_utc(utc_now())),
        **extra,
    }
    context.log_event(dg.AssetMaterialization(asset_key=ORPHAN_DELETIONS, partition=bucket, metadata=metadata))


def deletion_context(
    context: dg.OpExecutionContext, s3: S3Resource, reference_db: ReferenceDatabaseResource,
    manifests: ManifestStoreResource, audit_db: AuditDatabaseResource, dry_run: bool,
    workers: int = DELETE_WORKERS, conditional_deletes: bool = False,
) -> DeletionContext:
    """What every deleting op needs; a dry run gets no audit log, so it cannot record deletions."""
    return DeletionContext(
        s3=s3.settings(),
        engine=reference_db.engine(),
        store=manifests.store(),
        audit=None if dry_run else audit_db.audit_log(),
        run_id=context.run.run_id,
        job=context.job_name,
        log=context.log.info,
        workers=workers,
        conditional_deletes=conditional_deletes,
    )


@dg.op(tags=CLEANUP_TAGS, description="Re-validate and delete the eligible orphans of each bucket's latest diff.")
def delete_orphans(
    context: dg.OpExecutionContext,
    config: DeleteOrphansConfig,
    s3: S3Resource,
    reference_db: ReferenceDatabaseResource,
    manifests: ManifestStoreResource,
    policy: StoragePolicyResource,
    audit_db: AuditDatabaseResource,
) -> None:
    buckets = _selected_buckets(policy.load(), config)
    ctx = deletion_context(context, s3, reference_db, manifests, audit_db, config.dry_run,
                           workers=config.delete_concurrency, conditional_deletes=config.conditional_deletes)
    refusals: dict[str, str] = {}
    for bucket in buckets:
        try:
            _clean_bucket(context, ctx, bucket, config)
        except StorageCleanupError as exc:
            refusals[bucket.name] = str(exc)
            context.log.error(f"{bucket.name}: {exc}")
    ctx.engine.dispose()
    if refusals:
        raise dg.Failure(
            description=f"{len(refusals)} of {len(buckets)} bucket(s) were not cleaned: "
            + "; ".join(f"{name}: {reason}" for name, reason in refusals.items()),
            metadata={"refused": dg.MetadataValue.json(refusals)},
        )


def _clean_bucket(
    context: dg.OpExecutionContext, ctx: DeletionContext, bucket: BucketPolicy, config: DeleteOrphansConfig
) -> None:
    diff = latest_metadata(context.instance, "orphan_diff", bucket.name)
    check_diff_usable(bucket.name, diff, utc_now(), timedelta(minutes=config.max_diff_age_minutes))
    assert diff is not None
    references = recent_metadata(context.instance, "referenced_keys", bucket.name, limit=2)
    previous = int(references[1]["referenced_count"]) if len(references) > 1 else None
    trips = mass_deletion_trips(diff, previous, config.max_delete_fraction)
    blocked = blocking_check_failed(context.instance, bucket.name)
    if blocked:
        trips.append(GuardTrip("blocking_check", blocked))
    if trips and not config.allow_mass_delete:
        raise GuardTrippedError(refusal_message(bucket.name, trips))
    overridden = [trip.name for trip in trips]
    if overridden:
        context.log.warning(f"{bucket.name}: guards overridden by allow_mass_delete: {', '.join(overridden)}")
    eligible = int(diff["eligible_orphan_count"])
    total = eligible if config.max_objects is None else min(eligible, config.max_objects)
    context.log.info(
        f"{bucket.name}: {'dry run over' if config.dry_run else 'deleting'} {total} eligible orphans "
        f"from the diff as of {diff['as_of']}"
    )
    report = delete_candidates(
        ctx,
        bucket,
        candidates_from_orphans(ctx.store, str(diff["manifest_uri"]), config.max_objects),
        dry_run=config.dry_run,
        batch_size=config.batch_size or bucket.batch_size,
        total=total,
    )
    record_deletions(context, bucket.name, report, {
        "diff_as_of": dg.MetadataValue.text(str(diff["as_of"])),
        "diff_manifest_uri": dg.MetadataValue.text(str(diff["manifest_uri"])),
    }, guards_overridden=overridden)


@dg.job(tags=CLEANUP_TAGS, description="Delete eligible orphans (dry run unless dry_run: false).")
def delete_orphans_job() -> None:
    delete_orphans()


class PurgeDatasetConfig(dg.Config):
    dataset_id: str = Field(description="id of the heimdall.synthetic_datasets row to purge")
    dry_run: bool = Field(default=True, description="roll the rows back and delete no object")


@dg.op(tags=CLEANUP_TAGS, description="Delete a synthetic dataset's rows, then its objects.")
def purge_dataset_op(
    context: dg.OpExecutionContext,
    config: PurgeDatasetConfig,
    s3: S3Resource,
    reference_db: ReferenceDatabaseResource,
    manifests: ManifestStoreResource,
    policy: StoragePolicyResource,
    audit_db: AuditDatabaseResource,
) -> None:
    bucket = policy.load().bucket(PURGE_BUCKET)
    ctx = deletion_context(context, s3, reference_db, manifests, audit_db, config.dry_run)
    try:
        result = purge_dataset(ctx, ctx.engine, bucket, config.dataset_id, dry_run=config.dry_run)
    except StorageCleanupError as exc:
        raise dg.Failure(description=str(exc)) from None
    finally:
        ctx.engine.dispose()
    report = result.deletion
    context.log.info(
        f"dataset {result.dataset_id} ({result.dataset_name}): {result.sample_rows} sample rows "
        f"{'would be' if config.dry_run else 'were'} deleted"
    )
    record_deletions(context, bucket.name, report, {
        "dataset_id": dg.MetadataValue.text(result.dataset_id),
        "sample_rows": dg.MetadataValue.int(result.sample_rows),
        "prefixes": dg.MetadataValue.json(list(result.prefixes)),
    })
    if report.count(Outcome.FAILED):
        context.log.warning(
            f"{report.count(Outcome.FAILED)} objects of dataset {result.dataset_id} could not be deleted; "
            f"the orphan cleanup will find them once they pass the minimum age"
        )


@dg.job(tags=CLEANUP_TAGS, description="Purge one synthetic dataset: rows first, then objects.")
def purge_dataset_job() -> None:
    purge_dataset_op()
