"""Resources: S3, the reference database, the manifest store and the storage policy."""

import os
from pathlib import Path

import dagster as dg
from pydantic import Field
from sqlalchemy.engine import Engine

from heimdall_storage_pipeline.core.audit import AuditLog
from heimdall_storage_pipeline.core.errors import ManifestError
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.policy import StoragePolicy, load_policy
from heimdall_storage_pipeline.core.references import make_engine
from heimdall_storage_pipeline.core.s3 import S3Settings

_TRUE = {"1", "true", "yes", "on"}


class S3Resource(dg.ConfigurableResource):
    """The object store (MinIO in production), configured from MINIO_* variables."""

    endpoint: str = Field(description="host:port of the S3 API (MINIO_ENDPOINT)")
    access_key: str = Field(description="MINIO_ACCESS_KEY")
    secret_key: str = Field(description="MINIO_SECRET_KEY")
    secure: str = Field(default="false", description="use HTTPS (MINIO_SECURE, default false)")
    region: str = Field(default="", description="MINIO_REGION, optional")
    max_connections: int = Field(default=16, description="HTTP connection pool size")

    def settings(self) -> S3Settings:
        return S3Settings(
            endpoint=self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=self.secure.strip().lower() in _TRUE,
            region=self.region or None,
            max_connections=self.max_connections,
        )


class ReferenceDatabaseResource(dg.ConfigurableResource):
    """The application database whose rows reference objects; used read-only."""

    url: str = Field(description="SQLAlchemy URL (HEIMDALL_DATABASE_URL)")

    def engine(self) -> Engine:
        return make_engine(self.url)


class ManifestStoreResource(dg.ConfigurableResource):
    """Where Parquet manifests go: a directory (default $DAGSTER_HOME/manifests) or s3://bucket/prefix."""

    root: str = Field(default="", description="HEIMDALL_MANIFEST_ROOT; empty means $DAGSTER_HOME/manifests")
    s3: S3Resource

    def store(self) -> ManifestStore:
        root = self.root or default_manifest_root()
        return ManifestStore(root=root, s3=self.s3.settings() if root.startswith("s3://") else None)


def default_manifest_root() -> str:
    return str(Path(os.environ.get("DAGSTER_HOME") or Path.cwd()).resolve() / "manifests")


def manifest_store_from_env() -> ManifestStore:
    """The manifest store the jobs use, for tools outside a run (HEIMDALL_MANIFEST_ROOT, MINIO_*)."""
    root = os.environ.get("HEIMDALL_MANIFEST_ROOT") or default_manifest_root()
    if not root.startswith("s3://"):
        return ManifestStore(root=root)
    missing = [name for name in ("MINIO_ENDPOINT", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY") if not os.environ.get(name)]
    if missing:
        raise ManifestError(f"the manifest store {root} is on S3 and {', '.join(missing)} is not set; set it")
    return ManifestStore(root=root, s3=S3Settings(
        endpoint=os.environ["MINIO_ENDPOINT"], access_key=os.environ["MINIO_ACCESS_KEY"],
        secret_key=os.environ["MINIO_SECRET_KEY"],
        secure=os.environ.get("MINIO_SECURE", "false").strip().lower() in _TRUE,
        region=os.environ.get("MINIO_REGION") or None,
    ))


class StoragePolicyResource(dg.ConfigurableResource):
    """The storage policy file (HEIMDALL_STORAGE_POLICY, default: the shipped Heimdall policy)."""

    path: str = Field(default="", description="policy YAML path; empty means the shipped policy")

    def load(self) -> StoragePolicy:
        return load_policy(self.path or None)


class AuditDatabaseResource(dg.ConfigurableResource):
    """Where deletions are recorded: HEIMDALL_AUDIT_DB_URL, else the Dagster instance's database."""

    url: str = Field(description="SQLAlchemy URL of the audit database")

    def audit_log(self) -> AuditLog:
        return AuditLog(make_engine(self.url))


def _optional_env(name: str, default: str) -> str | dg.EnvVar:
    return dg.EnvVar(name) if os.environ.get(name) else default


def resources_from_env(policy_path: str) -> dict[str, dg.ConfigurableResource]:
    s3 = S3Resource(
        endpoint=dg.EnvVar("MINIO_ENDPOINT"),
        access_key=dg.EnvVar("MINIO_ACCESS_KEY"),
        secret_key=dg.EnvVar("MINIO_SECRET_KEY"),
        secure=_optional_env("MINIO_SECURE", "false"),
        region=_optional_env("MINIO_REGION", ""),
    )
    return {
        "s3": s3,
        "reference_db": ReferenceDatabaseResource(url=dg.EnvVar("HEIMDALL_DATABASE_URL")),
        "manifests": ManifestStoreResource(root=_optional_env("HEIMDALL_MANIFEST_ROOT", ""), s3=s3),
        "policy": StoragePolicyResource(path=policy_path),
        "audit_db": AuditDatabaseResource(
            url=dg.EnvVar("HEIMDALL_AUDIT_DB_URL" if os.environ.get("HEIMDALL_AUDIT_DB_URL") else "DAGSTER_PG_URL")
        ),
    }


def explicit_resources(
    s3: S3Settings, database_url: str, manifest_root: str, policy_path: str, audit_url: str | None = None
) -> dict[str, dg.ConfigurableResource]:
    """The same resources with values given directly (tests, benchmarks, tools) instead of env."""
    s3_resource = S3Resource(
        endpoint=s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        secure="true" if s3.secure else "false",
        region=s3.region or "",
    )
    return {
        "s3": s3_resource,
        "reference_db": ReferenceDatabaseResource(url=database_url),
        "manifests": ManifestStoreResource(root=manifest_root, s3=s3_resource),
        "policy": StoragePolicyResource(path=policy_path),
        "audit_db": AuditDatabaseResource(url=audit_url or database_url),
    }
