"""Bucket health by the share of orphaned bytes (the predecessor's thresholds)."""

from __future__ import annotations

WARNING_SHARE = 0.10
CRITICAL_SHARE = 0.25


def health_status(orphan_share_bytes: float) -> str:
    """``healthy`` below 10 %, ``warning`` from 10 % to 25 %, ``critical`` above 25 %."""
    if orphan_share_bytes > CRITICAL_SHARE:
        return "critical"
    if orphan_share_bytes >= WARNING_SHARE:
        return "warning"
    return "healthy"


def share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0
