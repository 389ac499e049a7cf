"""Windows and ownership on hand-made staging rows: a refresh replaces only the import's own rows of its
window (``kommo_owned``), the drop guard compares within a window, rows the app wrote are never touched,
contact fields Kommo has empty keep the client's value, and ``sales_leads.created_at`` is Kommo's. Every
swap here is preceded by the change preview, whose counts must be what the swap then does."""

import shutil
from datetime import UTC, datetime

import psycopg

from kommo_assets.db import runs
from kommo_assets.db.migrate import migrate, sql_dir
from kommo_assets.scope import window_for
from kommo_assets_tests.db.test_swap import stage_run
from kommo_assets_tests.helpers import fetch_all, fetch_one

Y2025, Y2026 = window_for(2025), window_for(2026)
MARCH_2025 = window_for(created_from="2025-03-01T00:00:00Z", created_to="2025-04-01T00:00:00Z")

# swap counter -> (preview section, preview count)
PREVIEWED = {
    "bookings_added": ("bookings", "add"), "bookings_updated": ("bookings", "update"),
    "bookings_deactivated": ("bookings", "deactivate"), "sales_leads_added": ("sales_leads", "add"),
    "sales_leads_updated": ("sales_leads", "update"), "sales_leads_archived": ("sales_leads", "archive"),
    "clients_added": ("clients", "add"), "clients_updated": ("clients", "update"),
    "vehicles_created": ("vehicles", "create"),
}


def preview_then_swap(url: str, run_id: str) -> dict:
    """The change preview, then the swap: returns the swap's counts after checking the preview said them."""
    preview = runs.preview(url, run_id)
    counts = runs.swap(url, run_id)
    assert {k: preview[section][n] for k, (section, n) in PREVIEWED.items()} == {k: counts[k] for k in PREVIEWED}
    return counts


def refresh(url: str, leads, contacts=((900, "Ana", "+1", "ana@x"),), window=Y2025) -> dict:
    return preview_then_swap(url, stage_run(url, leads, contacts, window=window))


def rows_of(url: str, codes: list[str]) -> dict[str, list[str]]:
    """The full rows (every column, timestamps included) that belong to the given Kommo codes."""
    return {
        "sales_leads": [r for (r,) in fetch_all(
            url, "SELECT t::text FROM sales_leads t WHERE lead_code = ANY (%s) ORDER BY lead_code", (codes,))],
        "bookings": [r for (r,) in fetch_all(
            url, "SELECT t::text FROM bookings t WHERE source_payload_id = ANY (%s) ORDER BY source_payload_id",
            (codes,))],
        "booking_vehicles": [r for (r,) in fetch_all(
            url, "SELECT bv::text FROM booking_vehicles bv JOIN bookings b ON b.id = bv.booking_id"
                 " WHERE b.source_payload_id = ANY (%s) ORDER BY bv::text", (codes,))],
    }


def live(url: str) -> tuple[dict[str, bool], dict[str, bool]]:
    """(lead code -> not archived, booking code -> active)."""
    return (dict(fetch_all(url, "SELECT lead_code, archived_at IS NULL FROM sales_leads")),
            dict(fetch_all(url, "SELECT source_payload_id, is_active FROM bookings")))


def codes(*ids: int) -> list[str]:
    return [f"kommo:{i}" for i in ids]


# --- windows -----------------------------------------------------------------------------------------------

LEADS_2025 = [(1, 900, 79790637, 11), (2, 900, 79790640, 12), (3, 901, 91703923, None)]  # 3: no booking
CONTACTS_2025 = [(900, "Ana", "+1", "ana@x"), (901, "Bo", None, None)]
LEADS_2026 = [(21, 920, 79790637, 11), (22, 920, 142, 13)]
CONTACTS_2026 = [(920, "Cy", "+3", None)]


