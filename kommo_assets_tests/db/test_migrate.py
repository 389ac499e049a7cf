import re
import threading
from pathlib import Path

import psycopg
import pytest

from kommo_assets.db.migrate import MIGRATE_LOCK_KEY, MigrationError, migrate, sql_dir
from kommo_assets_tests.helpers import fetch_all, fetch_one


def test_migrate_applies_everything_once_and_is_idempotent(empty_database_url):
    first = migrate(empty_database_url)
    assert first.applied == sorted(p.name for p in (sql_dir() / "migrations").glob("*.sql"))
    second = migrate(empty_database_url)
    assert second.applied == []
    tables = {r[0] for r in fetch_all(empty_database_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"clients", "sales_leads", "bookings", "vehicles", "booking_vehicles", "calendar_events", "kommo_user_map",
            "kommo_status_map", "kommo_source_map", "zoho_outbox", "kommo_import_runs", "stg_kommo_leads",
            "stg_kommo_contacts", "stg_kommo_booking_vehicles", "schema_migrations"} <= tables
    assert fetch_one(empty_database_url, "SELECT booking_status FROM kommo_status_map WHERE status_id = 79790637")[0] == "confirmed"
    functions = {r[0] for r in fetch_all(empty_database_url, "SELECT proname FROM pg_proc")}
    assert {"run_kommo_full_refresh", "kommo_drop_guard", "start_kommo_import_run"} <= functions


def test_two_processes_migrating_at_once_both_succeed(empty_database_url):
    errors = []

    def worker():
        try:
            migrate(empty_database_url)
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    versions = fetch_all(empty_database_url, "SELECT version FROM schema_migrations")
    assert len(versions) == len(list((sql_dir() / "migrations").glob("*.sql")))


def test_an_edited_migration_is_refused(empty_database_url, tmp_path):
    root = tmp_path / "sql"
    (root / "migrations").mkdir(parents=True)
    (root / "functions").mkdir()
    migration = root / "migrations" / "0001_t.sql"
    migration.write_text("CREATE TABLE t (id int);")
    migrate(empty_database_url, root)
    migration.write_text("CREATE TABLE t (id bigint);")
    with pytest.raises(MigrationError, match="edited after it was applied"):
        migrate(empty_database_url, root)


def test_a_failing_migration_applies_nothing_of_itself(empty_database_url, tmp_path: Path):
    root = tmp_path / "sql"
    (root / "migrations").mkdir(parents=True)
    (root / "functions").mkdir()
    (root / "migrations" / "0001_ok.sql").write_text("CREATE TABLE ok (id int);")
    (root / "migrations" / "0002_bad.sql").write_text("CREATE TABLE half (id int); SELECT 1/0;")
    with pytest.raises(Exception, match="division by zero"):
        migrate(empty_database_url, root)
    tables = {r[0] for r in fetch_all(empty_database_url, "SELECT tablename FROM pg_tables WHERE schemaname='public'")}
    assert "ok" in tables and "half" not in tables
    assert fetch_all(empty_database_url, "SELECT version FROM schema_migrations") == [("0001_ok",)]


def test_advisory_lock_keys_are_named_once_and_an_unknown_name_is_refused(database_url):
    keys = fetch_all(database_url, "SELECT kommo_lock_key(n) FROM unnest(ARRAY['import_start', 'swap',"
                                   " 'import_owner', 'refresh_request']) AS n")
    assert len({k for (k,) in keys}) == 4 and MIGRATE_LOCK_KEY not in {k for (k,) in keys}
    with pytest.raises(psycopg.errors.RaiseException, match="no Kommo advisory lock is named swpa"):
        fetch_all(database_url, "SELECT kommo_lock_key('swpa')")
    # no function or module spells a key as a bare number any more
    bare = re.compile(r"\b909\d\d\b")
    roots = [sql_dir() / "functions", Path(__file__).resolve().parents[2] / "kommo_assets"]
    spelled = [str(path) for root in roots for path in root.rglob("*.*") if path.suffix in (".sql", ".py")
               and path.name not in ("05_kommo_lock_keys.sql", "migrate.py") and bare.search(path.read_text())]
    assert spelled == []


def test_finish_kommo_import_run_closes_a_run_and_the_old_name_still_works(database_url):
    for name, run_id in (("finish_kommo_import_run", "00000000-0000-0000-0000-000000000001"),
                         ("close_kommo_import_run", "00000000-0000-0000-0000-000000000002")):
        fetch_one(database_url, "INSERT INTO kommo_import_runs (id, dry_run, created_from, created_to)"
                                " VALUES (%s, false, '2025-01-01Z', '2026-01-01Z') RETURNING id", (run_id,))
        assert fetch_one(database_url, f"SELECT {name}(%s, 'failed', 'killed by operator')", (run_id,)) == (True,)
        assert fetch_one(database_url, "SELECT status, error, finished_at IS NOT NULL FROM kommo_import_runs"
                                       " WHERE id = %s", (run_id,)) == ("failed", "killed by operator", True)
        assert fetch_one(database_url, f"SELECT {name}(%s, 'succeeded', NULL)", (run_id,)) == (False,)
