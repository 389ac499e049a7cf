"""KOMMO_HEAL_DRIFT: the nightly dry run of each year records its own drift, and with the setting on a drift
that passed the drop guard starts a full refresh of exactly that year, which clears it; off (the default)
nothing is started; a dry run the guard stopped, one launched by hand, a year whose refresh is pending and a
year whose last heal failed are not healed, and the alert says why. Real runs against the simulator over
HTTP, real Postgres, the fake Slack API over HTTP, the sensors and the schedule evaluated as the daemon does."""

import uuid
from datetime import UTC, datetime

import dagster as dg
import pytest

from kommo_assets.assets.catalog import STG_LEADS
from kommo_assets.automation.drift_heal import HEAL_OF_TAG, HEAL_TAG, heal_run_key
from kommo_assets.db import runs
from kommo_assets.definitions import defs
from kommo_assets.scope import window_for
from kommo_assets.settings import ConfigError, heal_drift_enabled, refresh_scope
from kommo_assets_tests.automation.conftest import RUN_STATUS_SENSORS
from kommo_assets_tests.helpers import fetch_one, run_job

DRY, FULL, SYNC = "kommo_dry_run_job", "kommo_full_refresh_job", "kommo_incremental_sync_job"
DRIFT_SENSOR, FAILURE = "kommo_drift_alert_sensor", "kommo_run_failure_sensor"
SCHEDULE = "kommo_nightly_dry_run_schedule"
YEAR = "2025"  # the simulator's year: most of its leads, and the lead this file changes


@pytest.fixture
def refreshed(automation_env, instance, ticker):
    """Every year in scope (2025 through the current year) refreshed; the sensors primed after that."""
    years = [str(y) for y in refresh_scope().years()]
    assert len(years) >= 2, "the default scope holds the current year beside the simulator's"
    for year in years:
        assert run_job(FULL, instance=instance, partition=year).success
    ticker.prime(DRIFT_SENSOR, *RUN_STATUS_SENSORS)
    return automation_env


def _lead_of(sim, year: str = YEAR) -> dict:
    window = window_for(int(year))
    span = (int(window.created_from.timestamp()), int(window.created_to.timestamp()))
    return next(lead for lead in sim.dataset.iter_leads(window=span) if lead["status_id"] in (79790634, 79790637))


def _value(url: str, lead_id: int):
    return fetch_one(url, "SELECT value_amount FROM sales_leads WHERE lead_code = %s", (f"kommo:{lead_id}",))[0]


def _late_change(sim, url: str, instance, price: int) -> int:
    """A change Kommo stamps an hour back (an integration sending its own updated_at), past every margin:
    the incremental sync that runs after it cannot see it, so it is drift. Returns the lead id."""
    lead = _lead_of(sim)
    sim.dataset.update_lead(lead["id"], price=price, updated_at=sim.dataset.clock.now() - 3600)
    assert run_job(SYNC, instance=instance).success
    assert _value(url, lead["id"]) != price, "the sync missed the late stamp"
    return lead["id"]


def _nightly(instance, years: tuple[str, ...] = (YEAR,)) -> list[dg.ExecuteInProcessResult]:
    """The nightly dry run schedule's tick, then its runs of ``years``, each with the tags the schedule gives."""
    schedule = defs.resolve_schedule_def(SCHEDULE)
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=datetime.now(UTC),
                                        repository_def=defs.get_repository_def())
    requests = [r for r in schedule.evaluate_tick(context).run_requests if r.partition_key in years]
    assert [r.partition_key for r in requests] == list(years)
    return [run_job(DRY, instance=instance, tags=dict(r.tags), partition=r.partition_key) for r in requests]


def _drain(ticker, name: str = DRIFT_SENSOR) -> list[dg.RunRequest]:
    """Ticks until the sensor has handled every run that ended (a tick that requests a heal ends there)."""
    requests: list[dg.RunRequest] = []
    for _ in range(5):
        result = ticker.tick(name)
        for reaction in result.dagster_run_reactions:
            assert reaction.error is None, reaction.error
        requests += result.run_requests
        if not result.run_requests:
            return requests
    raise AssertionError("the sensor kept requesting runs")


def _launch(request: dg.RunRequest, instance) -> dg.ExecuteInProcessResult:
    """A requested run as the daemon launches it: its job, partition, run config and tags."""
    return defs.resolve_job_def(request.job_name).execute_in_process(
        instance=instance, run_config=request.run_config, tags=dict(request.tags),
        partition_key=request.partition_key, raise_on_error=False)


