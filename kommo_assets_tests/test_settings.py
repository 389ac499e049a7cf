"""Settings: the flags parsed from the environment, and every other setting validated by its resource,
built here with values (as the UI's resource page and ``build_resources`` build them), naming the variable."""

import math
from datetime import UTC, datetime

import dagster as dg
import pytest
from dagster._utils.error import serializable_error_info_from_exc_info

from kommo_assets.kommo import DEFAULT_MAX_RPS
from kommo_assets.resources import build_resources
from kommo_assets.resources.kommo import KommoResource
from kommo_assets.resources.postgres import PostgresResource
from kommo_assets.resources.slack import KommoSlackResource
from kommo_assets.resources.snapshot import SnapshotExportResource
from kommo_assets.settings import (
    ConfigError,
    parse_flag,
    positive_number,
    refresh_scope,
    request_cooldown_minutes,
    require_live,
)

URL = "postgresql://kommo:pw-1234@127.0.0.1:5432/kommo"


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on", " On "])
def test_true_flag_values(raw):
    assert parse_flag("KOMMO_ENABLE_LIVE", {"KOMMO_ENABLE_LIVE": raw}) is True


@pytest.mark.parametrize("raw", ["0", "false", "no", "off", "", "OFF"])
def test_false_flag_values(raw):
    assert parse_flag("KOMMO_ENABLE_LIVE", {"KOMMO_ENABLE_LIVE": raw}) is False


def test_unset_flag_is_false():
    assert parse_flag("KOMMO_ENABLE_LIVE", {}) is False


@pytest.mark.parametrize("raw", ["2", "enabled", "y"])
def test_other_flag_values_are_a_config_error_naming_the_variable(raw):
    with pytest.raises(ConfigError, match="KOMMO_ENABLE_SLACK_ALERTS"):
        parse_flag("KOMMO_ENABLE_SLACK_ALERTS", {"KOMMO_ENABLE_SLACK_ALERTS": raw})


def test_live_off_refuses_with_the_reason():
    with pytest.raises(ConfigError, match="KOMMO_ENABLE_LIVE is off"):
        require_live({})


def _kommo(**values) -> KommoResource:
    return KommoResource(base_url="http://127.0.0.1:9", access_token="t0ken", **values)


def test_the_kommo_pace_defaults_to_the_client_default_and_reaches_the_client():
    assert _kommo().max_rps == DEFAULT_MAX_RPS == 6.9
    assert _kommo(max_rps=" 6.5 ").max_rps == 6.5  # the variable's text, as build_resources passes it
    with _kommo(max_rps=3.0).client() as client:
        assert client.max_rps == 3.0


@pytest.mark.parametrize("raw, message", [("0", "must be a finite number above 0"),
                                          ("0.05", "must be a number of requests per second from 0.1"),
                                          ("nan", "must be a finite number above 0"),
                                          ("inf", "must be a finite number above 0"),
                                          ("-1", "must be a finite number above 0"), ("fast", "must be a number")])
def test_a_bad_kommo_pace_is_an_error_naming_the_variable(raw, message):
    with pytest.raises(ValueError, match=f"KOMMO_MAX_RPS {message}"):
        _kommo(max_rps=raw)


@pytest.mark.parametrize("resource, field, variable", [
    (PostgresResource, "staging_retention_days", "KOMMO_STAGING_RETENTION_DAYS"),
    (PostgresResource, "failed_staging_retention_days", "KOMMO_FAILED_STAGING_RETENTION_DAYS"),
    (SnapshotExportResource, "retention_days", "KOMMO_SNAPSHOT_RETENTION_DAYS"),
])
@pytest.mark.parametrize("raw", ["0", "-3", "nan", "inf", "-inf", "soon", math.nan, math.inf, 0])
def test_days_and_seconds_must_be_finite_and_above_zero_naming_the_variable(resource, field, variable, raw):
    base = {"database_url": URL} if resource is PostgresResource else {}
    with pytest.raises(ValueError, match=f"{variable} must be a"):
        resource(**base, **{field: raw})


def test_days_and_seconds_take_the_variables_text_or_a_number():
    postgres = PostgresResource(database_url=URL, staging_retention_days="1.5", failed_staging_retention_days=" 3 ")
    assert (postgres.staging_retention_days, postgres.failed_staging_retention_days) == (1.5, 3)
    assert SnapshotExportResource(retention_days="7").retention_days == 7
    assert SnapshotExportResource(directory="  ").directory is None


def test_positive_number_names_the_variable():
    assert positive_number("X_DAYS", " 2 ") == 2
    with pytest.raises(ConfigError, match="X_DAYS must be a finite number above 0, got 'nan'"):
        positive_number("X_DAYS", "nan")


@pytest.mark.parametrize("token", ["abc\r\ndef-secret", "abc\tdef-secret", "abc\ndef-secret", "abc\x00def-secret"])
def test_a_token_with_control_characters_is_refused_naming_the_variable_never_the_value(token):
    with pytest.raises(ValueError, match="KOMMO_ACCESS_TOKEN contains a control character") as refused:
        KommoResource(base_url="http://127.0.0.1:9", access_token=token)
    assert "def-secret" not in str(refused.value) and "def-secret" not in repr(refused.value)


def test_a_database_url_psycopg_cannot_read_is_refused_without_its_password():
    with pytest.raises(ValueError, match="KOMMO_DATABASE_URL is not a PostgreSQL URL") as refused:
        PostgresResource(database_url="postgresql://kommo:pa%ss-word@127.0.0.1/kommo")
    assert "pa%ss" not in str(refused.value)
    assert refused.value.__cause__ is None and refused.value.__context__ is None
    with pytest.raises(ValueError, match="KOMMO_DATABASE_URL is not set"):
        PostgresResource(database_url=" ")


