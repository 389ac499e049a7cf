"""The nightly schedules: a dry run that is on by default (a drop shows up as a needs_review alert, drift as a
drift alert, and with KOMMO_HEAL_DRIFT on a drift that passed the drop guard starts a full refresh of its year:
``automation/drift_heal.py``) and a full refresh that is defined but off until an operator turns it on. Each tick runs every year in scope
(``KOMMO_REFRESH_YEARS``), one run per partition; the kommo pool runs them one at a time, oldest first.

Cron and timezone come from the environment when the code location loads; a value Dagster cannot read
stops the load with a ConfigError naming the variable. While KOMMO_ENABLE_LIVE is off a tick is skipped
with that reason instead of starting a run that can only fail.
"""

from collections.abc import Iterator, Mapping

import dagster as dg

from kommo_assets import settings
from kommo_assets.jobs import kommo_dry_run_job, kommo_full_refresh_job
from kommo_assets.settings import LIVE_DISABLED_REASON, ConfigError


def _nightly(name: str, job, cron_variable: str, cron: str, timezone: str,
             default_status: dg.DefaultScheduleStatus, description: str) -> dg.ScheduleDefinition:
    def evaluate(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
        if not settings.live_enabled():
            yield dg.SkipReason(LIVE_DISABLED_REASON)
            return
        night = context.scheduled_execution_time
        scope = settings.refresh_scope()
        years = scope.years(night)
        if not years:
            yield dg.SkipReason(f"No year of KOMMO_REFRESH_YEARS={scope} has begun.")
        stamp = night.strftime("%Y-%m-%dT%H:%M")
        for year in years:
            yield dg.RunRequest(run_key=f"{name}-{stamp}-{year}", partition_key=str(year))

    try:
        return dg.ScheduleDefinition(
            name=name,
            target=job,
            cron_schedule=cron,
            execution_timezone=timezone,
            execution_fn=evaluate,
            default_status=default_status,
            description=description,
        )
    except dg.DagsterInvalidDefinitionError:
        raise ConfigError(
            f"{cron_variable} must be a cron expression of 5 fields such as '0 2 * * *', got {cron!r}"
        ) from None


def build_schedules(env: Mapping[str, str] | None = None) -> tuple[dg.ScheduleDefinition, dg.ScheduleDefinition]:
    """(nightly dry run, nightly full refresh), from ``env`` (default: the process environment)."""
    timezone = settings.schedule_timezone(env)
    return (
        _nightly(
            "kommo_nightly_dry_run_schedule", kommo_dry_run_job, "KOMMO_DRY_RUN_CRON",
            settings.dry_run_cron(env), timezone,
            dg.DefaultScheduleStatus.RUNNING,
            "Nightly dry run (staging and checks, no swap); a drop beyond max_drop_ratio alerts as needs_review, "
            "drift as a drift alert; with KOMMO_HEAL_DRIFT on, drift that passed the drop guard starts a full "
            "refresh of its year. "
            "Cron KOMMO_DRY_RUN_CRON (default 0 2 * * *), timezone KOMMO_SCHEDULE_TIMEZONE (default UTC).",
        ),
        _nightly(
            "kommo_nightly_full_refresh_schedule", kommo_full_refresh_job, "KOMMO_FULL_REFRESH_CRON",
            settings.full_refresh_cron(env), timezone,
            dg.DefaultScheduleStatus.STOPPED,
            "Nightly full refresh; off by default, turn it on in the UI. "
            "Cron KOMMO_FULL_REFRESH_CRON (default 30 2 * * *), timezone KOMMO_SCHEDULE_TIMEZONE (default UTC).",
        ),
    )


kommo_nightly_dry_run_schedule, kommo_nightly_full_refresh_schedule = build_schedules()
