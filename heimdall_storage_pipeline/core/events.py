"""Bucket change events: parsed from SeaweedFS filer webhooks and MinIO (S3) event notifications,
kept per bucket in PostgreSQL with a gap-free sequence, and folded into an inventory manifest.

A stream's ``epoch`` changes whenever events may have been lost (a receiver start, an event far out
of order, one the receiver could not store); an inventory built on another epoch, or on a stream
whose receiver is silent, must list the bucket in full. Safety never rests on events: every
deletion re-validates against a fresh stat and fresh references.
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote_plus

import duckdb
import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from heimdall_storage_pipeline.core.clock import as_utc, parse_utc
from heimdall_storage_pipeline.core.errors import StorageCleanupError
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.policy import format_duration

FULL, INCREMENTAL = "full", "incremental"
STREAMS, EVENTS = "heimdall_storage_event_streams", "heimdall_storage_bucket_events"
DEFAULT_REORDER_TOLERANCE = timedelta(minutes=5)  # beyond a webhook's retries: the sender lost track
EVENT_SCHEMA = pa.schema([
    ("seq", pa.int64()), ("key", pa.string()), ("deleted", pa.bool_()), ("size", pa.int64()),
    ("etag", pa.string()), ("last_modified", pa.timestamp("us", tz="UTC")), ("version_ns", pa.int64()),
])
DRIFT_SAMPLE = 10
_MINIO_PUTS = {"ObjectCreated:Put", "ObjectCreated:Post", "ObjectCreated:Copy", "ObjectCreated:CompleteMultipartUpload"}
_MINIO_DELETES = {"ObjectRemoved:Delete", "ObjectRemoved:DeleteMarkerCreated", "ObjectRemoved:DeleteAllVersions"}


class EventFormatError(ValueError):
    """A notification body that is neither a SeaweedFS filer event nor an S3 event notification."""


class EventGapError(StorageCleanupError):
    """Events between a cursor and the stream's end are missing from the log."""


@dataclass(frozen=True)
class ObjectEvent:
    bucket: str
    key: str
    deleted: bool
    size: int
    etag: str
    last_modified: datetime  # as a listing shows it; of a delete: the deleted version's, or the deletion time
    version_ns: int  # orders one key's events (a delete wins a tie)
    occurred_at: datetime | None  # when the change happened, when the source says; checks the order
    event_id: str
    source: str


