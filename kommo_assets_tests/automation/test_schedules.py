"""The nightly schedules: crons and timezone from the environment, clear errors, skipped while live is off."""

import re

import dagster as dg
import pytest

from kommo_assets.automation.schedules import build_schedules
from kommo_assets.settings import LIVE_DISABLED_REASON, ConfigError


def test_defaults():
    dry, full = build_schedules({})
    assert (dry.name, dry.job_name, dry.cron_schedule, dry.execution_timezone, dry.default_status) == (
        "kommo_nightly_dry_run_schedule", "kommo_dry_run_job", "0 2 * * *", "UTC", dg.DefaultScheduleStatus.RUNNING)
    assert (full.name, full.job_name, full.cron_schedule, full.execution_timezone, full.default_status) == (
        "kommo_nightly_full_refresh_schedule", "kommo_full_refresh_job", "30 2 * * *", "UTC",
        dg.DefaultScheduleStatus.STOPPED)


def test_crons_and_timezone_from_the_environment():
    dry, full = build_schedules({"KOMMO_DRY_RUN_CRON": "15 3 * * 1-5", "KOMMO_FULL_REFRESH_CRON": " 0 4 * * * ",
                                 "KOMMO_SCHEDULE_TIMEZONE": "Europe/Berlin"})
    assert (dry.cron_schedule, full.cron_schedule) == ("15 3 * * 1-5", "0 4 * * *")
    assert dry.execution_timezone == full.execution_timezone == "Europe/Berlin"


@pytest.mark.parametrize("variable", ["KOMMO_DRY_RUN_CRON", "KOMMO_FULL_REFRESH_CRON"])
@pytest.mark.parametrize("value", ["every night", "61 2 * * *", "0 2 * *"])
def test_invalid_cron_names_the_variable(variable, value):
    with pytest.raises(ConfigError, match=f"{variable} must be a cron expression .* got {re.escape(repr(value))}"):
        build_schedules({variable: value})


def test_invalid_timezone_names_the_variable():
    with pytest.raises(ConfigError, match="KOMMO_SCHEDULE_TIMEZONE must be an IANA timezone"):
        build_schedules({"KOMMO_SCHEDULE_TIMEZONE": "Mars/Olympus"})


def test_a_tick_runs_when_live_and_skips_with_the_reason_when_not(monkeypatch):
    dry, full = build_schedules({})
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "1")
    for schedule in (dry, full):
        data = schedule.evaluate_tick(dg.build_schedule_context())
        assert [r.tags["dagster/schedule_name"] for r in data.run_requests] == [schedule.name]
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "0")
    data = dry.evaluate_tick(dg.build_schedule_context())
    assert data.run_requests == [] and data.skip_message == LIVE_DISABLED_REASON
