"""The incremental sync's sensor, job and alerts, against the simulator over HTTP and a real database: an idle
tick asks at most 3 requests and starts nothing, a change starts one run that applies it, nothing is asked
while the live flag is off or a Kommo run is active, the bookings freshness check fails and passes as it
should, an increment over the deactivation limit stops as needs_review and alerts Slack, and a dry run's
drift alerts Slack."""

import time
import uuid

import dagster as dg
import pytest

from kommo_assets.assets.catalog import BOOKINGS, CALENDAR_VIEW, INCREMENT, PRODUCTION_KEYS
from kommo_assets.assets.increment import FRESHNESS_CHECK, MIRROR_CHECK
from kommo_assets.db import runs
from kommo_assets.jobs import REFRESH_TAG
from kommo_assets.resources import build_resources
from kommo_assets.settings import refresh_scope
from kommo_assets_tests.automation.conftest import RUN_STATUS_SENSORS
from kommo_assets_tests.helpers import fetch_one, production_checksum, run_job
from kommo_assets_tests.sync_support import production_rows
from kommo_assets_tests.test_full_refresh import WINDOW

SENSOR = "kommo_incremental_sync_sensor"
LEAD_YEAR = "2025"  # the year of the leads _in_window_lead picks (test_full_refresh.WINDOW)
SYNC = "kommo_incremental_sync_job"


def _kommo_requests(sim) -> int:
    by_path = sim.stats()["by_path"]
    return sum(count for path, count in by_path.items() if path.startswith("/api/"))


def _freshness(result) -> list:
    return [e for e in result.asset_events if isinstance(e, dg.AssetCheckEvaluation)
            and e.check_name == FRESHNESS_CHECK and e.asset_key == BOOKINGS]


def _in_window_lead(sim) -> dict:
    """A booking lead the refresh of 2025 imported."""
    return next(lead for lead in sim.dataset.iter_leads(window=WINDOW)
                if lead["status_id"] in (79790634, 79790637))


@pytest.fixture
def refreshed(automation_env, instance):
    """Every year in scope (the default, 2025 through the current year) refreshed: every window covered."""
    for year in refresh_scope().years():
        assert run_job("kommo_full_refresh_job", instance=instance, partition=str(year)).success
    automation_env.reset_stats()
    return automation_env


def test_before_any_refresh_the_sensor_starts_a_sync_that_imports_every_year_whole(automation_env, ticker,
                                                                                   instance, database_url):
    result = ticker.tick(SENSOR)
    (request,) = result.run_requests  # nothing read yet: no probe needed, every window is read whole
    assert _kommo_requests(automation_env) == 0
    (verdict,) = _freshness(result)
    assert not verdict.passed and "never been read" in verdict.description
    assert run_job(SYNC, instance=instance, tags=dict(request.tags or {})).success
    # what the sync imported is what the refreshes of every year in scope import
    synced = production_rows(database_url)
    for year in refresh_scope().years():
        assert run_job("kommo_full_refresh_job", instance=instance, partition=str(year)).success
    assert production_rows(database_url) == synced
    assert synced["bookings"], "the simulator's leads were imported"
    after = ticker.tick(SENSOR, cursor="{}")
    assert not after.run_requests and _freshness(after)[0].passed


def test_idle_tick_asks_at_most_three_requests_and_keeps_bookings_fresh(refreshed, ticker, database_url):
    result = ticker.tick(SENSOR)
    assert not result.run_requests
    assert "Nothing changed" in result.skip_message
    assert _kommo_requests(refreshed) <= 3
    (verdict,) = _freshness(result)
    assert verdict.passed
    # Long after the refresh, an idle tick is what keeps bookings fresh.
    fetch_one(database_url, "UPDATE kommo_import_runs SET finished_at = finished_at - interval '1 hour' "
                            "WHERE status = 'succeeded' RETURNING 1")
    fetch_one(database_url, "UPDATE kommo_sync_state SET updated_at = now() - interval '1 hour' RETURNING 1")
    stale = ticker.tick(SENSOR, cursor="{}")
    assert _freshness(stale)[0].passed  # the tick itself recorded the coverage before the check
    assert fetch_one(database_url, "SELECT updated_at > now() - interval '1 minute' FROM kommo_sync_state")[0]


def test_freshness_fails_when_nothing_covered_the_last_minutes(refreshed, ticker, database_url, monkeypatch):
    fetch_one(database_url, "UPDATE kommo_import_runs SET finished_at = finished_at - interval '1 hour' "
                            "WHERE status = 'succeeded' RETURNING 1")
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "0")  # no probe: nothing covers the time
    (verdict,) = _freshness(ticker.tick(SENSOR, cursor="{}"))
    assert not verdict.passed
    assert "KOMMO_FRESHNESS_MINUTES=10" in verdict.description


