"""Deletion throughput: a live delete_orphans_job against raw remove_objects, in one run.

    .venv/bin/python bench/delete.py --objects 50000 --reference-rows 1000000 [--index] [--unusual-index]
        [--concurrency 4] [--raw-streams 1 4 8] [--repeats 3]

Starts its own SeaweedFS, uses PostgreSQL at 127.0.0.1:5432 when reachable (else an
embedded one), fills one bucket per raw baseline and one for the job with the same N orphans
shaped like Heimdall's raw IQ (``sessions/<uuid>/websdr_<1..7>.npy``), deletes each baseline's
with raw ``remove_objects`` in 1000-key batches over that many parallel streams, and the job's
with delete_orphans_job (re-validation and audit included) at ``--concurrency``, and prints
keys/s, CPU seconds of this process, SeaweedFS and PostgreSQL, and the ratios (the target compares the
job with raw at the same concurrency). It does so ``--repeats`` times on freshly filled buckets,
alternating whether raw or the job runs first, and prints each ratio and their median: single
runs on these shared 2 cores vary by ±10 %. Timings are printed, never asserted.

The reference table is Heimdall's ``measurements.iq_data_location`` (``varchar(512)``, format
``uri``) with ``--reference-rows`` values of the same shape naming *other* sessions: their last
path segments repeat (``websdr_1.npy`` … ``websdr_7.npy``), so a re-check cannot narrow on
them; the rows are only read, no object exists for them. The 1000 rows the benchmark always
had (``s3://<bucket>/kept/<n>``) come on top, so ``--reference-rows 0`` is the earlier setup
(a scan refuses an empty reference set). ``--index`` adds a btree index on the
column, ``--unusual-index`` the partial index that serves the unusual-spelling arm of the
re-check (see ``core/revalidation.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import sqlalchemy as sa
import yaml
from minio import Minio
from minio.deleteobjects import DeleteObject

from heimdall_storage_pipeline.core.policy import BucketPolicy, load_policy
from heimdall_storage_pipeline.core.references import read_only_snapshot
from heimdall_storage_pipeline.core.revalidation import referenced_among
from heimdall_storage_pipeline.defs.build import build_definitions
from heimdall_storage_pipeline.defs.materializations import latest_metadata
from heimdall_storage_pipeline.defs.resources import explicit_resources
from heimdall_storage_pipeline.local.postgres import (
    LOCAL_SERVER_URL,
    create_database,
    drop_database,
    reachable,
    start_embedded,
)
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS

MIN_AGE_SECONDS = 1
BATCH = 1000
RECHECK_REPEATS = 5
KEPT_ROWS = 1000
REFERENCE_QUERY = "SELECT iq_data_location FROM measurements WHERE iq_data_location IS NOT NULL"


def orphan_key(index: int) -> str:
    """Heimdall's raw IQ shape: seven receivers per session, so last segments repeat."""
    session = hashlib.md5(f"orphan-{index // 7}".encode()).hexdigest()
    return f"sessions/{session[:8]}-{session[8:12]}-{session[12:16]}-{session[16:20]}-{session[20:]}/" \
           f"websdr_{index % 7 + 1}.npy"


