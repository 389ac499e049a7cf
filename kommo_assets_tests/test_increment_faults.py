"""Faults during an incremental sync: SIGKILL of a real sync process while it fetches and inside its apply
transaction, and Kommo answering 429 / 5xx / 401. Each time production and the sync cursor stay exactly as
they were, and the next sync applies every change once."""

import subprocess
import sys

import psycopg
import pytest

from kommo_assets.db import connect
from kommo_assets.db.windows import sync_cursor
from kommo_assets.dev.simulator import SimulatorConfig
from kommo_assets.scope import window_for
from kommo_assets_tests.helpers import fetch_one, production_checksum, run_job
from kommo_assets_tests.test_full_refresh import WINDOW
from kommo_assets_tests.test_kill import (  # noqa: F401 - refresh_env is a fixture
    kill,
    kill_inside_transaction,
    refresh_env,
    wait_until,
)

SYNC = "kommo_incremental_sync_job"
_RUN_SYNC = ("import dagster as dg; from kommo_assets.definitions import defs; "
             "r = defs.resolve_job_def('kommo_incremental_sync_job').execute_in_process("
             "instance=dg.DagsterInstance.get(), raise_on_error=False); raise SystemExit(0 if r.success else 1)")


def start_sync(env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _RUN_SYNC], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _cursor(url: str):
    with connect(url) as conn:
        return sync_cursor(conn, [window_for(SimulatorConfig.year)])


def _changes(sim, count: int = 40) -> dict[int, int]:
    """Prices changed on ``count`` leads of the refreshed window: lead id -> new price."""
    leads = [lead for lead in sim.dataset.iter_leads(window=WINDOW) if lead["status_id"] != 143][:count]
    prices = {lead["id"]: 100_000 + n for n, lead in enumerate(leads)}
    for lead_id, price in prices.items():
        sim.dataset.update_lead(lead_id, price=price)
    return prices


def _applied(url: str, prices: dict[int, int]) -> bool:
    rows = dict(psycopg.connect(url).execute(
        "SELECT lead_code, value_amount FROM sales_leads WHERE lead_code = ANY(%s)",
        ([f"kommo:{lead_id}" for lead_id in prices],)).fetchall())
    return all(rows.get(f"kommo:{lead_id}") == price for lead_id, price in prices.items())


def _assert_next_sync_applies_once(url: str, prices: dict[int, int], sim) -> None:
    # At once: the killed run's owner lock died with its process, so the next start closes it.
    result = run_job(SYNC)
    assert result.success
    assert _applied(url, prices)
    after = production_checksum(url)
    assert run_job(SYNC).success  # nothing left: nothing changes
    assert production_checksum(url) == after
    assert fetch_one(url, "SELECT count(*) FROM kommo_import_runs WHERE status = 'running'")[0] == 0


def test_sigkill_while_the_sync_fetches(refresh_env, kommo_env, database_url):  # noqa: F811
    prices = _changes(kommo_env)
    before, cursor = production_checksum(database_url), _cursor(database_url)
    kommo_env.set_latency(300)
    proc = start_sync(refresh_env)
    wait_until(lambda: kommo_env.stats()["by_path"].get("/api/v4/leads", 0) >= 1, what="the changed leads")
    kill(proc)
    kommo_env.set_latency(0)
    assert production_checksum(database_url) == before
    assert _cursor(database_url) == cursor
    _assert_next_sync_applies_once(database_url, prices, kommo_env)


def test_sigkill_inside_the_apply_transaction(refresh_env, kommo_env, database_url):  # noqa: F811
    prices = _changes(kommo_env, 5)
    before, cursor = production_checksum(database_url), _cursor(database_url)
    kill_inside_transaction(database_url, "run_kommo_increment", lambda: start_sync(refresh_env))
    assert production_checksum(database_url) == before
    assert _cursor(database_url) == cursor
    _assert_next_sync_applies_once(database_url, prices, kommo_env)


@pytest.mark.parametrize("status, path", [(429, "/api/v4/events"), (503, "/api/v4/leads"),
                                          (401, "/api/v4/contacts")])
def test_kommo_failing_during_a_sync_applies_nothing(kommo_env, database_url, status, path):
    assert run_job("kommo_full_refresh_job").success
    prices = _changes(kommo_env, 5)
    before, cursor = production_checksum(database_url), _cursor(database_url)
    kommo_env.add_fault(kind="status", path=path, status=status, path_exact=True, times=-1)
    result = run_job(SYNC, fast_retry=True)
    assert not result.success
    record = fetch_one(database_url, "SELECT status, error FROM kommo_import_runs WHERE kind = 'increment'"
                                     " ORDER BY started_at DESC LIMIT 1")
    assert record[0] == "failed" and str(status) in record[1]
    assert kommo_env.config.token not in record[1]
    assert production_checksum(database_url) == before and _cursor(database_url) == cursor
    kommo_env.clear_faults()
    assert run_job(SYNC).success and _applied(database_url, prices)


def test_retried_429s_and_5xx_still_apply_once(kommo_env, database_url):
    assert run_job("kommo_full_refresh_job").success
    prices = _changes(kommo_env, 5)
    kommo_env.add_fault(kind="status", path="/api/v4/events", status=429, path_exact=True, times=2)
    kommo_env.add_fault(kind="status", path="/api/v4/leads", status=502, path_exact=True, times=1)
    assert run_job(SYNC, fast_retry=True).success and _applied(database_url, prices)
