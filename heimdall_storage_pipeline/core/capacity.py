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
from dataclasses import dataclass
from datetime import date

import pandas as pd
import pyarrow as pa

from heimdall_storage_pipeline.core.manifests import TIMESTAMP
from heimdall_storage_pipeline.core.units import format_bytes

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


def history_frame(table: pa.Table, until: date | None = None) -> pd.DataFrame:
    """The history table up to ``until`` as a frame, one row per bucket and day (the latest when a day repeats)."""
    frame = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    frame["day"] = pd.to_datetime(frame["day"])
    if until is not None:
        frame = frame[frame["day"] <= pd.Timestamp(until)]
    return frame.sort_values(["bucket", "day", "scanned_at"]).drop_duplicates(["bucket", "day"], keep="last")


def _daily(rows: pd.DataFrame) -> pd.DataFrame:
    """One bucket on every day from its first to its last: figures interpolated, deletions 0 on missing days."""
    frame = rows.set_index("day")[["total_bytes", "orphan_bytes", "deleted_bytes"]].astype("float64").asfreq("D")
    figures = ["total_bytes", "orphan_bytes"]
    frame[figures] = frame[figures].interpolate(method="time", limit_area="inside")
    deleted_so_far = frame["deleted_bytes"].fillna(0).cumsum()
    frame["gross"] = frame["total_bytes"] + deleted_so_far
    frame["orphan_gross"] = frame["orphan_bytes"] + deleted_so_far
    return frame


def _rate(cumulative: pd.Series, days: int) -> float | None:
    """Average daily change over the last ``days`` days of ``cumulative`` (fewer if it is shorter)."""
    series = cumulative.dropna()
    if series.empty:
        return None
    window = series[series.index >= series.index[-1] - pd.Timedelta(days=days)]
    span = (window.index[-1] - window.index[0]).days
    return float(window.iloc[-1] - window.iloc[0]) / span if span else None


def _trend(bucket: str, frame: pd.DataFrame) -> Trend:
    last = frame.index[-1]
    orphans = frame["orphan_bytes"].iloc[-1]
    return Trend(
        bucket=bucket,
        day=last.date(),
        stored_bytes=int(frame["total_bytes"].iloc[-1]),
        orphan_bytes=None if pd.isna(orphans) else int(orphans),
        growth_7d=_rate(frame["gross"], 7),
        growth_30d=_rate(frame["gross"], 30),
        inflow_7d=_rate(frame["orphan_gross"], 7),
        inflow_30d=_rate(frame["orphan_gross"], 30),
        inflow_norm=_rate(frame["orphan_gross"][frame.index <= last - pd.Timedelta(days=7)], 30),
    )


def _sum(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return sum(known) if known else None


def trends(frame: pd.DataFrame) -> list[Trend]:
    """Each bucket's trend on its latest day, then the ``total`` (sums of the buckets')."""
    found = [_trend(str(bucket), _daily(rows)) for bucket, rows in frame.groupby("bucket", sort=True)]
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


def daily_totals(frame: pd.DataFrame) -> pd.DataFrame:
    """Stored and orphaned bytes of all buckets per day (missing days interpolated per bucket)."""
    daily = pd.concat([_daily(rows) for _, rows in frame.groupby("bucket")])
    return daily.groupby(level=0)[["total_bytes", "orphan_bytes"]].sum(min_count=1)


def chart_png(frame: pd.DataFrame, capacity_bytes: int | None = None, outlook: Forecast | None = None) -> bytes:
    """A PNG of stored vs orphaned bytes over time, with the capacity and the forecast when known."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib.figure import Figure

    totals = daily_totals(frame)
    # The largest binary unit that keeps the figures at 1 or more: GiB for Heimdall, KiB for the demo.
    power = max(0, min(4, int(math.log(max(totals["total_bytes"].max(), capacity_bytes or 1, 1), 1024))))
    unit, scale = ("B", "KiB", "MiB", "GiB", "TiB")[power], 1024**power
    totals = totals / scale
    figure = Figure(figsize=(8, 3.6), dpi=80, layout="constrained")
    axes = figure.subplots()
    axes.plot(totals.index, totals["total_bytes"], label="stored", color="tab:blue")
    axes.fill_between(totals.index, totals["orphan_bytes"].fillna(0), color="tab:red", alpha=0.4, label="orphaned")
    if capacity_bytes:
        axes.axhline(capacity_bytes / scale, color="black", linestyle=":", label="capacity")
    if outlook is not None and capacity_bytes:
        last, stored = totals.index[-1], totals["total_bytes"].iloc[-1]
        for days, style, label in ((outlook.days, "--", "full in {:.0f} days"),
                                   (outlook.earliest, ":", "earliest: {:.0f} days")):
            if 0 < days < 3 * 365 and (style == "--" or days < outlook.days):
                axes.plot([last, last + pd.Timedelta(days=days)], [stored, capacity_bytes / scale],
                          color="tab:blue", linestyle=style, label=label.format(days))
    axes.set_title("Stored vs orphaned bytes, all buckets")
    axes.set_ylabel(unit)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left")
    figure.autofmt_xdate()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