def fill_references(engine: sa.Engine, bucket: str, rows: int, index: bool, unusual_index: bool) -> float:
    """``rows`` URIs of sessions that have no object, in Heimdall's column type; returns seconds.

    The ``KEPT_ROWS`` rows the benchmark always had come first: a scan refuses an empty
    reference set, so ``--reference-rows 0`` is the earlier setup.
    """
    began = time.perf_counter()
    with engine.begin() as connection:
        connection.execute(sa.text(
            "CREATE TABLE measurements (id bigserial PRIMARY KEY, iq_data_location varchar(512))"))
        connection.execute(sa.text(
            "INSERT INTO measurements (iq_data_location) "
            "SELECT 's3://' || :bucket || '/kept/' || g FROM generate_series(1, :rows) AS g"),
            {"bucket": bucket, "rows": KEPT_ROWS})
        connection.execute(sa.text(
            "INSERT INTO measurements (iq_data_location) "
            "SELECT 's3://' || :bucket || '/sessions/' || md5('reference-' || (g / 7))::uuid "
            "       || '/websdr_' || (g % 7 + 1) || '.npy' "
            "FROM generate_series(0, :rows - 1) AS g"), {"bucket": bucket, "rows": rows})
        if index:
            connection.execute(sa.text("CREATE INDEX ON measurements (iq_data_location)"))
        if unusual_index:
            from heimdall_storage_pipeline.core.keys import ReferenceFormat
            from heimdall_storage_pipeline.core.revalidation import unusual_spelling_sql

            predicate = unusual_spelling_sql(ReferenceFormat.URI, "iq_data_location")
            connection.execute(sa.text(f"CREATE INDEX ON measurements (iq_data_location) WHERE {predicate}"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("VACUUM ANALYZE measurements"))
    return time.perf_counter() - began


def time_recheck(engine: sa.Engine, bucket: BucketPolicy, keys: list[str]) -> list[float]:
    """Seconds of ``referenced_among`` for one batch of ``keys``, each in its own snapshot as the job does."""
    seconds = []
    for _ in range(RECHECK_REPEATS):
        began = time.perf_counter()
        with read_only_snapshot(engine) as connection:
            found = referenced_among(connection, bucket, keys)
        seconds.append(time.perf_counter() - began)
        assert not found, f"orphans reported as referenced: {sorted(found)[:3]}"
    return seconds


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _postgres_seconds() -> float:
    """CPU seconds of the PostgreSQL processes alive now (a backend that exits takes its time along)."""
    total = 0.0
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "postgres":
            with contextlib.suppress(psutil.Error):
                total += _cpu_seconds(process)
    return total


class CpuMeter:
    """CPU seconds of this process, of the S3 server, of PostgreSQL and of the whole machine over a block.

    The four share the cores, so a step that costs PostgreSQL or this process CPU slows the
    server's requests too.
    """

    def __init__(self, server_pid: int) -> None:
        self.server = psutil.Process(server_pid)

    def _now(self) -> tuple[float, float, float, float]:
        own = os.times()
        machine = psutil.cpu_times()
        server = [self.server, *self.server.children(recursive=True)]
        return (own.user + own.system, sum(map(_cpu_seconds, server)), _postgres_seconds(),
                sum(machine) - machine.idle - machine.iowait)

    def __enter__(self) -> CpuMeter:
        self.began = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        ended = self._now()
        self.client, self.server_seconds, self.postgres, self.machine = (
            e - b for e, b in zip(ended, self.began, strict=True))


def fill(client: Minio, buckets: list[str], count: int) -> float:
    """Upload the same ``count`` orphans to each of ``buckets``, key by key, so that no bucket's
    objects are newer than another's when the deletions start."""
    for bucket in buckets:
        if not client.bucket_exists(bucket):  # the job's bucket is filled again for each repeat
            client.make_bucket(bucket)
    began = time.perf_counter()

    def upload(index: int) -> None:
        for bucket in buckets:
            client.put_object(bucket, orphan_key(index), io.BytesIO(b"x"), 1)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(upload, range(count)))
    return time.perf_counter() - began


def raw_delete(client: Minio, bucket: str, streams: int, cpu: CpuMeter) -> tuple[float, int]:
    """List, then remove_objects in 1000-key batches over ``streams`` threads (timed, and metered by ``cpu``)."""
    keys = [o.object_name for o in client.list_objects(bucket, recursive=True)]
    batches = [keys[i:i + BATCH] for i in range(0, len(keys), BATCH)]

    def remove(batch: list[str]) -> int:
        return len(list(client.remove_objects(bucket, [DeleteObject(k) for k in batch])))

    began = time.perf_counter()
    with cpu, ThreadPoolExecutor(max_workers=streams) as pool:
        errors = sum(pool.map(remove, batches))
    return time.perf_counter() - began, errors


@dataclass
class Repeat:
    """One repeat: each raw baseline and the job, on freshly filled buckets of the same server."""

    raw: dict[int, tuple[float, int, CpuMeter]]  # streams -> (seconds, errors, CPU)
    job_seconds: float
    job_cpu: CpuMeter
    meta: dict[str, Any]
    left: int
    job_first: bool

    @property
    def job_rate(self) -> float:
        return self.meta["deleted_count"] / self.meta["seconds"]

    def ratio(self, streams: int, objects: int) -> float:
        return self.job_rate * self.raw[streams][0] / objects


