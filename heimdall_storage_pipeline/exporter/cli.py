"""``heimdall-storage exporter``: serve the storage metrics of the Dagster instance."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import dagster as dg

from heimdall_storage_pipeline.core.errors import secrets_from_env
from heimdall_storage_pipeline.core.policy import POLICY_ENV_VAR, PolicyError, load_policy
from heimdall_storage_pipeline.core.settings import dagster_instance_problem
from heimdall_storage_pipeline.exporter.collector import (
    DEFAULT_TIMEOUT_SECONDS,
    InstanceProvider,
    SnapshotSource,
)
from heimdall_storage_pipeline.exporter.server import DEFAULT_HOST, DEFAULT_PORT, ExporterServer

log = logging.getLogger("heimdall_storage_pipeline.exporter")

HOST_ENV = "HEIMDALL_EXPORTER_HOST"
PORT_ENV = "HEIMDALL_EXPORTER_PORT"
BUCKETS_ENV = "HEIMDALL_EXPORTER_BUCKETS"
CACHE_ENV = "HEIMDALL_EXPORTER_CACHE_SECONDS"
TIMEOUT_ENV = "HEIMDALL_EXPORTER_TIMEOUT_SECONDS"
DEFAULT_CACHE_SECONDS = 5.0


class SettingError(ValueError):
    """A flag or variable with a value the exporter cannot use; the message names it."""


def _setting(given: float | None, flag: str, env: str, default: float, kind: type[int] | type[float],
             allowed: tuple[float, float]) -> float:
    """The flag's value, else the variable's, else the default; one line naming the setting if unusable."""
    low, high = allowed
    source, value = flag, given
    if value is None and os.environ.get(env, "").strip():
        source = env
        try:
            value = kind(os.environ[env].strip())
        except ValueError:
            raise SettingError(f"{env}={os.environ[env]!r} is not a number; use {low:g}..{high:g}") from None
    if value is None:
        return default
    if not low <= value <= high:
        raise SettingError(f"{source} {value:g} is out of range; use {low:g}..{high:g}")
    return value


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--host",
        default=os.environ.get(HOST_ENV, DEFAULT_HOST),
        help=f"address to bind (env {HOST_ENV}; default {DEFAULT_HOST})",
    )
    parser.add_argument(
        "--port",
        type=int,
        help=f"port to bind, 0 for any free port (env {PORT_ENV}; default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--policy",
        default=os.environ.get(POLICY_ENV_VAR),
        help=f"storage policy whose enabled buckets are always reported, scanned or not (env {POLICY_ENV_VAR})",
    )
    parser.add_argument(
        "--bucket",
        action="append",
        default=[b.strip() for b in os.environ.get(BUCKETS_ENV, "").split(",") if b.strip()],
        help=f"a bucket to always report, scanned or not; repeatable (env {BUCKETS_ENV}, comma-separated)",
    )
    parser.add_argument(
        "--cache-seconds",
        type=float,
        help=f"reuse a snapshot for this long between scrapes (env {CACHE_ENV}; default {DEFAULT_CACHE_SECONDS:g})",
    )
    parser.add_argument(
        "--timeout-seconds",
        type=float,
        help="answer 503 when the instance has not answered within this time "
        f"(env {TIMEOUT_ENV}; default {DEFAULT_TIMEOUT_SECONDS:g})",
    )
    parser.set_defaults(func=run_from_args)
    return parser


def add_exporter_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``exporter`` on a CLI; dispatch with ``args.func(args)`` (returns an exit code)."""
    parser = subparsers.add_parser(
        "exporter",
        help="serve /metrics, /metrics/storage and /healthz from the Dagster instance",
        description=__doc__,
    )
    return _configure(parser)


def run_from_args(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Dagster opens its storage through alembic, which announces every plugin at INFO.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    problem = dagster_instance_problem()
    if problem:
        log.error("%s", problem)
        return 2
    try:
        port = int(_setting(args.port, "--port", PORT_ENV, DEFAULT_PORT, int, (0, 65535)))
        cache_seconds = _setting(args.cache_seconds, "--cache-seconds", CACHE_ENV, DEFAULT_CACHE_SECONDS, float,
                                 (0, 86400))
        timeout_seconds = _setting(args.timeout_seconds, "--timeout-seconds", TIMEOUT_ENV, DEFAULT_TIMEOUT_SECONDS,
                                   float, (0.1, 3600))
    except SettingError as exc:
        log.error("%s", exc)
        return 2
    buckets = list(args.bucket)
    if args.policy:
        try:
            buckets += [bucket.name for bucket in load_policy(args.policy).enabled_buckets()]
        except PolicyError as exc:
            log.error("%s", exc)
            return 2
    provider = InstanceProvider(dg.DagsterInstance.get, secrets=secrets_from_env(), timeout_seconds=timeout_seconds)
    source = SnapshotSource(provider, buckets, ttl_seconds=cache_seconds)
    try:
        server = ExporterServer(provider, source, host=args.host, port=port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s; choose another --port (%s) or --host (%s)",
                  args.host, port, exc.strerror or exc, PORT_ENV, HOST_ENV)
        return 2
    log.info("heimdall-storage exporter listening on %s", server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.close()
    return 0


def run_exporter(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m heimdall_storage_pipeline.exporter [options]``."""
    parser = _configure(argparse.ArgumentParser(prog="heimdall-storage exporter", description=__doc__))
    args = parser.parse_args(argv)
    return int(args.func(args))
