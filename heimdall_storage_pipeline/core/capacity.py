"""Capacity: growth rates, orphan inflow and days until the disk is full, from the daily storage history.

Every rate is computed on a series a cleanup does not step down:

- stored growth is the growth of ``total_bytes + bytes deleted so far``, i.e. referenced bytes plus
  the orphan inflow: what the buckets would hold had nothing been deleted;
- orphan inflow is the growth of ``orphan_bytes + bytes deleted so far``: new orphan bytes per day.

A rate over ``w`` days is the average daily change over the last ``w`` days (fewer when the history
is shorter), after missing days are interpolated. Days until full divide the free space
(``capacity_bytes`` minus the latest total) by the 30-day stored growth; the interval is spanned by
the 7-day and 30-day rates (earliest: the faster one, latest: the slower one). A bucket leaks when
its 7-day inflow exceeds twice its norm: the average inflow of the 30 days before those 7.
"""

from __future__ import annotations

import io
import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from itertools import accumulate, pairwise
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from heimdall_storage_pipeline.core.manifests import TIMESTAMP
from heimdall_storage_pipeline.core.units import format_bytes

Row = dict[str, Any]
History = dict[str, list[Row]]  # per bucket, one row per day it was scanned, by day

HISTORY_SCHEMA = pa.schema([
    ("day", pa.date32()),
    ("bucket", pa.string()),
    ("object_count", pa.int64()),
    ("total_bytes", pa.int64()),
    ("orphan_bytes", pa.int64()),  # null: no diff that day
    ("eligible_bytes", pa.int64()),
    ("noncurrent_bytes", pa.int64()),  # null: not known (an unversioned bucket, or an older scan)
    ("deleted_bytes", pa.int64()),  # by live cleanups and purges that day
    ("scanned_at", TIMESTAMP),  # when the day's latest figures were recorded
])
TOTAL = "total"  # the trend of all buckets together
LEAK_FACTOR = 2.0
RATES = ("growth_7d", "growth_30d", "inflow_7d", "inflow_30d", "inflow_norm")  # Trend's bytes-per-day figures


@dataclass(frozen=True)
class Trend:
    """One bucket (or ``total``) on its latest day; rates in bytes per day, ``None`` when unknown."""

    bucket: str
    day: date
    stored_bytes: int
    orphan_bytes: int | None
    growth_7d: float | None
    growth_30d: float | None
    inflow_7d: float | None
    inflow_30d: float | None
    inflow_norm: float | None

    @property
    def leak(self) -> bool:
        return self.inflow_7d is not None and self.inflow_norm is not None and \
            self.inflow_7d > 0 and self.inflow_7d > LEAK_FACTOR * self.inflow_norm


@dataclass(frozen=True)
class Forecast:
    """Days until ``capacity_bytes`` is reached at the stored growth; ``math.inf`` when not growing."""

    capacity_bytes: int
    free_bytes: int
    days: float
    earliest: float
    latest: float


def by_bucket(table: pa.Table, until: date | None = None) -> History:
    """The history table up to ``until``, per bucket and by day (the latest scan when a day repeats)."""
    if until is not None:
        table = table.filter(pc.less_equal(table.column("day"), pa.scalar(until, pa.date32())))
    # Only the columns the rates need, the scan time as a number: datetimes are slow to build in bulk.
    table = table.select(["bucket", "day", "total_bytes", "orphan_bytes", "deleted_bytes"]).append_column(
        "scanned", pc.fill_null(table.column("scanned_at").cast(pa.int64()), -(2**63)))
    latest: dict[tuple[str, date], Row] = {}
    for row in table.to_pylist():
        seen = latest.get((row["bucket"], row["day"]))
        if seen is None or row["scanned"] >= seen["scanned"]:
            latest[(row["bucket"], row["day"])] = row
    history: History = {}
    for (bucket, _), row in sorted(latest.items(), key=lambda item: item[0]):
        history.setdefault(str(bucket), []).append(row)
    return history


