"""The incremental sync's settings: defaults, and bad values refused naming their variable."""

import pytest

from kommo_assets.resources import build_resources
from kommo_assets.settings import ConfigError, sync_interval_seconds


def test_sync_settings_default_to_60_seconds_50_deactivations_and_10_minutes(monkeypatch):
    for name in ("KOMMO_SYNC_INTERVAL_SECONDS", "KOMMO_SYNC_MAX_DEACTIVATIONS", "KOMMO_FRESHNESS_MINUTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KOMMO_DATABASE_URL", "postgresql://x@localhost/db")
    assert sync_interval_seconds() == 60
    sync = build_resources()["kommo_sync"]
    assert (sync.max_deactivations, sync.freshness_minutes) == (50, 10.0)


def test_sync_settings_are_read_from_their_variables(monkeypatch):
    monkeypatch.setenv("KOMMO_SYNC_MAX_DEACTIVATIONS", "0")
    monkeypatch.setenv("KOMMO_FRESHNESS_MINUTES", "2.5")
    sync = build_resources()["kommo_sync"]
    assert (sync.max_deactivations, sync.freshness_minutes) == (0, 2.5)
    assert sync_interval_seconds({"KOMMO_SYNC_INTERVAL_SECONDS": " 15 "}) == 15


@pytest.mark.parametrize("raw", ["0", "-5", "1.5", "soon"])
def test_a_bad_sync_interval_names_the_variable(raw):
    with pytest.raises(ConfigError, match="KOMMO_SYNC_INTERVAL_SECONDS"):
        sync_interval_seconds({"KOMMO_SYNC_INTERVAL_SECONDS": raw})


@pytest.mark.parametrize("name, raw", [("KOMMO_SYNC_MAX_DEACTIVATIONS", "-1"), ("KOMMO_SYNC_MAX_DEACTIVATIONS", "many"),
                                       ("KOMMO_SYNC_MAX_DEACTIVATIONS", "2.5"), ("KOMMO_FRESHNESS_MINUTES", "0"),
                                       ("KOMMO_FRESHNESS_MINUTES", "nan")])
def test_bad_sync_resource_values_name_their_variable(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(Exception, match=name):
        build_resources()
