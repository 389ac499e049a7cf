"""The windows' side of the database: how far Kommo has been read for each (``kommo_window_coverage``), and
what production holds of each, and whether it follows the current-state mirror. One SQL call each, in
``kommo_assets/sql/functions/16_kommo_windows.sql`` and ``18_kommo_mirror.sql``."""

from collections.abc import Sequence
from datetime import datetime

import psycopg

from kommo_assets.scope import Window


def window_params(windows: Sequence[Window]) -> dict[str, list[datetime]]:
    """The windows as the SQL functions take them: ``froms`` and ``tos``, two arrays of the same length."""
    return {"froms": [w.created_from for w in windows], "tos": [w.created_to for w in windows]}


def sync_cursor(conn: psycopg.Connection, windows: Sequence[Window]) -> datetime:
    """Where an increment covering ``windows`` reads from, on Kommo's clock: the oldest coverage among them,
    a window never read from its first second (``kommo_sync_cursor``)."""
    if not windows:
        raise ValueError("an increment needs at least one window of lead creation times")
    with conn.transaction():
        return conn.execute("SELECT kommo_sync_cursor(%(froms)s::timestamptz[], %(tos)s::timestamptz[])",
                            window_params(windows)).fetchone()[0]


def uncovered_windows(conn: psycopg.Connection, windows: Sequence[Window]) -> list[Window]:
    """Those of ``windows`` that no refresh or increment has read yet."""
    if not windows:
        return []
    with conn.transaction():
        rows = conn.execute("SELECT * FROM kommo_uncovered_windows(%(froms)s::timestamptz[], %(tos)s::timestamptz[])",
                            window_params(windows)).fetchall()
    return [Window(*row) for row in rows]


def window_row_counts(conn: psycopg.Connection, window: Window) -> dict[str, int]:
    """What production holds of ``window``, per production table (``kommo_window_row_counts``): the row count
    of every materialization of the window's partition."""
    with conn.transaction():
        return conn.execute("SELECT kommo_window_row_counts(%s, %s)",
                            (window.created_from, window.created_to)).fetchone()[0]


def coverage(conn: psycopg.Connection, windows: Sequence[Window]) -> dict[str, datetime | None]:
    """Each window's coverage on Kommo's clock (None: never read), by partition key."""
    if not windows:
        return {}
    with conn.transaction():
        rows = conn.execute(
            "SELECT w.created_from, c.covered_to FROM unnest(%(froms)s::timestamptz[], %(tos)s::timestamptz[])"
            " AS w(created_from, created_to) LEFT JOIN kommo_window_coverage c"
            " ON c.created_from = w.created_from AND c.created_to = w.created_to",
            window_params(windows)).fetchall()
    covered = dict(rows)
    return {w.key: covered.get(w.created_from) for w in windows}


def increment_changes_by_window(conn: psycopg.Connection, run_id: str,
                                windows: Sequence[Window]) -> dict[str, dict[str, int]]:
    """What increment ``run_id`` staged per window (leads changed, leads removed), for the windows with any
    change, by partition key (``kommo_increment_changes_by_window``)."""
    if not windows:
        return {}
    with conn.transaction():
        rows = conn.execute("SELECT * FROM kommo_increment_changes_by_window(%(r)s::uuid, %(froms)s::timestamptz[],"
                            " %(tos)s::timestamptz[])", {"r": run_id, **window_params(windows)}).fetchall()
    return {Window(start, end).key: {"leads_changed": leads, "leads_removed": removals}
            for start, end, leads, removals in rows if leads or removals}


def mirror_drift(conn: psycopg.Connection, window: Window) -> dict:
    """The local drift check of ``window`` (``kommo_mirror_drift``): what deriving production from the
    current-state mirror now would change in it, as the change preview counts it. No Kommo request."""
    with conn.transaction():
        # One snapshot for every statement of the comparison: an increment committing meanwhile (the check
        # can run beside one) must not look like drift.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        return conn.execute("SELECT kommo_mirror_drift(%s, %s)",
                            (window.created_from, window.created_to)).fetchone()[0]


def rules_changed(conn: psycopg.Connection) -> list[tuple[str, int]]:
    """The mapping rows and source option labels that changed since production was last derived
    (``kommo_rules_changed``): the next swap re-derives every lead they reach."""
    with conn.transaction():
        return [tuple(row) for row in conn.execute("SELECT rule, key FROM kommo_rules_changed() ORDER BY 1, 2")]
