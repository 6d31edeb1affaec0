"""The HTTP endpoints and the console entry point, against real instances (SQLite, PostgreSQL)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from heimdall_storage_pipeline.core.policy import default_policy_path, load_policy
from heimdall_storage_pipeline.exporter.cli import add_exporter_command, run_exporter, run_from_args
from heimdall_storage_pipeline.exporter.collector import InstanceProvider, SnapshotSource
from heimdall_storage_pipeline.exporter.server import ExporterServer
from heimdall_storage_pipeline_tests.exporter.support import (
    GIB,
    PG_PASSWORD,
    create_database,
    drop_database,
    exporter_process,
    free_port,
    http_get,
    http_json,
    parse_metrics,
    postgres_database,
    postgres_url,
    record_scan,
    sample,
    wait_for,
    write_instance_home,
)

# Long enough for Dagster's PostgreSQL retries to give up, so the reason names the cause.
PATIENT = 60.0
REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "heimdall-storage")


def serve(
    factory: Callable[[], dg.DagsterInstance],
    buckets: tuple[str, ...] = (),
    timeout_seconds: float = PATIENT,
) -> ExporterServer:
    provider = InstanceProvider(factory, timeout_seconds=timeout_seconds)
    return ExporterServer(provider, SnapshotSource(provider, buckets, ttl_seconds=0), port=0)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def test_endpoints(instance: dg.DagsterInstance) -> None:
    record_scan(instance, "bucket-a", objects=10, total_bytes=4 * GIB, orphans=2, orphan_bytes=GIB)
    with serve(lambda: instance, ("bucket-new",)) as server:
        assert server.url.startswith("http://127.0.0.1:")
        status, body = http_get(f"{server.url}/metrics")
        assert status == 200
        metrics = parse_metrics(body.decode())
        assert metrics[sample("heimdall_storage_orphan_size_gb", bucket="bucket-a")] == 1
        status, storage = http_json(f"{server.url}/metrics/storage")
        assert status == 200
        assert storage["status"] == "warning"  # exactly 25 % orphaned is still a warning
        assert storage["buckets"]["bucket-new"]["status"] == "unknown"
        assert http_json(f"{server.url}/healthz") == (200, {"status": "ok"})
        assert http_get(f"{server.url}/nope")[0] == 404
        # Values are read at scrape time: a new scan shows on the next scrape.
        record_scan(instance, "bucket-a", objects=10, total_bytes=4 * GIB, orphans=0, orphan_bytes=0)
        metrics = parse_metrics(http_get(f"{server.url}/metrics")[1].decode())
        assert metrics[sample("heimdall_storage_orphan_size_gb", bucket="bucket-a")] == 0


def test_metrics_content_type(instance: dg.DagsterInstance) -> None:
    import urllib.request

    with serve(lambda: instance) as server, urllib.request.urlopen(f"{server.url}/metrics") as rsp:
        assert rsp.headers["Content-Type"] == CONTENT_TYPE_LATEST


def _assert_unavailable(url: str) -> str:
    """All three endpoints answer 503 with a reason free of the password; returns the reason."""
    # Asked together: each waits out Dagster's connection retries (about 12 s).
    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(http_get, [f"{url}/healthz", f"{url}/metrics", f"{url}/metrics/storage"]))
    for status, body in answers:
        assert status == 503, body
        assert PG_PASSWORD.encode() not in body
    health = json.loads(answers[0][1])
    assert health["status"] == "unavailable"
    assert "Dagster instance" in health["reason"]
    assert json.loads(answers[2][1])["reason"]
    return str(health["reason"])


def test_healthz_503_when_the_instance_database_goes_down(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with postgres_database() as database:
        home = write_instance_home(tmp_path / "home", postgres_url(database))
        with dg.DagsterInstance.from_config(str(home)) as instance:
            record_scan(instance, "bucket-a", objects=10, total_bytes=GIB, orphans=1, orphan_bytes=1)
            with serve(lambda: instance) as server:
                assert http_json(f"{server.url}/healthz") == (200, {"status": "ok"})
                drop_database(database)
                reason = _assert_unavailable(server.url)
    assert database in reason  # the reason says what is wrong ...
    assert PG_PASSWORD not in caplog.text  # ... and no log line carries the password
    assert "cannot read the Dagster instance" in caplog.text


def test_unanswered_probe_fails_fast(tmp_path: Path) -> None:
    with postgres_database() as database:
        home = write_instance_home(tmp_path / "home", postgres_url(database))
        with (
            dg.DagsterInstance.from_config(str(home)) as instance,
            serve(lambda: instance, timeout_seconds=1) as server,
        ):
            assert http_json(f"{server.url}/healthz") == (200, {"status": "ok"})
            drop_database(database)
            started = time.monotonic()
            status, body = http_json(f"{server.url}/healthz")
            elapsed = time.monotonic() - started
    assert status == 503
    assert body["reason"] == "the Dagster instance did not answer within 1 s (still trying)"
    assert elapsed < 5


def test_healthz_recovers_when_the_database_appears(tmp_path: Path) -> None:
    with postgres_database(create=False) as database:
        home = write_instance_home(tmp_path / "home", postgres_url(database))
        with serve(lambda: dg.DagsterInstance.from_config(str(home))) as server:
            reason = _assert_unavailable(server.url)
            assert "cannot open the Dagster instance" in reason
            create_database(database)
            assert http_json(f"{server.url}/healthz") == (200, {"status": "ok"})


def test_healthz_503_when_nothing_listens_and_the_url_holds_a_password(tmp_path: Path) -> None:
    closed_port = free_port()
    home = write_instance_home(tmp_path / "home", postgres_url("heimdall", port=closed_port))
    with serve(lambda: dg.DagsterInstance.from_config(str(home))) as server:
        reason = _assert_unavailable(server.url)
    assert str(closed_port) in reason


def test_exporter_subcommand_takes_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEIMDALL_EXPORTER_HOST", "0.0.0.0")
    monkeypatch.setenv("HEIMDALL_EXPORTER_BUCKETS", "a, b")
    monkeypatch.delenv("HEIMDALL_STORAGE_POLICY", raising=False)
    parser = argparse.ArgumentParser(prog="heimdall-storage")
    add_exporter_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["exporter", "--port", "9101", "--bucket", "c"])
    assert (args.command, args.host, args.port, args.bucket) == ("exporter", "0.0.0.0", 9101, ["a", "b", "c"])
    assert (args.cache_seconds, args.timeout_seconds, args.policy) == (None, None, None)  # env or default at start
    assert args.func is run_from_args
    defaults = parser.parse_args(["exporter"])
    assert (defaults.port, defaults.bucket) == (None, ["a", "b"])


def test_exporter_requires_dagster_home(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert run_exporter(["--port", "0"]) == 2
    assert "DAGSTER_HOME is not set; point it at the pipeline's instance directory" in caplog.text


@pytest.mark.parametrize(
    ("env", "args", "line"),
    [
        ({"DAGSTER_PG_URL": None}, [], "DAGSTER_PG_URL is not set; dagster.yaml reads it"),
        ({"DAGSTER_PG_URL": "postgresql://u:pw@127.0.0.1/d"}, [],
         "DAGSTER_PG_URL starts with postgresql://, which SQLAlchemy reads as psycopg 3 (not installed); "
         "write postgresql+psycopg2://..."),
        ({"HEIMDALL_EXPORTER_PORT": "eighty"}, [], "HEIMDALL_EXPORTER_PORT='eighty' is not a number; use 0..65535"),
        ({}, ["--port", "70000"], "--port 70000 is out of range; use 0..65535"),
        ({"HEIMDALL_EXPORTER_CACHE_SECONDS": "-1"}, [],
         "HEIMDALL_EXPORTER_CACHE_SECONDS -1 is out of range; use 0..86400"),
        ({"HEIMDALL_EXPORTER_TIMEOUT_SECONDS": "soon"}, [],
         "HEIMDALL_EXPORTER_TIMEOUT_SECONDS='soon' is not a number; use 0.1..3600"),
    ],
)
def test_the_exporter_names_a_missing_or_wrong_setting_in_one_line(
    tmp_path: Path, env: dict[str, str | None], args: list[str], line: str
) -> None:
    """As the README runs it: DAGSTER_HOME with the shipped dagster.yaml; one line, exit 2, no password."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DAGSTER_HOME": str(home),
            "DAGSTER_PG_URL": postgres_url("unused")}
    process_env = {k: v for k, v in {**base, **env}.items() if v is not None}
    done = subprocess.run([CLI, "exporter", *args], env=process_env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 2, done.stderr
    (logged,) = done.stderr.strip().splitlines()
    assert logged.endswith(f"ERROR heimdall_storage_pipeline.exporter: {line}")
    assert "pw@" not in logged and PG_PASSWORD not in logged


def test_a_port_in_use_is_named_in_one_line(tmp_path: Path) -> None:
    home = write_instance_home(tmp_path / "home")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([CLI, "exporter", "--port", str(port)], capture_output=True, text=True, timeout=120,
                              check=False, env={"PATH": os.environ["PATH"], "DAGSTER_HOME": str(home)})
    assert done.returncode == 2
    (logged,) = done.stderr.strip().splitlines()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use; choose another --port" in logged


def test_healthz_names_an_unset_variable_when_the_instance_is_opened_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.delenv("DAGSTER_PG_URL", raising=False)
    with serve(lambda: dg.DagsterInstance.from_config(str(home))) as server:
        status, body = http_json(f"{server.url}/healthz")
    assert (status, body["reason"]) == (503, "cannot open the Dagster instance: DAGSTER_PG_URL is not set; "
                                             "dagster.yaml reads it")


def test_console_entry_serves_policy_buckets_and_logs_no_password(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "exporter.log"
    with postgres_database() as database:
        home = write_instance_home(tmp_path / "home", postgres_url(database))
        with dg.DagsterInstance.from_config(str(home)) as instance:
            record_scan(instance, "scanned-bucket", objects=3, total_bytes=GIB, orphans=0, orphan_bytes=0)
        policy = str(default_policy_path())
        env = {"HEIMDALL_EXPORTER_PORT": str(port), "HEIMDALL_EXPORTER_BUCKETS": "extra-bucket"}
        args = ["--policy", policy, "--cache-seconds", "0"]
        with exporter_process(home, args, log, env=env) as process:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: http_get(f"{url}/healthz")[0] == 200, 60, "the exporter to answer")
            status, storage = http_json(f"{url}/metrics/storage")
            assert status == 200
            expected = {b.name for b in load_policy(policy).enabled_buckets()}
            assert expected == {"heimdall-synthetic-iq", "heimdall-audio-chunks", "heimdall-raw-iq"}
            assert set(storage["buckets"]) == expected | {"scanned-bucket", "extra-bucket"}
            assert storage["buckets"]["scanned-bucket"]["status"] == "healthy"
            assert all(storage["buckets"][name]["status"] == "unknown" for name in expected)
            drop_database(database)
            health_during_outage = _assert_unavailable(url)
            assert process.poll() is None  # still serving, only reporting the outage
            wait_for(
                lambda: "cannot read the Dagster instance" in log.read_text(),
                60,
                "the exporter to log the cause of the outage",
            )
    output = log.read_text()
    assert f"listening on http://127.0.0.1:{port}" in output
    # The probe gave up after the default 5 s; the log still names the cause once known.
    assert "did not answer within 5 s" in json.dumps(health_during_outage)
    assert PG_PASSWORD not in output
