"""Slack as a Dagster resource: dagster-slack's SlackResource plus the Web API base URL and the channel.

dagster-slack 0.29 builds ``WebClient(token)`` with Slack's fixed URL; tests and proxies need another one,
so ``get_client`` passes ``base_url`` (``SLACK_API_BASE_URL``) through. The token and the channel are
optional here so the code location loads and runs without Slack; posting without them is a ConfigError.
"""

import dagster as dg
from dagster_slack import SlackResource
from pydantic import Field
from slack_sdk import WebClient

from kommo_assets import settings
from kommo_assets.settings import ConfigError

DEFAULT_SLACK_API_BASE_URL = "https://slack.com/api/"


class KommoSlackResource(SlackResource):
    """Posts Kommo alerts to one channel (``SLACK_BOT_TOKEN``, ``KOMMO_SLACK_CHANNEL``)."""

    token: str | None = Field(  # type: ignore[assignment]  # optional: Slack is off unless configured
        default=None, description="Slack bot token (SLACK_BOT_TOKEN); only needed when alerts are on."
    )
    base_url: str = Field(
        default=DEFAULT_SLACK_API_BASE_URL,
        description="Slack Web API base URL (SLACK_API_BASE_URL), ending in /api/.",
    )
    channel: str | None = Field(default=None, description="Channel the alerts go to (KOMMO_SLACK_CHANNEL).")
    timeout_seconds: int = Field(default=10, description="Timeout of each Slack API call.")

    @classmethod
    def _is_dagster_maintained(cls) -> bool:
        return False

    def get_client(self) -> WebClient:
        if not self.token:
            raise ConfigError(
                "SLACK_BOT_TOKEN is not set: Slack alerts need a bot token (or turn "
                "KOMMO_ENABLE_SLACK_ALERTS off)."
            )
        base_url = self.base_url if self.base_url.endswith("/") else f"{self.base_url}/"
        return WebClient(self.token, base_url=base_url, timeout=self.timeout_seconds)

    def post_message(self, text: str) -> None:
        """Posts ``text`` (Slack mrkdwn) to the configured channel; raises on any Slack error."""
        if not self.channel:
            raise ConfigError(
                "KOMMO_SLACK_CHANNEL is not set: name the channel for Kommo alerts (e.g. #ops-alerts), "
                "or turn KOMMO_ENABLE_SLACK_ALERTS off."
            )
        self.get_client().chat_postMessage(channel=self.channel, text=text, unfurl_links=False, unfurl_media=False)


def slack_resource() -> KommoSlackResource:
    """The Slack resource wired to the environment.

    Each setting is a ``dg.EnvVar`` (resolved when a sensor uses it, shown by name in the UI, never baked
    into the definitions), but only when that variable is set: Dagster fails to build a resource whose
    EnvVar is unset, and the run-status sensors that hold this resource must work without Slack.
    """
    config: dict = {}
    for field, name in (("token", "SLACK_BOT_TOKEN"), ("channel", "KOMMO_SLACK_CHANNEL"),
                        ("base_url", "SLACK_API_BASE_URL")):
        if settings.is_set(name):
            config[field] = dg.EnvVar(name)
    return KommoSlackResource(**config)
