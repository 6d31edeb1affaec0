"""Core-level scan and deletion on the real servers, with the clock under the test's control."""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from minio import Minio

from heimdall_storage_pipeline.core.audit import AuditLog, deletion_audit
from heimdall_storage_pipeline.core.clock import utc_now
from heimdall_storage_pipeline.core.deletion import (
    DeletionContext,
    DeletionReport,
    candidates_from_orphans,
    delete_candidates,
)
from heimdall_storage_pipeline.core.diff import compute_orphan_diff
from heimdall_storage_pipeline.core.keys import ReferenceFormat
from heimdall_storage_pipeline.core.listing import list_bucket_to_manifest
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.policy import BucketPolicy, ReferenceSource
from heimdall_storage_pipeline.core.references import read_references_to_manifest
from heimdall_storage_pipeline.core.s3 import S3Settings


def put(client: Minio, bucket: str, key: str, body: bytes = b"payload") -> None:
    client.put_object(bucket, key, io.BytesIO(body), len(body))


def refs_table(engine: sa.Engine) -> str:
    """A fresh one-column table of references; returns its name."""
    name = f"refs_{secrets.token_hex(4)}"
    with engine.begin() as connection:
        connection.execute(sa.text(f"CREATE TABLE {name} (value text)"))
    return name


def add_refs(engine: sa.Engine, table: str, values: list[str]) -> None:
    if values:
        with engine.begin() as connection:
            connection.execute(sa.text(f"INSERT INTO {table} (value) VALUES (:v)"), [{"v": v} for v in values])


def bucket_policy(name: str, table: str, min_age: timedelta = timedelta(days=30),
                  fmt: ReferenceFormat = ReferenceFormat.KEY, batch_size: int = 1000) -> BucketPolicy:
    return BucketPolicy(
        name=name, enabled=True, min_age=min_age, batch_size=batch_size, description="test",
        references=(ReferenceSource(name="refs", query=f"SELECT value FROM {table}", format=fmt),),
    )


@dataclass
class CoreRig:
    """Scan + delete through core functions; ``offset`` shifts the deletion clock."""

    s3: S3Settings
    engine: sa.Engine
    store: ManifestStore
    audit: AuditLog
    offset: timedelta = timedelta(0)
    logs: list[str] = field(default_factory=list)

    def clock(self) -> datetime:
        return utc_now() + self.offset

    def scan(self, bucket: BucketPolicy, as_of: datetime | None = None) -> str:
        """Inventory, then references, then diff; returns the orphan manifest URI."""
        run_id = secrets.token_hex(8)
        inventory = list_bucket_to_manifest(self.s3, bucket.name, self.store, run_id)
        references = read_references_to_manifest(self.engine, bucket, self.store, run_id)
        diff = compute_orphan_diff(
            bucket=bucket, store=self.store, inventory_uri=inventory.manifest_uri,
            references_uri=references.manifest_uri, as_of=as_of or self.clock(), run_id=run_id,
        )
        return diff.manifest_uri

    def context(self, run_id: str | None = None, **overrides: object) -> DeletionContext:
        values: dict[str, object] = {
            "s3": self.s3, "engine": self.engine, "store": self.store, "audit": self.audit,
            "run_id": run_id or secrets.token_hex(8), "job": "test", "log": self.logs.append,
            "clock": self.clock, "sleep": lambda _: None,
        }
        values.update(overrides)
        return DeletionContext(**values)  # type: ignore[arg-type]

    def delete(self, bucket: BucketPolicy, orphans_uri: str, dry_run: bool = False, batch_size: int = 1000,
               **overrides: object) -> DeletionReport:
        return delete_candidates(
            self.context(**overrides), bucket, candidates_from_orphans(self.store, orphans_uri),
            dry_run=dry_run, batch_size=batch_size,
        )

    def audit_rows(self, bucket: str) -> list[sa.Row]:
        with self.engine.connect() as connection:
            return list(connection.execute(
                sa.select(deletion_audit).where(deletion_audit.c.bucket == bucket)
            ))


def listed_keys(client: Minio, bucket: str) -> set[str]:
    return {o.object_name for o in client.list_objects(bucket, recursive=True)}


def make_rig(s3: S3Settings, engine: sa.Engine, root: Path) -> CoreRig:
    return CoreRig(s3=s3, engine=engine, store=ManifestStore(str(root)), audit=AuditLog(engine))
