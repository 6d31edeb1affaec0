"""Build a snapshot of every bucket's figures from the Dagster instance.

Reads only materialization metadata and run failures through public ``DagsterInstance`` methods, so the
numbers are the pipeline's own, whichever process produced them (the predecessor's gauges lived
in another process and always read zero).
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from heimdall_storage_pipeline.core.clock import Clock, as_utc, isoformat_utc, utc_now
from heimdall_storage_pipeline.core.health import share

BUCKET_INVENTORY = dg.AssetKey("bucket_inventory")
REFERENCED_KEYS = dg.AssetKey("referenced_keys")
ORPHAN_DIFF = dg.AssetKey("orphan_diff")
ORPHAN_DELETIONS = dg.AssetKey("orphan_deletions")
STORAGE_HISTORY = dg.AssetKey("storage_history")
REPORTED_ASSETS = (BUCKET_INVENTORY, REFERENCED_KEYS, ORPHAN_DIFF, ORPHAN_DELETIONS, STORAGE_HISTORY)
# Materialized by every scan; only their latest per bucket is reported (orphan_deletions' sums need every event).
LATEST_ONLY_ASSETS = (BUCKET_INVENTORY, REFERENCED_KEYS, ORPHAN_DIFF)
RATES = ("growth_7d", "growth_30d", "inflow_7d", "inflow_30d", "inflow_norm")

JOB_NAMES = ("storage_scan_job", "delete_orphans_job", "purge_dataset_job", "prefix_cleanup_job",
             "restore_quarantined_job")
UNKNOWN = "unknown"
# Worst last: the overall status is the worst of the buckets'. A bucket never scanned ranks above
# healthy because nobody can say it is healthy.
STATUS_ORDER = ("healthy", UNKNOWN, "warning", "critical")
SKIP_REASONS = ("referenced", "missing", "changed", "young")
GIB = 1024**3  # "GB" in metric names and JSON is GiB, as in the predecessor


def to_gb(num_bytes: int) -> float:
    return num_bytes / GIB


@dataclass(frozen=True)
class Materialization:
    """One materialization of an asset partition: when it was stored and its raw metadata."""

    partition: str
    timestamp: float  # when the event was stored, epoch seconds
    metadata: Mapping[str, Any]

    def count(self, key: str) -> int | None:
        value = self.metadata.get(key)
        # bool is an int subclass; a flag is never a count.
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return int(value)

    def number(self, key: str) -> float | None:
        value = self.metadata.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value)

    def text(self, key: str) -> str | None:
        value = self.metadata.get(key)
        if isinstance(value, float):  # MetadataValue.timestamp
            return isoformat_utc(as_utc(value))
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class CleanupFigures:
    """The latest ``orphan_deletions`` run of a bucket."""

    timestamp: float
    dry_run: bool
    deleted_files: int | None
    deleted_bytes: int | None
    failed_files: int | None
    skipped_files: Mapping[str, int | None]
    refused: bool = False  # refused before deleting anything (a guard, a stale diff, a plan check)
    refusal_reason: str | None = None
    guard_verdict: str | None = None  # "pass" or "would refuse: ..." (a dry run tells what a live run would do)
    plan_id: str | None = None  # the plan a dry run made, or the one a live run applied
    quarantined_objects: int | None = None  # what sits in the bucket's quarantine after the run
    quarantined_bytes: int | None = None
    quarantine_oldest: float | None = None  # when the oldest quarantined object was moved, epoch seconds

    @property
    def would_refuse(self) -> bool:
        return (self.guard_verdict or "").startswith("would refuse")


@dataclass(frozen=True)
class BucketFigures:
    """One bucket; ``None`` means "not known", never zero."""

    name: str
    status: str
    total_objects: int | None = None
    total_bytes: int | None = None
    listed_at: str | None = None
    as_of: str | None = None
    scan_timestamp: float | None = None
    # The scan's own total, the denominator of its orphan share; the latest listing's total
    # (above) may be newer when a scan stopped after listing.
    scan_total_bytes: int | None = None
    referenced_objects: int | None = None
    orphan_files: int | None = None
    orphan_bytes: int | None = None
    orphan_share_bytes: float | None = None
    eligible_orphan_files: int | None = None
    eligible_orphan_bytes: int | None = None
    young_orphan_files: int | None = None
    dangling_references: int | None = None
    unparseable_references: int | None = None
    # A versioned bucket's bytes besides its current objects, from the latest listing.
    noncurrent_versions: int | None = None
    noncurrent_bytes: int | None = None
    delete_markers: int | None = None
    # Keys the latest full listing and the event-maintained inventory disagreed on (none: never reconciled).
    inventory_drift_keys: int | None = None
    cleanup: CleanupFigures | None = None
    deleted_files_total: int = 0
    deleted_bytes_total: int = 0


@dataclass(frozen=True)
class CapacityFigures:
    """The latest day of ``storage_history``: rates per bucket (bytes per day) and the days until full."""

    day: str
    recorded_at: float  # when that day's storage_history was recorded, epoch seconds
    rates: Mapping[str, Mapping[str, float | None]]  # bucket -> growth_7d, ..., inflow_norm
    capacity_bytes: int | None = None
    days_until_full: Mapping[str, float] = field(default_factory=dict)  # expected, earliest, latest; inf: never


@dataclass(frozen=True)
class StorageSnapshot:
    """Every bucket's figures at ``collected_at`` plus failed runs per job."""

    collected_at: datetime
    buckets: Mapping[str, BucketFigures]
    failed_runs: Mapping[str, int]
    collect_seconds: float = 0.0
    capacity: CapacityFigures | None = None

    @property
    def status(self) -> str:
        """The worst bucket's status (an overall share can never be worse than the worst)."""
        return max(
            (bucket.status for bucket in self.buckets.values()),
            key=STATUS_ORDER.index,
            default=UNKNOWN,
        )

    def to_json(self) -> dict[str, Any]:
        """The predecessor's ``/metrics/storage`` contract plus ``as_of`` and data ages."""
        known = [b for b in self.buckets.values() if b.total_bytes is not None]
        scanned = [b for b in self.buckets.values() if b.orphan_bytes is not None]
        total_bytes = sum(b.total_bytes or 0 for b in known)
        orphan_bytes = sum(b.orphan_bytes or 0 for b in scanned)
        scanned_bytes = sum(b.scan_total_bytes or 0 for b in scanned)
        return {
            "status": self.status,
            "as_of": isoformat_utc(self.collected_at),
            "total_size_gb": to_gb(total_bytes) if known else None,
            "total_orphans": sum(b.orphan_files or 0 for b in scanned) if scanned else None,
            "orphan_size_gb": to_gb(orphan_bytes) if scanned else None,
            "orphan_percentage": 100 * share(orphan_bytes, scanned_bytes) if scanned else None,
            "buckets": {name: self._bucket_json(b) for name, b in self.buckets.items()},
        }

    def _bucket_json(self, bucket: BucketFigures) -> dict[str, Any]:
        now = self.collected_at.timestamp()
        cleanup = bucket.cleanup
        return {
            "status": bucket.status,
            "size_gb": _maybe(to_gb, bucket.total_bytes),
            "total_objects": bucket.total_objects,
            "referenced_objects": bucket.referenced_objects,
            "orphans": bucket.orphan_files,
            "orphan_size_gb": _maybe(to_gb, bucket.orphan_bytes),
            "orphan_percentage": _maybe(lambda s: 100 * s, bucket.orphan_share_bytes),
            "eligible_orphans": bucket.eligible_orphan_files,
            "eligible_orphan_size_gb": _maybe(to_gb, bucket.eligible_orphan_bytes),
            "young_orphans": bucket.young_orphan_files,
            "dangling_references": bucket.dangling_references,
            "unparseable_references": bucket.unparseable_references,
            "listed_at": bucket.listed_at,
            "as_of": bucket.as_of,
            "last_scan_at": _maybe(_iso, bucket.scan_timestamp),
            "data_age_seconds": _maybe(lambda t: max(0.0, now - t), bucket.scan_timestamp),
            "last_cleanup_at": _maybe(_iso, cleanup.timestamp if cleanup else None),
            "last_cleanup_dry_run": cleanup.dry_run if cleanup else None,
            "last_cleanup_refused": cleanup.refused if cleanup else None,
            "last_cleanup_refusal_reason": cleanup.refusal_reason if cleanup else None,
            "last_cleanup_guard_verdict": cleanup.guard_verdict if cleanup else None,
            "last_plan_id": cleanup.plan_id if cleanup else None,
            "noncurrent_versions": bucket.noncurrent_versions,
            "noncurrent_size_gb": _maybe(to_gb, bucket.noncurrent_bytes),
            "delete_markers": bucket.delete_markers,
            "quarantined_objects": cleanup.quarantined_objects if cleanup else None,
            "quarantined_size_gb": _maybe(to_gb, cleanup.quarantined_bytes if cleanup else None),
            "quarantine_oldest_at": _maybe(_iso, cleanup.quarantine_oldest if cleanup else None),
            "deleted_files_total": bucket.deleted_files_total,
            "deleted_size_gb_total": to_gb(bucket.deleted_bytes_total),
        }


