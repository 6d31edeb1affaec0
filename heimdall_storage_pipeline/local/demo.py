"""``make demo``: embedded PostgreSQL + SeaweedFS, a seeded Heimdall, a real scan, a report.

Everything lives under the work directory (default ``.demo/``) and is stopped at the end.
The demo policy is the shipped Heimdall policy with minimum ages of seconds instead of
days, so that the seeded "old" orphans can age while you watch. ``make demo`` starts from an
empty world; ``make dev`` reuses the world a completed demo left (or seeds one) and serves the UI.
The report goes to stdout, the runs' Dagster log to ``demo.log`` in the work directory.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import sqlalchemy as sa
import yaml

from heimdall_storage_pipeline.core.clock import isoformat_utc, utc_now
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.policy import default_policy_path, format_duration, load_policy
from heimdall_storage_pipeline.local import heimdall_db
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
DEMO_CAPACITY = "64 KiB"  # the demo's disk: its buckets hold some 40 KiB
HISTORY_DAYS = 30  # synthetic days seeded before today's real scan
CHART_FILE = "storage-report.png"
REPO_ROOT = Path(__file__).resolve().parents[2]
SEEDED_FILE = "seeded.json"  # written once the world is seeded, scanned and planned: what `make dev` reuses
ENV_FILE = "env.json"  # the running servers' environment for --print-env; mode 0600, it holds secrets
LOG_FILE = "demo.log"  # the demo runs' Dagster log
UI_LOG_FILE = "dagster-dev.log"
UI_PORT = 3000
UI_START_SECONDS = 300
ENV_NAMES = ("MINIO_ENDPOINT", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "MINIO_SECURE", "HEIMDALL_DATABASE_URL",
             "HEIMDALL_STORAGE_POLICY", "DAGSTER_HOME", "DAGSTER_PG_URL")
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
    document["capacity_bytes"] = DEMO_CAPACITY
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


def _seeded_database(root: Path) -> tuple[str, str] | None:
    """The database and seeding time of the completed demo under ``root``, if there is one."""
    try:
        seeded = json.loads((root / SEEDED_FILE).read_text())
        return str(seeded["heimdall_database"]), str(seeded["seeded_at"])
    except (OSError, ValueError, KeyError):
        return None


def run_demo(workdir: str = ".demo", serve_ui: bool = False, ui_port: int = UI_PORT) -> int:
    root = Path(workdir).resolve()
    reused = _seeded_database(root) if serve_ui else None
    if root.exists() and reused is None:
        print(f"Removing the previous demo under {root}: "
              + ("every `make demo` starts from an empty world" if not serve_ui else
                 "it was never completed, so the world is seeded from scratch"), flush=True)
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    print(f"Starting embedded PostgreSQL and SeaweedFS under {root} (Dagster's log: {root / LOG_FILE}) ...",
          flush=True)
    admin_url = start_embedded(root / "postgres")
    seaweed = SeaweedFS(workdir=root / "seaweedfs")
    try:
        seaweed.start()
        database_url = with_database(admin_url, reused[0]) if reused else _seed(admin_url, seaweed)
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
        _write_env(root, env)
        if reused:
            print(f"\nReusing the demo world seeded at {reused[1]} (`make demo` starts from an empty one); "
                  f"its latest scan:\n")
            print(render_report(_latest_report_rows()))
        else:
            _scan_and_plan(root, as_of)
            (root / SEEDED_FILE).write_text(json.dumps({
                "heimdall_database": sa.engine.make_url(database_url).database, "seeded_at": isoformat_utc(as_of)}))
        print(f"\nManifests: {root / 'dagster_home' / 'manifests'}")
        if serve_ui:
            return _serve_ui(env, root, ui_port)
        print("\nThe servers stop now. `make dev` keeps them running and serves the UI; "
              "`heimdall-storage demo --print-env` then prints the environment that reaches them.")
        return 0
    finally:
        (root / ENV_FILE).unlink(missing_ok=True)
        seaweed.stop()
        stop_embedded(root / "postgres")  # else it runs until this process exits


def _seed(admin_url: str, seaweed: SeaweedFS) -> str:
    """A fresh Heimdall database and buckets, seeded; returns the database's URL."""
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
    return database_url


