"""``heimdall-storage validate-policy``: exit codes and messages, no server involved."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from heimdall_storage_pipeline.cli import main
from heimdall_storage_pipeline.core.policy import POLICY_ENV_VAR, default_policy_path

CLI = str(Path(sys.executable).parent / "heimdall-storage")


def shipped_document() -> dict:
    return yaml.safe_load(default_policy_path().read_text())


def test_validate_the_shipped_policy(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(POLICY_ENV_VAR, raising=False)
    assert main(["validate-policy"]) == 0
    out = capsys.readouterr().out
    assert f"OK {default_policy_path()}" in out
    assert "heimdall-raw-iq: enabled, min age 60d, batch 1000" in out
    assert "sources: synthetic_iq_samples.iq_storage_paths (timeout 10m)" in out


def test_validate_prints_durations_readably(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = shipped_document()
    document["allow_short_min_age"] = True
    buckets = document["buckets"]
    buckets["heimdall-synthetic-iq"]["min_age_days"] = 1.25
    buckets["heimdall-audio-chunks"]["min_age_days"] = 0.5
    buckets["heimdall-raw-iq"].pop("min_age_days")
    buckets["heimdall-raw-iq"]["min_age"] = "90s"
    buckets["heimdall-raw-iq"]["references"][0]["statement_timeout"] = "1.5h"
    path = tmp_path / "durations.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["validate-policy", str(path)]) == 0
    out = capsys.readouterr().out
    assert "heimdall-synthetic-iq: enabled, min age 1d 6h, batch" in out
    assert "heimdall-audio-chunks: enabled, min age 12h, batch" in out
    assert "heimdall-raw-iq: enabled, min age 1m 30s, batch" in out
    assert "measurements.iq_data_location (timeout 1h 30m)" in out


def test_validate_lists_every_problem_on_its_own_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = shipped_document()
    document["buckets"]["heimdall-audio-chunks"]["batch_size"] = 0
    document["buckets"]["heimdall-raw-iq"]["references"][0]["format"] = "url"
    document["manifest_retention_days"] = "14"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(document, sort_keys=False))
    assert main(["validate-policy", str(broken)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"INVALID {broken}: buckets.heimdall-audio-chunks.batch_size: 0 is out of range; use 1..1000 "
        f"(the S3 DeleteObjects limit)",
        f"INVALID {broken}: buckets.heimdall-raw-iq.references[0].format: 'url' is not one of key, uri, bucket_key",
        f"INVALID {broken}: manifest_retention_days: expected an integer, got '14'",
    ]


@pytest.mark.parametrize(
    ("bucket", "change", "field"),
    [
        ("heimdall-audio-chunks", {"batch_size": 0}, "batch_size"),
        ("heimdall-raw-iq", {"enabled": "sometimes"}, "enabled"),
        ("heimdall-synthetic-iq", {"colour": "blue"}, "colour"),
    ],
)
def test_validate_a_broken_policy_names_file_bucket_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bucket: str, change: dict, field: str
) -> None:
    document = shipped_document()
    document["buckets"][bucket].update(change)
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(document))
    assert main(["validate-policy", str(default_policy_path()), str(broken)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"OK {default_policy_path()}")
    assert f"INVALID {broken}: buckets.{bucket}" in captured.err
    assert field in captured.err


def test_validate_a_non_select_query(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = shipped_document()
    document["buckets"]["heimdall-raw-iq"]["references"][0]["query"] = "DELETE FROM heimdall.measurements"
    broken = tmp_path / "delete.yaml"
    broken.write_text(yaml.safe_dump(document))
    assert main(["validate-policy", str(broken)]) == 1
    err = capsys.readouterr().err
    assert f"{broken}: buckets.heimdall-raw-iq.references[0].query: 'query' must be a SELECT" in err


def test_installed_command_exit_codes_without_servers(tmp_path: Path) -> None:
    """The console script, in a subprocess with no server configured at all."""
    missing = tmp_path / "missing.yaml"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    ok = subprocess.run([CLI, "validate-policy", str(default_policy_path())], env=env,
                        capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([CLI, "validate-policy", str(missing)], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 1
    assert f"INVALID {missing}: policy file not found" in bad.stderr