def test_a_change_starts_one_run_which_applies_it(refreshed, ticker, instance, database_url):
    lead = _in_window_lead(refreshed)
    refreshed.dataset.update_lead(lead["id"], price=4242)
    result = ticker.tick(SENSOR)
    (request,) = result.run_requests
    assert request.run_key.startswith("kommo-sync-")
    assert _kommo_requests(refreshed) == 1  # the leads probe found it
    # The sync's cursor is the Date of its first answer, and the probe asks from the cursor itself: a change
    # stamped in that very second would be probed again once (one more run, which changes nothing). Here
    # Kommo's clock moves on a second first, so the test says what it means whatever the machine's speed.
    refreshed.dataset.clock.advance(1)
    run = run_job(SYNC, instance=instance, tags=dict(request.tags or {}))
    assert run.success
    assert fetch_one(database_url, "SELECT value_amount FROM sales_leads WHERE lead_code = %s",
                     (f"kommo:{lead['id']}",))[0] == 4242
    record = runs.get_run(database_url, run.run_id)
    assert record["kind"] == "increment" and record["status"] == "succeeded"
    assert record["kommo_clock_at"] is not None and record["sync_to"] == record["kommo_clock_at"]
    keys = {e.asset_key for e in run.get_asset_materialization_events()}
    assert {*PRODUCTION_KEYS, CALENDAR_VIEW, INCREMENT} <= keys
    # applied: the next tick finds nothing new since the moved cursor
    refreshed.reset_stats()
    assert not ticker.tick(SENSOR).run_requests


def test_no_request_while_live_is_off_or_a_kommo_run_is_active(refreshed, ticker, instance, monkeypatch):
    refreshed.dataset.update_lead(_in_window_lead(refreshed)["id"], price=1)
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "0")
    result = ticker.tick(SENSOR)
    assert not result.run_requests and "KOMMO_ENABLE_LIVE" in result.skip_message
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "1")
    active = dg.DagsterRun(job_name="kommo_full_refresh_job", run_id=str(uuid.uuid4()),
                           status=dg.DagsterRunStatus.STARTED, tags={REFRESH_TAG: "kommo"})
    instance.add_run(active)
    try:
        result = ticker.tick(SENSOR)
        assert not result.run_requests and active.run_id in result.skip_message
    finally:
        instance.delete_run(active.run_id)
    assert _kommo_requests(refreshed) == 0


def test_increment_over_the_limit_stops_needs_review_alerts_slack_and_holds(
        refreshed, ticker, instance, database_url, fake_slack, monkeypatch):
    ticker.prime(*RUN_STATUS_SENSORS)
    monkeypatch.setenv("KOMMO_SYNC_MAX_DEACTIVATIONS", "0")
    before = production_checksum(database_url)
    lead = _in_window_lead(refreshed)
    refreshed.dataset.delete_leads([lead["id"]])
    # The definitions were loaded before the limit was set: the run gets the resource as built now.
    result = run_job(SYNC, instance=instance, resources={"kommo_sync": build_resources()["kommo_sync"]})
    assert not result.success
    assert production_checksum(database_url) == before
    record = runs.get_run(database_url, result.run_id)
    assert record["status"] == "needs_review" and "KOMMO_SYNC_MAX_DEACTIVATIONS" in record["error"]
    ticker.tick("kommo_run_failure_sensor")
    (message,) = [m.body["text"] for m in fake_slack.messages]
    assert "Kommo incremental sync needs review" in message and "KOMMO_SYNC_MAX_DEACTIVATIONS" in message
    held = ticker.tick(SENSOR)
    assert not held.run_requests and "needs_review" in held.skip_message
    # the hold is the deleted lead's year's: a refresh of another year lifts nothing, one of that year does
    years = [str(y) for y in refresh_scope().years()]
    others = [y for y in years if y != LEAD_YEAR]
    assert others, "the default scope holds the current year beside the simulator's"
    assert f"run a full refresh of {LEAD_YEAR}" in held.skip_message
    assert run_job("kommo_full_refresh_job", instance=instance, partition=others[0]).success
    still = ticker.tick(SENSOR)
    assert not still.run_requests and "needs_review" in still.skip_message
    assert run_job("kommo_full_refresh_job", instance=instance, partition=LEAD_YEAR).success
    lifted = ticker.tick(SENSOR)
    assert "needs_review" not in (lifted.skip_message or "")


