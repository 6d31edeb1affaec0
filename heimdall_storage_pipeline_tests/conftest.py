"""Real servers for the suite: SeaweedFS on loopback and PostgreSQL, one database per test."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from heimdall_storage_pipeline.core.policy import StoragePolicy, load_policy
from heimdall_storage_pipeline.defs.build import build_definitions
from heimdall_storage_pipeline.defs.resources import explicit_resources
from heimdall_storage_pipeline.local.heimdall_db import create_schema
from heimdall_storage_pipeline.local.postgres import (
    LOCAL_SERVER_URL,
    create_database,
    drop_database,
    reachable,
    start_embedded,
)
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(workdir=tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """HEIMDALL_TEST_PG_URL, else the local server on 5432, else an embedded PostgreSQL."""
    given = os.environ.get("HEIMDALL_TEST_PG_URL")
    if given:
        return given
    if reachable(LOCAL_SERVER_URL):
        return LOCAL_SERVER_URL
    return start_embedded(tmp_path_factory.mktemp("embedded-pg") / "data")


@pytest.fixture
def database_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database with Heimdall's schema."""
    url = create_database(pg_admin_url)
    engine = sa.create_engine(url)
    create_schema(engine)
    engine.dispose()
    yield url
    drop_database(pg_admin_url, url)


@pytest.fixture
def db_engine(database_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def make_bucket(seaweed: SeaweedFS) -> Callable[[str], str]:
    """Create a bucket with a unique name for this test."""
    client = seaweed.client()

    def _make(label: str = "b") -> str:
        name = f"t-{label}-{secrets.token_hex(4)}"
        client.make_bucket(name)
        return name

    return _make


def write_policy(directory: Path, buckets: dict[str, dict[str, Any]], **top: Any) -> Path:
    """A policy file for ``buckets`` (short minimum ages allowed, as tests need)."""
    document = {"allow_short_min_age": True, **top, "buckets": buckets}
    path = directory / f"policy-{secrets.token_hex(3)}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def key_source(query: str, fmt: str = "key", **extra: Any) -> dict[str, Any]:
    return {"name": f"src-{secrets.token_hex(2)}", "query": query, "format": fmt, **extra}


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as test_instance:
        yield test_instance


class ScanHarness:
    """Runs the scan assets in-process against the real servers for one policy."""

    def __init__(self, policy_path: Path, seaweed: SeaweedFS, database_url: str, manifest_root: str,
                 instance: dg.DagsterInstance) -> None:
        self.policy_path = policy_path
        self.policy: StoragePolicy = load_policy(policy_path)
        self.seaweed = seaweed
        self.instance = instance
        self.resources: dict[str, Any] = explicit_resources(
            seaweed.settings(), database_url, manifest_root, str(policy_path)
        )
        self.database_url = database_url
        self.defs = build_definitions(self.policy, self.resources)

    def materialize(self, names: list[str], bucket: str, as_of: str | None = None,
                    raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
        """Run (a subset of) storage_scan_job for one bucket, as the daemon would."""
        config = {"ops": {"orphan_diff": {"config": {"as_of": as_of}}}} if "orphan_diff" in names else None
        return self.defs.resolve_job_def("storage_scan_job").execute_in_process(
            partition_key=bucket,
            instance=self.instance,
            run_config=config,
            asset_selection=[dg.AssetKey(n) for n in names],
            raise_on_error=raise_on_error,
        )

    def scan(self, bucket: str, as_of: str | None = None) -> dict[str, Any]:
        """Run all three stages; return the orphan_diff metadata values."""
        self.materialize(["bucket_inventory", "referenced_keys", "orphan_diff"], bucket, as_of)
        return self.metadata("orphan_diff", bucket)

    def delete(self, raise_on_error: bool = True, **config: Any) -> dg.ExecuteInProcessResult:
        """Run delete_orphans_job with ``config`` (dry run unless dry_run=False)."""
        return self.defs.resolve_job_def("delete_orphans_job").execute_in_process(
            instance=self.instance,
            run_config={"ops": {"delete_orphans": {"config": config}}},
            raise_on_error=raise_on_error,
        )

    def purge(self, dataset_id: str, dry_run: bool = True, raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
        return self.defs.resolve_job_def("purge_dataset_job").execute_in_process(
            instance=self.instance,
            run_config={"ops": {"purge_dataset_op": {"config": {"dataset_id": dataset_id, "dry_run": dry_run}}}},
            raise_on_error=raise_on_error,
        )

    def metadata(self, asset: str, bucket: str) -> dict[str, Any]:
        from heimdall_storage_pipeline.defs.materializations import latest_metadata

        found = latest_metadata(self.instance, asset, bucket)
        assert found is not None, f"no materialization of {asset} for {bucket}"
        return found


@pytest.fixture
def harness_factory(
    seaweed: SeaweedFS, database_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> Callable[..., ScanHarness]:
    def _make(buckets: dict[str, dict[str, Any]], manifest_root: str | None = None, **top: Any) -> ScanHarness:
        policy_path = write_policy(tmp_path, buckets, **top)
        root = manifest_root or str(tmp_path / "manifests")
        return ScanHarness(policy_path, seaweed, database_url, root, instance)

    return _make
