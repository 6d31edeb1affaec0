"""The one decision on whether an object may be deleted now.

The scan, the deletion job, the purge job and the event-driven cleanup all call
``deletion_verdict``; none re-implements it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from heimdall_storage_pipeline.core.clock import ensure_utc


class Outcome(StrEnum):
    DELETED = "deleted"
    WOULD_DELETE = "would_delete"
    SKIPPED_REFERENCED = "skipped_referenced"
    SKIPPED_MISSING = "skipped_missing"
    SKIPPED_CHANGED = "skipped_changed"
    SKIPPED_YOUNG = "skipped_young"
    FAILED = "failed"


SKIP_OUTCOMES = (
    Outcome.SKIPPED_REFERENCED,
    Outcome.SKIPPED_MISSING,
    Outcome.SKIPPED_CHANGED,
    Outcome.SKIPPED_YOUNG,
)


@dataclass(frozen=True)
class Candidate:
    """An object as the scan saw it."""

    key: str
    size: int
    last_modified: datetime
    etag: str
    version_ids: tuple[str, ...] = ()  # on a versioned bucket: every version the delete removes


@dataclass(frozen=True)
class FreshStat:
    """The object as the server reports it just before deletion."""

    size: int
    last_modified: datetime
    etag: str


def age_cutoff(now: datetime, min_age: timedelta) -> datetime:
    """Objects last modified at or before this moment are old enough (age >= min_age)."""
    return ensure_utc(now) - min_age


def same_second(a: datetime, b: datetime) -> bool:
    # A listing may carry milliseconds while HEAD's Last-Modified has whole seconds.
    return ensure_utc(a).replace(microsecond=0) == ensure_utc(b).replace(microsecond=0)


def deletion_verdict(
    candidate: Candidate,
    *,
    referenced_now: bool,
    stat: FreshStat | None,
    min_age: timedelta,
    now: datetime,
    age_exempt: bool = False,
) -> Outcome | None:
    """``None`` when ``candidate`` may be deleted now, else the reason to skip it.

    ``age_exempt`` is only for objects whose owner is known to be deleted (a purged
    dataset's prefix); everything else must be at least ``min_age`` old right now.
    """
    if referenced_now:
        return Outcome.SKIPPED_REFERENCED
    if stat is None:
        return Outcome.SKIPPED_MISSING
    if stat.etag.strip('"') != candidate.etag.strip('"') or not same_second(
        stat.last_modified, candidate.last_modified
    ):
        return Outcome.SKIPPED_CHANGED
    if not age_exempt and ensure_utc(stat.last_modified) > age_cutoff(now, min_age):
        return Outcome.SKIPPED_YOUNG
    return None
