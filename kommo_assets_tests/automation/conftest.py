"""Fixtures of the automation tests: a persistent Dagster instance, the fake Slack API, staff users, a
small simulator, and a helper that evaluates sensors the way the daemon does (cursor kept between ticks,
only the resources the sensor requires, built from the environment at tick time)."""

import uuid

import dagster as dg
import pytest

from kommo_assets.db import refresh_requests
from kommo_assets.definitions import defs
from kommo_assets.resources import build_resources
from kommo_assets.settings import refresh_scope, request_cooldown_minutes
from kommo_assets_tests.automation.fake_slack import FakeSlack
from kommo_assets_tests.helpers import fetch_one

SLACK_TOKEN = "xoxb-test-slack-token-5f1e"
SLACK_CHANNEL = "#kommo-alerts"


@pytest.fixture(scope="module")
def instance():
    """A persistent (temporary directory) instance: sensors read run status changes from its storage.
    Shared by a module's tests (it takes 2 s to create); each test primes its sensors' cursors first."""
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def fake_slack():
    with FakeSlack() as slack:
        yield slack


@pytest.fixture
def automation_env(monkeypatch, database_url, make_simulator, fake_slack):
    """A code location environment: fresh database, a 200-lead simulator, live on, Slack alerts on."""
    sim = make_simulator(leads=200, seed=5)
    monkeypatch.setenv("KOMMO_DATABASE_URL", database_url)
    monkeypatch.setenv("KOMMO_BASE_URL", sim.base_url)
    monkeypatch.setenv("KOMMO_ACCESS_TOKEN", sim.config.token)
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "1")
    monkeypatch.setenv("KOMMO_ENABLE_SLACK_ALERTS", "1")
    monkeypatch.setenv("SLACK_BOT_TOKEN", SLACK_TOKEN)
    monkeypatch.setenv("KOMMO_SLACK_CHANNEL", SLACK_CHANNEL)
    monkeypatch.setenv("SLACK_API_BASE_URL", fake_slack.base_url)
    monkeypatch.delenv("DAGSTER_WEBSERVER_URL", raising=False)
    return sim


@pytest.fixture
def staff(database_url) -> uuid.UUID:
    user = uuid.uuid4()
    fetch_one(database_url, "INSERT INTO kommo_refresh_staff (user_id, note) VALUES (%s, 'test') RETURNING user_id",
              (user,))
    return user


@pytest.fixture
def live_synced(database_url):
    """The copies as the request sensor leaves them while KOMMO_ENABLE_LIVE is on (other settings unset)."""
    refresh_requests.sync_flag(database_url, refresh_requests.LIVE_FLAG, True)
    refresh_requests.sync_settings(database_url, {refresh_requests.YEARS_SETTING: refresh_scope({}).as_json(),
                                               refresh_requests.COOLDOWN_SETTING: request_cooldown_minutes({})})


class SensorTicker:
    """Evaluates the code location's sensors against one instance, keeping each sensor's cursor."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self.cursors: dict[str, str | None] = {}

    def tick(self, name: str, cursor: str | None = None):
        sensor = defs.resolve_sensor_def(name)
        resources = build_resources()  # from the environment now, as the code server does per tick
        context = dg.build_sensor_context(
            instance=self.instance,
            cursor=cursor if cursor is not None else self.cursors.get(name),
            sensor_name=name,
            resources={key: resources[key] for key in sensor.required_resource_keys},
            definitions=defs,  # resolves the partition of a partitioned run request, as the daemon does
        )
        with context:
            result = sensor.evaluate_tick(context)
        self.cursors[name] = result.cursor
        return result

    def prime(self, *names: str) -> None:
        """A run-status sensor's first tick only records where the event log ends, like in the daemon."""
        for name in names:
            result = self.tick(name)
            assert not result.run_requests


RUN_STATUS_SENSORS = ("kommo_run_started_sensor", "kommo_run_succeeded_sensor", "kommo_run_canceled_sensor",
                      "kommo_run_failure_sensor")


@pytest.fixture
def ticker(instance) -> SensorTicker:
    return SensorTicker(instance)
