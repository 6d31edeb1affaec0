"""A scrape with 50 buckets' history answers well under a second (bench/exporter_scrape.py
measures the full 30-round history; here a shorter one keeps the suite quick: a scrape's reads
do not grow with the history, only the first one's deletion sum does)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

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
ROUNDS = 3


def test_scrape_of_50_buckets_takes_well_under_a_second(tmp_path: Path) -> None:
    with postgres_database() as database:
        home = write_instance_home(tmp_path / "home", postgres_url(database))
        with dg.DagsterInstance.from_config(str(home)) as instance:
            for round_ in range(ROUNDS):
                for index in range(BUCKETS):
                    bucket = f"bucket-{index:02d}"
                    record_scan(
                        instance, bucket, objects=100 + round_, total_bytes=GIB, orphans=round_, orphan_bytes=round_
                    )
                    record_cleanup(instance, bucket, deleted=1, deleted_bytes=1)
            provider = InstanceProvider(lambda: instance)
            with ExporterServer(provider, SnapshotSource(provider, ttl_seconds=0), port=0) as server:
                seconds = []
                for _ in range(6):
                    started = time.perf_counter()
                    status, body = http_get(f"{server.url}/metrics")
                    seconds.append(time.perf_counter() - started)
                    assert status == 200
    metrics = parse_metrics(body.decode())
    assert len({labels for name, labels in metrics if name == "heimdall_storage_orphan_files"}) == 50
    assert metrics[sample("heimdall_storage_orphan_files", bucket="bucket-49")] == ROUNDS - 1
    assert metrics[sample("heimdall_storage_deleted_files_total", bucket="bucket-49")] == ROUNDS
    assert max(seconds) < 1.0, seconds
    assert statistics.median(seconds[1:]) < 0.5, seconds
