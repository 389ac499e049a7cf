"""Tests of the transport against the Kommo simulator over real HTTP (nothing is mocked): authentication,
retries, backoff, Retry-After, bodies that cannot be read, and the token kept out of every message."""

from __future__ import annotations

import logging
import pickle
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig
from kommo_assets.kommo import (
    VEHICLE_FIELD_ID,
    KommoAuthError,
    KommoError,
    KommoResponseError,
    KommoUnavailableError,
)
from kommo_assets_tests.kommo.support import (
    LEADS,
    TOKEN,
    YEAR_FROM,
    YEAR_TO,
    assert_exactly,
    assert_token_free,
    collect,
    fast_client,
    kommo_threads,
    serve_page,
    truth,
)

pytestmark = pytest.mark.timeout(60)

# One request of the client's own, whose answers the faults below replace.
FIELD_PATH = f"/api/v4/leads/custom_fields/{VEHICLE_FIELD_ID}"


def test_a_json_array_instead_of_an_object_is_a_response_error(sim: KommoSimulator) -> None:
    serve_page(sim, LEADS, 1, [])
    with fast_client(sim, max_in_flight=1) as client, pytest.raises(KommoResponseError) as caught:
        collect(client)
    assert "JSON list instead of an object" in str(caught.value)
    assert client.stats.retries == 0


def test_a_redirect_is_not_followed(sim: KommoSimulator) -> None:
    sim.add_fault(
        kind="status",
        path=FIELD_PATH,
        path_exact=True,
        status=301,
        times=-1,
        headers={"Location": "https://www.kommo.com/"},
    )
    with fast_client(sim) as client, pytest.raises(KommoResponseError) as caught:
        client.get_custom_field(VEHICLE_FIELD_ID)
    assert "HTTP 301" in str(caught.value) and "KOMMO_BASE_URL" in str(caught.value)
    assert client.stats.requests == 1


# --- authentication ------------------------------------------------------------------------------


def test_a_revoked_token_fails_fast_without_retries(sim: KommoSimulator) -> None:
    sim.dataset.revoke_token()
    with fast_client(sim) as client:
        started = time.monotonic()
        with pytest.raises(KommoAuthError) as caught:
            list(client.iter_lead_pages(YEAR_FROM, YEAR_TO))
        assert time.monotonic() - started < 2
        assert client.stats.retries == 0
    assert "HTTP 401" in str(caught.value) and "KOMMO_ACCESS_TOKEN" in str(caught.value)
    assert f"GET {LEADS}" in str(caught.value)
    assert caught.value.status == 401
    assert_token_free(caught.value)
    # Every slice's first request got its 401 at once; none was retried.
    assert sim.stats()["by_status"] == {"401": sim.stats()["requests"]}
    assert sim.stats()["requests"] <= 6


def test_a_banned_account_raises_an_auth_error() -> None:
    config = SimulatorConfig(leads=10, rate_limit_rps=1.0, ban_after_violations=1)
    with KommoSimulator(config) as simulator, fast_client(simulator, max_rps=50.0) as client:
        client.get_custom_field(VEHICLE_FIELD_ID)
        with pytest.raises(KommoAuthError) as caught:
            client.get_custom_field(VEHICLE_FIELD_ID)  # 429 (the violation that bans the account), then 403
    message = str(caught.value)
    assert "HTTP 403" in message and "support" in message and "do not retry" in message
    assert_token_free(caught.value)
    assert simulator.stats()["banned"] is True


def test_errors_survive_pickling_for_other_processes() -> None:
    error = KommoUnavailableError("Kommo kept failing", method="GET", path=LEADS, page=7, status=503)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.path, copy.page, copy.status) == ("Kommo kept failing", LEADS, 7, 503)
    assert isinstance(copy, KommoError)


# --- failures and retries ------------------------------------------------------------------------


