"""The SQL side of the button: request_kommo_refresh's checks, whose request it is, the year, the double
click and the cooldown, and the polling payload."""

import threading
import time
import uuid
from datetime import timedelta

import psycopg
import pytest

from kommo_assets.db import refresh_requests
from kommo_assets.scope import YearScope, current_year
from kommo_assets_tests.helpers import fetch_one

THIS_YEAR = current_year()  # the real date: no request names a year, so they are all for this one
PAYLOAD_KEYS = {"request_id", "run_id", "status", "year", "leads", "contacts", "vehicles", "error", "requested_at",
                "updated_at", "finished_at"}


def _request(url: str, user=None, year=None, *, session: dict[str, str] | None = None) -> dict:
    """Presses the button; ``session`` are settings the caller's transaction carries (its identity)."""
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        for name, value in (session or {}).items():
            cur.execute("SELECT set_config(%s, %s, true)", (name, value))
        cur.execute("SELECT * FROM request_kommo_refresh(%s, %s)", (user, year))
        return cur.fetchone()


def _poll(url: str, request_id: int, user=None, *, session: dict[str, str] | None = None):
    with psycopg.connect(url) as conn:
        for name, value in (session or {}).items():
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        return conn.execute("SELECT kommo_refresh_request_status(%s, %s)", (request_id, user)).fetchone()[0]


def _add_staff(url: str) -> uuid.UUID:
    user = uuid.uuid4()
    fetch_one(url, "INSERT INTO kommo_refresh_staff (user_id) VALUES (%s) RETURNING 1", (user,))
    return user


def _finish(url: str, request_id: int, ago: timedelta, status: str = "succeeded") -> None:
    """Moves the clock: the request's run ended ``ago`` before now."""
    fetch_one(url, "UPDATE kommo_refresh_requests SET status = %s, finished_at = now() - %s WHERE id = %s "
                   "RETURNING 1", (status, ago, request_id))


def _requests(url: str) -> int:
    return fetch_one(url, "SELECT count(*) FROM kommo_refresh_requests")[0]


def test_staff_request_is_pending_and_polls_as_the_202_payload(database_url, staff, live_synced):
    request = _request(database_url, staff)
    assert request["status"] == "pending" and request["accepted"] is True and request["year"] == THIS_YEAR
    assert request["message"] == f"Kommo refresh of {THIS_YEAR} requested (request #{request['id']})."
    assert "requested_by" not in request
    assert fetch_one(database_url, "SELECT requested_by, year FROM kommo_refresh_requests WHERE id = %s",
                     (request["id"],)) == (staff, THIS_YEAR)
    status = refresh_requests.request_status(database_url, request["id"])
    assert set(status) == PAYLOAD_KEYS  # nothing about who asked
    assert {k: status[k] for k in ("request_id", "run_id", "status", "leads", "contacts", "vehicles", "error")} == {
        "request_id": request["id"], "run_id": None, "status": "pending", "leads": None, "contacts": None,
        "vehicles": None, "error": None,
    }
    assert _poll(database_url, request["id"], staff) == status
    assert refresh_requests.request_status(database_url, request["id"] + 1000) is None


def test_the_status_is_only_for_the_user_who_asked(database_url, staff, live_synced):
    request_id = _request(database_url, staff)["id"]
    other = _add_staff(database_url)
    assert _poll(database_url, request_id, other) is None
    assert _poll(database_url, request_id, None) is None
    assert _poll(database_url, request_id, session={"kommo.user_id": str(other)}) is None
    assert _poll(database_url, request_id, session={"kommo.user_id": str(staff)})["request_id"] == request_id
    # a session's user cannot read someone else's request by naming them
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="is not the signed-in user"):
        _poll(database_url, request_id, staff, session={"kommo.user_id": str(other)})


