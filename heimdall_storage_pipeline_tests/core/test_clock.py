"""The clock refuses naive datetimes (the predecessor's silent failure) and speaks UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from heimdall_storage_pipeline.core.clock import ensure_utc, isoformat_utc, parse_utc, utc_now


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


def test_utc_now_is_aware() -> None:
    assert utc_now().utcoffset() == timedelta(0)
