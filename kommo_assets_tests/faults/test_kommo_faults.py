"""Faults from Kommo, end to end: the real ``kommo_full_refresh_job`` in process against the simulator over
HTTP with a fault injected, on a real Postgres.

Every fault either recovers, and production then holds exactly what a fault-free run produces, or fails
the run cleanly: the import record is ``failed`` (or ``needs_review``) with a message that says what
happened and what to do, production is byte-for-byte unchanged, and the token is nowhere. Where the
code falls short of that today, the test asserts the right outcome and is an expected failure
naming the bug. The matrix and the bugs are in docs/reliability.md.

The Kommo resource here retries as production does (6 retries on the same statuses) but backs off in
milliseconds, so failing faults exhaust their retries quickly.
"""

from __future__ import annotations

import threading
import time

import pytest

from kommo_assets.db.runs import get_run
from kommo_assets.simulator import LeadQuery
from kommo_assets_tests.faults.support import (
    Scan,
    assert_matches_expected,
    materializations,
    normalized_production,
    run,
    step_failure,
)
from kommo_assets_tests.helpers import fetch_all, fetch_one, production_checksum
from kommo_assets_tests.test_full_refresh import WINDOW, expected_snapshot

LEADS = "/api/v4/leads"
CONTACTS = "/api/v4/contacts"
RETRY_LATER = "the run can be retried later"

pytestmark = pytest.mark.timeout(120)


def fired(sim) -> list[int]:
    return [rule["fired"] for rule in sim.faults()]


def window_ids(sim) -> list[int]:
    """Ids of the leads the server lists for the 2025 window (all statuses), in page order."""
    query = LeadQuery(created_from=WINDOW[0], created_to=WINDOW[1] - 1)
    return sim.dataset.find_lead_ids(query, 0, 1_000_000)


def a_booking_on_page_1(sim) -> int:
    """A lead of page 1 that becomes a booking (so its coming and going shows in production)."""
    return next(lead["id"] for lead in sim.dataset.leads(window_ids(sim)[5:250]) if lead["status_id"] != 143)


def assert_recovered(env, baseline, result) -> dict:
    """The run succeeded and production is exactly what the fault-free baseline run produced."""
    assert result.success, step_failure(result)
    record = get_run(env.url, result.run_id)
    assert record["status"] == "succeeded" and record["error"] is None
    assert normalized_production(env.url) == baseline.normalized
    assert_matches_expected(env.url, baseline.expected)
    return record


def assert_failed_cleanly(env, result, *, status: str = "failed", says: tuple[str, ...], todo: str,
                          step: str = "kommo_staging") -> dict:
    """The run failed, its record says what happened and what to do (so does Dagster's step failure),
    production is unchanged, and the token appears in neither."""
    assert not result.success
    record = get_run(env.url, result.run_id)
    assert record["status"] == status and record["finished_at"] is not None, record
    for text in (*says, todo):
        assert text in record["error"], (text, record["error"])
    if status == "failed":
        shown = step_failure(result, step)
        for text in (*says, todo):
            assert text in shown, (text, shown)
    assert production_checksum(env.url) == env.before
    assert fetch_one(env.url, "SELECT count(*) FROM kommo_import_runs WHERE status = 'running'")[0] == 0
    scan = Scan()
    scan.add_database(env.url)
    for event in result.all_events:
        scan.add(f"event {event.event_type_value}", repr(event))
    assert scan.leaks(env.token) == []
    return record


# --- faults the run recovers from ----------------------------------------------------------------


def test_429_with_an_html_body_and_no_retry_after_is_waited_out(fault_env, baseline):
    env = fault_env(start="empty")
    env.sim.add_fault(kind="status", path=LEADS, status=429, after=1, times=3)
    env.sim.add_fault(kind="status", path=CONTACTS, status=429, times=1)
    result = run()
    assert fired(env.sim) == [3, 1]
    assert_recovered(env, baseline, result)
    assert materializations(result)["stg_kommo_leads"]["kommo_429s"] >= 4


def test_a_burst_of_500_502_503_is_retried(fault_env, baseline):
    env = fault_env(start="empty")
    for status in (500, 502, 503):
        env.sim.add_fault(kind="status", path=LEADS, status=status, times=1)
    env.sim.add_fault(kind="status", path=CONTACTS, status=502, times=2)
    env.sim.add_fault(kind="status", path="/api/v4/leads/custom_fields/1234163", status=503, times=1)
    result = run()
    assert fired(env.sim) == [1, 1, 1, 2, 1]
    record = assert_recovered(env, baseline, result)
    assert record["stats"]["client"]["retries"] >= 6


