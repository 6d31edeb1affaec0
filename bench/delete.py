"""Deletion throughput: a live delete_orphans_job against raw remove_objects, in one run.

    .venv/bin/python bench/delete.py --objects 50000

Starts its own SeaweedFS, uses PostgreSQL at 127.0.0.1:5432 when reachable (else an
embedded one), fills two buckets with the same N orphans, deletes one with raw
``remove_objects`` in 1000-key batches (one stream, then the figure for 4 parallel streams
on a third bucket) and the other with delete_orphans_job (re-validation included), and prints
keys/s and the ratios. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import secrets
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
import yaml
from minio import Minio
from minio.deleteobjects import DeleteObject

from heimdall_storage_pipeline.core.policy import load_policy
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


def fill(client: Minio, bucket: str, count: int) -> float:
    client.make_bucket(bucket)
    began = time.perf_counter()

    def upload(index: int) -> None:
        client.put_object(bucket, f"orphans/{index // 1000:04d}/{index:08d}.npy", io.BytesIO(b"x"), 1)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(upload, range(count)))
    return time.perf_counter() - began


def raw_delete(client: Minio, bucket: str, streams: int) -> tuple[float, int]:
    """List, then remove_objects in 1000-key batches over ``streams`` threads."""
    keys = [o.object_name for o in client.list_objects(bucket, recursive=True)]
    batches = [keys[i:i + BATCH] for i in range(0, len(keys), BATCH)]
    began = time.perf_counter()

    def remove(batch: list[str]) -> int:
        return len(list(client.remove_objects(bucket, [DeleteObject(k) for k in batch])))

    with ThreadPoolExecutor(max_workers=streams) as pool:
        errors = sum(pool.map(remove, batches))
    return time.perf_counter() - began, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=50_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-delete-"))
    admin_url = LOCAL_SERVER_URL if reachable(LOCAL_SERVER_URL) else start_embedded(work / "pg")
    database_url = create_database(admin_url, prefix="bench_delete")
    seaweed = SeaweedFS(workdir=work / "seaweedfs").start()
    client = Minio(seaweed.endpoint, access_key=seaweed.access_key, secret_key=seaweed.secret_key, secure=False)
    try:
        engine = sa.create_engine(database_url)
        with engine.begin() as connection:
            connection.execute(sa.text("CREATE TABLE refs (k text)"))
            connection.execute(sa.text("INSERT INTO refs SELECT 'kept/' || g FROM generate_series(1, 1000) g"))
        engine.dispose()
        suffix = secrets.token_hex(3)
        raw1, raw4, ours = f"raw1-{suffix}", f"raw4-{suffix}", f"ours-{suffix}"
        for bucket in (raw1, raw4, ours):
            seconds = fill(client, bucket, args.objects)
            print(f"uploaded {args.objects} objects to {bucket} in {seconds:.1f} s", flush=True)

        policy_path = work / "policy.yaml"
        policy_path.write_text(yaml.safe_dump({
            "allow_short_min_age": True,
            # Guards are for production; this bucket is all orphans by construction.
            "buckets": {ours: {"min_age": f"{MIN_AGE_SECONDS}s", "batch_size": BATCH,
                               "references": [{"name": "refs", "query": "SELECT k FROM refs"}]}},
        }))
        defs = build_definitions(load_policy(policy_path), explicit_resources(
            seaweed.settings(), database_url, str(work / "manifests"), str(policy_path)
        ))
        (work / "dagster").mkdir()
        with dg.instance_for_test(temp_dir=str(work / "dagster")) as instance:
            defs.resolve_job_def("storage_scan_job").execute_in_process(partition_key=ours, instance=instance)
            time.sleep(MIN_AGE_SECONDS + 1)  # the job re-validates ages with the real clock

            raw1_seconds, raw1_errors = raw_delete(client, raw1, streams=1)
            raw4_seconds, raw4_errors = raw_delete(client, raw4, streams=4)
            began = time.perf_counter()
            defs.resolve_job_def("delete_orphans_job").execute_in_process(
                instance=instance,
                run_config={"ops": {"delete_orphans": {"config": {
                    "dry_run": False, "allow_mass_delete": True, "buckets": [ours]}}}},
            )
            job_seconds = time.perf_counter() - began
            meta = latest_metadata(instance, "orphan_deletions", ours) or {}
        left = sum(1 for _ in client.list_objects(ours, recursive=True))
        n = args.objects
        rows = [
            ("raw remove_objects, 1 stream", n / raw1_seconds, raw1_errors),
            ("raw remove_objects, 4 streams", n / raw4_seconds, raw4_errors),
            ("delete_orphans_job (whole run)", n / job_seconds, meta.get("failed_count")),
            ("delete_orphans_job (op work)", meta["deleted_count"] / meta["seconds"], meta.get("failed_count")),
        ]
        print(f"\n{n} objects; deleted by the job: {meta.get('deleted_count')}; left in its bucket: {left}")
        print(f"{'measurement':34} {'keys/s':>10} {'errors':>7}")
        for label, rate, errors in rows:
            print(f"{label:34} {rate:10.0f} {errors!s:>7}")
        print(f"\nratio job (op) / raw 1 stream : {rows[3][1] / rows[0][1]:.2f}")
        print(f"ratio job (op) / raw 4 streams: {rows[3][1] / rows[1][1]:.2f}")
        # Batches run on several workers at once: these are sums over the workers, not wall time.
        work = meta["revalidation_seconds"] + meta["delete_seconds"]
        print(f"time inside batches, summed over workers: re-validation {meta['revalidation_seconds']:.2f} s "
              f"({meta['revalidation_seconds'] / work:.0%}), DeleteObjects {meta['delete_seconds']:.2f} s; "
              f"wall time of the op {meta['seconds']:.2f} s")
        return 0 if left == 0 and meta.get("deleted_count") == n else 1
    finally:
        seaweed.stop()
        drop_database(admin_url, database_url)


if __name__ == "__main__":
    sys.exit(main())
