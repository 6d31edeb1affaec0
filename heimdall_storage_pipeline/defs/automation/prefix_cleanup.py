"""prefix_cleanup_job: the event-driven cleanup of a deleted entity's own prefixes.

Order matters: the entity's row is confirmed gone first, and only then are its objects
exempt from the age threshold. Every batch is still re-validated (fresh references, fresh
stat) and decided by ``core.safety.deletion_verdict`` inside ``delete_candidates``.
"""

import dagster as dg
from pydantic import Field

from heimdall_storage_pipeline.core.deletion import delete_candidates
from heimdall_storage_pipeline.core.errors import StorageCleanupError
from heimdall_storage_pipeline.core.policy import PolicyError
from heimdall_storage_pipeline.core.purge import list_prefix_candidates
from heimdall_storage_pipeline.core.safety import Outcome
from heimdall_storage_pipeline.defs.automation.outbox import (
    OutboxEventError,
    entity_row_exists,
    owned_prefixes,
)
from heimdall_storage_pipeline.defs.cleanup.jobs import (
    CLEANUP_JOB_TAGS,
    CLEANUP_TAGS,
    deletion_context,
    one_cleanup_at_a_time,
    record_deletions,
)
from heimdall_storage_pipeline.defs.resources import (
    AuditDatabaseResource,
    ManifestStoreResource,
    ReferenceDatabaseResource,
    S3Resource,
    StoragePolicyResource,
)

PREFIX_CLEANUP_JOB = "prefix_cleanup_job"
PREFIX_CLEANUP_OP = "prefix_cleanup"


class PrefixCleanupConfig(dg.Config):
    """One outbox event: the deleted entity and the prefixes it owned."""

    event_id: int = Field(description="id in heimdall.storage_cleanup_events")
    entity_type: str = Field(description="synthetic_dataset or audio")
    entity_id: str = Field(description="the deleted row's id")
    bucket: str = Field(description="the bucket the entity's objects live in")
    prefixes: list[str] = Field(description="the entity's own prefixes (checked against its type and id)")
    dry_run: bool = Field(default=True, description="only record what would be deleted")


@dg.op(name=PREFIX_CLEANUP_OP, tags=CLEANUP_TAGS,
       description="Confirm the entity's row is gone, then re-validate and delete its prefixes' objects.")
def prefix_cleanup(
    context: dg.OpExecutionContext,
    config: PrefixCleanupConfig,
    s3: S3Resource,
    reference_db: ReferenceDatabaseResource,
    manifests: ManifestStoreResource,
    policy: StoragePolicyResource,
    audit_db: AuditDatabaseResource,
) -> None:
    try:
        prefixes = owned_prefixes(config.entity_type, config.entity_id, config.bucket, tuple(config.prefixes))
        bucket = policy.load().bucket(config.bucket)
    except (OutboxEventError, PolicyError) as exc:
        raise dg.Failure(description=f"event {config.event_id}: {exc}") from None
    if not bucket.enabled:
        raise dg.Failure(
            description=f"event {config.event_id}: bucket {bucket.name} is disabled in the policy"
        )
    ctx = deletion_context(context, s3, reference_db, manifests, audit_db, config.dry_run)
    try:
        with one_cleanup_at_a_time(context, ctx, bucket.name):
            if entity_row_exists(ctx.engine, config.entity_type, config.entity_id):
                # The row is back (a restore, a re-import): its objects are not known dead.
                context.log.warning(
                    f"event {config.event_id}: {config.entity_type} {config.entity_id} exists again; "
                    f"nothing is deleted, the orphan cleanup handles its objects like any others"
                )
                return
            report = delete_candidates(
                ctx, bucket, list_prefix_candidates(ctx, bucket.name, prefixes),
                dry_run=config.dry_run, batch_size=bucket.batch_size, age_exempt=True,
            )
    except StorageCleanupError as exc:
        raise dg.Failure(description=f"event {config.event_id}: {exc}") from None
    finally:
        ctx.engine.dispose()
    context.log.info(
        f"event {config.event_id} ({config.entity_type} {config.entity_id}): {report.candidates} "
        f"objects under {', '.join(prefixes)}"
    )
    record_deletions(context, bucket.name, report, {
        "event_id": dg.MetadataValue.int(config.event_id),
        "entity_type": dg.MetadataValue.text(config.entity_type),
        "entity_id": dg.MetadataValue.text(config.entity_id),
        "prefixes": dg.MetadataValue.json(list(prefixes)),
    })
    if report.count(Outcome.FAILED):
        # Fail the run so the event stays unprocessed and the sensor retries it.
        raise dg.Failure(
            description=f"event {config.event_id}: {report.count(Outcome.FAILED)} objects could not be "
            f"deleted (first: {report.failures[:3]})"
        )


@dg.job(name=PREFIX_CLEANUP_JOB, tags=CLEANUP_JOB_TAGS,
        description="Event-driven cleanup of a deleted dataset's or audio's own prefixes.")
def prefix_cleanup_job() -> None:
    prefix_cleanup()