def _maybe(fn: Any, value: Any) -> Any:
    return None if value is None else fn(value)


def _iso(timestamp: float) -> str:
    return isoformat_utc(datetime.fromtimestamp(timestamp, UTC))


def _to_materialization(record: dg.EventLogRecord) -> Materialization | None:
    event = record.asset_materialization
    if event is None or event.partition is None:
        return None
    return Materialization(
        partition=event.partition,
        timestamp=record.timestamp,
        metadata={key: value.value for key, value in event.metadata.items()},
    )


def latest_capacity(days: Mapping[str, Materialization]) -> CapacityFigures | None:
    """The newest day's storage_history (not the last one recorded: a backfill records old days)."""
    if not days:
        return None
    day = max(days)
    found = days[day]
    trends = found.metadata.get("trends")
    rates = {
        str(record.data["bucket"]): {name: record.data.get(name) for name in RATES}
        for record in getattr(trends, "records", [])
        if record.data.get("bucket") != "total"
    }
    days = {}
    if found.count("free_bytes") is not None:  # a forecast was made: a missing figure means "never"
        for estimate, key in (("expected", "days_until_full"), ("earliest", "days_until_full_earliest"),
                              ("latest", "days_until_full_latest")):
            value = found.number(key)
            days[estimate] = math.inf if value is None else value
    return CapacityFigures(day=day, recorded_at=found.timestamp, rates=rates,
                           capacity_bytes=found.count("capacity_bytes"), days_until_full=days)


