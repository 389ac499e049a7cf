"""Run record retention (prune_kommo_import_runs) and the button's checks at a year of increments."""

import statistics
import time
import uuid
from datetime import timedelta

import psycopg
import pytest

from kommo_assets.db import refresh_requests, runs
from kommo_assets.settings import refresh_scope
from kommo_assets_tests.helpers import fetch_all, fetch_one

CHANGED = '{"bookings_updated": 1, "clients_added": 0}'
NOTHING = '{"bookings_updated": 0, "clients_added": 0, "swap_seconds": 0.2, "foreign_key_checks": "per row"}'


def _run(conn, *, kind="increment", status="succeeded", ago=timedelta(days=3), counts=NOTHING, year=2025) -> str:
    run_id = str(uuid.uuid4())
    window = (None, None) if kind == "increment" else (f"{year}-01-01Z", f"{year + 1}-01-01Z")
    conn.execute(
        "INSERT INTO kommo_import_runs (id, kind, dry_run, status, created_from, created_to, started_at, finished_at,"
        " swap_counts) VALUES (%s, %s, %s, %s, %s, %s, now() - %s, CASE WHEN %s <> 'running' THEN now() - %s END,"
        " %s)", (run_id, kind, kind == "dry_run", status, *window, ago, status, ago, counts))
    return run_id


def test_no_op_increments_go_first_and_what_later_runs_read_stays(database_url):
    with psycopg.connect(database_url) as conn:
        noop_old = _run(conn)
        noop_recent = _run(conn, ago=timedelta(days=1))
        changed_old = _run(conn, counts=CHANGED)
        needs_review = _run(conn, status="needs_review", counts=None)
        reference = _run(conn, kind="full_refresh", ago=timedelta(days=400))  # last succeeded of 2025
        older = _run(conn, kind="full_refresh", ago=timedelta(days=500))
        failed_old = _run(conn, kind="full_refresh", status="failed", ago=timedelta(days=401), counts=None)
        other_year = _run(conn, kind="full_refresh", ago=timedelta(days=450), year=2024)
        cursor_run = _run(conn, ago=timedelta(days=30))
        conn.execute("INSERT INTO kommo_sync_state (run_id) VALUES (%s)", (cursor_run,))
        conn.execute("INSERT INTO stg_kommo_leads (run_id, lead_id, payload) VALUES (%s, 1, '{}')", (older,))
    assert runs.prune_runs(database_url, 2, 365) == {"noop_increments": 1, "closed_runs": 2}
    left = {r[0] for r in fetch_all(database_url, "SELECT id::text FROM kommo_import_runs")}
    assert left == {noop_recent, changed_old, needs_review, reference, other_year, cursor_run}
    assert noop_old not in left and older not in left and failed_old not in left
    assert fetch_one(database_url, "SELECT count(*) FROM stg_kommo_leads")[0] == 0  # went with its run
    assert runs.prune_runs(database_url, 2, 365) == {"noop_increments": 0, "closed_runs": 0}
    # after 30 days the changing increment and the needs_review one go too; the references never do
    assert runs.prune_runs(database_url, 2, 2) == {"noop_increments": 0, "closed_runs": 2}


def test_the_settings_reach_the_resource(monkeypatch):
    from kommo_assets.resources import build_resources

    monkeypatch.setenv("KOMMO_RUN_RETENTION_DAYS", "30")
    monkeypatch.setenv("KOMMO_NOOP_INCREMENT_RETENTION_DAYS", "0.5")
    postgres = build_resources()["postgres"]
    assert (postgres.run_retention_days, postgres.noop_increment_retention_days) == (30, 0.5)
    monkeypatch.setenv("KOMMO_RUN_RETENTION_DAYS", "-1")
    with pytest.raises(Exception, match="KOMMO_RUN_RETENTION_DAYS"):
        build_resources()


YEAR_OF_INCREMENTS = 525_600  # one a minute


def _time_request(conn: psycopg.Connection, user: uuid.UUID, times: int = 25) -> float:
    """Median milliseconds of request_kommo_refresh, each call rolled back (so each one does the whole check)."""
    took = []
    for _ in range(times):
        with conn.transaction(force_rollback=True):
            started = time.perf_counter()
            accepted = conn.execute("SELECT accepted FROM request_kommo_refresh(%s)", (user,)).fetchone()[0]
            took.append((time.perf_counter() - started) * 1000)
        assert accepted
    return statistics.median(took)


def test_the_buttons_checks_stay_in_low_milliseconds_at_a_year_of_increments(database_url, capsys):
    user = uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO kommo_refresh_staff (user_id) VALUES (%s)", (user,))
        conn.execute(
            "INSERT INTO kommo_import_runs (id, kind, status, started_at, finished_at, swap_counts)"
            " SELECT gen_random_uuid(), 'increment', 'succeeded', now() - g * interval '1 minute',"
            "        now() - g * interval '1 minute' + interval '3 seconds', %s"
            "   FROM generate_series(1, %s) g", (NOTHING, YEAR_OF_INCREMENTS))
        for days in (2, 30, 90):  # nightly dry runs and a few refreshes, long past the cooldown
            _run(conn, kind="full_refresh", ago=timedelta(days=days))
            _run(conn, kind="dry_run", ago=timedelta(days=days - 1))
        conn.execute("ANALYZE kommo_import_runs")
    refresh_requests.sync_flag(database_url, refresh_requests.LIVE_FLAG, True)
    refresh_requests.sync_settings(database_url, {refresh_requests.YEARS_SETTING: refresh_scope({}).as_json(),
                                               refresh_requests.COOLDOWN_SETTING: 10})
    with psycopg.connect(database_url, autocommit=True) as conn:
        with_index = _time_request(conn, user)
        with conn.transaction(force_rollback=True):  # the same, before 0011's index
            conn.execute("DROP INDEX kommo_import_runs_refresh_finished")
            without_index = _time_request(conn, user, times=5)
        pruned = runs.prune_runs(database_url, 2, 365)
        after_pruning = _time_request(conn, user)
    with capsys.disabled():
        print(f"\nrequest_kommo_refresh at {YEAR_OF_INCREMENTS} increments: {with_index:.2f} ms median "
              f"(without the index {without_index:.2f} ms); after pruning {pruned}: {after_pruning:.2f} ms")
    assert pruned["noop_increments"] >= YEAR_OF_INCREMENTS - 2 * 24 * 60 - 1
    assert with_index < 25 and after_pruning < 25
