"""Kommo -> staging: the run record opens here, the snapshot streams in, the guard checks sit beside it."""

import time
from dataclasses import asdict
from datetime import timedelta

import dagster as dg
from pydantic import Field

from kommo_assets.assets.catalog import (
    KOMMO_API,
    KOMMO_GROUP,
    OWNERS,
    PRODUCTION_KEYS,
    STG_BOOKING_VEHICLES,
    STG_CONTACTS,
    STG_LEADS,
    table_spec_args,
    timestamp,
)
from kommo_assets.assets.live import ensure_live
from kommo_assets.assets.partitions import YEARS, partition_window
from kommo_assets.db import runs
from kommo_assets.db.increment import record_drift
from kommo_assets.db.staging import stage_snapshot
from kommo_assets.jobs import KOMMO_POOL, REQUESTED_BY_TAG
from kommo_assets.reporting import drift_count, preview_markdown, preview_summary
from kommo_assets.resources.kommo import KommoResource
from kommo_assets.resources.postgres import PostgresResource, import_run_id

PROGRESS_EVERY_S = 15.0

# The nightly dry run (and any full refresh) stages every year in scope once a day: a day and a margin
# without a materialization is a missed night (warn), two days two missed nights (fail). It stays stale
# while the live flag is off, since the schedule then skips: nothing is checking Kommo.
STAGING_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=49), warn_window=timedelta(hours=25))


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


kommo_api = dg.AssetSpec(
    KOMMO_API,
    description="Kommo API v4 of the account: leads of the year, their main contacts, the vehicle and source options.",
    group_name=KOMMO_GROUP,
    kinds={"api"},
    owners=OWNERS,
)


@dg.multi_asset(
    name="kommo_staging",
    pool=KOMMO_POOL,
    partitions_def=YEARS,
    # A backfill of several years runs one year per run, one run at a time in the kommo pool.
    backfill_policy=dg.BackfillPolicy.multi_run(1),
    specs=[
        dg.AssetSpec(STG_LEADS, deps=[KOMMO_API], group_name=KOMMO_GROUP, kinds={"postgres"},
                     freshness_policy=STAGING_FRESHNESS, **table_spec_args(STG_LEADS),
                     description="Leads created in the year (partition), except those in the stage Closed - lost; raw payload plus "
                                 "typed columns."),
        dg.AssetSpec(STG_CONTACTS, deps=[KOMMO_API], group_name=KOMMO_GROUP, kinds={"postgres"},
                     freshness_policy=STAGING_FRESHNESS, **table_spec_args(STG_CONTACTS),
                     description="Distinct main contacts of the staged leads."),
        dg.AssetSpec(STG_BOOKING_VEHICLES, deps=[KOMMO_API], group_name=KOMMO_GROUP, kinds={"postgres"},
                     freshness_policy=STAGING_FRESHNESS, **table_spec_args(STG_BOOKING_VEHICLES),
                     description="The vehicle option of each staged lead (its Vehicle field)."),
    ],
)
def kommo_staging(
    context: dg.AssetExecutionContext,
    config: KommoRefreshConfig,
    postgres: PostgresResource,
    kommo: KommoResource,
):
    ensure_live()
    window = partition_window(context)
    # What the run is comes from what it materializes: without the production tables it is a dry run.
    dry_run = not run_materializes(context, PRODUCTION_KEYS)
    run_id = import_run_id(context.run)
    with postgres.working_on_run(run_id, kommo.secrets()):
        with postgres.import_runs() as import_runs:
            record = import_runs.start(
                run_id=run_id, dagster_run_id=context.run_id, job_name=context.job_name,
                triggered_by=context.run.tags.get(REQUESTED_BY_TAG), dry_run=dry_run,
                window=window, max_drop_ratio=config.max_drop_ratio,
            )
        context.log.info(
            f"Kommo import run {run_id} started ({'dry run' if record['dry_run'] else 'full refresh'}), "
            f"leads created in [{window.created_from.isoformat()}, {window.created_to.isoformat()})"
        )
        with kommo.client() as client, postgres.connect() as conn:
            result = stage_snapshot(conn, run_id, client, window.created_from, window.created_to,
                                    on_progress=_progress_logger(context))
            stats = {**result.as_metadata(), "client": asdict(client.stats)}
        with postgres.import_runs() as import_runs:
            import_runs.mark_staged(run_id, stats)
            # Where the first incremental sync after this refresh starts.
            import_runs.set_kommo_clock(run_id, result.kommo_clock)
            preview = import_runs.preview(run_id)
            # A dry run's preview is what the increments have left undone: the drift, which should be 0.
            drift = drift_count(preview) if record["dry_run"] else None
            if drift is not None:
                record_drift(import_runs.conn, run_id, drift)
    context.log.info(f"Change preview of run {run_id}: {preview_summary(preview)}")
    yield from _materializations(run_id, window, result, stats, preview, drift)


