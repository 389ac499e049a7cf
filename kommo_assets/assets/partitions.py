"""A year is a partition: the windows of the full refresh and the dry run, as Dagster shows and backfills them.

One yearly time-window partition per year in scope (``KOMMO_REFRESH_YEARS``, :mod:`kommo_assets.scope`), UTC,
keys ``"2025"``, ``"2026"``, ...: from the first year in scope through the current one for an open scope
(``end_offset=1`` includes the year under way, which a time-window partition would otherwise only offer once
it has ended), to the last one for a closed scope. Years between two ranges (``2025,2027``) are excluded.
"""

from datetime import UTC, datetime

import dagster as dg

from kommo_assets import settings
from kommo_assets.scope import Window, YearScope, window_for

YEARLY_CRON = "0 0 1 1 *"


def year_partitions(scope: YearScope) -> dg.TimeWindowPartitionsDefinition:
    """The yearly partitions of ``scope``; the keys move with the calendar for an open scope."""
    return dg.TimeWindowPartitionsDefinition(
        cron_schedule=YEARLY_CRON,
        fmt="%Y",
        start=str(scope.first_year),
        end=None if scope.open_ended else str(max(last for _, last in scope.ranges) + 1),
        end_offset=1,
        timezone="UTC",
        exclusions=[datetime(year, 1, 1, tzinfo=UTC) for year in scope.gaps()] or None,
    )


# Read when the definitions load, as the schedules' crons are: a new KOMMO_REFRESH_YEARS needs a reload of
# the code location (an open scope grows by itself).
YEARS = year_partitions(settings.refresh_scope())


def partition_window(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> Window:
    """The window of the run's partition; a run without one, or with a year outside the scope, is refused
    before any work with what to run instead."""
    if not context.has_partition_key:
        raise dg.Failure(
            description="This asset is partitioned by year: pick a year (a partition) to materialize, e.g. the "
            "current one, or launch a backfill of several years.", allow_retries=False)
    key = context.partition_key
    scope = settings.refresh_scope()
    if not scope.contains(int(key)):
        raise dg.Failure(
            description=f"Year {key} is not in scope (KOMMO_REFRESH_YEARS={scope}): pick one of "
            f"{', '.join(map(str, scope.years()))}.", allow_retries=False)
    return window_for(int(key))
