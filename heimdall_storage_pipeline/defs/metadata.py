"""Typed metadata values, so the UI shows times as times, sizes and shares readably, tables as tables.

The exact figures stay under their stable keys (integers of bytes, fractions 0..1) for the exporter,
the checks and Dagster's plots; the readable ones sit beside them.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import dagster as dg
import pyarrow as pa

from heimdall_storage_pipeline.core.clock import as_utc, isoformat_utc
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.units import format_bytes, format_percent

ROW_COUNT = "dagster/row_count"
URI = "dagster/uri"
COLUMN_SCHEMA = "dagster/column_schema"

_LARGEST_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("key", "string"),
    dg.TableColumn("size", "string", description="binary units"),
    dg.TableColumn("bytes", "int"),
    dg.TableColumn("last_modified", "string", description="UTC"),
])
_AGES_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("age", "string"),
    dg.TableColumn("objects", "int"),
    dg.TableColumn("size", "string", description="binary units"),
    dg.TableColumn("bytes", "int"),
])


def timestamp(moment: object) -> dg.TimestampMetadataValue:
    """A time (datetime, epoch seconds or ISO-8601 string), shown by the UI in the viewer's time zone."""
    return dg.MetadataValue.timestamp(as_utc(moment))


def size(num_bytes: int) -> dg.TextMetadataValue:
    return dg.MetadataValue.text(format_bytes(num_bytes))


def percent(fraction: float) -> dg.TextMetadataValue:
    return dg.MetadataValue.text(format_percent(fraction))


def manifest(uri: str) -> dg.UrlMetadataValue | dg.PathMetadataValue:
    """A manifest's location: a link for ``s3://``, a path for a local file."""
    return dg.MetadataValue.url(uri) if uri.startswith("s3://") else dg.MetadataValue.path(uri)


def manifest_entries(uri: str, rows: int) -> dict[str, dg.MetadataValue]:
    """Dagster's standard keys for the asset's manifest: its URI and its rows (the catalog shows them)."""
    if not uri:  # nothing was written
        return {}
    location = uri if uri.startswith("s3://") else Path(uri.removeprefix("file://")).as_uri()
    return {URI: dg.MetadataValue.text(location), ROW_COUNT: dg.MetadataValue.int(rows)}


def manifest_rows(store: ManifestStore, uri: str) -> int:
    """A manifest's rows as its Parquet footer counts them (one small read)."""
    return store.open(uri).metadata.num_rows


def largest_table(rows: Iterable[tuple[str, int, datetime | str]]) -> dg.TableMetadataValue:
    """The largest objects, largest first: (key, bytes, last modified)."""
    return dg.MetadataValue.table(
        [dg.TableRecord({"key": key, "size": format_bytes(num_bytes), "bytes": num_bytes,
                         "last_modified": isoformat_utc(as_utc(modified, "last_modified"))})
         for key, num_bytes, modified in rows],
        schema=_LARGEST_SCHEMA,
    )


def age_table(rows: Iterable[tuple[str, int, int]]) -> dg.TableMetadataValue:
    """An age histogram: (age bin, objects, bytes)."""
    return dg.MetadataValue.table(
        [dg.TableRecord({"age": label, "objects": count, "size": format_bytes(num_bytes), "bytes": num_bytes})
         for label, count, num_bytes in rows],
        schema=_AGES_SCHEMA,
    )


def column_schema(schema: pa.Schema) -> dg.TableSchema:
    """A manifest's Arrow schema as the columns the catalog lists."""
    return dg.TableSchema(columns=[
        dg.TableColumn(field.name, str(field.type.value_type if pa.types.is_dictionary(field.type) else field.type))
        for field in schema
    ])
