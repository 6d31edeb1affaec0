"""Helpers for the exporter tests: recording materializations, PostgreSQL, HTTP, processes."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import psycopg2
from prometheus_client.parser import text_string_to_metric_families

from heimdall_storage_pipeline.core.health import health_status, share

REPO = Path(__file__).resolve().parents[2]
PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
# The server trusts loopback, so the password is never checked: it is here to prove that it
# never leaks into a reason, a log line or a metric.
PG_PASSWORD = "Sup3r-s3cret-pw"
GIB = 1024**3

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``check`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # the thing polled for may not be up yet
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last error: {last_error!r}")
        time.sleep(0.1)  # poll interval, not synchronisation: the deadline decides


def http_get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    """Status and body; 4xx/5xx are answers, not exceptions."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_json(url: str) -> tuple[int, Any]:
    status, body = http_get(url)
    return status, json.loads(body)


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def record(instance: dg.DagsterInstance, asset: str, bucket: str, metadata: Mapping[str, Any]) -> None:
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=asset, partition=bucket, metadata=dict(metadata))
    )


def record_scan(
    instance: dg.DagsterInstance,
    bucket: str,
    *,
    objects: int,
    total_bytes: int,
    orphans: int,
    orphan_bytes: int,
    eligible: int = 0,
    eligible_bytes: int = 0,
    young: int = 0,
    dangling: int = 0,
    unparseable: int = 0,
    as_of: str = "2026-11-01T03:00:00Z",
    versions: tuple[int, int, int] | None = None,  # a versioned bucket's noncurrent versions, bytes, delete markers
    drift: int | None = None,  # the keys an event-maintained inventory had wrong, once reconciled
) -> dict[str, dict[str, Any]]:
    """Record the three scan assets of a bucket as the scan does; return their metadata."""
    orphan_share = share(orphan_bytes, total_bytes)
    metadata = {
        "bucket_inventory": {
            "object_count": dg.MetadataValue.int(objects),
            "total_bytes": dg.MetadataValue.int(total_bytes),
            "manifest_uri": dg.MetadataValue.text(f"file:///manifests/{bucket}/inventory.parquet"),
            "listed_at": dg.MetadataValue.text(as_of),
            "listing_seconds": dg.MetadataValue.float(1.5),
            "keys_per_second": dg.MetadataValue.float(objects / 1.5),
            "versioning": dg.MetadataValue.text("Enabled" if versions else "Off"),
            **{name: dg.MetadataValue.int(count) for name, count in
               zip(("noncurrent_versions", "noncurrent_bytes", "delete_markers"), versions or (), strict=False)},
            **({"drift_count": dg.MetadataValue.int(drift)} if drift is not None else {}),
        },
        "referenced_keys": {
            "referenced_count": dg.MetadataValue.int(objects - orphans + dangling),
            "other_bucket_reference_count": dg.MetadataValue.int(0),
            "unparseable_reference_count": dg.MetadataValue.int(unparseable),
            "unparseable_sample": dg.MetadataValue.json(["not a key"] if unparseable else []),
            "snapshot_at": dg.MetadataValue.text(as_of),
            "manifest_uri": dg.MetadataValue.text(f"file:///manifests/{bucket}/refs.parquet"),
        },
        "orphan_diff": {
            "as_of": dg.MetadataValue.text(as_of),
            "object_count": dg.MetadataValue.int(objects),
            "total_bytes": dg.MetadataValue.int(total_bytes),
            "referenced_count": dg.MetadataValue.int(objects - orphans),
            "orphan_count": dg.MetadataValue.int(orphans),
            "orphan_bytes": dg.MetadataValue.int(orphan_bytes),
            "eligible_orphan_count": dg.MetadataValue.int(eligible),
            "eligible_orphan_bytes": dg.MetadataValue.int(eligible_bytes),
            "young_orphan_count": dg.MetadataValue.int(young),
            "orphan_share_bytes": dg.MetadataValue.float(orphan_share),
            "orphan_share_count": dg.MetadataValue.float(share(orphans, objects)),
            "health_status": dg.MetadataValue.text(health_status(orphan_share)),
            "dangling_reference_count": dg.MetadataValue.int(dangling),
            "dangling_sample": dg.MetadataValue.json(["synthetic/gone.npy"] if dangling else []),
            "inventory_listed_at": dg.MetadataValue.text(as_of),
            "references_snapshot_at": dg.MetadataValue.text(as_of),
            "manifest_uri": dg.MetadataValue.text(f"file:///manifests/{bucket}/orphans.parquet"),
        },
    }
    for asset, values in metadata.items():
        record(instance, asset, bucket, values)
    return {asset: {k: v.value for k, v in values.items()} for asset, values in metadata.items()}


