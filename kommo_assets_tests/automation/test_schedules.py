"""The nightly schedules: crons and timezone from the environment, clear errors, skipped while live is off."""

import re
from datetime import UTC, datetime

import dagster as dg
import pytest

from kommo_assets.automation.schedules import build_schedules
from kommo_assets.scope import FIRST_SEED_YEAR
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


def _tick(schedule: dg.ScheduleDefinition, at: datetime):
    from kommo_assets.definitions import defs

    context = dg.build_schedule_context(scheduled_execution_time=at, repository_def=defs.get_repository_def())
    return schedule.evaluate_tick(context)


def test_a_tick_runs_every_year_in_scope_when_live_and_skips_with_the_reason_when_not(monkeypatch):
    dry, full = build_schedules({})
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "1")
    now = datetime.now(UTC)
    in_scope = [str(year) for year in range(FIRST_SEED_YEAR, now.year + 1)]  # the default 2025-, the real date
    for schedule in (dry, full):
        data = _tick(schedule, now)
        assert [r.partition_key for r in data.run_requests] == in_scope
        assert [r.tags["dagster/schedule_name"] for r in data.run_requests] == [schedule.name] * len(in_scope)
        assert len({r.run_key for r in data.run_requests}) == len(in_scope)
    # a night in the seed's year had only that year in scope
    assert [r.partition_key for r in _tick(dry, datetime(FIRST_SEED_YEAR, 6, 1, 2, tzinfo=UTC)).run_requests] == [
        str(FIRST_SEED_YEAR)]
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "0")
    data = _tick(dry, now)
    assert data.run_requests == [] and data.skip_message == LIVE_DISABLED_REASON
