"""The incremental sync's database side on hand-made staging rows: ``run_kommo_increment`` applies the
staged changed leads, contacts and removals with the full swap's rules, touches nothing outside the leads
it staged, guards against mass deactivation, and moves the cursor (Kommo's clock) forward in the same
transaction. Every increment here is preceded by its preview, whose counts must be what it then does.

The cursor is per window (``kommo_window_coverage``): these tests sync the 2025 window unless they say
otherwise."""

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from kommo_assets.db import connect, refresh_requests, runs
from kommo_assets.db.runs import ImportRuns
from kommo_assets.db.windows import sync_cursor
from kommo_assets.settings import refresh_scope
from kommo_assets_tests.db.test_swap import stage_run
from kommo_assets_tests.db.test_windows import PREVIEWED, Y2025, Y2026, codes, live, rows_of
from kommo_assets_tests.helpers import fetch_all, fetch_one, production_checksum

CLOCK = datetime(2025, 6, 1, 12, tzinfo=UTC)  # Kommo's clock at the full refresh

LEADS = [(1, 900, 79790637, 11), (2, 900, 79790640, 12), (3, 901, 79790637, 11), (4, 901, 91703923, None)]
CONTACTS = [(900, "Ana", "+1", "ana@x"), (901, "Bo", None, None)]


@contextmanager
def records(url: str) -> Iterator[ImportRuns]:
    """The run record on an autocommit connection, as the assets use it."""
    with connect(url, autocommit=True) as conn:
        yield ImportRuns(conn)


def full_refresh(url: str, leads=LEADS, contacts=CONTACTS, *, clock: datetime = CLOCK, window=None) -> str:
    run_id = stage_run(url, leads, contacts, window=window)
    with records(url) as record:
        record.set_kommo_clock(run_id, clock)
    runs.swap(url, run_id)
    return run_id


def stage_increment(url: str, leads=(), contacts=(), removals=(), *, staged: bool = True) -> str:
    """Opens an increment and stages ``leads`` = [(lead_id, contact_id, status_id, vehicle_enum_id[,
    created_at])] as ``stage_run`` does, ``contacts`` = [(contact_id, name, phone, email)] and the deleted
    ``removals`` = [lead_id]."""
    run_id = str(uuid.uuid4())
    with connect(url) as conn:
        ImportRuns(conn).start(run_id=run_id, dagster_run_id=None, job_name="test", triggered_by=None,
                               kind="increment")
        for lead_id, contact_id, status_id, vehicle, *created in leads:
            created_at = created[0] if created else datetime(2025, 3, 1, 10, tzinfo=UTC)
            conn.execute(
                "INSERT INTO stg_kommo_leads (run_id, lead_id, payload, contact_id, status_id, vehicle_enum_id,"
                " delivery_at, created_at, updated_at) VALUES (%s, %s, '{}', %s, %s, %s, %s, %s, %s)",
                (run_id, lead_id, contact_id, status_id, vehicle, created_at, created_at, created_at))
            if vehicle is not None:
                conn.execute("INSERT INTO stg_kommo_booking_vehicles (run_id, lead_id, vehicle_enum_id)"
                             " VALUES (%s, %s, %s)", (run_id, lead_id, vehicle))
        for contact_id, name, phone, email in contacts:
            conn.execute("INSERT INTO stg_kommo_contacts (run_id, contact_id, payload, name, phone, email)"
                         " VALUES (%s, %s, '{}', %s, %s, %s)", (run_id, contact_id, name, phone, email))
        for lead_id in removals:
            conn.execute("INSERT INTO stg_kommo_lead_removals (run_id, lead_id, reason) VALUES (%s, %s, 'deleted')",
                         (run_id, lead_id))
    if staged:
        runs.mark_staged(url, run_id, {})
    return run_id


def apply(url: str, run_id: str, cursor: datetime, max_deactivations: int = 50, windows=(Y2025,)) -> dict:
    """The increment's preview, then the increment: its counts, after checking the preview said them."""
    with records(url) as record:
        preview = record.increment_preview(run_id)
        counts = record.apply_increment(run_id, cursor, max_deactivations, windows)
    assert {k: preview[section][n] for k, (section, n) in PREVIEWED.items()} == {k: counts[k] for k in PREVIEWED}
    return counts


