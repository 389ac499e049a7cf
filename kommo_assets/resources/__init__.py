"""Resources, built in one place from the environment (see ``kommo_assets.settings``)."""

import dagster as dg

from kommo_assets.resources.kommo import KommoResource
from kommo_assets.resources.postgres import PostgresResource
from kommo_assets.resources.slack import slack_resource


def build_resources() -> dict[str, dg.ConfigurableResource]:
    """Every value comes from an environment variable, read when a run starts, never baked into code."""
    return {
        "postgres": PostgresResource(database_url=dg.EnvVar("KOMMO_DATABASE_URL")),
        "kommo": KommoResource(
            base_url=dg.EnvVar("KOMMO_BASE_URL"),
            access_token=dg.EnvVar("KOMMO_ACCESS_TOKEN"),
        ),
        # Only the run-status sensors use Slack; unset Slack variables leave it unconfigured, not broken.
        "slack": slack_resource(),
    }
