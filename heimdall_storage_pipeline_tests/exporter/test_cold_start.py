"""The exporter's first read of the scan assets, given the buckets to report, reads newest first and
stops once each bucket has its latest: the same figures as a full read, for a page of events
(counted, not timed; bench/exporter_scrape.py measures the time)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from heimdall_storage_pipeline.exporter.state import (
    BUCKET_INVENTORY,
    LATEST_ONLY_ASSETS,
    ORPHAN_DELETIONS,
    ORPHAN_DIFF,
    InstanceHistory,
    collect_storage_snapshot,
)
from heimdall_storage_pipeline_tests.exporter.support import (
    GIB,
    postgres_database,
    postgres_url,
    record_cleanup,
    record_scan,
    write_instance_home,
)

BUCKETS = ("bucket-a", "bucket-b", "bucket-c")
ROUNDS = 40
PAGE = 10
FIRST_PAGE = 16  # the cold read's first page for a few buckets


class ReadCounter:
    """The real instance, counting the materialization records read per asset."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self._instance = instance
        self.records: Counter[dg.AssetKey] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._instance, name)

    def fetch_materializations(self, records_filter: Any, *args: Any, **kwargs: Any) -> Any:
        result = self._instance.fetch_materializations(records_filter, *args, **kwargs)
        key = records_filter if isinstance(records_filter, dg.AssetKey) else records_filter.asset_key
        self.records[key] += len(result.records)
        return result


@pytest.fixture(params=["sqlite", "postgres"])
def instance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    if request.param == "sqlite":
        with dg.instance_for_test() as test_instance:
            yield test_instance
        return
    with postgres_database() as database:
        home = write_instance_home(tmp_path / "home", postgres_url(database))
        with dg.DagsterInstance.from_config(str(home)) as pg_instance:
            yield pg_instance


def _record_rounds(instance: dg.DagsterInstance, rounds: range) -> None:
    for round_ in rounds:
        for index, bucket in enumerate(BUCKETS):
            objects = 1000 + 10 * round_ + index
            record_scan(instance, bucket, objects=objects, total_bytes=objects * GIB, orphans=round_,
                        orphan_bytes=round_ * GIB)
            record_cleanup(instance, bucket, deleted=1, deleted_bytes=10)


def test_cold_read_with_the_buckets_reads_a_page_and_agrees_with_the_full_read(
    instance: dg.DagsterInstance,
) -> None:
    # Scanned once long ago and no longer in the policy: its series go stale after a restart.
    record_scan(instance, "bucket-retired", objects=5, total_bytes=5, orphans=0, orphan_bytes=0)
    _record_rounds(instance, range(ROUNDS))
    counter = ReadCounter(instance)
    cold = collect_storage_snapshot(counter, BUCKETS, history=InstanceHistory())  # type: ignore[arg-type]
    full = collect_storage_snapshot(instance, history=InstanceHistory(page_size=PAGE))

    assert {name: cold.buckets[name] for name in BUCKETS} == {name: full.buckets[name] for name in BUCKETS}
    assert cold.buckets["bucket-a"].orphan_files == ROUNDS - 1
    assert cold.buckets["bucket-c"].total_objects == 1000 + 10 * (ROUNDS - 1) + 2
    assert cold.buckets["bucket-b"].deleted_files_total == ROUNDS  # the deletion sums still read every event
    assert "bucket-retired" in full.buckets and "bucket-retired" not in cold.buckets
    for asset_key in LATEST_ONLY_ASSETS:
        assert counter.records[asset_key] == FIRST_PAGE, asset_key  # one page of ROUNDS * len(BUCKETS)
    assert counter.records[ORPHAN_DELETIONS] == ROUNDS * len(BUCKETS)


def test_events_after_the_cold_read_are_read_by_the_next_refresh(instance: dg.DagsterInstance) -> None:
    _record_rounds(instance, range(ROUNDS))
    counter = ReadCounter(instance)
    history = InstanceHistory(page_size=PAGE)
    collect_storage_snapshot(counter, BUCKETS, history=history)  # type: ignore[arg-type]
    record_scan(instance, "bucket-b", objects=7, total_bytes=7 * GIB, orphans=3, orphan_bytes=GIB)
    record_scan(instance, "bucket-new", objects=9, total_bytes=9 * GIB, orphans=0, orphan_bytes=0)
    counter.records.clear()
    snapshot = collect_storage_snapshot(counter, BUCKETS, history=history)  # type: ignore[arg-type]

    assert (snapshot.buckets["bucket-b"].total_objects, snapshot.buckets["bucket-b"].orphan_files) == (7, 3)
    assert snapshot.buckets["bucket-new"].total_objects == 9  # scanned since the start: reported
    assert snapshot.buckets["bucket-a"].orphan_files == ROUNDS - 1
    for asset_key in LATEST_ONLY_ASSETS:
        assert counter.records[asset_key] == 2, asset_key  # only the new events
    assert snapshot.buckets == collect_storage_snapshot(instance, (*BUCKETS, "bucket-new")).buckets


def test_a_bucket_never_materialized_ends_the_cold_read_with_the_history(instance: dg.DagsterInstance) -> None:
    _record_rounds(instance, range(ROUNDS))
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="orphan_diff"))  # no partition
    counter = ReadCounter(instance)
    history = InstanceHistory(page_size=PAGE)
    snapshot = collect_storage_snapshot(counter, (*BUCKETS, "bucket-never"), history=history)  # type: ignore[arg-type]

    assert snapshot.buckets["bucket-never"].status == "unknown"
    assert snapshot.buckets["bucket-never"].total_objects is None
    assert snapshot.buckets["bucket-a"].orphan_files == ROUNDS - 1
    assert counter.records[BUCKET_INVENTORY] == ROUNDS * len(BUCKETS)
    assert counter.records[ORPHAN_DIFF] == ROUNDS * len(BUCKETS) + 1
    # The cursor is the newest event: a refresh with nothing new reads nothing.
    counter.records.clear()
    collect_storage_snapshot(counter, (*BUCKETS, "bucket-never"), history=history)  # type: ignore[arg-type]
    assert sum(counter.records.values()) == 0
