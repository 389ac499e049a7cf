"""Process and database faults: SIGKILL at each step, a Postgres restart mid-run, two refreshes at once.

Each refresh here is a real ``kommo-assets run`` process against the test database and the simulator;
after each fault, production must be byte-for-byte what it was (a checksum of every production table),
the import record closed or closable, and the next run, started right away, must succeed.
"""

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from kommo_assets.db.runs import get_run
from kommo_assets_tests.helpers import fetch_all, fetch_one, production_checksum, run_job
from kommo_assets_tests.test_full_refresh import WINDOW


def start_refresh(env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kommo_assets.cli", "run", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def kill_inside_transaction(database_url: str, function: str, start) -> None:
    """Starts a run (``start()``), parks its ``function`` inside its transaction on a lock of bookings (held
    here: the swap and the increment's apply write vehicles, clients and leads before bookings), SIGKILLs
    the run there, and waits until the server has ended the orphaned transaction."""
    blocker = psycopg.connect(database_url)
    blocker.execute("LOCK TABLE bookings IN EXCLUSIVE MODE")
    proc = start()

    def parked() -> bool:
        return bool(fetch_one(
            database_url, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s"
                          " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()", (f"%{function}%",))[0])

    try:
        wait_until(parked, what=f"{function} to block inside its transaction")
        kill(proc)
    finally:
        blocker.rollback()
        blocker.close()
    wait_until(lambda: not fetch_one(
        database_url, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND state <> 'idle'"
                      " AND pid <> pg_backend_pid()", (f"%{function}(%",))[0], what=f"the orphaned {function} to end")


@pytest.fixture
def refresh_env(kommo_env, database_url, monkeypatch, tmp_path):
    """A first succeeded refresh, then the environment for subprocess runs."""
    assert run_job("kommo_full_refresh_job").success
    kommo_env.reset_stats()  # the kill points below count this run's requests only
    # The subprocess runs record themselves in a throwaway Dagster instance (default storage in a folder).
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    return dict(os.environ)


def _requests_to(sim, path: str) -> int:
    return sim.stats()["by_path"].get(path, 0)


def _assert_recovers(database_url, before: str) -> None:
    """Production unchanged, the killed import left running (closable), and the next run, started at once,
    succeeds: the killed process took its owner lock with it, so the start closes its import right away."""
    assert production_checksum(database_url) == before
    running = fetch_all(database_url, "SELECT id, heartbeat_at > now() - interval '30 seconds'"
                                      " FROM kommo_import_runs WHERE status = 'running'")
    assert len(running) == 1
    assert running[0][1], "the killed import's heartbeat is recent: only its missing owner says it is dead"
    result = run_job("kommo_full_refresh_job")
    assert result.success
    for run_id, _ in running:
        closed = get_run(database_url, str(run_id))
        assert closed["status"] == "failed" and "abandoned" in closed["error"]
    assert fetch_one(database_url, "SELECT count(*) FROM kommo_import_runs WHERE status = 'running'")[0] == 0


def test_sigkill_while_fetching_leads(refresh_env, kommo_env, database_url):
    kommo_env.set_latency(150)
    before = production_checksum(database_url)
    proc = start_refresh(refresh_env)
    wait_until(lambda: _requests_to(kommo_env, "/api/v4/leads") >= 2, what="lead pages")
    kill(proc)
    kommo_env.set_latency(0)
    _assert_recovers(database_url, before)


def test_sigkill_while_staging_contacts(refresh_env, kommo_env, database_url):
    kommo_env.set_latency(150)
    before = production_checksum(database_url)
    proc = start_refresh(refresh_env)
    wait_until(lambda: _requests_to(kommo_env, "/api/v4/contacts") >= 1, what="contact batches")
    kill(proc)
    kommo_env.set_latency(0)
    staged = fetch_one(database_url, "SELECT count(*) FROM stg_kommo_leads s JOIN kommo_import_runs r ON r.id = s.run_id"
                                     " WHERE r.status = 'running'")[0]
    assert staged > 0  # it really died mid-staging
    _assert_recovers(database_url, before)


def test_sigkill_inside_the_swap_transaction(refresh_env, kommo_env, database_url):
    # A change to swap, so the killed transaction would have had something to write.
    lead = next(lead for lead in kommo_env.dataset.iter_leads()
                if lead["status_id"] == 79790637 and WINDOW[0] <= lead["created_at"] < WINDOW[1])
    kommo_env.dataset.update_lead(lead["id"], status_id=79790640)
    before = production_checksum(database_url)
    kill_inside_transaction(database_url, "run_kommo_full_refresh", lambda: start_refresh(refresh_env))
    _assert_recovers(database_url, before)
    status = fetch_one(database_url, "SELECT kommo_status_id FROM bookings WHERE source_payload_id = %s",
                       (f"kommo:{lead['id']}",))[0]
    assert status == 79790640  # the next run did apply the change


def test_postgres_restart_mid_run(refresh_env, kommo_env, database_url, pg_server):
    if pg_server is None:
        pytest.skip("KOMMO_TEST_ADMIN_URL points at an external server that this suite may not restart")
    kommo_env.set_latency(150)
    before = production_checksum(database_url)
    proc = start_refresh(refresh_env)
    wait_until(lambda: _requests_to(kommo_env, "/api/v4/leads") >= 2, what="lead pages")
    pg_server.restart()
    out, _ = proc.communicate(timeout=120)
    kommo_env.set_latency(0)
    assert proc.returncode != 0
    assert "FAILURE" in out
    # the run closed itself once the server was back
    closed = fetch_all(database_url, "SELECT status, error FROM kommo_import_runs ORDER BY started_at DESC LIMIT 1")[0]
    assert closed[0] == "failed" and closed[1]
    assert production_checksum(database_url) == before
    assert run_job("kommo_full_refresh_job").success


def test_two_refreshes_at_once_swap_exactly_once(refresh_env, kommo_env, database_url, tmp_path):
    kommo_env.set_latency(50)
    before_runs = fetch_one(database_url, "SELECT count(*) FROM kommo_import_runs")[0]
    # Two hosts: each its own Dagster instance (one folder's SQLite storage is not for concurrent writers).
    homes = [tmp_path / "host-a", tmp_path / "host-b"]
    for home in homes:
        home.mkdir()
    procs = [start_refresh({**refresh_env, "DAGSTER_HOME": str(home)}) for home in homes]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outputs
    refused = outputs[[p.returncode for p in procs].index(1)]
    assert "another Kommo import is running" in refused
    runs = fetch_all(database_url, "SELECT status, swap_counts IS NOT NULL FROM kommo_import_runs"
                                   " ORDER BY started_at OFFSET %s", (before_runs,))
    assert runs == [("succeeded", True)]
