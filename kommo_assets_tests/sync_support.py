"""What the incremental sync tests share: a full refresh and an increment run by the functions the assets
call (no Dagster), and production read by natural keys so two databases compare row for row.

Each takes ``db``: a database URL (a session of its own, as a run has) or an open autocommit connection
(kept open: the property test's examples reuse theirs, sparing a new session's setup and plans)."""

import uuid
from contextlib import nullcontext

import psycopg

from kommo_assets.db import connect
from kommo_assets.db.increment import record_sync_range, stage_increment
from kommo_assets.db.runs import ImportRuns
from kommo_assets.db.staging import stage_snapshot
from kommo_assets.kommo import KommoClient
from kommo_assets.scope import YearScope, window_for

YEAR = 2025


def fast_client(sim) -> KommoClient:
    return KommoClient(sim.base_url, sim.config.token, max_rps=500.0, backoff_base=0.01, backoff_max=0.05,
                       max_retries=3)


def _session(db: str | psycopg.Connection):
    return nullcontext(db) if isinstance(db, psycopg.Connection) else connect(db, autocommit=True)


def full_refresh(db: str | psycopg.Connection, sim, year: int = YEAR, allow_empty: bool = False) -> dict | None:
    """A full refresh of ``year`` as the assets run it: start, stage (with Kommo's clock), guard, swap; on one
    autocommit connection, each step its own transaction as in the assets. ``allow_empty``: a window Kommo
    holds no lead of is refused by the drop guard (production left as it is), and None returned."""
    run_id = str(uuid.uuid4())
    window = window_for(year)
    with fast_client(sim) as client, _session(db) as conn:
        runs = ImportRuns(conn)
        runs.start(run_id=run_id, dagster_run_id=None, job_name="test", triggered_by=None, dry_run=False,
                   window=window, max_drop_ratio=1.0)
        result = stage_snapshot(conn, run_id, client, window.created_from, window.created_to)
        with conn.transaction():
            runs.mark_staged(run_id, result.as_metadata())
            runs.set_kommo_clock(run_id, result.kommo_clock)
        verdict = runs.drop_guard(run_id)
        if allow_empty and not verdict["passed"] and verdict["leads"] == 0:
            return None
        assert verdict["passed"], verdict
        return {**runs.swap(run_id), "run_id": run_id}


def increment(db: str | psycopg.Connection, sim, max_deactivations: int = 1_000_000,
              years: tuple[int, ...] = (YEAR,), scope: str | None = None) -> dict:
    """One incremental sync as the asset runs it; returns the apply's counts plus the run id. Its scope is
    ``years``, or ``scope`` (a ``KOMMO_REFRESH_YEARS`` value such as ``2025-``, resolved on Kommo's clock)."""
    run_id = str(uuid.uuid4())
    with fast_client(sim) as client, _session(db) as conn:
        runs = ImportRuns(conn)
        runs.start(run_id=run_id, dagster_run_id=None, job_name="test", triggered_by=None, kind="increment",
                   max_drop_ratio=0)
        result = stage_increment(conn, run_id, client, YearScope.parse(scope or ",".join(map(str, years))))
        with conn.transaction():
            runs.mark_staged(run_id, result.as_metadata())
            runs.set_kommo_clock(run_id, result.sync_to)
            record_sync_range(conn, run_id, result)
        counts = runs.apply_increment(run_id, result.sync_to, max_deactivations, result.windows)
    return {**counts, "run_id": run_id}


PRODUCTION_QUERIES = {
    # Clients are never deleted: one an increment added for a lead deleted later stays, unreferenced, where a
    # single later refresh never saw it. Compared: the clients some live Kommo row points at.
    "clients": """
        SELECT c.kommo_contact_id, c.name, c.phone, c.email FROM clients c
         WHERE EXISTS (SELECT 1 FROM sales_leads s WHERE s.client_id = c.id AND s.archived_at IS NULL)
            OR EXISTS (SELECT 1 FROM bookings b WHERE b.client_id = c.id AND b.is_active)""",
    # Vehicles are never deleted either: one created for a lead deleted later stays. Compared: those an
    # active booking uses.
    "vehicles": """
        SELECT v.kommo_vehicle_id, v.name FROM vehicles v
         WHERE EXISTS (SELECT 1 FROM bookings b WHERE b.vehicle_id = v.id AND b.is_active)
            OR EXISTS (SELECT 1 FROM booking_vehicles bv JOIN bookings b ON b.id = bv.booking_id
                        WHERE bv.vehicle_id = v.id AND b.is_active)""",
    # An archived sales lead or a deactivated booking keeps what it held when it left: after increments,
    # its last state; after one refresh, its state before. Compared: that it left.
    "sales_leads": """
        SELECT s.lead_code, s.archived_at IS NOT NULL,
               CASE WHEN s.archived_at IS NULL THEN
                   row(c.kommo_contact_id, s.name, s.stage_id, s.pipeline_id, s.value_amount, s.owner_id,
                       s.expected_close_at, s.source, s.kommo_created_at)::text END
          FROM sales_leads s LEFT JOIN clients c ON c.id = s.client_id""",
    "bookings": """
        SELECT b.source_payload_id, b.is_active,
               CASE WHEN b.is_active THEN
                   row(c.kommo_contact_id, s.lead_code, b.channel, b.source, b.status, b.kommo_status_id,
                       b.owner_id, v.kommo_vehicle_id, b.start_at, b.end_at, b.kommo_created_at)::text END
          FROM bookings b LEFT JOIN clients c ON c.id = b.client_id
          LEFT JOIN sales_leads s ON s.id = b.sales_lead_id LEFT JOIN vehicles v ON v.id = b.vehicle_id""",
    "booking_vehicles": """
        SELECT b.source_payload_id, v.kommo_vehicle_id, bv."primary"
          FROM booking_vehicles bv JOIN bookings b ON b.id = bv.booking_id JOIN vehicles v ON v.id = bv.vehicle_id
         WHERE b.is_active""",
}


def production_rows(db: str | psycopg.Connection) -> dict[str, list[tuple]]:
    """Every production table by natural keys (Kommo ids and codes instead of uuids), timestamps aside
    (Kommo's own kept), sorted."""
    with _session(db) as conn:
        return {table: sorted((conn.execute(query).fetchall()), key=repr)
                for table, query in PRODUCTION_QUERIES.items()}
