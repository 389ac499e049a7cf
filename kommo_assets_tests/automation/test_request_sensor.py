"""kommo_refresh_request_sensor against a real database: one run per request for its year, stable run keys,
refusals, and the settings it copies for the request function."""

import dagster as dg
import psycopg
import pytest

from kommo_assets.db import refresh_requests
from kommo_assets.definitions import defs
from kommo_assets.jobs import REQUEST_ID_TAG, REQUESTED_BY_TAG
from kommo_assets.scope import current_year
from kommo_assets.settings import ConfigError
from kommo_assets_tests.helpers import fetch_all, fetch_one

SENSOR = "kommo_refresh_request_sensor"


def _request(url: str, user, year=None) -> int:
    return fetch_one(url, "SELECT id FROM request_kommo_refresh(%s, %s)", (user, year))[0]


def _status(url: str, request_id: int) -> tuple:
    return fetch_one(url, "SELECT status, reason FROM kommo_refresh_requests WHERE id = %s", (request_id,))


def _flag(url: str):
    row = fetch_one(url, "SELECT enabled FROM kommo_runtime_flags WHERE name = 'KOMMO_ENABLE_LIVE'")
    return row[0] if row else None


def test_staff_request_starts_one_run_and_a_repeat_tick_none(automation_env, database_url, staff, ticker):
    first = ticker.tick(SENSOR)
    assert not first.run_requests and "No pending" in first.skip_message
    assert _flag(database_url) is True  # the tick synced the live flag for the app

    request_id = _request(database_url, staff)
    result = ticker.tick(SENSOR)
    assert [r.run_key for r in result.run_requests] == [f"kommo-refresh-request-{request_id}"]
    tags = result.run_requests[0].tags
    assert tags[REQUESTED_BY_TAG] == str(staff) and tags[REQUEST_ID_TAG] == str(request_id)
    assert result.cursor == str(request_id)
    # no year asked: the current one, as a partition of the full refresh
    assert result.run_requests[0].partition_key == str(current_year())
    assert _status(database_url, request_id) == ("queued", None)

    repeat = ticker.tick(SENSOR)
    assert repeat.run_requests == [] and repeat.skip_message == f"No pending Kommo refresh requests (last handled: #{request_id})."
    assert repeat.cursor == str(request_id)


def test_a_claim_whose_tick_never_finished_is_requested_again_with_the_same_key(
        automation_env, database_url, staff, live_synced, ticker):
    request_id = _request(database_url, staff)
    assert len(ticker.tick(SENSOR).run_requests) == 1
    # the daemon died before storing the cursor: the next tick starts from the old one
    again = ticker.tick(SENSOR, cursor="0")
    assert [r.run_key for r in again.run_requests] == [f"kommo-refresh-request-{request_id}"]


def test_live_flag_off_refuses_pending_requests_with_the_reason(automation_env, database_url, staff, ticker,
                                                                monkeypatch):
    assert ticker.tick(SENSOR).skip_message  # syncs the flag on, so the app accepts the request
    request_id = _request(database_url, staff)

    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "0")
    result = ticker.tick(SENSOR)
    assert result.run_requests == []
    assert result.skip_message == f"KOMMO_ENABLE_LIVE is off: refused refresh request(s) #{request_id}."
    assert result.cursor == str(request_id)
    status, reason = _status(database_url, request_id)
    assert status == "refused" and "KOMMO_ENABLE_LIVE is off" in reason and "KOMMO_ENABLE_LIVE=1" in reason
    assert refresh_requests.request_status(database_url, request_id)["error"] == reason
    assert _flag(database_url) is False

    # the app is now refused up front, with the same advice
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="Set KOMMO_ENABLE_LIVE=1"):
        _request(database_url, staff)
    assert "KOMMO_ENABLE_LIVE is off" in ticker.tick(SENSOR).skip_message


def test_unreadable_live_flag_fails_the_tick_and_counts_as_off(automation_env, database_url, staff, ticker,
                                                               monkeypatch):
    ticker.tick(SENSOR)
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "maybe")
    with pytest.raises(ConfigError, match="KOMMO_ENABLE_LIVE"):
        ticker.tick(SENSOR)
    assert _flag(database_url) is False


def _settings(url: str) -> dict:
    return dict(fetch_all(url, "SELECT name, value FROM kommo_runtime_settings"))


def test_the_tick_copies_years_and_cooldown_and_runs_the_year_asked_for(automation_env, database_url, staff,
                                                                        ticker, monkeypatch):
    ticker.tick(SENSOR)
    # the default scope: from the seed's year through the current one, resolved by the database itself
    assert _settings(database_url) == {"KOMMO_REFRESH_YEARS": [[2025, None]], "KOMMO_REQUEST_COOLDOWN_MINUTES": 10}
    monkeypatch.setenv("KOMMO_REFRESH_YEARS", "2025, 2024")
    monkeypatch.setenv("KOMMO_REQUEST_COOLDOWN_MINUTES", "0")
    ticker.tick(SENSOR)
    assert _settings(database_url) == {"KOMMO_REFRESH_YEARS": [[2024, 2024], [2025, 2025]],
                                       "KOMMO_REQUEST_COOLDOWN_MINUTES": 0}

    # a year that is not the current one (the code location's partitions were loaded with the default
    # scope: a new KOMMO_REFRESH_YEARS takes a reload, so the test asks for a year both hold)
    request_id = _request(database_url, staff, 2025)
    (run_request,) = ticker.tick(SENSOR).run_requests
    assert run_request.partition_key == "2025" and run_request.run_config == {}
    assert request_id == int(run_request.tags["kommo/request_id"])
    # the partition is the window a run imports (the dry run shares the step)
    result = defs.resolve_job_def("kommo_dry_run_job").execute_in_process(
        partition_key=run_request.partition_key, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert result.success
    assert fetch_one(database_url, "SELECT created_from::date::text, created_to::date::text FROM kommo_import_runs "
                                   "WHERE id = %s", (result.run_id,)) == ("2025-01-01", "2026-01-01")


def test_a_request_made_before_years_runs_the_current_year(automation_env, database_url, staff, ticker):
    ticker.tick(SENSOR)
    request_id = fetch_one(database_url, "INSERT INTO kommo_refresh_requests (requested_by) VALUES (%s) RETURNING id",
                           (staff,))[0]
    (run_request,) = ticker.tick(SENSOR).run_requests
    assert run_request.run_key == f"kommo-refresh-request-{request_id}"
    assert run_request.partition_key == str(current_year())


@pytest.mark.parametrize("name, raw", [("KOMMO_REFRESH_YEARS", "2025,next"), ("KOMMO_REFRESH_YEARS", "1999"),
                                       ("KOMMO_REQUEST_COOLDOWN_MINUTES", "soon"),
                                       ("KOMMO_REQUEST_COOLDOWN_MINUTES", "-5")])
def test_an_unreadable_setting_fails_the_tick_naming_it_and_keeps_the_last_copy(
        automation_env, database_url, staff, ticker, monkeypatch, name, raw):
    ticker.tick(SENSOR)
    before = _settings(database_url)
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigError, match=name):
        ticker.tick(SENSOR)
    assert _settings(database_url) == before