def increment(url: str, leads=(), contacts=(), removals=(), *, cursor: datetime | None = None, **kwargs) -> dict:
    return apply(url, stage_increment(url, leads, contacts, removals), cursor or CLOCK + timedelta(minutes=1),
                 **kwargs)


def cursor(url: str, windows=(Y2025,)) -> datetime:
    """Where an increment of ``windows`` reads from."""
    with connect(url, autocommit=True) as conn:
        return sync_cursor(conn, windows)


def outbox(url: str) -> int:
    return fetch_one(url, "SELECT count(*) FROM zoho_outbox")[0]


def ids(url: str) -> dict[str, tuple]:
    """Lead code -> (sales lead id, booking id): what must stay stable."""
    return {code: (lead, booking) for code, lead, booking in fetch_all(
        url, "SELECT sl.lead_code, sl.id, b.id FROM sales_leads sl"
             " LEFT JOIN bookings b ON b.source_payload_id = sl.lead_code")}


# --- the rules -----------------------------------------------------------------------------------------------

def test_changed_and_new_leads_are_upserted_and_nothing_outside_the_scope_moves(database_url):
    url = database_url
    full_refresh(url)
    full_refresh(url, [(21, 920, 79790637, 11, datetime(2026, 2, 1, tzinfo=UTC))], [(920, "Cy", None, None)],
                 window=Y2026)
    fetch_one(url, "INSERT INTO bookings (channel, status, source_payload_id) VALUES ('manual', 'confirmed', 'web:1')"
                   " RETURNING 1")
    fetch_one(url, "INSERT INTO sales_leads (lead_code, source) VALUES ('web:1', 'Kommo') RETURNING 1")
    untouched = rows_of(url, codes(2, 3, 4, 21) + ["web:1"])
    app_rows = fetch_all(url, "SELECT t::text FROM sales_leads t WHERE lead_code = 'web:1'"
                              " UNION ALL SELECT t::text FROM bookings t WHERE source_payload_id = 'web:1'")
    before_ids, queued = ids(url), outbox(url)

    # lead 1 moves to another booking status and vehicle 13, which production lacks; lead 5 is new
    counts = increment(url, [(1, 900, 79790640, 13), (5, 901, 79790637, 11)])
    assert counts["status"] == "succeeded"
    assert (counts["sales_leads_updated"], counts["sales_leads_added"], counts["sales_leads_archived"]) == (1, 1, 0)
    assert (counts["bookings_updated"], counts["bookings_added"], counts["bookings_deactivated"]) == (1, 1, 0)
    assert counts["vehicles_created"] == 1 and counts["foreign_key_checks"] == "per row"

    status, vehicle, link = fetch_one(url, """
        SELECT b.kommo_status_id, v.kommo_vehicle_id, (SELECT array_agg(lv.kommo_vehicle_id) FROM booking_vehicles bv
                                                         JOIN vehicles lv ON lv.id = bv.vehicle_id
                                                        WHERE bv.booking_id = b.id AND bv."primary")
          FROM bookings b JOIN vehicles v ON v.id = b.vehicle_id WHERE b.source_payload_id = 'kommo:1'""")
    assert (status, vehicle, link) == (79790640, 13, [13])
    assert fetch_one(url, "SELECT name FROM vehicles WHERE kommo_vehicle_id = 13")[0] == "Kommo vehicle #13"
    assert ids(url)["kommo:1"] == before_ids["kommo:1"]
    assert fetch_one(url, "SELECT c.kommo_contact_id FROM bookings b JOIN clients c ON c.id = b.client_id"
                          " WHERE b.source_payload_id = 'kommo:5'")[0] == 901
    # other leads of the same window, the other window, the app's rows: row for row as they were
    assert rows_of(url, codes(2, 3, 4, 21) + ["web:1"]) == untouched
    assert fetch_all(url, "SELECT t::text FROM sales_leads t WHERE lead_code = 'web:1'"
                          " UNION ALL SELECT t::text FROM bookings t WHERE source_payload_id = 'web:1'") == app_rows
    assert outbox(url) == queued
    run = runs.get_run(url, counts_run(url))
    assert (run["kind"], run["status"], run["created_from"], run["leads_count"]) == ("increment", "succeeded", None, 2)
    assert run["swap_counts"] == counts and run["change_preview"]["bookings"]["add"] == 1


