"""Raw snapshot export round-trips to the staged payloads; staging retention prunes by age and status."""

import gzip
import json
import os
import time

import psycopg

from kommo_assets.db import runs
from kommo_assets.db.export import export_snapshot, prune_exports, snapshot_path
from kommo_assets.resources.snapshot import SnapshotExportResource
from kommo_assets_tests.helpers import fetch_all, fetch_one, run_job


def _staged(url, table, key, run_id):
    return [r[0] for r in fetch_all(url, f"SELECT payload FROM {table} WHERE run_id = %s ORDER BY {key}", (run_id,))]


def test_export_files_round_trip_to_the_staged_payloads(kommo_env, database_url, tmp_path):
    result = run_job("kommo_full_refresh_job",
                     resources={"snapshot_export": SnapshotExportResource(directory=str(tmp_path))})
    assert result.success
    for kind, table, key in (("leads", "stg_kommo_leads", "lead_id"), ("contacts", "stg_kommo_contacts", "contact_id")):
        path = snapshot_path(tmp_path, result.run_id, kind)
        with gzip.open(path, "rt", encoding="utf-8") as f:
            exported = [json.loads(line) for line in f]
        staged = _staged(database_url, table, key, result.run_id)
        assert len(staged) > 100
        assert exported == staged
    assert not list(tmp_path.glob("*.partial"))


def test_export_is_skipped_cleanly_when_not_configured(kommo_env, database_url):
    result = run_job("kommo_full_refresh_job", resources={"snapshot_export": SnapshotExportResource()})
    assert result.success
    bookings = next(e.event_specific_data.materialization for e in result.get_asset_materialization_events()
                    if e.asset_key.path[-1] == "bookings")
    assert bookings.metadata["raw_snapshot"].value == "skipped: KOMMO_SNAPSHOT_DIR is not set"


def test_old_exports_are_removed_by_retention(database_url, tmp_path):
    old = tmp_path / "kommo-snapshot-old-leads.jsonl.gz"
    old.write_bytes(b"")
    stale = time.time() - 10 * 86400
    os.utime(old, (stale, stale))
    unrelated = tmp_path / "other.jsonl.gz"
    unrelated.write_bytes(b"")
    os.utime(unrelated, (stale, stale))
    assert prune_exports(tmp_path, retention_days=5) == 1
    assert not old.exists() and unrelated.exists()


def test_export_streams_a_run_without_rows(database_url, tmp_path):
    run_id = "00000000-0000-0000-0000-000000000001"
    runs.start_run(database_url, run_id=run_id, dagster_run_id=None, job_name="t", triggered_by=None,
                   dry_run=True, window=runs.window_for(2025), max_drop_ratio=0.3)
    export = export_snapshot(database_url, run_id, tmp_path)
    assert export.rows == {"leads": 0, "contacts": 0}


def test_staging_retention_prunes_old_succeeded_and_keeps_recent_and_failed(database_url):
    def run_with_staging(status, age_days):
        run_id = str(fetch_one(database_url, "SELECT gen_random_uuid()")[0])
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "INSERT INTO kommo_import_runs (id, status, created_from, created_to, finished_at)"
                " VALUES (%s, %s, '2025-01-01', '2026-01-01', now() - make_interval(days => %s))",
                (run_id, status, age_days))
            conn.execute("INSERT INTO stg_kommo_leads (run_id, lead_id, payload) VALUES (%s, 1, '{}')", (run_id,))
        return run_id

    old_ok, new_ok = run_with_staging("succeeded", 10), run_with_staging("succeeded", 1)
    old_failed, older_failed = run_with_staging("failed", 10), run_with_staging("needs_review", 40)
    pruned = runs.prune_staging(database_url, succeeded_days=7, failed_days=30)
    assert pruned == {"runs": 2, "leads": 2, "contacts": 0}
    left = {r[0] for r in fetch_all(database_url, "SELECT run_id::text FROM stg_kommo_leads")}
    assert left == {new_ok, old_failed}
    assert {old_ok, older_failed} <= {r[0] for r in fetch_all(database_url, "SELECT id::text FROM kommo_import_runs")}