@pytest.mark.parametrize("identity", ["kommo.user_id", "request.jwt.claims", "request.jwt.claim.sub"])
def test_the_session_user_wins_and_nobody_can_act_as_another(database_url, staff, live_synced, identity):
    stranger = uuid.uuid4()

    def session(user: uuid.UUID) -> dict[str, str]:
        return {identity: f'{{"sub": "{user}", "role": "authenticated"}}' if identity == "request.jwt.claims"
                else str(user)}

    # a stranger passing a staff member's id is refused, whatever the id
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"user_id {staff} is not the signed-in user"):
        _request(database_url, staff, session=session(stranger))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"user {stranger} is not staff"):
        _request(database_url, None, session=session(stranger))
    assert _requests(database_url) == 0
    # staff, signed in: the argument may be left out or name themselves
    request = _request(database_url, None, session=session(staff))
    assert request["accepted"] and _request(database_url, staff, session=session(staff))["id"] == request["id"]
    assert fetch_one(database_url, "SELECT requested_by FROM kommo_refresh_requests")[0] == staff
    assert _poll(database_url, request["id"], session=session(staff))["status"] == "pending"


def test_an_anonymous_postgrest_request_is_nobody_even_with_a_staff_id(database_url, staff, live_synced):
    # PostgREST sets the claims (without sub for the anon key) and request.method on every request
    for session in ({"request.jwt.claims": '{"role": "anon"}'}, {"request.method": "POST"}):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="is not the signed-in user"):
            _request(database_url, staff, session=session)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"user \(none\) is not staff"):
            _request(database_url, None, session=session)
    assert _requests(database_url) == 0


def test_the_year_defaults_to_the_current_one_and_years_outside_the_scope_are_refused(database_url, staff,
                                                                                      live_synced):
    two_ago = THIS_YEAR - 2
    refresh_requests.sync_settings(database_url, {refresh_requests.YEARS_SETTING: YearScope.parse(
        f"{two_ago},{THIS_YEAR}-").as_json()})
    first = _request(database_url, staff)
    assert first["year"] == THIS_YEAR
    _finish(database_url, first["id"], timedelta(hours=1))
    assert _request(database_url, staff, two_ago)["year"] == two_ago
    # the gap, a year before the scope, and a year that has not begun
    for year in (THIS_YEAR - 1, two_ago - 1, THIS_YEAR + 1):
        with pytest.raises(psycopg.errors.InvalidParameterValue,
                           match=f"year {year} is not one of the years requests may ask for "
                                 f"\\({two_ago}, {THIS_YEAR}\\)") as no:
            _request(database_url, staff, year)
        assert "KOMMO_REFRESH_YEARS" in no.value.diag.message_hint
    assert [r for r in fetch_one(database_url, "SELECT array_agg(year ORDER BY id) FROM kommo_refresh_requests")] == [
        [THIS_YEAR, two_ago]]


@pytest.mark.parametrize("raw", ["", "2025", "2025-", "2024,2026", "2023-2024,2026-", "2025-2030", "2030-",
                                 "2024-2025,2025-"])
def test_the_database_reads_the_scope_as_the_code_location_does(database_url, raw):
    """One definition of the years in scope: the request sensor copies KOMMO_REFRESH_YEARS, and the database
    resolves it on its own clock to the same years as the Python side (the real date: an open range runs
    through the current year, a range never past it)."""
    scope = YearScope.parse(raw)
    refresh_requests.sync_settings(database_url, {refresh_requests.YEARS_SETTING: scope.as_json()})
    assert fetch_one(database_url, "SELECT kommo_years_in_scope()")[0] == list(scope.years())


def test_settings_never_synced_refuse_naming_the_variable(database_url, staff):
    refresh_requests.sync_flag(database_url, refresh_requests.LIVE_FLAG, True)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="KOMMO_REFRESH_YEARS has not been synced"):
        _request(database_url, staff)
    refresh_requests.sync_settings(database_url, {refresh_requests.YEARS_SETTING: YearScope.parse("").as_json()})
    with pytest.raises(psycopg.errors.InsufficientPrivilege,
                       match="KOMMO_REQUEST_COOLDOWN_MINUTES has not been synced"):
        _request(database_url, staff)
    assert _requests(database_url) == 0


