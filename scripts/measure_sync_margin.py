"""What the sync's margin (db/increment.py, SYNC_MARGIN_S) costs, on the simulator: per sync and per idle
probe, for margins of 5, 60, 120 and 300 s (the figures in docs/incremental.md, "The margin").

    PYTHONPATH=. .venv/bin/python scripts/measure_sync_margin.py [LEADS=5000] [CHANGES_PER_MINUTE=20]

A throwaway PostgreSQL and a simulator with a frozen clock; after a full refresh, 8 rounds of a minute of
Kommo time with CHANGES_PER_MINUTE leads changed at even intervals, each followed by a sync and the sensor's
probe; the first round is left out (nothing before the refresh to re-read). The client is unpaced (500/s):
at Kommo's pace each request costs about 0.15 s more.
"""

import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg

import kommo_assets.db.increment as inc
from kommo_assets.db import connect
from kommo_assets.db.migrate import migrate
from kommo_assets.db.runs import ImportRuns
from kommo_assets.db.windows import sync_cursor
from kommo_assets.dev.local_postgres import LocalPostgres
from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig
from kommo_assets.scope import YearScope
from kommo_assets_tests.sync_support import YEAR, fast_client, full_refresh

T0 = 1_800_000_000
SCOPE = YearScope.parse(str(YEAR))  # the simulator's year, which its full refresh imported
ROUNDS = 8
MARGINS = (5, 60, 120, 300)


def sync(url: str, sim: KommoSimulator) -> tuple:
    """One increment as the asset runs it: (requests, leads read, bytes, seconds)."""
    run_id = str(uuid.uuid4())
    with fast_client(sim) as client, connect(url, autocommit=True) as conn:
        runs = ImportRuns(conn)
        runs.start(run_id=run_id, dagster_run_id=None, job_name="measure", triggered_by=None, kind="increment",
                   max_drop_ratio=0)
        started = time.perf_counter()
        result = inc.stage_increment(conn, run_id, client, SCOPE)
        with conn.transaction():
            runs.mark_staged(run_id, result.as_metadata())
            runs.set_kommo_clock(run_id, result.sync_to)
            inc.record_sync_range(conn, run_id, result)
        runs.apply_increment(run_id, result.sync_to, 10**6, result.windows)
        return client.stats.requests, result.leads_received, client.stats.bytes_received, \
            time.perf_counter() - started


def probe(url: str, sim: KommoSimulator) -> tuple:
    """The sensor's probe: (requests, bytes, seconds, whether it would start a run)."""
    with connect(url) as conn:
        cursor, seen = sync_cursor(conn, SCOPE.windows()), inc.margin_seen(conn)
    with fast_client(sim) as client:
        started = time.perf_counter()
        found = inc.probe_changes(client, cursor, seen)
        return client.stats.requests, client.stats.bytes_received, time.perf_counter() - started, found.anything


def measure(pg: LocalPostgres, margin: int, leads: int, changes: int) -> str:
    inc.SYNC_MARGIN_S = margin
    name = f"margin_{margin}"
    with psycopg.connect(pg.url("postgres"), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = pg.url(name)
    migrate(url)
    with KommoSimulator(SimulatorConfig(leads=leads, seed=3, token="measure", rate_limit_rps=None)) as sim:
        sim.dataset.clock.set(T0)
        full_refresh(url, sim)
        start, end = (int(datetime(y, 1, 1, tzinfo=UTC).timestamp()) for y in (2025, 2026))
        ids = [lead["id"] for lead in sim.dataset.iter_leads(window=(start, end)) if lead["status_id"] != 143]
        rows = []
        for n in range(ROUNDS * changes):
            sim.dataset.clock.advance(60 / changes)
            sim.dataset.update_lead(ids[n % len(ids)], price=1000 + n)
            if (n + 1) % changes == 0:
                sim.dataset.clock.advance(2)
                rows.append(sync(url, sim) + probe(url, sim))
    rows = rows[1:]
    mean = [statistics.mean(row[i] for row in rows) for i in range(7)]
    runs = sum(row[7] for row in rows)
    return (f"margin {margin:>3} s: sync {mean[0]:.1f} requests, {mean[1]:.0f} leads read ({changes} changed), "
            f"{mean[2] / 1024:.0f} KB, {mean[3]:.3f} s | idle probe {mean[4]:.0f} requests, {mean[5] / 1024:.1f} KB, "
            f"{mean[6]:.3f} s, would start a run {runs}/{len(rows)}")


def main() -> None:
    leads = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    changes = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    root = Path(tempfile.mkdtemp(prefix="kommo-margin-"))
    pg = LocalPostgres(root / "data", durable=False)
    pg.start()
    try:
        for margin in MARGINS:
            print(measure(pg, margin, leads, changes), flush=True)
    finally:
        pg.stop("immediate")


if __name__ == "__main__":
    main()
