"""Healing drift: with ``KOMMO_HEAL_DRIFT`` on (off by default), a nightly dry run that found drift in its year
and whose drop guard passed starts a full refresh of that year.

``kommo_drift_alert_sensor`` decides as it alerts, once per dry run (the run key is the dry run's id), and the
alert says what it started or why not. It heals only

- a dry run the nightly dry run schedule launched: one an operator launched by hand is a look, not a change;
- whose drop guard passed (its import record ``succeeded``, ``guard_passed_at`` set); a dry run the guard
  stopped is ``needs_review`` and alerts as such, and nothing heals it;
- whose window is a year in scope (the partition the refresh will run);
- while no full refresh of that year is queued or running: that one repairs the drift;
- unless the last heal of that year failed and no full refresh of the year has succeeded since: a failed heal
  is not retried night after night; the year waits for a person (a full refresh by hand, the button, or the
  nightly full refresh schedule) and the alert says so.

The heal runs with the dry run's ``max_drop_ratio``, so its own drop guard is the one the dry run passed: a
drop in Kommo since then still stops it as ``needs_review``, which alerts like any refresh. A heal is a full
refresh, never a dry run, so it cannot start another heal.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import dagster as dg

from kommo_assets import settings
from kommo_assets.automation.schedules import kommo_nightly_dry_run_schedule
from kommo_assets.db.heal import last_refresh_succeeded_at
from kommo_assets.jobs import REQUESTED_BY_TAG, kommo_full_refresh_job
from kommo_assets.resources.postgres import PostgresResource
from kommo_assets.scope import Window

HEAL_TAG = "kommo/heal"  # "drift" on every full refresh a heal started (a run filter finds them all)
HEAL_OF_TAG = "kommo/heal_of"  # the Dagster run id of the dry run whose drift it heals
HEALER = "kommo_drift_alert_sensor"  # the import record's triggered_by
PARTITION_TAG = "dagster/partition"
SCHEDULE_TAG = "dagster/schedule_name"
NIGHTLY_DRY_RUN = kommo_nightly_dry_run_schedule.name
FULL_REFRESH = kommo_full_refresh_job.name

_QUEUED = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED)
_PENDING = [*_QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
_ENDED_BADLY = {dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@dataclass(frozen=True)
class Heal:
    """What the sensor does about one dry run's drift: the run it requests (None: none) and the alert's words."""

    request: dg.RunRequest | None
    note: str


def heal_run_key(dry_run_id: str) -> str:
    """One heal per dry run: the daemon never launches a second run with the same key for the sensor."""
    return f"kommo-heal-{dry_run_id}"


def _window(record: dict[str, Any]) -> Window | None:
    if record.get("created_from") is None or record.get("created_to") is None:
        return None
    return Window(record["created_from"], record["created_to"])


def decide(instance: dg.DagsterInstance, postgres: PostgresResource, run: dg.DagsterRun,
           record: dict[str, Any], now: datetime | None = None) -> Heal:
    """Whether the drift a succeeded dry run ``run`` (import record ``record``) found is healed, with
    ``KOMMO_HEAL_DRIFT`` on; the caller has read the flag."""
    if run.tags.get(SCHEDULE_TAG) != NIGHTLY_DRY_RUN:
        return Heal(None, f"not started: this dry run was not launched by {NIGHTLY_DRY_RUN} (KOMMO_HEAL_DRIFT "
                          "heals the nightly dry runs only); run a full refresh of the year to repair it.")
    if record.get("status") != "succeeded" or record.get("guard_passed_at") is None:
        return Heal(None, f"not started: the dry run's drop guard did not pass (import status "
                          f"{record.get('status')}); KOMMO_HEAL_DRIFT heals only a drift that passes it.")
    window = _window(record)
    scope = settings.refresh_scope()
    if window is None or window.year is None or not scope.contains(window.year, now):
        key = window.key if window else "unknown"
        return Heal(None, f"not started: the dry run's window {key} is not a year in scope "
                          f"(KOMMO_REFRESH_YEARS={scope}).")
    year = str(window.year)

    pending = instance.get_runs(filters=dg.RunsFilter(job_name=FULL_REFRESH, tags={PARTITION_TAG: year},
                                                      statuses=_PENDING), limit=1)
    if pending:
        state = "queued" if pending[0].status in _QUEUED else "running"
        return Heal(None, f"not started: a full refresh of {year} is already {state} (run {pending[0].run_id}); "
                          "it repairs the drift.")

    last = instance.get_run_records(filters=dg.RunsFilter(job_name=FULL_REFRESH,
                                                          tags={HEAL_TAG: "drift", PARTITION_TAG: year}), limit=1)
    if last and last[0].dagster_run.status in _ENDED_BADLY:
        failed = last[0]
        with postgres.connect() as conn:
            succeeded_at = last_refresh_succeeded_at(conn, window)
        if succeeded_at is None or succeeded_at <= failed.create_timestamp:
            return Heal(None, f"not started: the last heal of {year} (run {failed.dagster_run.run_id}) ended "
                              f"{failed.dagster_run.status.value.lower()} and no full refresh of {year} has "
                              f"succeeded since. A failed heal is not retried: read that run, fix the cause, "
                              f"then run a full refresh of {year}; healing goes on after it succeeds.")

    request = dg.RunRequest(
        run_key=heal_run_key(run.run_id),
        job_name=FULL_REFRESH,
        partition_key=year,
        run_config={"ops": {"kommo_staging": {"config": {"max_drop_ratio": float(record["max_drop_ratio"])}}}},
        tags={HEAL_TAG: "drift", HEAL_OF_TAG: run.run_id, REQUESTED_BY_TAG: HEALER},
    )
    return Heal(request, f"a full refresh of {year} was requested to repair it (KOMMO_HEAL_DRIFT is on); it "
                         "checks the drop guard again and alerts if it fails. A failed heal is not retried.")


def failure_note(run: dg.DagsterRun, record: dict[str, Any] | None) -> str | None:
    """The alert's heal line for a failed run: a heal that failed (whatever the flag says now), or a nightly
    dry run that did not succeed while the flag is on; None otherwise."""
    if run.tags.get(HEAL_TAG):
        year = run.tags.get(PARTITION_TAG, "its year")
        return (f"this full refresh was started by KOMMO_HEAL_DRIFT for the drift of dry run "
                f"{run.tags.get(HEAL_OF_TAG, 'unknown')}. It is not retried: the nightly dry run heals {year} "
                f"again only after a full refresh of {year} has succeeded.")
    if run.tags.get(SCHEDULE_TAG) != NIGHTLY_DRY_RUN:
        return None
    try:
        if not settings.heal_drift_enabled():
            return None
    except settings.ConfigError as exc:  # the drift sensor reports it; the failure alert goes out regardless
        return f"not started: {exc}"
    status = record.get("status") if record else None
    ended = f"ended {status}" if status else "failed before its import started"
    return (f"not started: KOMMO_HEAL_DRIFT heals only a nightly dry run that succeeded with its drop guard "
            f"passed; this one {ended}.")
