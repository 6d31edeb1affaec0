"""delete_orphans_job and purge_dataset_job: deletion behind a dry-run default."""

from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import pyarrow.compute as pc
from pydantic import Field

from heimdall_storage_pipeline.core.audit import AuditLog, BucketBusyError
from heimdall_storage_pipeline.core.clock import as_utc, isoformat_utc, utc_now
from heimdall_storage_pipeline.core.deletion import (
    DELETE_WORKERS,
    DeletionContext,
    DeletionReport,
    candidates_from_orphans,
    delete_batch,
    delete_candidates,
    delete_noncurrent,
    keys_with_noncurrent,
)
from heimdall_storage_pipeline.core.errors import StaleInputError, StorageCleanupError
from heimdall_storage_pipeline.core.guards import (
    PLAN_ANSWERS,
    GuardTrip,
    GuardTrippedError,
    check_diff_usable,
    guard_verdict,
    mass_deletion_trips,
    refusal_message,
)
from heimdall_storage_pipeline.core.plans import (
    Plan,
    PlanRefusedError,
    check_applicable,
    plan_bucket,
    plan_candidates,
    plan_id_for,
    summarize_plan,
)
from heimdall_storage_pipeline.core.policy import (
    DELETE_OBJECTS_LIMIT,
    BucketPolicy,
    PolicyError,
    StoragePolicy,
)
from heimdall_storage_pipeline.core.purge import purge_dataset
from heimdall_storage_pipeline.core.quarantine import (
    check_only_copies,
    expire_and_count,
    move_id,
    restore_one,
    set_expiry_rule,
)
from heimdall_storage_pipeline.core.s3 import make_client, s3_errors
from heimdall_storage_pipeline.core.safety import SKIP_OUTCOMES, Outcome
from heimdall_storage_pipeline.defs import metadata as md
from heimdall_storage_pipeline.defs.automation.checks import blocking_check_failed
from heimdall_storage_pipeline.defs.cleanup.plans import find_plan
from heimdall_storage_pipeline.defs.materializations import ORPHAN_DELETIONS, latest_metadata, recent_metadata
from heimdall_storage_pipeline.defs.resources import (
    AuditDatabaseResource,
    ManifestStoreResource,
    ReferenceDatabaseResource,
    S3Resource,
    StoragePolicyResource,
)

CLEANUP_TAGS = {"heimdall/kind": "cleanup"}
# A cleanup run that outlives this is failed by the daemon's run monitoring (dagster.yaml): nothing
# runs for ever, and a killed run does not stay STARTED. Launches may set their own.
CLEANUP_JOB_TAGS = {**CLEANUP_TAGS, "dagster/max_runtime": str(12 * 3600)}
DEFAULT_LOCK_WAIT_SECONDS = 60
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
    plan: str | None = Field(
        default=None,
        description="apply this plan (a dry run's plan_id, e.g. 'heimdall-raw-iq:1a2b3c4d') in a live run: "
        "delete only its keys, each re-validated; it answers max_delete_fraction for them",
    )
    max_plan_age_minutes: int = Field(default=24 * 60, ge=1, description="refuse an older plan")
    lock_wait_seconds: int = Field(
        default=DEFAULT_LOCK_WAIT_SECONDS, ge=0, le=3600,
        description="how long a live run waits for another cleanup of a bucket to finish before it leaves "
        "the bucket alone (one cleanup per bucket at a time, whatever launched it)",
    )


def _selected_buckets(policy: StoragePolicy, config: DeleteOrphansConfig) -> list[BucketPolicy]:
    """Validate the selection against the policy before any I/O."""
    names = config.buckets
    if config.plan is not None:
        if config.dry_run:
            raise dg.Failure("a plan is applied by a live run: set dry_run: false (a dry run makes a new plan)")
        try:
            plan_of = plan_bucket(config.plan)
        except PlanRefusedError as exc:
            raise dg.Failure(description=str(exc)) from None
        if names and names != [plan_of]:
            raise dg.Failure(
                f"plan {config.plan} is of bucket {plan_of}, not of {', '.join(names)}; leave buckets empty "
                f"or name only {plan_of}"
            )
        names = [plan_of]
    if not names:
        return policy.enabled_buckets()
    try:
        selected = [policy.bucket(name) for name in names]
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
        "deleted_size": md.size(report.deleted_bytes),
        "would_delete_count": dg.MetadataValue.int(report.count(Outcome.WOULD_DELETE)),
        "would_delete_bytes": dg.MetadataValue.int(report.would_delete_bytes),
        "would_delete_size": md.size(report.would_delete_bytes),
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
        "manifest_uri": md.manifest(report.manifest_uri),
        **md.manifest_entries(report.manifest_uri, report.candidates),
        "completed_at": md.timestamp(utc_now()),
        **extra,
    }
    context.log_event(dg.AssetMaterialization(asset_key=ORPHAN_DELETIONS, partition=bucket, metadata=metadata))


