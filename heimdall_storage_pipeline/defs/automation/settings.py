"""Settings of the automation, read from the environment with safe defaults."""

import os
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import dagster as dg

SCHEDULE_TIMEZONE_ENV = "HEIMDALL_SCHEDULE_TIMEZONE"
CLEANUP_DRY_RUN_ENV = "HEIMDALL_CLEANUP_DRY_RUN"
ORPHAN_GROWTH_ENV = "HEIMDALL_ORPHAN_GROWTH_BYTES"
AUTOMATION_STATUS_ENV = "HEIMDALL_AUTOMATION_STATUS"
DEFAULT_ORPHAN_GROWTH_BYTES = 50 * 1024**3  # the predecessor's alert: orphans above 50 GB

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class AutomationSettingError(ValueError):
    """An environment variable of the automation holds a value it cannot use."""


def schedule_timezone() -> str:
    """The IANA time zone the schedules run in (HEIMDALL_SCHEDULE_TIMEZONE, default UTC)."""
    name = os.environ.get(SCHEDULE_TIMEZONE_ENV, "").strip() or "UTC"
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise AutomationSettingError(
            f"{SCHEDULE_TIMEZONE_ENV}={name!r} is not an IANA time zone; use e.g. UTC or Europe/Rome"
        ) from None
    return name


def cleanup_dry_run() -> bool:
    """Automated deletions are dry runs unless HEIMDALL_CLEANUP_DRY_RUN is explicitly false."""
    value = os.environ.get(CLEANUP_DRY_RUN_ENV, "").strip().lower()
    if not value or value in _TRUE:
        return True
    if value in _FALSE:
        return False
    # A typo must neither delete nor silently keep dry-running: fail the tick, visibly.
    raise AutomationSettingError(f"{CLEANUP_DRY_RUN_ENV}={value!r}: use true (dry run) or false (delete)")


def orphan_growth_threshold() -> int:
    """Eligible orphan bytes above which a bucket gets a cleanup (HEIMDALL_ORPHAN_GROWTH_BYTES)."""
    value = os.environ.get(ORPHAN_GROWTH_ENV, "").strip()
    if not value:
        return DEFAULT_ORPHAN_GROWTH_BYTES
    try:
        threshold = int(value)
    except ValueError:
        threshold = -1
    if threshold < 0:
        raise AutomationSettingError(f"{ORPHAN_GROWTH_ENV}={value!r}: expected a number of bytes, e.g. 5000000000")
    return threshold


def default_status() -> dg.DefaultScheduleStatus:
    """Schedules and sensors run once the daemon starts, unless HEIMDALL_AUTOMATION_STATUS=stopped."""
    value = os.environ.get(AUTOMATION_STATUS_ENV, "").strip().lower() or "running"
    if value not in {"running", "stopped"}:
        raise AutomationSettingError(f"{AUTOMATION_STATUS_ENV}={value!r}: use running or stopped")
    return dg.DefaultScheduleStatus.RUNNING if value == "running" else dg.DefaultScheduleStatus.STOPPED


def default_sensor_status() -> dg.DefaultSensorStatus:
    return dg.DefaultSensorStatus(default_status().value)
