"""Plans: a dry run's would-delete list, reviewed, then applied by the one live run that names it.

A dry run of a bucket is a plan: its deletions manifest (the ``would_delete`` rows: key, size,
etag, last_modified) with an id, counts, bytes and the manifest's SHA-256, recorded in the dry
run's ``orphan_deletions`` metadata. A live run that names the plan deletes only its keys, each
re-validated as always. ``check_applicable`` says why a plan may not be applied.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from heimdall_storage_pipeline.core.clock import as_utc, ensure_utc
from heimdall_storage_pipeline.core.deletion import manifest_candidates
from heimdall_storage_pipeline.core.diff import AGE_BIN_LABELS, AGE_BINS_DAYS
from heimdall_storage_pipeline.core.errors import StorageCleanupError
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.safety import Candidate, Outcome

# <bucket>:<the dry run's run id, first 8 hex digits>; a bucket name holds no ':'.
_PLAN_ID = re.compile(r"^(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]):(?P<run>[0-9a-f]{8})$")
LARGEST_SHOWN = 10


class PlanRefusedError(StorageCleanupError):
    """A plan that may not be applied: unknown, of another bucket, too old, superseded or applied."""


def plan_id_for(bucket: str, run_id: str) -> str:
    return f"{bucket}:{run_id[:8]}"


def plan_bucket(plan_id: str) -> str:
    """The bucket a plan id names; refuses anything that is not a plan id."""
    match = _PLAN_ID.match(plan_id.strip())
    if not match:
        raise PlanRefusedError(
            f"{plan_id!r} is not a plan id; copy plan_id from the dry run's orphan_deletions metadata "
            f"(it looks like 'heimdall-raw-iq:1a2b3c4d')"
        )
    return match.group("bucket")


@dataclass(frozen=True)
class Plan:
    """What a dry run recorded about its plan."""

    plan_id: str
    bucket: str
    manifest_uri: str
    digest: str
    keys: int
    bytes: int
    created_at: datetime
    diff_manifest_uri: str

    @classmethod
    def from_metadata(cls, plan_id: str, metadata: dict[str, Any]) -> Plan:
        return cls(
            plan_id=plan_id,
            bucket=plan_bucket(plan_id),
            manifest_uri=str(metadata["manifest_uri"]),
            digest=str(metadata["plan_digest"]),
            keys=int(metadata["would_delete_count"]),
            bytes=int(metadata["would_delete_bytes"]),
            created_at=as_utc(metadata["completed_at"], "completed_at"),
            diff_manifest_uri=str(metadata["diff_manifest_uri"]),
        )


def check_applicable(plan: Plan, *, latest_diff_manifest_uri: str, now: datetime, max_age: timedelta,
                     digest: str) -> None:
    """Refuse a plan made from a superseded diff, older than ``max_age``, or whose manifest changed."""
    age = ensure_utc(now) - plan.created_at
    if age > max_age:
        raise PlanRefusedError(
            f"plan {plan.plan_id} is {age} old, more than max_plan_age_minutes allows ({max_age}); "
            f"run a dry run for {plan.bucket} again and apply its new plan"
        )
    if plan.diff_manifest_uri != latest_diff_manifest_uri:
        raise PlanRefusedError(
            f"plan {plan.plan_id} was made from an orphan_diff that is no longer the latest of {plan.bucket} "
            f"(a scan ran since); review the dry run of the latest diff and apply its plan"
        )
    if digest != plan.digest:
        raise PlanRefusedError(
            f"the manifest of plan {plan.plan_id} ({plan.manifest_uri}) is not the one that was reviewed "
            f"(its SHA-256 changed); run a dry run again and review its plan"
        )


def plan_candidates(store: ManifestStore, manifest_uri: str, max_objects: int | None = None) -> Iterator[Candidate]:
    """A plan's keys, each with the size, ETag and last-modified the dry run saw, streamed."""
    return manifest_candidates(store, manifest_uri, "outcome",
                               lambda outcome: pc.equal(outcome, Outcome.WOULD_DELETE.value), max_objects)


@dataclass(frozen=True)
class PlanSummary:
    """What a reviewer looks at besides the counts: the largest keys and the ages."""

    largest: list[Candidate]
    age_histogram: list[tuple[str, int, int]]  # (label, objects, bytes)


def summarize_plan(store: ManifestStore, manifest_uri: str, now: datetime) -> PlanSummary:
    """The largest would-delete keys and their age histogram at ``now``, one streamed, vectorised pass."""
    largest: pa.Table | None = None
    counts = np.zeros(len(AGE_BINS_DAYS) + 1, np.int64)
    sizes = np.zeros(len(AGE_BINS_DAYS) + 1, np.int64)
    now_us = int(ensure_utc(now).timestamp() * 1_000_000)
    for batch in store.iter_batches(manifest_uri, columns=["key", "size", "last_modified", "etag", "outcome"]):
        rows = pa.Table.from_batches([batch]).filter(pc.equal(batch.column("outcome"), Outcome.WOULD_DELETE.value))
        if rows.num_rows == 0:
            continue
        pool = rows if largest is None else pa.concat_tables([largest, rows])
        largest = pool.take(pc.select_k_unstable(pool, min(LARGEST_SHOWN, pool.num_rows), [("size", "descending")]))
        days = (now_us - rows.column("last_modified").cast(pa.int64()).to_numpy()) // 86_400_000_000
        slots = np.searchsorted(AGE_BINS_DAYS, days, side="right")
        np.add.at(counts, slots, 1)
        np.add.at(sizes, slots, rows.column("size").to_numpy())
    ordered = [] if largest is None else largest.sort_by([("size", "descending"), ("key", "descending")]).to_pylist()
    return PlanSummary(
        largest=[Candidate(r["key"], r["size"], ensure_utc(r["last_modified"]), r["etag"]) for r in ordered],
        age_histogram=[(label, int(count), int(size))
                       for label, count, size in zip(AGE_BIN_LABELS, counts, sizes, strict=True)],
    )


def write_plan_csv(store: ManifestStore, plan: Plan, out: TextIO) -> int:
    """Write the plan's keys as CSV (key, size, etag, last_modified); returns the row count."""
    writer = csv.writer(out)
    writer.writerow(["key", "size", "etag", "last_modified"])
    rows = 0
    for candidate in plan_candidates(store, plan.manifest_uri):
        writer.writerow([candidate.key, candidate.size, candidate.etag, candidate.last_modified.isoformat()])
        rows += 1
    return rows