@dataclass(frozen=True)
class _Daily:
    """One bucket on every day from its first to its last: figures interpolated, deletions 0 on missing days."""

    days: list[date]
    total_bytes: list[float | None]
    orphan_bytes: list[float | None]
    gross: list[float | None]  # total_bytes + bytes deleted so far
    orphan_gross: list[float | None]  # orphan_bytes + bytes deleted so far


def _interpolate(values: list[float | None]) -> list[float | None]:
    """Gaps between two known values filled on the straight line between them; the ends stay unknown."""
    filled = list(values)
    known = [index for index, value in enumerate(values) if value is not None]
    for left, right in pairwise(known):
        start, end = values[left], values[right]
        assert start is not None and end is not None
        for index in range(left + 1, right):
            filled[index] = start + (end - start) * (index - left) / (right - left)
    return filled


def _daily(rows: list[Row]) -> _Daily:
    first = rows[0]["day"]
    on_day = {(row["day"] - first).days: row for row in rows}
    span = range(max(on_day) + 1)

    def column(name: str) -> list[float | None]:
        return [None if i not in on_day or on_day[i][name] is None else float(on_day[i][name]) for i in span]

    total, orphans = _interpolate(column("total_bytes")), _interpolate(column("orphan_bytes"))
    deleted_so_far = list(accumulate(value or 0.0 for value in column("deleted_bytes")))

    def plus_deleted(values: list[float | None]) -> list[float | None]:
        return [None if value is None else value + deleted
                for value, deleted in zip(values, deleted_so_far, strict=True)]

    return _Daily(days=[first + timedelta(days=i) for i in span], total_bytes=total, orphan_bytes=orphans,
                  gross=plus_deleted(total), orphan_gross=plus_deleted(orphans))


Points = list[tuple[date, float]]  # the known values of a series, by day


def _points(days: list[date], values: list[float | None]) -> Points:
    return [(day, value) for day, value in zip(days, values, strict=True) if value is not None]


def _rate(points: Points, window: int, until: date | None = None) -> float | None:
    """Average daily change over the last ``window`` days of ``points`` up to ``until`` (fewer if shorter)."""
    if until is not None:
        points = points[:bisect_right(points, until, key=lambda point: point[0])]
    if not points:
        return None
    last_day, last = points[-1]
    first_day, first = points[bisect_left(points, last_day - timedelta(days=window), key=lambda point: point[0])]
    span = (last_day - first_day).days
    return (last - first) / span if span else None


def _trend(bucket: str, daily: _Daily) -> Trend:
    last = daily.days[-1]
    orphans, stored = daily.orphan_bytes[-1], daily.total_bytes[-1]
    gross, orphan_gross = _points(daily.days, daily.gross), _points(daily.days, daily.orphan_gross)
    return Trend(
        bucket=bucket,
        day=last,
        stored_bytes=int(stored or 0),
        orphan_bytes=None if orphans is None else int(orphans),
        growth_7d=_rate(gross, 7),
        growth_30d=_rate(gross, 30),
        inflow_7d=_rate(orphan_gross, 7),
        inflow_30d=_rate(orphan_gross, 30),
        inflow_norm=_rate(orphan_gross, 30, until=last - timedelta(days=7)),
    )


