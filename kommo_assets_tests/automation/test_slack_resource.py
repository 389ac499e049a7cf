"""The Slack resource: dagster-slack's client pointed at SLACK_API_BASE_URL, optional until used."""

import dagster as dg
import pytest
from dagster_slack import SlackResource

from kommo_assets.resources import build_resources
from kommo_assets.resources.slack import DEFAULT_SLACK_API_BASE_URL, KommoSlackResource
from kommo_assets.settings import ConfigError


def test_posts_through_the_configured_base_url(fake_slack, monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-1")
    monkeypatch.setenv("KOMMO_SLACK_CHANNEL", "#ops")
    monkeypatch.setenv("SLACK_API_BASE_URL", fake_slack.base_url.rstrip("/"))  # a missing slash is fine
    with dg.build_resources({"slack": build_resources()["slack"]}) as resources:
        resources.slack.post_message("hello *ops*")
    (posted,) = fake_slack.messages
    assert posted.body == {"channel": "#ops", "text": "hello *ops*", "unfurl_links": False, "unfurl_media": False}
    assert posted.headers["Authorization"] == "Bearer xoxb-1"


def test_builds_without_any_slack_setting_and_fails_loudly_only_when_used(monkeypatch):
    for name in ("SLACK_BOT_TOKEN", "KOMMO_SLACK_CHANNEL", "SLACK_API_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with dg.build_resources({"slack": build_resources()["slack"]}) as resources:
        slack = resources.slack
        assert slack.base_url == DEFAULT_SLACK_API_BASE_URL and slack.token is None
        with pytest.raises(ConfigError, match="KOMMO_SLACK_CHANNEL is not set"):
            slack.post_message("x")
    with pytest.raises(ConfigError, match="SLACK_BOT_TOKEN is not set"):
        KommoSlackResource(channel="#ops").post_message("x")


def test_settings_are_env_vars_not_values(monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-secret")
    resource = build_resources()["slack"]
    # the definitions hold the variable's name, never the token itself
    assert isinstance(resource.token, dg.EnvVar) and resource.token == "SLACK_BOT_TOKEN"


def test_a_resource_of_its_own_that_uses_dagster_slacks_client():
    """Not a subclass of dagster-slack's SlackResource (whose private members it would then have to
    override): it asks one for the client and points that at the base URL, with its timeout."""
    assert not issubclass(KommoSlackResource, SlackResource)
    client = KommoSlackResource(token="xoxb-1", base_url="http://127.0.0.1:9/api", timeout_seconds=3).get_client()
    assert (client.token, client.base_url, client.timeout) == ("xoxb-1", "http://127.0.0.1:9/api/", 3)