def test_double_click_and_a_running_refresh_return_the_same_request(database_url, staff, live_synced):
    first = _request(database_url, staff)
    again = _request(database_url, staff)
    assert again["id"] == first["id"] and again["accepted"] is False
    assert again["message"] == (f"A Kommo refresh is already waiting to start (request #{first['id']}, {THIS_YEAR}); "
                                "a new one can be requested 10 minutes after it ends.")
    # another staff member pressing while it waits is refused too, and learns nothing of the request
    other = _request(database_url, _add_staff(database_url))
    assert (other["id"], other["run_id"], other["requested_at"], other["accepted"], other["status"]) == (
        None, None, None, False, "pending")
    assert other["message"] == ("A Kommo refresh requested by someone else is waiting to start; "
                                "a new one can be requested 10 minutes after it ends.")
    # still the same once the sensor has queued it, and while its run runs
    assert [r["id"] for r in refresh_requests.claim_pending(database_url, 0)] == [first["id"]]
    assert _request(database_url, staff)["id"] == first["id"]
    assert refresh_requests.mark_started(database_url, first["id"], "run-1")
    running = _request(database_url, staff)
    assert (running["id"], running["status"], running["run_id"], running["accepted"]) == (
        first["id"], "running", "run-1", False)
    assert running["message"].startswith(f"A Kommo refresh is running (request #{first['id']}, {THIS_YEAR})")
    assert _requests(database_url) == 1


def test_the_cooldown_after_a_refresh_ends(database_url, staff, live_synced):
    first = _request(database_url, staff)
    refresh_requests.mark_started(database_url, first["id"], "run-1")
    ended = refresh_requests.record_finished(database_url, first["id"], dagster_run_id="run-1",
                                          import_run_id=None, error="boom")
    assert ended["status"] == "failed" and ended["finished_at"] is not None  # failed runs count too
    # 9 minutes after it ended: still the last one, with when the next may be asked for
    _finish(database_url, first["id"], timedelta(minutes=9), "failed")
    cooling = _request(database_url, staff)
    assert (cooling["id"], cooling["status"], cooling["accepted"]) == (first["id"], "failed", False)
    assert cooling["retry_after"] == cooling["finished_at"] + timedelta(minutes=10)
    assert cooling["message"].startswith(f"The last Kommo refresh (request #{first['id']}, failed) ended at ")
    assert "the next one can be requested from" in cooling["message"]
    assert "KOMMO_REQUEST_COOLDOWN_MINUTES" in cooling["message"]
    assert _requests(database_url) == 1
    # 11 minutes after: a new request
    _finish(database_url, first["id"], timedelta(minutes=11), "failed")
    second = _request(database_url, staff)
    assert second["accepted"] and second["id"] != first["id"] and second["status"] == "pending"
    # the cooldown follows the setting, and a refused request (it never ran) does not start one
    _finish(database_url, second["id"], timedelta(minutes=11))
    refresh_requests.sync_settings(database_url, {refresh_requests.COOLDOWN_SETTING: 30})
    assert _request(database_url, staff)["id"] == second["id"]
    refresh_requests.sync_settings(database_url, {refresh_requests.COOLDOWN_SETTING: 0.5})
    third = _request(database_url, staff)
    assert third["accepted"]
    assert refresh_requests.refuse_pending(database_url, "off")[0]["id"] == third["id"]
    assert _request(database_url, staff)["accepted"]
    assert _requests(database_url) == 4


