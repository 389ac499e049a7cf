"""The code location: assembles the Kommo Definitions (full refresh, dry run, incremental sync); nothing else
lives here."""

import warnings

import dagster as dg

from kommo_assets.assets.increment import bookings_follow_mirror, bookings_fresh, kommo_increment
from kommo_assets.assets.production import calendar_events_expanded, kommo_swap
from kommo_assets.assets.staging import (
    kommo_api,
    kommo_staging,
    leads_count_within_drop_guard,
    staging_warnings,
)
from kommo_assets.automation.request_sensor import kommo_refresh_request_sensor
from kommo_assets.automation.run_status_sensors import (
    kommo_drift_alert_sensor,
    kommo_run_canceled_sensor,
    kommo_run_failure_sensor,
    kommo_run_started_sensor,
    kommo_run_succeeded_sensor,
)
from kommo_assets.automation.schedules import (
    kommo_nightly_dry_run_schedule,
    kommo_nightly_full_refresh_schedule,
)
from kommo_assets.automation.sync_sensor import kommo_incremental_sync_sensor
from kommo_assets.jobs import kommo_dry_run_job, kommo_full_refresh_job, kommo_incremental_sync_job
from kommo_assets.resources import build_resources


def _with_code_references(assets: list) -> list:
    """Each asset linked to the file and line that defines it (the UI's "Code references"). The API is beta in
    1.13; its warnings would print on every load of the code location, so they are silenced here only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return list(dg.with_source_code_references(assets))


defs = dg.Definitions(
    assets=_with_code_references([kommo_api, kommo_staging, kommo_swap, calendar_events_expanded, kommo_increment]),
    asset_checks=[leads_count_within_drop_guard, staging_warnings, bookings_fresh, bookings_follow_mirror],
    jobs=[kommo_full_refresh_job, kommo_dry_run_job, kommo_incremental_sync_job],
    schedules=[kommo_nightly_dry_run_schedule, kommo_nightly_full_refresh_schedule],
    sensors=[
        kommo_refresh_request_sensor,
        kommo_incremental_sync_sensor,
        kommo_run_started_sensor,
        kommo_run_succeeded_sensor,
        kommo_run_canceled_sensor,
        kommo_drift_alert_sensor,
        kommo_run_failure_sensor,
    ],
    resources=build_resources(),
    # A run is one process (the SPEC): its steps run one after another, bound by Kommo's rate limit, so a
    # process per step would only add seconds; and the Postgres resource, set up once per run, holds the
    # import's owner lock from the first step to the last. Ad-hoc Materialize runs get this executor too.
    executor=dg.in_process_executor,
)
