"""Staging -> production: the transactional swap, and the calendar view it feeds."""

import dagster as dg

from kommo_assets.assets.catalog import (
    BOOKING_VEHICLES,
    BOOKINGS,
    CALENDAR_VIEW,
    KOMMO_GROUP,
    PRODUCTION_KEYS,
    STAGING_KEYS,
    table_of,
    table_spec_args,
)
from kommo_assets.assets.live import ensure_live
from kommo_assets.assets.partitions import YEARS, partition_window
from kommo_assets.db.calendar import calendar_counts
from kommo_assets.db.windows import window_row_counts
from kommo_assets.resources.postgres import PostgresResource, import_run_id
from kommo_assets.resources.snapshot import SnapshotExportResource

_DESCRIPTIONS = {
    "vehicles": "Vehicles; Kommo vehicle enums missing here are created by the swap.",
    "clients": "Clients upserted on kommo_contact_id; never deleted.",
    "sales_leads": "Every staged lead ('kommo:' || lead id); leads gone from Kommo are archived.",
    "bookings": "Staged leads except those in the stages Request bot answering, Follow up and Closed - lost "
                "(docs/status-mapping.md); bookings gone from Kommo are deactivated.",
    "booking_vehicles": "The primary vehicle link of each Kommo booking.",
}

# Which apply counters (of the swap and the increment alike) describe which production table.
APPLY_COUNTS = {
    "vehicles": ("vehicles_created",),
    "clients": ("clients_added", "clients_updated"),
    "sales_leads": ("sales_leads_added", "sales_leads_updated", "sales_leads_archived"),
    "bookings": ("bookings_added", "bookings_updated", "bookings_deactivated"),
    "booking_vehicles": ("booking_vehicles_added", "booking_vehicles_removed"),
}

SWAP_ALONE = (
    "kommo_swap (vehicles, clients, sales_leads, bookings, booking_vehicles) applies the staging that the "
    "same run made, and run {run_id} staged nothing, so nothing was done. Materialize the whole kommo group "
    "for the year (or launch kommo_full_refresh_job with that partition); to only look, materialize the "
    "staging assets alone (a dry run)."
)


@dg.multi_asset(
    name="kommo_swap",
    partitions_def=YEARS,
    backfill_policy=dg.BackfillPolicy.multi_run(1),
    specs=[
        dg.AssetSpec(key, deps=list(STAGING_KEYS), group_name=KOMMO_GROUP, kinds={"postgres"},
                     description=_DESCRIPTIONS[table_of(key)], **table_spec_args(key))
        for key in PRODUCTION_KEYS
    ],
)
def kommo_swap(context: dg.AssetExecutionContext, postgres: PostgresResource,
               snapshot_export: SnapshotExportResource):
    """Runs ``run_kommo_full_refresh(run_id)``: one transaction; any error leaves production as it was."""
    window = partition_window(context)
    run_id = import_run_id(context.run)
    with postgres.import_runs() as import_runs:
        staged = import_runs.get(run_id)
    if staged is None:
        # Selected without the staging (the UI lets an operator pick bookings alone): refused before any
        # work, and without opening an import record that would then be left failed.
        raise dg.Failure(description=SWAP_ALONE.format(run_id=run_id), allow_retries=False)
    extra: dict = {}
    with postgres.working_on_run(run_id):
        ensure_live()
        # Before the swap, so what replaced production is on disk even if the swap then fails.
        export = snapshot_export.export(postgres, run_id)
        if export:
            context.log.info(f"Raw snapshot exported: {export.rows} rows, {export.bytes_written} bytes")
            extra["raw_snapshot"] = dg.MetadataValue.json({k: str(p) for k, p in export.files.items()})
        else:
            extra["raw_snapshot"] = dg.MetadataValue.null()  # KOMMO_SNAPSHOT_DIR is not set
        with postgres.import_runs() as import_runs:
            counts = import_runs.swap(run_id)
    context.log.info(f"Swap of run {run_id} committed in {counts['swap_seconds']} s: {counts}")
    pruned = postgres.prune_staging()
    if pruned["runs"]:
        context.log.info(f"Pruned the staging of {pruned['runs']} old runs ({pruned['leads']} leads)")
    extra["staging_pruned_runs"] = pruned["runs"]
    with postgres.connect() as conn:
        live_rows = window_row_counts(conn, window)
    for key in PRODUCTION_KEYS:
        name = table_of(key)
        yield dg.MaterializeResult(
            asset_key=key,
            metadata={
                "import_run_id": run_id,
                "kind": "full_refresh",
                "dagster/row_count": live_rows[name],
                "leads_changed": counts["sales_leads_added"] + counts["sales_leads_updated"],
                "leads_removed": counts["sales_leads_archived"],
                "leads_rederived_all_years": int(counts.get("rederived_leads") or 0),
                **{counter: counts[counter] for counter in APPLY_COUNTS[name]},
                "swap_seconds": float(counts["swap_seconds"]),
                **(extra if name == "bookings" else {}),
            },
        )


@dg.asset(
    key=CALENDAR_VIEW,
    deps=[BOOKINGS, BOOKING_VEHICLES],
    group_name=KOMMO_GROUP,
    kinds={"postgres"},
    description="View of manual calendar events plus active, dated Kommo bookings.",
    **table_spec_args(CALENDAR_VIEW),
)
def calendar_events_expanded(postgres: PostgresResource) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata=calendar_metadata(postgres))


def calendar_metadata(postgres: PostgresResource) -> dict:
    """What the calendar view shows now: its materialization's metadata after a refresh or an increment."""
    with postgres.connect() as conn:
        rows = calendar_counts(conn)
    return {"dagster/row_count": sum(rows.values()), "kommo_bookings": rows.get("kommo_booking", 0),
            "manual_events": rows.get("manual", 0)}
