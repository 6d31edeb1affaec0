"""Schedules: wall-clock times in an explicit time zone, one run per bucket, stable run keys."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from heimdall_storage_pipeline.core.policy import default_policy_path, load_policy
from heimdall_storage_pipeline.defs.automation.schedules import CHAIN_TAG, DAILY_CLEANUP, HOURLY_SCAN
from heimdall_storage_pipeline.defs.automation.settings import AutomationSettingError
from heimdall_storage_pipeline.defs.build import build_definitions

ROME = ZoneInfo("Europe/Rome")


def _defs(monkeypatch: pytest.MonkeyPatch, timezone: str | None = None) -> dg.Definitions:
    monkeypatch.delenv("HEIMDALL_AUTOMATION_STATUS", raising=False)
    if timezone:
        monkeypatch.setenv("HEIMDALL_SCHEDULE_TIMEZONE", timezone)
    else:
        monkeypatch.delenv("HEIMDALL_SCHEDULE_TIMEZONE", raising=False)
    return build_definitions(load_policy(default_policy_path()))


def _evaluate(defs: dg.Definitions, name: str, instance: dg.DagsterInstance, at: datetime) -> list[dg.RunRequest]:
    schedule = defs.resolve_schedule_def(name)
    result = schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=at))
    return [] if isinstance(result, dg.SkipReason) else list(result)


def test_hourly_scan_requests_every_bucket_once_per_hour(
    monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance
) -> None:
    defs = _defs(monkeypatch)
    schedule = defs.resolve_schedule_def(HOURLY_SCAN)
    assert schedule.cron_schedule == "0 * * * *"
    assert schedule.execution_timezone == "UTC"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert schedule.job_name == "storage_scan_job"

    ten = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    requests = _evaluate(defs, HOURLY_SCAN, instance, ten)
    buckets = {b.name for b in load_policy(default_policy_path()).enabled_buckets()}
    assert sorted(r.partition_key for r in requests) == sorted(buckets)
    assert {r.run_key for r in requests} == {f"hourly_storage_scan:{b}:2026-03-01T10:00Z" for b in buckets}
    # The same tick evaluated again asks for the same runs (the daemon dedupes on run_key) ...
    assert [r.run_key for r in _evaluate(defs, HOURLY_SCAN, instance, ten)] == [r.run_key for r in requests]
    # ... and the next hour for new ones; no request starts a cleanup chain.
    eleven = _evaluate(defs, HOURLY_SCAN, instance, datetime(2026, 3, 1, 11, 0, tzinfo=UTC))
    assert not {r.run_key for r in eleven} & {r.run_key for r in requests}
    assert all(CHAIN_TAG not in r.tags for r in requests + eleven)


def test_daily_cleanup_runs_at_three_in_the_configured_time_zone(
    monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance
) -> None:
    defs = _defs(monkeypatch, "Europe/Rome")
    schedule = defs.resolve_schedule_def(DAILY_CLEANUP)
    assert schedule.cron_schedule == "0 3 * * *"
    assert schedule.execution_timezone == "Europe/Rome"
    assert defs.resolve_schedule_def(HOURLY_SCAN).execution_timezone == "Europe/Rome"

    at_three = _evaluate(defs, DAILY_CLEANUP, instance, datetime(2026, 1, 15, 3, 0, tzinfo=ROME))
    assert len(at_three) == 3
    assert all(r.tags[CHAIN_TAG] == DAILY_CLEANUP for r in at_three)
    # 03:00 in Rome is 02:00 UTC in winter; the key names the UTC instant.
    assert {r.run_key for r in at_three} == {
        f"daily_orphan_cleanup:{r.partition_key}:2026-01-15T02:00Z" for r in at_three}
    assert _evaluate(defs, DAILY_CLEANUP, instance, datetime(2026, 1, 15, 2, 59, tzinfo=ROME)) == []
    # 03:00 UTC is 04:00 in Rome: not the configured time.
    assert _evaluate(defs, DAILY_CLEANUP, instance, datetime(2026, 1, 15, 3, 0, tzinfo=UTC)) == []
    # In summer (CEST) 03:00 Rome is 01:00 UTC.
    summer = _evaluate(defs, DAILY_CLEANUP, instance, datetime(2026, 7, 1, 3, 0, tzinfo=ROME))
    assert all(r.run_key.endswith("2026-07-01T01:00Z") for r in summer) and len(summer) == 3


def test_daily_cleanup_defaults_to_utc(monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance) -> None:
    defs = _defs(monkeypatch)
    assert defs.resolve_schedule_def(DAILY_CLEANUP).execution_timezone == "UTC"
    assert len(_evaluate(defs, DAILY_CLEANUP, instance, datetime(2026, 1, 15, 3, 0, tzinfo=UTC))) == 3
    assert _evaluate(defs, DAILY_CLEANUP, instance, datetime(2026, 1, 15, 3, 0, tzinfo=ROME)) == []


def test_a_wrong_time_zone_is_refused_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AutomationSettingError, match="Europe/Roma"):
        _defs(monkeypatch, "Europe/Roma")


def test_automation_can_start_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEIMDALL_AUTOMATION_STATUS", "stopped")
    defs = build_definitions(load_policy(default_policy_path()))
    assert defs.resolve_schedule_def(DAILY_CLEANUP).default_status == dg.DefaultScheduleStatus.STOPPED
    assert defs.resolve_sensor_def("dataset_deletion_sensor").default_status == dg.DefaultSensorStatus.STOPPED