def test_connection_resets_are_retried(fault_env, baseline):
    env = fault_env(start="empty")
    env.sim.add_fault(kind="reset", path=LEADS, times=2)
    env.sim.add_fault(kind="reset", path=CONTACTS, after=1, times=1)
    result = run()
    assert fired(env.sim) == [2, 1]
    assert_recovered(env, baseline, result)


@pytest.mark.parametrize("mode", ["honest", "full_length"])
def test_responses_cut_off_mid_json_are_retried(fault_env, baseline, mode):
    # honest: a short Content-Length, so the client sees invalid JSON; full_length: the header promises
    # the whole body, so the client sees the connection break mid-body.
    env = fault_env(start="empty")
    env.sim.add_fault(kind="truncate", mode=mode, path=LEADS, query={"page": "2"}, times=1)
    env.sim.add_fault(kind="truncate", mode=mode, path=CONTACTS, times=1)
    result = run()
    assert fired(env.sim) == [1, 1]
    assert_recovered(env, baseline, result)


def test_a_response_slower_than_the_client_timeout_is_retried(fault_env, baseline):
    env = fault_env(start="empty")
    env.sim.add_fault(kind="slow", delay_s=3.0, path=LEADS, query={"page": "1"}, times=1)
    env.sim.add_fault(kind="slow", delay_s=3.0, path=CONTACTS, times=1)
    result = run(timeout=1.0)
    assert fired(env.sim) == [1, 1]
    record = assert_recovered(env, baseline, result)
    assert record["stats"]["client"]["errors"] >= 2  # the two timeouts


def test_a_spurious_204_in_the_middle_of_the_range_is_asked_again(fault_env):
    # 1200 leads: four pages in the window, so page 2 is in the middle; a 204 there would end the range.
    env = fault_env(start="empty", leads=1200, seed=3)
    env.sim.add_fault(kind="empty", path=LEADS, query={"page": "2"}, times=1)
    result = run()
    assert fired(env.sim) == [1]
    assert result.success, step_failure(result)
    assert_matches_expected(env.url, expected_snapshot(env.sim))


def staged_codes(url: str) -> set[str]:
    return {row[0] for row in fetch_all(url, "SELECT lead_code FROM sales_leads WHERE archived_at IS NULL")}


def test_a_lead_added_while_paging_is_staged_once(fault_env):
    # Kommo gives a new lead the highest id, so it lands on the last page: nothing shifts. The last page
    # may be answered before or after the insert (pages go out concurrently, in no fixed order).
    env = fault_env(start="empty", leads=1200, seed=3)
    before = expected_snapshot(env.sim)
    env.sim.add_fault(kind="mutate", path=LEADS, query={"page": "2"}, op="add_lead",
                      created_at=WINDOW[0] + 3600, status_id=79790637)
    result = run()
    assert fired(env.sim) == [1]
    assert result.success, step_failure(result)
    after = expected_snapshot(env.sim)  # Kommo's data after the insert
    staged = staged_codes(env.url)
    assert set(before) <= staged <= set(after)
    assert_matches_expected(env.url, {code: after[code] for code in staged})
    assert materializations(result)["stg_kommo_leads"]["skipped"].get("duplicate", 0) == 0


def test_a_lead_restored_while_paging_in_order_shifts_the_pages_and_nothing_is_lost_or_doubled(fault_env):
    # A restored (undeleted) lead reappears in the middle of the id order: every later lead moves down one
    # place, so page 2 starts with the last lead of page 1, already read. Pages fetched one at a time.
    env = fault_env(start="empty", leads=1200, seed=3)
    restored = a_booking_on_page_1(env.sim)
    env.sim.dataset.delete_leads([restored])
    before = expected_snapshot(env.sim)
    env.sim.add_fault(kind="mutate", path=LEADS, query={"page": "2"}, op="restore_leads", ids=[restored])
    result = run(max_in_flight=1)
    assert fired(env.sim) == [1]
    assert result.success, step_failure(result)
    # exactly the data as page 1 saw it: the restored lead comes with the next run
    assert staged_codes(env.url) == set(before)
    assert_matches_expected(env.url, before)
    assert materializations(result)["stg_kommo_leads"]["skipped"]["duplicate"] == 1