def _texts(fake_slack) -> list[str]:
    return [m.body["text"] for m in fake_slack.messages]


def test_on_drift_in_one_year_starts_a_refresh_of_exactly_that_year_which_clears_it(
        refreshed, ticker, instance, database_url, fake_slack, monkeypatch):
    monkeypatch.setenv("KOMMO_HEAL_DRIFT", "1")
    lead_id = _late_change(refreshed, database_url, instance, price=4711)
    years = tuple(str(y) for y in refresh_scope().years())
    dry_runs = dict(zip(years, _nightly(instance, years), strict=True))
    assert all(result.success for result in dry_runs.values())

    # drift is recorded per window: on each year's run record and its partition's materialization
    for year, result in dry_runs.items():
        record = runs.get_run(database_url, result.run_id)
        assert record["created_from"] == window_for(int(year)).created_from
        (leads,) = [m for m in result.get_asset_materialization_events() if m.asset_key == STG_LEADS]
        assert leads.partition == year
        assert leads.materialization.metadata["drift"].value == record["stats"]["drift"]
        assert (record["stats"]["drift"] >= 1) == (year == YEAR), (year, record["stats"]["drift"])

    (heal,) = _drain(ticker)
    drifted = dry_runs[YEAR].run_id
    assert heal.job_name == FULL and heal.partition_key == YEAR
    assert heal.run_key == heal_run_key(drifted)
    assert heal.tags[HEAL_TAG] == "drift" and heal.tags[HEAL_OF_TAG] == drifted
    (message,) = _texts(fake_slack)
    assert "Kommo drift" in message and f"row(s) in {YEAR}" in message
    assert f"*Heal:* a full refresh of {YEAR} was requested" in message
    assert f"runs/{drifted}|" in message

    healed = _launch(heal, instance)
    assert healed.success
    assert _value(database_url, lead_id) == 4711
    record = runs.get_run(database_url, healed.run_id)
    assert (record["kind"], record["status"], record["triggered_by"]) == (
        "full_refresh", "succeeded", "kommo_drift_alert_sensor")
    assert record["created_from"] == window_for(int(YEAR)).created_from

    # a heal is a full refresh, not a dry run: it starts nothing; the next night finds no drift, heals nothing
    (again,) = _nightly(instance)
    assert again.success and runs.get_run(database_url, again.run_id)["stats"]["drift"] == 0
    assert _drain(ticker) == []
    assert len(fake_slack.messages) == 1


def test_off_by_default_drift_alerts_as_before_and_starts_nothing(refreshed, ticker, instance, database_url,
                                                                   fake_slack, monkeypatch):
    monkeypatch.delenv("KOMMO_HEAL_DRIFT", raising=False)
    lead_id = _late_change(refreshed, database_url, instance, price=4712)
    (dry,) = _nightly(instance)
    assert dry.success and runs.get_run(database_url, dry.run_id)["stats"]["drift"] >= 1
    assert _drain(ticker) == []
    (message,) = _texts(fake_slack)
    assert "Kommo drift" in message and "*Heal:*" not in message
    assert "run a full refresh to repair" in message
    assert _value(database_url, lead_id) != 4712
    assert not instance.get_runs(filters=dg.RunsFilter(tags={HEAL_OF_TAG: dry.run_id}))


def test_a_dry_run_the_drop_guard_stopped_is_not_healed(refreshed, ticker, instance, database_url, fake_slack,
                                                        monkeypatch):
    monkeypatch.setenv("KOMMO_HEAL_DRIFT", "1")
    staged = [lead["id"] for lead in refreshed.dataset.iter_leads(window=(
        int(window_for(2025).created_from.timestamp()), int(window_for(2025).created_to.timestamp())))]
    refreshed.dataset.delete_leads(staged[: int(len(staged) * 0.4)])
    (dry,) = _nightly(instance)
    assert not dry.success
    record = runs.get_run(database_url, dry.run_id)
    assert record["status"] == "needs_review" and record["stats"]["drift"] > 0  # drift, but the guard said no
    assert _drain(ticker) == []
    assert _drain(ticker, FAILURE) == []
    (message,) = _texts(fake_slack)
    assert "Kommo dry run needs review" in message
    assert "*Heal:* not started: KOMMO_HEAL_DRIFT heals only a nightly dry run that succeeded with its drop " \
           "guard passed; this one ended needs_review." in message
    assert not instance.get_runs(filters=dg.RunsFilter(tags={HEAL_OF_TAG: dry.run_id}))