def counts_run(url: str) -> str:
    return str(fetch_one(url, "SELECT id FROM kommo_import_runs WHERE kind = 'increment'"
                              " ORDER BY started_at DESC LIMIT 1")[0])


def test_a_lead_moved_to_143_is_archived_and_deactivated(database_url):
    full_refresh(database_url)
    before = rows_of(database_url, codes(2, 3, 4))
    counts = increment(database_url, [(1, 900, 143, 11)])
    assert (counts["sales_leads_archived"], counts["bookings_deactivated"], counts["snapshot_leads"]) == (1, 1, 0)
    leads, bookings = live(database_url)
    assert (leads["kommo:1"], bookings["kommo:1"]) == (False, False)
    assert rows_of(database_url, codes(2, 3, 4)) == before


@pytest.mark.parametrize("status", [79790631, 91703923])
def test_a_lead_moved_out_of_the_booking_statuses_keeps_its_sales_lead(database_url, status):
    full_refresh(database_url)
    counts = increment(database_url, [(1, 900, status, 11)])
    assert (counts["sales_leads_updated"], counts["sales_leads_archived"], counts["bookings_deactivated"]) == (1, 0, 1)
    assert fetch_one(database_url, "SELECT stage_id, archived_at FROM sales_leads WHERE lead_code = 'kommo:1'") == (
        status, None)
    assert fetch_one(database_url, "SELECT is_active, kommo_status_id FROM bookings"
                                   " WHERE source_payload_id = 'kommo:1'") == (False, 79790637)


def test_a_deleted_lead_is_removed_and_a_restored_one_comes_back_with_the_same_ids(database_url):
    url = database_url
    full_refresh(url)
    before_ids = ids(url)
    counts = increment(url, removals=[1, 999])  # 999: deleted before it ever reached production
    assert (counts["sales_leads_archived"], counts["bookings_deactivated"]) == (1, 1)
    assert (live(url)[0]["kommo:1"], live(url)[1]["kommo:1"]) == (False, False)
    assert "kommo:999" not in ids(url)

    counts = increment(url, [(1, 900, 79790637, 11)], cursor=CLOCK + timedelta(minutes=2))
    assert (counts["sales_leads_updated"], counts["bookings_updated"], counts["sales_leads_added"]) == (1, 1, 0)
    assert ids(url) == before_ids
    assert (live(url)[0]["kommo:1"], live(url)[1]["kommo:1"]) == (True, True)


def test_a_lead_both_staged_and_removed_is_kept(database_url):
    """Deleted and restored within one increment: the staged lead (its current state) wins."""
    full_refresh(database_url)
    counts = increment(database_url, [(1, 900, 79790637, 11)], removals=[1])
    assert (counts["sales_leads_archived"], counts["bookings_deactivated"]) == (0, 0)
    assert (live(database_url)[0]["kommo:1"], live(database_url)[1]["kommo:1"]) == (True, True)


def test_contacts_update_existing_clients_and_only_new_main_contacts_are_added(database_url):
    url = database_url
    full_refresh(url)
    counts = increment(url, [(6, 902, 79790637, 11), (7, 903, 143, None)],
                       [(900, "Ana Maria", "", "ana@new"),  # changed, a client: updated (empty phone kept)
                        (901, "Bo", None, None),  # unchanged
                        (902, "Dee", "+4", None),  # new main contact of a staged lead: added
                        (903, "Ed", None, None),  # main contact of a lead moved to 143 only
                        (950, "Zed", "+9", None)])  # changed in Kommo, never a client: ignored
    assert (counts["clients_updated"], counts["clients_added"]) == (1, 1)
    clients = {c: (n, p, e) for c, n, p, e in fetch_all(url, "SELECT kommo_contact_id, name, phone, email FROM clients")}
    assert clients == {900: ("Ana Maria", "+1", "ana@new"), 901: ("Bo", None, None), 902: ("Dee", "+4", None)}
    assert fetch_one(url, "SELECT c.kommo_contact_id FROM sales_leads sl JOIN clients c ON c.id = sl.client_id"
                          " WHERE sl.lead_code = 'kommo:6'")[0] == 902


