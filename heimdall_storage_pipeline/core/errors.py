"""Errors an operator sees: each names the problem and the fix, never a credential."""

from __future__ import annotations

import re
from typing import Any

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@", re.I)
_KEY_VALUE_SECRET = re.compile(r"(?i)(password|secret|secret_key|access_key|token)=([^\s&;]+)")


class StorageCleanupError(RuntimeError):
    """Base class for operator-facing failures of the pipeline."""


class StorageUnreachableError(StorageCleanupError):
    pass


class StorageAccessDeniedError(StorageCleanupError):
    pass


class BucketNotFoundError(StorageCleanupError):
    pass


class ReferenceDatabaseError(StorageCleanupError):
    pass


class ManifestError(StorageCleanupError):
    pass


class StaleInputError(StorageCleanupError):
    """An upstream materialization is missing, too old or taken in the wrong order."""


def database_error(engine: Any, doing: str, exc: BaseException, fix: str) -> ReferenceDatabaseError:
    """``cannot <doing> at <url without password>: <first line of the cause>; <fix>``."""
    cause = str(getattr(exc, "orig", None) or exc).strip()
    where = engine.url.render_as_string(hide_password=True)
    return ReferenceDatabaseError(
        redact(f"cannot {doing} at {where}: {cause.splitlines()[0] if cause else type(exc).__name__}; {fix}")
    )


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove passwords from URLs, ``key=value`` secrets and any known secret values."""
    text = _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)
    text = _KEY_VALUE_SECRET.sub(r"\1=***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