def run_repeat(index: int, args: argparse.Namespace, client: Minio, seaweed: SeaweedFS, ours: str,
               defs: dg.Definitions, instance: dg.DagsterInstance) -> Repeat:
    """Fill the raw buckets and ours, scan ours, then delete; odd repeats run the job first."""
    raw_buckets = {streams: f"raw{streams}-{index}-{ours}" for streams in args.raw_streams}
    buckets = [*raw_buckets.values(), ours]
    seconds = fill(client, buckets, args.objects)
    print(f"repeat {index + 1}: uploaded {args.objects} objects to each of {', '.join(buckets)} in {seconds:.1f} s",
          flush=True)
    defs.resolve_job_def("storage_scan_job").execute_in_process(partition_key=ours, instance=instance)
    time.sleep(MIN_AGE_SECONDS + 1)  # the job re-validates ages with the real clock
    assert seaweed.process is not None
    raw: dict[int, tuple[float, int, CpuMeter]] = {}

    def run_raw() -> None:
        for streams, bucket in raw_buckets.items():
            cpu = CpuMeter(seaweed.process.pid)
            seconds, errors = raw_delete(client, bucket, streams, cpu)
            raw[streams] = (seconds, errors, cpu)
            client.remove_bucket(bucket)

    def run_job() -> tuple[float, CpuMeter]:
        began = time.perf_counter()
        with CpuMeter(seaweed.process.pid) as job_cpu:
            defs.resolve_job_def("delete_orphans_job").execute_in_process(
                instance=instance,
                run_config={"ops": {"delete_orphans": {"config": {
                    "dry_run": False, "allow_mass_delete": True, "buckets": [ours],
                    "delete_concurrency": args.concurrency}}}},
            )
        return time.perf_counter() - began, job_cpu

    # Which runs first alternates, so that neither always meets the server in the other's wake.
    job_first = index % 2 == 1
    if job_first:
        job_seconds, job_cpu = run_job()
        run_raw()
    else:
        run_raw()
        job_seconds, job_cpu = run_job()
    meta = latest_metadata(instance, "orphan_deletions", ours) or {}
    left = sum(1 for _ in client.list_objects(ours, recursive=True))
    return Repeat(raw, job_seconds, job_cpu, meta, left, job_first)


