"""Versioned buckets: what a scan and a deletion batch cost with versioning on, against an unversioned bucket.

    .venv/bin/python bench/versions.py --objects 20000 [--versions 2] [--repeats 3]

Starts its own SeaweedFS, fills an unversioned and a versioned bucket with the same keys (the
versioned one with ``--versions`` versions of each), then times ``list_bucket_to_manifest`` on
both (the versioned one also lists versions into its versions manifest), and, for batches of
1000 keys in listing order, the fresh stat, the fresh version listing (``fresh_versions``) and
the DeleteObjects of every version. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from minio.commonconfig import ENABLED
from minio.deleteobjects import DeleteObject
from minio.versioningconfig import VersioningConfig

from heimdall_storage_pipeline.core.list_objects_v2 import ListObjectsV2
from heimdall_storage_pipeline.core.listing import list_bucket_to_manifest
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.revalidation import fresh_versions, stat_objects
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=20_000)
    parser.add_argument("--versions", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="heimdall-bench-versions-") as work:
        server = SeaweedFS(workdir=Path(work) / "seaweedfs").start()
        try:
            run(server, Path(work), args.objects, args.versions, args.repeats)
        finally:
            server.stop()


def run(server: SeaweedFS, work: Path, objects: int, versions: int, repeats: int) -> None:
    client = server.client()
    keys = sorted(f"sessions/{i % 97:02d}/websdr-{i:07d}.npy" for i in range(objects))
    client.make_bucket("plain-bench")
    client.make_bucket("versioned-bench")
    client.set_bucket_versioning("versioned-bench", VersioningConfig(ENABLED))

    def put(bucket_key: tuple[str, str]) -> None:
        client.put_object(*bucket_key, io.BytesIO(b"x" * 10), 10)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, [("plain-bench", key) for key in keys]))
        for _ in range(versions):
            list(pool.map(put, [("versioned-bench", key) for key in keys]))
    store = ManifestStore(str(work / "manifests"))
    for _ in range(repeats):
        for bucket in ("plain-bench", "versioned-bench"):
            began = time.perf_counter()
            result = list_bucket_to_manifest(server.settings(), bucket, store, "bench")
            seconds = time.perf_counter() - began
            print(f"scan listing {bucket}: {result.object_count} objects, "
                  f"{result.object_count + result.noncurrent_versions} versions, {seconds:.2f} s "
                  f"({result.object_count / seconds:.0f} objects/s)")
    lister = ListObjectsV2(server.settings(), "versioned-bench")
    for start in range(0, min(len(keys), 1000 * repeats), 1000):
        batch = keys[start:start + 1000]
        began = time.perf_counter()
        stat_objects(client, "versioned-bench", batch, lister)
        stat = time.perf_counter() - began
        began = time.perf_counter()
        found = fresh_versions(lister, batch)
        listing = time.perf_counter() - began
        doomed = [DeleteObject(key, v.version_id) for key in batch for v in found[key]]
        began = time.perf_counter()
        errors = list(client.remove_objects("versioned-bench", doomed))
        print(f"batch of {len(batch)} keys: stat {stat:.2f} s, fresh_versions {listing:.2f} s, "
              f"DeleteObjects of {len(doomed)} versions {time.perf_counter() - began:.2f} s, {len(errors)} errors")


if __name__ == "__main__":
    main()