def test_dry_run_records_drift_and_alerts_slack_when_it_is_not_zero(refreshed, ticker, instance, database_url,
                                                                     fake_slack):
    ticker.prime("kommo_drift_alert_sensor")
    assert run_job("kommo_dry_run_job", instance=instance).success
    ticker.tick("kommo_drift_alert_sensor")
    assert not fake_slack.messages  # nothing changed since the refresh: drift 0
    refreshed.dataset.update_lead(_in_window_lead(refreshed)["id"], price=99)
    dry = run_job("kommo_dry_run_job", instance=instance)
    assert dry.success
    assert runs.get_run(database_url, dry.run_id)["stats"]["drift"] >= 1
    ticker.tick("kommo_drift_alert_sensor")
    (message,) = [m.body["text"] for m in fake_slack.messages]
    assert "Kommo drift" in message


def test_an_import_whose_owner_is_gone_does_not_hold_the_sensor(refreshed, ticker, database_url):
    # A running import whose process died: nobody holds its owner lock.
    orphan = str(uuid.uuid4())
    runs.start_run(database_url, run_id=orphan, dagster_run_id=None, job_name="test", triggered_by=None,
                   kind="increment", max_drop_ratio=0)
    refreshed.dataset.update_lead(_in_window_lead(refreshed)["id"], price=5151)
    (request,) = ticker.tick(SENSOR).run_requests  # the run's start will close the orphan
    # One whose owner lives holds it.
    live = str(uuid.uuid4())
    with runs.owning(database_url, live):
        runs.start_run(database_url, run_id=live, dagster_run_id=None, job_name="test", triggered_by=None,
                       kind="increment", max_drop_ratio=0)
        held = ticker.tick(SENSOR)
    assert not held.run_requests and f"Kommo import {live} is running" in held.skip_message
    assert runs.get_run(database_url, orphan)["status"] == "failed"


@pytest.mark.parametrize("fault", [
    {"kind": "slow", "delay_s": 20},
    {"kind": "status", "status": 429, "headers": {"Retry-After": "300"}},
    {"kind": "status", "status": 503},
], ids=["slow", "429-retry-after", "503"])
def test_the_probe_gives_up_within_its_budget_and_says_why(refreshed, ticker, fault):
    refreshed.dataset.update_lead(_in_window_lead(refreshed)["id"], price=6161)
    refreshed.add_fault(path="/api/v4/leads", times=1, **fault)
    started = time.monotonic()
    result = ticker.tick(SENSOR)
    assert time.monotonic() - started < 10
    assert not result.run_requests
    assert "did not answer the probe within its budget" in result.skip_message
    assert _kommo_requests(refreshed) == 1  # not retried, nothing else asked
    (retried,) = ticker.tick(SENSOR).run_requests  # the next tick finds the change
    assert retried.run_key.startswith("kommo-sync-")


def test_a_mapping_edit_starts_a_sync_without_asking_kommo_and_the_dry_run_checks_the_mirror(
        refreshed, ticker, instance, database_url):
    status_id, n = fetch_one(database_url, "SELECT kommo_status_id, count(*) FROM bookings WHERE is_active"
                                           " AND kommo_created_at >= '2025-01-01' AND kommo_created_at < '2026-01-01'"
                                           " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1")
    (every_year,) = fetch_one(database_url, "SELECT count(*) FROM bookings WHERE is_active AND kommo_status_id = %s",
                              (status_id,))
    fetch_one(database_url, "UPDATE kommo_status_map SET booking_status = 'cancelled' WHERE status_id = %s"
                            " RETURNING 1", (status_id,))
    # The nightly dry run's local drift check of the year sees production no longer following the rules.
    dry = run_job("kommo_dry_run_job", instance=instance, partition=LEAD_YEAR)
    assert dry.success
    (check,) = [e for e in dry.get_asset_check_evaluations() if e.check_name == MIRROR_CHECK]
    assert not check.passed and check.metadata["drift"].value == n, check.metadata["change_counts"]
    assert check.metadata["rules_not_applied"].value == 1
    refreshed.reset_stats()
    result = ticker.tick(SENSOR)
    (request,) = result.run_requests
    assert _kommo_requests(refreshed) == 0  # no probe: nothing changed in Kommo
    assert run_job(SYNC, instance=instance, tags=dict(request.tags or {})).success
    # every booking in that stage, whatever its year
    assert fetch_one(database_url, "SELECT count(*) FROM bookings WHERE is_active AND kommo_status_id = %s"
                                   " AND status = 'cancelled'", (status_id,))[0] == every_year
    refreshed.reset_stats()
    idle = ticker.tick(SENSOR)
    assert not idle.run_requests and _kommo_requests(refreshed) <= 3
    dry = run_job("kommo_dry_run_job", instance=instance, partition=LEAD_YEAR)
    (check,) = [e for e in dry.get_asset_check_evaluations() if e.check_name == MIRROR_CHECK]
    assert check.passed and check.metadata["drift"].value == 0