def test_two_windows_refreshed_in_turn_both_stay_active_and_never_touch_each_other(database_url):
    refresh(database_url, LEADS_2025, CONTACTS_2025)
    rows_2025 = rows_of(database_url, codes(1, 2, 3))

    counts = refresh(database_url, LEADS_2026, CONTACTS_2026, window=Y2026)
    assert (counts["sales_leads_added"], counts["sales_leads_archived"]) == (2, 0)
    assert (counts["bookings_added"], counts["bookings_deactivated"]) == (2, 0)
    assert rows_of(database_url, codes(1, 2, 3)) == rows_2025
    assert live(database_url) == ({c: True for c in codes(1, 2, 3, 21, 22)}, {c: True for c in codes(1, 2, 21, 22)})

    # 2026 again without lead 22: only 22 goes, 2025 stays exactly as it was
    counts = refresh(database_url, LEADS_2026[:1], CONTACTS_2026, window=Y2026)
    assert (counts["sales_leads_archived"], counts["bookings_deactivated"]) == (1, 1)
    assert live(database_url) == ({**{c: True for c in codes(1, 2, 3, 21)}, "kommo:22": False},
                                  {**{c: True for c in codes(1, 2, 21)}, "kommo:22": False})
    assert rows_of(database_url, codes(1, 2, 3)) == rows_2025

    # 2025 again: 2026 (the live lead and the archived one alike) stays exactly as it was
    rows_2026 = rows_of(database_url, codes(21, 22))
    counts = refresh(database_url, LEADS_2025, CONTACTS_2025)
    assert not any(counts[k] for k in PREVIEWED)
    assert rows_of(database_url, codes(21, 22)) == rows_2026
    assert rows_of(database_url, codes(1, 2, 3)) == rows_2025
    assert fetch_one(database_url, "SELECT count(*) FROM zoho_outbox")[0] == 0


