"""Health thresholds by orphaned-byte share: healthy < 10 %, warning 10-25 %, critical > 25 %."""

from __future__ import annotations

import pytest

from heimdall_storage_pipeline.core.health import health_status, share


@pytest.mark.parametrize(
    ("orphan_share", "status"),
    [
        (0.0, "healthy"),
        (0.0999, "healthy"),
        (0.10, "warning"),
        (0.18, "warning"),
        (0.25, "warning"),
        (0.2501, "critical"),
        (1.0, "critical"),
    ],
)
def test_health_status_thresholds(orphan_share: float, status: str) -> None:
    assert health_status(orphan_share) == status


def test_share_of_an_empty_bucket_is_zero() -> None:
    assert share(0, 0) == 0.0
    assert share(5, 0) == 0.0


def test_share_is_a_fraction() -> None:
    assert share(1, 4) == 0.25
    assert health_status(share(26, 100)) == "critical"
