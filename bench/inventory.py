"""Benchmark: keys/s and peak RSS of our bucket inventory against raw ``minio.list_objects``.

Starts its own SeaweedFS under a temporary directory, fills a fresh bucket with N tiny objects,
then measures, in one run and each in its own subprocess (so peak RSS belongs to one measurement):

* ``raw``: ``Minio.list_objects(bucket, recursive=True)`` consumed fully;
* ``inventory``: ``list_bucket_to_manifest`` into a local ManifestStore (what ``bucket_inventory`` runs);
* ``fast-<max_keys>x<workers>`` (with ``--fast``): ``list_bucket_to_manifest`` with that page size
  and that many shard workers (``inventory`` uses the defaults: 1000-key pages, 4 shards).

Every measurement is repeated (best keys/s wins) and the manifests' key sets are checked against
the raw listing's. Exits non-zero on a mismatch. Timings are printed, never asserted.

    .venv/bin/python bench/inventory.py --objects 100000 [--fast 1000x1,1000x4,10000x4]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Runnable as a plain script from the repository root or anywhere else.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heimdall_storage_pipeline.core.s3 import S3Settings, make_client

BUCKET = "bench-inventory"
ENV_PREFIX = "HEIMDALL_BENCH_"
# Keys that need URL decoding or sort differently in SeaweedFS's tree order than in byte order;
# they ride along so that every measurement's key-set check covers them.
ODD_KEYS = (
    "odd/with space.npy", "odd/ünïcødé/ß.npy", "odd/plus+sign.npy", "odd/100%.npy", "odd/a&b.npy",
    "odd/less<than>.npy", "odd/a/b", "odd/a-b", "odd/a0", "odd/tab\there", "odd/q?x#y", "odd/~tilde",
)


def object_keys(count: int) -> list[str]:
    """``count`` keys shaped like Heimdall's: dataset prefixes, one file per sample."""
    odd = list(ODD_KEYS[: min(len(ODD_KEYS), count)])
    regular = [f"dataset-{i % 24:02d}/{i // 1000:04d}/sample-{i:08d}.npy" for i in range(count - len(odd))]
    return regular + odd


def upload(settings: S3Settings, bucket: str, keys: list[str], threads: int) -> float:
    """Create ``bucket`` and put a 1-byte object per key with one shared client; return seconds."""
    client = make_client(dataclasses.replace(settings, max_connections=threads))
    client.make_bucket(bucket)
    done = 0
    lock = threading.Lock()
    began = time.perf_counter()

    def put(key: str) -> None:
        nonlocal done
        client.put_object(bucket, key, io.BytesIO(b"x"), 1)
        with lock:
            done += 1
            if done % 20_000 == 0:
                print(f"  uploaded {done:,} / {len(keys):,}", flush=True)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        # list() re-raises the first upload failure here.
        list(pool.map(put, keys, chunksize=256))
    return time.perf_counter() - began


# --- measurements, each run in a child process -------------------------------------------------


