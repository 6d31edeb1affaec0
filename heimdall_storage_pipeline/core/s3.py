"""S3 access: one client factory and one translation of failures into operator errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import urllib3

from heimdall_storage_pipeline.core.errors import (
    BucketNotFoundError,
    StorageAccessDeniedError,
    StorageCleanupError,
    StorageUnreachableError,
    redact,
)

if TYPE_CHECKING:  # imported where used: the manifests and the diff need no S3 client
    from minio import Minio

_DENIED_CODES = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken"}


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # host:port, as MINIO_ENDPOINT
    access_key: str
    secret_key: str
    secure: bool = False
    region: str | None = None
    max_connections: int = 16

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    def __repr__(self) -> str:  # never print the credentials
        return f"S3Settings(endpoint={self.endpoint_url!r})"


def http_pool(settings: S3Settings, retries: int = 3, read_timeout: float = 120.0) -> urllib3.PoolManager:
    """Connections for the threads that use them; every request has a time limit and bounded retries."""
    return urllib3.PoolManager(
        maxsize=settings.max_connections,
        timeout=urllib3.Timeout(connect=5.0, read=read_timeout),
        retries=urllib3.Retry(
            total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
        ),
    )


def make_client(settings: S3Settings, retries: int = 3, read_timeout: float = 120.0) -> Minio:
    """A minio client on ``http_pool``."""
    from minio import Minio

    return Minio(
        settings.endpoint,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        secure=settings.secure,
        region=settings.region or None,
        http_client=http_pool(settings, retries, read_timeout),
    )


def missing_bucket_error(settings: S3Settings, bucket: str) -> BucketNotFoundError:
    return BucketNotFoundError(
        f"bucket {bucket!r} does not exist on {settings.endpoint_url}; create it, fix its "
        f"name in the storage policy, or set 'enabled: false' for it"
    )


@contextmanager
def s3_errors(settings: S3Settings, bucket: str) -> Iterator[None]:
    """Turn S3 and connection failures into errors that name the bucket, endpoint and fix."""
    from minio.error import S3Error

    secrets = (settings.secret_key, settings.access_key)
    try:
        yield
    except S3Error as exc:
        if exc.code == "NoSuchBucket":
            raise missing_bucket_error(settings, bucket) from None
        if exc.code in _DENIED_CODES:
            raise StorageAccessDeniedError(
                f"{settings.endpoint_url} refused the credentials for bucket {bucket!r} ({exc.code}); "
                f"check MINIO_ACCESS_KEY and MINIO_SECRET_KEY and the key's permissions"
            ) from None
        raise StorageCleanupError(
            redact(f"S3 request on bucket {bucket!r} at {settings.endpoint_url} failed: "
                   f"{exc.code}: {exc.message}", secrets)
        ) from None
    except (urllib3.exceptions.HTTPError, ConnectionError) as exc:
        raise StorageUnreachableError(
            redact(f"cannot reach the S3 server at {settings.endpoint_url} for bucket {bucket!r} "
                   f"({type(exc).__name__}: {exc}); check MINIO_ENDPOINT and MINIO_SECURE and "
                   f"that the server is running", secrets)
        ) from None