SHIFT_BUG = ("BUG (kommo_assets/kommo/client.py, KommoClient._lead_pages): offset paging (page=N, order[id]=asc) "
             "has no protection against the list shifting between two pages; the lead that crosses the page "
             "boundary is never listed and the swap archives it and deactivates its booking. See "
             "docs/reliability.md, bug 2.")


@pytest.mark.xfail(strict=False, reason=SHIFT_BUG)
def test_a_lead_deleted_while_paging_does_not_lose_its_neighbour(fault_env):
    env = fault_env(start="empty", leads=1200, seed=3)
    assert run().success  # production holds every lead
    gone = a_booking_on_page_1(env.sim)  # already read when page 2 is asked for
    before = expected_snapshot(env.sim)
    env.sim.add_fault(kind="mutate", path=LEADS, query={"page": "2"}, op="delete_leads", ids=[gone])
    result = run(max_in_flight=1)
    assert fired(env.sim) == [1]
    after = expected_snapshot(env.sim)
    if result.success:
        live = staged_codes(env.url)
        missing = set(after) - live
        assert not missing, f"leads that exist in Kommo were archived: {sorted(missing)}"
        assert live <= set(before)
    else:
        assert production_checksum(env.url) == env.before


@pytest.mark.xfail(strict=False, reason=SHIFT_BUG)
def test_pages_answered_out_of_order_around_a_restored_lead_lose_nothing(fault_env):
    # With pages fetched concurrently (production), an insertion loses a lead too: here page 3 is slow,
    # pages 1, 2 and 4 are answered first, then a lead of page 1 is restored, then page 3 is answered:
    # it starts one lead earlier than before, and the first lead of page 4 (read already) is skipped.
    env = fault_env(start="empty", leads=1200, seed=3)
    restored = a_booking_on_page_1(env.sim)
    env.sim.dataset.delete_leads([restored])
    before = expected_snapshot(env.sim)
    env.sim.add_fault(kind="slow", delay_s=3.0, path=LEADS, query={"page": "3"})
    for page in (1, 2, 4):  # rules that never fire, to count the requests for the other data pages
        env.sim.add_fault(kind="empty", path=LEADS, query={"page": str(page)}, after=10**9)

    def restore_while_page_3_waits() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            slow, *others = env.sim.faults()
            answered = env.sim.stats()["in_flight"] == 1  # everything but the sleeping page 3
            if slow["fired"] == 1 and all(rule["seen"] >= 1 for rule in others) and answered:
                env.sim.dataset.restore_leads([restored])
                return
            time.sleep(0.01)

    restorer = threading.Thread(target=restore_while_page_3_waits)
    restorer.start()
    result = run()
    restorer.join()
    assert env.sim.dataset.lead(restored) is not None  # the restore happened while paging
    assert result.success, step_failure(result)
    missing = set(before) - staged_codes(env.url)
    assert not missing, f"leads that existed all along were archived: {sorted(missing)}"


# --- faults that fail the run cleanly ------------------------------------------------------------


def test_429_that_never_ends_fails_the_run_cleanly(fault_env):
    env = fault_env()
    env.sim.add_fault(kind="status", path=LEADS, status=429, times=-1)
    result = run()
    assert_failed_cleanly(env, result, says=("Kommo kept failing (HTTP 429) on GET /api/v4/leads", "after 7 attempts"),
                          todo=RETRY_LATER)


def test_a_503_burst_that_outlasts_the_retries_fails_the_run_cleanly_and_keeps_staging(fault_env):
    env = fault_env()
    env.sim.add_fault(kind="status", path=CONTACTS, status=503, times=-1)
    result = run()
    assert_failed_cleanly(env, result, says=("Kommo kept failing (HTTP 503) on GET /api/v4/contacts",
                                             "after 7 attempts"), todo=RETRY_LATER)
    staged = fetch_one(env.url, "SELECT count(*) FROM stg_kommo_leads WHERE run_id = %s", (result.run_id,))[0]
    assert staged > 0  # kept for inspection


def test_connection_resets_that_never_stop_fail_the_run_cleanly(fault_env):
    env = fault_env()
    env.sim.add_fault(kind="reset", path=LEADS, times=-1)
    result = run()
    assert_failed_cleanly(env, result, says=("the connection failed or was cut off", "GET /api/v4/leads"),
                          todo=RETRY_LATER)


