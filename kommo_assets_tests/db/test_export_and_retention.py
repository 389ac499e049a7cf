"""Raw snapshot export round-trips to the staged payloads; staging retention prunes by age and status."""

import contextlib
import gzip
import json
import os
import stat
import time

import dagster as dg
import psycopg
import pytest

from kommo_assets.db import runs
from kommo_assets.db.export import export_snapshot, prune_exports, snapshot_path
from kommo_assets.resources.snapshot import SnapshotExportResource
from kommo_assets.scope import window_for
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
        assert _mode(path) == 0o600
    assert _mode(tmp_path) == 0o700
    assert not list(tmp_path.glob("*.partial"))


def test_export_is_skipped_cleanly_when_not_configured(kommo_env, database_url):
    result = run_job("kommo_full_refresh_job", resources={"snapshot_export": SnapshotExportResource()})
    assert result.success
    bookings = next(e.event_specific_data.materialization for e in result.get_asset_materialization_events()
                    if e.asset_key.path[-1] == "bookings")
    assert isinstance(bookings.metadata["raw_snapshot"], dg.NullMetadataValue)  # not configured: null


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
                   dry_run=True, window=window_for(2025), max_drop_ratio=0.3)
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


def _run_with_a_lead(url) -> str:
    run_id = str(fetch_one(url, "SELECT gen_random_uuid()")[0])
    runs.start_run(url, run_id=run_id, dagster_run_id=None, job_name="t", triggered_by=None,
                   dry_run=True, window=window_for(2025), max_drop_ratio=0.3)
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO stg_kommo_leads (run_id, lead_id, payload) VALUES (%s, 1, %s)",
                     (run_id, json.dumps({"id": 1, "name": "Ana Silva", "phone": "+351 912 345"})))
    return run_id


@contextlib.contextmanager
def _umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_export_files_are_readable_by_their_owner_only_whatever_the_umask(database_url, tmp_path):
    run_id = _run_with_a_lead(database_url)
    new_directory = tmp_path / "new" / "snapshots"
    existing = tmp_path / "existing"
    existing.mkdir()
    os.chmod(existing, 0o777)
    # a partial file left by an earlier attempt, world-readable: truncated and made private
    stale = existing / f"kommo-snapshot-{run_id}-leads.jsonl.gz.partial"
    stale.write_bytes(b"old bytes")
    os.chmod(stale, 0o666)
    with _umask(0):  # the most permissive: every mode the process asks for is kept
        for directory in (new_directory, existing):
            export = export_snapshot(database_url, run_id, directory)
            assert _mode(directory) == 0o700, directory
            assert export.rows == {"leads": 1, "contacts": 0}
            for path in export.files.values():
                assert _mode(path) == 0o600, path
            assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in export.files.values())
    with gzip.open(snapshot_path(existing, run_id, "leads"), "rt", encoding="utf-8") as f:
        assert [json.loads(line)["name"] for line in f] == ["Ana Silva"]


def test_a_failed_export_removes_its_partial_file(database_url, tmp_path):
    run_id = _run_with_a_lead(database_url)
    # the database fails the query: the leads file was opened, nothing was written
    with pytest.raises(psycopg.Error):
        export_snapshot(database_url, "not-a-run-id", tmp_path)
    assert list(tmp_path.iterdir()) == []
    # the rename of the complete leads file fails (a directory holds its name)
    snapshot_path(tmp_path, run_id, "leads").mkdir()
    (snapshot_path(tmp_path, run_id, "leads") / "keep").write_bytes(b"")
    with pytest.raises(OSError):
        export_snapshot(database_url, run_id, tmp_path)
    assert not list(tmp_path.glob("*.partial"))
    assert [p.name for p in tmp_path.iterdir()] == [snapshot_path(tmp_path, run_id, "leads").name]


def test_retention_also_removes_partial_files_of_old_failed_exports(tmp_path):
    stale = time.time() - 10 * 86400
    names = {
        "old_snapshot": "kommo-snapshot-a-leads.jsonl.gz",
        "old_partial": "kommo-snapshot-b-contacts.jsonl.gz.partial",
        "recent_partial": "kommo-snapshot-c-leads.jsonl.gz.partial",  # may be an export under way
        "recent_snapshot": "kommo-snapshot-c-contacts.jsonl.gz",
        "old_unrelated": "other.jsonl.gz.partial",
    }
    paths = {key: tmp_path / name for key, name in names.items()}
    for key, path in paths.items():
        path.write_bytes(b"")
        if key.startswith("old"):
            os.utime(path, (stale, stale))
    assert prune_exports(tmp_path, retention_days=5) == 2
    assert {p.name for p in tmp_path.iterdir()} == {names["recent_partial"], names["recent_snapshot"],
                                                    names["old_unrelated"]}