def _import_run(url: str, *, dry_run: bool, status: str = "running", ended_ago: timedelta | None = None) -> str:
    """A refresh launched from Dagster (the UI, a schedule): an import record without a request."""
    run_id = str(uuid.uuid4())
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO kommo_import_runs (id, dagster_run_id, job_name, dry_run, created_from, created_to)"
            " VALUES (%s, %s, 'kommo_full_refresh_job', %s, '2025-01-01Z', '2026-01-01Z')",
            (run_id, f"dagster-{run_id[:8]}", dry_run))
        if status != "running":
            conn.execute("UPDATE kommo_import_runs SET status = %s, finished_at = now() - %s WHERE id = %s",
                         (status, ended_ago, run_id))
    return run_id


def test_a_refresh_launched_from_dagster_holds_the_button_too(database_url, staff, live_synced):
    run_id = _import_run(database_url, dry_run=False)
    answer = _request(database_url, staff)
    assert not answer["accepted"] and answer["id"] is None and answer["status"] == "running"
    assert answer["run_id"] is None and run_id[:8] not in answer["message"]  # not the caller's: no run id
    assert answer["message"].startswith("A Kommo refresh started from Dagster is running; ")
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE kommo_import_runs SET status = 'succeeded', finished_at = now() - interval '4 minutes'")
    cooling = _request(database_url, staff)
    assert not cooling["accepted"] and cooling["status"] == "succeeded" and cooling["finished_at"] is None
    finished = fetch_one(database_url, "SELECT finished_at FROM kommo_import_runs")[0]
    assert cooling["retry_after"] == finished + timedelta(minutes=10)
    assert "KOMMO_REQUEST_COOLDOWN_MINUTES" in cooling["message"]
    assert _requests(database_url) == 0
    # A dry run reads Kommo too, but briefly and without a swap: it does not hold the button.
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE kommo_import_runs SET finished_at = now() - interval '11 minutes'")
    _import_run(database_url, dry_run=True)
    assert _request(database_url, staff)["accepted"]


def test_simultaneous_clicks_make_one_request(database_url, staff, live_synced):
    ids, errors = [], []

    def click():
        try:
            ids.append(_request(database_url, staff)["id"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=click) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(ids)) == 1
    assert _requests(database_url) == 1


def test_non_staff_is_refused_with_the_reason(database_url, live_synced):
    stranger = uuid.uuid4()
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"user {stranger} is not staff"):
        _request(database_url, stranger)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not staff"):
        _request(database_url, None)
    assert _requests(database_url) == 0


def test_live_flag_off_is_refused_with_how_to_turn_it_on(database_url, staff):
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="has not been synced"):
        _request(database_url, staff)
    refresh_requests.sync_flag(database_url, refresh_requests.LIVE_FLAG, False)
    with pytest.raises(psycopg.errors.InsufficientPrivilege,
                       match="KOMMO_ENABLE_LIVE is off. Set KOMMO_ENABLE_LIVE=1") as refused:
        _request(database_url, staff)
    assert refused.value.sqlstate == "42501"
    assert _requests(database_url) == 0


def test_flag_sync_moves_updated_at_only_on_change(database_url):
    refresh_requests.sync_flag(database_url, "KOMMO_ENABLE_LIVE", True)
    first = fetch_one(database_url, "SELECT updated_at, synced_at FROM kommo_runtime_flags")
    refresh_requests.sync_flag(database_url, "KOMMO_ENABLE_LIVE", True)
    second = fetch_one(database_url, "SELECT updated_at, synced_at FROM kommo_runtime_flags")
    assert second[0] == first[0] and second[1] > first[1]
    assert refresh_requests.sync_flag(database_url, "KOMMO_ENABLE_LIVE", False) is False
    assert fetch_one(database_url, "SELECT enabled, updated_at > %s FROM kommo_runtime_flags", (first[0],)) == (
        False, True)