def _digest(record: Any) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def parse_events(body: bytes) -> list[ObjectEvent]:
    """Object events of one notification body; directories, system paths and reads are left out."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise EventFormatError("the body is not JSON") from None
    try:
        if isinstance(document, dict) and isinstance(document.get("Records"), list):
            return [event for record in document["Records"] for event in _s3_record(record)]
        if isinstance(document, dict) and "event_type" in document:
            return _filer_event(document)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EventFormatError(f"a malformed notification ({type(exc).__name__}: {exc})") from None
    raise EventFormatError("neither a SeaweedFS filer notification (event_type, key, message) nor an S3 "
                           "event notification (Records)")


def _s3_record(record: dict[str, Any]) -> list[ObjectEvent]:
    name = str(record["eventName"]).removeprefix("s3:")
    obj = record["s3"]["object"]
    key = unquote_plus(str(obj["key"]))
    if name not in _MINIO_PUTS | _MINIO_DELETES or key.endswith("/"):
        return []  # reads, tagging, retention, replication; "folder/" markers, which listings skip
    occurred = parse_utc(str(record["eventTime"]), "eventTime")
    sequencer = str(obj.get("sequencer") or "")
    try:
        version = int(sequencer, 16)  # MinIO's: the event time in ns, in hex
    except ValueError:
        version = int(occurred.timestamp() * 1e9)
    return [ObjectEvent(
        bucket=str(record["s3"]["bucket"]["name"]), key=key, deleted=name in _MINIO_DELETES,
        size=int(obj.get("size") or 0), etag=str(obj.get("eTag") or "").strip('"'), last_modified=occurred,
        version_ns=version, occurred_at=occurred, event_id=_digest(record), source="s3",
    )]


def _filer_object(path: str | None, entry: dict[str, Any] | None) -> tuple[str, str] | None:
    """``(bucket, key)`` of an S3 object's filer entry, else None (the filer's own paths, directories)."""
    parts = (path or "").split("/", 3)  # '', 'buckets', bucket, key
    if not entry or len(parts) < 4 or parts[0] or parts[1] != "buckets" or parts[2].startswith(".") or not parts[3]:
        return None
    if parts[3].startswith(".uploads/") or entry.get("is_directory"):
        return None  # multipart parts in progress; directories, "folder/" markers included, which listings skip
    return parts[2], parts[3]


def _filer_event(document: dict[str, Any]) -> list[ObjectEvent]:
    kind, path, message = document["event_type"], str(document["key"]), document["message"]
    old, new = message.get("old_entry"), message.get("new_entry")
    new_path = posixpath.join(message.get("new_parent_path") or posixpath.dirname(path), new["name"]) if new else None
    before, after = _filer_object(path, old), _filer_object(new_path, new)
    identity, events = _digest(document), []
    for entry, where, deleted in ((old, before, True), (new, after, False)):
        if where is None or (deleted and where == after):
            continue
        attributes, extended = entry.get("attributes") or {}, entry.get("extended") or {}
        mtime = int(attributes.get("mtime") or 0)
        version = max([int(c.get("modified_ts_ns") or 0) for c in entry.get("chunks") or []] + [mtime * 10**9])
        if "Seaweed-X-Amz-ETag" in extended:
            etag = base64.b64decode(extended["Seaweed-X-Amz-ETag"]).decode()
        else:
            etag = base64.b64decode(attributes.get("md5") or "").hex()
        fresh = not deleted and kind in ("create", "update")
        events.append(ObjectEvent(
            bucket=where[0], key=where[1], deleted=deleted, size=int(attributes.get("file_size") or 0), etag=etag,
            last_modified=datetime.fromtimestamp(mtime, UTC), version_ns=version,
            occurred_at=datetime.fromtimestamp(version / 1e9, UTC) if fresh else None,
            event_id=f"{identity}:{'d' if deleted else 'p'}", source="seaweedfs",
        ))
    return events


@dataclass(frozen=True)
class StreamState:
    bucket: str
    epoch: int
    last_seq: int
    gap_reason: str
    gap_at: datetime
    alive: bool  # the receiver has been heard from within its heartbeat allowance


class EventLog:
    """The events and streams tables of the audit database; every statement runs under its time limit."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def mark_gap(self, buckets: Iterable[str], reason: str, alive_seconds: float | None = None) -> None:
        """Events may have been lost: each stream's epoch moves. A starting receiver (``alive_seconds``)
        opens its streams so: what happened while none listened is unknown."""
        alive = "now() + make_interval(secs => :alive)" if alive_seconds is not None else "now()"
        with self.engine.begin() as connection:
            for bucket in sorted(set(buckets)):
                connection.execute(sa.text(
                    f"INSERT INTO {STREAMS} (bucket, epoch, gap_reason, gap_at, alive_until) "
                    f"VALUES (:bucket, 1, :reason, now(), {alive}) ON CONFLICT (bucket) DO UPDATE SET "
                    f"epoch = {STREAMS}.epoch + 1, gap_reason = :reason, gap_at = now()"
                    + (", alive_until = EXCLUDED.alive_until" if alive_seconds is not None else "")),
                    {"bucket": bucket, "reason": reason, "alive": alive_seconds})

    def heartbeat(self, buckets: Iterable[str], alive_seconds: float) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.text(
                f"UPDATE {STREAMS} SET alive_until = now() + make_interval(secs => :alive) "
                f"WHERE bucket = ANY(:buckets)"), {"alive": alive_seconds, "buckets": sorted(set(buckets))})

    def append(self, events: Iterable[ObjectEvent], tolerance: timedelta = DEFAULT_REORDER_TOLERANCE) -> int:
        """Store events once each (a re-delivery is ignored), numbered per bucket; returns how many were new.

        The stream row is locked while its events are numbered, so sequences commit in order.
        """
        by_bucket: dict[str, list[ObjectEvent]] = {}
        for event in events:
            by_bucket.setdefault(event.bucket, []).append(event)
        stored = 0
        with self.engine.begin() as connection:
            for bucket in sorted(by_bucket):
                row = connection.execute(sa.text(
                    f"SELECT last_seq, high_water FROM {STREAMS} WHERE bucket = :bucket FOR UPDATE"),
                    {"bucket": bucket}).one_or_none()
                if row is None:
                    continue  # no stream opened for it: not a policy bucket of this receiver
                seq, latest = row
                for event in by_bucket[bucket]:
                    inserted = connection.execute(sa.text(
                        f"INSERT INTO {EVENTS} (bucket, seq, event_id, key, deleted, size, etag, last_modified, "
                        f"version_ns, source) VALUES (:bucket, :seq, :event_id, :key, :deleted, :size, :etag, "
                        f":last_modified, :version_ns, :source) ON CONFLICT (bucket, event_id) DO NOTHING"),
                        {**event.__dict__, "seq": seq + 1, "occurred_at": None}).rowcount
                    if not inserted:
                        continue
                    seq, stored = seq + 1, stored + 1
                    if event.occurred_at is not None:
                        if latest is not None and event.occurred_at < latest - tolerance:
                            connection.execute(sa.text(
                                f"UPDATE {STREAMS} SET epoch = epoch + 1, gap_at = now(), gap_reason = :reason "
                                f"WHERE bucket = :bucket"), {"bucket": bucket, "reason": (
                                    f"an event of {event.occurred_at.isoformat()} arrived after one of "
                                    f"{latest.isoformat()}: the sender re-sent late and may have dropped others")})
                        latest = max(latest or event.occurred_at, event.occurred_at)
                connection.execute(sa.text(
                    f"UPDATE {STREAMS} SET last_seq = :seq, high_water = :latest WHERE bucket = :bucket"),
                    {"seq": seq, "latest": latest, "bucket": bucket})
        return stored

    def state(self, bucket: str) -> StreamState | None:
        with self.engine.connect() as connection:
            if connection.execute(sa.text("SELECT to_regclass(:t)"), {"t": STREAMS}).scalar() is None:
                return None
            row = connection.execute(sa.text(
                f"SELECT epoch, last_seq, gap_reason, gap_at, alive_until >= now() FROM {STREAMS} "
                f"WHERE bucket = :bucket"), {"bucket": bucket}).one_or_none()
        return StreamState(bucket, *row) if row else None

    def read(self, bucket: str, after: int, upto: int, strict: bool = True) -> pa.Table:
        """Events ``after`` < seq <= ``upto``; ``strict`` raises EventGapError when some are missing."""
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text(
                f"SELECT seq, key, deleted, size, etag, last_modified, version_ns FROM {EVENTS} "
                f"WHERE bucket = :bucket AND seq > :after AND seq <= :upto ORDER BY seq"),
                {"bucket": bucket, "after": after, "upto": upto}).all()
        if strict and len(rows) != max(upto - after, 0):
            raise EventGapError(f"{max(upto - after, 0) - len(rows)} of the events of {bucket} after cursor "
                                f"{after} are missing from the event log")
        return pa.Table.from_pylist([dict(zip(EVENT_SCHEMA.names, row, strict=True)) for row in rows], EVENT_SCHEMA)

    def prune(self, bucket: str, upto: int) -> int:
        """Drop events already folded into a superseded manifest."""
        with self.engine.begin() as connection:
            return connection.execute(sa.text(f"DELETE FROM {EVENTS} WHERE bucket = :bucket AND seq <= :upto"),
                                      {"bucket": bucket, "upto": upto}).rowcount


