"""The README's operator recipes, run as written, on the demo's seeded Heimdall world.

Scan one bucket from the CLI (``dagster job execute`` with a partition tag and an ``as_of``, and
``dagster asset materialize --partition``), then plan -> review -> apply: the shipped dry-run config,
``heimdall-storage plan show``, a live run with the written apply config, and a second apply.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from heimdall_storage_pipeline.core.clock import as_utc, isoformat_utc, parse_utc, utc_now
from heimdall_storage_pipeline.defs.materializations import latest_metadata
from heimdall_storage_pipeline.local import demo, heimdall_db
from heimdall_storage_pipeline.local.postgres import create_database, drop_database
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS
from heimdall_storage_pipeline_tests.defs.automation.test_ui_e2e import _psycopg2_url

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKETS = (heimdall_db.SYNTHETIC_BUCKET, heimdall_db.AUDIO_BUCKET, heimdall_db.RAW_BUCKET)


class Operator:
    """A shell with the README's environment, pointed at the seeded world."""

    def __init__(self, env: dict[str, str], workdir: Path, world: heimdall_db.SeededWorld, seaweed: SeaweedFS,
                 database_url: str) -> None:
        self.env, self.workdir, self.world, self.seaweed, self.database_url = env, workdir, world, seaweed, database_url

    def run(self, *command: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert (done.returncode == 0) == ok, f"{command}: exit {done.returncode}\n{done.stdout[-3000:]}\n" \
                                             f"{done.stderr[-6000:]}"
        return done

    def metadata(self, asset: str, bucket: str) -> dict:
        with dg.DagsterInstance.from_config(self.env["DAGSTER_HOME"]) as instance:
            found = latest_metadata(instance, asset, bucket)
        assert found is not None
        return found

    def keys(self, bucket: str) -> set[str]:
        return {o.object_name for o in self.seaweed.client().list_objects(bucket, recursive=True)}


@pytest.fixture
def operator(tmp_path: Path, pg_admin_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Operator]:
    seaweed = SeaweedFS(workdir=tmp_path / "seaweedfs").start()  # its own: the demo's bucket names are fixed
    database_url = create_database(pg_admin_url, prefix="heimdall_recipes")
    dagster_db = create_database(pg_admin_url, prefix="dagster_recipes")
    try:
        engine = sa.create_engine(database_url)
        heimdall_db.create_schema(engine)
        world = heimdall_db.SeededWorld()
        heimdall_db.seed_old_objects(engine, seaweed.client(), world)
        engine.dispose()
        home = tmp_path / "dagster_home"
        home.mkdir()
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "HEIMDALL_", "DAGSTER_"))}
        env.update({**seaweed.env(), "DAGSTER_HOME": str(home), "DAGSTER_PG_URL": _psycopg2_url(dagster_db),
                    "HEIMDALL_DATABASE_URL": database_url,
                    "HEIMDALL_STORAGE_POLICY": str(demo.write_demo_policy(tmp_path / "policy.yaml"))})
        monkeypatch.setenv("DAGSTER_PG_URL", env["DAGSTER_PG_URL"])
        # The seeded orphans pass the demo policy's minimum age (seconds) before the scans.
        time.sleep(demo.DEMO_MIN_AGE_SECONDS + 1)
        yield Operator(env, tmp_path, world, seaweed, database_url)
    finally:
        seaweed.stop()
        drop_database(pg_admin_url, database_url)
        drop_database(pg_admin_url, dagster_db)


@pytest.mark.timeout(900)
def test_scan_plan_review_apply_from_the_cli(operator: Operator) -> None:
    module = ("-m", "heimdall_storage_pipeline.definitions")
    as_of = operator.workdir / "as_of.yaml"
    as_of.write_text(yaml.safe_dump({"ops": {"orphan_diff": {"config": {"as_of": isoformat_utc(utc_now())}}}}))
    # Scan one bucket: the job with a partition tag (and as_of), or the assets with --partition.
    for bucket in BUCKETS[:2]:
        operator.run("dagster", "job", "execute", *module, "-j", "storage_scan_job",
                     "--tags", json.dumps({"dagster/partition": bucket}), "-c", str(as_of))
    operator.run("dagster", "asset", "materialize", *module, "--select", "bucket_inventory,referenced_keys,orphan_diff",
                 "--partition", BUCKETS[2])
    for bucket in BUCKETS:
        diff = operator.metadata("orphan_diff", bucket)
        assert diff["eligible_orphan_count"] == len(operator.world.old_orphans[bucket]), bucket
    assert as_utc(operator.metadata("orphan_diff", BUCKETS[0])["as_of"]) == parse_utc(yaml.safe_load(
        as_of.read_text())["ops"]["orphan_diff"]["config"]["as_of"])

    # Plan: the shipped dry-run config succeeds, every bucket's verdict says a live run would refuse.
    operator.run("dagster", "job", "execute", *module, "-j", "delete_orphans_job",
                 "-c", "config/delete_orphans.dry_run.yaml")
    plans = {bucket: operator.metadata("orphan_deletions", bucket) for bucket in BUCKETS}
    for bucket, plan in plans.items():
        assert plan["guard_verdict"].startswith("would refuse: max_delete_fraction"), bucket
    raw = plans[heimdall_db.RAW_BUCKET]
    keys = operator.workdir / "keys.csv"
    apply = operator.workdir / "apply.yaml"

    # Review.
    shown = operator.run("heimdall-storage", "plan", "show", raw["plan_id"], "--csv", str(keys),
                         "--apply-config", str(apply)).stdout
    assert f"keys            {raw['would_delete_count']} ({raw['would_delete_bytes']} bytes)" in shown
    listed = [line.split(",")[0] for line in keys.read_text().splitlines()[1:]]
    assert set(listed) == operator.world.old_orphans[heimdall_db.RAW_BUCKET]

    # Between review and apply, a recording is referenced again: it and its sidecar are kept.
    recording = next(key for key in sorted(listed) if key.endswith(".npy"))
    sidecar = recording.removesuffix(".npy") + "_metadata.json"
    assert sidecar in listed
    engine = sa.create_engine(operator.database_url)
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO heimdall.measurements (timestamp, id, iq_data_location) "
                                   "VALUES (now(), gen_random_uuid(), :uri)"),
                           {"uri": f"s3://{heimdall_db.RAW_BUCKET}/{recording}"})
    engine.dispose()

    before = operator.keys(heimdall_db.RAW_BUCKET)
    operator.run("dagster", "job", "execute", *module, "-j", "delete_orphans_job", "-c", str(apply))
    assert before - operator.keys(heimdall_db.RAW_BUCKET) == set(listed) - {recording, sidecar}
    applied = operator.metadata("orphan_deletions", heimdall_db.RAW_BUCKET)
    assert (applied["plan_id"], applied["deleted_count"], applied["skipped_referenced"]) == (
        raw["plan_id"], len(listed) - 2, 2)
    assert "applied         by run" in operator.run("heimdall-storage", "plan", "show", raw["plan_id"]).stdout

    again = operator.run("dagster", "job", "execute", *module, "-j", "delete_orphans_job", "-c", str(apply), ok=False)
    assert "already applied" in again.stdout + again.stderr
    # The other buckets were not touched by any of this.
    for bucket in BUCKETS[:2]:
        assert operator.world.old_orphans[bucket] <= operator.keys(bucket)