def test_responses_always_cut_off_fail_the_run_cleanly(fault_env):
    env = fault_env()
    env.sim.add_fault(kind="truncate", mode="honest", path=LEADS, times=-1)
    result = run()
    assert_failed_cleanly(env, result, says=("a body that is not valid JSON", "GET /api/v4/leads"),
                          todo=RETRY_LATER)


def test_kommo_slower_than_the_timeout_every_time_fails_the_run_cleanly(fault_env):
    env = fault_env()
    env.sim.add_fault(kind="slow", delay_s=1.5, path=LEADS, times=-1)
    result = run(timeout=0.5, max_retries=2)
    assert_failed_cleanly(env, result, says=("no response within 0.5 s", "GET /api/v4/leads", "after 3 attempts"),
                          todo=RETRY_LATER)


def test_a_revoked_token_fails_fast_with_what_to_do(fault_env):
    env = fault_env()
    env.sim.dataset.revoke_token()
    result = run()
    assert_failed_cleanly(env, result, says=("Kommo rejected the access token (HTTP 401)", "revoked or expired"),
                          todo="Create a new long-lived token and set KOMMO_ACCESS_TOKEN")
    assert env.sim.stats()["by_status"] == {"401": 1}  # not retried


def test_a_token_revoked_in_the_middle_of_the_run_fails_it_cleanly(fault_env):
    env = fault_env()
    env.sim.add_fault(kind="mutate", path=CONTACTS, op="revoke_token")
    result = run()
    assert_failed_cleanly(env, result, says=("Kommo rejected the access token (HTTP 401) on GET /api/v4/contacts",),
                          todo="Create a new long-lived token and set KOMMO_ACCESS_TOKEN")


def test_a_blocked_account_403_with_an_html_body_fails_fast_without_retrying(fault_env):
    env = fault_env()
    env.sim.add_fault(kind="status", path=LEADS, status=403, times=-1)  # nginx HTML body
    result = run()
    assert_failed_cleanly(env, result, says=("Kommo refused access (HTTP 403) on GET /api/v4/leads",
                                             "the account is blocked"),
                          todo="Contact Kommo support to unblock it; do not retry until then")
    # a retry would prolong the block: no request is repeated (one already on its way may still land)
    assert fired(env.sim)[0] <= 2


def test_204_persisting_in_the_middle_ends_the_range_and_the_drop_guard_stops_the_swap(fault_env):
    # 600 leads: two pages in the window; page 2 answers 204 twice (the client asks once more), so the
    # snapshot ends after page 1: a drop of about half the leads, which the guard stops.
    env = fault_env()
    env.sim.add_fault(kind="empty", path=LEADS, query={"page": "2"}, times=-1)
    result = run()
    record = assert_failed_cleanly(env, result, status="needs_review", says=("leads dropped by",
                                   "production left unchanged"), todo="re-run with a higher max_drop_ratio")
    first_page = window_ids(env.sim)[:250]
    assert record["leads_count"] == sum(1 for lead in env.sim.dataset.leads(first_page) if lead["status_id"] != 143)
    assert float(record["drop_ratio"]) > 0.3
    assert not [e for e in result.all_events if e.step_key == "kommo_swap"]


@pytest.mark.xfail(
    strict=False,
    reason="BUG (kommo_assets/kommo/client.py, _lead_pages): after a page answers 204 twice, pages after "
    "it that were already in flight are still yielded, so the page in the middle is silently missing; a "
    "hole below max_drop_ratio reaches the swap. See docs/reliability.md.",
)
def test_204_persisting_on_one_page_in_the_middle_never_leaves_a_silent_hole(fault_env):
    # 1500 leads: five pages in the window; losing one (250 of ~1200 = 21%) stays under the drop guard.
    env = fault_env(start="empty", leads=1500, seed=3)
    assert run().success
    before = production_checksum(env.url)
    env.sim.add_fault(kind="empty", path=LEADS, query={"page": "2"}, times=-1)
    result = run()
    if result.success:
        live = {row[0] for row in fetch_all(env.url, "SELECT lead_code FROM sales_leads WHERE archived_at IS NULL")}
        missing = set(expected_snapshot(env.sim)) - live
        assert not missing, f"{len(missing)} leads that exist in Kommo were archived, e.g. {sorted(missing)[:3]}"
    else:
        assert production_checksum(env.url) == before
