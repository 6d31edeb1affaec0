"""Incremental inventories from SeaweedFS's filer webhook, against real servers: the key set equals a
full listing's; a receiver that was down is a gap, answered by a full listing that reports the drift."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from heimdall_storage_pipeline.core.listing import list_bucket_to_manifest
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.exporter.collector import render_metrics
from heimdall_storage_pipeline.exporter.state import collect_storage_snapshot
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS, free_ports
from heimdall_storage_pipeline_tests.conftest import ScanHarness, key_source, write_policy
from heimdall_storage_pipeline_tests.events_support import Receiver, stream, wait_for

OBJECTS = 10_000


@pytest.fixture(scope="module")
def webhook_seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SeaweedFS, int, str]]:
    """SeaweedFS whose filer POSTs every change to a receiver port (nothing listens until a test starts one).
    No retries: what a stopped receiver misses is lost, as after a sender's retries run out."""
    port, token = free_ports(1)[0], secrets.token_urlsafe(16)
    server = SeaweedFS(workdir=tmp_path_factory.mktemp("seaweedfs-webhook"),
                       webhook_url=f"http://127.0.0.1:{port}/seaweedfs", webhook_token=token,
                       webhook_max_retries=0).start()
    yield server, port, token
    server.stop()


def _put(client: Any, bucket: str, key: str, content: bytes) -> None:
    client.put_object(bucket, key, io.BytesIO(content), len(content))


def _rows(store: ManifestStore, uri: str) -> list[tuple[Any, ...]]:
    table = store.read_table(uri).sort_by("key")
    return list(zip(*(table.column(name).to_pylist() for name in ("key", "size", "last_modified", "etag")),
                    strict=True))


class World:
    def __init__(self, seaweed: SeaweedFS, harness: ScanHarness, receiver: Receiver, bucket: str, root: Path,
                 database_url: str) -> None:
        self.seaweed, self.harness, self.receiver, self.bucket = seaweed, harness, receiver, bucket
        self.client, self.store, self.database_url = seaweed.client(), ManifestStore(str(root)), database_url
        self.keys: set[str] = set()

    def seq(self) -> int:
        state = stream(self.database_url, self.bucket)
        return state.last_seq if state else 0

    def change(self, creates: list[str] = (), overwrites: list[str] = (), deletes: list[str] = ()) -> int:
        """Apply the changes through S3; returns the number of object events they make."""
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda key: _put(self.client, self.bucket, key, key.encode()), creates))
            list(pool.map(lambda key: _put(self.client, self.bucket, key, b"v2-" + key.encode() * 2), overwrites))
            list(pool.map(lambda key: self.client.remove_object(self.bucket, key), deletes))
        self.keys = (self.keys | set(creates)) - set(deletes)
        return len(creates) + len(overwrites) + len(deletes)

    def settle(self, after: int, events: int) -> None:
        wait_for(lambda: self.seq() >= after + events, f"{events} events of {self.bucket} after seq {after}")

    def inventory(self) -> tuple[dict[str, Any], Any]:
        result = self.harness.materialize(["bucket_inventory"], self.bucket)
        [check] = result.get_asset_check_evaluations()
        return self.harness.metadata("bucket_inventory", self.bucket), check

    def assert_equals_a_full_listing(self, metadata: dict[str, Any]) -> None:
        listing = list_bucket_to_manifest(self.seaweed.settings(), self.bucket, self.store, "reference-listing")
        assert _rows(self.store, metadata["manifest_uri"]) == _rows(self.store, listing.manifest_uri)
        assert {row[0] for row in _rows(self.store, listing.manifest_uri)} == self.keys
        assert metadata["object_count"] == listing.object_count == len(self.keys)
        assert metadata["total_bytes"] == listing.total_bytes