def choose_inventory(previous: Mapping[str, Any] | None, stream: StreamState | None, full_every: timedelta,
                     now: datetime) -> tuple[str, str]:
    """``(mode, reason)``: incremental only on an unbroken stream since the last full listing, while it is live."""
    if stream is None:
        return FULL, "no event stream for this bucket (start `heimdall-storage events`)"
    if previous is None or "cursor" not in previous or "event_epoch" not in previous:
        return FULL, "no earlier inventory with an event cursor"
    if not stream.alive:
        return FULL, "the event receiver is not running (its heartbeat lapsed)"
    if int(previous["event_epoch"]) != stream.epoch:
        return FULL, f"the event stream may have a gap: {stream.gap_reason} ({stream.gap_at.isoformat()})"
    if now >= as_utc(previous["full_listing_at"], "full_listing_at") + full_every:
        return FULL, f"a full listing is due (full_listing_every {format_duration(full_every)})"
    return INCREMENTAL, f"{stream.last_seq - int(previous['cursor'])} events since cursor {previous['cursor']}"


_LATEST = """
    CREATE OR REPLACE TEMP TABLE latest AS SELECT * FROM events
    QUALIFY row_number() OVER (PARTITION BY key ORDER BY version_ns DESC, deleted DESC, seq DESC) = 1
"""
# Last writer wins: a key's latest event replaces its row unless the row is of a later version.
_MERGED = """
    SELECT CASE WHEN e.key IS NULL OR e.last_modified < b.last_modified THEN b.key ELSE e.key END AS key,
           CASE WHEN e.key IS NULL OR e.last_modified < b.last_modified THEN b.size ELSE e.size END AS size,
           CASE WHEN e.key IS NULL OR e.last_modified < b.last_modified THEN b.last_modified
                ELSE e.last_modified END AS last_modified,
           CASE WHEN e.key IS NULL OR e.last_modified < b.last_modified THEN b.etag ELSE e.etag END AS etag
    FROM read_parquet(?) b FULL OUTER JOIN latest e ON b.key = e.key
    WHERE e.key IS NULL OR NOT e.deleted OR (b.key IS NOT NULL AND e.last_modified < b.last_modified)
"""


