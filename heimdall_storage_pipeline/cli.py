"""``heimdall-storage``: operator commands that need no Dagster UI."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from heimdall_storage_pipeline.core.policy import PolicyError, format_duration, load_policy, policy_path_from_env
from heimdall_storage_pipeline.core.settings import dagster_instance_problem, database_url_problem
from heimdall_storage_pipeline.core.units import format_bytes, format_rate, format_table

if TYPE_CHECKING:
    from heimdall_storage_pipeline.core.capacity import Trend
    from heimdall_storage_pipeline.core.plans import Plan


def _validate_policy(args: argparse.Namespace) -> int:
    """Validate a policy file without touching any server."""
    paths = args.paths or [str(policy_path_from_env())]
    failed = 0
    for path in paths:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            for problem in str(exc).splitlines():
                print(f"INVALID {problem}", file=sys.stderr)
            failed += 1
            continue
        print(f"OK {path}")
        print(f"  capacity: {format_bytes(policy.capacity_bytes)} ({policy.capacity_bytes} bytes)"
              if policy.capacity_bytes else "  capacity: not set (no days-until-full forecast)")
        for bucket in policy.buckets:
            state = "enabled" if bucket.enabled else "disabled"
            sources = ", ".join(
                f"{source.name} (timeout {format_duration(source.statement_timeout)})" for source in bucket.references
            )
            print(f"  {bucket.name}: {state}, min age {format_duration(bucket.min_age)}, "
                  f"batch {bucket.batch_size}, sources: {sources}")
    return 1 if failed else 0


def _demo(args: argparse.Namespace) -> int:
    from heimdall_storage_pipeline.local import DEMO_EXTRA_HINT, DEMO_PACKAGES

    try:
        from heimdall_storage_pipeline.local.demo import print_env, run_demo
        from heimdall_storage_pipeline.local.seaweedfs import weed_binary

        if args.print_env:
            return print_env(workdir=args.workdir)
        weed_binary()
    except ModuleNotFoundError as exc:
        if exc.name not in DEMO_PACKAGES:
            raise
        print(f"the demo needs the {exc.name!r} package; {DEMO_EXTRA_HINT}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # no 'weed' binary
        print(exc, file=sys.stderr)
        return 2
    return run_demo(workdir=args.workdir, serve_ui=args.ui, ui_port=args.ui_port)


def _migrate(args: argparse.Namespace) -> int:
    """Apply the project's migrations: the outbox in Heimdall's database, and the audit tables."""
    from heimdall_storage_pipeline.core.errors import StorageCleanupError
    from heimdall_storage_pipeline.core.migrations import apply_migrations
    from heimdall_storage_pipeline.core.references import make_engine

    if not args.database_url:
        print("no database: pass --database-url or set HEIMDALL_DATABASE_URL", file=sys.stderr)
        return 2
    targets = [("heimdall", args.database_url, "--database-url (HEIMDALL_DATABASE_URL)")]
    if args.audit_database_url:
        targets.append(("audit", args.audit_database_url,
                        "--audit-database-url (HEIMDALL_AUDIT_DB_URL, else DAGSTER_PG_URL)"))
    for _, url, setting in targets:
        problem = database_url_problem(url, setting)
        if problem:
            print(f"FAILED {problem}", file=sys.stderr)
            return 2
    for target, url, _ in targets:
        try:
            engine = make_engine(url)
            try:
                applied = apply_migrations(engine, target)
            finally:
                engine.dispose()
        except StorageCleanupError as exc:
            print(f"FAILED {exc}", file=sys.stderr)
            return 1
        print(f"OK {target} database: {', '.join(applied) if applied else 'already current'}")
    return 0


def _find_plan_in_instance(plan_id: str) -> tuple[Plan, dict[str, object]]:
    """The plan from $DAGSTER_HOME's instance; the instance's own failures become one line, no password."""
    import dagster as dg

    from heimdall_storage_pipeline.core.errors import StorageCleanupError
    from heimdall_storage_pipeline.defs.cleanup.plans import find_plan
    from heimdall_storage_pipeline.exporter.collector import describe_failure

    # Dagster's PostgreSQL storage logs each retry of a failed connection at WARNING; the one line below says it.
    logging.basicConfig(level=logging.ERROR)
    try:
        with dg.DagsterInstance.get() as instance:
            return find_plan(instance, plan_id)
    except StorageCleanupError:
        raise
    except Exception as exc:  # Dagster's and its storage's errors, whatever their class
        raise StorageCleanupError(f"cannot read the Dagster instance of DAGSTER_HOME: {describe_failure(exc)}") \
            from None


def _plan_show(args: argparse.Namespace) -> int:
    """Print a plan for review; optionally write its keys as CSV and the run config that applies it."""
    import sqlalchemy as sa
    import yaml

    from heimdall_storage_pipeline.core.audit import plan_application
    from heimdall_storage_pipeline.core.clock import utc_now
    from heimdall_storage_pipeline.core.errors import StorageCleanupError, database_error
    from heimdall_storage_pipeline.core.plans import write_plan_csv
    from heimdall_storage_pipeline.core.references import make_engine
    from heimdall_storage_pipeline.defs.cleanup.plans import apply_config, describe_plan
    from heimdall_storage_pipeline.defs.resources import manifest_store_from_env

    problem = dagster_instance_problem()
    audit_setting = "HEIMDALL_AUDIT_DB_URL" if os.environ.get("HEIMDALL_AUDIT_DB_URL") else "DAGSTER_PG_URL"
    audit_url = os.environ.get(audit_setting)
    if problem is None and audit_url:
        problem = database_url_problem(audit_url, audit_setting)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        plan, metadata = _find_plan_in_instance(args.plan_id)
        store = manifest_store_from_env()
        applied = None
        if audit_url:
            engine = make_engine(audit_url)
            try:
                applied = plan_application(engine, plan.plan_id)
            except sa.exc.DBAPIError as exc:
                raise database_error(engine, "read the plan applications", exc, f"check {audit_setting}") from None
            finally:
                engine.dispose()
        report = describe_plan(plan, metadata, store, utc_now(), applied)
        if args.csv:
            with (sys.stdout if args.csv == "-" else open(args.csv, "w", newline="", encoding="utf-8")) as out:
                rows = write_plan_csv(store, plan, out)
            report += f"\n\n{rows} keys written to {'stdout' if args.csv == '-' else args.csv}"
    except StorageCleanupError as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        return 1
    if args.apply_config:
        Path(args.apply_config).write_text(yaml.safe_dump(apply_config(plan.plan_id), sort_keys=False))
        report += f"\nrun config that applies it written to {args.apply_config}"
    print(report, file=sys.stderr if args.csv == "-" else sys.stdout)
    return 0


def _trend_word(trend: Trend) -> str:
    if trend.leak:
        return f"LEAK: orphan inflow {trend.inflow_7d / trend.inflow_norm:.1f}x its norm" if trend.inflow_norm \
            else "LEAK: orphans where there were none"
    if trend.growth_7d is None or trend.growth_30d is None:
        return "too little history"
    if trend.growth_7d > 1.25 * max(trend.growth_30d, 0):
        return "accelerating"
    return "slowing" if trend.growth_7d < 0.8 * trend.growth_30d else "steady"


def _report(args: argparse.Namespace) -> int:
    """Per bucket: figures, trend and forecast from the storage history; a PNG chart of stored vs orphaned bytes."""
    from heimdall_storage_pipeline.core import capacity
    from heimdall_storage_pipeline.core.errors import StorageCleanupError
    from heimdall_storage_pipeline.defs.resources import manifest_store_from_env

    try:
        policy = load_policy(args.policy)
        store = manifest_store_from_env()
        table = store.read_history(capacity.HISTORY_SCHEMA)
    except (PolicyError, StorageCleanupError) as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        return 2
    if table.num_rows == 0:
        print(f"no storage history in {store.root}/history; materialize storage_history (its daily schedule, "
              f"or a backfill of the days the instance holds)", file=sys.stderr)
        return 1
    history = capacity.by_bucket(table)
    found = capacity.trends(history)
    total = found[-1]
    outlook = capacity.forecast(total, policy.capacity_bytes) if policy.capacity_bytes else None
    days = capacity.history_days(history)
    print(f"Storage on {total.day} ({len(days)} days of history since {days[0]}); rates are per day, "
          f"deletions added back\n")
    rows = [[t.bucket, format_bytes(t.stored_bytes), "-" if t.orphan_bytes is None else format_bytes(t.orphan_bytes),
             format_rate(t.growth_7d), format_rate(t.growth_30d), format_rate(t.inflow_7d), format_rate(t.inflow_norm),
             _trend_word(t)] for t in found]
    print(format_table(["bucket", "stored", "orphaned", "growth 7d", "growth 30d", "orphan inflow 7d",
                        "inflow norm", "trend"], rows))
    print(f"\nForecast: {capacity.forecast_text(outlook, policy.capacity_bytes)}")
    Path(args.chart).write_bytes(capacity.chart_png(history, policy.capacity_bytes, outlook))
    print(f"Chart: {args.chart}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heimdall-storage", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate-policy", help="check policy files; no server is contacted")
    validate.add_argument("paths", nargs="*", help="policy files (default: $HEIMDALL_STORAGE_POLICY "
                                                   "or the shipped Heimdall policy)")
    validate.set_defaults(handler=_validate_policy)
    demo = commands.add_parser("demo", help="seed embedded PostgreSQL + SeaweedFS and run the scan")
    demo.add_argument("--workdir", default=".demo", help="where the demo servers keep their data")
    demo.add_argument("--ui", action="store_true", help="then serve the Dagster UI (dagster dev), reusing the world "
                                                        "a completed demo left in --workdir")
    demo.add_argument("--ui-port", type=int, default=3000, help="the UI's port on 127.0.0.1 (default 3000)")
    demo.add_argument("--print-env", action="store_true",
                      help="print `export NAME=value` lines (credentials included) that reach the servers of the "
                           "demo running in --workdir; use as eval \"$(heimdall-storage demo --print-env)\"")
    demo.set_defaults(handler=_demo)
    migrate = commands.add_parser("migrate", help="apply the project's migrations: the outbox table and triggers "
                                                  "in Heimdall's database, and the deletion audit tables")
    migrate.add_argument("--database-url", default=os.environ.get("HEIMDALL_DATABASE_URL"),
                         help="Heimdall's database, SQLAlchemy URL (default: $HEIMDALL_DATABASE_URL)")
    migrate.add_argument("--audit-database-url",
                         default=os.environ.get("HEIMDALL_AUDIT_DB_URL") or os.environ.get("DAGSTER_PG_URL"),
                         help="the audit database (default: $HEIMDALL_AUDIT_DB_URL, else $DAGSTER_PG_URL; "
                              "cleanup runs also apply these when they open it)")
    migrate.set_defaults(handler=_migrate)
    plan = commands.add_parser("plan", help="review a dry run's plan before a live run applies it")
    plan_commands = plan.add_subparsers(dest="plan_command", required=True)
    show = plan_commands.add_parser("show", help="print a plan: figures, guard verdict, largest keys, ages "
                                                 "(reads $DAGSTER_HOME's instance and the manifest store)")
    show.add_argument("plan_id", help="the plan_id of a dry run's orphan_deletions, e.g. heimdall-raw-iq:1a2b3c4d")
    show.add_argument("--csv", metavar="FILE", help="also write the plan's keys (key, size, etag, last_modified) "
                                                    "as CSV; '-' for stdout")
    show.add_argument("--apply-config", metavar="FILE",
                      help="also write the run config of a live run that applies this plan")
    show.set_defaults(handler=_plan_show)
    report = commands.add_parser("report", help="per bucket: figures, growth, orphan inflow and the days until the "
                                                "disk is full, from the storage history; writes a PNG chart")
    report.add_argument("--chart", default="storage-report.png", help="where to write the chart of stored vs "
                                                                      "orphaned bytes (default storage-report.png)")
    report.add_argument("--policy", default=None, help="the policy whose capacity_bytes the forecast uses "
                                                       "(default: $HEIMDALL_STORAGE_POLICY or the shipped one)")
    report.set_defaults(handler=_report)
    from heimdall_storage_pipeline.exporter.cli import add_exporter_command, run_from_args

    add_exporter_command(commands).set_defaults(handler=run_from_args)
    from heimdall_storage_pipeline import receiver

    receiver.add_events_command(commands).set_defaults(handler=receiver.run_from_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
