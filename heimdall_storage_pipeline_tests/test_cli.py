"""``heimdall-storage``: exit codes and one-line messages naming a missing or wrong setting."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml
from sqlalchemy.engine import make_url

from heimdall_storage_pipeline.cli import main
from heimdall_storage_pipeline.core.policy import POLICY_ENV_VAR, default_policy_path

CLI = str(Path(sys.executable).parent / "heimdall-storage")
REPO = Path(__file__).resolve().parents[1]


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
    assert "capacity: 466.0 GiB (500363689984 bytes)" in out


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
    document.pop("capacity_bytes")
    path.write_text(yaml.safe_dump(document))
    assert main(["validate-policy", str(path)]) == 0
    assert "capacity: not set (no days-until-full forecast)" in capsys.readouterr().out


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


def _run(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def shipped_home(tmp_path: Path) -> Path:
    """A DAGSTER_HOME holding the repository's dagster.yaml, as the README sets it up."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    return home


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({}, "DAGSTER_HOME is not set; point it at the pipeline's instance directory (it holds dagster.yaml)"),
        ({"DAGSTER_HOME": "{home}"}, "DAGSTER_PG_URL is not set; dagster.yaml reads it"),
        ({"DAGSTER_HOME": "{home}/missing", "DAGSTER_PG_URL": "postgresql+psycopg2://u@h/d"},
         "DAGSTER_HOME={home}/missing is not a directory; point it at the pipeline's instance directory"),
        ({"DAGSTER_HOME": "{home}", "DAGSTER_PG_URL": "postgres://dagster:Pw-123@db/dagster"},
         "DAGSTER_PG_URL starts with postgres://, which SQLAlchemy reads as psycopg 3 (not installed); "
         "write postgresql+psycopg2://..."),
        ({"DAGSTER_HOME": "{home}", "DAGSTER_PG_URL": "postgresql+psycopg2://u@h/d",
          "HEIMDALL_AUDIT_DB_URL": "audit-db:5432"},
         "HEIMDALL_AUDIT_DB_URL is not a database URL; write postgresql+psycopg2://user:password@host:5432/database"),
    ],
)
def test_plan_show_names_a_missing_or_wrong_setting_in_one_line(
    tmp_path: Path, shipped_home: Path, env: dict[str, str], line: str
) -> None:
    env = {name: value.format(home=shipped_home) for name, value in env.items()}
    done = _run(["plan", "show", "heimdall-raw-iq:1a2b3c4d"], env, tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [line.format(home=shipped_home)]
    assert "Pw-123" not in done.stderr


def test_plan_show_when_the_instance_database_is_missing(
    tmp_path: Path, shipped_home: Path, pg_admin_url: str
) -> None:
    """Dagster gives up after its retries; one line names the cause, without the password."""
    url = make_url(pg_admin_url).set(drivername="postgresql+psycopg2", database="no_such_db_surface",
                                     password="Pw-123")
    done = _run(["plan", "show", "heimdall-raw-iq:1a2b3c4d"],
                {"DAGSTER_HOME": str(shipped_home), "DAGSTER_PG_URL": url.render_as_string(hide_password=False)},
                tmp_path)
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("FAILED cannot read the Dagster instance of DAGSTER_HOME: ")
    assert "no_such_db_surface" in line and "Pw-123" not in line


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--database-url", "heimdall-db"],
         "FAILED --database-url (HEIMDALL_DATABASE_URL) is not a database URL; "
         "write postgresql+psycopg2://user:password@host:5432/database"),
        (["--database-url", "postgresql+psycopg2://u@127.0.0.1/h", "--audit-database-url", "sqlite:///a.db"],
         "FAILED --audit-database-url (HEIMDALL_AUDIT_DB_URL, else DAGSTER_PG_URL) names a sqlite database, not "
         "PostgreSQL; write postgresql+psycopg2://user:password@host:5432/database"),
    ],
)
def test_migrate_names_a_wrong_url_in_one_line(tmp_path: Path, args: list[str], line: str) -> None:
    done = _run(["migrate", *args], {}, tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [line]


def test_a_wrong_exporter_variable_does_not_break_other_commands(tmp_path: Path) -> None:
    """The exporter's variables are read when the exporter starts, not when any command parses."""
    env = {"HEIMDALL_EXPORTER_PORT": "eighty", "HEIMDALL_EXPORTER_CACHE_SECONDS": "x"}
    done = _run(["validate-policy", str(default_policy_path())], env, tmp_path)
    assert done.returncode == 0, done.stderr


def test_report_prints_the_trends_and_writes_the_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from heimdall_storage_pipeline.core.capacity import HISTORY_SCHEMA
    from heimdall_storage_pipeline.core.manifests import ManifestStore
    from heimdall_storage_pipeline_tests.core.test_capacity import history

    root = tmp_path / "manifests"
    monkeypatch.setenv("HEIMDALL_MANIFEST_ROOT", str(root))
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({**shipped_document(), "capacity_bytes": "3000 GiB"}))
    assert main(["report", "--policy", str(policy)]) == 1
    assert "no storage history in" in capsys.readouterr().err

    store, table = ManifestStore(str(root)), history()
    for day in sorted(set(table.column("day").to_pylist()))[:67]:  # days 0..66: a week into the leak
        store.write_table(store.history_uri(day), table.filter(pc.equal(table.column("day"), day)))
    assert store.read_history(HISTORY_SCHEMA).num_rows == 134
    chart = tmp_path / "chart.png"
    assert main(["report", "--policy", str(policy), "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "Storage on 2026-03-08 (67 days of history since 2026-01-01)" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("a ", "b ", "total "))}
    assert "+15.0 GiB/d" in lines["a"] and "+5.0 GiB/d" in lines["a"]
    assert "LEAK: orphan inflow 5.0x its norm" in lines["a"]
    assert "+2.0 GiB/d" in lines["b"] and "steady" in lines["b"]
    assert "+17.0 GiB/d" in lines["total"]
    assert "Forecast: full in 62.0 days (between 50.8 and 62.0); 864.0 GiB free of 2.9 TiB" in out
    assert chart.read_bytes().startswith(b"\x89PNG")
