"""core/events.py: parsing both notification formats, the event log's bookkeeping on PostgreSQL, the
full-or-incremental decision and the last-writer-wins merge."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
import sqlalchemy as sa

from heimdall_storage_pipeline.core.events import (
    EVENT_SCHEMA,
    FULL,
    INCREMENTAL,
    EventFormatError,
    EventGapError,
    EventLog,
    ObjectEvent,
    StreamState,
    choose_inventory,
    inventory_drift,
    merge_events,
    parse_events,
)
from heimdall_storage_pipeline.core.manifests import INVENTORY_SCHEMA, ManifestStore
from heimdall_storage_pipeline.core.migrations import apply_migrations
from heimdall_storage_pipeline_tests.events_support import minio_notification, minio_record

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _entry(name: str, size: int, mtime: int, etag_hex: str, ts_ns: int | None = None) -> dict:
    """A filer entry as SeaweedFS 4.48's webhook sends it."""
    entry: dict = {"name": name, "attributes": {"file_size": size, "mtime": mtime, "file_mode": 432, "crtime": mtime,
                                                "md5": base64.b64encode(bytes.fromhex(etag_hex)).decode()},
                   "extended": {"Seaweed-X-Amz-ETag": base64.b64encode(etag_hex.encode()).decode(),
                                "Seaweed-X-Amz-Owner": "aGVpbWRhbGw="}}
    if ts_ns:
        entry["chunks"] = [{"size": size, "modified_ts_ns": ts_ns, "e_tag": "x", "fid": {"volume_id": 1}}]
    return entry


def _filer(event_type: str, key: str, old: dict | None = None, new: dict | None = None,
           new_parent: str | None = None) -> bytes:
    message: dict = {"delete_chunks": True, "signatures": [935584822]}
    if old:
        message["old_entry"] = old
    if new:
        message["new_entry"] = new
        message["new_parent_path"] = new_parent or key.rsplit("/", 1)[0]
    return json.dumps({"event_type": event_type, "key": key, "message": message}).encode()


ETAG = "5d41402abc4b2a76b9719d911017c592"


def test_seaweedfs_filer_events_become_object_events() -> None:
    mtime = int(T0.timestamp())
    [put] = parse_events(_filer("create", "/buckets/b1/a/b c%.txt", new=_entry("b c%.txt", 5, mtime, ETAG, 7)))
    assert (put.bucket, put.key, put.deleted, put.size, put.etag, put.version_ns) == (
        "b1", "a/b c%.txt", False, 5, ETAG, mtime * 10**9)  # the mtime wins over an older chunk time
    assert put.last_modified == T0 and put.occurred_at == T0 and put.source == "seaweedfs"
    [update] = parse_events(_filer("update", "/buckets/b1/k", old=_entry("k", 5, mtime, ETAG),
                                   new=_entry("k", 6, mtime + 1, "ab" * 16, (mtime + 1) * 10**9 + 5)))
    assert (update.deleted, update.size, update.etag, update.version_ns) == (False, 6, "ab" * 16,
                                                                             (mtime + 1) * 10**9 + 5)
    [delete] = parse_events(_filer("delete", "/buckets/b1/k", old=_entry("k", 6, mtime, ETAG)))
    assert delete.deleted and delete.occurred_at is None and delete.last_modified == T0
    # A rename is the old key deleted and the new one written.
    moved = parse_events(_filer("rename", "/buckets/b1/old", old=_entry("old", 1, mtime, ETAG),
                                new=_entry("new", 1, mtime, ETAG), new_parent="/buckets/b1/dir"))
    assert [(e.key, e.deleted) for e in moved] == [("old", True), ("dir/new", False)]
    assert len({e.event_id for e in moved}) == 2
    # Directories ("folder/" markers too, which listings skip), the filer's own paths and multipart parts in
    # progress are not objects.
    directory = {"name": "a", "is_directory": True, "attributes": {"mtime": mtime}}
    marker = {**_entry("f", 0, mtime, "d41d8cd98f00b204e9800998ecf8427e"), "is_directory": True}
    for body in (_filer("create", "/buckets/b1/a", new=directory), _filer("create", "/buckets/b1/f", new=marker),
                 _filer("create", "/buckets/.system/owners/x", new=_entry("x", 0, mtime, ETAG)),
                 _filer("create", "/buckets/b1/.uploads/u1/0001.part", new=_entry("0001.part", 5, mtime, ETAG)),
                 _filer("create", "/topics/t", new=_entry("t", 5, mtime, ETAG))):
        assert parse_events(body) == []


