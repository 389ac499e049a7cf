"""The incremental sync: what changed in Kommo since the cursor, staged and applied in one transaction, and
the freshness check on bookings that the syncs, their sensor and the full refreshes keep passing.

The increment is one asset (``kommo_increment``, group ``kommo_sync``, fed by ``kommo/api``) so that it
never joins a full refresh's selection; each run also records a materialization of every production table
it applied to, with its counts, so their history in the UI shows increments beside refreshes.
"""

from dataclasses import asdict, dataclass
from datetime import timedelta

import dagster as dg

from kommo_assets import settings
from kommo_assets.assets.catalog import (
    BOOKINGS,
    CALENDAR_VIEW,
    INCREMENT,
    KOMMO_API,
    MIRROR_CHECK_KEY,
    OWNERS,
    PRODUCTION_KEYS,
    SYNC_GROUP,
    timestamp,
)
from kommo_assets.assets.live import ensure_live
from kommo_assets.assets.partitions import YEARS, partition_window
from kommo_assets.assets.production import calendar_metadata
from kommo_assets.db import increment, windows
from kommo_assets.jobs import KOMMO_POOL, REQUESTED_BY_TAG
from kommo_assets.reporting import drift_count, preview_markdown, preview_summary
from kommo_assets.resources.kommo import KommoResource
from kommo_assets.resources.postgres import PostgresResource, import_run_id
from kommo_assets.resources.sync import KommoSyncResource
from kommo_assets.scope import YearScope
from kommo_assets.settings import ConfigError

FRESHNESS_CHECK = "bookings_fresh"
MIRROR_CHECK = MIRROR_CHECK_KEY.name


def sync_scope() -> YearScope:
    """The years the sync covers (``KOMMO_REFRESH_YEARS``); a value it cannot read fails the run naming it."""
    try:
        return settings.refresh_scope()
    except ConfigError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None


@dg.asset(
    key=INCREMENT,
    deps=[KOMMO_API],
    group_name=SYNC_GROUP,
    kinds={"postgres"},
    description="What changed in Kommo since each window's coverage (leads created in the years of "
    "KOMMO_REFRESH_YEARS, their deletions and contacts; a year never read is read from its first second), "
    "staged and applied to vehicles / clients / sales_leads / bookings / booking_vehicles in one transaction "
    "with the full refresh's rules; the coverage moves in the same transaction. Each year it changed is "
    "reported as a materialization of that partition of the production tables. More than "
    "KOMMO_SYNC_MAX_DEACTIVATIONS deactivations stop it as needs_review.",
    # It reads Kommo: an ad-hoc materialization queues behind a refresh as the staging asset's does.
    pool=KOMMO_POOL,
    owners=OWNERS,
)
def kommo_increment(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    kommo: KommoResource,
    kommo_sync: KommoSyncResource,
) -> dg.MaterializeResult:
    ensure_live()
    scope = sync_scope()
    run_id = import_run_id(context.run)
    with postgres.working_on_run(run_id, kommo.secrets()):
        with postgres.import_runs() as import_runs:
            import_runs.start(
                run_id=run_id, dagster_run_id=context.run_id, job_name=context.job_name,
                triggered_by=context.run.tags.get(REQUESTED_BY_TAG), dry_run=False, window=None,
                max_drop_ratio=0, kind="increment",
            )
        with kommo.client() as client, postgres.connect() as conn:
            result = increment.stage_increment(conn, run_id, client, scope)
            stats = {**result.as_metadata(), "client": asdict(client.stats)}
        context.log.info(f"Kommo increment {run_id}: changes since {result.sync_from.isoformat()} (Kommo's clock) "
                         f"to leads created in {', '.join(w.key for w in result.windows)}")
        with postgres.import_runs() as import_runs:
            import_runs.mark_staged(run_id, stats)
            import_runs.set_kommo_clock(run_id, result.sync_to)
            increment.record_sync_range(import_runs.conn, run_id, result)
        with postgres.import_runs() as import_runs:
            counts = import_runs.apply_increment(run_id, result.sync_to, kommo_sync.max_deactivations,
                                                 result.windows)
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
    _report_partitions(context, postgres, run_id, result, int(counts.get("rederived_leads") or 0))
    return dg.MaterializeResult(metadata={
        "import_run_id": run_id,
        "sync_from": timestamp(result.sync_from),
        "sync_to": timestamp(result.sync_to),
        "windows": dg.MetadataValue.json([w.key for w in result.windows]),
        "leads": result.leads,
        "removals": result.removals,
        "contacts": result.contacts,
        "kommo_requests": stats["client"]["requests"],
        "skipped": dg.MetadataValue.json(dict(result.skipped)),
        "change_counts": dg.MetadataValue.json({k: v for k, v in (preview or {}).items() if k != "samples"}),
        "change_preview": dg.MetadataValue.md(preview_markdown(preview)),
        "apply": dg.MetadataValue.json({k: v for k, v in counts.items()}),
    })


