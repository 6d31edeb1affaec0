"""Prometheus metrics computed at scrape time from a storage snapshot (short cache)."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import dagster as dg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from heimdall_storage_pipeline.core.errors import redact
from heimdall_storage_pipeline.exporter.state import (
    STATUS_ORDER,
    BucketFigures,
    InstanceHistory,
    StorageSnapshot,
    check_instance,
    collect_storage_snapshot,
    to_gb,
)

_GB = "in GB (GiB: 1024^3 bytes, as the predecessor)"
log = logging.getLogger(__name__)
_MAX_REASON = 500
_UNSET_VARIABLE = re.compile(r'environment variable "([^"]+)" which is not set')
DEFAULT_TIMEOUT_SECONDS = 5.0  # below prometheus.yml's scrape_timeout (10 s)
T = TypeVar("T")


class InstanceUnavailable(RuntimeError):
    """The Dagster instance could not be opened or read; the message is safe to show."""


def _first_line(exc: BaseException) -> str:
    line = (str(exc).strip().splitlines() or [""])[0]
    # SQLAlchemy appends the statement and its parameters; they are noise here.
    return f"{type(exc).__name__}: {line.split('[SQL:', 1)[0].strip()}"


def describe_failure(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """One short, credential-free line for ``/healthz`` and logs, naming the root cause."""
    unset = _UNSET_VARIABLE.search(str(exc))
    if isinstance(exc, dg.DagsterInvalidConfigError) and unset:
        # Dagster's own message is the repr of its config schema; the variable is what matters.
        return f"{unset.group(1)} is not set; dagster.yaml reads it"
    reason = _first_line(exc)
    root = exc
    # Dagster wraps the driver's error ("too many retries"); the cause says what is wrong.
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    if root is not exc:
        reason = f"{reason} ({_first_line(root)})"
    return redact(reason, secrets)[:_MAX_REASON]


def _log_failure(future: Future[Any]) -> None:
    # Logged here, once per attempt, because the caller may have stopped waiting for it.
    exc = future.exception()
    if isinstance(exc, InstanceUnavailable):
        log.warning("%s", exc)
    elif exc is not None:
        log.warning("reading the Dagster instance failed: %s", type(exc).__name__)


class _SingleFlight(Generic[T]):
    """Runs ``fn`` in a background thread, one call at a time; callers wait up to a deadline.

    Dagster's PostgreSQL storage retries a lost connection for about 12 s before it gives up;
    a probe or a scrape must answer sooner, and must not pile up more attempts meanwhile.
    """

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._fn = fn
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._future: Future[T] | None = None
        self._lock = threading.Lock()

    def run(self, timeout: float) -> T:
        with self._lock:
            if self._future is None or self._future.done():
                self._future = self._executor.submit(self._fn)
                self._future.add_done_callback(_log_failure)
            future = self._future
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            raise InstanceUnavailable(
                f"the Dagster instance did not answer within {timeout:g} s (still trying)"
            ) from None


class InstanceProvider:
    """Opens the instance on first use and again after a failed open (database down at start)."""

    def __init__(
        self,
        factory: Callable[[], dg.DagsterInstance],
        secrets: tuple[str, ...] = (),
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self._factory = factory
        self._secrets = secrets
        self._timeout = timeout_seconds
        self._instance: dg.DagsterInstance | None = None
        self._lock = threading.Lock()
        self._check = _SingleFlight(self._open_and_check, "heimdall-exporter-health")

    @property
    def timeout_seconds(self) -> float:
        return self._timeout

    def get(self) -> dg.DagsterInstance:
        with self._lock:
            if self._instance is None:
                try:
                    self._instance = self._factory()
                except Exception as exc:
                    raise InstanceUnavailable(f"cannot open the Dagster instance: {self.describe(exc)}") from None
            return self._instance

    def describe(self, exc: BaseException) -> str:
        return describe_failure(exc, self._secrets)

    def check(self) -> None:
        """Raise ``InstanceUnavailable`` unless the instance answers a read in time."""
        self._check.run(self._timeout)

    def _open_and_check(self) -> None:
        instance = self.get()
        try:
            check_instance(instance)
        except Exception as exc:
            raise InstanceUnavailable(f"cannot read the Dagster instance: {self.describe(exc)}") from None


class SnapshotSource:
    """Builds snapshots on demand, reusing one for ``ttl_seconds`` so that concurrent scrapes
    (Prometheus, a dashboard, ``/metrics/storage``) cost one read of the instance."""

    def __init__(
        self,
        provider: InstanceProvider,
        buckets: Sequence[str] = (),
        ttl_seconds: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._provider = provider
        self._buckets = tuple(buckets)
        self._ttl = ttl_seconds
        self._monotonic = monotonic
        self._history = InstanceHistory()
        self._cached: tuple[float, StorageSnapshot] | None = None
        self._lock = threading.Lock()
        self._collect = _SingleFlight(self._read, "heimdall-exporter-collect")

    def get(self) -> StorageSnapshot:
        with self._lock:
            if self._cached is not None and self._monotonic() - self._cached[0] < self._ttl:
                return self._cached[1]
        return self._collect.run(self._provider.timeout_seconds)

    def _read(self) -> StorageSnapshot:
        instance = self._provider.get()
        started = self._monotonic()
        try:
            snapshot = collect_storage_snapshot(instance, self._buckets, self._history)
        except Exception as exc:
            raise InstanceUnavailable(f"cannot read the Dagster instance: {self._provider.describe(exc)}") from None
        with self._lock:
            self._cached = (started, snapshot)
        return snapshot


def _per_bucket(
    name: str,
    documentation: str,
    buckets: Sequence[BucketFigures],
    value: Callable[[BucketFigures], float | None],
) -> GaugeMetricFamily:
    # A figure that is not known is left out, never exported as zero.
    family = GaugeMetricFamily(name, documentation, labels=["bucket"])
    for bucket in buckets:
        figure = value(bucket)
        if figure is not None:
            family.add_metric([bucket.name], figure)
    return family


def _gb(num_bytes: int | None) -> float | None:
    return None if num_bytes is None else to_gb(num_bytes)


def snapshot_metrics(snapshot: StorageSnapshot) -> list[Metric]:
    """Every metric family of a snapshot."""
    buckets = list(snapshot.buckets.values())

    def gauge(name: str, documentation: str, value: Callable[[BucketFigures], float | None]) -> GaugeMetricFamily:
        return _per_bucket(name, documentation, buckets, value)

    health = GaugeMetricFamily(
        "heimdall_storage_health_status",
        "1 for the bucket's current health (healthy below 10 % orphaned bytes, warning 10-25 %, "
        "critical above 25 %; unknown when never scanned), 0 for the other states.",
        labels=["bucket", "status"],
    )
    skipped = GaugeMetricFamily(
        "heimdall_storage_last_cleanup_skipped_files",
        "Orphans the latest cleanup run left in place, by reason.",
        labels=["bucket", "reason"],
    )
    deleted_files = CounterMetricFamily(
        "heimdall_storage_deleted_files",
        "Objects deleted by cleanup runs (dry runs excluded), summed over every orphan_deletions materialization.",
        labels=["bucket"],
    )
    deleted_bytes = CounterMetricFamily(
        "heimdall_storage_deleted_bytes",
        "Bytes deleted by cleanup runs (dry runs excluded), summed over every orphan_deletions materialization.",
        labels=["bucket"],
    )
    for bucket in buckets:
        for status in STATUS_ORDER:
            health.add_metric([bucket.name, status], 1.0 if bucket.status == status else 0.0)
        if bucket.cleanup is not None:
            for reason, count in bucket.cleanup.skipped_files.items():
                if count is not None:
                    skipped.add_metric([bucket.name, reason], count)
        deleted_files.add_metric([bucket.name], bucket.deleted_files_total)
        deleted_bytes.add_metric([bucket.name], bucket.deleted_bytes_total)

    failed_runs = CounterMetricFamily(
        "heimdall_storage_failed_runs",
        "Runs of the job that ended in FAILURE, as recorded by the Dagster instance.",
        labels=["job"],
    )
    for job, count in snapshot.failed_runs.items():
        failed_runs.add_metric([job], count)

    growth = GaugeMetricFamily(
        "heimdall_storage_growth_bytes_per_day",
        "Average daily growth of the bucket's bytes over the window, deletions added back (referenced bytes plus "
        "orphan inflow: a cleanup does not lower it), from the latest storage_history.",
        labels=["bucket", "window"],
    )
    inflow = GaugeMetricFamily(
        "heimdall_storage_orphan_inflow_bytes_per_day",
        "Average daily bytes that became orphans in the bucket over the window, from the latest storage_history.",
        labels=["bucket", "window"],
    )
    norm = GaugeMetricFamily(
        "heimdall_storage_orphan_inflow_norm_bytes_per_day",
        "Average daily orphan inflow of the bucket over the 30 days before the last 7: the norm the last 7 days' "
        "inflow is compared with.",
        labels=["bucket"],
    )
    days_until_full = GaugeMetricFamily(
        "heimdall_storage_days_until_full",
        "Days until the buckets' bytes reach the policy's capacity_bytes: expected at the 30-day growth, earliest and "
        "latest at the faster and slower of the 7- and 30-day growths; +Inf when not growing.",
        labels=["estimate"],
    )
    capacity_bytes = GaugeMetricFamily(
        "heimdall_storage_capacity_bytes", "The policy's capacity_bytes: the disk that holds the buckets.")
    history_recorded = GaugeMetricFamily(
        "heimdall_storage_history_timestamp_seconds",
        "When the newest day of storage_history was recorded (Unix time): the growth and forecast are as of then.")
    history = snapshot.capacity
    if history is not None:
        history_recorded.add_metric([], history.recorded_at)
        for bucket, rates in history.rates.items():
            for family, window, value in ((growth, "7d", rates["growth_7d"]), (growth, "30d", rates["growth_30d"]),
                                          (inflow, "7d", rates["inflow_7d"]), (inflow, "30d", rates["inflow_30d"])):
                if value is not None:
                    family.add_metric([bucket, window], value)
            if rates["inflow_norm"] is not None:
                norm.add_metric([bucket], rates["inflow_norm"])
        for estimate, days in history.days_until_full.items():
            days_until_full.add_metric([estimate], days)
        if history.capacity_bytes is not None:
            capacity_bytes.add_metric([], history.capacity_bytes)

    def cleanup(value: Callable[..., float | None]) -> Callable[[BucketFigures], float | None]:
        return lambda b: None if b.cleanup is None else value(b.cleanup)

    return [
        gauge(
            "heimdall_storage_disk_usage_gb",
            f"Bytes stored in the bucket {_GB}, noncurrent versions included, from the latest listing. There is "
            "no disk probe: sum over buckets for the total usage.",
            lambda b: _gb(None if b.total_bytes is None else b.total_bytes + (b.noncurrent_bytes or 0)),
        ),
        gauge(
            "heimdall_storage_bucket_size_gb",
            f"Size of the bucket {_GB}, from the latest listing.",
            lambda b: _gb(b.total_bytes),
        ),
        gauge(
            "heimdall_storage_total_objects",
            "Objects in the bucket, from the latest listing.",
            lambda b: b.total_objects,
        ),
        gauge(
            "heimdall_storage_referenced_objects",
            "Objects of the bucket referenced by the database, from the latest scan.",
            lambda b: b.referenced_objects,
        ),
        gauge(
            "heimdall_storage_orphan_files",
            "Objects no database row references (any age), from the latest scan.",
            lambda b: b.orphan_files,
        ),
        gauge(
            "heimdall_storage_orphan_size_gb",
            f"Size of the orphaned objects {_GB}, from the latest scan.",
            lambda b: _gb(b.orphan_bytes),
        ),
        gauge(
            "heimdall_storage_orphan_share_ratio",
            "Share of the bucket's bytes that are orphaned (0..1), from the latest scan.",
            lambda b: b.orphan_share_bytes,
        ),
        health,
        gauge(
            "heimdall_storage_eligible_orphan_files",
            "Orphans old enough to be deleted under the policy's minimum age.",
            lambda b: b.eligible_orphan_files,
        ),
        gauge(
            "heimdall_storage_eligible_orphan_bytes",
            "Bytes of the orphans old enough to be deleted.",
            lambda b: b.eligible_orphan_bytes,
        ),
        gauge(
            "heimdall_storage_young_orphan_files",
            "Orphans younger than the policy's minimum age (kept: uploads may still be in flight).",
            lambda b: b.young_orphan_files,
        ),
        gauge(
            "heimdall_storage_noncurrent_versions",
            "Noncurrent versions kept by a versioned bucket (delete markers excluded), from the latest listing.",
            lambda b: b.noncurrent_versions,
        ),
        gauge(
            "heimdall_storage_noncurrent_bytes",
            "Bytes of a versioned bucket's noncurrent versions: on disk, invisible to a plain listing.",
            lambda b: b.noncurrent_bytes,
        ),
        gauge(
            "heimdall_storage_delete_markers",
            "Delete markers in a versioned bucket, from the latest listing.",
            lambda b: b.delete_markers,
        ),
        gauge(
            "heimdall_storage_quarantined_objects",
            "Objects the bucket's cleanups moved to quarantine and that have not expired, after the latest cleanup.",
            cleanup(lambda c: c.quarantined_objects),
        ),
        gauge(
            "heimdall_storage_quarantined_bytes",
            "Bytes held in the bucket's quarantine, after the latest cleanup.",
            cleanup(lambda c: c.quarantined_bytes),
        ),
        gauge(
            "heimdall_storage_quarantine_oldest_timestamp_seconds",
            "When the oldest object in the bucket's quarantine was moved there (Unix time).",
            cleanup(lambda c: c.quarantine_oldest),
        ),
        gauge(
            "heimdall_storage_dangling_references",
            "Database references to keys missing from the bucket, from the latest scan.",
            lambda b: b.dangling_references,
        ),
        gauge(
            "heimdall_storage_unparseable_references",
            "Database reference values that could not be read as a key of this bucket.",
            lambda b: b.unparseable_references,
        ),
        gauge(
            "heimdall_storage_inventory_drift_keys",
            "Keys the latest full listing found that the bucket-event inventory had wrong (missed creates "
            "plus missed deletes); absent until an event-maintained inventory was reconciled.",
            lambda b: b.inventory_drift_keys,
        ),
        gauge(
            "heimdall_storage_last_scan_timestamp_seconds",
            "When the latest orphan_diff of the bucket was recorded (Unix time).",
            lambda b: b.scan_timestamp,
        ),
        gauge(
            "heimdall_storage_last_cleanup_timestamp_seconds",
            "When the latest orphan_deletions of the bucket was recorded (Unix time).",
            cleanup(lambda c: c.timestamp),
        ),
        gauge(
            "heimdall_storage_last_cleanup_dry_run",
            "1 if the latest cleanup run was a dry run (it deleted nothing), else 0.",
            cleanup(lambda c: 1.0 if c.dry_run else 0.0),
        ),
        gauge(
            "heimdall_storage_last_cleanup_refused",
            "1 if the latest cleanup run refused the bucket before deleting anything (a guard, a stale diff, "
            "a plan check), else 0.",
            cleanup(lambda c: 1.0 if c.refused else 0.0),
        ),
        gauge(
            "heimdall_storage_last_cleanup_would_refuse",
            "1 if the latest cleanup run was a dry run whose guard verdict says a live run would refuse, else 0.",
            cleanup(lambda c: 1.0 if c.would_refuse else 0.0),
        ),
        gauge(
            "heimdall_storage_last_cleanup_deleted_files",
            "Objects deleted by the latest cleanup run.",
            cleanup(lambda c: c.deleted_files),
        ),
        gauge(
            "heimdall_storage_last_cleanup_deleted_bytes",
            "Bytes deleted by the latest cleanup run.",
            cleanup(lambda c: c.deleted_bytes),
        ),
        gauge(
            "heimdall_storage_last_cleanup_failed_files",
            "Deletions that failed in the latest cleanup run.",
            cleanup(lambda c: c.failed_files),
        ),
        skipped,
        deleted_files,
        deleted_bytes,
        failed_runs,
        growth,
        inflow,
        norm,
        days_until_full,
        capacity_bytes,
        history_recorded,
        GaugeMetricFamily(
            "heimdall_storage_exporter_collect_seconds",
            "Time the exporter took to read the latest snapshot from the Dagster instance.",
            value=snapshot.collect_seconds,
        ),
    ]


class StorageCollector(Collector):
    """Reads the snapshot when Prometheus scrapes, never from process-local gauges."""

    def __init__(self, source: SnapshotSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield from snapshot_metrics(self._source.get())


def render_metrics(snapshot: StorageSnapshot) -> bytes:
    """The Prometheus text exposition of a snapshot."""

    class _Fixed(Collector):
        def collect(self) -> Iterator[Metric]:
            yield from snapshot_metrics(snapshot)

    registry = CollectorRegistry()
    registry.register(_Fixed())
    return generate_latest(registry)
