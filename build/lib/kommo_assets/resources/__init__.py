"""Resources, wired to the environment in one place: :func:`build_resources`.

Every setting of the project except the live flag and the schedules is a field of one of these resources,
so the UI's resource page shows it (secrets hidden) and the resource validates it, naming its variable.
"""

import os

import dagster as dg

from kommo_assets.resources.kommo import KommoResource
from kommo_assets.resources.postgres import PostgresResource
from kommo_assets.resources.slack import KommoSlackResource
from kommo_assets.resources.snapshot import SnapshotExportResource
from kommo_assets.resources.sync import KommoSyncResource
from kommo_assets.settings import parse_flag


def _env_vars(**variables: str) -> dict[str, dg.EnvVar]:
    """``field=dg.EnvVar(variable)`` for each variable that is set; an unset one leaves the field's default
    (Dagster fails to resolve an EnvVar whose variable is unset)."""
    return {field: dg.EnvVar(name) for field, name in variables.items() if os.environ.get(name, "").strip()}


def _texts(**variables: str) -> dict[str, str]:
    """``field=text`` for each variable that is set: numbers, which a ``dg.EnvVar`` cannot carry; the
    resource validates the text when the definitions load and names the variable if it cannot read it."""
    return {field: os.environ[name] for field, name in variables.items() if os.environ.get(name, "").strip()}


def build_resources() -> dict[str, dg.ConfigurableResource]:
    """Text settings are ``dg.EnvVar``s, resolved when a run or tick starts and never baked into the
    definitions; numbers and the Slack switch are read when the definitions load."""
    return {
        "postgres": PostgresResource(
            database_url=dg.EnvVar("KOMMO_DATABASE_URL"),
            **_texts(staging_retention_days="KOMMO_STAGING_RETENTION_DAYS",
                     failed_staging_retention_days="KOMMO_FAILED_STAGING_RETENTION_DAYS",
                     run_retention_days="KOMMO_RUN_RETENTION_DAYS",
                     noop_increment_retention_days="KOMMO_NOOP_INCREMENT_RETENTION_DAYS"),
        ),
        "kommo": KommoResource(
            base_url=dg.EnvVar("KOMMO_BASE_URL"),
            access_token=dg.EnvVar("KOMMO_ACCESS_TOKEN"),
            **_texts(max_rps="KOMMO_MAX_RPS"),
        ),
        "snapshot_export": SnapshotExportResource(
            **_env_vars(directory="KOMMO_SNAPSHOT_DIR"),
            **_texts(retention_days="KOMMO_SNAPSHOT_RETENTION_DAYS"),
        ),
        "kommo_sync": KommoSyncResource(
            **_texts(max_deactivations="KOMMO_SYNC_MAX_DEACTIVATIONS", freshness_minutes="KOMMO_FRESHNESS_MINUTES"),
        ),
        # Only the run-status sensors use Slack; unset Slack variables leave it unconfigured, not broken.
        "slack": KommoSlackResource(
            enabled=parse_flag("KOMMO_ENABLE_SLACK_ALERTS"),
            **_env_vars(token="SLACK_BOT_TOKEN", channel="KOMMO_SLACK_CHANNEL", base_url="SLACK_API_BASE_URL",
                        webserver_url="DAGSTER_WEBSERVER_URL", kommo_access_token="KOMMO_ACCESS_TOKEN"),
        ),
    }