def _report_partitions(context: dg.AssetExecutionContext, postgres: PostgresResource, run_id: str,
                       result: increment.IncrementResult, rederived: int) -> None:
    """A materialization of each production table's partition for every year the increment changed, with what
    changed in it and the same row count a refresh of that year reports. Leads re-derived for a mapping or
    option change may be of any year: then every year in scope is reported."""
    with postgres.connect() as conn:
        changed = windows.increment_changes_by_window(conn, run_id, result.windows)
        if rederived:
            for w in result.windows:
                changed.setdefault(w.key, {"leads_changed": 0, "leads_removed": 0})
        rows = {w.key: windows.window_row_counts(conn, w) for w in result.windows if w.key in changed}
    for key, changes in changed.items():
        for asset in PRODUCTION_KEYS:
            context.log_event(dg.AssetMaterialization(
                asset_key=asset, partition=key, description="Kommo incremental sync",
                metadata={"import_run_id": run_id, "kind": "increment",
                          "dagster/row_count": rows[key][asset.path[-1]],
                          **changes, "leads_rederived_all_years": rederived},
            ))
    if changed:
        context.log_event(dg.AssetMaterialization(
            asset_key=CALENDAR_VIEW, description="Kommo incremental sync", metadata=calendar_metadata(postgres),
        ))


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


def freshness(postgres: PostgresResource, minutes: float, scope: YearScope | None = None) -> Freshness:
    """Whether every window in scope has been read at least once (its coverage), and a successful sync, an idle
    probe of the sensor or a full refresh covered the last ``minutes`` (the database's clock on both sides)."""
    scope = scope or sync_scope()
    with postgres.connect() as conn:
        covered, now = increment.covered_at(conn)
        uncovered = windows.uncovered_windows(conn, scope.windows())
    age = None if covered is None else now - covered
    passed = not uncovered and age is not None and age <= timedelta(minutes=minutes)
    metadata = {
        "covered_at": timestamp(covered),
        "age_minutes": dg.MetadataValue.null() if age is None else round(age.total_seconds() / 60, 2),
        "max_minutes": float(minutes),
        "windows_not_covered": dg.MetadataValue.json([w.key for w in uncovered]),
    }
    if uncovered:
        description = (f"year(s) {', '.join(w.key for w in uncovered)} of KOMMO_REFRESH_YEARS have never been "
                       "read from Kommo: the incremental sync imports them whole on its next run")
    elif passed:
        description = f"bookings are up to date with Kommo as of {covered.isoformat()}"
    elif covered is None:
        description = "no successful sync or refresh has covered bookings yet"
    else:
        description = (f"bookings were last brought up to date {round(age.total_seconds() / 60, 2)} minutes ago, "
                       f"more than KOMMO_FRESHNESS_MINUTES={minutes:g}")
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


@dg.asset_check(
    asset=BOOKINGS,
    name=MIRROR_CHECK,
    partitions_def=YEARS,
    description="The local drift check of a year: production against the mapping rules applied to the "
    "current-state mirror (the latest Kommo state of every lead and contact the import has read), counted as "
    "the change preview counts a swap, without asking Kommo. Fails while any row differs: a write to "
    "production outside the import, or a mapping edit no sync has applied yet. Runs in the nightly dry run "
    "of each year; can also be executed from here for any year.",
)
def bookings_follow_mirror(context: dg.AssetCheckExecutionContext, postgres: PostgresResource
                           ) -> dg.AssetCheckResult:
    window = partition_window(context)
    with postgres.connect() as conn:
        uncovered = windows.uncovered_windows(conn, [window])
        pending = windows.rules_changed(conn)
        preview = None if uncovered else windows.mirror_drift(conn, window)
    metadata = {"rules_not_applied": len(pending)}
    if uncovered:
        return dg.AssetCheckResult(
            passed=False, severity=dg.AssetCheckSeverity.WARN, metadata={**metadata, "drift": dg.MetadataValue.null()},
            description=f"{window.key} has never been read from Kommo: the mirror holds nothing of it to compare "
            "with yet (bookings_fresh fails until the sync has imported it)")
    drift = drift_count(preview)
    metadata |= {"drift": drift,
                 "change_counts": dg.MetadataValue.json({k: v for k, v in preview.items() if k != "samples"}),
                 "change_preview": dg.MetadataValue.md(preview_markdown(preview))}
    if not drift:
        description = f"production follows the mirror in {window.key}"
    else:
        description = f"{drift} production row(s) of {window.key} differ from the rules applied to the mirror"
        if pending:
            description += (f"; {len(pending)} mapping or option change(s) are not applied yet: the next sync "
                            "re-derives them")
    return dg.AssetCheckResult(passed=drift == 0, metadata=metadata, description=description)
