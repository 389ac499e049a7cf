"""Every secret of the code location, planted, then looked for in everything a failing run leaves behind:
the Kommo token, a database password holding a ``%`` (percent-encoded in a readable URL, bare in one psycopg
cannot read) and the Slack bot token, in Python logs at DEBUG, the console, Dagster's event logs and run
records, sensor tick errors, the run and request tables and the messages that reached the (fake) Slack API.
Each secret is looked for in every form: as is, percent-encoded or decoded, escaped by repr or JSON."""

import json
import logging
import os
import subprocess
import sys
import uuid
from urllib.parse import quote

import dagster as dg
import psycopg
import pytest
from dagster._utils.error import serializable_error_info_from_exc_info

from kommo_assets.kommo.errors import secret_forms
from kommo_assets_tests.automation.conftest import RUN_STATUS_SENSORS, SensorTicker
from kommo_assets_tests.automation.fake_slack import FakeSlack
from kommo_assets_tests.faults.support import Scan, run
from kommo_assets_tests.helpers import production_checksum

pytestmark = pytest.mark.timeout(240)

FAILURE_SENSOR = "kommo_run_failure_sensor"
CHANNEL = "#kommo-alerts"


def _url_with_password(url: str, password_in_url: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(url)
    return (f"postgresql://{parts.get('user', 'postgres')}:{password_in_url}@{parts['host']}:{parts['port']}"
            f"/{parts['dbname']}")


def _leaks(scan: Scan, secret: str) -> list[str]:
    return sorted({where for form in secret_forms(secret) for where in scan.leaks(form)})


@pytest.fixture
def slack(monkeypatch):
    with FakeSlack() as fake:
        monkeypatch.setenv("SLACK_BOT_TOKEN", f"xoxb-planted-{uuid.uuid4().hex}")
        monkeypatch.setenv("KOMMO_SLACK_CHANNEL", CHANNEL)
        monkeypatch.setenv("SLACK_API_BASE_URL", fake.base_url)
        yield fake


def _scan_slack(scan: Scan, fake: FakeSlack) -> None:
    for request in fake.requests:
        # the bot token travels in the Authorization header, and nowhere else
        scan.add("slack request body", request.raw_body)
        scan.add("slack request headers", {k: v for k, v in request.headers.items() if k != "Authorization"})


def test_no_secret_reaches_any_output(fault_env, slack, monkeypatch, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    env = fault_env()
    monkeypatch.setenv("KOMMO_ENABLE_SLACK_ALERTS", "1")  # after fault_env, which turns alerts off
    token = env.token
    slack_token = os.environ["SLACK_BOT_TOKEN"]
    password = f"pw%{uuid.uuid4().hex[:12]}"
    # a readable URL: the % percent-encoded as it must be (the test server trusts any password)
    monkeypatch.setenv("KOMMO_DATABASE_URL", _url_with_password(env.url, quote(password, safe="")))
    # a Kommo error page that echoes the token and the database password in every form back
    echo = f"Bearer {token}; db password {password} {quote(password, safe='')} {password!r}"
    env.sim.add_fault(kind="status", path="/api/v4/leads/custom_fields/", status=400,
                      content_type="application/problem+json", body=json.dumps({"title": "Bad", "detail": echo}))
    scan = Scan()
    tick_errors: list[BaseException] = []
    with dg.instance_for_test() as instance:
        ticker = SensorTicker(instance)
        ticker.prime(*RUN_STATUS_SENSORS)
        echoed = run(instance=instance)
        assert not echoed.success
        ticker.tick(FAILURE_SENSOR)
        assert len(slack.messages) == 1 and "db password &lt;redacted&gt;" in slack.messages[0].body["text"]

        # a token holding CR/LF: refused when the run's resources are configured; the alert still goes out
        monkeypatch.setenv("KOMMO_ACCESS_TOKEN", f"{token}\r\n")
        refused_token = run(instance=instance)
        assert not refused_token.success
        ticker.tick(FAILURE_SENSOR)
        assert len(slack.messages) == 2
        assert "KOMMO_ACCESS_TOKEN contains a control character" in slack.messages[1].body["text"]
        monkeypatch.setenv("KOMMO_ACCESS_TOKEN", token)

        # a password with a bare %: psycopg cannot read the URL and would quote the password
        bare = f"pa%ss-{uuid.uuid4().hex[:12]}"
        monkeypatch.setenv("KOMMO_DATABASE_URL", _url_with_password(env.url, bare))
        refused_url = run(instance=instance)
        assert not refused_url.success
        with pytest.raises(Exception) as tick_failed:  # the sensor cannot reach the database either
            ticker.tick(FAILURE_SENSOR)
        tick_errors.append(tick_failed.value)
        # what the daemon stores for the failed tick
        tick_error = serializable_error_info_from_exc_info((tick_failed.type, tick_failed.value, tick_failed.tb))
        scan.add("sensor tick error", tick_error.to_string())
        assert "KOMMO_DATABASE_URL is not a PostgreSQL URL" in tick_error.to_string()

        # an unencoded @ in the password: psycopg would read the rest as the host name, which errors quote
        first, second = f"Fi{uuid.uuid4().hex[:10]}", f"SecondHalf{uuid.uuid4().hex[:10]}"
        monkeypatch.setenv("KOMMO_DATABASE_URL", _url_with_password(env.url, f"{first}@{second}"))
        refused_at = run(instance=instance)
        assert not refused_at.success
        with pytest.raises(Exception) as tick_failed:
            ticker.tick(FAILURE_SENSOR)
        tick_errors.append(tick_failed.value)
        tick_error = serializable_error_info_from_exc_info((tick_failed.type, tick_failed.value, tick_failed.tb))
        scan.add("sensor tick error (@)", tick_error.to_string())
        assert "unencoded @" in tick_error.to_string()

        for result in (echoed, refused_token, refused_url, refused_at):
            scan.add_dagster_run(instance, result.run_id)
    scan.add_database(env.url)
    scan.add_exceptions(tick_errors)
    _scan_slack(scan, slack)
    scan.add_process_output(caplog, capfd)

    text = "\n".join(piece for _, piece in scan.pieces)
    for seen in ("db password <redacted>", "KOMMO_ACCESS_TOKEN contains a control character",
                 "KOMMO_DATABASE_URL is not a PostgreSQL URL", "unencoded @", "GET /api/v4/leads/custom_fields"):
        assert seen in text, seen  # the scan covered the failures
    assert env.sim.stats()["requests"] > 0  # the token was in use
    for secret in (token, password, bare, first, second, f"{first}@{second}", slack_token):
        assert _leaks(scan, secret) == [], secret
    assert production_checksum(env.url) == env.before


@pytest.mark.parametrize("command", ["migrate", "run"])
def test_the_cli_prints_no_database_password(pg_admin_url, command, tmp_path):
    """kommo-assets migrate and run check KOMMO_DATABASE_URL as the code location does, and every error they
    print is redacted: a bare %, an unencoded @, and a readable URL whose server cannot be reached."""
    parts = psycopg.conninfo.conninfo_to_dict(pg_admin_url)
    secret = uuid.uuid4().hex[:12]
    cases = {
        "bare %": (f"pa%ss-{secret}", parts["port"], "is not a PostgreSQL URL psycopg can read"),
        "unencoded @": (f"First{secret}@SecondHalf{secret}", parts["port"], "unencoded @"),
        "unreachable": (f"Pw{secret}", 1, f"{command} failed"),  # port 1: nothing listens there
    }
    for name, (password, port, expected) in cases.items():
        url = f"postgresql://postgres:{password}@{parts['host']}:{port}/postgres"
        env = {**os.environ, "KOMMO_DATABASE_URL": url, "KOMMO_DEV_HOME": str(tmp_path),
               "KOMMO_BASE_URL": "http://127.0.0.1:1", "KOMMO_ACCESS_TOKEN": f"tok-{secret}"}
        done = subprocess.run([sys.executable, "-m", "kommo_assets.cli", command], env=env, capture_output=True,
                              text=True, timeout=120)
        output = done.stdout + done.stderr
        assert done.returncode != 0 and expected in output, (name, output)
        for piece in {password, *password.split("@"), f"tok-{secret}"}:
            assert not {form for form in secret_forms(piece) if form in output}, (name, output)