def test_a_burst_of_server_errors_is_retried_and_the_data_is_complete(sim: KommoSimulator) -> None:
    sim.add_fault(kind="status", path=LEADS, after=2, times=3, status=500)
    sim.add_fault(kind="status", path=LEADS, after=6, times=1, status=502)
    with fast_client(sim) as client:
        leads = collect(client)
        stats = client.stats
    assert_exactly(leads, truth(sim))
    assert stats.retries == 4 and stats.by_status[500] == 3 and stats.by_status[502] == 1


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "reset"},
        {"kind": "truncate", "mode": "full_length"},
        {"kind": "truncate", "mode": "honest"},
        {"kind": "status", "status": 200, "body": "<html>gateway hiccup</html>", "content_type": "text/html"},
    ],
    ids=["reset", "truncated-body", "truncated-json", "html-200"],
)
def test_broken_responses_are_retried(sim: KommoSimulator, fault: dict) -> None:
    sim.add_fault(path=LEADS, after=1, times=2, **fault)
    with fast_client(sim) as client:
        leads = collect(client)
        stats = client.stats
    assert_exactly(leads, truth(sim))
    assert stats.retries == 2 and stats.errors == 2


def test_a_slow_answer_beyond_the_timeout_is_retried(sim: KommoSimulator) -> None:
    # A timeout that a normal answer never reaches, even on a machine busy with other test workers.
    sim.add_fault(kind="slow", path=LEADS, after=1, times=1, delay_s=2.5)
    with fast_client(sim, timeout=1.0) as client:
        leads = collect(client)
        assert client.stats.retries == 1
    assert_exactly(leads, truth(sim))


def test_persistent_failure_raises_unavailable_after_the_retries(sim: KommoSimulator) -> None:
    sim.add_fault(kind="status", path=LEADS, after=2, times=-1, status=503)
    with fast_client(sim, max_retries=2, max_in_flight=1) as client:
        with pytest.raises(KommoUnavailableError) as caught:
            collect(client)
    message = str(caught.value)
    assert message == (
        "Kommo kept failing (HTTP 503) on GET /api/v4/leads page 3 after 3 attempts; "
        "the run can be retried later."
    )
    assert caught.value.page == 3 and caught.value.status == 503
    assert_token_free(caught.value)
    assert kommo_threads() == []
    assert sim.faults()[0]["fired"] == 3


def test_persistent_timeouts_name_the_timeout(sim: KommoSimulator) -> None:
    sim.add_fault(kind="slow", path=FIELD_PATH, path_exact=True, times=-1, delay_s=0.6)
    with (
        fast_client(sim, timeout=0.2, max_retries=1) as client,
        pytest.raises(KommoUnavailableError) as caught,
    ):
        client.get_custom_field(VEHICLE_FIELD_ID)
    assert "no response within 0.2 s" in str(caught.value)
    assert f"GET {FIELD_PATH} after 2 attempts" in str(caught.value)


def test_an_unexpected_client_error_is_not_retried(sim: KommoSimulator) -> None:
    sim.add_fault(kind="status", path=LEADS, times=-1, status=400)
    with fast_client(sim, max_in_flight=1) as client, pytest.raises(KommoResponseError) as caught:
        collect(client)
    assert "Unexpected HTTP 400 on GET /api/v4/leads page 1" in str(caught.value)
    assert client.stats.retries == 0


