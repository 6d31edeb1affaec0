"""Benchmark: what one scrape of the exporter costs with many buckets' history.

Records ``--history`` rounds of a scan (bucket_inventory, referenced_keys, orphan_diff) and a
cleanup (orphan_deletions) for each of ``--buckets`` buckets on a fresh Dagster instance
(PostgreSQL by default, the production setup; ``--backend sqlite`` for the local one), then
serves it with the exporter's HTTP server and times ``GET /metrics``. The exporter is given the
buckets as the CLI gives it the policy's enabled buckets:

* ``cold``: the first scrape of a fresh exporter: the scan assets newest first until each bucket
  has its latest, and the whole deletion history;
* ``cold-all``: the same without the buckets, which reads every event (the exporter before it
  was given them); ``--cold-repeats`` of each, alternated, on the same instance;
* ``warm``: later scrapes with the cache disabled (each one reads the instance again);
* ``cached``: scrapes within the cache lifetime.

Timings are printed, never asserted.

    .venv/bin/python bench/exporter_scrape.py [--buckets 50] [--history 30] [--backend postgres]
        [--cleanup-every 1] [--cold-repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Runnable as a plain script from the repository root or anywhere else.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dagster as dg

from heimdall_storage_pipeline.exporter.collector import InstanceProvider, SnapshotSource
from heimdall_storage_pipeline.exporter.server import ExporterServer
from heimdall_storage_pipeline_tests.exporter.support import (
    GIB,
    http_get,
    postgres_database,
    postgres_url,
    record_cleanup,
    record_scan,
    write_instance_home,
)


@contextmanager
def instance_home(backend: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="exporter-bench-") as tmp:
        if backend == "sqlite":
            yield write_instance_home(Path(tmp) / "home")
            return
        with postgres_database() as database:
            yield write_instance_home(Path(tmp) / "home", postgres_url(database))


def bucket_name(index: int) -> str:
    return f"bench-bucket-{index:03d}"


def fill(instance: dg.DagsterInstance, buckets: int, history: int, cleanup_every: int) -> int:
    events = 0
    for round_ in range(history):
        for index in range(buckets):
            bucket = bucket_name(index)
            objects = 10_000 + 100 * round_ + index
            record_scan(
                instance,
                bucket,
                objects=objects,
                total_bytes=objects * 4 * 1024**2,
                orphans=objects // 10,
                orphan_bytes=objects * 4 * 1024**2 // 10,
                eligible=objects // 20,
                eligible_bytes=objects * 4 * 1024**2 // 20,
                young=objects // 20,
            )
            events += 3
            if round_ % cleanup_every == 0:
                record_cleanup(instance, bucket, deleted=objects // 20, deleted_bytes=GIB)
                events += 1
    return events


def timed_scrape(url: str) -> tuple[float, int]:
    started = time.perf_counter()
    status, body = http_get(f"{url}/metrics")
    elapsed = time.perf_counter() - started
    if status != 200:
        raise SystemExit(f"scrape failed with HTTP {status}: {body[:200]!r}")
    return elapsed, len(body)


def summary(name: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"{name:>6}: n={len(ordered):3d}  min {1000 * ordered[0]:7.1f} ms  "
        f"median {1000 * statistics.median(ordered):7.1f} ms  p95 {1000 * p95:7.1f} ms  "
        f"max {1000 * ordered[-1]:7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buckets", type=int, default=50)
    parser.add_argument("--history", type=int, default=30, help="materializations per asset")
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--cleanup-every", type=int, default=1, help="record a cleanup every N scan rounds")
    parser.add_argument("--cold-repeats", type=int, default=3)
    args = parser.parse_args()

    with instance_home(args.backend) as home, dg.DagsterInstance.from_config(str(home)) as instance:
        started = time.perf_counter()
        events = fill(instance, args.buckets, args.history, args.cleanup_every)
        print(
            f"{args.backend}: recorded {events} materializations ({args.buckets} buckets x "
            f"{args.history} rounds x 3 scan assets, a cleanup every {args.cleanup_every} rounds) "
            f"in {time.perf_counter() - started:.1f} s"
        )

        provider = InstanceProvider(lambda: instance, timeout_seconds=60)
        # As the exporter's CLI passes the policy's enabled buckets.
        names = [bucket_name(index) for index in range(args.buckets)]
        colds: dict[str, list[float]] = {"cold-all": [], "cold": []}
        for _ in range(args.cold_repeats):
            for name, given in (("cold-all", ()), ("cold", names)):
                with ExporterServer(provider, SnapshotSource(provider, given, ttl_seconds=0), port=0) as server:
                    colds[name].append(timed_scrape(server.url)[0])
        uncached = SnapshotSource(provider, names, ttl_seconds=0)
        with ExporterServer(provider, uncached, port=0) as server:
            cold, size = timed_scrape(server.url)
            warm = [timed_scrape(server.url)[0] for _ in range(args.scrapes)]
        cached_source = SnapshotSource(provider, names, ttl_seconds=3600)
        with ExporterServer(provider, cached_source, port=0) as server:
            timed_scrape(server.url)
            cached = [timed_scrape(server.url)[0] for _ in range(args.scrapes)]
        print(f"response: {size} bytes")
        print(summary("cold", [cold, *colds["cold"]]))
        print(summary("cold-all", colds["cold-all"]))
        print(summary("warm", warm))
        print(summary("cached", cached))


if __name__ == "__main__":
    main()
