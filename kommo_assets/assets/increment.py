"""The incremental sync: what changed in Kommo since the cursor, staged and applied in one transaction, and
the freshness check on bookings that the syncs, their sensor and the full refreshes keep passing.

The increment is one asset (``kommo_increment``, group ``kommo_sync``, fed by ``kommo_api``) so that it
never joins a full refresh's selection; each run also records a materialization of every production table
it applied to, with its counts, so their history in the UI shows increments beside refreshes.
"""

from dataclasses import asdict, dataclass
from datetime import timedelta

import dagster as dg

from kommo_assets import settings
from kommo_assets.assets.common import (
    APPLY_COUNTS,
    CALENDAR_VIEW,
    KOMMO_API,
    KOMMO_POOL,
    PRODUCTION_KEYS,
    REQUESTED_BY_TAG,
    ensure_live,
    working_on_run,
)
from kommo_assets.db import increment
from kommo_assets.db.runs import window_for
from kommo_assets.reporting import preview_markdown, preview_summary
from kommo_assets.resources.kommo import KommoResource
from kommo_assets.resources.postgres import PostgresResource, import_run_id
from kommo_assets.resources.sync import KommoSyncResource
from kommo_assets.settings import ConfigError

INCREMENT = dg.AssetKey("kommo_increment")
SYNC_GROUP = "kommo_sync"
BOOKINGS = dg.AssetKey("bookings")
FRESHNESS_CHECK = "bookings_fresh"



def sync_windows() -> list:
    """The creation windows the sync covers: one per year of ``KOMMO_REFRESH_YEARS``."""
    try:
        return [window_for(year) for year in settings.refresh_years()]
    except ConfigError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None


@dg.asset(
    key=INCREMENT,
    deps=[KOMMO_API],
    group_name=SYNC_GROUP,
    kinds={"postgres"},
    description="What changed in Kommo since the sync cursor (leads of the KOMMO_REFRESH_YEARS windows, "
    "deletions, contacts), staged and applied to vehicles / clients / sales_leads / bookings / "
    "booking_vehicles in one transaction with the full refresh's rules; the cursor moves in the same "
    "transaction. More than KOMMO_SYNC_MAX_DEACTIVATIONS deactivations stop it as needs_review.",
    # It reads Kommo: an ad-hoc materialization queues behind a refresh as the staging asset's does.
    pool=KOMMO_POOL,
)
def kommo_increment(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    kommo: KommoResource,
    kommo_sync: KommoSyncResource,
) -> dg.MaterializeResult:
    ensure_live()
    windows = sync_windows()
    run_id = import_run_id(context.run)
    with working_on_run(postgres, run_id, kommo.secrets()):
        with postgres.import_runs() as import_runs:
            import_runs.start(
                run_id=run_id, dagster_run_id=context.run_id, job_name=context.job_name,
                triggered_by=context.run.tags.get(REQUESTED_BY_TAG), dry_run=False, window=None,
                max_drop_ratio=0, kind="increment",
            )
        with postgres.import_runs() as import_runs:
            cursor = import_runs.sync_cursor()
        if cursor is None:
            raise dg.Failure(description="No full refresh has succeeded yet, so the sync has no starting point: "
                             "run kommo_full_refresh_job first.", allow_retries=False)
        context.log.info(f"Kommo increment {run_id}: changes since {cursor.isoformat()} (Kommo's clock)")
        with kommo.client() as client, postgres.connect() as conn:
            result = increment.stage_increment(conn, run_id, client, cursor, windows)
            stats = {**result.as_metadata(), "client": asdict(client.stats)}
        with postgres.import_runs() as import_runs:
            import_runs.mark_staged(run_id, stats)
            import_runs.set_kommo_clock(run_id, result.sync_to)
            increment.record_sync_range(import_runs.conn, run_id, result)
        with postgres.import_runs() as import_runs:
            counts = import_runs.apply_increment(run_id, result.sync_to, kommo_sync.max_deactivations)
        with postgres.import_runs() as import_runs:
            record = import_runs.get(run_id) or {}
    preview = record.get("change_preview")
    if counts.get("status") == "needs_review":
        raise dg.Failure(
            description=record.get("error") or "the increment needs review: too many bookings to deactivate",
            metadata={"change_preview": dg.MetadataValue.md(preview_markdown(preview))},
            allow_retries=False,
        )
    context.log.info(f"Kommo increment {run_id} applied ({preview_summary(preview)}): {counts}")
    postgres.prune_staging()  # staging and run records past their retention (an increment a minute adds up)
    common = {"import_run_id": run_id, "sync_from": result.sync_from.isoformat(),
              "sync_to": result.sync_to.isoformat()}
    for key in PRODUCTION_KEYS:
        name = key.path[-1]
        context.log_event(dg.AssetMaterialization(
            asset_key=key,
            description="Kommo incremental sync",
            metadata={**common, "kind": "increment", **{c: counts.get(c, 0) for c in APPLY_COUNTS[name]}},
        ))
    context.log_event(dg.AssetMaterialization(
        asset_key=CALENDAR_VIEW, description="Kommo incremental sync", metadata={**common, "kind": "increment"},
    ))
    return dg.MaterializeResult(metadata={
        **common,
        "leads": result.leads,
        "removals": result.removals,
        "contacts": result.contacts,
        "kommo_requests": stats["client"]["requests"],
        "skipped": dg.MetadataValue.json(dict(result.skipped)),
        "change_counts": dg.MetadataValue.json({k: v for k, v in (preview or {}).items() if k != "samples"}),
        "change_preview": dg.MetadataValue.md(preview_markdown(preview)),
        "apply": dg.MetadataValue.json({k: v for k, v in counts.items()}),
    })


