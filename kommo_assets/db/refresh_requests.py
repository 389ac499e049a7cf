"""The refresh request table (``kommo_refresh_requests``) and the settings copy, as the sensors use them.

Each function is one call of ``kommo_assets/sql/functions/40_refresh_requests.sql``; the rules live there.
"""

from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from kommo_assets.db import connect

LIVE_FLAG = "KOMMO_ENABLE_LIVE"
YEARS_SETTING = "KOMMO_REFRESH_YEARS"
COOLDOWN_SETTING = "KOMMO_REQUEST_COOLDOWN_MINUTES"


def sync_flag(database_url: str, name: str, enabled: bool) -> bool:
    """Copies a flag of the code location's environment into ``kommo_runtime_flags``."""
    with connect(database_url) as conn:
        return conn.execute("SELECT sync_kommo_runtime_flag(%s, %s)", (name, enabled)).fetchone()[0]


def sync_settings(database_url: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Copies settings of the code location's environment (JSON values) into ``kommo_runtime_settings``,
    in one transaction; returns the values stored."""
    with connect(database_url) as conn:
        return {
            name: conn.execute("SELECT sync_kommo_runtime_setting(%s, %s)", (name, Jsonb(value))).fetchone()[0]
            for name, value in settings.items()
        }


def claim_pending(database_url: str, after_id: int) -> list[dict[str, Any]]:
    """Marks pending requests queued and returns them (plus unfinished claims above ``after_id``), by id."""
    with connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM claim_kommo_refresh_requests(%s)", (after_id,))
        return sorted(cur.fetchall(), key=lambda r: r["id"])


def refuse_pending(database_url: str, reason: str) -> list[dict[str, Any]]:
    """Refuses every pending request with ``reason`` and returns them, by id."""
    with connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM refuse_kommo_refresh_requests(%s)", (reason,))
        return sorted(cur.fetchall(), key=lambda r: r["id"])


def mark_started(database_url: str, request_id: int, dagster_run_id: str) -> bool:
    with connect(database_url) as conn:
        return conn.execute("SELECT kommo_refresh_request_started(%s, %s)", (request_id, dagster_run_id)).fetchone()[0]


def record_finished(database_url: str, request_id: int, *, dagster_run_id: str, import_run_id: str,
                    error: str | None) -> dict[str, Any] | None:
    """Copies the import run's outcome onto the request; None when the request is unknown or refused."""
    with connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT * FROM kommo_refresh_request_finished(%s, %s, %s::uuid, %s)",
            (request_id, dagster_run_id, import_run_id, error),
        )
        row = cur.fetchone()
        return row if row and row["id"] is not None else None


def request_status(database_url: str, request_id: int) -> dict[str, Any] | None:
    """The app's polling payload (``kommo_refresh_request_status``) as the request's requester sees it."""
    with connect(database_url) as conn:
        return conn.execute(
            "SELECT kommo_refresh_request_status(%s,"
            " (SELECT requested_by FROM kommo_refresh_requests WHERE id = %s))",
            (request_id, request_id),
        ).fetchone()[0]
