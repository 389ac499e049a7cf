"""Security, end to end: the token never leaves the Authorization header, the run log and staging are
closed to other database roles, only staff may request a refresh, and the live flag off refuses every path.

Everything runs for real: the jobs in process against the simulator over HTTP and Postgres, the request
function in SQL, the sensor and schedules evaluated as the daemon does.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from kommo_assets.automation.schedules import build_schedules
from kommo_assets.db import refresh_requests
from kommo_assets.db.runs import get_run
from kommo_assets.definitions import defs
from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig
from kommo_assets.resources import build_resources
from kommo_assets.settings import LIVE_DISABLED_REASON, refresh_scope
from kommo_assets_tests.faults.support import (
    DRY_RUN,
    FULL_REFRESH,
    LEADS,
    RUN_TABLES,
    SEED,
    STAGING_TABLES,
    Scan,
    run,
    set_code_location_env,
    step_failure,
)
from kommo_assets_tests.helpers import create_database, drop_database, fetch_one, production_checksum
from kommo_assets_tests.test_full_refresh import expected_snapshot

pytestmark = pytest.mark.timeout(180)

CONTACTS = "/api/v4/contacts"
LEADS_PATH = "/api/v4/leads"
REQUEST_SENSOR = "kommo_refresh_request_sensor"


# --- the token -------------------------------------------------------------------------------------


def test_the_scanner_finds_a_planted_token(fault_env, caplog):
    """The scan below is only worth something if it would see a leak: plant one in each kind of place."""
    env = fault_env()
    secret = f"planted-{uuid.uuid4().hex}"
    logging.getLogger("kommo_assets.kommo").warning("debug dump: %s", secret)
    fetch_one(env.url, "INSERT INTO kommo_refresh_requests (requested_by, error) VALUES (%s, %s) RETURNING id",
              (uuid.uuid4(), f"Bearer {secret}"))
    with dg.instance_for_test() as instance:
        @dg.op
        def leaky(context):
            context.log.info(f"token={secret}")

        @dg.job
        def leaky_job():
            leaky()

        result = leaky_job.execute_in_process(instance=instance)
        scan = Scan()
        scan.add_dagster_run(instance, result.run_id)
    scan.add_database(env.url)
    scan.add("python logging", caplog.text)
    scan.add_exceptions([RuntimeError(f"boom {secret}")])
    assert {place.split(":")[0] for place in scan.leaks(secret)} >= {
        f"dagster event log of {result.run_id}", "table kommo_refresh_requests", "python logging",
        "exception RuntimeError"}


def test_the_token_appears_nowhere_after_failing_runs(fault_env, caplog, capfd):
    """Five failing runs, each failing in a different place, all with the real token configured: the
    token is in no Dagster event record (messages, errors with their causes, metadata), run record, Python
    log record at DEBUG, console output, exception, run-log column or staging/production row."""
    caplog.set_level(logging.DEBUG)
    env = fault_env()
    sim, token = env.sim, env.token
    runs: dict[str, dg.ExecuteInProcessResult] = {}
    with dg.instance_for_test() as instance:
        # 1. a Kommo error page that echoes the Authorization header back (some proxies do)
        sim.add_fault(kind="status", path="/api/v4/leads/custom_fields/", status=400, content_type="application/problem+json",
                      body=json.dumps({"title": "Bad Request", "detail": f"Authorization: Bearer {token} rejected"}))
        runs["400 echoing the token"] = run(instance=instance)
        sim.clear_faults()
        # 2. a 503 burst that outlasts the retries, after the leads were staged
        sim.add_fault(kind="status", path=CONTACTS, status=503, times=-1)
        runs["503 burst"] = run(instance=instance, max_retries=2)
        sim.clear_faults()
        # 3. connections reset and bodies cut off until the retries run out (requests' own exception texts)
        sim.add_fault(kind="reset", path=LEADS_PATH, times=3)
        sim.add_fault(kind="truncate", path=LEADS_PATH, times=-1)
        runs["resets and cut-off bodies"] = run(instance=instance, max_retries=2)
        sim.clear_faults()
        # 4. a drop beyond max_drop_ratio: needs_review, with the change preview stored
        in_window = sorted(int(code.split(":")[1]) for code in expected_snapshot(sim))
        sim.dataset.delete_leads(in_window[: len(in_window) // 2])
        runs["needs_review"] = run(instance=instance)
        # 5. the token revoked in Kommo while still configured here: 401
        sim.dataset.revoke_token()
        runs["401 revoked"] = run(instance=instance)

        assert all(not result.success for result in runs.values())
        statuses = [get_run(env.url, r.run_id)["status"] for r in runs.values()]
        assert statuses == ["failed", "failed", "failed", "needs_review", "failed"]
        errors = [get_run(env.url, r.run_id)["error"] for r in runs.values()]
        assert "Bearer <redacted> rejected" in errors[0]  # the echo was there, redacted
        assert "HTTP 401" in errors[4] and "HTTP 503" in errors[1]

        scan = Scan()
        for result in runs.values():
            scan.add_dagster_run(instance, result.run_id)
    scan.add_database(env.url)
    scan.add_process_output(caplog, capfd)
    # the scan really covered the failures: their messages, the client's DEBUG lines, staged payloads
    text = "\n".join(piece for _, piece in scan.pieces)
    for seen in ("Kommo kept failing (HTTP 503)", "rejected the access token (HTTP 401)", "leads dropped by",
                 "GET /api/v4/leads page 1 -> 200", "table stg_kommo_leads", "\"deactivate\""):
        assert seen in text or any(seen in where for where, _ in scan.pieces), seen
    assert sim.stats()["by_status"].get("200", 0) > 10  # the token was in use
    assert scan.leaks(token) == []
    assert production_checksum(env.url) == env.before


# --- database roles --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def intruder(baseline, pg_admin_url):
    """A login role with no privileges, connected to a database holding a succeeded and a failed run."""
    name, url = create_database(pg_admin_url, baseline.name, prefix="kommo_fault")
    role = f"intruder_{uuid.uuid4().hex[:8]}"
    sim = KommoSimulator(SimulatorConfig(leads=LEADS, seed=SEED, token=f"intruder-{uuid.uuid4().hex}"))
    with sim, pytest.MonkeyPatch.context() as mp:
        set_code_location_env(mp, url, sim)
        sim.add_fault(kind="status", path=CONTACTS, status=503, times=-1)
        assert not run(max_retries=1).success  # a failed run: its staging stays for inspection
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    conn = psycopg.connect(psycopg.conninfo.make_conninfo(url, user=role), autocommit=True)
    try:
        assert conn.execute("SELECT current_user").fetchone()[0] == role
        yield url, conn
    finally:
        conn.close()
        drop_database(pg_admin_url, name)
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


PRIVATE_TABLES = (*RUN_TABLES, *STAGING_TABLES)


@pytest.mark.parametrize("table", PRIVATE_TABLES)
def test_a_role_without_grants_cannot_read_or_write_the_run_log_and_staging(intruder, table):
    url, conn = intruder
    rows = fetch_one(url, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))[0]
    if table in ("kommo_import_runs", "stg_kommo_leads", "stg_kommo_contacts"):
        assert rows > 0  # there is something to steal
    for statement in ("SELECT * FROM {}", "DELETE FROM {}", "TRUNCATE {}", "COPY {} TO STDOUT"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute(sql.SQL(statement).format(sql.Identifier(table)))
    assert fetch_one(url, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))[0] == rows


@pytest.mark.parametrize(
    "call",
    [
        "SELECT kommo_change_preview((SELECT NULL::uuid))",
        "SELECT run_kommo_full_refresh('00000000-0000-0000-0000-000000000000')",
        "SELECT request_kommo_refresh('00000000-0000-0000-0000-000000000000')",
        "SELECT kommo_refresh_request_status(1)",
        "SELECT * FROM kommo_snapshot('00000000-0000-0000-0000-000000000000')",
        "SELECT close_kommo_import_run('00000000-0000-0000-0000-000000000000', 'failed', 'x')",
    ],
)
def test_the_functions_do_not_open_the_tables_to_a_role_without_grants(intruder, call):
    # no project function is executable by PUBLIC; the two the app calls run as their owner, so only the
    # kommo_app role may execute them (kommo_assets_tests/db/test_privileges.py)
    _, conn = intruder
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
        conn.execute(call)


# --- the request table -----------------------------------------------------------------------------


def _request(url: str, user) -> dict:
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("SELECT * FROM request_kommo_refresh(%s)", (user,)).fetchone()


def test_requests_from_non_staff_are_refused(fault_env):
    env = fault_env(start="empty")
    refresh_requests.sync_flag(env.url, refresh_requests.LIVE_FLAG, True)
    refresh_requests.sync_settings(env.url, {refresh_requests.YEARS_SETTING: refresh_scope({}).as_json(),
                                         refresh_requests.COOLDOWN_SETTING: 10})
    staff = uuid.uuid4()
    fetch_one(env.url, "INSERT INTO kommo_refresh_staff (user_id) VALUES (%s) RETURNING 1", (staff,))
    for user in (uuid.uuid4(), None):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="is not staff") as refused:
            _request(env.url, user)
        assert refused.value.sqlstate == "42501"
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        _request(env.url, "x' OR 1=1 --")  # typed as uuid: never compared as text
    # a staff member removed from the table is refused from then on
    assert _request(env.url, staff)["status"] == "pending"
    fetch_one(env.url, "DELETE FROM kommo_refresh_staff WHERE user_id = %s RETURNING 1", (staff,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="is not staff"):
        _request(env.url, staff)
    assert fetch_one(env.url, "SELECT count(*) FROM kommo_refresh_requests")[0] == 1


# --- the live flag ---------------------------------------------------------------------------------


def _tick_request_sensor(instance: dg.DagsterInstance, cursor: str | None = None):
    sensor = defs.resolve_sensor_def(REQUEST_SENSOR)
    resources = build_resources()
    context = dg.build_sensor_context(instance=instance, cursor=cursor, sensor_name=REQUEST_SENSOR,
                                      resources={key: resources[key] for key in sensor.required_resource_keys})
    with context:
        return sensor.evaluate_tick(context)


@pytest.mark.parametrize("job", [FULL_REFRESH, DRY_RUN])
@pytest.mark.parametrize("flag", ["0", "off", None])
def test_live_flag_off_refuses_both_jobs_before_anything_happens(fault_env, monkeypatch, job, flag):
    env = fault_env()
    if flag is None:
        monkeypatch.delenv("KOMMO_ENABLE_LIVE")
    else:
        monkeypatch.setenv("KOMMO_ENABLE_LIVE", flag)
    result = run(job)
    assert not result.success
    assert LIVE_DISABLED_REASON in step_failure(result)
    assert fetch_one(env.url, "SELECT count(*) FROM kommo_import_runs WHERE status = 'running'")[0] == 0
    assert fetch_one(env.url, "SELECT count(*) FROM kommo_import_runs")[0] == 1  # the baseline's only
    assert env.sim.stats()["requests"] == 0
    assert production_checksum(env.url) == env.before


def test_an_unreadable_live_flag_refuses_and_names_the_variable(fault_env, monkeypatch):
    env = fault_env()
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "maybe")
    result = run()
    assert not result.success
    assert "KOMMO_ENABLE_LIVE must be one of 1/true/yes/on or 0/false/no/off, got 'maybe'" in step_failure(result)
    assert env.sim.stats()["requests"] == 0
    assert production_checksum(env.url) == env.before


def test_live_flag_switched_off_during_a_run_stops_it_before_the_swap(fault_env, monkeypatch):
    env = fault_env()
    # the contacts answer is slow; while the staging step waits for it, the flag goes off
    env.sim.add_fault(kind="slow", path=CONTACTS, delay_s=1.5)
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "1")

    def switch_off() -> None:
        deadline = time.monotonic() + 60
        while env.sim.stats()["by_path"].get(CONTACTS, 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        monkeypatch.setenv("KOMMO_ENABLE_LIVE", "0")

    switcher = threading.Thread(target=switch_off)
    switcher.start()
    result = run()
    switcher.join()
    assert not result.success
    assert LIVE_DISABLED_REASON in step_failure(result, "kommo_swap")
    record = get_run(env.url, result.run_id)
    assert record["status"] == "failed" and LIVE_DISABLED_REASON in record["error"]
    assert record["swap_started_at"] is None
    assert production_checksum(env.url) == env.before


def test_live_flag_off_refuses_requests_the_sensor_and_the_schedules(fault_env, monkeypatch):
    env = fault_env(start="empty")
    staff = uuid.uuid4()
    fetch_one(env.url, "INSERT INTO kommo_refresh_staff (user_id) VALUES (%s) RETURNING 1", (staff,))
    with dg.instance_for_test() as instance:
        # live: the sensor copies the flag for the app, a staff request is accepted and waits
        assert _tick_request_sensor(instance).skip_message
        waiting = _request(env.url, staff)
        assert waiting["status"] == "pending"

        monkeypatch.setenv("KOMMO_ENABLE_LIVE", "0")
        tick = _tick_request_sensor(instance)
        assert tick.run_requests == []
        row = fetch_one(env.url, "SELECT status, reason FROM kommo_refresh_requests WHERE id = %s", (waiting["id"],))
        assert row == ("refused", LIVE_DISABLED_REASON)
        # the app is refused from now on, with what to do
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="KOMMO_ENABLE_LIVE is off. Set KOMMO_ENABLE_LIVE=1"):
            _request(env.url, staff)
        assert fetch_one(env.url, "SELECT count(*) FROM kommo_refresh_requests")[0] == 1
    for schedule in build_schedules({}):
        data = schedule.evaluate_tick(dg.build_schedule_context())
        assert data.run_requests == [] and data.skip_message == LIVE_DISABLED_REASON
    assert env.sim.stats()["requests"] == 0
