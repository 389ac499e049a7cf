import pytest

from kommo_assets.settings import ConfigError, parse_flag, require_live


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

