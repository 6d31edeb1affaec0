"""Whole cycle: scan plus live cleanup of N objects in 3 buckets against the raw steps, in one run.

    .venv/bin/python bench/cycle.py --objects 300000

A third of the objects are orphans. Raw baseline, measured on the same server in the same run:
``minio.list_objects`` of each bucket + ``COPY (<reference query>) TO STDOUT`` of each bucket's
references + ``remove_objects`` of as many orphans (1000-key batches, 4 threads) in a copy
bucket. Ours: ``storage_scan_job`` for each bucket, then a live ``delete_orphans_job``, in a
child process whose peak RSS (VmHWM) is reported: the whole-scan memory figure of issue 6.
Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2
import sqlalchemy as sa
import yaml
from minio import Minio
from minio.deleteobjects import DeleteObject

from heimdall_storage_pipeline.local.postgres import (
    LOCAL_SERVER_URL,
    create_database,
    drop_database,
    reachable,
    start_embedded,
)
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS

MIN_AGE_SECONDS = 1
BUCKETS = 3


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fill(client: Minio, uploads: list[tuple[str, str]]) -> None:
    """Upload ``(bucket, key)`` pairs in this order: the raw baseline's copy of an orphan goes up right
    after the orphan, so that neither side deletes newer objects than the other (as bench/delete.py)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda upload: client.put_object(*upload, io.BytesIO(b"x"), 1), uploads))