def record_refusal(context: dg.OpExecutionContext, bucket: str, reason: str, config: DeleteOrphansConfig) -> None:
    """A refused bucket still gets an ``orphan_deletions`` materialization: refused, why, nothing deleted."""
    zero = dg.MetadataValue.int(0)
    metadata = {
        "dry_run": dg.MetadataValue.bool(config.dry_run),
        "refused": dg.MetadataValue.bool(True),
        "refusal_reason": dg.MetadataValue.text(reason),
        "candidates": zero, "deleted_count": zero, "deleted_bytes": zero, "would_delete_count": zero,
        "would_delete_bytes": zero, **{o.value: zero for o in SKIP_OUTCOMES}, "failed_count": zero,
        "completed_at": md.timestamp(utc_now()),
    }
    if config.plan:
        metadata["plan_id"] = dg.MetadataValue.text(config.plan)
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
        move_id=move_id(_run_started(context), context.run.run_id),
    )


def _run_started(context: dg.OpExecutionContext) -> datetime:
    """When the run started (its quarantine folder is named after it); now, if the instance has no start time."""
    record = context.instance.get_run_record_by_id(context.run.run_id)
    started = record.start_time if record is not None else None
    return datetime.fromtimestamp(started, UTC) if started else utc_now()


def one_cleanup_at_a_time(context: dg.OpExecutionContext, ctx: DeletionContext, bucket: str,
                          wait_seconds: int = DEFAULT_LOCK_WAIT_SECONDS) -> AbstractContextManager[None]:
    """A live cleanup holds the bucket's lock in the audit database for its whole run; a dry run needs none."""
    if ctx.audit is None:
        return nullcontext()
    return ctx.audit.exclusive(bucket, run_id=context.run.run_id, wait=timedelta(seconds=wait_seconds))


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
    failures: dict[str, str] = {}
    # A dry run reads the audit log too: it tells the quarantine's copies from other objects.
    audit = ctx.audit or (audit_db.audit_log() if any(b.quarantine for b in buckets) else None)
    for bucket in buckets:
        try:
            with one_cleanup_at_a_time(context, ctx, bucket.name, config.lock_wait_seconds):
                _clean_bucket(context, ctx, bucket, config, audit)
        except (GuardTrippedError, StaleInputError, PlanRefusedError, BucketBusyError) as exc:
            # Refused before anything was deleted: recorded, so the UI and the exporter show it.
            failures[bucket.name] = str(exc)
            context.log.error(f"{bucket.name}: {exc}")
            record_refusal(context, bucket.name, str(exc), config)
        except StorageCleanupError as exc:
            failures[bucket.name] = str(exc)
            context.log.error(f"{bucket.name}: {exc}")
    ctx.engine.dispose()
    if failures:
        raise dg.Failure(
            description=f"{len(failures)} of {len(buckets)} bucket(s) were not cleaned: "
            + "; ".join(f"{name}: {reason}" for name, reason in failures.items()),
            metadata={"refused": dg.MetadataValue.json(failures)},
        )


def _guard_trips(context: dg.OpExecutionContext, bucket: str, diff: dict[str, Any],
                 config: DeleteOrphansConfig) -> list[GuardTrip]:
    references = recent_metadata(context.instance, "referenced_keys", bucket, limit=2)
    previous = int(references[1]["referenced_count"]) if len(references) > 1 else None
    trips = mass_deletion_trips(diff, previous, config.max_delete_fraction)
    blocked = blocking_check_failed(context.instance, bucket)
    if blocked:
        trips.append(GuardTrip("blocking_check", blocked))
    return trips


def _plan_to_apply(context: dg.OpExecutionContext, ctx: DeletionContext, bucket: str, diff: dict[str, Any],
                   config: DeleteOrphansConfig) -> Plan:
    assert config.plan is not None
    plan, _ = find_plan(context.instance, config.plan)
    check_applicable(plan, latest_diff_manifest_uri=str(diff["manifest_uri"]), now=utc_now(),
                     max_age=timedelta(minutes=config.max_plan_age_minutes), digest=ctx.store.digest(plan.manifest_uri))
    return plan


