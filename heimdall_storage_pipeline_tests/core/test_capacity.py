"""Growth, orphan inflow, leak detection and the forecast on 90 synthetic days, against values worked out by hand.

Bucket ``a``: referenced bytes grow 10 GiB a day from 1000 GiB; 50 GiB of orphans on day 0, then 1 GiB of
new orphans a day, 5 GiB a day from day 60 (a leak); a cleanup deletes 100 GiB of orphans on day 75.
Bucket ``b``: referenced bytes grow 2 GiB a day from 200 GiB, no orphans.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from heimdall_storage_pipeline.core import capacity
from heimdall_storage_pipeline.core.manifests import ManifestStore

GIB = 1024**3
START = date(2026, 1, 1)


def inflow(day: int) -> int:
    return 0 if day == 0 else (5 if day >= 60 else 1)


def history(skip: set[tuple[str, int]] = frozenset()) -> pa.Table:
    rows, orphans = [], 50
    for day in range(90):
        orphans += inflow(day) - (100 if day == 75 else 0)
        figures = {"a": (1000 + 10 * day + orphans, orphans, 100 if day == 75 else 0), "b": (200 + 2 * day, 0, 0)}
        for bucket, (total, orphan, deleted) in figures.items():
            if (bucket, day) in skip:
                continue
            rows.append({"day": START + timedelta(days=day), "bucket": bucket, "object_count": total,
                         "total_bytes": total * GIB, "orphan_bytes": orphan * GIB, "eligible_bytes": orphan * GIB,
                         "noncurrent_bytes": None, "deleted_bytes": deleted * GIB,
                         "scanned_at": datetime.combine(START + timedelta(days=day), datetime.min.time(), UTC)})
    return pa.Table.from_pylist(rows, schema=capacity.HISTORY_SCHEMA)


def trends_on(day: int, table: pa.Table | None = None) -> dict[str, capacity.Trend]:
    found = capacity.trends(capacity.by_bucket(table or history(), until=START + timedelta(days=day)))
    return {trend.bucket: trend for trend in found}


def gib(rate: float | None) -> float:
    assert rate is not None
    return rate / GIB


def test_a_week_into_the_leak_the_rates_and_the_leak_are_the_hand_computed_ones() -> None:
    found = trends_on(66)
    a, total = found["a"], found["total"]
    assert a.day == START + timedelta(days=66)
    # Day 59 -> 66: referenced +70, inflow 7 x 5 = 35.
    assert gib(a.growth_7d) == pytest.approx(105 / 7)
    # Day 36 -> 66: referenced +300, inflow 23 x 1 + 7 x 5 = 58.
    assert gib(a.growth_30d) == pytest.approx(358 / 30)
    assert gib(a.inflow_7d) == pytest.approx(5)
    assert gib(a.inflow_30d) == pytest.approx(58 / 30)
    assert gib(a.inflow_norm) == pytest.approx(1)  # days 30..59, before the last week
    assert a.leak
    assert not found["b"].leak and gib(found["b"].growth_7d) == pytest.approx(2)
    assert gib(total.growth_7d) == pytest.approx(17)
    assert gib(total.growth_30d) == pytest.approx(358 / 30 + 2)
    # a: 1660 referenced + 50 + 59 + 35 orphaned; b: 332.
    assert total.stored_bytes == (1660 + 144 + 332) * GIB
    assert total.orphan_bytes == 144 * GIB


def test_before_the_leak_nothing_leaks() -> None:
    a = trends_on(59)["a"]
    assert gib(a.inflow_7d) == pytest.approx(1) and gib(a.inflow_norm) == pytest.approx(1)
    assert not a.leak


def test_the_cleanup_does_not_step_the_growth_down() -> None:
    a = trends_on(89)["a"]
    # Day 59 -> 89: referenced +300, inflow 30 x 5 = 150. The raw total grew only 350 (100 deleted on day 75).
    assert gib(a.growth_30d) == pytest.approx(15)
    assert gib(a.growth_7d) == pytest.approx(15)
    assert gib(a.inflow_30d) == pytest.approx(5)
    assert a.orphan_bytes == (50 + 59 + 150 - 100) * GIB
    # Three weeks on, the leak is the norm: days 53..82 average (7 x 1 + 23 x 5) / 30.
    assert gib(a.inflow_norm) == pytest.approx(122 / 30)
    assert not a.leak


def test_missing_days_are_interpolated() -> None:
    gappy = history(skip={("a", 40), ("a", 41), ("a", 42), ("b", 60)})
    assert trends_on(66, gappy)["a"] == trends_on(66)["a"]
    assert trends_on(66, gappy)["b"] == trends_on(66)["b"]


def test_forecast_interval_from_the_7_and_30_day_rates() -> None:
    total = trends_on(66)["total"]
    outlook = capacity.forecast(total, 3000 * GIB)
    assert outlook is not None
    free = 3000 - 2136
    assert outlook.free_bytes == free * GIB
    assert outlook.days == pytest.approx(free / (358 / 30 + 2))  # 62.0 days at the 30-day rate
    assert outlook.earliest == pytest.approx(free / 17)  # 50.8 days at the last week's
    assert outlook.latest == outlook.days
    over = capacity.forecast(total, 2000 * GIB)
    assert over is not None and over.days == over.earliest == 0
    assert capacity.forecast_text(over, 2000 * GIB) == "full: the buckets hold 136.0 GiB more than 2.0 TiB"
    assert capacity.forecast_text(outlook, 3000 * GIB) == (
        "full in 62.0 days (between 50.8 and 62.0); 864.0 GiB free of 2.9 TiB")


def test_no_growth_never_fills_and_one_day_has_no_rate() -> None:
    flat = history().filter(pc.equal(history().column("bucket"), "b"))
    one_day = capacity.trends(capacity.by_bucket(flat, until=START))
    assert one_day[0].growth_7d is None and capacity.forecast(one_day[-1], 10**15) is None
    shrinking = pa.Table.from_pylist(
        [{"day": START + timedelta(days=d), "bucket": "s", "total_bytes": 100 - d, "deleted_bytes": 0}
         for d in range(10)], schema=capacity.HISTORY_SCHEMA)
    total = capacity.trends(capacity.by_bucket(shrinking))[-1]
    outlook = capacity.forecast(total, 1000)
    assert outlook is not None and math.isinf(outlook.days) and math.isinf(outlook.earliest)


def test_history_round_trip_and_chart(tmp_path) -> None:
    store = ManifestStore(str(tmp_path))
    table = history()
    for day in (START, START + timedelta(days=1)):
        store.write_table(store.history_uri(day), table.filter(pc.equal(table.column("day"), day)))
    assert store.read_history(capacity.HISTORY_SCHEMA).num_rows == 4
    assert ManifestStore(str(tmp_path / "none")).read_history(capacity.HISTORY_SCHEMA).num_rows == 0
    by_bucket = capacity.by_bucket(table)
    png = capacity.chart_png(by_bucket, 3000 * GIB, capacity.forecast(capacity.trends(by_bucket)[-1], 3000 * GIB))
    assert png.startswith(b"\x89PNG")


def test_a_day_recorded_twice_counts_its_latest_scan_and_days_after_until_are_left_out() -> None:
    def row(day: int, total: int, scanned_hour: int | None) -> dict[str, object]:
        scanned = None if scanned_hour is None else datetime.combine(START + timedelta(days=day), datetime.min.time(),
                                                                     UTC) + timedelta(hours=scanned_hour)
        return {"day": START + timedelta(days=day), "bucket": "c", "total_bytes": total, "deleted_bytes": 0,
                "scanned_at": scanned}

    table = pa.Table.from_pylist([row(0, 100, 1), row(1, 300, 23), row(1, 200, 5), row(1, 999, None),
                                  row(2, 5000, 1)], schema=capacity.HISTORY_SCHEMA)
    history = capacity.by_bucket(table, until=START + timedelta(days=1))
    assert [(r["day"], r["total_bytes"]) for r in history["c"]] == [(START, 100), (START + timedelta(days=1), 300)]
    assert capacity.history_days(history) == [START, START + timedelta(days=1)]
    assert capacity.trends(history)[0].growth_7d == pytest.approx(200)
