"""Errors an operator sees: each names the problem and the fix, never a credential."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

if TYPE_CHECKING:  # imported where used: the diff and the listing need no database driver
    import sqlalchemy as sa

# A URL's userinfo ends at the LAST '@' before the host, whatever the password holds ('@', '/',
# ':', '#', '?'); masking up to the first '@' left the rest of such a password in messages.
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<userinfo>[^\s]*)@", re.I)
_KEY_VALUE_SECRET = re.compile(r"(?i)(password|secret|secret_key|access_key|token)=([^\s&;]+)")
# Variables whose values are secrets themselves, and those that are URLs that may hold one.
SECRET_ENV_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
URL_ENV_NAMES = ("HEIMDALL_DATABASE_URL", "HEIMDALL_AUDIT_DB_URL", "DAGSTER_PG_URL", "HEIMDALL_CELERY_BROKER",
                 "HEIMDALL_CELERY_BACKEND", "HEIMDALL_TEST_PG_URL")
# Characters a URL's structure needs a password to encode; a password holding one was written as is.
# (Not the space: SQLAlchemy renders URLs with spaces left raw and everything else encoded.)
_MUST_BE_ENCODED = set("@/:#?")


def split_url(url: str) -> tuple[str, str | None, str | None, str]:
    """``(scheme, user, password, host_and_rest)`` of ``scheme://user:password@host...``, by structure.

    The userinfo ends at the last '@'; a password holding a character that URLs must encode was
    written as is, any other one is percent-decoded (as a URL parser would).
    """
    scheme, separator, rest = url.partition("://")
    at = rest.rfind("@")
    if not separator or at < 0:
        return scheme, None, None, rest
    user, colon, password = rest[:at].partition(":")
    if not colon:
        return scheme, unquote(user), None, rest[at + 1:]
    return scheme, unquote(user), password if _MUST_BE_ENCODED & set(password) else unquote(password), rest[at + 1:]


def database_url(url: str) -> sa.URL:
    """A SQLAlchemy URL whose password is exactly the one written, however it was written."""
    import sqlalchemy as sa

    scheme, user, password, rest = split_url(url.strip())
    if user is None:
        return sa.make_url(url.strip())
    userinfo = quote(user, safe="") + ("" if password is None else ":" + quote(password, safe=""))
    return sa.make_url(f"{scheme}://{userinfo}@{rest}")


def secrets_from_env() -> tuple[str, ...]:
    """Every secret the environment holds: secret variables' values and the passwords in URL variables."""
    found = [value for name, value in os.environ.items() if value and SECRET_ENV_NAME.search(name)]
    for name in URL_ENV_NAMES:
        password = split_url(os.environ.get(name, ""))[2]
        if password:
            found.append(password)
    return tuple(found)


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


# What an operator does about a reference query's failure, by SQLSTATE.
_SOURCE_FIXES = {
    "57014": "it ran longer than the source's statement_timeout: index the column it reads, or raise "
             "statement_timeout for this source in the policy",
    "25006": "it writes or locks rows (FOR UPDATE/SHARE, a data-modifying CTE), which a read-only snapshot "
             "refuses: make it a plain SELECT in the policy",
    "42P01": "a table it reads does not exist (renamed, or in another schema?): fix the query in the policy",
    "42703": "a column it reads does not exist (renamed?): fix the query in the policy",
    "42501": "the role of HEIMDALL_DATABASE_URL may not read it: GRANT SELECT on its tables",
    "42601": "it is not valid SQL: fix the query in the policy",
}


def source_fix(code: str) -> str:
    """What to do about a reference query that failed with SQLSTATE ``code`` ('' when unknown)."""
    return _SOURCE_FIXES.get(code) or (
        "check HEIMDALL_DATABASE_URL and that the server is running" if code.startswith("08") or not code
        else "fix the query in the storage policy")


def source_error(bucket: str, source: str, doing: str, exc: BaseException, where: str) -> ReferenceDatabaseError:
    """``<doing> bucket B, source S, failed on <where>: <cause>; <what to do>``, in one line."""
    cause = getattr(exc, "orig", None) or exc
    fix = source_fix(getattr(cause, "pgcode", None) or getattr(cause, "sqlstate", None) or "")
    text = str(cause).strip()
    return ReferenceDatabaseError(redact(
        f"{doing} bucket {bucket!r}, source {source!r}, failed on {where}: "
        f"{text.splitlines()[0] if text else type(cause).__name__}; {fix}"))


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove URL passwords, ``key=value`` secrets, the environment's secrets and any ``secrets`` given."""
    for secret in sorted({*secrets, *secrets_from_env()}, key=len, reverse=True):
        if len(secret) >= 3:  # a one- or two-character "secret" would mask common text, and protects nothing
            for spelling in {secret, quote(secret, safe=""), quote(secret)}:
                text = text.replace(spelling, "***")
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['userinfo'].partition(':')[0]}:***@", text)
    return _KEY_VALUE_SECRET.sub(r"\1=***", text)