@dataclass
class InstanceHistory:
    """What the exporter knows of the instance, kept incrementally with storage-id cursors so that a
    scrape reads only the events stored since the last one (public ``DagsterInstance`` methods only):

    - the latest materialization of each partition of each asset it reports;
    - deleted files and bytes per bucket, summed over every non-dry-run ``orphan_deletions``
      (cleanups and purges alike);
    - failed runs per job, counted from the run failure events.

    Given the buckets to report, the first refresh of a scan asset (``LATEST_ONLY_ASSETS``) reads
    its history newest first and stops once each of those buckets has its latest materialization
    (or the history ends), so its cost follows the number of buckets, not the length of the history.
    A bucket outside that set is kept only if its latest was among the events read.

    Seam: the deletion audit table (``core/audit.py``) is the record of every deletion, but it
    lives in the reference database, whose credentials the exporter does not hold; to count from
    it, replace the deletion sums with one of its ``deleted`` rows per bucket.
    """

    page_size: int = 1000
    latest: dict[dg.AssetKey, dict[str, Materialization]] = field(default_factory=lambda: defaultdict(dict))
    files: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failed_runs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(JOB_NAMES, 0))
    _cursors: dict[Any, int | None] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def refresh(self, instance: dg.DagsterInstance, buckets: Iterable[str] = ()) -> None:
        """Read what was stored since the last refresh; ``buckets``: the buckets to report, if known."""
        wanted = frozenset(buckets)
        with self._lock:
            for asset_key in REPORTED_ASSETS:
                if wanted and asset_key in LATEST_ONLY_ASSETS and self._cursors.get(asset_key) is None:
                    self._read_latest(instance, asset_key, wanted)
                    continue
                for record in self._new(instance, asset_key):
                    found = _to_materialization(record)
                    if found is not None:
                        self.latest[asset_key][found.partition] = found
                        if asset_key == ORPHAN_DELETIONS:
                            self._add_deletions(found)
            for record in self._new(instance, dg.DagsterEventType.RUN_FAILURE):
                job = record.event_log_entry.job_name
                if job in self.failed_runs:
                    self.failed_runs[job] += 1

    def _read_latest(self, instance: dg.DagsterInstance, asset_key: dg.AssetKey, buckets: frozenset[str]) -> None:
        """The first read of ``asset_key``: newest first, until every one of ``buckets`` has its latest
        or the history ends; then the cursor is the newest event, for ``_new`` to go on from."""
        latest = self.latest[asset_key]
        seen: set[str] = set()  # first seen in this read wins: it is the newest
        newest: int | None = None
        cursor: str | None = None
        # A scan materializes every bucket, so the newest 2 per bucket usually hold all; pages double after.
        limit = min(self.page_size, max(2 * len(buckets), 16))
        while True:
            result = instance.fetch_materializations(asset_key, limit=limit, cursor=cursor, ascending=False)
            for record in result.records:
                newest = record.storage_id if newest is None else max(newest, record.storage_id)
                found = _to_materialization(record)
                if found is not None and found.partition not in seen:
                    seen.add(found.partition)
                    latest[found.partition] = found
            if buckets <= seen or not result.has_more or not result.records:
                break
            cursor = result.cursor
            limit = min(self.page_size, 2 * limit)
        # Set only once the read is complete: a failed read starts again from the newest next time.
        if newest is not None:
            self._cursors[asset_key] = newest

    def _new(self, instance: dg.DagsterInstance, source: Any) -> Iterator[dg.EventLogRecord]:
        """The records of ``source`` (an asset key or a run status) stored since the last refresh."""
        while True:
            after = self._cursors.get(source)
            if isinstance(source, dg.AssetKey):
                result = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=source, after_storage_id=after),
                    limit=self.page_size, ascending=True)
            else:
                result = instance.fetch_run_status_changes(
                    dg.RunStatusChangeRecordsFilter(event_type=source, after_storage_id=after),
                    limit=self.page_size, ascending=True)
            for record in result.records:
                yield record
                self._cursors[source] = record.storage_id
            if not result.has_more or not result.records:
                return

    def _add_deletions(self, run: Materialization) -> None:
        # A dry run deleted nothing, whatever it would have.
        if run.metadata.get("dry_run", False) is not False:
            return
        self.files[run.partition] += run.count("deleted_count") or 0
        self.bytes[run.partition] += run.count("deleted_bytes") or 0


