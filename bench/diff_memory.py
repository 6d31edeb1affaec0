"""Peak memory and time of the orphan diff (``core.diff.compute_orphan_diff``) by bucket size.

Generates synthetic inventory and references manifests of N keys (written in chunks, so even 10M
keys do not need much memory), then runs the diff for each size in a fresh subprocess that reports
its own peak RSS from ``VmHWM`` in /proc/self/status (``ru_maxrss`` would carry the parent's peak
over ``exec`` on Linux). Prints peak RSS and seconds per size and the growth ratio largest/smallest.

    .venv/bin/python bench/diff_memory.py                       # 1M, 5M, 10M
    .venv/bin/python bench/diff_memory.py --sizes 1000000,5000000 --compare 7a2f5ff

``--compare REV`` also measures ``core/diff.py`` as of git revision REV in the same run
(7a2f5ff holds the diff that kept everything in memory).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
AS_OF = datetime(2026, 1, 1, tzinfo=UTC)
CHUNK = 250_000
KEYS_PER_DATASET = 40
# Every SIDECAR_EVERY-th object has a listed ``.json`` sidecar, kept by the companion rule when
# its ``.npy`` is referenced.
SIDECAR_EVERY = 20
ODD_EVERY = 250_000  # one key in this many needs normalisation (or cannot be normalised)
DANGLING_PER_CHUNK = 50


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def generate(directory: Path, objects: int, seed: int = 7) -> dict[str, int]:
    """Write inventory.parquet and references.parquet for ``objects`` keys; returns expected figures.

    Object i is ``synthetic/<dataset uuid>/<i>/RX_<k>k.npy``; objects with i % 3 == 0 are
    orphans (not referenced), the rest are referenced, some through a non-normal spelling.
    """
    from heimdall_storage_pipeline.core.manifests import INVENTORY_SCHEMA, REFERENCES_SCHEMA

    rng = np.random.default_rng(seed)
    expected = {"objects": 0, "orphans": 0, "unparseable": 0, "dangling": 0}
    with (
        pq.ParquetWriter(directory / "inventory.parquet", INVENTORY_SCHEMA, compression="zstd") as inventory,
        pq.ParquetWriter(directory / "references.parquet", REFERENCES_SCHEMA, compression="zstd") as references,
    ):
        for start in range(0, objects, CHUNK):
            stop = min(objects, start + CHUNK)
            datasets = [str(uuid.UUID(int=int(x), version=4)) for x in rng.integers(0, 2**63, stop - start)]
            keys: list[str] = []
            refs: list[str] = []
            for offset, i in enumerate(range(start, stop)):
                stem = f"synthetic/{datasets[offset - offset % KEYS_PER_DATASET]}/{i}/RX_{i % 1000:03d}k"
                key = f"{stem}.npy"
                if i % ODD_EVERY == 1:
                    key = f"/{stem}//x.npy"  # normalises to stem/x.npy, which is referenced
                    refs.append(f"{stem}/x.npy")
                elif i % ODD_EVERY == 2:
                    key = f"{stem}/../x.npy"  # unparseable: an orphan that is never eligible
                    expected["unparseable"] += 1
                    expected["orphans"] += 1
                elif i % 3 == 0:
                    expected["orphans"] += 1
                else:
                    refs.append(key)
                keys.append(key)
                if i % SIDECAR_EVERY == 0:
                    keys.append(f"{stem}.json")
                    # Kept only when its .npy is referenced (i % 3 != 0); those with i % 3 == 0 are orphans.
                    expected["orphans"] += i % 3 == 0 or i % ODD_EVERY in (1, 2)
            refs += [f"synthetic/gone/{start + j}.npy" for j in range(DANGLING_PER_CHUNK)]
            expected["dangling"] += DANGLING_PER_CHUNK
            order = rng.permutation(len(refs))
            refs = [refs[j] for j in order]  # references come in database order, not key order
            count = len(keys)
            expected["objects"] += count
            modified = AS_OF - timedelta(days=120)
            inventory.write_table(pa.table({
                "key": pa.array(keys, pa.string()),
                "size": pa.array(rng.integers(1, 50_000_000, count), pa.int64()),
                "last_modified": pa.array(
                    np.datetime64(modified.replace(tzinfo=None), "us")
                    + rng.integers(0, 120 * 86_400 * 10**6, count).astype("timedelta64[us]"),
                    pa.timestamp("us", tz="UTC"),
                ),
                "etag": pa.array([f"{j:032x}" for j in rng.integers(0, 2**63, count)], pa.string()),
            }, schema=INVENTORY_SCHEMA))
            references.write_table(
                pa.table({"key": pa.array(refs, pa.string()), "source": pa.array(["assets"] * len(refs))},
                         schema=REFERENCES_SCHEMA)
            )
    return expected


def _load_diff_at(revision: str) -> object:
    """core/diff.py as of a git revision, imported under another name."""
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


def child(directory: Path, variant: str) -> None:
    """Run one diff and print its figures as JSON (runs in a fresh process)."""
    from heimdall_storage_pipeline.core.manifests import ManifestStore
    from heimdall_storage_pipeline.core.policy import BucketPolicy, CompanionRule

    if variant == "current":
        from heimdall_storage_pipeline.core import diff as module
    else:  # without the current diff's imports (duckdb), which the compared one may not need
        module = _load_diff_at(variant)
    policy = BucketPolicy(
        name="bench", enabled=True, min_age=timedelta(days=30), batch_size=1000, description="bench",
        references=(), companions=(CompanionRule("sidecar", r"^(.*)\.npy$", r"\1.json"),),
    )
    store = ManifestStore(str(directory / "store"))
    base = _vm_hwm_mb()
    started = time.perf_counter()
    result = module.compute_orphan_diff(  # type: ignore[attr-defined]
        bucket=policy, store=store, inventory_uri=str(directory / "inventory.parquet"),
        references_uri=str(directory / "references.parquet"), as_of=AS_OF, run_id="benchrun",
    )
    seconds = time.perf_counter() - started
    print(json.dumps({
        "seconds": seconds, "base_mb": base, "peak_mb": _vm_hwm_mb(), "objects": result.object_count,
        "orphans": result.orphan_count, "unparseable": result.unparseable_object_count,
        "dangling": result.dangling_reference_count, "eligible": result.eligible_orphan_count,
    }))
    shutil.rmtree(directory / "store", ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,5000000,10000000", help="comma-separated object counts")
    parser.add_argument("--compare", default=None, metavar="REV", help="also run core/diff.py as of git REV")
    parser.add_argument("--dir", default=None, help="where to generate manifests (default: a temp dir)")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return 0

    root = Path(tempfile.mkdtemp(prefix="diff-bench-", dir=args.dir))
    rows: list[dict[str, object]] = []
    ok = True
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            directory = root / str(size)
            directory.mkdir()
            started = time.perf_counter()
            expected = generate(directory, size)
            print(f"generated {size:,} objects in {time.perf_counter() - started:.1f} s", flush=True)
            for variant in ("current", *((args.compare,) if args.compare else ())):
                output = subprocess.run(
                    [sys.executable, __file__, "--child", str(directory), variant],
                    check=True, capture_output=True, text=True, cwd=REPO,
                ).stdout
                figures = json.loads(output.strip().splitlines()[-1])
                match = all(figures[k] == expected[k] for k in expected)
                ok &= match
                rows.append({"size": size, "variant": variant, **figures, "check": "OK" if match else "MISMATCH"})
                print(f"  {variant:<12} {figures['seconds']:7.1f} s  peak {figures['peak_mb']:7.1f} MB  "
                      f"(after imports {figures['base_mb']:.1f} MB)  {rows[-1]['check']}", flush=True)
            shutil.rmtree(directory)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print("\n| objects | variant | diff seconds | peak RSS MB | RSS after imports MB | figures |")
    print("|---:|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['size']:,} | {row['variant']} | {row['seconds']:.1f} | {row['peak_mb']:.1f} | "
              f"{row['base_mb']:.1f} | {row['check']} |")
    for variant in {str(r["variant"]) for r in rows}:
        peaks = [r for r in rows if r["variant"] == variant]
        if len(peaks) > 1:
            growth = float(peaks[-1]["peak_mb"]) / float(peaks[0]["peak_mb"])  # type: ignore[arg-type]
            print(f"\n{variant}: peak RSS {peaks[-1]['size']:,} / {peaks[0]['size']:,} objects = {growth:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