def test_minio_records_become_object_events() -> None:
    body = minio_notification(
        minio_record("b1", "with space/a+b%.bin", "s3:ObjectCreated:Put", T0, 7, '"abc"'),
        minio_record("b1", "k", "s3:ObjectRemoved:Delete", T0 + timedelta(seconds=1)),
        minio_record("b1", "k", "s3:ObjectAccessed:Get", T0),
        minio_record("b1", "k", "s3:ObjectCreated:PutTagging", T0, 7, "abc"),
        minio_record("b1", "folder/", "s3:ObjectCreated:Put", T0, 0, "d41d8cd98f00b204e9800998ecf8427e"))
    put, delete = parse_events(json.dumps(body).encode())
    assert (put.key, put.size, put.etag, put.deleted, put.last_modified) == ("with space/a+b%.bin", 7, "abc", False, T0)
    assert put.version_ns == int(T0.timestamp() * 1e9) and put.source == "s3"
    assert delete.deleted and delete.version_ns > put.version_ns
    # A re-delivery is the same event; another record is another.
    again = parse_events(json.dumps(body).encode())
    assert [e.event_id for e in again] == [put.event_id, delete.event_id] and put.event_id != delete.event_id


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "not JSON"), (b"\xff\xfe", "not JSON"), (b"[1, 2]", "neither"), (b'{"hello": 1}', "neither"),
    (json.dumps({"Records": [{"eventName": "s3:ObjectCreated:Put"}]}).encode(), "malformed"),
    (json.dumps({"event_type": "create", "key": "/buckets/b/k"}).encode(), "malformed"),
])
def test_unreadable_notifications_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(EventFormatError, match=message):
        parse_events(body)


@pytest.fixture
def event_log(database_url: str) -> Iterator[EventLog]:
    engine = sa.create_engine(database_url)
    apply_migrations(engine, "audit")
    yield EventLog(engine)
    engine.dispose()


def _event(key: str, at: datetime, deleted: bool = False, occurred: datetime | None = None,
           tag: str = "") -> ObjectEvent:
    return ObjectEvent("b1", key, deleted, 3, "e", at, int(at.timestamp() * 1e9), occurred, f"{key}:{at}:{tag}", "s3")


def test_event_log_numbers_each_bucket_without_holes_and_ignores_re_deliveries(event_log: EventLog) -> None:
    assert event_log.state("b1") is None
    event_log.mark_gap(["b1", "b2"], "the receiver started", alive_seconds=60)
    first = event_log.state("b1")
    assert (first.epoch, first.last_seq, first.alive, first.gap_reason) == (1, 0, True, "the receiver started")
    assert event_log.append([_event("a", T0), _event("b", T0), _event("a", T0)]) == 2  # the third is the first again
    assert event_log.append([_event("a", T0), _event("c", T0 + timedelta(seconds=1))]) == 1
    assert event_log.append([ObjectEvent("not-streamed", "k", False, 1, "e", T0, 1, None, "x", "s3")]) == 0
    table = event_log.read("b1", 0, 3)
    assert table.column("seq").to_pylist() == [1, 2, 3] and table.column("key").to_pylist() == ["a", "b", "c"]
    assert event_log.state("b1").last_seq == 3 and event_log.state("b2").last_seq == 0
    # Pruned events are a hole a strict read refuses.
    assert event_log.prune("b1", 1) == 1
    with pytest.raises(EventGapError, match="1 of the events of b1 after cursor 0 are missing"):
        event_log.read("b1", 0, 3)
    assert event_log.read("b1", 0, 3, strict=False).num_rows == 2
    # A restart moves the epoch; a silent receiver is not alive.
    event_log.mark_gap(["b1"], "the receiver started again", alive_seconds=60)
    assert event_log.state("b1").epoch == 2
    event_log.heartbeat(["b1"], 0)
    assert not event_log.state("b1").alive


def test_an_event_far_out_of_order_is_a_gap(event_log: EventLog) -> None:
    event_log.mark_gap(["b1"], "started", alive_seconds=60)
    event_log.append([_event("a", T0, occurred=T0), _event("b", T0, occurred=T0 - timedelta(minutes=1))])
    assert event_log.state("b1").epoch == 1  # within the tolerance: webhooks are sent concurrently
    event_log.append([_event("c", T0, occurred=T0 - timedelta(minutes=10))])
    state = event_log.state("b1")
    assert state.epoch == 2 and "arrived after one of" in state.gap_reason


def _stream(epoch: int = 1, alive: bool = True) -> StreamState:
    return StreamState("b1", epoch, 10, "the receiver started", T0, alive)


