"""The Bookings-page button: each pending ``kommo_refresh_requests`` row becomes one full-refresh run of
the year it asks for.

Every tick first copies the settings the request function needs from the code location's environment
into the database (``KOMMO_ENABLE_LIVE``, ``KOMMO_REFRESH_YEARS``, ``KOMMO_REQUEST_COOLDOWN_MINUTES``):
SQL cannot read them. While a requested refresh waits or runs, and for the cooldown after it, the request
function answers with that request instead of queueing another.
"""

import dagster as dg

from kommo_assets.db import refresh_requests
from kommo_assets.jobs import REQUEST_ID_TAG, REQUESTED_BY_TAG, kommo_full_refresh_job
from kommo_assets.resources.postgres import PostgresResource
from kommo_assets.scope import current_year
from kommo_assets.settings import (
    LIVE_DISABLED_REASON,
    ConfigError,
    live_enabled,
    refresh_scope,
    request_cooldown_minutes,
)

RUN_KEY_PREFIX = "kommo-refresh-request-"


def request_run_key(request_id: int) -> str:
    """Stable per request: Dagster never starts a second run for the same key, whatever a tick repeats."""
    return f"{RUN_KEY_PREFIX}{request_id}"


def request_partition(row: dict) -> str:
    """The partition (year) a request asks for; a request made before years existed means the current one."""
    return str(row["year"] if row.get("year") is not None else current_year())


def _ids(rows: list[dict]) -> str:
    return ", ".join(f"#{row['id']}" for row in rows)


@dg.sensor(
    name="kommo_refresh_request_sensor",
    target=kommo_full_refresh_job,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Copies KOMMO_ENABLE_LIVE into kommo_runtime_flags and KOMMO_REFRESH_YEARS and "
    "KOMMO_REQUEST_COOLDOWN_MINUTES into kommo_runtime_settings, then starts one kommo_full_refresh_job "
    "run per pending kommo_refresh_requests row, of the partition (year) it asks (run key "
    "kommo-refresh-request-<id>), "
    "or refuses the pending requests while the flag is off. Cursor: the highest request id handled.",
)
def kommo_refresh_request_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SensorResult | dg.SkipReason:
    url = postgres.database_url
    handled = int(context.cursor) if context.cursor else 0
    try:
        live = live_enabled()
    except ConfigError:
        # An unreadable flag is off for the app too; the tick fails with the message naming the variable.
        refresh_requests.sync_flag(url, refresh_requests.LIVE_FLAG, False)
        raise
    refresh_requests.sync_flag(url, refresh_requests.LIVE_FLAG, live)
    # An unreadable value fails the tick naming the variable; the copies keep their last good values.
    refresh_requests.sync_settings(url, {
        refresh_requests.YEARS_SETTING: refresh_scope().as_json(),
        refresh_requests.COOLDOWN_SETTING: request_cooldown_minutes(),
    })

    if not live:
        refused = refresh_requests.refuse_pending(url, LIVE_DISABLED_REASON)
        if not refused:
            return dg.SkipReason("KOMMO_ENABLE_LIVE is off: no pending refresh requests (new ones are refused).")
        context.log.warning(f"KOMMO_ENABLE_LIVE is off: refused refresh request(s) {_ids(refused)}")
        return dg.SensorResult(
            skip_reason=dg.SkipReason(f"KOMMO_ENABLE_LIVE is off: refused refresh request(s) {_ids(refused)}."),
            cursor=str(max(handled, refused[-1]["id"])),
        )

    claimed = refresh_requests.claim_pending(url, handled)
    if not claimed:
        return dg.SkipReason(
            f"No pending Kommo refresh requests (last handled: #{handled})." if handled
            else "No pending Kommo refresh requests."
        )
    context.log.info(f"Starting a full refresh for refresh request(s) {_ids(claimed)}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=request_run_key(row["id"]),
                partition_key=request_partition(row),
                tags={REQUESTED_BY_TAG: str(row["requested_by"]), REQUEST_ID_TAG: str(row["id"])},
            )
            for row in claimed
        ],
        cursor=str(max(handled, claimed[-1]["id"])),
    )