def _scan_and_plan(root: Path, as_of: datetime) -> None:
    log = root / LOG_FILE
    rows = _scan_every_bucket(as_of, log)
    print("\nOrphan report (demo policy: minimum age "
          f"{format_duration(timedelta(seconds=DEMO_MIN_AGE_SECONDS))}; Heimdall's is 30d/60d)\n")
    print(render_report(rows))
    print(f"\nDry-run cleanup with {DRY_RUN_CONFIG.relative_to(REPO_ROOT)}: every bucket gets a plan\n")
    print(render_table(PLAN_COLUMNS, _plan_every_bucket(log)))
    print("\nReview a plan with `heimdall-storage plan show <plan>`; a live run with `plan: <plan>` deletes "
          "exactly its keys, each re-validated (README: \"Plan, review, apply\").")
    _history(root, log, rows)


def seed_history(store: ManifestStore, today: date, rows: list[dict[str, Any]], days: int = HISTORY_DAYS) -> None:
    """``days`` synthetic days before ``today``, ending near today's figures: referenced bytes grow 1.5 % a
    day, orphans slowly; in the synthetic IQ bucket (the predecessor's leak) three times as fast in the last week."""
    from heimdall_storage_pipeline.core.capacity import HISTORY_SCHEMA

    for back in range(days, 0, -1):
        day = today - timedelta(days=back)
        figures = []
        for row in rows:
            orphans, total = int(row["orphan_bytes"]), int(row["total_bytes"])
            leak = row["bucket"] == heimdall_db.SYNTHETIC_BUCKET
            orphans_then = orphans * (1 - (0.06 * back if back <= 7 else 0.42 + 0.02 * (back - 7))) if leak \
                else orphans * (1 - 0.01 * back)
            figures.append({"day": day, "bucket": row["bucket"], "object_count": int(row["object_count"]),
                            "total_bytes": int((total - orphans) * (1 - 0.015 * back) + orphans_then),
                            "orphan_bytes": int(orphans_then), "eligible_bytes": int(orphans_then * 0.9),
                            "deleted_bytes": 0,
                            "scanned_at": datetime.combine(day, datetime.min.time(), UTC)})
        store.write_table(store.history_uri(day), pa.Table.from_pylist(figures, schema=HISTORY_SCHEMA))


def _history(root: Path, log: Path, rows: list[dict[str, Any]]) -> None:
    """Seed a month of synthetic history, record today's from the real scans, print the capacity report."""
    from heimdall_storage_pipeline.cli import main
    from heimdall_storage_pipeline.defs.build import build_definitions
    from heimdall_storage_pipeline.defs.resources import manifest_store_from_env

    today = utc_now().date()
    seed_history(manifest_store_from_env(), today, rows)
    job = build_definitions(load_policy()).resolve_job_def("storage_history_job")
    with dg.DagsterInstance.get() as instance:
        logged_job, run_config = _logging_to(job, log, {})
        result = logged_job.execute_in_process(partition_key=today.isoformat(), instance=instance,
                                               run_config=run_config)
    print(f"\nCapacity ({HISTORY_DAYS} synthetic days, then today's scans; demo capacity {DEMO_CAPACITY})\n\n"
          f"  storage_history[{today}]: {'success' if result.success else 'FAILED'}\n", flush=True)
    if not result.success:
        raise SystemExit(f"storage_history failed; see {log}")
    main(["report", "--chart", str(root / CHART_FILE)])


def _write_env(root: Path, env: dict[str, str]) -> None:
    """What --print-env prints while this process serves the demo; readable by its owner only."""
    path = root / ENV_FILE
    path.touch(mode=0o600)
    path.write_text(json.dumps({"pid": os.getpid(), "env": {name: env[name] for name in ENV_NAMES}}))


def print_env(workdir: str = ".demo") -> int:
    """``export NAME=value`` lines that point the CLI, ``dagster`` and the exporter at the running demo."""
    root = Path(workdir).resolve()
    try:
        recorded = json.loads((root / ENV_FILE).read_text())
        os.kill(int(recorded["pid"]), 0)  # the demo that wrote it still runs
    except (OSError, ValueError, KeyError):
        print(f"no demo is running under {root}; start one with `make dev` (the servers of `make demo` stop "
              f"once it has printed its report)", file=sys.stderr)
        return 1
    for name, value in recorded["env"].items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