MERGE_MEMORY_LIMIT = "256MB"  # the rest spills to the work directory; the scan's memory budget holds


def _connect(events: pa.Table, work: str) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect(config={
        "preserve_insertion_order": False, "autoinstall_known_extensions": False,
        "memory_limit": MERGE_MEMORY_LIMIT, "temp_directory": work})
    connection.register("events", events)
    connection.execute(_LATEST)
    return connection


def merge_events(store: ManifestStore, base_uri: str, events: pa.Table, uri: str) -> tuple[int, int]:
    """Write at ``uri`` the manifest ``base_uri`` with ``events`` applied; returns its objects and bytes."""
    with tempfile.TemporaryDirectory(prefix="heimdall-events-") as work, _connect(events, work) as connection:
        merged = f"{work}/merged.parquet"
        # Keys and ETags are unique: building dictionaries for them only costs time.
        connection.execute(f"COPY ({_MERGED}) TO '{merged}' "
                           f"(FORMAT parquet, COMPRESSION zstd, DICTIONARY_SIZE_LIMIT 1)",
                           [store.local_file(base_uri, work)])
        count, total = connection.execute("SELECT count(*), coalesce(sum(size), 0) FROM read_parquet(?)",
                                          [merged]).fetchone()
        store.put_file(merged, uri)
    return int(count), int(total)


@dataclass(frozen=True)
class Drift:
    missing: int  # listed, but not in the event-maintained inventory: a create it missed
    extra: int  # in the event-maintained inventory, not listed: a delete it missed
    sample: list[str]

    @property
    def count(self) -> int:
        return self.missing + self.extra


def inventory_drift(store: ManifestStore, listing_uri: str, base_uri: str, events: pa.Table,
                    in_flight: Iterable[str] = ()) -> Drift:
    """Keys the full listing and ``base_uri`` + ``events`` disagree on, except ``in_flight`` (changed while
    the listing ran, so either side may be right)."""
    with tempfile.TemporaryDirectory(prefix="heimdall-drift-") as work, _connect(events, work) as connection:
        connection.register("in_flight", pa.table({"key": pa.array(sorted(set(in_flight)), pa.string())}))
        connection.execute(f"CREATE TEMP TABLE derived AS SELECT key FROM ({_MERGED}) "
                           f"WHERE key NOT IN (SELECT key FROM in_flight)", [store.local_file(base_uri, work)])
        connection.execute("CREATE TEMP TABLE listed AS SELECT key FROM read_parquet(?) "
                           "WHERE key NOT IN (SELECT key FROM in_flight)", [store.local_file(listing_uri, work)])
        found = []
        for one, other in (("listed", "derived"), ("derived", "listed")):
            connection.execute(f"CREATE TEMP TABLE only_{one} AS SELECT key FROM {one} EXCEPT SELECT key FROM {other}")
            found.append(connection.execute(f"SELECT count(*), list(key ORDER BY key)[:{DRIFT_SAMPLE}] "
                                            f"FROM only_{one}").fetchone())
    (missing, missing_sample), (extra, extra_sample) = found
    return Drift(int(missing), int(extra), list(missing_sample or []) + list(extra_sample or []))
