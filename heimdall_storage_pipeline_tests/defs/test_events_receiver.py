"""``heimdall-storage events`` as a process: what it refuses, MinIO-format notifications, and that a
missed create, a missed delete and a duplicated event get nothing deleted that should not be."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from heimdall_storage_pipeline.core.clock import utc_now
from heimdall_storage_pipeline.core.events import EventLog
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.migrations import apply_migrations
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS, free_ports
from heimdall_storage_pipeline.receiver import EventReceiver, serve
from heimdall_storage_pipeline_tests.cleanup_support import listed_keys, put
from heimdall_storage_pipeline_tests.conftest import ScanHarness, key_source, write_policy
from heimdall_storage_pipeline_tests.events_support import (
    DEADLINE_SECONDS,
    Receiver,
    minio_notification,
    minio_record,
    stream,
    wait_for,
)

TOKEN = "events-test-token-7f3a"


@pytest.fixture
def setup(seaweed: SeaweedFS, make_bucket, database_url: str, db_engine: sa.Engine, instance: dg.DagsterInstance,
          tmp_path: Path) -> Iterator[tuple[ScanHarness, Receiver, str]]:
    bucket = make_bucket("minio-events")
    with db_engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE refs (k text)"))
        connection.execute(sa.text("INSERT INTO refs SELECT 'kept/' || i || '.npy' FROM generate_series(0, 6) i"))
    policy = write_policy(tmp_path, {bucket: {"min_age": "1s", "references": [key_source("SELECT k FROM refs")]}})
    harness = ScanHarness(policy, seaweed, database_url, str(tmp_path / "manifests"), instance)
    receiver = Receiver(free_ports(1)[0], policy, database_url, TOKEN, tmp_path / "receiver.log",
                        extra=("--max-body-bytes", "4096")).start()
    yield harness, receiver, bucket
    receiver.stop()
    assert TOKEN not in (tmp_path / "receiver.log").read_text()


def test_the_receiver_refuses_what_it_cannot_read_or_must_not_accept(setup) -> None:
    _, receiver, bucket = setup
    record = minio_record(bucket, "k", "s3:ObjectCreated:Put", utc_now(), 1, "e")
    assert receiver.post(minio_notification(record), token="")[0] == 401
    assert receiver.post(minio_notification(record), token="wrong")[0] == 401
    status, answer = receiver.post(b"{" + b" " * 5000 + b"}")
    assert status == 413 and "4096 bytes" in answer["error"]
    assert receiver.post(b"<xml/>") == (400, {"error": "the body is not JSON"})
    status, answer = receiver.post({"hello": "world"})
    assert status == 400 and "neither a SeaweedFS filer notification" in answer["error"]
    # Object events of policy buckets are kept; other buckets and reads are not.
    other = minio_record("not-in-policy", "k", "s3:ObjectCreated:Put", utc_now(), 1, "e")
    read = minio_record(bucket, "k", "s3:ObjectAccessed:Get", utc_now())
    assert receiver.post(minio_notification(record, other, read)) == (
        200, {"stored": 1, "duplicates": 0, "ignored": 1})
    assert receiver.post(minio_notification(record)) == (200, {"stored": 0, "duplicates": 1, "ignored": 0})
    state = stream(receiver.command[receiver.command.index("--database-url") + 1], bucket)
    # What it refused (too large, unreadable) may have announced changes: the stream has a gap since.
    assert state.last_seq == 1 and state.epoch == 2 and "refused or could not store" in state.gap_reason


def test_binding_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    command = [str(Path(sys.executable).parent / "heimdall-storage"), "events", "--host", "0.0.0.0",
               "--database-url", "postgresql+psycopg2://u:secret@127.0.0.1:1/db"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 2 and "set HEIMDALL_EVENTS_TOKEN" in done.stderr and "secret" not in done.stderr
    for weak in ("change-me", "short-token"):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HEIMDALL_EVENTS_TOKEN": weak})
        assert done.returncode == 2 and "too weak" in done.stderr and weak not in done.stderr


def test_an_amqp_url_with_a_password_on_the_command_line_is_refused(tmp_path: Path) -> None:
    command = [str(Path(sys.executable).parent / "heimdall-storage"), "events", "--amqp-url",
               "amqp://heimdall:hunter2@127.0.0.1:5672//", "--database-url", "postgresql+psycopg2://u@127.0.0.1:1/db"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 2 and "set HEIMDALL_EVENTS_AMQP_URL" in done.stderr and "hunter2" not in done.stderr


def test_events_it_could_not_store_become_a_gap_once_the_database_is_back(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    apply_migrations(engine, "audit")
    log = EventLog(engine)
    log.mark_gap(["b1"], "started", alive_seconds=60)
    dead = sa.create_engine("postgresql+psycopg2://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
    receiver = EventReceiver(EventLog(dead), {"b1"})
    body = minio_notification(minio_record("b1", "k", "s3:ObjectCreated:Put", utc_now(), 1, "e"))
    assert receiver.receive(json.dumps(body).encode())[0] == 503
    receiver.events = log
    assert receiver.receive(json.dumps(body).encode()) == (200, {"stored": 1, "duplicates": 0, "ignored": 0})
    state = log.state("b1")
    assert state.epoch == 2 and "could not store events" in state.gap_reason
    engine.dispose()
    dead.dispose()


def _old_enough(client, bucket: str, keys: list[str]) -> None:
    """Let real time pass the minimum age (1 s): the deletion re-validates with the real clock."""
    newest = max(client.stat_object(bucket, key).last_modified for key in keys)
    remaining = (newest + timedelta(seconds=2) - utc_now()).total_seconds()
    if remaining > 0:
        time.sleep(remaining)


def test_missed_and_duplicated_minio_events_get_nothing_deleted_wrongly(setup, seaweed: SeaweedFS) -> None:
    harness, receiver, bucket = setup
    client = seaweed.client()
    for i in range(6):
        put(client, bucket, f"kept/{i}.npy")
    for key in ("orphan/missed-delete.bin", "orphan/missed-overwrite.bin"):
        put(client, bucket, key)
    harness.materialize(["bucket_inventory"], bucket)
    assert harness.metadata("bucket_inventory", bucket)["mode"] == "full"

    def notify(*changes: tuple[str, str]) -> dict:
        records = []
        for key, name in changes:
            if name.startswith("s3:ObjectCreated"):
                # MinIO's event time follows the object's modification time closely; SeaweedFS's
                # Last-Modified has whole seconds, so keep the event in that second and after the previous.
                stat = client.stat_object(bucket, key)
                at = min(max(utc_now(), stat.last_modified), stat.last_modified + timedelta(milliseconds=999))
                records.append(minio_record(bucket, key, name, at, stat.size, stat.etag))
            else:
                records.append(minio_record(bucket, key, name, utc_now()))
        status, answer = receiver.post(minio_notification(*records))
        assert status == 200 and answer["stored"] == len(records), answer
        return minio_notification(*records)

    # Announced: an unreferenced upload (a true orphan), and a referenced key written, deleted and written again.
    put(client, bucket, "orphan/announced file+1.bin")
    announced = notify(("orphan/announced file+1.bin", "s3:ObjectCreated:Put"))
    put(client, bucket, "kept/6.npy", b"first")
    notify(("kept/6.npy", "s3:ObjectCreated:Put"))
    client.remove_object(bucket, "kept/6.npy")
    deleted = notify(("kept/6.npy", "s3:ObjectRemoved:Delete"))
    put(client, bucket, "kept/6.npy", b"second")
    notify(("kept/6.npy", "s3:ObjectCreated:CompleteMultipartUpload"))
    # Missed: an upload, a delete and an overwrite no event announces.
    put(client, bucket, "orphan/missed-create.bin")
    client.remove_object(bucket, "orphan/missed-delete.bin")
    put(client, bucket, "orphan/missed-overwrite.bin", b"new content")
    # Duplicated: two notifications delivered again, one of them after the key was written again.
    for again in (announced, deleted):
        assert receiver.post(again) == (200, {"stored": 0, "duplicates": 1, "ignored": 0})
    _old_enough(client, bucket, ["orphan/announced file+1.bin", "orphan/missed-overwrite.bin", "kept/6.npy"])

    scan = harness.scan(bucket)
    inventory = harness.metadata("bucket_inventory", bucket)
    assert inventory["mode"] == "incremental" and inventory["events_applied"] == 4
    keys = set(ManifestStore(str(harness.resources["manifests"].root)).read_table(
        inventory["manifest_uri"]).column("key").to_pylist())
    assert "orphan/announced file+1.bin" in keys and "orphan/missed-create.bin" not in keys
    assert "orphan/missed-delete.bin" in keys and "kept/6.npy" in keys
    assert scan["eligible_orphan_count"] == 3

    harness.delete(dry_run=False, buckets=[bucket])
    done = harness.metadata("orphan_deletions", bucket)
    assert (done["deleted_count"], done["skipped_missing"], done["skipped_changed"]) == (1, 1, 1)
    remaining = listed_keys(client, bucket)
    assert "orphan/announced file+1.bin" not in remaining
    assert {f"kept/{i}.npy" for i in range(6)} <= remaining
    assert {"orphan/missed-create.bin", "orphan/missed-overwrite.bin"} <= remaining


def test_minio_amqp_target_through_rabbitmq(seaweed: SeaweedFS, make_bucket, database_url: str,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MinIO's notify_amqp publishes each notification to an exchange; the receiver's queue gets them."""
    from kombu import Connection, Exchange, Queue

    bucket, name = make_bucket("amqp"), f"heimdall-test-{secrets.token_hex(4)}"
    policy = write_policy(tmp_path, {bucket: {"min_age": "1s", "references": [key_source("SELECT 'x'")]}})
    url = "amqp://guest:guest@127.0.0.1:5672//"
    monkeypatch.setenv("HEIMDALL_EVENTS_AMQP_URL", url)  # the receiver's process inherits it; never in argv
    receiver = Receiver(free_ports(1)[0], policy, database_url, TOKEN, tmp_path / "receiver.log", extra=(
        "--amqp-exchange", name, "--amqp-routing-key", "bucketlogs", "--amqp-queue", name)).start()
    assert "guest:guest" not in " ".join(receiver.command)
    exchange = Exchange(name, type="fanout", durable=True)
    try:
        wait_for(lambda: f"consuming queue {name}" in (tmp_path / "receiver.log").read_text(), "the AMQP consumer")
        created = minio_notification(minio_record(bucket, "a b+c.bin", "s3:ObjectCreated:Put", utc_now(), 3, "e1"))
        deleted = minio_notification(minio_record(bucket, "old.bin", "s3:ObjectRemoved:Delete", utc_now()))
        with Connection(url) as connection:
            producer = connection.Producer(exchange=exchange, routing_key="bucketlogs")
            for body in (json.dumps(created), "not a notification", json.dumps(created), json.dumps(deleted)):
                producer.publish(body, content_type="application/json", delivery_mode=2)
        wait_for(lambda: (stream(database_url, bucket) or None) and stream(database_url, bucket).last_seq == 2,
                 "two events through RabbitMQ")
        engine = sa.create_engine(database_url)
        table = EventLog(engine).read(bucket, 0, 2)
        engine.dispose()
        assert table.column("key").to_pylist() == ["a b+c.bin", "old.bin"]
        assert table.column("deleted").to_pylist() == [False, True]
        receiver.stop()
        assert "dropped an AMQP message that is not a notification" in (tmp_path / "receiver.log").read_text()
        assert "guest:guest" not in (tmp_path / "receiver.log").read_text()
    finally:
        receiver.stop()
        with Connection(url) as connection:
            Queue(name, exchange, channel=connection.channel()).delete()
            exchange(connection.channel()).delete()


