"""Growth, orphan inflow and days-until-full gauges from the newest day of storage_history."""

from __future__ import annotations

import math

import dagster as dg
import pytest

from heimdall_storage_pipeline.exporter.collector import render_metrics
from heimdall_storage_pipeline.exporter.state import collect_storage_snapshot
from heimdall_storage_pipeline_tests.exporter.support import GIB, parse_metrics, record_history, sample

# Day 66 of the synthetic history: bucket a leaks (5 GiB of orphans a day against a norm of 1), 2136 GiB stored.
CAPACITY = (2136 + 40) * GIB


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:
        yield test_instance


def test_gauges_from_the_newest_day(instance: dg.DagsterInstance) -> None:
    recorded = record_history(instance, 66, CAPACITY)
    record_history(instance, 30, CAPACITY)  # a backfilled older day, recorded later: not the newest
    metrics = parse_metrics(render_metrics(collect_storage_snapshot(instance)).decode())

    def value(name: str, **labels: str) -> float:
        return metrics[sample(name, **labels)]

    assert value("heimdall_storage_growth_bytes_per_day", bucket="a", window="7d") == 15 * GIB
    assert value("heimdall_storage_growth_bytes_per_day", bucket="a", window="30d") == pytest.approx(358 / 30 * GIB)
    assert value("heimdall_storage_growth_bytes_per_day", bucket="b", window="7d") == 2 * GIB
    assert value("heimdall_storage_orphan_inflow_bytes_per_day", bucket="a", window="7d") == 5 * GIB
    assert value("heimdall_storage_orphan_inflow_bytes_per_day", bucket="a", window="30d") == pytest.approx(
        58 / 30 * GIB)
    assert value("heimdall_storage_orphan_inflow_norm_bytes_per_day", bucket="a") == GIB
    assert value("heimdall_storage_orphan_inflow_norm_bytes_per_day", bucket="b") == 0
    assert value("heimdall_storage_days_until_full", estimate="earliest") == pytest.approx(40 / 17, abs=0.01)
    expected = value("heimdall_storage_days_until_full", estimate="expected")
    assert expected == pytest.approx(40 / (358 / 30 + 2), abs=0.01)
    assert value("heimdall_storage_days_until_full", estimate="expected") == recorded["days_until_full"]
    assert value("heimdall_storage_capacity_bytes") == CAPACITY
    newest = instance.fetch_materializations(dg.AssetKey("storage_history"), limit=2).records[1]  # day 66's
    assert value("heimdall_storage_history_timestamp_seconds") == newest.timestamp
    assert recorded["leaking_buckets"] == "a"
    assert sample("heimdall_storage_growth_bytes_per_day", bucket="total", window="7d") not in metrics


def test_a_far_capacity_and_no_capacity(instance: dg.DagsterInstance) -> None:
    record_history(instance, 66, 10**18)
    metrics = parse_metrics(render_metrics(collect_storage_snapshot(instance)).decode())
    assert metrics[sample("heimdall_storage_days_until_full", estimate="earliest")] > 1000
    with dg.instance_for_test() as other:
        recorded = record_history(other, 66, None)
        metrics = parse_metrics(render_metrics(collect_storage_snapshot(other)).decode())
        assert recorded["forecast"] == "no forecast: set capacity_bytes in the policy"
        assert not any(name == "heimdall_storage_days_until_full" for name, _ in metrics)
        assert metrics[sample("heimdall_storage_growth_bytes_per_day", bucket="a", window="7d")] == 15 * GIB


def test_without_history_there_are_no_capacity_figures(instance: dg.DagsterInstance) -> None:
    snapshot = collect_storage_snapshot(instance)
    assert snapshot.capacity is None
    text = render_metrics(snapshot).decode()
    assert "heimdall_storage_days_until_full{" not in text and math.isfinite(snapshot.collect_seconds)
