"""The one clock: timezone-aware UTC everywhere, injectable for tests."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pyarrow as pa

from heimdall_storage_pipeline.core.errors import StaleInputError

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def ensure_utc(moment: datetime, what: str = "timestamp") -> datetime:
    """Refuse naive datetimes: comparing them with aware ones is the predecessor's bug."""
    if moment.tzinfo is UTC:  # the common case, several times per key of a deletion
        return moment
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} {moment.isoformat()} has no timezone; give it in UTC (e.g. '...Z')")
    return moment.astimezone(UTC)


def parse_utc(text: str, what: str = "timestamp") -> datetime:
    """Parse an ISO-8601 timestamp that carries its timezone."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an ISO-8601 timestamp like 2026-01-31T03:00:00Z") from None
    return ensure_utc(moment, what)


def as_utc(value: object, what: str = "timestamp") -> datetime:
    """A recorded time as an aware UTC datetime.

    Materializations hold epoch seconds (``MetadataValue.timestamp``, read back as a float); those
    recorded before times were typed hold ISO-8601 strings. Both, and datetimes, are accepted.
    """
    if isinstance(value, datetime):
        return ensure_utc(value, what)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        return parse_utc(value, what)
    raise ValueError(f"{what} {value!r} is not a time; expected epoch seconds or an ISO-8601 string")


def isoformat_utc(moment: datetime) -> str:
    return ensure_utc(moment).isoformat().replace("+00:00", "Z")


def utc_datetimes(values: pa.Array | pa.ChunkedArray) -> list[datetime]:
    """An Arrow column of UTC microsecond timestamps as aware datetimes.

    Faster than ``to_pylist``'s per-value time-zone handling, which runs in every batch of a
    deletion. Other columns (naive, other units, nulls) take ``to_pylist``, and ``ensure_utc``
    then refuses what is not UTC.
    """
    kind = values.type
    if values.null_count or not pa.types.is_timestamp(kind) or kind.unit != "us" or kind.tz not in ("UTC", "+00:00"):
        return values.to_pylist()
    naive = values.cast(pa.int64()).to_numpy().astype("datetime64[us]").tolist()
    return [moment.replace(tzinfo=UTC) for moment in naive]


MAX_CLOCK_SKEW = timedelta(minutes=5)  # how far ahead of this machine's clock another's may be


def check_as_of(as_of: datetime, now: datetime) -> datetime:
    """Refuse an ``as_of`` in the future: fresh uploads would look old enough to delete."""
    if ensure_utc(as_of) > ensure_utc(now) + MAX_CLOCK_SKEW:
        raise StaleInputError(
            f"as_of {isoformat_utc(as_of)} is in the future (now {isoformat_utc(now)}); ages measured then "
            f"would count fresh uploads as old enough to delete. Leave as_of empty (now) or give a past time"
        )
    return as_of
