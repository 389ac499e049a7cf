"""The SQL side of the button: request_kommo_refresh's checks, the double click, the polling payload."""

import threading
import uuid

import psycopg
import pytest

from kommo_assets.automation import request_table
from kommo_assets_tests.helpers import fetch_one


def _request(url: str, user) -> dict:
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT * FROM request_kommo_refresh(%s)", (user,))
        return cur.fetchone()


def test_staff_request_is_pending_and_polls_as_the_202_payload(database_url, staff, live_synced):
    request = _request(database_url, staff)
    assert request["status"] == "pending" and request["requested_by"] == staff
    status = request_table.request_status(database_url, request["id"])
    assert {k: status[k] for k in ("request_id", "run_id", "status", "leads", "contacts", "vehicles", "error")} == {
        "request_id": request["id"], "run_id": None, "status": "pending", "leads": None, "contacts": None,
        "vehicles": None, "error": None,
    }
    assert request_table.request_status(database_url, request["id"] + 1000) is None


def test_double_click_returns_the_waiting_request(database_url, staff, live_synced):
    first = _request(database_url, staff)
    assert _request(database_url, staff)["id"] == first["id"]
    # another staff member pressing while it waits gets the same request too
    other = uuid.uuid4()
    fetch_one(database_url, "INSERT INTO kommo_refresh_staff (user_id) VALUES (%s) RETURNING 1", (other,))
    assert _request(database_url, other)["id"] == first["id"]
    # still the same once the sensor has queued it
    assert [r["id"] for r in request_table.claim_pending(database_url, 0)] == [first["id"]]
    assert _request(database_url, staff)["id"] == first["id"]
    # once its run has started, a new press is a new request (a refresh after the running one)
    assert request_table.mark_started(database_url, first["id"], "run-1")
    assert _request(database_url, staff)["id"] != first["id"]
    assert fetch_one(database_url, "SELECT count(*) FROM kommo_refresh_requests")[0] == 2


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
    assert fetch_one(database_url, "SELECT count(*) FROM kommo_refresh_requests")[0] == 1


def test_non_staff_is_refused_with_the_reason(database_url, live_synced):
    stranger = uuid.uuid4()
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"user {stranger} is not staff"):
        _request(database_url, stranger)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not staff"):
        _request(database_url, None)
    assert fetch_one(database_url, "SELECT count(*) FROM kommo_refresh_requests")[0] == 0


def test_live_flag_off_is_refused_with_how_to_turn_it_on(database_url, staff):
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="has not been synced"):
        _request(database_url, staff)
    request_table.sync_flag(database_url, request_table.LIVE_FLAG, False)
    with pytest.raises(psycopg.errors.InsufficientPrivilege,
                       match="KOMMO_ENABLE_LIVE is off. Set KOMMO_ENABLE_LIVE=1") as refused:
        _request(database_url, staff)
    assert refused.value.sqlstate == "42501"
    assert fetch_one(database_url, "SELECT count(*) FROM kommo_refresh_requests")[0] == 0


def test_flag_sync_moves_updated_at_only_on_change(database_url):
    request_table.sync_flag(database_url, "KOMMO_ENABLE_LIVE", True)
    first = fetch_one(database_url, "SELECT updated_at, synced_at FROM kommo_runtime_flags")
    request_table.sync_flag(database_url, "KOMMO_ENABLE_LIVE", True)
    second = fetch_one(database_url, "SELECT updated_at, synced_at FROM kommo_runtime_flags")
    assert second[0] == first[0] and second[1] > first[1]
    assert request_table.sync_flag(database_url, "KOMMO_ENABLE_LIVE", False) is False
    assert fetch_one(database_url, "SELECT enabled, updated_at > %s FROM kommo_runtime_flags", (first[0],)) == (
        False, True)
