"""``heimdall-storage``: operator commands that need no Dagster UI."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from heimdall_storage_pipeline.core.policy import PolicyError, format_duration, load_policy, policy_path_from_env


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
        from heimdall_storage_pipeline.local.demo import run_demo
        from heimdall_storage_pipeline.local.seaweedfs import weed_binary

        weed_binary()
    except ModuleNotFoundError as exc:
        if exc.name not in DEMO_PACKAGES:
            raise
        print(f"the demo needs the {exc.name!r} package; {DEMO_EXTRA_HINT}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # no 'weed' binary
        print(exc, file=sys.stderr)
        return 2
    return run_demo(workdir=args.workdir, serve_ui=args.ui)


def _migrate(args: argparse.Namespace) -> int:
    """Apply the outbox migration the event-driven cleanup needs; idempotent."""
    from heimdall_storage_pipeline.core.errors import StorageCleanupError
    from heimdall_storage_pipeline.migrations import apply_migration

    if not args.database_url:
        print("no database: pass --database-url or set HEIMDALL_DATABASE_URL", file=sys.stderr)
        return 2
    try:
        apply_migration(args.database_url)
    except StorageCleanupError as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        return 1
    print("OK migrations applied (heimdall.storage_cleanup_events and its triggers)")
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
    demo.add_argument("--ui", action="store_true", help="then serve the Dagster UI on 127.0.0.1:3000")
    demo.set_defaults(handler=_demo)
    migrate = commands.add_parser("migrate", help="install the outbox table and triggers in the Heimdall database")
    migrate.add_argument("--database-url", default=os.environ.get("HEIMDALL_DATABASE_URL"),
                         help="SQLAlchemy URL (default: $HEIMDALL_DATABASE_URL)")
    migrate.set_defaults(handler=_migrate)
    from heimdall_storage_pipeline.exporter.cli import add_exporter_command, run_from_args

    add_exporter_command(commands).set_defaults(handler=run_from_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