def collect_storage_snapshot(
    instance: dg.DagsterInstance,
    buckets: Iterable[str] = (),
    history: InstanceHistory | None = None,
    clock: Clock = utc_now,
) -> StorageSnapshot:
    """Every bucket's figures from the latest materializations.

    ``buckets`` adds buckets that may never have been scanned (the policy's); they are reported
    with status ``unknown`` and no figures; given them, the first read of the scan assets stops once
    each has its latest (``InstanceHistory``). Pass a long-lived ``history`` so that each call reads
    only what was stored since the previous one.
    """
    started = clock()
    buckets = tuple(buckets)
    history = history if history is not None else InstanceHistory()
    history.refresh(instance, buckets)
    inventories, references, diffs, cleanups = (dict(history.latest[key]) for key in REPORTED_ASSETS[:4])
    failed_runs = dict(history.failed_runs)
    names = sorted(set(buckets) | set(inventories) | set(diffs))
    figures = {
        name: _bucket_figures(
            name,
            inventories.get(name),
            references.get(name),
            diffs.get(name),
            cleanups.get(name),
            history,
        )
        for name in names
    }
    capacity = latest_capacity(dict(history.latest[STORAGE_HISTORY]))
    finished = clock()
    return StorageSnapshot(
        collected_at=finished,
        buckets=figures,
        failed_runs=failed_runs,
        collect_seconds=(finished - started).total_seconds(),
        capacity=capacity,
    )