def _progress_logger(context: dg.AssetExecutionContext):
    """Logs the stream's progress every PROGRESS_EVERY_S rather than every n pages: the run's event log (kept
    in memory by an ephemeral instance) then does not grow with the number of leads."""
    last_logged = {"at": time.monotonic()}

    def progress(phase: str, result) -> None:
        now = time.monotonic()
        if now - last_logged["at"] >= PROGRESS_EVERY_S:
            last_logged["at"] = now
            context.log.info(f"{phase}: {result.lead_pages} lead pages, {result.contact_batches} contact batches")

    return progress


def _materializations(run_id: str, window, result, stats: dict, preview: dict, drift: int | None):
    """The three staging tables' materializations: counts, the change preview and (dry runs) the drift."""
    common = {
        "import_run_id": run_id,
        "window_from": timestamp(window.created_from),
        "window_to": timestamp(window.created_to),
        "seconds": round(result.seconds, 2),
    }
    yield dg.MaterializeResult(
        asset_key=STG_LEADS,
        metadata={
            **common,
            "dagster/row_count": result.leads,
            "leads_received": result.leads_received,
            "lead_pages": result.lead_pages,
            "skipped": dg.MetadataValue.json(dict(result.skipped)),
            "kommo_requests": stats["client"]["requests"],
            "kommo_429s": stats["client"]["throttled_429"],
            "change_preview": dg.MetadataValue.md(preview_markdown(preview)),
            "change_counts": dg.MetadataValue.json({k: v for k, v in preview.items() if k != "samples"}),
            **({"drift": drift} if drift is not None else {}),
        },
    )
    yield dg.MaterializeResult(
        asset_key=STG_CONTACTS,
        metadata={
            **common,
            "dagster/row_count": result.contacts,
            "contacts_requested": result.contacts_requested,
            "contacts_missing_in_kommo": result.contacts_requested - result.contacts,
            "contact_batches": result.contact_batches,
        },
    )
    yield dg.MaterializeResult(
        asset_key=STG_BOOKING_VEHICLES,
        metadata={**common, "dagster/row_count": result.vehicle_links},
    )


# What each check means for an operator: shown on the check in the UI, and by `make run` for those that
# did not pass.
CHECK_DESCRIPTIONS = {
    "leads_count_within_drop_guard": "Zero leads or contacts fails; a drop of more than max_drop_ratio against the "
                                     "last succeeded refresh of the year marks the run needs_review. The swap "
                                     "never runs after a failure: accept a real drop with a higher max_drop_ratio.",
    "all_statuses_mapped": "Booking leads in a Kommo stage with no kommo_status_map row import as 'pending' until "
                           "a row maps the stage (docs/status-mapping.md).",
    "all_bookings_dated": "Bookings with neither a delivery nor a collect date are imported, but stay off the "
                          "calendar.",
    "all_leads_have_contact": "Leads without a main contact import without a client.",
    "no_vehicles_to_create": "Vehicle options of Kommo that production does not have yet are created by the swap "
                             "(expected on a first run).",
}


@dg.asset_check(
    asset=STG_LEADS,
    name="leads_count_within_drop_guard",
    blocking=True,
    description=CHECK_DESCRIPTIONS["leads_count_within_drop_guard"],
)
def leads_count_within_drop_guard(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource
) -> dg.AssetCheckResult:
    run_id = import_run_id(context.run)
    with postgres.working_on_run(run_id), postgres.import_runs() as import_runs:
        verdict = import_runs.drop_guard(run_id)
    metadata = {
        "leads": verdict["leads"],
        "contacts": verdict["contacts"],
        "previous_leads": dg.MetadataValue.null() if verdict["previous_leads"] is None else verdict["previous_leads"],
        "drop_ratio": float(verdict["drop_ratio"]),
        "max_drop_ratio": float(verdict["max_drop_ratio"]),
        "run_status": verdict["status"],
    }
    if verdict["reason"]:
        metadata["reason"] = verdict["reason"]
        context.log.error(f"Drop guard: {verdict['reason']}")
    return dg.AssetCheckResult(passed=bool(verdict["passed"]), metadata=metadata)


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(name, asset=asset, description=CHECK_DESCRIPTIONS[name])
        for name, asset in (("all_statuses_mapped", STG_LEADS), ("all_bookings_dated", STG_LEADS),
                            ("all_leads_have_contact", STG_LEADS), ("no_vehicles_to_create", STG_BOOKING_VEHICLES))
    ],
)
def staging_warnings(context: dg.AssetCheckExecutionContext, postgres: PostgresResource):
    run_id = import_run_id(context.run)
    with postgres.import_runs() as import_runs:
        counts = import_runs.warnings(run_id)
    if counts is None:
        raise dg.Failure(description=f"unknown Kommo import run {run_id}: the staging step did not start it")
    unmapped, undated, no_contact, to_create = (counts[key] for key in (
        "unmapped_status", "booking_without_dates", "lead_without_contact", "vehicles_to_create"))
    for name, asset, count in (
        ("all_statuses_mapped", STG_LEADS, unmapped),
        ("all_bookings_dated", STG_LEADS, undated),
        ("all_leads_have_contact", STG_LEADS, no_contact),
        ("no_vehicles_to_create", STG_BOOKING_VEHICLES, to_create),
    ):
        yield dg.AssetCheckResult(
            check_name=name,
            asset_key=asset,
            passed=count == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"count": count},
        )
