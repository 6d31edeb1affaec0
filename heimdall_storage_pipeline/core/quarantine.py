"""Quarantine: a live cleanup moves objects aside (server-side copy, then delete) instead of deleting them;
they expire after ``keep_days`` (a lifecycle rule, and the cleanup job where the server ignores it) and
``restore`` puts them back.

Each cleanup run moves under a folder of its own, ``<root>/<move id>/<key>`` (``Quarantine.location``),
so a key moved again, after a re-upload, never meets an earlier move's copy; the audit log records
every copy's location, and restore and expiry go by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
from minio import Minio
from minio.commonconfig import ENABLED, CopySource, Filter
from minio.deleteobjects import DeleteObject
from minio.error import S3Error
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

from heimdall_storage_pipeline.core.clock import ensure_utc, utc_datetimes
from heimdall_storage_pipeline.core.errors import StorageCleanupError
from heimdall_storage_pipeline.core.list_objects_v2 import ListObjectsV2
from heimdall_storage_pipeline.core.policy import Quarantine
from heimdall_storage_pipeline.core.revalidation import stat_objects
from heimdall_storage_pipeline.core.s3 import S3Settings
from heimdall_storage_pipeline.core.safety import Candidate, FreshStat

if TYPE_CHECKING:
    from heimdall_storage_pipeline.core.audit import AuditLog

COPY_THREADS = 8
# Seconds a server-side copy may go without an answer: a big object's copy answers only when done.
COPY_READ_TIMEOUT = 900.0
MAX_KEY_BYTES = 1024  # S3's limit on a key, in UTF-8 bytes


def same_content(etag: str, size: int, copied_etag: str, copied_size: int) -> bool:
    """A copy holds the object: same ETag, or, for a multipart ETag a copy may recompute, the same size."""
    etag, copied_etag = etag.strip('"'), copied_etag.strip('"')
    return etag == copied_etag or ("-" in etag and size == copied_size)


def checked_object_remains(stat: FreshStat | None, etag: str, last_modified: datetime) -> bool:
    """The checked object still sits at its key: only then is its quarantine copy a duplicate to remove."""
    # A HEAD gives Last-Modified to the second, a listing to the millisecond.
    return (stat is not None and stat.etag.strip('"') == etag.strip('"')
            and abs(ensure_utc(stat.last_modified) - ensure_utc(last_modified)) < timedelta(seconds=1))


def move_id(started: datetime, run_id: str) -> str:
    """The folder a cleanup run moves under: when it started, then its short run id (as Dagster's UI shows it),
    e.g. ``20261205T230244Z-1a2b3c4d``; folders sort by time."""
    short = "".join(c for c in run_id if c.isalnum() or c in "-_")[:8] or "run"
    return f"{ensure_utc(started):%Y%m%dT%H%M%SZ}-{short}"


def _copy_one(client: Minio, bucket: str, moved_to: Callable[[str], tuple[str, str]], candidate: Candidate
              ) -> str | None:
    where, key = moved_to(candidate.key)
    key_bytes = len(key.encode())
    if key_bytes > MAX_KEY_BYTES:
        return (f"refused: its quarantine key would be {key_bytes} bytes, over S3's limit of {MAX_KEY_BYTES} "
                f"bytes (the location adds {key_bytes - len(candidate.key.encode())}); it is left in place "
                f"(delete it by hand, or quarantine to a shorter location)")
    try:
        if _stat(client, where, key) is not None:  # the destination is this run's own: never overwrite what is there
            return (f"refused: {where}/{key} already exists, though this run's move alone should put a copy "
                    f"there; it is left as it is (look at it, then remove it by hand)")
        # Only the checked content is copied (match_etag), with its metadata (the default COPY directive).
        copied = client.copy_object(where, key, CopySource(bucket, candidate.key, match_etag=candidate.etag))
        if (copied.etag or "").strip('"') == candidate.etag.strip('"'):
            return None
        held = _stat(client, where, key)  # a multipart ETag the copy recomputed: the sizes must agree
    except S3Error as exc:
        return f"copy to quarantine failed: {exc.code}"
    except Exception as exc:  # a timeout or a dropped connection fails this key, not the run
        return f"copy to quarantine failed: {type(exc).__name__}: {str(exc)[:200]}"
    if held is None or not same_content(candidate.etag, candidate.size, held[0], held[1]):
        removed = _remove_own_copy(client, where, key)  # the destination was empty: this run wrote it
        return f"the quarantine copy's ETag {copied.etag} differs from {candidate.etag}; {removed}"
    return None


def _remove_own_copy(client: Minio, where: str, key: str) -> str:
    try:
        client.remove_object(where, key)
    except Exception as exc:  # the copy, unchecked, expires with keep_days
        return f"it could not be removed ({type(exc).__name__}) and expires after keep_days"
    return "it was removed"


def copy_to_quarantine(client: Minio, bucket: str, moved_to: Callable[[str], tuple[str, str]],
                       candidates: list[Candidate]) -> dict[str, str]:
    """Copy each candidate to its quarantine location (``moved_to``: bucket and key of an original key);
    returns ``{key: error}`` of those not copied faithfully."""
    with ThreadPoolExecutor(COPY_THREADS) as pool:
        errors = pool.map(lambda c: _copy_one(client, bucket, moved_to, c), candidates)
        return {c.key: error for c, error in zip(candidates, errors, strict=True) if error}


def discard_copies(client: Minio, locations: Iterable[tuple[str, str]]) -> None:
    """Remove quarantine copies (bucket, key) whose originals stayed: no object is kept twice."""
    by_bucket: dict[str, list[DeleteObject]] = {}
    for where, copy in locations:
        by_bucket.setdefault(where, []).append(DeleteObject(copy))
    for where, objects in by_bucket.items():
        errors = list(client.remove_objects(where, objects))
        if errors:
            raise StorageCleanupError(
                f"could not remove {len(errors)} quarantine copies in {where} whose originals stayed (first: "
                f"{errors[0].name}: {errors[0].code}); delete them by hand or let keep_days expire them"
            )


def rule_id(bucket: str) -> str:
    return f"heimdall-quarantine-{bucket}"


def _copies(page: pa.RecordBatch, where: str, audit: AuditLog) -> pa.Array:
    """Which rows of a listing of the quarantine location are copies a move made (by the audit log)."""
    keys = page.column("key").to_pylist()
    recorded = audit.quarantine_copies(where, keys)
    return pa.array([any(same_content(etag, size, listed_etag, listed_size) for etag, size in recorded.get(key, ()))
                     for key, listed_etag, listed_size in zip(keys, page.column("etag").to_pylist(),
                                                              page.column("size").to_pylist(), strict=True)],
                    pa.bool_())


def check_only_copies(settings: S3Settings, bucket: str, quarantine: Quarantine, audit: AuditLog) -> None:
    """Refuse a quarantine location that holds objects no move put there: its expiry would delete them."""
    where, prefix = quarantine.root(bucket)
    for page in ListObjectsV2(settings, where).batches(prefix=prefix):
        foreign = page.filter(pc.invert(_copies(page, where, audit)))
        if foreign.num_rows:
            raise StorageCleanupError(
                f"the quarantine location {where}/{prefix} holds {foreign.num_rows}+ objects no move put there "
                f"(first: {foreign.column('key')[0].as_py()!r}), which its expiry would delete; nothing was "
                f"moved or deleted. Point quarantine at an empty prefix or bucket, or move those objects away"
            )


def set_expiry_rule(client: Minio, bucket: str, quarantine: Quarantine) -> bool:
    """Put the lifecycle rule that expires ``bucket``'s quarantined objects, keeping the bucket's other rules.

    False when the server refuses lifecycle configuration: the cleanup job's expiry then does it alone.
    Call ``check_only_copies`` first: the rule expires whatever sits under the location.
    """
    where, prefix = quarantine.root(bucket)
    try:
        current = client.get_bucket_lifecycle(where)
    except S3Error as exc:
        if exc.code not in ("NoSuchLifecycleConfiguration", "NotImplemented"):
            raise
        current = None
    rules = [rule for rule in (current.rules if current else []) if rule.rule_id != rule_id(bucket)]
    rules.append(Rule(ENABLED, rule_filter=Filter(prefix=prefix), rule_id=rule_id(bucket),
                      expiration=Expiration(days=quarantine.keep_days)))
    try:
        client.set_bucket_lifecycle(where, LifecycleConfig(rules))
    except S3Error as exc:
        if exc.code == "NotImplemented":
            return False
        raise
    return True


@dataclass
class QuarantineFigures:
    objects: int = 0
    bytes: int = 0
    oldest: datetime | None = None  # when the oldest quarantined object was moved
    expired: int = 0  # removed by this run (or, in a dry run, due for removal)
    expired_bytes: int = 0
    foreign: int = 0  # objects under the location no move put there: left alone, not counted above
    errors: list[str] = field(default_factory=list)


def expire_and_count(settings: S3Settings, client: Minio, bucket: str, quarantine: Quarantine, now: datetime,
                     *, dry_run: bool, delete: Callable[[str, list[DeleteObject]], dict[str, object]],
                     audit: AuditLog, run_id: str, job: str) -> QuarantineFigures:
    """Remove the copies moves made ``keep_days`` ago or earlier (unless a dry run) and count the rest.

    Only objects the audit log records as a move's copy (same ETag) are touched; each removal is
    audited, as a row of the quarantine bucket.
    """
    where, prefix = quarantine.root(bucket)
    cutoff = now - timedelta(days=quarantine.keep_days)
    figures = QuarantineFigures()
    for listed in ListObjectsV2(settings, where).batches(prefix=prefix):
        copies = _copies(listed, where, audit)
        figures.foreign += listed.num_rows - (pc.sum(copies).as_py() or 0)
        page = listed.filter(copies)
        old = pc.less_equal(page.column("last_modified"), pa.scalar(cutoff, page.schema.field("last_modified").type))
        expired, kept = page.filter(old), page.filter(pc.invert(old))
        figures.expired += expired.num_rows
        figures.expired_bytes += pc.sum(expired.column("size")).as_py() or 0
        if expired.num_rows and not dry_run:
            figures.errors += _expire(where, expired, delete, audit, run_id, job, now)[:10]
        figures.objects += kept.num_rows
        figures.bytes += pc.sum(kept.column("size")).as_py() or 0
        if kept.num_rows:
            oldest = min(utc_datetimes(kept.column("last_modified")))
            figures.oldest = oldest if figures.oldest is None else min(figures.oldest, oldest)
    return figures


def _expire(where: str, expired: pa.RecordBatch, delete: Callable[[str, list[DeleteObject]], dict[str, object]],
            audit: AuditLog, run_id: str, job: str, now: datetime) -> list[str]:
    from heimdall_storage_pipeline.core.audit import Mark  # audit imports this module

    candidates = [Candidate(key, size, modified, etag) for key, size, modified, etag in zip(
        expired.column("key").to_pylist(), expired.column("size").to_pylist(),
        utc_datetimes(expired.column("last_modified")), expired.column("etag").to_pylist(), strict=True)]
    ids = audit.record_intent(run_id=run_id, job=job, bucket=where, candidates=candidates, at=now)
    errors = delete(where, [DeleteObject(c.key) for c in candidates])
    audit.finish([Mark([ids[c.key] for c in candidates if c.key not in errors], "deleted", now,
                       "quarantine copy expired after keep_days"),
                  *(Mark([ids[key]], "failed", None, f"quarantine expiry: {error}") for key, error in errors.items())],
                 intents=[min(ids.values())])
    return [f"{key}: {error}" for key, error in errors.items()]


@dataclass(frozen=True)
class Moved:
    """An object a cleanup moved to quarantine, as its audit row tells."""

    audit_id: int
    key: str
    size: int
    etag: str
    quarantine: tuple[str, str]  # bucket, key


def _stat(client: Minio, bucket: str, key: str) -> tuple[str, int] | None:
    found = stat_objects(client, bucket, [key])[key]
    return None if found is None else (found.etag, found.size)


def restore_one(client: Minio, bucket: str, moved: Moved, *, dry_run: bool,
                restored: Callable[[], None] = lambda: None, warn: Callable[[str], None] = print) -> str:
    """Put ``moved`` back under its key; returns ``restored``, ``would_restore`` or why it was refused.

    ``restored`` records the restore (before the quarantine copy is removed, so that a failed removal
    cannot leave the move looking unrestored); ``warn`` reports a copy that could not be removed.
    """
    held = _stat(client, *moved.quarantine)
    if held is None:
        return f"refused: the quarantine copy {moved.quarantine[0]}/{moved.quarantine[1]} is gone (expired?)"
    if not same_content(moved.etag, moved.size, *held):
        return f"refused: the quarantine copy's ETag {held[0]} is not the moved object's {moved.etag}"
    # Looked at last, right before the copy, so that an upload since is not overwritten.
    if _stat(client, bucket, moved.key) is not None:
        return f"refused: a newer object sits at {moved.key!r}; it is left as it is (copy the quarantined one by hand)"
    if dry_run:
        return "would_restore"
    back = client.copy_object(bucket, moved.key, CopySource(*moved.quarantine, match_etag=held[0]))
    if not same_content(moved.etag, moved.size, back.etag or "", held[1]):
        return f"failed: the restored object's ETag {back.etag} is not {moved.etag}; the quarantine copy is kept"
    restored()
    try:
        discard_copies(client, [moved.quarantine])
    except (StorageCleanupError, S3Error) as exc:
        warn(f"{moved.key}: restored, but its quarantine copy stays until keep_days: {exc}")
    return "restored"
