"""Reading references: ``read_references_to_manifest`` against a raw ``COPY ... TO STDOUT``, in one run.

    .venv/bin/python bench/references.py --rows 1000000 --repeats 3

Creates its own database on the PostgreSQL at 127.0.0.1:5432 (trust auth, user postgres; or
``--admin-url``) with Heimdall's schema, fills it with N references in Heimdall's shapes and
drops it at the end:

- ``uri``: ``heimdall.measurements.iq_data_location`` = ``s3://heimdall-raw-iq/sessions/<uuid>/websdr_<n>.npy``
  (the policy's query and format for heimdall-raw-iq);
- ``json``: ``heimdall.synthetic_iq_samples.iq_storage_paths`` = ``{"RX_000": key, ..., "RX_003": key}``
  jsonb objects, N/4 rows (format key, container json, as for heimdall-synthetic-iq).

Each measurement runs in its own subprocess (so its peak RSS, ``VmHWM``, is its own), interleaved,
``--repeats`` times; the best time of each is kept:

- ``raw``: psycopg2 ``copy_expert("COPY (<query>) TO STDOUT", devnull)``, in a read-only
  REPEATABLE READ transaction like ours;
- ``adbc`` (with ``--adbc``): ADBC's read of the same query into Arrow, batches dropped: what
  the driver alone costs;
- ``ours``: ``core.references.read_references_to_manifest`` into a local manifest store.

It checks the figures of every run of ours (distinct keys, rows, no unparseable values) and
prints seconds, keys/s, the ratio ours/raw and peak RSS. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from heimdall_storage_pipeline.core.keys import ReferenceFormat
from heimdall_storage_pipeline.core.policy import BucketPolicy, ReferenceSource
from heimdall_storage_pipeline.local.heimdall_db import create_schema
from heimdall_storage_pipeline.local.postgres import LOCAL_SERVER_URL, create_database, drop_database

RECEIVERS = 4
CASES = {
    "uri": ReferenceSource(
        name="measurements.iq_data_location",
        query="SELECT iq_data_location FROM heimdall.measurements WHERE iq_data_location IS NOT NULL",
        format=ReferenceFormat.URI,
    ),
    "json": ReferenceSource(
        name="synthetic_iq_samples.iq_storage_paths",
        query="SELECT iq_storage_paths FROM heimdall.synthetic_iq_samples",
        format=ReferenceFormat.KEY,
        container="json",
    ),
}
BUCKETS = {"uri": "heimdall-raw-iq", "json": "heimdall-synthetic-iq"}


def cpu_seconds() -> float:
    """CPU time of this process, all threads (the database server's is not included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fill(url: str, rows: int) -> None:
    engine = sa.create_engine(url)
    create_schema(engine)
    with engine.begin() as db:
        db.execute(sa.text(
            "INSERT INTO heimdall.measurements (timestamp, recording_session_id, iq_data_location) "
            "SELECT now() - i * interval '1 second', session, "
            "       's3://heimdall-raw-iq/sessions/' || session || '/websdr_' || (i % 7 + 1) || '.npy' "
            "FROM (SELECT i, gen_random_uuid() AS session FROM generate_series(1, :n) AS i) AS s"
        ), {"n": rows})
        dataset = db.execute(sa.text(
            "INSERT INTO heimdall.synthetic_datasets (id, name, dataset_type) "
            "VALUES (gen_random_uuid(), 'bench', 'iq_raw') RETURNING id"
        )).scalar_one()
        members = ", ".join(
            f"'RX_{k:03d}', 'synthetic/' || :d || '/sample-' || lpad(i::text, 8, '0') || '/rx_{k:03d}.npy'"
            for k in range(RECEIVERS)
        )
        db.execute(sa.text(
            "INSERT INTO heimdall.synthetic_iq_samples (dataset_id, sample_idx, iq_storage_paths) "
            f"SELECT :d, i, jsonb_build_object({members}) FROM generate_series(1, :n) AS i"
        ), {"d": str(dataset), "n": rows // RECEIVERS})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
        db.execute(sa.text("VACUUM ANALYZE"))  # hint bits set once, not during the first timed read
    engine.dispose()


def measure(kind: str, case: str, url: str) -> dict[str, float | int | str]:
    """One measurement, in this (fresh) process."""
    source = CASES[case]
    if kind == "raw":
        import psycopg2

        dsn = sa.make_url(url)
        connection = psycopg2.connect(host=dsn.host, port=dsn.port, user=dsn.username, dbname=dsn.database)
        connection.set_session(isolation_level="REPEATABLE READ", readonly=True)
        cpu_before = cpu_seconds()
        began = time.perf_counter()
        with open(os.devnull, "wb") as sink, connection.cursor() as cursor:
            cursor.copy_expert(f"COPY ({source.query}) TO STDOUT", sink)
        seconds = time.perf_counter() - began
        connection.rollback()
        connection.close()
        return {"seconds": seconds, "rss_mb": peak_rss_mb(), "cpu_seconds": cpu_seconds() - cpu_before}
    if kind == "adbc":
        from heimdall_storage_pipeline.core.references import adbc_snapshot, make_engine

        engine = make_engine(url)
        with adbc_snapshot(engine) as cursor:
            cpu_before = cpu_seconds()
            began = time.perf_counter()
            cursor.execute(source.query)
            with cursor.fetch_record_batch() as batches:
                rows = sum(batch.num_rows for batch in batches)
            seconds = time.perf_counter() - began
        return {"seconds": seconds, "rss_mb": peak_rss_mb(), "cpu_seconds": cpu_seconds() - cpu_before, "rows": rows}
    # A step process has imported the definitions before it runs (and pyarrow, where pandas is
    # installed, imports it at the first pa.array of Python objects, ~0.5 s: not a dependency here).
    import heimdall_storage_pipeline.definitions  # noqa: F401
    from heimdall_storage_pipeline.core import references
    from heimdall_storage_pipeline.core.manifests import ManifestStore

    bucket = BucketPolicy(name=BUCKETS[case], enabled=True, min_age=timedelta(days=60), batch_size=1000,
                          description="bench", references=(source,))
    engine = references.make_engine(url)
    with tempfile.TemporaryDirectory() as directory:
        cpu_before = cpu_seconds()
        result = references.read_references_to_manifest(engine, bucket, ManifestStore(directory), "bench-run")
    engine.dispose()
    return {"seconds": result.read_seconds, "rss_mb": peak_rss_mb(),
            "cpu_seconds": cpu_seconds() - cpu_before, "distinct": result.referenced_count,
            "rows": result.reference_rows, "unparseable": result.unparseable_reference_count,
            "other_bucket": result.other_bucket_reference_count}


def run_measurement(kind: str, case: str, url: str) -> dict[str, float | int | str]:
    output = subprocess.run(
        [sys.executable, __file__, "--measure", kind, "--case", case, "--url", url],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="references per case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="uri,json")
    parser.add_argument("--adbc", action="store_true", help="also time ADBC's read alone")
    parser.add_argument("--admin-url", default=LOCAL_SERVER_URL)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.case, args.url)))
        return 0

    url = create_database(args.admin_url, prefix="heimdall_bench_refs")
    failed = False
    try:
        began = time.perf_counter()
        fill(url, args.rows)
        print(f"filled {args.rows:,} references per case in {time.perf_counter() - began:.1f} s")
        for case in args.cases.split(","):
            expected = args.rows if case == "uri" else args.rows // RECEIVERS * RECEIVERS
            kinds = ["raw", *(["adbc"] if args.adbc else []), "ours"]
            best: dict[str, dict[str, float | int | str]] = {}
            for repeat in range(args.repeats):
                for kind in kinds:
                    figures = run_measurement(kind, case, url)
                    print(f"  {case} {kind:6} run {repeat + 1}: {figures['seconds']:.3f} s, "
                          f"CPU {figures['cpu_seconds']:.3f} s, RSS {figures['rss_mb']:.1f} MB", flush=True)
                    if kind == "ours" and (figures["distinct"], figures["rows"], figures["unparseable"]) != (
                        expected, expected, 0
                    ):
                        print(f"  MISMATCH: expected {expected} distinct keys and rows, got {figures}")
                        failed = True
                    if kind not in best or figures["seconds"] < best[kind]["seconds"]:
                        best[kind] = figures
            raw_seconds = float(best["raw"]["seconds"])
            print(f"\n{case}: {expected:,} references, best of {args.repeats}")
            print(f"  {'measurement':12} {'seconds':>8} {'keys/s':>11} {'vs raw':>7} {'client CPU s':>12} "
                  f"{'RSS peak MB':>12}")
            for kind, figures in best.items():
                seconds = float(figures["seconds"])
                print(f"  {kind:12} {seconds:8.3f} {expected / seconds:11,.0f} {seconds / raw_seconds:6.2f}x "
                      f"{float(figures['cpu_seconds']):12.3f} {float(figures['rss_mb']):12.1f}")
            print()
    finally:
        drop_database(args.admin_url, url)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
