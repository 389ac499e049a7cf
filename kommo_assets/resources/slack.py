"""Slack alerts as a Dagster resource: the switch, the channel, the Web API base URL and the Dagster UI address
the alerts link to, posting through dagster-slack's client.

dagster-slack 0.29's ``SlackResource`` has one setting, the token, and builds ``WebClient(token)`` for Slack's
own URL with slack_sdk's default timeout; tests and proxies need another URL. So this resource is a
``ConfigurableResource`` of its own that uses a ``SlackResource`` for the client and sets the client's
``base_url`` (``SLACK_API_BASE_URL``) and ``timeout``, both public attributes of slack_sdk's client, read on
every call. The token and the channel are optional here so the code location loads and runs without Slack;
posting without them is a ConfigError.
"""

import dagster as dg
from dagster_slack import SlackResource
from pydantic import Field, field_validator
from slack_sdk import WebClient

from kommo_assets.resources.fields import HIDE_INPUTS, unresolved
from kommo_assets.settings import ConfigError

DEFAULT_SLACK_API_BASE_URL = "https://slack.com/api/"
DEFAULT_WEBSERVER_URL = "http://127.0.0.1:3000"


class KommoSlackResource(dg.ConfigurableResource):
    """Posts Kommo alerts to one channel (``SLACK_BOT_TOKEN``, ``KOMMO_SLACK_CHANNEL``) when
    ``KOMMO_ENABLE_SLACK_ALERTS`` is on."""

    model_config = HIDE_INPUTS

    enabled: bool = Field(
        default=False, description="KOMMO_ENABLE_SLACK_ALERTS: post one message per failed or needs_review run."
    )
    token: str | None = Field(
        default=None, repr=False,
        description="SLACK_BOT_TOKEN: Slack bot token (secret); only needed when alerts are on.",
    )
    base_url: str = Field(
        default=DEFAULT_SLACK_API_BASE_URL,
        description="SLACK_API_BASE_URL: Slack Web API base URL, ending in /api/.",
    )
    channel: str | None = Field(default=None, description="KOMMO_SLACK_CHANNEL: the channel alerts go to.")
    webserver_url: str = Field(
        default=DEFAULT_WEBSERVER_URL,
        description="DAGSTER_WEBSERVER_URL: where operators open the Dagster UI, for the link in each alert.",
    )
    kommo_access_token: str | None = Field(
        default=None, repr=False,
        description="KOMMO_ACCESS_TOKEN, only to keep it out of alerts and request errors (secret).",
    )
    timeout_seconds: int = Field(default=10, description="Timeout of each Slack API call.")

    @field_validator("webserver_url", mode="before")
    @classmethod
    def _webserver_url(cls, value):
        return value if unresolved(value) else (str(value).strip() or DEFAULT_WEBSERVER_URL).rstrip("/")

    def secrets(self) -> list[str]:
        """What must never appear in an alert: the bot token and the Kommo token."""
        return [s for s in (self.token, self.kommo_access_token) if s]

    def get_client(self) -> WebClient:
        """dagster-slack's client for the bot token, pointed at ``base_url`` with ``timeout_seconds``."""
        if not self.token:
            raise ConfigError(
                "SLACK_BOT_TOKEN is not set: Slack alerts need a bot token (or turn "
                "KOMMO_ENABLE_SLACK_ALERTS off)."
            )
        client = SlackResource(token=self.token).get_client()
        client.base_url = self.base_url if self.base_url.endswith("/") else f"{self.base_url}/"
        client.timeout = self.timeout_seconds
        return client

    def post_message(self, text: str) -> None:
        """Posts ``text`` (Slack mrkdwn) to the configured channel; raises on any Slack error."""
        if not self.channel:
            raise ConfigError(
                "KOMMO_SLACK_CHANNEL is not set: name the channel for Kommo alerts (e.g. #ops-alerts), "
                "or turn KOMMO_ENABLE_SLACK_ALERTS off."
            )
        self.get_client().chat_postMessage(channel=self.channel, text=text, unfurl_links=False, unfurl_media=False)
