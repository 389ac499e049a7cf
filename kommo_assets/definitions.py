"""The code location: assembles the Kommo full-refresh Definitions; nothing else lives here."""

import dagster as dg

from kommo_assets.assets.production import calendar_events_expanded, kommo_swap
from kommo_assets.assets.staging import (
    kommo_api,
    kommo_staging,
    leads_count_within_drop_guard,
    staging_warnings,
)
from kommo_assets.jobs import kommo_dry_run_job, kommo_full_refresh_job
from kommo_assets.resources import build_resources

defs = dg.Definitions(
    assets=[kommo_api, kommo_staging, kommo_swap, calendar_events_expanded],
    asset_checks=[leads_count_within_drop_guard, staging_warnings],
    jobs=[kommo_full_refresh_job, kommo_dry_run_job],
    resources=build_resources(),
)
