"""A scrape's reads of the instance do not grow with the history: only the first scrape sums the
deletion history; later ones read the latest materializations and the new deletions. Counted as
calls to the instance, not timed (bench/exporter_scrape.py measures the time)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg

from heimdall_storage_pipeline.exporter.collector import InstanceProvider, SnapshotSource
from heimdall_storage_pipeline.exporter.server import ExporterServer
from heimdall_storage_pipeline_tests.exporter.support import (
    GIB,
    http_get,
    parse_metrics,
    postgres_database,
    postgres_url,
    record_cleanup,
    record_scan,
    sample,
    write_instance_home,
)

BUCKETS = 50


class CountingInstance:
    """The instance, counting every method the exporter calls on it."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self._instance = instance
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._instance, name)
        if not callable(attribute):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attribute(*args, **kwargs)

        return counted


def _record_round(instance: dg.DagsterInstance, round_: int) -> None:
    for index in range(BUCKETS):
        bucket = f"bucket-{index:02d}"
        record_scan(instance, bucket, objects=100 + round_, total_bytes=GIB, orphans=round_, orphan_bytes=round_)
        record_cleanup(instance, bucket, deleted=1, deleted_bytes=1)


def test_scrape_reads_do_not_grow_with_the_history(tmp_path: Path) -> None:
    with postgres_database() as database:
        home = write_instance_home(tmp_path / "home", postgres_url(database))
        with dg.DagsterInstance.from_config(str(home)) as real:
            instance = CountingInstance(real)
            provider = InstanceProvider(lambda: instance)  # type: ignore[arg-type, return-value]
            with ExporterServer(provider, SnapshotSource(provider, ttl_seconds=0), port=0) as server:

                def scrape() -> tuple[Counter[str], dict]:
                    instance.calls.clear()
                    status, body = http_get(f"{server.url}/metrics")
                    assert status == 200
                    return Counter(instance.calls), parse_metrics(body.decode())

                _record_round(real, 0)
                scrape()  # the first scrape sums the whole deletion history
                short_history, _ = scrape()
                for round_ in (1, 2):
                    _record_round(real, round_)
                scrape()
                long_history, metrics = scrape()
    assert short_history == long_history and sum(long_history.values()) > 0, (short_history, long_history)
    assert len({labels for name, labels in metrics if name == "heimdall_storage_orphan_files"}) == BUCKETS
    assert metrics[sample("heimdall_storage_orphan_files", bucket="bucket-49")] == 2
    assert metrics[sample("heimdall_storage_deleted_files_total", bucket="bucket-49")] == 3
