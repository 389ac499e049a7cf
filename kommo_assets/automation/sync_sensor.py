"""The incremental sync's trigger: each tick asks Kommo whether anything changed since the cursor and starts
``kommo_incremental_sync_job`` only when something did, so an idle day adds no runs.

A tick asks nothing while the live flag is off, while any Kommo import (a refresh, a dry run or an
increment) runs or waits in the queue, or while the last increment stopped as ``needs_review`` or keeps
failing; an import whose process is gone does not count as running. A year never read, or a mapping edit
not applied yet, starts a sync without asking Kommo. Otherwise it probes with at most 3
requests, on a budget of its own (each request gives up after a few seconds, none is retried: a 429, 5xx or
timeout skips the tick and says why); a probe that finds nothing is recorded (``kommo_sync_state.updated_at``)
and so counts as a sync for the freshness check. Every tick also reports the ``bookings_fresh`` check when its
verdict changes, and at least every half freshness period.
"""

import json
import time

import dagster as dg

from kommo_assets import settings
from kommo_assets.assets.increment import freshness
from kommo_assets.db import increment, windows
from kommo_assets.jobs import REFRESH_TAG, kommo_incremental_sync_job
from kommo_assets.kommo import KommoUnavailableError
from kommo_assets.resources.kommo import KommoResource
from kommo_assets.resources.postgres import PostgresResource
from kommo_assets.resources.sync import KommoSyncResource
from kommo_assets.settings import LIVE_DISABLED_REASON

SENSOR_NAME = "kommo_incremental_sync_sensor"
RUN_KEY_PREFIX = "kommo-sync-"
_ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
           dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def sync_run_key(cursor_epoch: int, clock_epoch: int) -> str:
    """From the cursor the run starts at and Kommo's clock when the change was seen: a repeated tick never
    starts a second run for the same change, and a failed run's successor gets a key of its own."""
    return f"{RUN_KEY_PREFIX}{cursor_epoch}-{clock_epoch}"


def active_kommo_run(instance: dg.DagsterInstance) -> dg.DagsterRun | None:
    """A run of this instance that reads Kommo (the kommo/refresh tag) and is queued or running."""
    records = instance.get_run_records(
        dg.RunsFilter(statuses=_ACTIVE, tags={REFRESH_TAG: "kommo"}), limit=1
    )
    return records[0].dagster_run if records else None


def _freshness_events(postgres: PostgresResource, minutes: float, state: dict, now: float) -> list:
    """The bookings_fresh verdict, when it changed or was last reported half a freshness period ago."""
    verdict = freshness(postgres, minutes)
    due = state.get("fresh") is not verdict.passed or now - state.get("reported_at", 0) >= minutes * 30
    if not due:
        return []
    state.update(fresh=verdict.passed, reported_at=now)
    return [verdict.evaluation()]


@dg.sensor(
    name=SENSOR_NAME,
    target=kommo_incremental_sync_job,
    minimum_interval_seconds=settings.sync_interval_seconds(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Every KOMMO_SYNC_INTERVAL_SECONDS (default 60): unless the live flag is off or a Kommo run is "
    "queued or running, asks Kommo in at most 3 requests whether leads, contacts or lead deletions changed "
    "since the sync cursor, and starts kommo_incremental_sync_job only if they did. Reports the "
    "bookings_fresh check.",
)
def kommo_incremental_sync_sensor(
    context: dg.SensorEvaluationContext,
    postgres: PostgresResource,
    kommo: KommoResource,
    kommo_sync: KommoSyncResource,
) -> dg.SensorResult:
    state = json.loads(context.cursor) if context.cursor else {}
    now = time.time()

    def result(skip: str | None = None, runs: list | None = None) -> dg.SensorResult:
        events = _freshness_events(postgres, kommo_sync.freshness_minutes, state, now)
        return dg.SensorResult(run_requests=runs or [], skip_reason=dg.SkipReason(skip) if skip else None,
                               asset_events=events, cursor=json.dumps(state, sort_keys=True))

    if not settings.live_enabled():
        return result(LIVE_DISABLED_REASON)
    busy = active_kommo_run(context.instance)
    if busy is not None:
        return result(f"run {busy.run_id} of {busy.job_name} is {busy.status.value}: Kommo is not asked meanwhile")
    scope = settings.refresh_scope()
    in_scope = scope.windows()
    if not in_scope:
        return result(f"No year of KOMMO_REFRESH_YEARS={scope} has begun: nothing to sync.")
    with postgres.connect() as conn:
        running = increment.import_running(conn)
        hold = None if running else increment.sync_hold(conn, float(settings.sync_interval_seconds()), in_scope)
        uncovered = windows.uncovered_windows(conn, in_scope)
        cursor = windows.sync_cursor(conn, in_scope)
        seen = increment.margin_seen(conn)
        rules = windows.rules_changed(conn)
    if running:
        return result(f"Kommo import {running} is running: Kommo is not asked meanwhile")
    if hold:
        return result(f"Not syncing: {hold}.")
    if uncovered:
        # A year that joined the scope (a new year at its first second, or a wider KOMMO_REFRESH_YEARS) has
        # never been read: the sync imports it whole, from its first second, without asking first.
        keys = ", ".join(w.key for w in uncovered)
        context.log.info(f"Year(s) {keys} never read from Kommo: starting a sync that imports them whole")
        return result(runs=[dg.RunRequest(run_key=sync_run_key(int(cursor.timestamp()), int(now)))])
    if rules:
        # A mapping edit (kommo_source_map, kommo_status_map, kommo_user_map) changes no lead in Kommo: the
        # sync re-derives the leads it reaches from the current-state mirror, without asking Kommo first.
        context.log.info(f"{len(rules)} mapping change(s) not applied to production yet: starting a sync that "
                         "re-derives the leads they reach")
        return result(runs=[dg.RunRequest(run_key=sync_run_key(int(cursor.timestamp()), int(now)))])
    try:
        with kommo.probe_client() as client:
            probe = increment.probe_changes(client, cursor, seen)
    except KommoUnavailableError as exc:
        return result(f"Kommo did not answer the probe within its budget, skipping this tick: {exc}")
    if not probe.anything:
        with postgres.connect() as conn:
            increment.record_idle_tick(conn, probe)
        return result(f"Nothing changed in Kommo since {cursor.isoformat()} ({probe.requests} requests).")
    clock = probe.clock.timestamp() if probe.clock else now
    context.log.info(f"Kommo changed since {cursor.isoformat()} ({', '.join(probe.changed)}): starting a sync")
    return result(runs=[dg.RunRequest(run_key=sync_run_key(int(cursor.timestamp()), int(clock)))])