def test_an_incremental_inventory_that_cannot_be_built_is_a_full_listing(setup, seaweed: SeaweedFS) -> None:
    harness, receiver, bucket = setup
    client = seaweed.client()
    put(client, bucket, "a.bin")
    harness.materialize(["bucket_inventory"], bucket)
    first = harness.metadata("bucket_inventory", bucket)
    put(client, bucket, "b.bin")
    stat_b = client.stat_object(bucket, "b.bin")
    assert receiver.post(minio_notification(minio_record(bucket, "b.bin", "s3:ObjectCreated:Put",
                                                         stat_b.last_modified, stat_b.size, stat_b.etag)))[0] == 200
    Path(first["manifest_uri"]).unlink()  # the base is gone (pruned, or a manifest store moved)
    harness.materialize(["bucket_inventory"], bucket)
    second = harness.metadata("bucket_inventory", bucket)
    assert second["mode"] == "full" and "the incremental inventory failed (cannot read manifest" in second[
        "mode_reason"]
    assert second["object_count"] == 2
    # Events missing from the log after the cursor (deleted by hand here) are a gap as well.
    put(client, bucket, "c.bin")
    stat_c = client.stat_object(bucket, "c.bin")
    receiver.post(minio_notification(minio_record(bucket, "c.bin", "s3:ObjectCreated:Put", stat_c.last_modified,
                                                  stat_c.size, stat_c.etag)))
    engine = sa.create_engine(harness.database_url)
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM heimdall_storage_bucket_events WHERE bucket = :b"), {"b": bucket})
    engine.dispose()
    harness.materialize(["bucket_inventory"], bucket)
    third = harness.metadata("bucket_inventory", bucket)
    assert third["mode"] == "full" and "are missing from the event log" in third["mode_reason"]
    assert third["object_count"] == 3


