"""The code location loads: ``dagster definitions validate`` as an operator would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import yaml

from heimdall_storage_pipeline.core.policy import POLICY_ENV_VAR, default_policy_path, load_policy
from heimdall_storage_pipeline.defs.build import build_definitions

DAGSTER = str(Path(sys.executable).parent / "dagster")
MODULE = "heimdall_storage_pipeline.definitions"


def validate(tmp_path: Path, policy: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the validator in a clean directory with its own (sqlite) DAGSTER_HOME."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "HEIMDALL_", "DAGSTER_"))}
    env["DAGSTER_HOME"] = str(home)
    if policy is not None:
        env[POLICY_ENV_VAR] = str(policy)
    return subprocess.run([DAGSTER, "definitions", "validate", "-m", MODULE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180, check=False)


def test_definitions_validate_with_the_shipped_policy(tmp_path: Path) -> None:
    result = validate(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All code locations passed validation" in result.stdout + result.stderr


def test_definitions_validate_fails_on_a_broken_policy(tmp_path: Path) -> None:
    document = yaml.safe_load(default_policy_path().read_text())
    document["buckets"]["heimdall-raw-iq"]["batch_size"] = 5000
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(document))
    result = validate(tmp_path, broken)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{broken}: buckets.heimdall-raw-iq.batch_size: 5000 is out of range" in output


def test_partitions_and_job_follow_the_policy() -> None:
    policy = load_policy(default_policy_path())
    defs = build_definitions(policy)
    job = defs.resolve_job_def("storage_scan_job")
    assert job.partitions_def is not None
    assert set(job.partitions_def.get_partition_keys()) == {b.name for b in policy.enabled_buckets()}
    assert {key.to_user_string() for key in job.asset_layer.executable_asset_keys} >= {
        "bucket_inventory", "referenced_keys", "orphan_diff"}
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("orphan_diff")).parent_keys == {dg.AssetKey("referenced_keys")}
    assert graph.get(dg.AssetKey("referenced_keys")).parent_keys == {dg.AssetKey("bucket_inventory")}