@dataclass(frozen=True)
class Freshness:
    """The freshness check's verdict: passed, what it says, its metadata."""

    passed: bool
    description: str
    metadata: dict

    def result(self) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(check_name=FRESHNESS_CHECK, asset_key=BOOKINGS, passed=self.passed,
                                   metadata=self.metadata, description=self.description)

    def evaluation(self) -> dg.AssetCheckEvaluation:
        """The same verdict as an event a sensor reports (no run needed)."""
        return dg.AssetCheckEvaluation(
            asset_key=BOOKINGS, check_name=FRESHNESS_CHECK, passed=self.passed, description=self.description,
            metadata=self.metadata, severity=dg.AssetCheckSeverity.ERROR,
        )


def freshness(postgres: PostgresResource, minutes: float) -> Freshness:
    """Whether a successful sync, an idle probe of the sensor or a full refresh covered the last ``minutes``
    (the database's clock on both sides)."""
    with postgres.connect() as conn:
        covered = increment.covered_at(conn)
        now = conn.execute("SELECT now()").fetchone()[0]
    age = None if covered is None else now - covered
    passed = age is not None and age <= timedelta(minutes=minutes)
    metadata = {
        "covered_at": covered.isoformat() if covered else "never",
        "age_minutes": round(age.total_seconds() / 60, 2) if age is not None else -1,
        "max_minutes": float(minutes),
    }
    if passed:
        description = f"bookings are up to date with Kommo as of {covered.isoformat()}"
    elif covered is None:
        description = "no successful sync or refresh has covered bookings yet"
    else:
        description = (f"bookings were last brought up to date {metadata['age_minutes']} minutes ago, more than "
                       f"KOMMO_FRESHNESS_MINUTES={minutes:g}")
    return Freshness(passed, description, metadata)


@dg.asset_check(
    asset=BOOKINGS,
    name=FRESHNESS_CHECK,
    description="Fails when no successful incremental sync, idle probe of kommo_incremental_sync_sensor or "
    "full refresh has covered the last KOMMO_FRESHNESS_MINUTES (default 10). The sensor reports it on its "
    "ticks; it can also be executed from here.",
)
def bookings_fresh(postgres: PostgresResource, kommo_sync: KommoSyncResource) -> dg.AssetCheckResult:
    return freshness(postgres, kommo_sync.freshness_minutes).result()
