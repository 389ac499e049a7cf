"""What the Kommo assets share: group name, asset keys, the run config and run bookkeeping."""

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime

import dagster as dg
from pydantic import Field

from kommo_assets.db import runs
from kommo_assets.kommo.errors import redact
from kommo_assets.resources.postgres import PostgresResource
from kommo_assets.settings import ConfigError, require_live

KOMMO_GROUP = "kommo"
FULL_REFRESH_JOB = "kommo_full_refresh_job"
DRY_RUN_JOB = "kommo_dry_run_job"
INCREMENTAL_SYNC_JOB = "kommo_incremental_sync_job"
REQUESTED_BY_TAG = "kommo/requested_by"
REQUEST_ID_TAG = "kommo/request_id"
REFRESH_TAG = "kommo/refresh"
# The concurrency pool of the assets that read Kommo: dagster.yaml limits it to one run at a time.
KOMMO_POOL = "kommo"

KOMMO_API = dg.AssetKey("kommo_api")
STG_LEADS = dg.AssetKey("stg_kommo_leads")
STG_CONTACTS = dg.AssetKey("stg_kommo_contacts")
STG_BOOKING_VEHICLES = dg.AssetKey("stg_kommo_booking_vehicles")
STAGING_KEYS = (STG_LEADS, STG_CONTACTS, STG_BOOKING_VEHICLES)
PRODUCTION_KEYS = tuple(dg.AssetKey(k) for k in ("vehicles", "clients", "sales_leads", "bookings", "booking_vehicles"))
CALENDAR_VIEW = dg.AssetKey("calendar_events_expanded")

log = logging.getLogger(__name__)


class KommoRefreshConfig(dg.Config):
    """Run config of the staging step (``ops: {kommo_staging: {config: ...}}``); the window is the run's
    partition (a year)."""

    max_drop_ratio: float = Field(
        default=runs.DEFAULT_MAX_DROP_RATIO,
        ge=0.0,
        le=1.0,
        description="Largest accepted drop in leads against the last succeeded refresh of the year "
        "(0.30 = 30%). Raise it to accept a real drop.",
    )


def run_materializes(context: dg.AssetExecutionContext, keys) -> bool:
    """Whether the run materializes any of ``keys``: from its asset selection (the job's, or the subset an
    operator picked in the UI), never from the job's name."""
    selected = context.run.asset_selection or context.job_def.asset_layer.selected_asset_keys
    return any(key in selected for key in keys)


def timestamp(moment: datetime | None) -> dg.MetadataValue:
    """A moment as the UI plots it (a timestamp), or null: one type per metadata key."""
    return dg.MetadataValue.null() if moment is None else dg.MetadataValue.timestamp(moment)


def ensure_live() -> None:
    try:
        require_live()
    except ConfigError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None


@contextmanager
def working_on_run(postgres: PostgresResource, run_id: str, secrets: Iterable[str] = ()) -> Iterator[None]:
    """A step's hold on the import run: its owner lock (the run's own, held since the run began), and on any
    exception the run closed as failed (its error without ``secrets`` or the database password) before the
    exception propagates."""
    secrets = [*postgres.secrets(), *secrets]
    try:
        with postgres.owning(run_id):
            yield
    except BaseException as exc:
        try:
            postgres.close_run(run_id, "failed", exc, secrets, attempts=10)
        except Exception as close_error:  # the database is gone for good; the next start closes the dead run
            log.error("could not close Kommo import run %s: %s", run_id, runs.safe_error(close_error, secrets))
        if isinstance(exc, Exception) and _quotes_a_secret(exc, secrets):
            # Dagster would store the text (and its causes) in the event log and the failure sensor would
            # quote it: the step fails with the redacted text instead, without the original chained.
            raise dg.Failure(description=runs.safe_error(exc, secrets)) from None
        raise


def _quotes_a_secret(exc: BaseException, secrets: list[str]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        text = f"{seen!s} {seen!r}"
        if redact(text, secrets) != text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False

# Which apply counters (of the swap and the increment alike) describe which production table.
APPLY_COUNTS = {
    "vehicles": ("vehicles_created",),
    "clients": ("clients_added", "clients_updated"),
    "sales_leads": ("sales_leads_added", "sales_leads_updated", "sales_leads_archived"),
    "bookings": ("bookings_added", "bookings_updated", "bookings_deactivated"),
    "booking_vehicles": ("booking_vehicles_added", "booking_vehicles_removed"),
}
