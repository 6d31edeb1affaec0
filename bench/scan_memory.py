"""Peak RSS of a whole scan (inventory + references + diff) by bucket layout, against a real SeaweedFS.

    .venv/bin/python bench/scan_memory.py --objects 1000000 --data-dir /var/tmp/scan-bench

For each layout (``--layouts 1,3``: one bucket of N objects, three buckets of N/3) a fresh child
process runs ``storage_scan_job`` for every bucket of the layout, one after another, in process
(the three assets in one process, in order), and reports its peak RSS (``VmHWM``) after imports,
per stage and overall. Per-stage peaks come from resetting the peak (``/proc/self/clear_refs``,
``5``) just before each stage's core function and reading it just after; the overall peak is the
highest reading. Two thirds of the objects are referenced (``s3://`` URIs in PostgreSQL, as
``bench/cycle.py`` does). Each run checks the object and orphan counts. Nothing is asserted about
time or memory.

Objects are real SeaweedFS objects (GET, HEAD, DELETE and listings work through S3 as for any
other), but they are not uploaded one request at a time (500-1,200 objects/s here, the server and
the client sharing two cores): their filer entries, with the 1-byte content inline, the MD5 and
the ETag attribute an S3 upload sets, are written to a ``fs.meta.save``-format file and loaded
with ``weed shell fs.meta.load`` (2,000-3,300 objects/s here). The bucket is then listed, and the
few keys the load sometimes misses (0-5 per bucket, cause unknown) are uploaded through S3. Their
data lives in the filer store instead of a volume, so deleting them does not exercise the volume
server as deleting uploaded objects does: fine for the scan, not meant for deletion benchmarks.
With ``--data-dir`` the SeaweedFS data directory is kept, and a later run with the same directory
reuses the buckets it holds.

``--variant LABEL:VAR=VALUE,...`` adds a child run with those environment variables (say
``jemalloc:ARROW_DEFAULT_MEMORY_POOL=jemalloc``); ``--compare REV`` adds one whose diff step runs
``core/diff.py`` as of git revision REV. Variants alternate within each repeat.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MARKER = "scan_memory.json"
KEY_FORMAT = "sessions/{dir:05d}/websdr_{i:08d}.npy"  # as bench/cycle.py
KEYS_PER_DIRECTORY = 500
LOAD_CONCURRENCY = 16
STAGES = {
    "inventory": "list_bucket_to_manifest",
    "references": "read_references_to_manifest",
    "diff": "compute_orphan_diff",
}


def object_key(i: int) -> str:
    return KEY_FORMAT.format(dir=i // KEYS_PER_DIRECTORY, i=i)


def is_referenced(i: int) -> bool:
    return i % 3 != 0


def layout_buckets(layout: int, objects: int) -> dict[str, int]:
    """Bucket name -> object count for a layout of ``layout`` buckets holding ``objects`` in all."""
    counts = [objects // layout + (1 if index < objects % layout else 0) for index in range(layout)]
    return {f"scan{layout}x{objects}-{index}": count for index, count in enumerate(counts)}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vm_hwm_mb() -> float:
    return _status_mb("VmHWM")


def vm_rss_mb() -> float:
    return _status_mb("VmRSS")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


# --- filling SeaweedFS through its filer metadata ----------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _full_entry(directory: str, entry: bytes) -> bytes:
    """filer_pb.FullEntry{dir, entry}, length-prefixed as fs.meta.save writes it."""
    body = _bytes_field(1, directory) + _bytes_field(2, entry)
    return struct.pack(">I", len(body)) + body


def write_filer_metadata(
    directories_path: Path, files_path: Path, bucket: str, keys: Iterator[str], owner: str, content: bytes
) -> int:
    """Filer entries (filer_pb.Entry) for ``keys`` under /buckets/<bucket>, as an S3 PUT of ``content`` makes them.

    Fields: name 1, is_directory 2, attributes 4 (file_size 1, mtime 2, file_mode 3, crtime 6,
    md5 14), extended 5 (the ETag and owner an S3 upload records), content 9 (inline data).
    Directories go to their own file, so that they exist before any file is loaded into them.
    """
    now = int(time.time())
    md5 = hashlib.md5(content).digest()
    directory_mode = 0o20000000000 | 0o777  # Go's os.ModeDir | rwxrwxrwx
    directory_attributes = _bytes_field(4, _int_field(2, now) + _int_field(3, directory_mode) + _int_field(6, now))
    file_tail = (
        _bytes_field(4, _int_field(1, len(content)) + _int_field(2, now) + _int_field(3, 0o660) + _int_field(6, now)
                     + _bytes_field(14, md5))
        + _bytes_field(5, _bytes_field(1, "Seaweed-X-Amz-ETag") + _bytes_field(2, md5.hex()))
        + _bytes_field(5, _bytes_field(1, "Seaweed-X-Amz-Owner") + _bytes_field(2, owner))
        + _bytes_field(9, content)
    )
    created: set[str] = set()
    count = 0
    with open(directories_path, "wb") as directories, open(files_path, "wb") as files:
        for key in keys:
            *parents, name = key.split("/")
            directory = f"/buckets/{bucket}"
            for parent in parents:
                child = f"{directory}/{parent}"
                if child not in created:
                    created.add(child)
                    directories.write(_full_entry(directory, _bytes_field(1, parent) + _int_field(2, 1)
                                                  + directory_attributes))
                directory = child
            files.write(_full_entry(directory, _bytes_field(1, name) + file_tail))
            count += 1
    return count


def weed_shell(seaweed: Any, commands: str) -> str:
    from heimdall_storage_pipeline.local.seaweedfs import weed_binary

    ports = seaweed.ports
    done = subprocess.run(
        [weed_binary(), "shell", f"-master=127.0.0.1:{ports['master.port']}.{ports['master.port.grpc']}",
         f"-filer=127.0.0.1:{ports['filer.port']}.{ports['filer.port.grpc']}"],
        input=commands, capture_output=True, text=True, check=True,
    )
    return done.stdout


def listed_keys(seaweed: Any, bucket: str) -> set[str]:
    from heimdall_storage_pipeline.core.list_objects_v2 import ListObjectsV2, listing_batches

    lister = ListObjectsV2(seaweed.settings(), bucket)
    keys: set[str] = set()
    for batch in listing_batches(lister, max_keys=1000, workers=4):
        keys.update(batch.column("key").to_pylist())
    return keys


def fill_bucket(seaweed: Any, bucket: str, count: int, scratch: Path) -> None:
    """Create ``bucket`` holding objects 0..count-1 (1 byte each) and check it lists exactly those."""
    client = seaweed.client()
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    directories, files = scratch / f"{bucket}.dirs.meta", scratch / f"{bucket}.files.meta"
    write_filer_metadata(directories, files, bucket, (object_key(i) for i in range(count)), "heimdall", b"x")
    weed_shell(seaweed, f"fs.meta.load -v=false -concurrency=1 {directories}\n"
                        f"fs.meta.load -v=false -concurrency={LOAD_CONCURRENCY} {files}\n")
    directories.unlink()
    files.unlink()
    expected = {object_key(i) for i in range(count)}
    listed = listed_keys(seaweed, bucket)
    missing = expected - listed
    if listed - expected:
        raise RuntimeError(f"{bucket} lists {len(listed - expected)} unexpected keys")
    for key in sorted(missing):  # rare; put them through S3 like any upload
        client.put_object(bucket, key, io.BytesIO(b"x"), 1)
    if missing:
        print(f"  {len(missing)} keys missing after the metadata load were uploaded through S3", flush=True)
        if listed_keys(seaweed, bucket) != expected:
            raise RuntimeError(f"{bucket} does not list the expected keys")


def ensure_buckets(seaweed: Any, buckets: dict[str, int], marker: Path, scratch: Path) -> None:
    loaded: dict[str, int] = json.loads(marker.read_text()) if marker.exists() else {}
    for bucket, count in buckets.items():
        if loaded.get(bucket) == count:
            continue
        started = time.perf_counter()
        fill_bucket(seaweed, bucket, count, scratch)
        seconds = time.perf_counter() - started
        print(f"loaded {count:,} objects into {bucket} in {seconds:.0f} s ({count / seconds:,.0f} objects/s)",
              flush=True)
        loaded[bucket] = count
        marker.write_text(json.dumps(loaded, indent=1))


def fill_references(database_url: str, buckets: dict[str, int]) -> None:
    import psycopg2

    raw = psycopg2.connect(database_url.replace("postgresql+psycopg2", "postgresql"))
    with raw, raw.cursor() as cursor:
        for index, (bucket, count) in enumerate(buckets.items()):
            cursor.execute(f"DROP TABLE IF EXISTS refs_{index}")
            cursor.execute(f"CREATE TABLE refs_{index} (location text)")
            rows = "".join(f"s3://{bucket}/{object_key(i)}\n" for i in range(count) if is_referenced(i))
            cursor.copy_expert(f"COPY refs_{index} FROM STDIN", io.StringIO(rows))
    raw.close()


# --- the measured child ----------------------------------------------------------------------


def _load_diff_at(revision: str) -> Any:
    source = subprocess.run(
        ["git", "show", f"{revision}:heimdall_storage_pipeline/core/diff.py"], cwd=REPO, check=True,
        capture_output=True, text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "compared_diff.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("compared_diff", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["compared_diff"] = module
    spec.loader.exec_module(module)
    return module


def run_child(config_path: str) -> None:
    """Scan every bucket of the config in this process; print the figures as JSON."""
    import dagster as dg

    from heimdall_storage_pipeline.core.policy import load_policy
    from heimdall_storage_pipeline.core.s3 import S3Settings
    from heimdall_storage_pipeline.defs.build import build_definitions
    from heimdall_storage_pipeline.defs.materializations import latest_metadata
    from heimdall_storage_pipeline.defs.resources import explicit_resources
    from heimdall_storage_pipeline.defs.scan import assets

    config = json.loads(Path(config_path).read_text())
    if config.get("diff_revision"):
        assets.compute_orphan_diff = _load_diff_at(config["diff_revision"]).compute_orphan_diff
    policy = load_policy(config["policy"])
    defs = build_definitions(policy, explicit_resources(
        S3Settings(**config["s3"]), config["database_url"], config["manifests"], config["policy"]))
    job = defs.resolve_job_def("storage_scan_job")

    readings: list[float] = []
    stages: list[dict[str, Any]] = []

    def measured(stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            readings.append(vm_hwm_mb())
            reset_peak()
            start_mb = vm_rss_mb()
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - started
                readings.append(vm_hwm_mb())
                stages.append({"stage": stage, "seconds": seconds, "start_mb": start_mb, "peak_mb": readings[-1]})
                reset_peak()
        return wrapper

    for stage, name in STAGES.items():
        setattr(assets, name, measured(stage, getattr(assets, name)))

    baseline = vm_hwm_mb()
    readings.append(baseline)
    home = Path(config["manifests"]).parent / "dagster"
    home.mkdir(exist_ok=True)
    buckets: list[dict[str, Any]] = []
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        for bucket in policy.enabled_buckets():
            began = time.perf_counter()
            result = job.execute_in_process(partition_key=bucket.name, instance=instance)
            seconds = time.perf_counter() - began
            diff = latest_metadata(instance, "orphan_diff", bucket.name) or {}
            buckets.append({"bucket": bucket.name, "ok": result.success, "seconds": seconds,
                            "objects": diff.get("object_count"), "orphans": diff.get("orphan_count"),
                            "referenced": diff.get("referenced_count")})
    readings.append(vm_hwm_mb())
    print(json.dumps({"baseline_mb": baseline, "peak_mb": max(readings), "stages": stages, "buckets": buckets}))


# --- the parent ------------------------------------------------------------------------------


def summarise(layout: int, variant: str, load: float, figures: dict[str, Any], match: bool) -> dict[str, Any]:
    """One table row: per stage, the highest peak and the RSS it started from (over the buckets), and seconds."""
    row: dict[str, Any] = {
        "layout": layout, "variant": variant, "load": load, "peak_mb": figures["peak_mb"],
        "baseline_mb": figures["baseline_mb"], "scan_seconds": sum(b["seconds"] for b in figures["buckets"]),
        "check": "OK" if match else "MISMATCH",
    }
    for stage in STAGES:
        runs = [x for x in figures["stages"] if x["stage"] == stage]
        worst = max(runs, key=lambda x: x["peak_mb"])
        row[f"{stage}_mb"], row[f"{stage}_start_mb"] = worst["peak_mb"], worst["start_mb"]
        row[f"{stage}_s"] = sum(x["seconds"] for x in runs)
    return row


def parse_variants(specs: list[str], compare: str | None) -> list[dict[str, Any]]:
    variants: list[dict[str, Any]] = [{"label": "current", "env": {}, "diff_revision": None}]
    for spec in specs:
        label, _, assignments = spec.partition(":")
        env = dict(item.split("=", 1) for item in assignments.split(",") if item)
        variants.append({"label": label, "env": env, "diff_revision": None})
    if compare:
        variants.append({"label": f"diff@{compare}", "env": {}, "diff_revision": compare})
    return variants


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=1_000_000, help="objects per layout")
    parser.add_argument("--layouts", default="1,3", help="comma-separated bucket counts (default 1,3)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data-dir", help="keep SeaweedFS's data here and reuse the buckets it holds")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:VAR=VALUE,...")
    parser.add_argument("--compare", metavar="REV", help="also run the diff step from core/diff.py at REV")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child)
        return 0

    import sqlalchemy as sa  # noqa: F401  (fail early when the environment is incomplete)
    import yaml

    from heimdall_storage_pipeline.local.postgres import (
        LOCAL_SERVER_URL,
        create_database,
        drop_database,
        reachable,
        start_embedded,
    )
    from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS

    layouts = [int(x) for x in args.layouts.split(",")]
    variants = parse_variants(args.variant, args.compare)
    work = Path(tempfile.mkdtemp(prefix="bench-scan-"))
    data_dir = Path(args.data_dir).resolve() if args.data_dir else work / "seaweedfs"
    data_dir.mkdir(parents=True, exist_ok=True)
    admin_url = LOCAL_SERVER_URL if reachable(LOCAL_SERVER_URL) else start_embedded(work / "pg")
    database_url = create_database(admin_url, prefix="bench_scan")
    seaweed = SeaweedFS(workdir=data_dir).start()
    rows: list[dict[str, Any]] = []
    ok = True
    try:
        every_bucket = {name: n for layout in layouts for name, n in layout_buckets(layout, args.objects).items()}
        ensure_buckets(seaweed, every_bucket, data_dir / MARKER, work)
        for layout in layouts:
            buckets = layout_buckets(layout, args.objects)
            fill_references(database_url, buckets)
            policy = {"allow_short_min_age": True, "buckets": {
                bucket: {"min_age": "1s", "references": [
                    {"name": "refs", "query": f"SELECT location FROM refs_{index}", "format": "uri"}]}
                for index, bucket in enumerate(buckets)}}
            policy_path = work / f"policy-{layout}.yaml"
            policy_path.write_text(yaml.safe_dump(policy))
            expected_orphans = {b: sum(1 for i in range(c) if not is_referenced(i)) for b, c in buckets.items()}
            for repeat in range(args.repeats):
                for variant in variants:
                    manifests = work / f"run-{layout}-{repeat}-{variant['label']}" / "manifests"
                    manifests.mkdir(parents=True)
                    config = manifests.parent / "config.json"
                    config.write_text(json.dumps({
                        "policy": str(policy_path), "database_url": database_url, "manifests": str(manifests),
                        "diff_revision": variant["diff_revision"],
                        "s3": {"endpoint": seaweed.endpoint, "access_key": seaweed.access_key,
                               "secret_key": seaweed.secret_key},
                    }))
                    load = os.getloadavg()[0]
                    child = subprocess.run(
                        [sys.executable, __file__, "--child", str(config)], capture_output=True, text=True,
                        cwd=REPO, env={**os.environ, "DAGSTER_HOME": str(manifests.parent), **variant["env"]},
                    )
                    if child.returncode:
                        print(child.stderr[-3000:], file=sys.stderr)
                        raise RuntimeError(f"the scan child failed ({child.returncode})")
                    figures = json.loads(child.stdout.strip().splitlines()[-1])
                    shutil.rmtree(manifests.parent, ignore_errors=True)
                    match = len(figures["buckets"]) == len(buckets) and all(
                        b["ok"] and b["objects"] == buckets[b["bucket"]]
                        and b["orphans"] == expected_orphans[b["bucket"]]
                        for b in figures["buckets"]
                    )
                    ok &= match
                    row = summarise(layout, variant["label"], load, figures, match)
                    rows.append(row)
                    print(f"{layout} bucket(s) {row['variant']:<12} peak {row['peak_mb']:6.1f} MB (imports "
                          f"{row['baseline_mb']:.1f}; " + ", ".join(
                              f"{s} {row[s + '_start_mb']:.0f}->{row[s + '_mb']:.0f} MB {row[s + '_s']:.1f} s"
                              for s in STAGES) + f") scan {row['scan_seconds']:.1f} s, load {load:.1f} "
                          f"{row['check']}", flush=True)
    except BaseException:
        log = data_dir / "logs" / "weed.out"
        if log.exists():
            print(f"last lines of {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]),
                  file=sys.stderr)
        raise
    finally:
        seaweed.stop()
        drop_database(admin_url, database_url)
        shutil.rmtree(work, ignore_errors=True)

    print("\n| buckets | variant | peak RSS MB | after imports MB | inventory MB | references MB | diff MB "
          "| inventory s | references s | diff s | scan s | load avg | figures |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['layout']} | {row['variant']} | {row['peak_mb']:.1f} | {row['baseline_mb']:.1f} | "
              + " | ".join(f"{row[s + '_mb']:.1f}" for s in STAGES) + " | "
              + " | ".join(f"{row[s + '_s']:.1f}" for s in STAGES)
              + f" | {row['scan_seconds']:.1f} | {row['load']:.1f} | {row['check']} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