@dg.logger(config_schema={"path": str}, description="The run's log lines, appended to a file.")
def _file_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    path = str(init_context.logger_config["path"])
    logger = logging.getLogger("heimdall_storage_pipeline.demo.runs")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # the file only, not the terminal
    if not any(getattr(handler, "baseFilename", None) == path for handler in logger.handlers):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
        logger.addHandler(handler)
    return logger


def _logging_to(job: dg.JobDefinition, log: Path, run_config: dict[str, Any]) -> tuple[dg.JobDefinition, dict]:
    """The job with its log lines in ``log`` instead of on the terminal; the event log keeps them all."""
    return (job.with_logger_defs({"file": _file_logger}),
            {**run_config, "loggers": {"file": {"config": {"path": str(log)}}}})


def _latest_report_rows() -> list[dict[str, Any]]:
    from heimdall_storage_pipeline.defs.materializations import latest_metadata

    with dg.DagsterInstance.get() as instance:
        return [{"bucket": bucket.name, **(latest_metadata(instance, "orphan_diff", bucket.name) or {})}
                for bucket in load_policy().enabled_buckets()]


def _scan_every_bucket(as_of: datetime, log: Path) -> list[dict[str, Any]]:
    from heimdall_storage_pipeline.defs.build import build_definitions
    from heimdall_storage_pipeline.defs.materializations import latest_metadata

    policy = load_policy()
    defs = build_definitions(policy)
    job = defs.resolve_job_def("storage_scan_job")
    rows = []
    with dg.DagsterInstance.get() as instance:
        for bucket in policy.enabled_buckets():
            started = utc_now()
            logged_job, run_config = _logging_to(
                job, log, {"ops": {"orphan_diff": {"config": {"as_of": isoformat_utc(as_of)}}}})
            result = logged_job.execute_in_process(partition_key=bucket.name, instance=instance, run_config=run_config)
            seconds = (utc_now() - started).total_seconds()
            print(f"  storage_scan_job[{bucket.name}]: "
                  f"{'success' if result.success else 'FAILED'} in {seconds:.1f} s", flush=True)
            if not result.success:
                raise SystemExit(f"the scan of {bucket.name} failed; see {log}")
            rows.append({"bucket": bucket.name, **(latest_metadata(instance, "orphan_diff", bucket.name) or {})})
    return rows


def _plan_every_bucket(log: Path) -> list[dict[str, Any]]:
    """The shipped dry-run config, as an operator would launch it: one plan per bucket."""
    from heimdall_storage_pipeline.defs.build import build_definitions
    from heimdall_storage_pipeline.defs.materializations import ORPHAN_DELETIONS, latest_metadata

    policy = load_policy()
    job = build_definitions(policy).resolve_job_def("delete_orphans_job")
    with dg.DagsterInstance.get() as instance:
        logged_job, run_config = _logging_to(job, log, yaml.safe_load(DRY_RUN_CONFIG.read_text()))
        result = logged_job.execute_in_process(instance=instance, run_config=run_config)
        print(f"  delete_orphans_job (dry run): {'success' if result.success else 'FAILED'}", flush=True)
        if not result.success:
            raise SystemExit(f"the dry-run cleanup failed; see {log}")
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


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _port_taken(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _serve_ui(env: dict[str, str], root: Path, port: int) -> int:
    log, url = root / UI_LOG_FILE, f"http://127.0.0.1:{port}"
    if _port_taken(port):
        print(f"port {port} on 127.0.0.1 is in use (another dagster dev?); stop it or pass --ui-port", file=sys.stderr)
        return 2
    print(f"\nStarting the Dagster UI (dagster dev; its log: {log}) ...", flush=True)
    # dagster dev runs in its own session; turn SIGTERM into the Ctrl-C path so that it, and
    # the demo's servers, are stopped rather than orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    command = [str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port),
               "-w", str(REPO_ROOT / "workspace.yaml")]
    with log.open("ab") as out:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + UI_START_SECONDS
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                print(f"dagster dev did not start; the end of {log}:\n{tail}", file=sys.stderr)
                _stop(process)
                return process.returncode or 1
            time.sleep(0.5)  # poll interval, not synchronisation
        print(f"Dagster UI on {url} (Ctrl-C or SIGTERM stops everything). To point the CLI or the exporter "
              f"at these servers from another terminal:\n  eval \"$({Path(sys.executable).parent}/heimdall-storage "
              f"demo --print-env --workdir {shlex.quote(str(root))})\"", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    return process.wait(timeout=30)