def _clean_bucket(
    context: dg.OpExecutionContext, ctx: DeletionContext, bucket: BucketPolicy, config: DeleteOrphansConfig,
    audit: AuditLog | None = None,
) -> None:
    diff = latest_metadata(context.instance, "orphan_diff", bucket.name)
    check_diff_usable(bucket.name, diff, utc_now(), timedelta(minutes=config.max_diff_age_minutes))
    assert diff is not None
    trips = _guard_trips(context, bucket.name, diff, config)
    plan = _plan_to_apply(context, ctx, bucket.name, diff, config) if config.plan else None
    if plan is not None:
        trips = [trip for trip in trips if trip.name not in PLAN_ANSWERS]  # the reviewer saw how much goes
    verdict = guard_verdict(trips, config.allow_mass_delete)
    if trips and not config.allow_mass_delete:
        if not config.dry_run:
            raise GuardTrippedError(refusal_message(bucket.name, trips))
        for trip in trips:
            context.log.warning(f"{bucket.name}: a live run would refuse: {trip.name}: {trip.reason}")
    overridden = [trip.name for trip in trips] if config.allow_mass_delete else []
    if overridden:
        context.log.warning(f"{bucket.name}: guards overridden by allow_mass_delete: {', '.join(overridden)}")
    if plan is not None:
        assert ctx.audit is not None
        earlier = ctx.audit.claim_plan(plan.plan_id, bucket=bucket.name, run_id=context.run.run_id, at=utc_now())
        if earlier is not None:
            raise PlanRefusedError(
                f"plan {plan.plan_id} was already applied by run {earlier[0]} at {isoformat_utc(earlier[1])}; "
                f"a plan is applied once: run a dry run for a new one"
            )
        candidates = plan_candidates(ctx.store, plan.manifest_uri, config.max_objects)
        total = plan.keys if config.max_objects is None else min(plan.keys, config.max_objects)
        source = f"plan {plan.plan_id} ({plan.keys} keys, {plan.bytes} bytes)"
    else:
        candidates = candidates_from_orphans(ctx.store, str(diff["manifest_uri"]), config.max_objects)
        eligible = int(diff["eligible_orphan_count"])
        total = eligible if config.max_objects is None else min(eligible, config.max_objects)
        source = f"the diff as of {isoformat_utc(as_utc(diff['as_of'], 'as_of'))}"
    context.log.info(
        f"{bucket.name}: {'dry run over' if config.dry_run else 'deleting'} {total} eligible orphans from {source}"
    )
    if bucket.quarantine is not None and not config.dry_run:
        _set_quarantine_expiry(context, ctx, bucket)
    report = delete_candidates(
        replace(ctx, plan_id=plan.plan_id if plan else None),
        bucket,
        candidates,
        dry_run=config.dry_run,
        batch_size=config.batch_size or bucket.batch_size,
        total=total,
    )
    extra = {
        "diff_as_of": md.timestamp(diff["as_of"]),
        "diff_manifest_uri": md.manifest(str(diff["manifest_uri"])),
        "refused": dg.MetadataValue.bool(False),
        "guard_verdict": dg.MetadataValue.text(verdict),
    }
    extra |= _versioned_cleanup(context, ctx, bucket, config, report)
    extra |= _quarantine_figures(context, ctx, bucket, config.dry_run, audit)
    if plan is not None:
        extra["plan_id"] = dg.MetadataValue.text(plan.plan_id)
    elif config.dry_run:
        extra |= _plan_metadata(ctx, bucket.name, context.run.run_id, report, verdict)
    record_deletions(context, bucket.name, report, extra, guards_overridden=overridden)


def _set_quarantine_expiry(context: dg.OpExecutionContext, ctx: DeletionContext, bucket: BucketPolicy) -> None:
    """The lifecycle rule that expires quarantined objects; it also proves the quarantine bucket exists."""
    assert bucket.quarantine is not None and ctx.audit is not None
    where, prefix = bucket.quarantine.root(bucket.name)
    with s3_errors(ctx.s3, where):
        check_only_copies(ctx.s3, bucket.name, bucket.quarantine, ctx.audit)
        if not set_expiry_rule(make_client(ctx.s3), bucket.name, bucket.quarantine):
            context.log.warning(f"{where} takes no lifecycle rules: this job expires what sits under {prefix} itself")