def test_a_window_holds_leads_created_from_its_start_up_to_but_not_including_its_end(database_url):
    last_of_2025 = datetime(2025, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    first_of_2026 = datetime(2026, 1, 1, tzinfo=UTC)
    refresh(database_url, [(5, 900, 79790637, 11, last_of_2025)])
    refresh(database_url, [(6, 900, 79790637, 11, first_of_2026)], window=Y2026)

    counts = refresh(database_url, [(7, 900, 79790637, 11)])
    assert (counts["sales_leads_archived"], counts["bookings_deactivated"]) == (1, 1)
    assert live(database_url)[1] == {"kommo:5": False, "kommo:6": True, "kommo:7": True}

    counts = refresh(database_url, [(8, 900, 79790637, 11)], window=Y2026)
    assert (counts["sales_leads_archived"], counts["bookings_deactivated"]) == (1, 1)
    assert live(database_url)[1] == {"kommo:5": False, "kommo:6": False, "kommo:7": True, "kommo:8": True}


def test_a_narrower_window_replaces_only_its_part_of_the_year(database_url):
    feb, mar, apr = (datetime(2025, month, 10, tzinfo=UTC) for month in (2, 3, 4))
    refresh(database_url, [(1, 900, 79790637, 11, feb), (2, 900, 79790637, 11, mar), (3, 900, 79790637, 11, apr)])
    outside = rows_of(database_url, codes(1, 3))

    counts = refresh(database_url, [(4, 900, 79790637, 11, mar)], window=MARCH_2025)
    assert (counts["sales_leads_archived"], counts["bookings_deactivated"], counts["bookings_added"]) == (1, 1, 1)
    assert live(database_url)[1] == {"kommo:1": True, "kommo:2": False, "kommo:3": True, "kommo:4": True}
    assert rows_of(database_url, codes(1, 3)) == outside


def guard(url: str, n: int, window=Y2025, *, dry_run=False, max_drop_ratio=0.3) -> tuple[str, dict]:
    run_id = stage_run(url, [(i, 900, 79790637, 11) for i in range(1, n + 1)], window=window, dry_run=dry_run,
                       guard=False, max_drop_ratio=max_drop_ratio)
    return run_id, runs.drop_guard(url, run_id)


def test_the_drop_guard_compares_with_the_last_full_refresh_of_the_same_window(database_url):
    run_id, checked = guard(database_url, 10)
    assert checked["passed"] and checked["previous_leads"] is None
    runs.swap(database_url, run_id)

    # 2026 holds far fewer leads than 2025: no drop, there is no 2026 refresh to compare with
    run_id, checked = guard(database_url, 2, Y2026)
    assert checked["passed"] and checked["previous_leads"] is None and checked["drop_ratio"] == 0
    runs.swap(database_url, run_id)

    # a dry run is no reference: the next 2026 refresh compares with the refresh of 2 leads
    _, checked = guard(database_url, 100, Y2026, dry_run=True, max_drop_ratio=1)
    assert checked["status"] == "succeeded" and checked["previous_leads"] == 2
    run_id, checked = guard(database_url, 2, Y2026)
    assert checked["passed"] and checked["previous_leads"] == 2
    runs.swap(database_url, run_id)

    # nor is a window that only overlaps: March 2025 has no refresh of its own yet
    run_id, checked = guard(database_url, 1, MARCH_2025)
    assert checked["passed"] and checked["previous_leads"] is None
    runs.close_run(database_url, run_id, "failed", "not swapped")

    # 2025 again with half its leads: a drop against the 2025 refresh (not against 2026's 2)
    run_id, checked = guard(database_url, 5)
    assert not checked["passed"] and checked["status"] == "needs_review"
    assert (checked["previous_leads"], float(checked["drop_ratio"])) == (10, 0.5)
    assert "(10 -> 5)" in checked["reason"]
    assert runs.get_run(database_url, run_id)["status"] == "needs_review"
    # a 20% drop is within the 30% allowed
    _, checked = guard(database_url, 8)
    assert checked["passed"] and checked["previous_leads"] == 10


# --- the import's own rows only ----------------------------------------------------------------------------

T_IN_2025 = datetime(2025, 3, 1, 10, tzinfo=UTC)

APP_ROWS = {
    # Rows the app wrote. Some even carry a Kommo created_at inside the window, or the 'Kommo' source /
    # channel: only a 'kommo:' code makes a row the import's.
    "sales_leads": "lead_code NOT LIKE 'kommo:%'",
    "bookings": "source_payload_id IS NULL OR source_payload_id NOT LIKE 'kommo:%'",
    "clients": "kommo_contact_id IS NULL",
    "calendar_events": "true",
}


def app_rows(url: str) -> dict[str, list[str]]:
    return {table: [r for (r,) in fetch_all(url, f"SELECT t::text FROM {table} t WHERE {where} ORDER BY t::text")]
            for table, where in APP_ROWS.items()}


def test_a_refresh_never_touches_rows_the_app_wrote(database_url):
    with psycopg.connect(database_url) as conn:
        vehicle = conn.execute("INSERT INTO vehicles (name) VALUES ('van') RETURNING id").fetchone()[0]
        client = conn.execute("INSERT INTO clients (name, phone) VALUES ('Walk-in', '+7') RETURNING id").fetchone()[0]
        # no source: the column has no default any more, so this is not a 'Kommo' lead
        conn.execute("INSERT INTO sales_leads (lead_code, name, client_id, created_at, kommo_created_at)"
                     " VALUES ('app:1', 'Phone call', %s, %s, %s)", (client, T_IN_2025, T_IN_2025))
        conn.execute("INSERT INTO sales_leads (lead_code, name, source) VALUES ('app:2', 'Typed in', 'Kommo')")
        conn.execute("INSERT INTO bookings (channel, status, source_payload_id, vehicle_id, start_at, end_at)"
                     " VALUES ('manual', 'confirmed', 'web:1', %s, %s, %s)", (vehicle, T_IN_2025, T_IN_2025))
        conn.execute("INSERT INTO bookings (channel, status, source_payload_id, kommo_created_at)"
                     " VALUES ('Kommo', 'confirmed', 'zoho:77', %s)", (T_IN_2025,))
        conn.execute("INSERT INTO bookings (channel, status) VALUES ('Kommo', 'pending')")
        conn.execute("INSERT INTO calendar_events (title, vehicle_id, start_at, end_at)"
                     " VALUES ('Service', %s, %s, %s), ('MOT', NULL, %s, %s)",
                     (vehicle, T_IN_2025, T_IN_2025, T_IN_2025, T_IN_2025))
    assert fetch_one(database_url, "SELECT source FROM sales_leads WHERE lead_code = 'app:1'")[0] is None
    before = app_rows(database_url)

    refresh(database_url, [(1, 900, 79790637, 11), (2, 900, 79790637, 12)])
    assert app_rows(database_url) == before
    # every Kommo lead of the window leaves the snapshot: exactly the import's own rows go
    counts = refresh(database_url, [(3, 900, 142, None)])
    assert (counts["sales_leads_archived"], counts["bookings_deactivated"]) == (2, 2)
    assert live(database_url)[0] == {"app:1": True, "app:2": True, "kommo:1": False, "kommo:2": False,
                                     "kommo:3": True}
    assert app_rows(database_url) == before


def client(url: str, contact_id: int) -> tuple:
    return fetch_one(url, "SELECT name, phone, email, updated_at FROM clients WHERE kommo_contact_id = %s",
                     (contact_id,))


def test_a_contact_field_kommo_has_empty_keeps_the_clients_value(database_url):
    lead = [(1, 900, 79790637, 11)]
    refresh(database_url, lead, [(900, "Ana", "+1", None)])
    # the app's staff fill in the email Kommo never had
    fetch_one(database_url, "UPDATE clients SET email = 'ana@app' WHERE kommo_contact_id = 900 RETURNING 1")
    filled = client(database_url, 900)

    # Kommo now has no phone either: nothing is cleared, nothing counts as changed
    counts = refresh(database_url, lead, [(900, "Ana", None, None)])
    assert counts["clients_updated"] == 0
    assert client(database_url, 900) == filled == ("Ana", "+1", "ana@app", filled[3])

    # a value Kommo has always wins; the other fields keep theirs
    counts = refresh(database_url, lead, [(900, None, "+2", "ana@kommo")])
    assert counts["clients_updated"] == 1
    assert client(database_url, 900)[:3] == ("Ana", "+2", "ana@kommo")


def test_the_client_resolution_stays_linear_when_the_snapshot_outgrows_work_mem(database_url):
    """kommo_snapshot_clients (read by the preview and the swap) found the linked contacts with an IN
    subquery: a subplan, hashed only while the snapshot's contact ids fit in work_mem, otherwise rescanned
    for every contact (at 1M leads the preview never finished). Planned with the least work_mem it must
    have no subplan, and still say which contacts are linked."""
    run_id = stage_run(database_url, [(1, 900, 79790637, 11)], [(900, "Ana", "+1", None), (901, "Bo", None, None)])
    with psycopg.connect(database_url) as conn:
        conn.execute("SET work_mem = '64kB'")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT * FROM kommo_snapshot_clients(%s)", (run_id,)))
        assert "SubPlan" not in plan, plan
        linked = dict(conn.execute("SELECT contact_id, linked FROM kommo_snapshot_clients(%s)", (run_id,)).fetchall())
    assert linked == {900: True, 901: False}


# --- sales_leads.created_at is Kommo's -----------------------------------------------------------------------

def created(url: str) -> tuple:
    return fetch_one(url, "SELECT sl.created_at, sl.kommo_created_at, b.kommo_created_at FROM sales_leads sl"
                          " JOIN bookings b ON b.sales_lead_id = sl.id WHERE sl.lead_code = 'kommo:1'")


def test_created_at_is_kommos_created_at_after_insert_and_after_update(database_url):
    t1 = datetime(2025, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    counts = refresh(database_url, [(1, 900, 79790637, 11, t1)])
    assert counts["sales_leads_added"] == 1
    assert created(database_url) == (t1, t1, t1)

    # a row whose created_at is not Kommo's (as written before it was) is put right, and counted
    fetch_one(database_url, "UPDATE sales_leads SET created_at = now() RETURNING 1")
    counts = refresh(database_url, [(1, 900, 79790637, 11, t1)])
    assert (counts["sales_leads_updated"], counts["bookings_updated"]) == (1, 0)
    assert created(database_url) == (t1, t1, t1)

    t2 = datetime(2025, 7, 1, tzinfo=UTC)
    counts = refresh(database_url, [(1, 900, 79790637, 11, t2)])
    assert (counts["sales_leads_updated"], counts["bookings_updated"]) == (1, 1)
    assert created(database_url) == (t2, t2, t2)


def test_the_migration_gives_existing_rows_kommos_created_at_and_queues_nothing(empty_database_url, tmp_path):
    root = tmp_path / "sql"
    (root / "functions").mkdir(parents=True)
    shutil.copytree(sql_dir() / "migrations", root / "migrations",
                    ignore=lambda _dir, names: [n for n in names if n >= "0007"])
    migrate(empty_database_url, root)
    with psycopg.connect(empty_database_url) as conn:
        lead = conn.execute(
            "INSERT INTO sales_leads (lead_code, source, kommo_created_at) VALUES ('kommo:1', 'Kommo', %s),"
            " ('app:1', 'Kommo', %s) RETURNING id", (T_IN_2025, T_IN_2025)).fetchone()[0]
        conn.execute("INSERT INTO bookings (channel, source_payload_id, sales_lead_id) VALUES"
                     " ('Kommo', 'kommo:1', %s), ('manual', 'web:1', NULL)", (lead,))
    outbox = fetch_one(empty_database_url, "SELECT count(*) FROM zoho_outbox")[0]
    assert outbox == 4

    migrate(empty_database_url)
    assert dict(fetch_all(empty_database_url, "SELECT lead_code, created_at = %s FROM sales_leads",
                          (T_IN_2025,))) == {"kommo:1": True, "app:1": False}
    assert dict(fetch_all(empty_database_url, "SELECT source_payload_id, kommo_created_at FROM bookings")) == {
        "kommo:1": T_IN_2025, "web:1": None}
    assert fetch_one(empty_database_url, "SELECT count(*) FROM zoho_outbox")[0] == outbox
    # an app insert without a source no longer becomes a 'Kommo' lead
    assert fetch_one(empty_database_url, "INSERT INTO sales_leads (lead_code) VALUES ('app:2') RETURNING source")[0] is None