def print_repeat(index: int, repeat: Repeat, args: argparse.Namespace) -> None:
    n = args.objects
    meta = repeat.meta
    rows = [(f"raw remove_objects, {streams} stream{'s' * (streams > 1)}", n / seconds, errors, cpu, seconds)
            for streams, (seconds, errors, cpu) in repeat.raw.items()]
    rows += [("delete_orphans_job (whole run)", n / repeat.job_seconds, meta.get("failed_count"), repeat.job_cpu,
              repeat.job_seconds),
             ("delete_orphans_job (op work)", repeat.job_rate, meta.get("failed_count"), None, meta["seconds"])]
    print(f"\nrepeat {index + 1} ({'job' if repeat.job_first else 'raw'} first): {n} objects; deleted by the job: "
          f"{meta.get('deleted_count')}; left in its bucket: {repeat.left}")
    # CPU seconds: this process, SeaweedFS, PostgreSQL and all of the machine.
    print(f"{'measurement':34} {'keys/s':>10} {'errors':>7} {'CPU: client':>12} {'SeaweedFS':>10} "
          f"{'PostgreSQL':>10} {'machine':>10} {'wall s':>7}")
    for label, rate, errors, cpu, seconds in rows:
        used = (f"{cpu.client:12.2f} {cpu.server_seconds:10.2f} {cpu.postgres:10.2f} {cpu.machine:10.2f}"
                if cpu else f"{'':12} {'':10} {'':10} {'':10}")
        print(f"{label:34} {rate:10.0f} {errors!s:>7} {used} {seconds:7.2f}")
    print(f"the job kept {args.concurrency} DeleteObjects requests in flight; "
          f"keys re-validated a second time after a wait: {meta.get('revalidated_again')}")
    # Batches run on several workers at once: these are sums over the workers, not wall time.
    work = meta["revalidation_seconds"] + meta["delete_seconds"]
    batches = meta.get("batches") or 1
    print(f"time inside batches, summed over workers: re-validation {meta['revalidation_seconds']:.2f} s "
          f"({meta['revalidation_seconds'] / work:.0%}; {meta['revalidation_seconds'] / batches * 1000:.0f} ms per "
          f"batch), DeleteObjects {meta['delete_seconds']:.2f} s; wall time of the op {meta['seconds']:.2f} s")
    for streams in sorted(repeat.raw):
        same = " (same concurrency)" if streams == args.concurrency else ""
        print(f"ratio job (op) / raw {streams} stream{'s' * (streams > 1)}{same}: {repeat.ratio(streams, n):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=50_000)
    parser.add_argument("--reference-rows", type=int, default=1_000_000,
                        help="rows in the reference table (Heimdall-shaped URIs of other sessions)")
    parser.add_argument("--index", action="store_true", help="a btree index on the reference column")
    parser.add_argument("--unusual-index", action="store_true",
                        help="the partial index for the re-check's unusual-spelling arm")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="the job's delete_concurrency (DeleteObjects requests in flight)")
    parser.add_argument("--raw-streams", type=int, nargs="+", default=[1, 4, 8],
                        help="parallel streams of the raw baselines")
    parser.add_argument("--repeats", type=int, default=3,
                        help="raw and job pairs on fresh buckets, alternating which runs first; medians are printed")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-delete-"))
    admin_url = LOCAL_SERVER_URL if reachable(LOCAL_SERVER_URL) else start_embedded(work / "pg")
    database_url = create_database(admin_url, prefix="bench_delete")
    seaweed = SeaweedFS(workdir=work / "seaweedfs").start()
    client = Minio(seaweed.endpoint, access_key=seaweed.access_key, secret_key=seaweed.secret_key, secure=False)
    engine = sa.create_engine(database_url)
    try:
        ours = f"ours-{secrets.token_hex(3)}"
        seconds = fill_references(engine, ours, args.reference_rows, args.index, args.unusual_index)
        indexes = " + ".join(name for name, on in (("btree", args.index), ("unusual", args.unusual_index)) if on)
        print(f"{args.reference_rows} + {KEPT_ROWS} reference rows (index: {indexes or 'none'}) in {seconds:.1f} s",
              flush=True)
        policy_path = work / "policy.yaml"
        policy_path.write_text(yaml.safe_dump({
            "allow_short_min_age": True,
            # Guards are for production; this bucket is all orphans by construction.
            "buckets": {ours: {"min_age": f"{MIN_AGE_SECONDS}s", "batch_size": BATCH,
                               "references": [{"name": "measurements.iq_data_location",
                                               "query": REFERENCE_QUERY, "format": "uri"}]}},
        }))
        policy = load_policy(policy_path)
        defs = build_definitions(policy, explicit_resources(
            seaweed.settings(), database_url, str(work / "manifests"), str(policy_path)
        ))
        # The reference re-check alone, for the job's first batch (sorted, as listed).
        first_batch = sorted(orphan_key(i) for i in range(args.objects))[:BATCH]
        recheck = time_recheck(engine, policy.bucket(ours), first_batch)
        (work / "dagster").mkdir()
        repeats: list[Repeat] = []
        with dg.instance_for_test(temp_dir=str(work / "dagster")) as instance:
            for index in range(args.repeats):
                repeats.append(run_repeat(index, args, client, seaweed, ours, defs, instance))
                print_repeat(index, repeats[-1], args)

        print(f"\nreference re-check alone (referenced_among, {BATCH} keys, {args.reference_rows} rows): "
              f"median {statistics.median(recheck) * 1000:.1f} ms, best {min(recheck) * 1000:.1f} ms "
              f"of {RECHECK_REPEATS}")
        for streams in args.raw_streams:
            ratios = [repeat.ratio(streams, args.objects) for repeat in repeats]
            same = " (same concurrency)" if streams == args.concurrency else ""
            print(f"ratio job (op) / raw {streams} stream{'s' * (streams > 1)}{same}, each repeat: "
                  f"{', '.join(f'{ratio:.2f}' for ratio in ratios)}; median {statistics.median(ratios):.2f}")
        complete = all(r.left == 0 and r.meta.get("deleted_count") == args.objects for r in repeats)
        return 0 if complete else 1
    finally:
        engine.dispose()
        seaweed.stop()
        drop_database(admin_url, database_url)
        if admin_url == LOCAL_SERVER_URL:  # an embedded server's data lives in work/ until exit
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
