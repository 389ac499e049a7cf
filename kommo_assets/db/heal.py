"""What the drift heal asks the run log: when a full refresh of a window last succeeded."""

from datetime import datetime

import psycopg

from kommo_assets.scope import Window


def last_refresh_succeeded_at(conn: psycopg.Connection, window: Window) -> datetime | None:
    """When the newest succeeded full refresh of exactly ``window`` finished (None: never). The run retention
    keeps each window's last succeeded refresh, so the answer survives pruning."""
    return conn.execute(
        "SELECT max(finished_at) FROM kommo_import_runs WHERE kind = 'full_refresh' AND status = 'succeeded' "
        "AND created_from = %s AND created_to = %s",
        (window.created_from, window.created_to),
    ).fetchone()[0]