def run_ours(config_path: str) -> None:
    """Child process: the scan of every bucket, then the live cleanup; prints JSON."""
    import dagster as dg

    from heimdall_storage_pipeline.core.policy import load_policy
    from heimdall_storage_pipeline.core.s3 import S3Settings
    from heimdall_storage_pipeline.defs.build import build_definitions
    from heimdall_storage_pipeline.defs.materializations import latest_metadata
    from heimdall_storage_pipeline.defs.resources import explicit_resources

    config = json.loads(Path(config_path).read_text())
    policy = load_policy(config["policy"])
    settings = S3Settings(**config["s3"])
    defs = build_definitions(policy, explicit_resources(settings, config["database_url"], config["manifests"],
                                                        config["policy"]))
    baseline = vm_hwm_mb()
    home = Path(config["manifests"]).parent / "dagster"
    home.mkdir(exist_ok=True)
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        began = time.perf_counter()
        for bucket in policy.enabled_buckets():
            defs.resolve_job_def("storage_scan_job").execute_in_process(partition_key=bucket.name, instance=instance)
        scanned = time.perf_counter()
        scan_rss = vm_hwm_mb()
        defs.resolve_job_def("delete_orphans_job").execute_in_process(
            instance=instance, run_config={"ops": {"delete_orphans": {"config": {"dry_run": False}}}})
        done = time.perf_counter()
        deletions = [latest_metadata(instance, "orphan_deletions", b.name) or {} for b in policy.enabled_buckets()]
        deleted = sum(d.get("deleted_count", 0) for d in deletions)
        op_seconds = sum(d.get("seconds", 0.0) for d in deletions)
    print(json.dumps({"scan_seconds": scanned - began, "cleanup_seconds": done - scanned, "deleted": deleted,
                      "cleanup_work_seconds": op_seconds,
                      "rss_baseline_mb": baseline, "rss_scan_mb": scan_rss, "rss_peak_mb": vm_hwm_mb()}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=300_000, help="objects over the 3 buckets")
    parser.add_argument("--ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours:
        run_ours(args.ours)
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-cycle-"))
    admin_url = LOCAL_SERVER_URL if reachable(LOCAL_SERVER_URL) else start_embedded(work / "pg")
    database_url = create_database(admin_url, prefix="bench_cycle")
    seaweed = SeaweedFS(workdir=work / "seaweedfs").start()
    client = Minio(seaweed.endpoint, access_key=seaweed.access_key, secret_key=seaweed.secret_key, secure=False)
    suffix = secrets.token_hex(3)
    per_bucket = args.objects // BUCKETS
    try:
        engine = sa.create_engine(database_url)
        policy: dict[str, object] = {"allow_short_min_age": True, "buckets": {}}
        orphan_count = 0
        began = time.perf_counter()
        orphans_copy = f"raworphans-{suffix}"
        client.make_bucket(orphans_copy)
        uploads: list[tuple[str, str]] = []
        for index in range(BUCKETS):
            bucket = f"cycle{index}-{suffix}"
            client.make_bucket(bucket)
            keys = [f"sessions/{i // 500:05d}/websdr_{i:08d}.npy" for i in range(per_bucket)]
            referenced = [k for i, k in enumerate(keys) if i % 3]
            orphan_count += len(keys) - len(referenced)
            for i, key in enumerate(keys):
                uploads.append((bucket, key))
                if not i % 3:
                    uploads.append((orphans_copy, f"o/{index}/{i:08d}.npy"))
            with engine.begin() as connection:
                connection.execute(sa.text(f"CREATE TABLE refs_{index} (location text)"))
            raw = psycopg2.connect(database_url.replace("postgresql+psycopg2", "postgresql"))
            with raw, raw.cursor() as cursor:
                cursor.copy_expert(f"COPY refs_{index} FROM STDIN",
                                   io.StringIO("".join(f"s3://{bucket}/{k}\n" for k in referenced)))
            raw.close()
            policy["buckets"][bucket] = {  # type: ignore[index]
                "min_age": f"{MIN_AGE_SECONDS}s",
                "references": [{"name": "refs", "query": f"SELECT location FROM refs_{index}", "format": "uri"}],
            }
        fill(client, uploads)
        print(f"uploaded {args.objects + orphan_count} objects in {time.perf_counter() - began:.0f} s", flush=True)
        policy_path = work / "policy.yaml"
        policy_path.write_text(yaml.safe_dump(policy))
        engine.dispose()
        time.sleep(MIN_AGE_SECONDS + 1)  # the cleanup re-validates ages with the real clock

        raw_list = raw_copy = 0.0
        raw = psycopg2.connect(database_url.replace("postgresql+psycopg2", "postgresql"))
        for index, bucket in enumerate(policy["buckets"]):  # type: ignore[arg-type]
            started = time.perf_counter()
            sum(1 for _ in client.list_objects(bucket, recursive=True))
            raw_list += time.perf_counter() - started
            started = time.perf_counter()
            with raw.cursor() as cursor:
                cursor.copy_expert(f"COPY (SELECT location FROM refs_{index}) TO STDOUT", io.StringIO())
            raw_copy += time.perf_counter() - started
        raw.close()
        keys = [o.object_name for o in client.list_objects(orphans_copy, recursive=True)]
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda b: list(client.remove_objects(orphans_copy, [DeleteObject(k) for k in b])),
                          [keys[i:i + 1000] for i in range(0, len(keys), 1000)]))
        raw_delete = time.perf_counter() - started

        config_path = work / "ours.json"
        config_path.write_text(json.dumps({
            "policy": str(policy_path), "database_url": database_url, "manifests": str(work / "manifests"),
            "s3": {"endpoint": seaweed.endpoint, "access_key": seaweed.access_key,
                   "secret_key": seaweed.secret_key},
        }))
        child = subprocess.run([sys.executable, __file__, "--ours", str(config_path)], capture_output=True,
                               text=True, env={**os.environ, "DAGSTER_HOME": str(work)}, check=True)
        ours = json.loads(child.stdout.strip().splitlines()[-1])
        raw_total = raw_list + raw_copy + raw_delete
        ours_total = ours["scan_seconds"] + ours["cleanup_seconds"]
        print(f"\n{args.objects} objects in {BUCKETS} buckets, {orphan_count} orphans; "
              f"deleted by the cleanup: {ours['deleted']}")
        print(f"raw: list {raw_list:.2f} s + COPY {raw_copy:.2f} s + delete {raw_delete:.2f} s = {raw_total:.2f} s")
        print(f"ours: scan {ours['scan_seconds']:.2f} s + cleanup {ours['cleanup_seconds']:.2f} s = {ours_total:.2f} s")
        print(f"ratio ours / raw: {ours_total / raw_total:.2f} (deletion work inside the cleanup run: "
              f"{ours['cleanup_work_seconds']:.2f} s; the rest is run start-up, guards and bookkeeping)")
        print(f"peak RSS of our process: after the scans {ours['rss_scan_mb']:.0f} MB, "
              f"whole cycle {ours['rss_peak_mb']:.0f} MB (interpreter and imports: {ours['rss_baseline_mb']:.0f} MB)")
        return 0 if ours["deleted"] == orphan_count else 1
    finally:
        seaweed.stop()
        drop_database(admin_url, database_url)
        if admin_url == LOCAL_SERVER_URL:  # an embedded server's data lives in work/ until exit
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
