"""``make demo``: embedded PostgreSQL + SeaweedFS, a seeded Heimdall, a real scan, a report.

Everything lives under the work directory (default ``.demo/``) and is stopped at the end.
The demo policy is the shipped Heimdall policy with minimum ages of seconds instead of
days, so that the seeded "old" orphans can age while you watch.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import sqlalchemy as sa
import yaml

from heimdall_storage_pipeline.core.clock import isoformat_utc, utc_now
from heimdall_storage_pipeline.core.policy import default_policy_path, format_duration, load_policy
from heimdall_storage_pipeline.local.heimdall_db import (
    SeededWorld,
    create_schema,
    seed_old_objects,
    seed_young_objects,
)
from heimdall_storage_pipeline.local.postgres import (
    create_database,
    start_embedded,
    stop_embedded,
    with_database,
)
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS

DEMO_MIN_AGE_SECONDS = 5
REPO_ROOT = Path(__file__).resolve().parents[2]
DRY_RUN_CONFIG = REPO_ROOT / "config" / "delete_orphans.dry_run.yaml"
PLAN_COLUMNS = (
    ("bucket", "bucket"), ("plan", "plan_id"), ("would delete", "would_delete_count"),
    ("bytes", "would_delete_bytes"), ("guard verdict", "verdict"),
)
REPORT_COLUMNS = (
    ("bucket", "bucket"), ("objects", "object_count"), ("bytes", "total_bytes"),
    ("referenced", "referenced_count"), ("orphans", "orphan_count"),
    ("eligible", "eligible_orphan_count"), ("eligible bytes", "eligible_orphan_bytes"),
    ("young", "young_orphan_count"), ("dangling refs", "dangling_reference_count"),
    ("orphan share", "orphan_share_bytes"), ("health", "health_status"),
)


def write_demo_policy(path: Path) -> Path:
    document = yaml.safe_load(default_policy_path().read_text())
    document["allow_short_min_age"] = True
    for bucket in document["buckets"].values():
        bucket.pop("min_age_days", None)
        bucket["min_age"] = f"{DEMO_MIN_AGE_SECONDS}s"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def render_report(rows: list[dict[str, Any]]) -> str:
    return render_table(REPORT_COLUMNS, rows)


def render_table(columns: tuple[tuple[str, str], ...], rows: list[dict[str, Any]]) -> str:
    table = [[header for header, _ in columns]]
    for row in rows:
        cells = []
        for _, field in columns:
            value = row.get(field, "")
            cells.append(f"{value:.1%}" if isinstance(value, float) else str(value))
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _prepare_instance(home: Path, admin_url: str) -> str:
    """A PostgreSQL-backed DAGSTER_HOME using the project's dagster.yaml."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        exists = connection.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = 'dagster'")).first()
        if not exists:
            connection.execute(sa.text("CREATE DATABASE dagster"))
    engine.dispose()
    return with_database(admin_url, "dagster")