def _peak_rss_mb() -> float:
    """This process's peak RSS in MB.

    Linux carries ru_maxrss across exec, so a child would report the parent's peak (the parent holds
    the uploaded key list); VmHWM belongs to the current address space only, so it is preferred.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def measure(kind: str, bucket: str, manifest_root: str) -> dict[str, Any]:
    """Run one listing of ``kind`` in this process and describe it."""
    from heimdall_storage_pipeline.core.manifests import ManifestStore

    settings = S3Settings(
        endpoint=os.environ[ENV_PREFIX + "ENDPOINT"],
        access_key=os.environ[ENV_PREFIX + "ACCESS_KEY"],
        secret_key=os.environ[ENV_PREFIX + "SECRET_KEY"],
    )
    store = ManifestStore(manifest_root)
    # Import what each path needs before the baseline so RSS growth means the listing itself.
    from heimdall_storage_pipeline.core.listing import list_bucket_to_manifest

    baseline = _peak_rss_mb()
    manifest = None
    began = time.perf_counter()
    if kind == "raw":
        count = sum(1 for _ in make_client(settings).list_objects(bucket, recursive=True))
    elif kind == "inventory":
        result = list_bucket_to_manifest(settings, bucket, store, run_id="bench-inventory")
        count, manifest = result.object_count, result.manifest_uri
    elif kind.startswith("fast-"):
        max_keys, workers = (int(part) for part in kind.removeprefix("fast-").split("x"))
        result = list_bucket_to_manifest(settings, bucket, store, run_id="bench-fast", max_keys=max_keys,
                                         workers=workers)
        count, manifest = result.object_count, result.manifest_uri
    else:
        raise SystemExit(f"unknown measurement {kind!r}")
    seconds = time.perf_counter() - began
    return {
        "kind": kind, "count": count, "seconds": seconds, "keys_per_s": count / seconds,
        "rss_baseline_mb": baseline, "rss_peak_mb": _peak_rss_mb(), "manifest": manifest,
    }


def run_child(kind: str, settings: S3Settings, manifest_root: str) -> dict[str, Any]:
    env = {
        **os.environ,
        ENV_PREFIX + "ENDPOINT": settings.endpoint,
        ENV_PREFIX + "ACCESS_KEY": settings.access_key,
        ENV_PREFIX + "SECRET_KEY": settings.secret_key,  # env, not argv: argv is world-readable
    }
    command = [sys.executable, __file__, "--measure", kind, "--bucket", BUCKET, "--manifests", manifest_root]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"measurement {kind} failed:\n{finished.stderr}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


# --- verification and report -------------------------------------------------------------------


def raw_key_set(settings: S3Settings, bucket: str) -> set[str]:
    """Keys of the raw listing, minus directory markers the inventory skips by design."""
    return {o.object_name for o in make_client(settings).list_objects(bucket, recursive=True) if not o.is_dir}


def manifest_keys(manifest_uri: str) -> tuple[set[str], int]:
    import pyarrow.parquet as pq

    column = pq.read_table(manifest_uri, columns=["key"]).column("key").to_pylist()
    return set(column), len(column)


def machine() -> str:
    import psutil

    memory_gb = psutil.virtual_memory().total / 2**30
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{memory_gb:.1f} GiB RAM, Python {platform.python_version()}, {platform.system()}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objects", type=int, default=100_000, help="objects to create (default 100,000)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement; best is kept (>= 2)")
    parser.add_argument("--threads", type=int, default=16, help="upload threads")
    parser.add_argument("--fast", default="", metavar="MAX_KEYSxWORKERS,...",
                        help="also measure the inventory with these page sizes and shard workers, "
                             "e.g. 1000x1,1000x4,10000x4")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--bucket", default=BUCKET, help=argparse.SUPPRESS)
    parser.add_argument("--manifests", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(args.measure, args.bucket, args.manifests)))
        return 0
    if args.objects < 1 or args.repeats < 1:
        parser.error("--objects and --repeats must be positive")

    from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS

    kinds = ["raw", "inventory"]
    for spec in filter(None, (part.strip() for part in args.fast.split(","))):
        max_keys, _, workers = spec.partition("x")
        if not max_keys.isdigit() or not (workers or "1").isdigit():
            parser.error(f"--fast takes MAX_KEYSxWORKERS items such as 1000x4, not {spec!r}")
        kinds.append(f"fast-{int(max_keys)}x{int(workers or 1)}")
    with tempfile.TemporaryDirectory(prefix="heimdall-bench-") as temp:
        server = SeaweedFS(workdir=Path(temp) / "seaweedfs")
        print(f"starting SeaweedFS under {temp} ...", flush=True)
        server.start()
        try:
            settings = server.settings()
            keys = object_keys(args.objects)
            print(f"uploading {len(keys):,} objects with {args.threads} threads ...", flush=True)
            upload_seconds = upload(settings, BUCKET, keys, args.threads)
            print(f"uploaded {len(keys):,} objects in {upload_seconds:.1f} s "
                  f"({len(keys) / upload_seconds:,.0f} objects/s)", flush=True)

            results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
            manifest_root = str(Path(temp) / "manifests")
            for attempt in range(args.repeats):
                # Interleave the kinds so drift in machine load hits all of them alike.
                for kind in kinds:
                    found = run_child(kind, settings, manifest_root)
                    results[kind].append(found)
                    print(f"  run {attempt + 1}: {kind:<12} {found['count']:>9,} keys "
                          f"{found['seconds']:7.2f} s {found['keys_per_s']:>9,.0f} keys/s "
                          f"peak RSS {found['rss_peak_mb']:6.1f} MB", flush=True)

            expected = raw_key_set(settings, BUCKET)
            ok = len(expected) == len(keys) and expected == set(keys)
            if not ok:
                print(f"MISMATCH: the raw listing has {len(expected):,} keys, {len(keys):,} were uploaded")
            best = {kind: max(runs, key=lambda r: r["keys_per_s"]) for kind, runs in results.items()}
            raw_speed = best["raw"]["keys_per_s"]
            print()
            print(f"machine: {machine()}")
            print(f"objects: {len(keys):,}  repeats: {args.repeats}  (best keys/s kept; peak RSS is the "
                  f"largest over the repeats)")
            print(f"{'measurement':<14}{'keys':>10}{'seconds':>9}{'keys/s':>10}{'vs raw':>8}"
                  f"{'RSS base MB':>13}{'RSS peak MB':>13}  key set")
            for kind in kinds:
                row = best[kind]
                verdict = "-"
                if kind != "raw":
                    # Every run's manifest must hold exactly the raw key set, once each.
                    verdicts = []
                    for run in results[kind]:
                        found_keys, rows = manifest_keys(run["manifest"])
                        verdicts.append(found_keys == expected and rows == len(expected))
                    verdict = "OK" if all(verdicts) else "MISMATCH"
                    ok = ok and all(verdicts)
                peak = max(r["rss_peak_mb"] for r in results[kind])
                print(f"{kind:<14}{row['count']:>10,}{row['seconds']:>9.2f}{row['keys_per_s']:>10,.0f}"
                      f"{row['keys_per_s'] / raw_speed:>7.2f}x{row['rss_baseline_mb']:>13.1f}"
                      f"{peak:>13.1f}  {verdict}")
            print()
            for kind in kinds[1:]:
                print(f"ratio {kind}/raw keys/s: {best[kind]['keys_per_s'] / raw_speed:.2f}")
            print(f"key sets: {'OK' if ok else 'MISMATCH'}")
            return 0 if ok else 1
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
