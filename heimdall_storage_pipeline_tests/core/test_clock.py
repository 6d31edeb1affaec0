"""The clock refuses naive datetimes (the predecessor's silent failure) and speaks UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pyarrow as pa
import pytest

from heimdall_storage_pipeline.core.clock import (
    as_utc,
    ensure_utc,
    isoformat_utc,
    parse_utc,
    utc_datetimes,
    utc_now,
)


def test_ensure_utc_refuses_naive_datetimes() -> None:
    with pytest.raises(ValueError, match=r"as_of .* has no timezone"):
        ensure_utc(datetime(2026, 1, 31, 3, 0), "as_of")


def test_ensure_utc_converts_other_zones() -> None:
    cet = timezone(timedelta(hours=1))
    converted = ensure_utc(datetime(2026, 1, 31, 4, 0, tzinfo=cet))
    assert converted == datetime(2026, 1, 31, 3, 0, tzinfo=UTC)
    assert converted.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["2026-01-31T03:00:00", "2026-01-31 03:00:00.000001"])
def test_parse_utc_refuses_naive_text(text: str) -> None:
    with pytest.raises(ValueError, match="no timezone"):
        parse_utc(text, "as_of")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-31T03:00:00Z", datetime(2026, 1, 31, 3, tzinfo=UTC)),
        ("2026-01-31T04:00:00.000001+01:00", datetime(2026, 1, 31, 3, 0, 0, 1, tzinfo=UTC)),
    ],
)
def test_parse_utc_accepts_zoned_text(text: str, expected: datetime) -> None:
    assert parse_utc(text) == expected


def test_parse_utc_refuses_garbage_with_an_example() -> None:
    with pytest.raises(ValueError, match="not an ISO-8601 timestamp like"):
        parse_utc("yesterday", "as_of")


def test_isoformat_round_trip_keeps_microseconds() -> None:
    moment = datetime(2026, 1, 31, 3, 0, 0, 123456, tzinfo=UTC)
    assert isoformat_utc(moment) == "2026-01-31T03:00:00.123456Z"
    assert parse_utc(isoformat_utc(moment)) == moment


def test_as_utc_reads_a_recorded_time_in_every_form_it_was_recorded() -> None:
    """Typed metadata gives epoch seconds back; older materializations hold ISO-8601 strings."""
    moment = datetime(2026, 11, 26, 3, 4, 5, 678901, tzinfo=UTC)
    cest = timezone(timedelta(hours=2))
    for recorded in (moment.timestamp(), isoformat_utc(moment), moment, moment.astimezone(cest)):
        converted = as_utc(recorded, "listed_at")
        assert converted == moment and converted.utcoffset() == timedelta(0)
    assert as_utc(0) == datetime(1970, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="no timezone"):
        as_utc(datetime(2026, 1, 31, 3, 0), "listed_at")
    for wrong in (None, True, ["2026-01-31T03:00:00Z"]):
        with pytest.raises(ValueError, match=r"listed_at .* is not a time"):
            as_utc(wrong, "listed_at")


def test_utc_now_is_aware() -> None:
    assert utc_now().utcoffset() == timedelta(0)


def test_utc_datetimes_equal_arrows_own_conversion_and_are_utc() -> None:
    moments = [datetime(1970, 1, 1, tzinfo=UTC), datetime(2026, 11, 26, 3, 4, 5, 678901, tzinfo=UTC),
               datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC)]
    for tz in ("UTC", "+00:00"):
        column = pa.array(moments, pa.timestamp("us", tz=tz))
        converted = utc_datetimes(column)
        assert converted == column.to_pylist() == moments
        assert all(moment.tzinfo is UTC for moment in converted)
    chunked = pa.chunked_array([pa.array(moments[:2], pa.timestamp("us", tz="UTC")),
                                pa.array(moments[2:], pa.timestamp("us", tz="UTC"))])
    assert utc_datetimes(chunked) == moments


def test_utc_datetimes_leave_other_columns_to_arrow_and_naive_ones_to_ensure_utc() -> None:
    moment = datetime(2026, 11, 26, tzinfo=UTC)
    with_null = pa.array([moment, None], pa.timestamp("us", tz="UTC"))
    assert utc_datetimes(with_null) == [moment, None]
    nanoseconds = pa.array([moment], pa.timestamp("ns", tz="UTC"))
    assert utc_datetimes(nanoseconds) == [moment]
    naive = utc_datetimes(pa.array([moment.replace(tzinfo=None)], pa.timestamp("us")))
    with pytest.raises(ValueError, match="has no timezone"):
        ensure_utc(naive[0])