def test_a_dry_run_launched_by_hand_or_a_pending_refresh_starts_no_heal(refreshed, ticker, instance, database_url,
                                                                        fake_slack, monkeypatch):
    monkeypatch.setenv("KOMMO_HEAL_DRIFT", "1")
    _late_change(refreshed, database_url, instance, price=4713)
    by_hand = run_job(DRY, instance=instance, partition=YEAR)
    assert by_hand.success and runs.get_run(database_url, by_hand.run_id)["stats"]["drift"] >= 1
    assert _drain(ticker) == []
    assert "*Heal:* not started: this dry run was not launched by kommo_nightly_dry_run_schedule" in \
        _texts(fake_slack)[-1]

    # a refresh of the year under way (the button's, or the nightly full refresh's)
    running = dg.DagsterRun(job_name=FULL, run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED,
                            tags={"dagster/partition": YEAR})
    instance.add_run(running)
    try:
        (dry,) = _nightly(instance)
        assert dry.success
        assert _drain(ticker) == []
    finally:
        instance.delete_run(running.run_id)
    assert f"*Heal:* not started: a full refresh of {YEAR} is already running (run {running.run_id})" in \
        _texts(fake_slack)[-1]


def test_a_failed_heal_is_not_retried_until_a_full_refresh_of_the_year_succeeds(
        refreshed, ticker, instance, database_url, fake_slack, monkeypatch):
    monkeypatch.setenv("KOMMO_HEAL_DRIFT", "1")
    lead_id = _late_change(refreshed, database_url, instance, price=4714)
    _nightly(instance)
    (heal,) = _drain(ticker)
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "0")  # the heal fails at its first step
    failed = _launch(heal, instance)
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "1")
    assert not failed.success
    _drain(ticker, FAILURE)
    failure = _texts(fake_slack)[-1]
    assert "Kommo full refresh failed" in failure
    assert f"*Heal:* this full refresh was started by KOMMO_HEAL_DRIFT for the drift of dry run " \
           f"{heal.tags[HEAL_OF_TAG]}. It is not retried" in failure

    # the next night: the drift is still there, and the year waits for a person
    (dry,) = _nightly(instance)
    assert dry.success and runs.get_run(database_url, dry.run_id)["stats"]["drift"] >= 1
    assert _drain(ticker) == []
    assert f"*Heal:* not started: the last heal of {YEAR} (run {failed.run_id}) ended failure" in \
        _texts(fake_slack)[-1]

    # a refresh of the year by hand repairs it and lets healing go on
    assert run_job(FULL, instance=instance, partition=YEAR).success
    assert _value(database_url, lead_id) == 4714
    _late_change(refreshed, database_url, instance, price=4715)
    _nightly(instance)
    (again,) = _drain(ticker)
    assert again.partition_key == YEAR
    assert _launch(again, instance).success
    assert _value(database_url, lead_id) == 4715


def test_a_bad_value_is_a_config_error_naming_the_variable(refreshed, ticker, instance, database_url, fake_slack,
                                                           monkeypatch):
    assert heal_drift_enabled({}) is False
    assert heal_drift_enabled({"KOMMO_HEAL_DRIFT": " On "}) is True
    with pytest.raises(ConfigError, match="KOMMO_HEAL_DRIFT must be one of 1/true/yes/on or 0/false/no/off, "
                                          "got 'maybe'"):
        heal_drift_enabled({"KOMMO_HEAL_DRIFT": "maybe"})

    # the sensor: the drift alert still goes out, says why nothing was healed, and the tick fails naming it
    monkeypatch.setenv("KOMMO_HEAL_DRIFT", "maybe")
    _late_change(refreshed, database_url, instance, price=4716)
    (dry,) = _nightly(instance)
    assert dry.success
    result = ticker.tick(DRIFT_SENSOR)
    assert not result.run_requests
    (reaction,) = [r for r in result.dagster_run_reactions if r.dagster_run.run_id == dry.run_id]
    assert "KOMMO_HEAL_DRIFT must be one of" in reaction.error.to_string()
    (message,) = _texts(fake_slack)
    assert "Kommo drift" in message and "*Heal:* not started: KOMMO_HEAL_DRIFT must be one of" in message
    # the cursor moved on: the alert is not repeated
    assert _drain(ticker) == [] and len(fake_slack.messages) == 1