def _quarantine_figures(context: dg.OpExecutionContext, ctx: DeletionContext, bucket: BucketPolicy, dry_run: bool,
                        audit: AuditLog | None) -> dict[str, Any]:
    """Expire quarantined objects past keep_days (where the server's lifecycle has not) and count the rest."""
    if bucket.quarantine is None:
        return {}
    assert audit is not None
    client = make_client(ctx.s3)
    where, prefix = bucket.quarantine.root(bucket.name)
    with s3_errors(ctx.s3, where):
        figures = expire_and_count(ctx.s3, client, bucket.name, bucket.quarantine, utc_now(), dry_run=dry_run,
                                   delete=lambda on, objects: delete_batch(client, on, objects, ctx.log, ctx.sleep),
                                   audit=audit, run_id=ctx.run_id, job=ctx.job)
    if figures.foreign:
        context.log.warning(f"{bucket.name}: {figures.foreign} objects under the quarantine location {where}/{prefix} "
                            f"were not put there by a move; they are left alone and not counted")
    ctx.log(f"{bucket.name}: {figures.objects} objects ({figures.bytes} bytes) in quarantine at {where}/{prefix}; "
            f"{figures.expired} past keep_days {'would be ' if dry_run else ''}removed")
    if figures.errors:
        ctx.log(f"{bucket.name}: some expired quarantine copies could not be removed (the next run retries): "
                f"{figures.errors[:3]}")
    return {
        "quarantine_location": dg.MetadataValue.text(f"{where}/{prefix}"),
        "quarantined_objects": dg.MetadataValue.int(figures.objects),
        "quarantined_bytes": dg.MetadataValue.int(figures.bytes),
        "quarantined_size": md.size(figures.bytes),
        **({"quarantine_oldest": md.timestamp(figures.oldest)} if figures.oldest else {}),
        "quarantine_expired": dg.MetadataValue.int(figures.expired),
        "quarantine_expired_bytes": dg.MetadataValue.int(figures.expired_bytes),
        "quarantine_foreign_objects": dg.MetadataValue.int(figures.foreign),
    }


def versioning_note(bucket: str, inventory: dict[str, Any]) -> str:
    return (f"{bucket} is versioned: {inventory.get('noncurrent_versions', 0)} noncurrent versions "
            f"({inventory.get('noncurrent_bytes', 0)} bytes) and {inventory.get('delete_markers', 0)} delete markers "
            f"stay on disk; only orphans lose all their versions. Set 'noncurrent_min_age' (e.g. '30d') under "
            f"buckets.{bucket} in the policy to delete versions noncurrent for longer than that")


def _versioned_cleanup(context: dg.OpExecutionContext, ctx: DeletionContext, bucket: BucketPolicy,
                       config: DeleteOrphansConfig, orphans: DeletionReport) -> dict[str, Any]:
    """On a versioned bucket: the noncurrent pass, or, without ``noncurrent_min_age``, a note on what stays."""
    inventory = latest_metadata(context.instance, "bucket_inventory", bucket.name) or {}
    if "versions_manifest_uri" not in inventory:
        return {}
    if bucket.noncurrent_min_age is None:
        context.log.warning(versioning_note(bucket.name, inventory))
        return {"versioning_note": dg.MetadataValue.text(versioning_note(bucket.name, inventory))}
    keys = keys_with_noncurrent(ctx.store, str(inventory["versions_manifest_uri"]))
    if config.dry_run:  # a live run removes these orphans' versions first: not counted twice
        done = ctx.store.read_table(orphans.manifest_uri, columns=["key", "outcome"])
        gone = set(done.filter(pc.equal(done.column("outcome"), Outcome.WOULD_DELETE.value)).column("key").to_pylist())
        keys = (key for key in keys if key not in gone)
    report = delete_noncurrent(ctx, bucket, keys, dry_run=config.dry_run,
                               batch_size=config.batch_size or bucket.batch_size)
    context.log.info(f"{bucket.name}: {report.versions} noncurrent versions ({report.bytes} bytes) and "
                     f"{report.delete_markers} delete markers {'would be ' if config.dry_run else ''}removed")
    if report.failed_keys:
        context.log.warning(f"{bucket.name}: the versions of {report.failed_keys} keys could not be removed; "
                            f"the next cleanup tries again")
    return {"noncurrent_versions_removed": dg.MetadataValue.int(report.versions),
            "noncurrent_bytes_removed": dg.MetadataValue.int(report.bytes),
            "delete_markers_removed": dg.MetadataValue.int(report.delete_markers),
            "noncurrent_failed_keys": dg.MetadataValue.int(report.failed_keys)}


