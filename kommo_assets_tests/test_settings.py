import pytest

from kommo_assets.kommo import DEFAULT_MAX_RPS
from kommo_assets.resources.kommo import KommoResource
from kommo_assets.settings import ConfigError, kommo_max_rps, parse_flag, require_live


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



def test_the_kommo_pace_defaults_to_the_client_default_and_is_read_when_a_run_starts(monkeypatch):
    assert kommo_max_rps({}) == DEFAULT_MAX_RPS == 6.9
    assert kommo_max_rps({"KOMMO_MAX_RPS": " 6.5 "}) == 6.5
    resource = KommoResource(base_url="http://127.0.0.1:9", access_token="t")
    monkeypatch.setenv("KOMMO_MAX_RPS", "6.8")
    with resource.client() as client:
        assert client.max_rps == 6.8
    with KommoResource(base_url="http://127.0.0.1:9", access_token="t", max_rps=3.0).client() as client:
        assert client.max_rps == 3.0


@pytest.mark.parametrize("raw, message", [("0", "must be a number of requests per second from 0.1"),
                                          ("nan", "must be a number of requests per second"),
                                          ("inf", "must be a number of requests per second"),
                                          ("-1", "must not be negative"), ("fast", "must be a number")])
def test_a_bad_kommo_pace_is_a_config_error_naming_the_variable(raw, message):
    with pytest.raises(ConfigError, match=f"KOMMO_MAX_RPS {message}"):
        kommo_max_rps({"KOMMO_MAX_RPS": raw})


from kommo_assets.settings import refresh_years, request_cooldown_minutes  # noqa: E402


def test_refresh_years_default_to_2025_and_keep_their_order():
    assert refresh_years({}) == refresh_years({"KOMMO_REFRESH_YEARS": " "}) == (2025,)
    assert refresh_years({"KOMMO_REFRESH_YEARS": " 2025, 2024,2025 "}) == (2025, 2024)


@pytest.mark.parametrize("raw", ["2025,", "next", "2025;2024", "1999", "2101", "25"])
def test_bad_refresh_years_are_a_config_error_naming_the_variable(raw):
    with pytest.raises(ConfigError, match=f"KOMMO_REFRESH_YEARS must be comma-separated years .* got '{raw}'"):
        refresh_years({"KOMMO_REFRESH_YEARS": raw})


def test_the_request_cooldown_defaults_to_10_minutes():
    assert request_cooldown_minutes({}) == 10
    assert request_cooldown_minutes({"KOMMO_REQUEST_COOLDOWN_MINUTES": "0"}) == 0
    assert request_cooldown_minutes({"KOMMO_REQUEST_COOLDOWN_MINUTES": " 2.5 "}) == 2.5


@pytest.mark.parametrize("raw, message", [("soon", "must be a number"), ("-1", "must not be negative"),
                                          ("inf", "must be a number of minutes"),
                                          ("nan", "must be a number of minutes")])
def test_a_bad_request_cooldown_is_a_config_error_naming_the_variable(raw, message):
    with pytest.raises(ConfigError, match=f"KOMMO_REQUEST_COOLDOWN_MINUTES {message}"):
        request_cooldown_minutes({"KOMMO_REQUEST_COOLDOWN_MINUTES": raw})
