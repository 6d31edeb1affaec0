"""Helpers shared by the scan tests: seeding objects and rows, reading manifests and run failures."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import sqlalchemy as sa
from minio import Minio

from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS


def put_objects(client: Minio, bucket: str, keys: Iterable[str], size: int = 10) -> None:
    """Upload ``size``-byte objects under ``keys``."""
    for key in keys:
        client.put_object(bucket, key, io.BytesIO(b"x" * size), size)


def make_reference_table(
    engine: sa.Engine, table: str, values: Iterable[Any], column_type: str = "text"
) -> str:
    """A one-column table ``public.<table>(v <column_type>)`` holding ``values``; returns its SELECT."""
    with engine.begin() as connection:
        connection.execute(sa.text(f"CREATE TABLE public.{table} (v {column_type})"))
        for value in values:
            bound = json.dumps(value) if column_type == "jsonb" and not isinstance(value, str) else value
            connection.execute(sa.text(f"INSERT INTO public.{table} (v) VALUES (:v)"), {"v": bound})
    return f"SELECT v FROM public.{table}"


def store_for(seaweed: SeaweedFS, root: str) -> ManifestStore:
    return ManifestStore(root=root, s3=seaweed.settings() if root.startswith("s3://") else None)


def orphan_rows(store: ManifestStore, uri: str) -> dict[str, bool]:
    """The orphan manifest as ``{key: eligible}``."""
    table = store.read_table(uri, columns=["key", "eligible"])
    return dict(zip(table.column("key").to_pylist(), table.column("eligible").to_pylist(), strict=True))


def manifest_files(root: Path) -> list[Path]:
    """Every file under a local manifest root (finished or not)."""
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


def local_parquet_keys(path: Path) -> list[str]:
    return pq.read_table(path, columns=["key"]).column("key").to_pylist()


def step_failure_message(result: dg.ExecuteInProcessResult, step: str) -> str:
    """The error message (with causes) a failed step reported."""
    failures = [event for event in result.all_events if event.is_step_failure and event.step_key == step]
    assert failures, f"step {step} did not fail; events: {[e.event_type_value for e in result.all_events]}"
    error = failures[0].step_failure_data.error
    assert error is not None
    return error.to_string()


def run_event_log_text(instance: dg.DagsterInstance, run_id: str) -> str:
    """Everything the run recorded in the event log, serialised, to search for leaked secrets."""
    return "\n".join(dg.serialize_value(entry) for entry in instance.all_logs(run_id))


def materialization_count(instance: dg.DagsterInstance, asset: str, partition: str) -> int:
    return len(
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=100
        ).records
    )