def test_reprs_hide_the_secrets():
    shown = " ".join(repr(r) for r in (
        KommoResource(base_url="http://127.0.0.1:9", access_token="kommo-secret-1"),
        PostgresResource(database_url=URL),
        KommoSlackResource(token="xoxb-secret-2", kommo_access_token="kommo-secret-1", channel="#ops"),
    ))
    assert "KommoResource(" in shown and "#ops" in shown
    for secret in ("kommo-secret-1", "pw-1234", "xoxb-secret-2"):
        assert secret not in shown


def test_build_resources_reads_each_setting_from_its_variable(monkeypatch):
    for name, value in {"KOMMO_MAX_RPS": "5.5", "KOMMO_STAGING_RETENTION_DAYS": "2",
                        "KOMMO_FAILED_STAGING_RETENTION_DAYS": "4",
                        "KOMMO_SNAPSHOT_RETENTION_DAYS": "10", "KOMMO_SNAPSHOT_DIR": "/srv/exports",
                        "KOMMO_ENABLE_SLACK_ALERTS": "yes", "KOMMO_SLACK_CHANNEL": "#ops",
                        "DAGSTER_WEBSERVER_URL": "https://dagster.example.com/"}.items():
        monkeypatch.setenv(name, value)
    resources = build_resources()
    postgres, kommo, export, slack = (resources[k] for k in ("postgres", "kommo", "snapshot_export", "slack"))
    assert kommo.max_rps == 5.5 and kommo.access_token == "KOMMO_ACCESS_TOKEN"  # an EnvVar: its name only
    assert isinstance(kommo.access_token, dg.EnvVar) and isinstance(postgres.database_url, dg.EnvVar)
    assert (postgres.staging_retention_days, postgres.failed_staging_retention_days) == (2, 4)
    assert export.retention_days == 10 and export.directory == "KOMMO_SNAPSHOT_DIR"
    assert slack.enabled and slack.channel == "KOMMO_SLACK_CHANNEL"
    with dg.build_resources({"slack": slack, "snapshot_export": export}) as resolved:
        assert resolved.slack.webserver_url == "https://dagster.example.com"
        assert resolved.slack.channel == "#ops" and resolved.snapshot_export.directory == "/srv/exports"


@pytest.mark.parametrize("name", ["KOMMO_MAX_RPS", "KOMMO_STAGING_RETENTION_DAYS", "KOMMO_SNAPSHOT_RETENTION_DAYS"])
def test_build_resources_fails_on_a_bad_number_naming_the_variable(monkeypatch, name):
    monkeypatch.setenv(name, "nan")
    with pytest.raises(ValueError, match=f"{name} must be a finite number above 0"):
        build_resources()


def test_a_bad_token_fails_the_run_at_resource_configuration_naming_the_variable(monkeypatch):
    monkeypatch.setenv("KOMMO_ACCESS_TOKEN", "tok-\r\n-secret-tail")
    monkeypatch.setenv("KOMMO_BASE_URL", "http://127.0.0.1:9")
    with pytest.raises(Exception) as refused, dg.build_resources({"kommo": build_resources()["kommo"]}):
        pass
    text = serializable_error_info_from_exc_info((refused.type, refused.value, refused.tb)).to_string()
    assert "KOMMO_ACCESS_TOKEN contains a control character" in text
    assert "secret-tail" not in text


def test_the_scope_defaults_to_the_seed_year_through_the_current_one():
    this_year = datetime.now(UTC).year  # the real date
    assert refresh_scope({}).years() == refresh_scope({"KOMMO_REFRESH_YEARS": " "}).years() == tuple(
        range(2025, this_year + 1))
    assert str(refresh_scope({})) == "2025-"
    assert refresh_scope({"KOMMO_REFRESH_YEARS": " 2025, 2024,2025 "}).years(datetime(2026, 6, 1, tzinfo=UTC)) == (
        2024, 2025)


@pytest.mark.parametrize("raw", ["2025,", "next", "2025;2024", "1999", "2101", "25", "2026-2025", "-2025", "2025--"])
def test_bad_refresh_years_are_a_config_error_naming_the_variable(raw):
    with pytest.raises(ConfigError, match=f"KOMMO_REFRESH_YEARS must be years and ranges .* got '{raw}'"):
        refresh_scope({"KOMMO_REFRESH_YEARS": raw})


def test_the_request_cooldown_defaults_to_10_minutes():
    assert request_cooldown_minutes({}) == 10
    assert request_cooldown_minutes({"KOMMO_REQUEST_COOLDOWN_MINUTES": "0"}) == 0
    assert request_cooldown_minutes({"KOMMO_REQUEST_COOLDOWN_MINUTES": " 2.5 "}) == 2.5


@pytest.mark.parametrize("raw, message", [("soon", "must be a number"),
                                          ("-1", "must be a finite number of minutes, 0 or more"),
                                          ("inf", "must be a finite number of minutes, 0 or more"),
                                          ("nan", "must be a finite number of minutes, 0 or more")])
def test_a_bad_request_cooldown_is_a_config_error_naming_the_variable(raw, message):
    with pytest.raises(ConfigError, match=f"KOMMO_REQUEST_COOLDOWN_MINUTES {message}"):
        request_cooldown_minutes({"KOMMO_REQUEST_COOLDOWN_MINUTES": raw})
