"""Purging a synthetic dataset: its rows, then its objects (the predecessor's root cause).

Heimdall deleted dataset rows and left the objects behind. Here the rows go first, in one
transaction, then every object under the dataset's prefixes goes through the same
re-validation and audit as the orphan cleanup, exempt only from the age threshold: the
owner is known to be gone. What fails to delete is reported and left for the orphan
cleanup, which finds it later like any other orphan.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from heimdall_storage_pipeline.core.deletion import DeletionContext, DeletionReport, delete_candidates
from heimdall_storage_pipeline.core.errors import StorageCleanupError, database_error
from heimdall_storage_pipeline.core.policy import BucketPolicy
from heimdall_storage_pipeline.core.s3 import make_client, s3_errors
from heimdall_storage_pipeline.core.safety import Candidate


class DatasetNotFoundError(StorageCleanupError):
    pass


@dataclass(frozen=True)
class PurgeResult:
    dataset_id: str
    dataset_name: str
    sample_rows: int
    prefixes: tuple[str, ...]
    deletion: DeletionReport


def dataset_prefixes(dataset_id: str) -> tuple[str, ...]:
    """Both layouts Heimdall has used for a dataset's objects."""
    return (f"synthetic/{dataset_id}/", f"synthetic/dataset-{dataset_id}/")


def parse_dataset_id(text: str) -> str:
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        raise DatasetNotFoundError(
            f"dataset_id {text!r} is not a UUID; copy the id from heimdall.synthetic_datasets"
        ) from None


def list_prefix_candidates(ctx: DeletionContext, bucket: str, prefixes: tuple[str, ...]) -> Iterator[Candidate]:
    client = make_client(ctx.s3)
    with s3_errors(ctx.s3, bucket):
        for prefix in prefixes:
            for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
                if not obj.is_dir:
                    yield Candidate(key=obj.object_name, size=obj.size or 0,
                                    last_modified=obj.last_modified, etag=(obj.etag or "").strip('"'))


@contextmanager
def _writable(engine: Engine) -> Iterator[Connection]:
    try:
        with engine.begin() as connection:
            yield connection
    except sa.exc.OperationalError as exc:
        raise database_error(engine, "write to the Heimdall database", exc, "check HEIMDALL_DATABASE_URL") from None


def _delete_rows(connection: Connection, dataset_id: str) -> tuple[str, int]:
    row = connection.execute(
        sa.text("SELECT name FROM heimdall.synthetic_datasets WHERE id = :id FOR UPDATE"), {"id": dataset_id}
    ).first()
    if row is None:
        raise DatasetNotFoundError(
            f"no synthetic dataset with id {dataset_id}; nothing was deleted. List the datasets with "
            f"SELECT id, name FROM heimdall.synthetic_datasets"
        )
    samples = connection.execute(
        sa.text("DELETE FROM heimdall.synthetic_iq_samples WHERE dataset_id = :id"), {"id": dataset_id}
    ).rowcount
    connection.execute(sa.text("DELETE FROM heimdall.synthetic_datasets WHERE id = :id"), {"id": dataset_id})
    return str(row.name), int(samples)


def purge_dataset(
    ctx: DeletionContext, writable_engine: Engine, bucket: BucketPolicy, dataset_id: str, *, dry_run: bool
) -> PurgeResult:
    """Delete a dataset's rows, then its objects; a dry run rolls the rows back and deletes nothing."""
    dataset_id = parse_dataset_id(dataset_id)
    prefixes = dataset_prefixes(dataset_id)
    if dry_run:
        # Delete the rows inside a transaction that is rolled back, and re-validate through
        # it: the dry run sees exactly the references a live purge would see.
        with writable_engine.connect() as connection:
            transaction = connection.begin()
            try:
                name, samples = _delete_rows(connection, dataset_id)

                @contextmanager
                def in_transaction(_: Engine) -> Iterator[Connection]:
                    yield connection

                # One batch at a time: a connection serves one thread at a time.
                dry_ctx = replace(ctx, references=in_transaction, workers=1, revalidate_ahead=0)
                report = delete_candidates(dry_ctx, bucket, list_prefix_candidates(ctx, bucket.name, prefixes),
                                           dry_run=True, batch_size=bucket.batch_size, age_exempt=True)
            finally:
                transaction.rollback()
    else:
        with _writable(writable_engine) as connection:
            name, samples = _delete_rows(connection, dataset_id)
        report = delete_candidates(ctx, bucket, list_prefix_candidates(ctx, bucket.name, prefixes),
                                   dry_run=False, batch_size=bucket.batch_size, age_exempt=True)
    return PurgeResult(dataset_id=dataset_id, dataset_name=name, sample_rows=samples, prefixes=prefixes,
                       deletion=report)
