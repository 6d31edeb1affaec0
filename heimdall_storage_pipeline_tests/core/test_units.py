"""Sizes and shares as the UI shows them beside the exact figures."""

from __future__ import annotations

import pytest

from heimdall_storage_pipeline.core.units import format_bytes, format_percent


@pytest.mark.parametrize(
    ("num_bytes", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (10 * 1024**2, "10.0 MiB"),
     (244 * 1024**3, "244.0 GiB"), (5 * 1024**4, "5.0 TiB"), (3 * 1024**6, "3072.0 PiB")],
)
def test_format_bytes_in_binary_units(num_bytes: int, text: str) -> None:
    assert format_bytes(num_bytes) == text


@pytest.mark.parametrize(
    ("fraction", "text"),
    [(0.0, "0.0 %"), (0.9296179652197727, "93.0 %"), (1.0, "100.0 %"), (0.0001, "< 0.1 %"), (0.1, "10.0 %")],
)
def test_format_percent_rounds_for_reading(fraction: float, text: str) -> None:
    assert format_percent(fraction) == text