def _plan_metadata(ctx: DeletionContext, bucket: str, run_id: str, report: DeletionReport,
                   verdict: str) -> dict[str, Any]:
    """A dry run is a plan: its id, digest and what a reviewer reads besides the counts."""
    plan_id = plan_id_for(bucket, run_id)
    summary = summarize_plan(ctx.store, report.manifest_uri, utc_now())
    ctx.log(f"{bucket}: plan {plan_id}: {report.count(Outcome.WOULD_DELETE)} keys, {report.would_delete_bytes} "
            f"bytes ({verdict}); to delete exactly these keys, launch a live run with plan: {plan_id}")
    return {
        "plan_id": dg.MetadataValue.text(plan_id),
        "plan_digest": dg.MetadataValue.text(ctx.store.digest(report.manifest_uri)),
        "plan_largest": md.largest_table((c.key, c.size, c.last_modified) for c in summary.largest),
        "plan_age_histogram": md.age_table(summary.age_histogram),
    }


@dg.job(tags=CLEANUP_JOB_TAGS, description="Delete eligible orphans (dry run unless dry_run: false).")
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
        with one_cleanup_at_a_time(context, ctx, bucket.name):
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


@dg.job(tags=CLEANUP_JOB_TAGS, description="Purge one synthetic dataset: rows first, then objects.")
def purge_dataset_job() -> None:
    purge_dataset_op()


class RestoreQuarantinedConfig(dg.Config):
    """Put quarantined objects back; a dry run (the default) only says what would be restored."""

    bucket: str = Field(description="the bucket the objects were moved from")
    keys: list[str] = Field(default_factory=list, description="original keys to restore (their latest move)")
    run_id: str | None = Field(default=None, description="restore every object this cleanup run moved")
    plan: str | None = Field(default=None, description="restore every object moved by the run that applied this plan")
    dry_run: bool = Field(default=True, description="only check and report what would be restored")


@dg.op(tags=CLEANUP_TAGS, description="Restore quarantined objects under their original keys, never over a newer one.")
def restore_quarantined(
    context: dg.OpExecutionContext, config: RestoreQuarantinedConfig, s3: S3Resource, audit_db: AuditDatabaseResource,
    policy: StoragePolicyResource,
) -> None:
    if sum(map(bool, (config.keys, config.run_id, config.plan))) != 1:
        raise dg.Failure("name what to restore with exactly one of keys, run_id or plan")
    try:
        policy.load().bucket(config.bucket)
    except PolicyError as exc:
        raise dg.Failure(description=str(exc)) from None
    audit = audit_db.audit_log()
    moved = audit.moved(config.bucket, keys=config.keys or None, run_id=config.run_id, plan_id=config.plan)
    missing = sorted(set(config.keys) - {m.key for m in moved})
    client = make_client(s3.settings())
    outcomes: dict[str, str] = {key: "refused: no move to quarantine of this key is recorded" for key in missing}
    # A dry run changes nothing: it neither waits for nor blocks a cleanup of the bucket.
    lock = nullcontext() if config.dry_run else audit.exclusive(
        config.bucket, run_id=context.run.run_id, wait=timedelta(seconds=DEFAULT_LOCK_WAIT_SECONDS))
    try:
        with lock:
            for item in moved:
                with s3_errors(s3.settings(), config.bucket):
                    outcomes[item.key] = restore_one(
                        client, config.bucket, item, dry_run=config.dry_run,
                        restored=lambda moved_id=item.audit_id: audit.mark_restored(moved_id, utc_now()),
                        warn=context.log.warning)
    except StorageCleanupError as exc:
        raise dg.Failure(description=str(exc)) from None
    for key, outcome in outcomes.items():
        (context.log.info if outcome in ("restored", "would_restore") else context.log.warning)(f"{key}: {outcome}")
    counts = {name: sum(o.startswith(name) for o in outcomes.values())
              for name in ("restored", "would_restore", "refused", "failed")}
    context.log.info(f"{config.bucket}: {counts}")
    context.log_event(dg.AssetObservation(asset_key=ORPHAN_DELETIONS, partition=config.bucket, metadata={
        "restore_dry_run": dg.MetadataValue.bool(config.dry_run),
        **{f"restore_{name}": dg.MetadataValue.int(count) for name, count in counts.items()},
        "restore_refusals": dg.MetadataValue.json({k: o for k, o in outcomes.items() if o.startswith("refused")}),
    }))
    if counts["failed"]:
        raise dg.Failure(f"{counts['failed']} object(s) of {config.bucket} could not be restored; see the log")


@dg.job(tags=CLEANUP_JOB_TAGS, description="Restore quarantined objects (dry run unless dry_run: false).")
def restore_quarantined_job() -> None:
    restore_quarantined()