@pytest.fixture
def small_server(database_url: str) -> Iterator[tuple[int, str, EventLog]]:
    """``serve`` in a thread: requests time out after 0.5 s, one connection at a time."""
    engine = sa.create_engine(database_url)
    apply_migrations(engine, "audit")
    bucket = f"slow-{secrets.token_hex(4)}"
    log = EventLog(engine)
    receiver = EventReceiver(log, {bucket}, max_body=2 << 20, heartbeat_seconds=0.2)
    stop, ports = threading.Event(), []
    thread = threading.Thread(target=serve, args=(receiver, "127.0.0.1", 0, stop),
                              kwargs={"timeout": 0.5, "max_requests": 1, "bound": ports.append}, daemon=True)
    thread.start()
    port = wait_for(lambda: ports and ports[0], "the server to listen")
    yield port, bucket, log
    stop.set()
    thread.join(timeout=30)
    engine.dispose()


def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` and read the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_SECONDS) as connection:
        connection.sendall(data)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        return answer


def test_a_client_that_trickles_its_body_is_cut_off_and_holds_no_slot(small_server) -> None:
    port, bucket, log = small_server
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_SECONDS) as slow:
        slow.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n{")
        # It holds the only slot: the next connection is refused at once, not queued behind it.
        assert _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 503")
        answer = b""
        while chunk := slow.recv(65536):  # the server closes the connection after its timeout
            answer += chunk
    assert answer.split(b"\r\n")[0].endswith(b"408 Request Timeout"), answer
    # The slot is free again, and the body that never came whole left a gap in the bucket's stream.
    wait_for(lambda: _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.0 200"),
             "the slot to be free")
    wait_for(lambda: "refused or could not store" in (log.state(bucket).gap_reason or ""), "a gap")


def test_a_content_length_of_other_digits_is_refused(small_server) -> None:
    port, _, _ = small_server
    answer = _exchange(port, "POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: ²\r\n\r\n".encode("latin-1"))
    assert answer.startswith(b"HTTP/1.0 411"), answer