def test_setting_sync_moves_updated_at_only_on_change(database_url):
    assert refresh_requests.sync_settings(database_url, {"KOMMO_REFRESH_YEARS": [2025, 2024]}) == {
        "KOMMO_REFRESH_YEARS": [2025, 2024]}
    first = fetch_one(database_url, "SELECT updated_at, synced_at FROM kommo_runtime_settings")
    refresh_requests.sync_settings(database_url, {"KOMMO_REFRESH_YEARS": [2025, 2024]})
    second = fetch_one(database_url, "SELECT updated_at, synced_at FROM kommo_runtime_settings")
    assert second[0] == first[0] and second[1] > first[1]
    refresh_requests.sync_settings(database_url, {"KOMMO_REFRESH_YEARS": [2024]})
    assert fetch_one(database_url, "SELECT value, updated_at > %s FROM kommo_runtime_settings", (first[0],)) == (
        [2024], True)


@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_caller_in_a_snapshot_transaction_is_refused(database_url, staff, live_synced, level):
    # Its snapshot would predate the queue's lock: it could see no open request while one runs.
    first = _request(database_url, staff)
    refresh_requests.claim_pending(database_url, 0)
    refresh_requests.mark_started(database_url, first["id"], "run-1")
    with psycopg.connect(database_url) as conn:
        conn.execute(f"BEGIN ISOLATION LEVEL {level}")
        with pytest.raises(psycopg.errors.InvalidTransactionState, match="READ COMMITTED transaction"):
            conn.execute("SELECT * FROM request_kommo_refresh(%s)", (staff,))
    assert _requests(database_url) == 1


def test_one_request_open_at_a_time_running_included(database_url, staff, live_synced):
    first = _request(database_url, staff)
    refresh_requests.claim_pending(database_url, 0)
    refresh_requests.mark_started(database_url, first["id"], "run-1")
    with pytest.raises(psycopg.errors.UniqueViolation, match="kommo_refresh_requests_one_open"):
        fetch_one(database_url, "INSERT INTO kommo_refresh_requests (requested_by) VALUES (%s) RETURNING 1", (staff,))


def test_a_session_holding_the_project_lock_keys_cannot_hang_the_button(database_url, staff, live_synced):
    keys = fetch_one(database_url, "SELECT array_agg(kommo_lock_key(n)) FROM unnest(ARRAY['import_start', 'swap',"
                                   " 'import_owner', 'refresh_request']) AS n")[0]
    with psycopg.connect(database_url, autocommit=True) as holder:
        for key in keys:  # any session may take any advisory key
            holder.execute("SELECT pg_advisory_lock(%s)", (key,))
        started = time.monotonic()
        answer = _request(database_url, staff)
        assert answer["accepted"] and time.monotonic() - started < 5
    # Only the owner may lock the queue itself; even then the button answers within 5 s, and says why.
    for mode, message in (("SHARE ROW EXCLUSIVE", "the request queue is busy"),  # another request's
                          ("ACCESS EXCLUSIVE", "lock timeout")):  # a migration's
        with psycopg.connect(database_url) as owner:
            owner.execute(f"LOCK TABLE kommo_refresh_requests IN {mode} MODE")
            started = time.monotonic()
            with pytest.raises(psycopg.errors.LockNotAvailable, match=message):
                _request(database_url, staff)
            assert time.monotonic() - started < 5


def test_an_advisory_key_held_by_a_stranger_does_not_keep_a_dead_import_alive(database_url, pg_admin_url):
    import_id = _import_run(database_url, dry_run=False)  # running, its process gone
    role = f"stranger_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        with psycopg.connect(psycopg.conninfo.make_conninfo(database_url, user=role), autocommit=True) as stranger:
            stranger.execute("SELECT pg_advisory_lock(90903, hashtext(%s))", (import_id,))
            assert not fetch_one(database_url, "SELECT kommo_import_run_owner_alive(%s)", (import_id,))[0]
        with psycopg.connect(database_url, autocommit=True) as owner:
            owner.execute("SELECT pg_advisory_lock(kommo_lock_key('import_owner'), hashtext(%s))", (import_id,))
            assert fetch_one(database_url, "SELECT kommo_import_run_owner_alive(%s)", (import_id,))[0]
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f'DROP ROLE "{role}"')
