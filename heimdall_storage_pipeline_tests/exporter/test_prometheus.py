"""The shipped Prometheus rules and config (promtool), a real Prometheus scraping the exporter,
and the Grafana dashboard's queries run against it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from heimdall_storage_pipeline.exporter.collector import render_metrics
from heimdall_storage_pipeline.exporter.state import collect_storage_snapshot
from heimdall_storage_pipeline_tests.exporter.support import (
    GIB,
    REPO,
    exporter_process,
    free_port,
    http_get,
    http_json,
    postgres_database,
    postgres_url,
    record_cleanup,
    record_history,
    record_scan,
    stop_process,
    wait_for,
    write_instance_home,
)

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "heimdall-storage.json"
ALERTS = (
    "StorageOrphansHigh",
    "DiskSpaceCritical",
    "StorageScanStale",
    "StorageBucketNeverScanned",
    "StorageCleanupRunFailed",
    "StorageCleanupDeletionsFailing",
    "StorageCleanupRefused",
    "StorageDanglingReferences",
    "StorageNoncurrentVersionsHigh",
    "StorageQuarantineHigh",
    "StorageInventoryDrift",
    "HeimdallStorageExporterDown",
    "StorageDiskFullSoon",
    "StorageDiskFullImminent",
    "StorageOrphanInflowAboveNorm",
    "StorageForecastStale",
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run scripts/install_prometheus.sh (make test does)")
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("promtool"), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120)


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_check_config() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_cover_every_alert_firing_and_not() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    assert sorted(r["alert"] for g in rules["groups"] for r in g["rules"]) == sorted(ALERTS)
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for alert in ALERTS:
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in mine), f"{alert}: no firing case"
        assert any(not case["exp_alerts"] for case in mine), f"{alert}: no quiet case"


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_uses_only_exported_metrics() -> None:
    with dg.instance_for_test() as instance:
        record_scan(instance, "bucket-a", objects=3, total_bytes=3, orphans=1, orphan_bytes=1)
        record_cleanup(instance, "bucket-a", deleted=1, deleted_bytes=1)
        record_history(instance, 66, 3000 * GIB)
        exported = {
            line.split()[2]
            for line in render_metrics(collect_storage_snapshot(instance)).decode().splitlines()
            if line.startswith("# TYPE")
        }
    exported |= {f"{name}_total" for name in exported}  # counters are queried as *_total
    titles = [title for title, _ in _dashboard_queries()]
    for wanted in (
        "Orphaned size per bucket",
        "Orphan share (bytes)",
        "Eligible vs young orphans",
        "Deletions per cleanup run",
        "Scan age",
        "Days until full",
        "Growth per day",
        "Orphan inflow vs its norm",
        "Inventory drift",
    ):
        assert wanted in titles
    for title, expr in _dashboard_queries():
        names = set(re.findall(r"\bheimdall_storage_[a-z_]+", expr))
        assert names, f"{title}: queries no exporter metric"
        assert names <= exported, f"{title}: unknown metric(s) {names - exported}"


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    status, body = http_json(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert status == 200 and body["status"] == "success", body
    return list(body["data"]["result"])


def _value(prometheus: str, expr: str) -> float | None:
    result = _query(prometheus, expr)
    return float(result[0]["value"][1]) if len(result) == 1 else None


@pytest.fixture
def instance_home(tmp_path: Path) -> Iterator[Path]:
    with postgres_database() as database:
        yield write_instance_home(tmp_path / "home", postgres_url(database))


def test_real_prometheus_scrapes_the_exporter(tmp_path: Path, instance_home: Path) -> None:
    prometheus_bin = _tool("prometheus")
    with dg.DagsterInstance.from_config(str(instance_home)) as instance:
        record_scan(
            instance,
            "bucket-a",
            objects=1000,
            total_bytes=300 * GIB,
            orphans=120,
            orphan_bytes=60 * GIB,
            eligible=100,
            young=20,
            dangling=1,
            drift=7,  # its events missed 7 keys, found by a full listing
        )
        record_scan(instance, "bucket-b", objects=50, total_bytes=2 * GIB, orphans=0, orphan_bytes=0,
                    versions=(0, 0, 2))  # versioned: only delete markers, so its disk usage stays 2 GiB
        record_cleanup(instance, "bucket-a", deleted=10, deleted_bytes=GIB, quarantined=(10, GIB, time.time()))
        # Day 66 of the capacity tests' history: bucket "a" leaks; 40 GiB free fill in 2.4 to 2.9 days.
        record_history(instance, 66, (2136 + 40) * GIB)

        exporter_port = free_port()
        args = ["--port", str(exporter_port), "--bucket", "bucket-never", "--cache-seconds", "0"]
        with exporter_process(instance_home, args, tmp_path / "exporter.log"):
            exporter = f"http://127.0.0.1:{exporter_port}"
            wait_for(lambda: http_get(f"{exporter}/healthz")[0] == 200, 60, "the exporter")

            # The shipped config, pointed at this exporter and sped up.
            config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
            config["global"].update(scrape_interval="1s", evaluation_interval="1s")
            config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
            (job,) = config["scrape_configs"]
            job.update(scrape_interval="1s", scrape_timeout="1s")
            job["static_configs"] = [{"targets": [f"127.0.0.1:{exporter_port}"]}]
            config_file = tmp_path / "prometheus.yml"
            config_file.write_text(yaml.safe_dump(config))

            port = free_port()
            with (tmp_path / "prometheus.log").open("wb") as log:
                process = subprocess.Popen(
                    [
                        prometheus_bin,
                        f"--config.file={config_file}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                _check_prometheus(f"http://127.0.0.1:{port}", instance)
            finally:
                stop_process(process)


def _check_prometheus(prometheus: str, instance: dg.DagsterInstance) -> None:
    wait_for(lambda: http_get(f"{prometheus}/-/ready")[0] == 200, 60, "Prometheus to be ready")
    wait_for(lambda: _value(prometheus, 'up{job="heimdall-storage"}') == 1, 60, "a scrape")

    expected = {
        "heimdall_storage_disk_usage_gb": (300, 2),
        "heimdall_storage_bucket_size_gb": (300, 2),
        "heimdall_storage_orphan_files": (120, 0),
        "heimdall_storage_orphan_size_gb": (60, 0),
        "heimdall_storage_total_objects": (1000, 50),
        "heimdall_storage_referenced_objects": (880, 50),
        "heimdall_storage_dangling_references": (1, 0),
        "heimdall_storage_deleted_files_total": (10, 0),
    }
    for metric, values in expected.items():
        for bucket, value in zip(("bucket-a", "bucket-b"), values, strict=True):
            expr = f'{metric}{{job="heimdall-storage",bucket="{bucket}"}}'
            wait_for(lambda e=expr, v=value: _value(prometheus, e) == v, 30, f"{expr} == {value}")
        if not metric.endswith("_total"):  # nothing was deleted there: a true zero
            # Never scanned: no figure at all, rather than a zero.
            assert _query(prometheus, f'{metric}{{bucket="bucket-never"}}') == [], metric
    assert _value(prometheus, 'heimdall_storage_health_status{bucket="bucket-never",status="unknown"}') == 1
    assert _value(prometheus, 'heimdall_storage_health_status{bucket="bucket-a",status="warning"}') == 1
    assert _value(prometheus, "sum(heimdall_storage_disk_usage_gb)") == 302
    assert _value(prometheus, 'heimdall_storage_inventory_drift_keys{bucket="bucket-a"}') == 7
    assert _query(prometheus, 'heimdall_storage_inventory_drift_keys{bucket="bucket-b"}') == []  # no events

    # A new scan shows up at the next scrape: nothing is held in the exporter's memory.
    # An incremental inventory: it carries its reconciliation's drift until the next full listing.
    record_scan(instance, "bucket-a", objects=900, total_bytes=250 * GIB, orphans=20, orphan_bytes=5 * GIB, drift=7)
    wait_for(
        lambda: _value(prometheus, 'heimdall_storage_orphan_files{bucket="bucket-a"}') == 20,
        30,
        "the new scan's orphan count",
    )

    # The shipped rules load and evaluate cleanly.
    def rules_healthy() -> bool:
        _, body = http_json(f"{prometheus}/api/v1/rules")
        rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        return sorted(r["name"] for r in rules) == sorted(ALERTS) and all(r["health"] == "ok" for r in rules)

    wait_for(rules_healthy, 30, "the alert rules to evaluate")

    # The capacity alerts see the exporter's forecast and inflow: pending until their `for` has passed.
    earliest = 'estimate="earliest"'
    for alert, labels in (("StorageDiskFullSoon", earliest), ("StorageDiskFullImminent", earliest),
                          ("StorageOrphanInflowAboveNorm", 'bucket="a"')):
        expr = f'ALERTS{{alertname="{alert}",alertstate="pending",{labels}}}'
        wait_for(lambda e=expr: _value(prometheus, e) == 1, 30, expr)
    assert _query(prometheus, 'ALERTS{alertname="StorageOrphanInflowAboveNorm",bucket="b"}') == []
    days = _value(prometheus, f"heimdall_storage_days_until_full{{{earliest}}}")
    assert days == pytest.approx(40 / 17, abs=0.01)

    # Every dashboard query runs and finds data.
    answers = {}
    for title, expr in _dashboard_queries():
        query = expr.replace("$bucket", ".*")
        answers[title] = wait_for(lambda q=query: _query(prometheus, q), 30, f"dashboard panel {title!r}: {query}")
    # The health panel maps healthy/unknown/warning/critical to 0/1/2/3; bucket-a's new scan
    # (2 % orphaned) is healthy again.
    health = {r["metric"]["bucket"]: float(r["value"][1]) for r in answers["Health"]}
    assert health == {"bucket-a": 0, "bucket-b": 0, "bucket-never": 1}