def test_a_lead_relinked_to_another_contact_follows_it(database_url):
    full_refresh(database_url)
    increment(database_url, [(1, 901, 79790637, 11)])
    assert fetch_all(database_url, """
        SELECT c.kommo_contact_id FROM sales_leads sl JOIN clients c ON c.id = sl.client_id WHERE sl.lead_code = 'kommo:1'
        UNION ALL
        SELECT c.kommo_contact_id FROM bookings b JOIN clients c ON c.id = b.client_id
         WHERE b.source_payload_id = 'kommo:1'""") == [(901,), (901,)]


# --- the guard and the cursor ---------------------------------------------------------------------------

def test_more_deactivations_than_allowed_stop_for_review_and_change_nothing(database_url):
    url = database_url
    full_refresh(url)
    increment(url, [(2, 900, 79790640, 12)], cursor=CLOCK + timedelta(minutes=1))
    before, position = production_checksum(url), cursor(url)
    run_id = stage_increment(url, [(1, 900, 143, 11)], removals=[3])
    with records(url) as record:
        counts = record.apply_increment(run_id, CLOCK + timedelta(minutes=5), 1, (Y2025,))
    assert counts["status"] == "needs_review" and counts["bookings_deactivated"] == 2
    assert production_checksum(url) == before and cursor(url) == position
    run = runs.get_run(url, run_id)
    assert run["status"] == "needs_review" and run["finished_at"] is not None
    assert "would deactivate 2 bookings, more than KOMMO_SYNC_MAX_DEACTIVATIONS (1)" in run["error"]
    assert "re-run the sync with a higher KOMMO_SYNC_MAX_DEACTIVATIONS, or run a full refresh" in run["error"]
    assert run["change_preview"]["bookings"]["deactivate"] == 2
    assert {s["code"] for s in run["change_preview"]["samples"]["bookings_deactivate"]} == {"kommo:1", "kommo:3"}
    assert run["sync_to"] == CLOCK + timedelta(minutes=5) and run["sync_from"] == position

    # accepted by a higher limit: the next sync applies the same changes
    counts = increment(url, [(1, 900, 143, 11)], removals=[3], cursor=CLOCK + timedelta(minutes=6),
                       max_deactivations=2)
    assert counts["bookings_deactivated"] == 2 and cursor(url) == CLOCK + timedelta(minutes=6)


def test_the_cursor_moves_only_forward_and_only_with_the_changes(database_url):
    url = database_url
    assert cursor(url) == Y2025.created_from  # never read: from the window's first second
    full_refresh(url)
    assert cursor(url) == CLOCK
    increment(url, [(1, 900, 79790640, 11)], cursor=CLOCK + timedelta(minutes=10))
    assert cursor(url) == CLOCK + timedelta(minutes=10)
    run_id = counts_run(url)
    assert fetch_one(url, "SELECT covered_to, run_id FROM kommo_window_coverage") == (
        CLOCK + timedelta(minutes=10), uuid.UUID(run_id))
    assert fetch_one(url, "SELECT run_id FROM kommo_sync_state") == (uuid.UUID(run_id),)
    # an older cursor (a slow run overtaken by a faster one) applies its changes, the cursor stays
    increment(url, [(2, 900, 79790637, 12)], cursor=CLOCK + timedelta(minutes=3))
    assert cursor(url) == CLOCK + timedelta(minutes=10)
    assert fetch_one(url, "SELECT kommo_status_id FROM bookings WHERE source_payload_id = 'kommo:2'")[0] == 79790637
    # a full refresh that read Kommo earlier does not move it back; one that read it later moves it on
    full_refresh(url, clock=CLOCK + timedelta(minutes=5))
    assert cursor(url) == CLOCK + timedelta(minutes=10)
    full_refresh(url, clock=CLOCK + timedelta(hours=1))
    assert cursor(url) == CLOCK + timedelta(hours=1)