@pytest.fixture
def world(webhook_seaweed: tuple[SeaweedFS, int, str], database_url: str, instance: dg.DagsterInstance,
          tmp_path: Path) -> Iterator[World]:
    seaweed, port, token = webhook_seaweed
    bucket = f"t-events-{secrets.token_hex(4)}"
    seaweed.client().make_bucket(bucket)
    policy = write_policy(tmp_path, {bucket: {"min_age": "1s", "drift_error_keys": 25,
                                              "references": [key_source("SELECT 'nothing'")]}})
    harness = ScanHarness(policy, seaweed, database_url, str(tmp_path / "manifests"), instance)
    receiver = Receiver(port, policy, database_url, token, tmp_path / "receiver.log").start()
    yield World(seaweed, harness, receiver, bucket, tmp_path / "manifests", database_url)
    receiver.stop()
    assert token not in (tmp_path / "receiver.log").read_text()


def test_incremental_inventory_follows_webhooks_and_a_gap_is_reconciled(world: World) -> None:
    odd = ["with space/a b.bin", "plus+sign.bin", "percent%41.bin", "unicode/åäö-ü.bin", "deep/a/b/c/d.bin"]
    initial = [f"data/{i // 100:03d}/obj-{i:05d}.bin" for i in range(OBJECTS - len(odd))] + odd
    world.settle(0, world.change(creates=initial))
    full, check = world.inventory()
    assert (full["mode"], full["cursor"], full["events_applied"]) == ("full", world.seq(), 0)
    assert "no earlier inventory with an event cursor" in full["mode_reason"]
    assert check.passed and full["object_count"] == OBJECTS

    # S3 "folder/" markers: SeaweedFS keeps them as directories and listings skip them; so do events.
    for marker in ("markers/kept/", "markers/gone/"):
        _put(world.client, world.bucket, marker, b"")
    world.client.remove_object(world.bucket, "markers/gone/")

    # Creates, overwrites, deletes, and keys created and deleted (or overwritten and deleted) in between.
    fresh = [f"new/{i:04d}.bin" for i in range(300)]
    start = world.seq()
    events = world.change(creates=[*fresh, "new/plus+one.bin"], overwrites=initial[:200] + odd)
    events += world.change(deletes=initial[200:400] + fresh[:50] + initial[:20] + ["with space/a b.bin"])
    world.settle(start, events)
    incremental, check = world.inventory()
    assert (incremental["mode"], incremental["cursor"], incremental["events_applied"]) == (
        "incremental", world.seq(), events)
    assert incremental["full_listing_at"] == full["listing_started_at"]
    assert check.passed and "drift_count" not in incremental
    world.assert_equals_a_full_listing(incremental)

    # The receiver dies; what changes meanwhile is lost (the filer does not retry here).
    world.receiver.stop(kill=True)
    lost_creates, lost_deletes = [f"lost/{i:02d}.bin" for i in range(20)], initial[400:410]
    world.change(creates=lost_creates, deletes=lost_deletes)
    wait_for(lambda: not stream(world.database_url, world.bucket).alive, "the receiver's heartbeat to lapse")
    reconciled, check = world.inventory()
    assert reconciled["mode"] == "full" and "not running" in reconciled["mode_reason"]
    assert (reconciled["drift_missing_count"], reconciled["drift_extra_count"], reconciled["drift_count"]) == (
        20, 10, 30)
    assert "lost/00.bin" in reconciled["drift_sample"] and initial[400] in reconciled["drift_sample"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR  # 30 > drift_error_keys 25
    world.assert_equals_a_full_listing(reconciled)
    snapshot = collect_storage_snapshot(world.harness.instance, buckets=[world.bucket])
    assert f'heimdall_storage_inventory_drift_keys{{bucket="{world.bucket}"}} 30.0' in render_metrics(
        snapshot).decode()

    # Back up: its start is a gap in itself, so one more full listing; it finds nothing missing.
    world.receiver.start()
    start = world.seq()
    world.settle(start, world.change(creates=[f"after/{i}.bin" for i in range(30)], deletes=initial[410:420]))
    healed, check = world.inventory()
    assert healed["mode"] == "full" and "the receiver started at" in healed["mode_reason"]
    assert healed["drift_count"] == 0 and check.passed
    start = world.seq()
    world.settle(start, world.change(creates=["final.bin"], overwrites=initial[500:510], deletes=initial[600:610]))
    following, check = world.inventory()
    assert (following["mode"], following["events_applied"], following["drift_count"]) == ("incremental", 21, 0)
    world.assert_equals_a_full_listing(following)