def record_cleanup(
    instance: dg.DagsterInstance,
    bucket: str,
    *,
    deleted: int,
    deleted_bytes: int,
    dry_run: bool = False,
    failed: int = 0,
    skipped: Mapping[str, int] | None = None,
    quarantined: tuple[int, int, float] | None = None,  # objects, bytes, oldest (epoch seconds)
) -> None:
    skips = {"referenced": 0, "missing": 0, "changed": 0, "young": 0, **(skipped or {})}
    record(
        instance,
        "orphan_deletions",
        bucket,
        {
            "dry_run": dg.MetadataValue.bool(dry_run),
            "candidates": dg.MetadataValue.int(deleted + failed + sum(skips.values())),
            "deleted_count": dg.MetadataValue.int(deleted),
            "deleted_bytes": dg.MetadataValue.int(deleted_bytes),
            **{f"skipped_{reason}": dg.MetadataValue.int(n) for reason, n in skips.items()},
            "failed_count": dg.MetadataValue.int(failed),
            "guards_overridden": dg.MetadataValue.bool(False),
            "seconds": dg.MetadataValue.float(0.5),
            "manifest_uri": dg.MetadataValue.text(f"file:///manifests/{bucket}/deletions.parquet"),
            **({"quarantined_objects": dg.MetadataValue.int(quarantined[0]),
                "quarantined_bytes": dg.MetadataValue.int(quarantined[1]),
                "quarantine_oldest": dg.MetadataValue.timestamp(quarantined[2])} if quarantined else {}),
        },
    )


def _admin(statement: str) -> None:
    # Autocommit: CREATE/DROP DATABASE refuse to run inside a transaction block.
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def create_database(name: str) -> None:
    _admin(f'CREATE DATABASE "{name}"')


def drop_database(name: str) -> None:
    # FORCE ends the instance's open connections too: the database is gone for everyone.
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def postgres_database(create: bool = True) -> Iterator[str]:
    """A fresh database name (created unless told otherwise), dropped afterwards."""
    name = f"exporter_test_{secrets.token_hex(6)}"
    if create:
        create_database(name)
    try:
        yield name
    finally:
        drop_database(name)


def postgres_url(database: str, port: int = PG_PORT) -> str:
    # Explicit driver: SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, not installed here.
    return f"postgresql+psycopg2://{PG_USER}:{PG_PASSWORD}@{PG_HOST}:{port}/{database}"


def write_instance_home(home: Path, postgres: str | None = None) -> Path:
    """A DAGSTER_HOME with a dagster.yaml: PostgreSQL storage when given a URL, else SQLite."""
    home.mkdir(parents=True, exist_ok=True)
    config = {"telemetry": {"enabled": False}}
    if postgres is not None:
        config["storage"] = {"postgres": {"postgres_url": postgres}}
    (home / "dagster.yaml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return home


@contextmanager
def exporter_process(
    home: Path, args: list[str], log: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m heimdall_storage_pipeline.exporter`` against ``home``, output to ``log``."""
    process_env = {**os.environ, "DAGSTER_HOME": str(home), **(env or {})}
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "heimdall_storage_pipeline.exporter", *args],
            env=process_env,
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def record_history(instance: dg.DagsterInstance, day: int, capacity_bytes: int | None) -> dict[str, Any]:
    """Record storage_history as the asset does for ``day`` of the 90 synthetic days of the capacity tests."""
    from heimdall_storage_pipeline.core import capacity
    from heimdall_storage_pipeline.defs.capacity import history_metadata
    from heimdall_storage_pipeline_tests.core.test_capacity import START, history

    until = START + timedelta(days=day)
    metadata = history_metadata(capacity.by_bucket(history(), until=until), capacity_bytes)
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key="storage_history", partition=until.isoformat(), metadata=metadata))
    return {key: value.value for key, value in metadata.items()}