def test_a_failure_inside_the_transaction_leaves_production_and_the_cursor_as_they_were(database_url):
    url = database_url
    full_refresh(url)
    increment(url, [(2, 900, 79790637, 12)], cursor=CLOCK + timedelta(minutes=1))
    before, position = production_checksum(url), cursor(url)
    with psycopg.connect(url) as conn:
        conn.execute("""
            CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.source_payload_id = 'kommo:8' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$;
            CREATE TRIGGER boom BEFORE INSERT ON bookings FOR EACH ROW EXECUTE FUNCTION boom();""")
    # the failing statement comes after vehicles, clients and sales leads were written
    run_id = stage_increment(url, [(1, 900, 79790640, 14), (8, 905, 79790637, 11)], [(905, "New", None, None)])
    with records(url) as record, pytest.raises(psycopg.errors.RaiseException, match="boom"):
        record.apply_increment(run_id, CLOCK + timedelta(minutes=9), 50, (Y2025,))
    assert production_checksum(url) == before and cursor(url) == position
    run = runs.get_run(url, run_id)
    assert (run["status"], run["swap_counts"], run["sync_to"]) == ("running", None, None)


def test_each_window_has_its_own_coverage_and_a_sync_reads_from_the_oldest(database_url):
    url = database_url
    dry = stage_run(url, LEADS, CONTACTS, dry_run=True)
    with records(url) as record:
        record.set_kommo_clock(dry, CLOCK - timedelta(days=9))
    assert cursor(url) == Y2025.created_from  # a dry run covers nothing
    full_refresh(url, clock=CLOCK)
    # 2026 has never been read: a sync of both windows reads it from its first second, which comes later
    # than 2025's coverage, so the sync reads from 2025's
    assert cursor(url, (Y2025, Y2026)) == CLOCK
    assert cursor(url, (Y2026,)) == Y2026.created_from
    full_refresh(url, [(21, 920, 79790637, 11, datetime(2026, 2, 1, tzinfo=UTC))], [(920, "Cy", None, None)],
                 clock=datetime(2026, 3, 1, tzinfo=UTC), window=Y2026)
    assert cursor(url, (Y2026,)) == datetime(2026, 3, 1, tzinfo=UTC)
    assert cursor(url, (Y2025, Y2026)) == CLOCK
    # an increment of both moves both
    increment(url, [(1, 900, 79790640, 11)], cursor=datetime(2026, 4, 1, tzinfo=UTC), windows=(Y2025, Y2026))
    assert cursor(url, (Y2025,)) == cursor(url, (Y2026,)) == datetime(2026, 4, 1, tzinfo=UTC)
    # a failed refresh covers nothing
    failed = stage_run(url, LEADS, CONTACTS)
    with records(url) as record:
        record.set_kommo_clock(failed, datetime(2026, 9, 1, tzinfo=UTC))
    runs.close_run(url, failed, "failed", "test")
    assert cursor(url) == datetime(2026, 4, 1, tzinfo=UTC)


def test_the_first_kommo_clock_of_a_run_stays(database_url):
    run_id = stage_increment(database_url)
    with records(database_url) as record:
        record.set_kommo_clock(run_id, CLOCK)
        record.set_kommo_clock(run_id, CLOCK + timedelta(seconds=5))
    assert runs.get_run(database_url, run_id)["kommo_clock_at"] == CLOCK


# --- one import at a time, and the kinds kept apart -------------------------------------------------------