def test_incremental_only_on_an_unbroken_live_stream_between_full_listings() -> None:
    previous = {"cursor": 4, "event_epoch": 1, "full_listing_at": T0.timestamp(), "manifest_uri": "/m"}
    now, day = T0 + timedelta(hours=1), timedelta(days=1)
    assert choose_inventory(previous, _stream(), day, now) == (INCREMENTAL, "6 events since cursor 4")
    for prior, stream, when, reason in [
        (previous, None, now, "no event stream"),
        (None, _stream(), now, "no earlier inventory with an event cursor"),
        ({"manifest_uri": "/m"}, _stream(), now, "no earlier inventory with an event cursor"),
        (previous, _stream(alive=False), now, "not running"),
        (previous, _stream(epoch=2), now, "may have a gap: the receiver started"),
        (previous, _stream(), T0 + day, "a full listing is due (full_listing_every 1d)"),
    ]:
        mode, why = choose_inventory(prior, stream, day, when)
        assert mode == FULL and reason in why


def _manifest(store: ManifestStore, rows: list[tuple[str, int, datetime, str]]) -> str:
    uri = store.new_uri("inventory", "b1", T0, "test-run")
    store.write_table(uri, pa.Table.from_pylist(
        [dict(zip(INVENTORY_SCHEMA.names, row, strict=True)) for row in rows], INVENTORY_SCHEMA))
    return uri


def _events(rows: list[tuple[int, str, bool, datetime]]) -> pa.Table:
    return pa.Table.from_pylist([
        {"seq": seq, "key": key, "deleted": deleted, "size": 9, "etag": f"e{seq}", "last_modified": at,
         "version_ns": int(at.timestamp() * 1e9)} for seq, key, deleted, at in rows], EVENT_SCHEMA)


def test_the_merge_is_last_writer_wins_whatever_the_arrival_order(tmp_path: Path) -> None:
    store, t1, t2 = ManifestStore(str(tmp_path)), T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)
    base = _manifest(store, [(k, 1, T0, "e0") for k in ("kept", "deleted", "rewritten", "stale-delete", "newer")])
    events = _events([
        (1, "deleted", True, T0),  # a delete of the listed version
        (2, "rewritten", False, t1),
        (3, "stale-delete", True, T0 - timedelta(seconds=5)),  # of an older version than the listed one
        (4, "created", False, t2), (5, "created", True, t1),  # arrived out of order: the create is later
        (6, "gone", True, t2), (7, "gone", False, t1),  # the delete is later
        (8, "tie", False, t1), (9, "tie", True, t1),  # a delete wins a tie
        (10, "newer", False, T0 - timedelta(seconds=1)),  # a late event of an older version
    ])
    uri = store.new_uri("inventory", "b1", t2, "test-run")
    assert merge_events(store, base, events, uri) == (5, 1 + 9 + 1 + 9 + 1)
    merged = store.read_table(uri)
    assert merged.schema == INVENTORY_SCHEMA
    rows = {row["key"]: (row["size"], row["etag"]) for row in merged.to_pylist()}
    assert rows == {"kept": (1, "e0"), "rewritten": (9, "e2"), "stale-delete": (1, "e0"), "created": (9, "e4"),
                    "newer": (1, "e0")}
    # The drift of a listing against the same merge, except keys in flight.
    listing = _manifest(store, [("kept", 1, T0, "e0"), ("rewritten", 9, t1, "e2"), ("surprise", 1, T0, "x"),
                                ("newer", 1, T0, "e0")])
    drift = inventory_drift(store, listing, base, events, in_flight=["kept"])
    assert (drift.missing, drift.extra, drift.sample) == (1, 2, ["surprise", "created", "stale-delete"])


def test_the_policy_sets_how_often_a_full_listing_reconciles_and_the_drift_error_threshold() -> None:
    from heimdall_storage_pipeline.core.policy import PolicyError, parse_policy

    def bucket(**settings: object) -> dict:
        return {"buckets": {"b1-bucket": {"min_age": "30d", "references": [{"query": "SELECT k FROM t"}],
                                          **settings}}}

    default = parse_policy(bucket(), "p.yaml").bucket("b1-bucket")
    assert (default.full_listing_every, default.drift_error_keys) == (timedelta(days=1), 100)
    tuned = parse_policy(bucket(full_listing_every="6h", drift_error_keys=0), "p.yaml").bucket("b1-bucket")
    assert (tuned.full_listing_every, tuned.drift_error_keys) == (timedelta(hours=6), 0)
    with pytest.raises(PolicyError) as raised:
        parse_policy(bucket(full_listing_every="30s", drift_error_keys=-1), "p.yaml")
    assert str(raised.value).splitlines() == [
        "p.yaml: buckets.b1-bucket.full_listing_every: 30s is too short; use at least 1m, e.g. '1d'",
        "p.yaml: buckets.b1-bucket.drift_error_keys: must not be negative, got -1",
    ]
