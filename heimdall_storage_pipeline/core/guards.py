"""Refusals before a cleanup: a stale or inconsistent diff, and suspicious mass deletions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from heimdall_storage_pipeline.core.clock import as_utc, ensure_utc
from heimdall_storage_pipeline.core.errors import StaleInputError, StorageCleanupError
from heimdall_storage_pipeline.core.health import share

REFERENCE_DROP_LIMIT = 0.5  # a reference count that falls by more than half is suspicious


class GuardTrippedError(StorageCleanupError):
    """A mass-deletion guard refused the cleanup of a bucket."""


@dataclass(frozen=True)
class GuardTrip:
    name: str
    reason: str


def check_diff_usable(bucket: str, diff: dict[str, Any] | None, now: datetime, max_age: timedelta) -> None:
    """Refuse a missing diff, a diff older than ``max_age``, or one read in the wrong order."""
    if diff is None:
        raise StaleInputError(
            f"bucket {bucket!r} has no orphan_diff materialization; run storage_scan_job for it first"
        )
    listed_at = as_utc(diff["inventory_listed_at"], "inventory_listed_at")
    snapshot_at = as_utc(diff["references_snapshot_at"], "references_snapshot_at")
    if snapshot_at < listed_at:
        raise StaleInputError(
            f"the orphan_diff of {bucket!r} compares references read at {snapshot_at.isoformat()} with "
            f"a listing finished later ({listed_at.isoformat()}); run storage_scan_job for it again"
        )
    age = ensure_utc(now) - listed_at
    if age > max_age:
        raise StaleInputError(
            f"the orphan_diff of {bucket!r} is based on a listing {age} old, more than the allowed "
            f"{max_age}; run storage_scan_job for it again or raise max_diff_age_minutes"
        )


def mass_deletion_trips(
    diff: dict[str, Any], previous_referenced_count: int | None, max_delete_fraction: float
) -> list[GuardTrip]:
    """Every guard the diff trips; an empty list means the cleanup may go ahead."""
    trips: list[GuardTrip] = []
    objects, total_bytes = int(diff["object_count"]), int(diff["total_bytes"])
    eligible, eligible_bytes = int(diff["eligible_orphan_count"]), int(diff["eligible_orphan_bytes"])
    by_count, by_bytes = share(eligible, objects), share(eligible_bytes, total_bytes)
    if by_count > max_delete_fraction or by_bytes > max_delete_fraction:
        trips.append(GuardTrip(
            "max_delete_fraction",
            f"{eligible} eligible orphans are {by_count:.1%} of the objects and {by_bytes:.1%} of the "
            f"bytes, above max_delete_fraction {max_delete_fraction:.0%}",
        ))
    referenced = int(diff["referenced_count"])
    if objects > 0 and referenced == 0:
        trips.append(GuardTrip(
            "empty_reference_set",
            f"the bucket holds {objects} objects but no reference names any of them: a wrong "
            f"database, an empty restore or a renamed column?",
        ))
    if previous_referenced_count and referenced < previous_referenced_count * (1 - REFERENCE_DROP_LIMIT):
        trips.append(GuardTrip(
            "reference_drop",
            f"the reference count fell from {previous_referenced_count} to {referenced}, by more than "
            f"{REFERENCE_DROP_LIMIT:.0%} since the previous scan",
        ))
    return trips


# The guards a reviewed plan answers: the operator has seen exactly how much goes. The others signal
# a broken reference source, and a plan made from a broken snapshot is wrong however well it is read.
PLAN_ANSWERS = frozenset({"max_delete_fraction"})


def guard_verdict(trips: list[GuardTrip], allow_mass_delete: bool) -> str:
    """``pass``, ``pass: allow_mass_delete overrides <guards>`` or ``would refuse: <guard>: <figures>; ...``."""
    if not trips:
        return "pass"
    if allow_mass_delete:
        return "pass: allow_mass_delete overrides " + ", ".join(trip.name for trip in trips)
    return "would refuse: " + "; ".join(f"{trip.name}: {trip.reason}" for trip in trips)


def refusal_message(bucket: str, trips: list[GuardTrip]) -> str:
    reasons = "; ".join(f"{trip.name}: {trip.reason}" for trip in trips)
    if all(trip.name in PLAN_ANSWERS for trip in trips):
        fix = ("to delete exactly what a dry run showed, review its plan and launch with plan: <its plan_id> "
               "and dry_run: false")
    else:
        fix = ("a plan does not answer " + ", ".join(t.name for t in trips if t.name not in PLAN_ANSWERS)
               + ": check the reference source first")
    return (f"refusing to clean {bucket!r}: {reasons}. {fix[0].upper()}{fix[1:]}; allow_mass_delete: true "
            f"overrides every guard (the run records the override)")