def test_an_increment_and_a_full_refresh_never_run_together(database_url):
    """While a live import's owner holds its lock (a Dagster run holds it for the whole run), no other
    import of either kind starts."""
    url = database_url
    refresh = stage_run(url, LEADS, CONTACTS)
    with runs.owning(url, refresh):
        with pytest.raises(psycopg.errors.LockNotAvailable, match="another Kommo import is running"):
            stage_increment(url)
        runs.swap(url, refresh)
    inc = stage_increment(url, [(1, 900, 79790640, 11)])
    with runs.owning(url, inc):
        with pytest.raises(psycopg.errors.LockNotAvailable, match="another Kommo import is running"):
            stage_run(url, LEADS, CONTACTS)
        apply(url, inc, CLOCK)
    stage_run(url, LEADS, CONTACTS)


def test_each_kind_is_applied_only_by_its_own_function(database_url):
    url = database_url
    refresh = stage_run(url, LEADS, CONTACTS)
    with records(url) as record:
        with pytest.raises(psycopg.errors.RaiseException, match="is a full refresh, not an increment"):
            record.apply_increment(refresh, CLOCK, 50, (Y2025,))
        with pytest.raises(psycopg.errors.RaiseException, match="kommo_change_preview previews it"):
            record.increment_preview(refresh)
    runs.swap(url, refresh)
    inc = stage_increment(url, [(1, 900, 79790640, 11)])
    with pytest.raises(psycopg.errors.RaiseException, match="is an increment: run_kommo_increment applies it"):
        runs.swap(url, inc)
    with pytest.raises(psycopg.errors.RaiseException, match="is an increment: its guard is in run_kommo_increment"):
        runs.drop_guard(url, inc)
    with pytest.raises(psycopg.errors.RaiseException, match="kommo_increment_preview previews it"):
        runs.preview(url, inc)
    runs.close_run(url, inc, "failed", "test")
    unstaged = stage_increment(url, [(1, 900, 79790640, 11)], staged=False)
    with records(url) as record, pytest.raises(psycopg.errors.RaiseException, match="has not finished staging"):
        record.apply_increment(unstaged, CLOCK, 50, (Y2025,))
    with psycopg.connect(url) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE kommo_import_runs SET created_from = '2025-01-01Z', created_to = '2026-01-01Z'"
                     " WHERE id = %s", (unstaged,))


def test_the_drop_guard_compares_with_full_refreshes_only(database_url):
    url = database_url
    full_refresh(url)
    increment(url, [(1, 900, 79790640, 11)])
    dry = stage_run(url, LEADS[:1], CONTACTS, dry_run=True)
    assert runs.get_run(url, dry)["status"] == "succeeded"
    run_id = stage_run(url, LEADS[:3], CONTACTS, guard=False, max_drop_ratio=0.3)
    guard = runs.drop_guard(url, run_id)
    assert guard["previous_leads"] == len(LEADS) and guard["passed"]


def test_the_refresh_button_is_not_held_by_an_increment(database_url):
    staff = uuid.uuid4()
    fetch_one(database_url, "INSERT INTO kommo_refresh_staff (user_id) VALUES (%s) RETURNING 1", (staff,))
    refresh_requests.sync_flag(database_url, refresh_requests.LIVE_FLAG, True)
    refresh_requests.sync_settings(database_url, {refresh_requests.YEARS_SETTING: refresh_scope({}).as_json(),
                                               refresh_requests.COOLDOWN_SETTING: 10})
    stage_increment(database_url)  # running
    with psycopg.connect(database_url) as conn:
        answer = conn.execute("SELECT accepted FROM request_kommo_refresh(%s, NULL)", (staff,)).fetchone()
    assert answer == (True,)


def test_staging_retention_prunes_an_increments_removals(database_url):
    old = stage_increment(database_url, [(1, 900, 79790637, 11)], removals=[2])
    runs.close_run(database_url, old, "failed", "test")
    recent = stage_increment(database_url, removals=[3])
    runs.close_run(database_url, recent, "failed", "test")
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE kommo_import_runs SET finished_at = now() - interval '40 days' WHERE id = %s", (old,))
    assert runs.prune_staging(database_url, succeeded_days=7, failed_days=30)["runs"] == 1
    assert fetch_all(database_url, "SELECT run_id::text, lead_id FROM stg_kommo_lead_removals") == [(recent, 3)]
