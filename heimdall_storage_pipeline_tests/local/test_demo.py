"""``make demo`` end to end: its own embedded PostgreSQL and SeaweedFS, a seeded Heimdall, a report."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from heimdall_storage_pipeline.core.clock import as_utc
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.s3 import S3Settings, make_client
from heimdall_storage_pipeline.defs.materializations import latest_metadata
from heimdall_storage_pipeline.local import demo, heimdall_db
from heimdall_storage_pipeline_tests.helpers import orphan_rows

BUCKETS = (heimdall_db.SYNTHETIC_BUCKET, heimdall_db.AUDIO_BUCKET, heimdall_db.RAW_BUCKET)


class DemoRun:
    """What one demo run printed, seeded and materialized."""

    def __init__(self) -> None:
        self.exit_code: int | None = None
        self.output = ""
        self.worlds: list[heimdall_db.SeededWorld] = []
        self.metadata: dict[tuple[str, str], dict[str, Any]] = {}
        self.seaweed_processes: list[Any] = []

    @property
    def world(self) -> heimdall_db.SeededWorld:
        (world,) = self.worlds
        return world


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DemoRun, Path]]:
    """Run the demo once; record the seeded world and, while its servers are up, its metadata."""
    run = DemoRun()
    workdir = tmp_path_factory.mktemp("demo") / ".demo"
    saved_env = dict(os.environ)
    patch = pytest.MonkeyPatch()

    class RecordedWorld(heimdall_db.SeededWorld):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            run.worlds.append(self)

    real_scan = demo._scan_every_bucket
    real_seaweed = demo.SeaweedFS

    def scan_and_record(*args: Any) -> list[dict[str, Any]]:
        rows = real_scan(*args)
        with dg.DagsterInstance.get() as instance:
            for bucket in BUCKETS:
                for asset in ("bucket_inventory", "referenced_keys", "orphan_diff"):
                    run.metadata[(asset, bucket)] = latest_metadata(instance, asset, bucket) or {}
        return rows

    def recorded_seaweed(*args: Any, **kwargs: Any) -> Any:
        server = real_seaweed(*args, **kwargs)
        run.seaweed_processes.append(server)
        return server

    patch.setattr(demo, "SeededWorld", RecordedWorld)
    patch.setattr(demo, "_scan_every_bucket", scan_and_record)
    patch.setattr(demo, "SeaweedFS", recorded_seaweed)
    capture = workdir.parent / "stdout.txt"
    try:
        with capture.open("w") as out, contextlib.redirect_stdout(out):
            run.exit_code = demo.run_demo(workdir=str(workdir))
        run.output = capture.read_text()
        yield run, workdir
    finally:
        patch.undo()
        os.environ.clear()
        os.environ.update(saved_env)


def report_rows(output: str) -> dict[str, dict[str, str]]:
    lines = output.splitlines()
    header_index = next(i for i, line in enumerate(lines) if line.startswith("bucket "))
    header = lines[header_index]
    starts = [header.index(title) for title, _ in demo.REPORT_COLUMNS]
    rows = {}
    for line in lines[header_index + 2: header_index + 2 + len(BUCKETS)]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows[cells[0]] = {field: cell for (_, field), cell in zip(demo.REPORT_COLUMNS, cells, strict=True)}
    return rows


def test_demo_succeeds_and_prints_a_row_per_bucket(demo_run: tuple[DemoRun, Path]) -> None:
    run, _ = demo_run
    assert run.exit_code == 0
    for bucket in BUCKETS:
        assert f"storage_scan_job[{bucket}]: success" in run.output
    assert set(report_rows(run.output)) == set(BUCKETS)


def test_the_shipped_dry_run_makes_a_plan_for_every_bucket(demo_run: tuple[DemoRun, Path]) -> None:
    """Every seeded bucket is more than half orphaned: a live run would refuse, the dry run tells it."""
    run, _ = demo_run
    assert "delete_orphans_job (dry run): success" in run.output
    plans = [line.split() for line in run.output.splitlines() if line.startswith(BUCKETS)]
    plans = {cells[0]: cells for cells in plans if len(cells) > 1 and cells[1].startswith(cells[0] + ":")}
    assert set(plans) == set(BUCKETS)
    for bucket, cells in plans.items():
        assert int(cells[2]) == len(run.world.old_orphans[bucket]), bucket
        assert " ".join(cells[4:]).startswith("a live run would refuse (max_delete_fraction"), cells


def test_report_matches_what_was_seeded(demo_run: tuple[DemoRun, Path]) -> None:
    run, _ = demo_run
    world, rows = run.world, report_rows(run.output)
    for bucket in BUCKETS:
        row = rows[bucket]
        old, young = world.old_orphans[bucket], world.young_orphans[bucket]
        assert int(row["object_count"]) == len(world.referenced[bucket]) + len(old) + len(young), bucket
        assert int(row["orphan_count"]) == len(old) + len(young), bucket
        assert int(row["eligible_orphan_count"]) == len(old), bucket
        assert int(row["young_orphan_count"]) == len(young), bucket
        assert int(row["dangling_reference_count"]) == len(world.dangling.get(bucket, ())), bucket
        assert row["health_status"] in {"healthy", "warning", "critical"}


def test_orphan_manifests_classify_every_seeded_object(demo_run: tuple[DemoRun, Path]) -> None:
    run, workdir = demo_run
    world = run.world
    store = ManifestStore(root=str(workdir / "dagster_home" / "manifests"))
    min_age = timedelta(seconds=demo.DEMO_MIN_AGE_SECONDS)
    for bucket in BUCKETS:
        diff = run.metadata[("orphan_diff", bucket)]
        rows = orphan_rows(store, diff["manifest_uri"])
        assert not set(rows) & world.referenced[bucket], f"referenced objects listed as orphans in {bucket}"
        assert {key for key, eligible in rows.items() if eligible} == world.old_orphans[bucket]
        ages = store.read_table(diff["manifest_uri"], columns=["key", "last_modified"]).to_pylist()
        young_ages = [as_utc(diff["as_of"]) - row["last_modified"] for row in ages
                      if row["key"] in world.young_orphans[bucket]]
        assert young_ages and all(age < min_age for age in young_ages)
        assert {key for key, eligible in rows.items() if not eligible} == world.young_orphans[bucket]
    # Sidecars of referenced recordings are kept; those of lost recordings are orphans.
    sidecars = {key for key in world.referenced[heimdall_db.RAW_BUCKET] if key.endswith("_metadata.json")}
    assert len(sidecars) == 4
    lost = {key for key in world.old_orphans[heimdall_db.RAW_BUCKET] if key.endswith("_metadata.json")}
    assert len(lost) == 3


def test_reference_figures(demo_run: tuple[DemoRun, Path]) -> None:
    run, _ = demo_run
    synthetic = run.metadata[("referenced_keys", heimdall_db.SYNTHETIC_BUCKET)]
    audio = run.metadata[("referenced_keys", heimdall_db.AUDIO_BUCKET)]
    raw = run.metadata[("referenced_keys", heimdall_db.RAW_BUCKET)]
    assert synthetic["unparseable_reference_count"] == 1
    assert "'../escape.npy'" in synthetic["unparseable_sample"]
    assert audio["other_bucket_reference_count"] == 1
    assert audio["unparseable_reference_count"] == 0
    assert (raw["other_bucket_reference_count"], raw["unparseable_reference_count"]) == (0, 0)
    dangling = run.metadata[("orphan_diff", heimdall_db.SYNTHETIC_BUCKET)]
    assert set(json.loads(dangling["dangling_sample"])) == run.world.dangling[heimdall_db.SYNTHETIC_BUCKET]


def test_demo_stops_what_it_started(demo_run: tuple[DemoRun, Path]) -> None:
    run, workdir = demo_run
    (seaweed,) = run.seaweed_processes
    assert seaweed.process is not None and seaweed.process.poll() is not None, "SeaweedFS still running"
    assert not (workdir / "postgres" / "postmaster.pid").exists(), "embedded PostgreSQL still running"


def test_the_runs_log_to_a_file_and_the_report_to_stdout(demo_run: tuple[DemoRun, Path]) -> None:
    run, workdir = demo_run
    log = (workdir / demo.LOG_FILE).read_text()
    assert log.count("RUN_SUCCESS") == len(BUCKETS) + 2  # three scans, the dry run and storage_history
    assert " - dagster - " not in run.output and "STEP_START" not in run.output
    assert "heimdall-storage demo --print-env" in run.output


def test_a_taken_ui_port_is_named_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert demo._serve_ui({}, tmp_path, port) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"port {port} on 127.0.0.1 is in use (another dagster dev?); stop it or pass --ui-port"]
    assert not (tmp_path / demo.UI_LOG_FILE).exists()  # nothing was started


# Last in this module: it starts the demo's servers again, from the world the demo above left.
def test_make_dev_reuses_the_seeded_world_and_prints_its_environment(
    demo_run: tuple[DemoRun, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, workdir = demo_run
    cli = str(Path(sys.executable).parent / "heimdall-storage")
    reached: dict[str, int] = {}

    def reach_the_servers(env: dict[str, str], root: Path, port: int) -> int:
        """Instead of dagster dev: what another terminal does with --print-env while the servers run."""
        printed = subprocess.run([cli, "demo", "--print-env", "--workdir", str(root)], capture_output=True,
                                 text=True, timeout=120, check=True).stdout
        exported = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in printed.splitlines())
        assert set(exported) == set(demo.ENV_NAMES) and exported == {name: env[name] for name in demo.ENV_NAMES}
        client = make_client(S3Settings(endpoint=exported["MINIO_ENDPOINT"], access_key=exported["MINIO_ACCESS_KEY"],
                                        secret_key=exported["MINIO_SECRET_KEY"]))
        reached.update({bucket: sum(1 for _ in client.list_objects(bucket, recursive=True)) for bucket in BUCKETS})
        return 0

    monkeypatch.setattr(demo, "_serve_ui", reach_the_servers)
    capture = tmp_path / "dev.txt"
    with capture.open("w") as out, contextlib.redirect_stdout(out):
        assert demo.run_demo(workdir=str(workdir), serve_ui=True) == 0
    output = capture.read_text()
    assert "Reusing the demo world seeded at" in output
    assert len(run.worlds) == 1, "the world was seeded a second time"
    world = run.world
    for bucket in BUCKETS:  # not doubled
        seeded = len(world.referenced[bucket]) + len(world.old_orphans[bucket]) + len(world.young_orphans[bucket])
        assert reached[bucket] == seeded, bucket
    assert report_rows(output) == report_rows(run.output)

    stopped = subprocess.run([cli, "demo", "--print-env", "--workdir", str(workdir)], capture_output=True,
                             text=True, timeout=120, check=False)
    assert stopped.returncode == 1 and stopped.stdout == ""
    assert stopped.stderr.strip() == f"no demo is running under {workdir}; start one with `make dev` (the servers " \
                                     f"of `make demo` stop once it has printed its report)"


def test_the_demo_seeds_a_history_and_prints_the_capacity_report(demo_run: tuple[DemoRun, Path]) -> None:
    from heimdall_storage_pipeline.core.capacity import HISTORY_SCHEMA

    run, workdir = demo_run
    assert "]: success" in run.output.split("Capacity (", 1)[1].splitlines()[2]  # storage_history[<today>]
    rows = {line.split()[0]: line for line in run.output.splitlines() if line.startswith((*BUCKETS, "total "))}
    assert "LEAK: orphan inflow 3.0x its norm" in rows[heimdall_db.SYNTHETIC_BUCKET]
    assert "steady" in rows[heimdall_db.AUDIO_BUCKET] and "B/d" in rows["total"]
    assert "Forecast: full in " in run.output and "free of 64.0 KiB" in run.output
    assert (workdir / demo.CHART_FILE).read_bytes().startswith(b"\x89PNG")
    history = ManifestStore(root=str(workdir / "dagster_home" / "manifests")).read_history(HISTORY_SCHEMA)
    assert history.num_rows == (demo.HISTORY_DAYS + 1) * len(BUCKETS)