def _sum(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return sum(known) if known else None


def trends(history: History) -> list[Trend]:
    """Each bucket's trend on its latest day, then the ``total`` (sums of the buckets')."""
    found = [_trend(bucket, _daily(rows)) for bucket, rows in sorted(history.items())]
    if not found:
        return []
    day = max(t.day for t in found)
    # A bucket no longer scanned (dropped from the policy) stops counting after a week.
    current = [t for t in found if (day - t.day).days <= 7]
    orphans = _sum([t.orphan_bytes for t in current])
    total = Trend(
        bucket=TOTAL, day=day, stored_bytes=sum(t.stored_bytes for t in current),
        orphan_bytes=None if orphans is None else int(orphans),
        **{name: _sum([getattr(t, name) for t in current]) for name in RATES},
    )
    return [*found, total]


def _days(free: int, rate: float | None) -> float:
    if free <= 0:
        return 0.0
    return free / rate if rate is not None and rate > 0 else math.inf


def forecast(total: Trend, capacity_bytes: int) -> Forecast | None:
    """Days until full at the 30-day stored growth, between the 7-day and 30-day rates; None without a rate."""
    rates = [rate for rate in (total.growth_7d, total.growth_30d) if rate is not None]
    if not rates:
        return None
    free = capacity_bytes - total.stored_bytes
    return Forecast(capacity_bytes=capacity_bytes, free_bytes=free, days=_days(free, rates[-1]),
                    earliest=_days(free, max(rates)), latest=_days(free, min(rates)))


def forecast_text(outlook: Forecast | None, capacity_bytes: int | None) -> str:
    if capacity_bytes is None:
        return "no forecast: set capacity_bytes in the policy"
    if outlook is None:
        return "no forecast yet: it needs two days of history"
    if outlook.free_bytes <= 0:
        return f"full: the buckets hold {format_bytes(-outlook.free_bytes)} more than {format_bytes(capacity_bytes)}"
    if math.isinf(outlook.earliest):
        return f"not filling at this trend ({format_bytes(outlook.free_bytes)} free)"
    latest = "never at the slower rate" if math.isinf(outlook.latest) else f"{outlook.latest:.1f}"
    between = f" (between {outlook.earliest:.1f} and {latest})" if outlook.earliest != outlook.latest else ""
    return (f"full in {outlook.days:.1f} days{between}; "
            f"{format_bytes(outlook.free_bytes)} free of {format_bytes(outlook.capacity_bytes)}")


def daily_totals(history: History) -> list[tuple[date, float | None, float | None]]:
    """Stored and orphaned bytes of all buckets per day (missing days interpolated per bucket), by day."""
    sums: dict[date, tuple[float | None, float | None]] = {}
    for rows in history.values():
        daily = _daily(rows)
        for day, stored, orphans in zip(daily.days, daily.total_bytes, daily.orphan_bytes, strict=True):
            before = sums.get(day, (None, None))
            sums[day] = (_sum([before[0], stored]), _sum([before[1], orphans]))
    return [(day, *sums[day]) for day in sorted(sums)]


def history_days(history: History) -> list[date]:
    """The days on which any bucket was scanned, in order."""
    return sorted({row["day"] for rows in history.values() for row in rows})


def chart_png(history: History, capacity_bytes: int | None = None, outlook: Forecast | None = None) -> bytes:
    """A PNG of stored vs orphaned bytes over time, with the capacity and the forecast when known."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib.figure import Figure

    totals = daily_totals(history)
    days = [datetime.combine(day, time()) for day, _, _ in totals]  # a forecast line may end mid-day
    largest = max((stored for _, stored, _ in totals if stored is not None), default=1)
    # The largest binary unit that keeps the figures at 1 or more: GiB for Heimdall, KiB for the demo.
    power = max(0, min(4, int(math.log(max(largest, capacity_bytes or 1, 1), 1024))))
    unit, scale = ("B", "KiB", "MiB", "GiB", "TiB")[power], 1024**power
    stored_line = [math.nan if stored is None else stored / scale for _, stored, _ in totals]
    orphan_area = [(orphans or 0) / scale for _, _, orphans in totals]
    figure = Figure(figsize=(8, 3.6), dpi=80, layout="constrained")
    axes = figure.subplots()
    axes.plot(days, stored_line, label="stored", color="tab:blue")
    axes.fill_between(days, orphan_area, color="tab:red", alpha=0.4, label="orphaned")
    if capacity_bytes:
        axes.axhline(capacity_bytes / scale, color="black", linestyle=":", label="capacity")
    if outlook is not None and capacity_bytes and days:
        last, stored = days[-1], stored_line[-1]
        for days_left, style, label in ((outlook.days, "--", "full in {:.0f} days"),
                                        (outlook.earliest, ":", "earliest: {:.0f} days")):
            if 0 < days_left < 3 * 365 and (style == "--" or days_left < outlook.days):
                axes.plot([last, last + timedelta(days=days_left)], [stored, capacity_bytes / scale],
                          color="tab:blue", linestyle=style, label=label.format(days_left))
    axes.set_title("Stored vs orphaned bytes, all buckets")
    axes.set_ylabel(unit)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left")
    figure.autofmt_xdate()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
