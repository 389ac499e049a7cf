"""When a Kommo run starts or ends: close its import record, answer its refresh request, alert Slack.

A run that ends (success, failure, cancel) with its ``kommo_import_runs`` row still ``running`` was cut
short (killed step, cancel, crash): the row is closed as failed, so it says so even if no other import
starts (the next start would close it too). The request row named by the ``kommo/request_id`` tag gets
the run id, final status and counts. Failures, which include needs_review runs (the blocking drop guard
fails the run), post one Slack message each when ``KOMMO_ENABLE_SLACK_ALERTS`` is on.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dagster as dg

from kommo_assets import settings
from kommo_assets.automation import drift_heal
from kommo_assets.automation.slack_alerts import RunAlert, drift_message, failure_message
from kommo_assets.db import refresh_requests, runs
from kommo_assets.jobs import DRY_RUN_JOB, REQUEST_ID_TAG, REQUESTED_BY_TAG, kommo_full_refresh_job
from kommo_assets.resources.postgres import PostgresResource, import_run_id
from kommo_assets.resources.slack import KommoSlackResource
from kommo_assets.scope import Window

# None = every job of this code location: the two Kommo jobs and also the ad-hoc asset job that the UI's
# Materialize button launches, whose runs open import records just the same.
MONITORED_JOBS = None


def request_id_of(run: dg.DagsterRun) -> int | None:
    raw = run.tags.get(REQUEST_ID_TAG)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class RunEnd:
    import_run: dict[str, Any] | None
    request: dict[str, Any] | None
    closed_by_sensor: bool


def record_run_end(postgres: PostgresResource, run: dg.DagsterRun, dagster_status: str, error: str | None,
                   secrets: Iterable[str] = ()) -> RunEnd:
    """Closes a still-running import as failed, then copies the outcome onto the run's request."""
    import_id = import_run_id(run)
    secrets = [*postgres.secrets(), *secrets]
    reason = f"Dagster run ended ({dagster_status}) before the import closed"
    closed = postgres.close_run(import_id, "failed", f"{reason}: {error}" if error else reason, secrets)
    with postgres.import_runs() as import_runs:
        record = import_runs.get(import_id)
    request = None
    request_id = request_id_of(run)
    if request_id is not None:
        # Used only when the import record has no error of its own (or there is no record at all).
        fallback = error or f"Dagster run ended ({dagster_status}) without a finished import"
        request = refresh_requests.record_finished(
            postgres.database_url, request_id, dagster_run_id=run.run_id, import_run_id=import_id,
            error=runs.safe_error(fallback, secrets),
        )
    return RunEnd(import_run=record, request=request, closed_by_sensor=closed)


def _log_run_end(context: dg.RunStatusSensorContext, end: RunEnd, dagster_status: str) -> None:
    run = context.dagster_run
    status = end.import_run["status"] if end.import_run else "none"
    closed = " (closed by this sensor)" if end.closed_by_sensor else ""
    context.log.info(f"Run {run.run_id} of {run.job_name} ended {dagster_status}; import status {status}{closed}")
    if end.request:
        context.log.info(f"Refresh request #{end.request['id']} is now {end.request['status']}")


def _on_run_end(context: dg.RunStatusSensorContext, postgres: PostgresResource, dagster_status: str) -> None:
    # Returns None, so one tick handles every run that ended since the cursor.
    end = record_run_end(postgres, context.dagster_run, dagster_status, None)
    _log_run_end(context, end, dagster_status)


_DEFAULTS = dict(monitored_jobs=MONITORED_JOBS, default_status=dg.DefaultSensorStatus.RUNNING)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.STARTED,
    name="kommo_run_started_sensor",
    description="Marks the refresh request of a starting run as running.",
    **_DEFAULTS,
)
def kommo_run_started_sensor(context: dg.RunStatusSensorContext, postgres: PostgresResource) -> None:
    request_id = request_id_of(context.dagster_run)
    if request_id is not None and refresh_requests.mark_started(postgres.database_url, request_id,
                                                             context.dagster_run.run_id):
        context.log.info(f"Refresh request #{request_id} is running as run {context.dagster_run.run_id}")


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    name="kommo_run_succeeded_sensor",
    description="Closes a succeeded run's import record if still open and writes the result to its request.",
    **_DEFAULTS,
)
def kommo_run_succeeded_sensor(context: dg.RunStatusSensorContext, postgres: PostgresResource) -> None:
    _on_run_end(context, postgres, "SUCCESS")


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.CANCELED,
    name="kommo_run_canceled_sensor",
    description="Closes a canceled run's import record as failed and writes the result to its request.",
    **_DEFAULTS,
)
def kommo_run_canceled_sensor(context: dg.RunStatusSensorContext, postgres: PostgresResource) -> None:
    _on_run_end(context, postgres, "CANCELED")