def test_throttling_is_retried_after_cooling_down_and_honours_retry_after(
    sim: KommoSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    sim.add_fault(kind="status", path=LEADS, after=1, times=1, status=429)
    sim.add_fault(kind="status", path=LEADS, after=4, times=1, status=429, headers={"Retry-After": "1"})
    with fast_client(sim) as client:
        started = time.monotonic()
        leads = collect(client)
        elapsed = time.monotonic() - started
        stats = client.stats
    assert_exactly(leads, truth(sim))
    assert stats.throttled_429 == 2 and stats.retries == 2
    assert elapsed >= 0.95  # Retry-After: 1 held every thread back, not just the throttled one
    assert "pacing down to 180.00 requests/s" in caplog.text


def test_retries_are_logged_and_the_token_never_is(
    sim: KommoSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sim.add_fault(kind="status", path=LEADS, after=1, times=1, status=500)
    sim.add_fault(kind="reset", path=LEADS, after=3, times=1)
    with fast_client(sim) as client:
        collect(client)
        list(client.iter_contact_batches([30_000_001, 30_000_002]))
        sim.dataset.revoke_token()
        with pytest.raises(KommoError):
            client.get_custom_field(VEHICLE_FIELD_ID)
    ours = [r for r in caplog.records if r.name == "kommo_assets.kommo"]
    assert any(r.levelno == logging.WARNING and "HTTP 500" in r.getMessage() for r in ours)
    assert any(
        r.levelno == logging.DEBUG and "GET /api/v4/leads page 1 -> 200" in r.getMessage() for r in ours
    )
    assert TOKEN not in caplog.text
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("wait", ["3600", "http-date"])
def test_a_retry_after_beyond_the_cap_fails_at_once_naming_the_wait(sim: KommoSimulator, wait: str) -> None:
    """A Retry-After longer than a run waits out (300 s) is not waited out on every attempt: the first
    one fails the run, saying how long Kommo asked to wait."""
    in_an_hour = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    header = in_an_hour if wait == "http-date" else wait
    sim.add_fault(kind="status", path=LEADS, status=429, times=-1, headers={"Retry-After": header})
    with fast_client(sim, max_in_flight=1) as client, pytest.raises(KommoUnavailableError) as caught:
        started = time.monotonic()
        collect(client)
    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert "asked to wait 3600 s (Retry-After)" in message or "asked to wait 3599 s (Retry-After)" in message
    assert "more than the 300 s a run waits out" in message and "GET /api/v4/leads page 1" in message
    assert caught.value.status == 429
    assert client.stats.retries == 0 and client.stats.requests == 1
    assert sim.faults()[0]["fired"] == 1
    assert_token_free(caught.value)
    assert kommo_threads() == []


def test_a_retry_after_within_the_cap_is_still_waited_out(sim: KommoSimulator) -> None:
    sim.add_fault(kind="status", path=FIELD_PATH, path_exact=True, status=503, times=1,
                  headers={"Retry-After": "1"})
    with fast_client(sim) as client:
        started = time.monotonic()
        assert client.get_custom_field(VEHICLE_FIELD_ID) == sim.dataset.field(VEHICLE_FIELD_ID)
        assert time.monotonic() - started >= 0.95
        assert client.stats.retries == 1


DEPTH = 100_000  # far beyond what the JSON decoder's recursion allows


def deeply_nested_page() -> str:
    """A page of one lead whose custom field value is nested DEPTH levels deep, as raw JSON text."""
    created = int(datetime(2025, 3, 1, tzinfo=UTC).timestamp())
    nested = "[" * DEPTH + "]" * DEPTH
    lead = f'{{"id": 1, "created_at": {created}, "updated_at": {created}, "custom": {nested}}}'
    return f'{{"_page": 1, "_links": {{}}, "_embedded": {{"leads": [{lead}]}}}}'


def test_deeply_nested_json_in_a_page_is_a_response_error_not_a_recursion_error(sim: KommoSimulator) -> None:
    sim.add_fault(kind="status", path=LEADS, status=200, times=-1, body=deeply_nested_page(),
                  content_type="application/hal+json")
    with fast_client(sim) as client, pytest.raises(KommoResponseError) as caught:
        collect(client)
    message = str(caught.value)
    assert "GET /api/v4/leads page" in message and "nested too deeply to decode" in message
    assert "this is not retried" in message
    assert client.stats.retries == 0
    assert_token_free(caught.value)  # no RecursionError behind it either
    assert kommo_threads() == []


def test_deeply_nested_json_in_an_error_body_still_names_the_status(sim: KommoSimulator) -> None:
    sim.add_fault(kind="status", path=FIELD_PATH, path_exact=True, status=400, times=-1,
                  body="[" * DEPTH + "]" * DEPTH, content_type="application/problem+json")
    with fast_client(sim) as client, pytest.raises(KommoResponseError) as caught:
        client.get_custom_field(VEHICLE_FIELD_ID)
    expected = f"Unexpected HTTP 400 on GET {FIELD_PATH}. Kommo answered. Check KOMMO_BASE_URL"
    assert str(caught.value).startswith(expected)
    assert_token_free(caught.value)