def _bucket_figures(
    name: str,
    inventory: Materialization | None,
    references: Materialization | None,
    diff: Materialization | None,
    cleanup: Materialization | None,
    history: InstanceHistory,
) -> BucketFigures:
    status = UNKNOWN
    if diff is not None and diff.text("health_status") in STATUS_ORDER:
        status = diff.text("health_status") or UNKNOWN
    return BucketFigures(
        name=name,
        status=status,
        total_objects=inventory.count("object_count") if inventory else None,
        total_bytes=inventory.count("total_bytes") if inventory else None,
        listed_at=inventory.text("listed_at") if inventory else None,
        **({name: inventory.count(name) for name in ("noncurrent_versions", "noncurrent_bytes", "delete_markers")}
           if inventory else {}),
        inventory_drift_keys=inventory.count("drift_count") if inventory else None,
        unparseable_references=references.count("unparseable_reference_count") if references else None,
        cleanup=_cleanup_figures(cleanup) if cleanup else None,
        deleted_files_total=history.files.get(name, 0),
        deleted_bytes_total=history.bytes.get(name, 0),
        **(_scan_fields(diff) if diff else {}),
    )


def _scan_fields(diff: Materialization) -> dict[str, Any]:
    return {
        "as_of": diff.text("as_of"),
        "scan_timestamp": diff.timestamp,
        "scan_total_bytes": diff.count("total_bytes"),
        "referenced_objects": diff.count("referenced_count"),
        "orphan_files": diff.count("orphan_count"),
        "orphan_bytes": diff.count("orphan_bytes"),
        "orphan_share_bytes": diff.number("orphan_share_bytes"),
        "eligible_orphan_files": diff.count("eligible_orphan_count"),
        "eligible_orphan_bytes": diff.count("eligible_orphan_bytes"),
        "young_orphan_files": diff.count("young_orphan_count"),
        "dangling_references": diff.count("dangling_reference_count"),
    }


def _cleanup_figures(run: Materialization) -> CleanupFigures:
    return CleanupFigures(
        timestamp=run.timestamp,
        dry_run=run.metadata.get("dry_run") is True,
        deleted_files=run.count("deleted_count"),
        deleted_bytes=run.count("deleted_bytes"),
        failed_files=run.count("failed_count"),
        skipped_files={reason: run.count(f"skipped_{reason}") for reason in SKIP_REASONS},
        refused=run.metadata.get("refused") is True,
        refusal_reason=run.text("refusal_reason"),
        guard_verdict=run.text("guard_verdict"),
        plan_id=run.text("plan_id"),
        quarantined_objects=run.count("quarantined_objects"),
        quarantined_bytes=run.count("quarantined_bytes"),
        quarantine_oldest=run.number("quarantine_oldest"),
    )


def check_instance(instance: dg.DagsterInstance) -> None:
    """Raise unless both the run storage and the event log of the instance answer."""
    instance.get_run_records(limit=1)
    instance.fetch_materializations(ORPHAN_DIFF, limit=1)