def dagster_error(context: dg.RunFailureSensorContext) -> str | None:
    """What Dagster says went wrong: the first failed step's error, else the run failure message and its
    root cause."""
    for event in context.get_step_failure_events():
        error = getattr(event.event_specific_data, "error", None)
        if error is not None:
            message = error.message.strip()
            # "dagster._core.definitions.events.Failure: text" -> "Failure: text"
            head, sep, rest = message.partition(": ")
            if sep and error.cls_name and head.endswith(error.cls_name):
                message = f"{error.cls_name}: {rest}"
            return f"step {event.step_key} failed: {message}"
    failure = context.failure_event
    if failure is None:
        return None
    error = getattr(failure.event_specific_data, "error", None)
    if error is None:
        return failure.message
    # A run that failed before any step (a resource refusing its configuration): the root cause says why.
    while error.cause is not None:
        error = error.cause
    return f"{failure.message} {error.message.strip()}"


@dg.run_failure_sensor(
    name="kommo_run_failure_sensor",
    description="Closes a failed run's import record if still open, writes the result to its request and, "
    "when KOMMO_ENABLE_SLACK_ALERTS is on, posts one Slack message per failed or needs_review run.",
    **_DEFAULTS,
)
def kommo_run_failure_sensor(
    context: dg.RunFailureSensorContext, postgres: PostgresResource, slack: KommoSlackResource
) -> None:
    run = context.dagster_run
    secrets = [*postgres.secrets(), *slack.secrets()]
    error = dagster_error(context)
    bookkeeping_error: Exception | None = None
    end = RunEnd(import_run=None, request=None, closed_by_sensor=False)
    try:
        end = record_run_end(postgres, run, "FAILURE", error, secrets)
        _log_run_end(context, end, "FAILURE")
    except Exception as exc:  # still alert, then fail the tick with the real error below
        bookkeeping_error = exc

    if slack.enabled:
        alert = RunAlert(
            run_id=run.run_id,
            job_name=run.job_name,
            import_run=end.import_run,
            error=error,
            requested_by=run.tags.get(REQUESTED_BY_TAG),
            request_id=run.tags.get(REQUEST_ID_TAG),
            bookkeeping_failed=bookkeeping_error is not None,
            heal_note=drift_heal.failure_note(run, end.import_run),
        )
        slack.post_message(failure_message(alert, slack.webserver_url, secrets))
        context.log.info(f"Posted a Slack alert for run {run.run_id}")
    if bookkeeping_error is not None:
        raise bookkeeping_error


def drift_of(import_run: dict[str, Any] | None) -> int | None:
    """The drift a dry run recorded (``stats.drift``); None when it recorded none."""
    if not import_run or import_run.get("kind", "dry_run") != "dry_run":
        return None
    drift = (import_run.get("stats") or {}).get("drift")
    return None if drift is None else int(drift)


def window_key(import_run: dict[str, Any] | None) -> str | None:
    """The window of an import record as its partition key (its year), None without one."""
    if not import_run or import_run.get("created_from") is None or import_run.get("created_to") is None:
        return None
    return Window(import_run["created_from"], import_run["created_to"]).key


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    name="kommo_drift_alert_sensor",
    description="When a dry run succeeds with drift (rows a full refresh would still change after the "
    "incremental syncs) other than 0 in its year, posts one Slack message (KOMMO_ENABLE_SLACK_ALERTS). With "
    "KOMMO_HEAL_DRIFT on, a nightly dry run's drift that passed the drop guard starts a full refresh of that "
    "year, once per dry run, and the message says so or why not.",
    monitored_jobs=None,
    request_job=kommo_full_refresh_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def kommo_drift_alert_sensor(
    context: dg.RunStatusSensorContext, postgres: PostgresResource, slack: KommoSlackResource
) -> dg.RunRequest | None:
    # Returns None but for a heal, so one tick handles every dry run that ended since the cursor; a tick that
    # requests a heal ends there and the next one goes on.
    run = context.dagster_run
    if run.job_name != DRY_RUN_JOB:
        return None
    with postgres.import_runs() as import_runs:
        record = import_runs.get(import_run_id(run))
    drift = drift_of(record)
    year = window_key(record)
    # Read on every dry run, so a bad value shows on the first tick rather than the first drift. An error
    # raised here fails the tick but moves the cursor on: the alert goes out first, naming the variable.
    error: Exception | None = None
    try:
        heal_on = settings.heal_drift_enabled()
    except settings.ConfigError as exc:
        heal_on, error = False, exc
    if not drift:
        context.log.info(f"Dry run {run.run_id} ({year}): drift {drift}")
        if error is not None:
            raise error
        return None
    context.log.warning(f"Dry run {run.run_id} ({year}): drift {drift} (should be 0)")
    heal = drift_heal.Heal(None, f"not started: {error}") if error is not None else None
    if heal_on:
        try:
            heal = drift_heal.decide(context.instance, postgres, run, record)
        except Exception as exc:  # still alert, then fail the tick with the real error below
            heal, error = drift_heal.Heal(None, f"not started: {runs.safe_error(exc, postgres.secrets())}"), exc
    if heal is not None:
        context.log.info(f"Heal of {year}: {heal.note}")
    if slack.enabled:
        slack.post_message(drift_message(run.run_id, record, drift, slack.webserver_url, year=year,
                                         heal_note=heal.note if heal else None,
                                         healing=bool(heal and heal.request)))
        context.log.info(f"Posted a Slack drift alert for run {run.run_id}")
    if error is not None:
        raise error
    return heal.request if heal else None
