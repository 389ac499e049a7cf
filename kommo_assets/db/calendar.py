"""What the calendar view (``calendar_events_expanded``, ``kommo_assets/sql/functions/30_calendar_events_expanded.sql``)
shows: its events counted by kind."""

import psycopg


def calendar_counts(conn: psycopg.Connection) -> dict[str, int]:
    """The view's rows per kind (``kommo_booking``, ``manual``); a kind with no rows is absent."""
    return dict(conn.execute("SELECT kind, count(*) FROM calendar_events_expanded GROUP BY kind").fetchall())