def run_demo(workdir: str = ".demo", serve_ui: bool = False) -> int:
    root = Path(workdir).resolve()
    if root.exists() and not serve_ui:
        shutil.rmtree(root)  # every demo starts from an empty world
    root.mkdir(parents=True, exist_ok=True)
    print(f"Starting embedded PostgreSQL and SeaweedFS under {root} ...", flush=True)
    admin_url = start_embedded(root / "postgres")
    seaweed = SeaweedFS(workdir=root / "seaweedfs")
    try:
        seaweed.start()
        database_url = create_database(admin_url, prefix="heimdall")
        engine = sa.create_engine(database_url)
        create_schema(engine)
        client = seaweed.client()
        world = SeededWorld()
        seed_old_objects(engine, client, world)
        engine.dispose()
        # Let the seeded orphans pass the demo policy's minimum age, then upload fresh ones.
        time.sleep(DEMO_MIN_AGE_SECONDS + 1)
        seed_young_objects(client, world)
        # Ages are measured at this one moment, however long the scans then take.
        as_of = utc_now()

        env = {
            **seaweed.env(),
            "HEIMDALL_DATABASE_URL": database_url,
            "HEIMDALL_STORAGE_POLICY": str(write_demo_policy(root / "policy.yaml")),
            "DAGSTER_HOME": str(root / "dagster_home"),
            "DAGSTER_PG_URL": _prepare_instance(root / "dagster_home", admin_url),
        }
        os.environ.update(env)
        rows = _scan_every_bucket(as_of)
        print("\nOrphan report (demo policy: minimum age "
              f"{format_duration(timedelta(seconds=DEMO_MIN_AGE_SECONDS))}; Heimdall's is 30d/60d)\n")
        print(render_report(rows))
        print(f"\nDry-run cleanup with {DRY_RUN_CONFIG.relative_to(REPO_ROOT)}: every bucket gets a plan\n")
        print(render_table(PLAN_COLUMNS, _plan_every_bucket()))
        print("\nReview a plan with `heimdall-storage plan show <plan>`; a live run with `plan: <plan>` deletes "
              "exactly its keys, each re-validated (README: \"Plan, review, apply\").")
        print(f"\nManifests: {root / 'dagster_home' / 'manifests'}")
        if serve_ui:
            return _serve_ui(env)
        return 0
    finally:
        seaweed.stop()
        stop_embedded(root / "postgres")  # else it runs until this process exits


def _scan_every_bucket(as_of: datetime) -> list[dict[str, Any]]:
    from heimdall_storage_pipeline.defs.build import build_definitions
    from heimdall_storage_pipeline.defs.materializations import latest_metadata

    policy = load_policy()
    defs = build_definitions(policy)
    job = defs.resolve_job_def("storage_scan_job")
    rows = []
    with dg.DagsterInstance.get() as instance:
        for bucket in policy.enabled_buckets():
            started = utc_now()
            result = job.execute_in_process(
                partition_key=bucket.name,
                instance=instance,
                run_config={"ops": {"orphan_diff": {"config": {"as_of": isoformat_utc(as_of)}}}},
            )
            seconds = (utc_now() - started).total_seconds()
            print(f"  storage_scan_job[{bucket.name}]: "
                  f"{'success' if result.success else 'FAILED'} in {seconds:.1f} s", flush=True)
            if not result.success:
                raise SystemExit(f"the scan of {bucket.name} failed; see the log above")
            rows.append({"bucket": bucket.name, **(latest_metadata(instance, "orphan_diff", bucket.name) or {})})
    return rows


def _plan_every_bucket() -> list[dict[str, Any]]:
    """The shipped dry-run config, as an operator would launch it: one plan per bucket."""
    from heimdall_storage_pipeline.defs.build import build_definitions
    from heimdall_storage_pipeline.defs.materializations import ORPHAN_DELETIONS, latest_metadata

    policy = load_policy()
    job = build_definitions(policy).resolve_job_def("delete_orphans_job")
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, run_config=yaml.safe_load(DRY_RUN_CONFIG.read_text()))
        print(f"  delete_orphans_job (dry run): {'success' if result.success else 'FAILED'}", flush=True)
        if not result.success:
            raise SystemExit("the dry-run cleanup failed; see the log above")
        rows = []
        for bucket in policy.enabled_buckets():
            meta = latest_metadata(instance, ORPHAN_DELETIONS, bucket.name) or {}
            verdict = str(meta.get("guard_verdict", ""))
            guards = [part.split(":")[0].strip() for part in verdict.removeprefix("would refuse:").split(";")]
            rows.append({**meta, "bucket": bucket.name, "verdict": verdict if verdict == "pass" else
                         f"a live run would refuse ({', '.join(guards)})"})
    return rows


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _serve_ui(env: dict[str, str]) -> int:
    print("\nDagster UI on http://127.0.0.1:3000 (Ctrl-C or SIGTERM stops everything)", flush=True)
    # dagster dev runs in its own session; turn SIGTERM into the Ctrl-C path so that it, and
    # the demo's servers, are stopped rather than orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    command = [str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", "3000",
               "-w", str(REPO_ROOT / "workspace.yaml")]
    process = subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGTERM)
        return process.wait(timeout=30)
