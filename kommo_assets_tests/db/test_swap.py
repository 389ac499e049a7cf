"""``run_kommo_full_refresh`` on hand-made staging rows: atomicity, refusals, history, vehicle links."""

import time
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql

from kommo_assets.db import runs
from kommo_assets.scope import Window, window_for
from kommo_assets_tests.helpers import fetch_all, fetch_one, production_checksum

T0 = datetime(2025, 3, 1, 10, tzinfo=UTC)


def stage_run(url, leads, contacts=((900, "Ana", "+1", "ana@x"),), *, dry_run=False, guard=True,
              max_drop_ratio=1.0, window: Window | None = None) -> str:
    """Opens a run of ``window`` (default: the year 2025) and stages ``leads`` =
    [(lead_id, contact_id, status_id, vehicle_enum_id[, created_at])]; created_at defaults to March 1st,
    10:00 of the window's first year."""
    run_id = str(uuid.uuid4())
    window = window or window_for(2025)
    runs.start_run(url, run_id=run_id, dagster_run_id=None, job_name="test", triggered_by=None, dry_run=dry_run,
                   window=window, max_drop_ratio=max_drop_ratio)
    default_created = T0.replace(year=window.created_from.year)
    with psycopg.connect(url) as conn:
        for lead_id, contact_id, status_id, vehicle, *created in leads:
            created_at = created[0] if created else default_created
            conn.execute(
                "INSERT INTO stg_kommo_leads (run_id, lead_id, payload, contact_id, status_id, vehicle_enum_id,"
                " delivery_at, created_at, updated_at) VALUES (%s, %s, '{}', %s, %s, %s, %s, %s, %s)",
                (run_id, lead_id, contact_id, status_id, vehicle, created_at, created_at, created_at),
            )
        for contact_id, name, phone, email in contacts:
            conn.execute(
                "INSERT INTO stg_kommo_contacts (run_id, contact_id, payload, name, phone, email)"
                " VALUES (%s, %s, '{}', %s, %s, %s)", (run_id, contact_id, name, phone, email))
        conn.execute(
            "INSERT INTO stg_kommo_booking_vehicles (run_id, lead_id, vehicle_enum_id)"
            " SELECT run_id, lead_id, vehicle_enum_id FROM stg_kommo_leads WHERE run_id = %s"
            " AND vehicle_enum_id IS NOT NULL", (run_id,))
    runs.mark_staged(url, run_id, {})
    if guard:
        assert runs.drop_guard(url, run_id)["passed"]
    return run_id


def test_swap_error_rolls_everything_back(database_url):
    runs.swap(database_url, stage_run(database_url, [(1, 900, 79790637, 11)]))
    before = production_checksum(database_url)
    with psycopg.connect(database_url) as conn:
        conn.execute("""
            CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.source_payload_id = 'kommo:3' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$;
            CREATE TRIGGER boom BEFORE INSERT ON bookings FOR EACH ROW EXECUTE FUNCTION boom();""")
    run_id = stage_run(database_url, [(1, 900, 79790640, 12), (2, 901, 79790637, 13), (3, 902, 142, None)],
                       contacts=[(900, "Ana B", "+2", None), (901, "Bo", None, None), (902, "Cy", None, None)])
    with pytest.raises(psycopg.errors.RaiseException, match="boom"):
        runs.swap(database_url, run_id)
    # clients and vehicles were written before the failing bookings statement: all rolled back
    assert production_checksum(database_url) == before
    assert runs.get_run(database_url, run_id)["status"] == "running"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"guard": False}, "has not passed the drop guard"), ({"dry_run": True}, "is succeeded, not running")],
)
def test_swap_refuses_runs_that_may_not_swap(database_url, kwargs, message):
    run_id = stage_run(database_url, [(1, 900, 79790637, 11)], **kwargs)
    with pytest.raises(psycopg.errors.RaiseException, match=message):
        runs.swap(database_url, run_id)
    assert fetch_one(database_url, "SELECT count(*) FROM bookings")[0] == 0


def test_swap_refuses_a_closed_run(database_url):
    run_id = stage_run(database_url, [(1, 900, 79790637, 11)])
    runs.close_run(database_url, run_id, "failed", "operator gave up")
    with pytest.raises(psycopg.errors.RaiseException, match="is failed, not running"):
        runs.swap(database_url, run_id)


def test_history_is_kept_and_rows_come_back_with_the_same_ids(database_url):
    runs.swap(database_url, stage_run(database_url, [(1, 900, 79790637, 11), (2, 900, 79790637, 11)]))
    ids = dict(fetch_all(database_url, "SELECT source_payload_id, id FROM bookings"))
    runs.swap(database_url, stage_run(database_url, [(1, 900, 79790637, 11)]))
    assert dict(fetch_all(database_url, "SELECT source_payload_id, is_active FROM bookings")) == {
        "kommo:1": True, "kommo:2": False}
    runs.swap(database_url, stage_run(database_url, [(1, 900, 79790637, 11), (2, 900, 79790637, 11)]))
    assert dict(fetch_all(database_url, "SELECT source_payload_id, id FROM bookings")) == ids
    assert all(active for (active,) in fetch_all(database_url, "SELECT is_active FROM bookings"))
    assert fetch_all(database_url, "SELECT archived_at FROM sales_leads") == [(None,), (None,)]


def test_lead_leaving_booking_statuses_deactivates_its_booking_but_keeps_the_sales_lead(database_url):
    runs.swap(database_url, stage_run(database_url, [(1, 900, 79790637, 11)]))
    runs.swap(database_url, stage_run(database_url, [(1, 900, 91703923, 11)]))
    assert fetch_one(database_url, "SELECT is_active, kommo_status_id FROM bookings")== (False, 79790637)
    assert fetch_one(database_url, "SELECT stage_id, archived_at FROM sales_leads") == (91703923, None)


def test_primary_vehicle_link_follows_the_vehicle_and_manual_links_stay(database_url):
    runs.swap(database_url, stage_run(database_url, [(1, 900, 79790637, 11)]))
    booking, v11 = fetch_one(database_url, "SELECT id, vehicle_id FROM bookings")
    manual = fetch_one(database_url, "INSERT INTO vehicles (name) VALUES ('trailer') RETURNING id")[0]
    fetch_one(database_url, "INSERT INTO booking_vehicles (booking_id, vehicle_id) VALUES (%s, %s) RETURNING 1",
              (booking, manual))

    runs.swap(database_url, stage_run(database_url, [(1, 900, 79790637, 12)]))
    v12 = fetch_one(database_url, "SELECT id FROM vehicles WHERE kommo_vehicle_id = 12")[0]
    links = set(fetch_all(database_url, 'SELECT vehicle_id, "primary" FROM booking_vehicles'))
    assert links == {(v12, True), (manual, False)}
    assert fetch_one(database_url, "SELECT vehicle_id FROM bookings")[0] == v12 != v11


def test_rows_of_other_channels_are_never_touched(database_url):
    fetch_one(database_url, "INSERT INTO bookings (channel, status, source_payload_id) VALUES"
                            " ('manual', 'confirmed', 'web:1') RETURNING 1")
    fetch_one(database_url, "INSERT INTO sales_leads (lead_code, source) VALUES ('web:1', 'Website') RETURNING 1")
    runs.swap(database_url, stage_run(database_url, [(1, 900, 79790637, 11)]))
    assert fetch_one(database_url, "SELECT is_active FROM bookings WHERE channel = 'manual'")[0] is True
    assert fetch_one(database_url, "SELECT archived_at FROM sales_leads WHERE source = 'Website'")[0] is None


def test_a_running_import_whose_owner_is_alive_is_never_closed(database_url):
    first = str(uuid.uuid4())
    with runs.owning(database_url, first):
        runs.start_run(database_url, run_id=first, dagster_run_id=None, job_name="t", triggered_by=None,
                       dry_run=False, window=window_for(2025), max_drop_ratio=0.3)
        with psycopg.connect(database_url) as conn:
            conn.execute("UPDATE kommo_import_runs SET heartbeat_at = now() - interval '1 day' WHERE id = %s",
                         (first,))
        with pytest.raises(psycopg.errors.LockNotAvailable, match="another Kommo import is running"):
            stage_run(database_url, [(1, 900, 79790637, 11)])
        assert runs.get_run(database_url, first)["status"] == "running"


def test_the_next_start_closes_an_import_as_soon_as_its_owner_is_gone(database_url):
    """No grace: the owner holds its lock from before the start until the run ends, so a free lock means
    the process died (its heartbeat, seconds old, does not matter)."""
    first = str(uuid.uuid4())
    with runs.owning(database_url, first):
        runs.start_run(database_url, run_id=first, dagster_run_id=None, job_name="t", triggered_by=None,
                       dry_run=False, window=window_for(2025), max_drop_ratio=0.3)
    # the owner let go (its process ended without closing the run): the very next start closes it
    second = stage_run(database_url, [(1, 900, 79790637, 11)])
    closed = runs.get_run(database_url, first)
    assert closed["status"] == "failed" and "abandoned" in closed["error"]
    assert runs.get_run(database_url, second)["status"] == "running"


# --- foreign keys during a bulk load (kommo_assets/sql/functions/17_kommo_bulk_load.sql) ------------------------------

FOREIGN_KEYS = """
    SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated,
           obj_description(oid, 'pg_constraint')
      FROM pg_constraint WHERE contype = 'f' ORDER BY 1, 2"""

THREE_LEADS = ([(1, 900, 79790640, 12), (2, 901, 79790637, 13), (3, 902, 142, None)],
               [(900, "Ana", "+2", None), (901, "Bo", None, None), (902, "Cy", None, None)])


def set_database(url: str, **settings: str) -> None:
    """``ALTER DATABASE ... SET kommo.<name>``: every later connection of the test (the swap's) has it."""
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(url, autocommit=True) as conn:
        for key, value in settings.items():
            conn.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                sql.Identifier(name), sql.Identifier("kommo", key), sql.Literal(value)))


def assert_keys_hold(url: str) -> None:
    """The keys are back and enforced: a booking pointing at no client is refused."""
    with psycopg.connect(url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("INSERT INTO bookings (channel, client_id) VALUES ('manual', gen_random_uuid())")


def test_a_bulk_load_checks_the_foreign_keys_at_the_end_and_puts_them_back_as_they_were(database_url):
    set_database(database_url, bulk_load_min_new_leads="3")
    with psycopg.connect(database_url) as conn:
        conn.execute("COMMENT ON CONSTRAINT bookings_vehicle_fk ON bookings IS 'the app''s own note'")
    keys = fetch_all(database_url, FOREIGN_KEYS)
    assert ("bookings", "bookings_vehicle_fk", "FOREIGN KEY (vehicle_id) REFERENCES vehicles(id)", True,
            "the app's own note") in keys

    counts = runs.swap(database_url, stage_run(database_url, *THREE_LEADS))
    assert (counts["new_leads"], counts["foreign_key_checks"]) == (3, "bulk")
    assert (counts["sales_leads_added"], counts["bookings_added"], counts["clients_added"]) == (3, 3, 3)
    assert fetch_all(database_url, FOREIGN_KEYS) == keys
    assert_keys_hold(database_url)

    # the same rows as a swap that checks row by row
    bulk = production_rows(database_url)
    set_database(database_url, bulk_load_min_new_leads="1000")
    with psycopg.connect(database_url) as conn:
        conn.execute("TRUNCATE booking_vehicles, bookings, sales_leads, clients, vehicles, calendar_events")
    counts = runs.swap(database_url, stage_run(database_url, *THREE_LEADS))
    assert (counts["new_leads"], counts["foreign_key_checks"]) == (3, "per row")
    assert production_rows(database_url) == bulk


def production_rows(url: str) -> list[tuple]:
    """The Kommo rows with their links resolved to Kommo ids (uuids differ between two loads)."""
    return fetch_all(url, """
        SELECT b.source_payload_id, b.status, c.kommo_contact_id, v.kommo_vehicle_id, sl.lead_code,
               sl.stage_id, (SELECT array_agg(v2.kommo_vehicle_id) FROM booking_vehicles bv
                               JOIN vehicles v2 ON v2.id = bv.vehicle_id WHERE bv.booking_id = b.id)
          FROM sales_leads sl
          LEFT JOIN bookings b ON b.sales_lead_id = sl.id
          LEFT JOIN clients c ON c.id = sl.client_id
          LEFT JOIN vehicles v ON v.id = b.vehicle_id
         ORDER BY sl.lead_code""")


def test_a_few_new_leads_are_checked_row_by_row(database_url):
    thirty = [(i, 900, 79790637, 11) for i in range(1, 31)]
    counts = runs.swap(database_url, stage_run(database_url, thirty))  # the default: 10,000 new leads
    assert (counts["new_leads"], counts["foreign_key_checks"]) == (30, "per row")
    set_database(database_url, bulk_load_min_new_leads="1")
    # two new leads against thirty in the table: under a tenth of it
    counts = runs.swap(database_url, stage_run(database_url, [*thirty, (31, 900, 142, None), (32, 900, 142, None)]))
    assert (counts["new_leads"], counts["foreign_key_checks"]) == (2, "per row")
    # four more against the 32 now in the table: over a tenth of it
    counts = runs.swap(database_url, stage_run(database_url, [*thirty, *((i, 900, 142, None) for i in range(31, 37))]))
    assert (counts["new_leads"], counts["foreign_key_checks"]) == (4, "bulk")


def test_busy_tables_make_a_bulk_swap_check_row_by_row_instead_of_waiting(database_url):
    set_database(database_url, bulk_load_min_new_leads="1", bulk_lock_timeout="100ms")
    keys = fetch_all(database_url, FOREIGN_KEYS)
    run_id = stage_run(database_url, *THREE_LEADS)
    with psycopg.connect(database_url) as app:  # an app transaction that has read bookings and is still open
        app.execute("SELECT count(*) FROM bookings")
        started = time.monotonic()
        counts = runs.swap(database_url, run_id)
        assert time.monotonic() - started < 5
    assert (counts["bookings_added"], counts["foreign_key_checks"]) == (3, "per row: the tables were busy")
    assert fetch_all(database_url, FOREIGN_KEYS) == keys


def test_a_role_that_does_not_own_the_tables_checks_row_by_row(database_url):
    set_database(database_url, bulk_load_min_new_leads="1")
    name = f"importer_{uuid.uuid4().hex[:8]}"
    role = sql.Identifier(name)
    run_id = stage_run(database_url, *THREE_LEADS)
    try:
        with psycopg.connect(database_url) as conn:
            # Row level security is on for every project table (docs/security.md): an importer role other
            # than the owner reads past it with BYPASSRLS.
            conn.execute(sql.SQL("CREATE ROLE {0} BYPASSRLS; GRANT ALL ON ALL TABLES IN SCHEMA public TO {0};"
                                 " GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {0};"
                                 # No project function is executable by PUBLIC: an importer role is granted
                                 # what it runs.
                                 " GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {0}").format(role))
        with psycopg.connect(database_url) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(role))
            counts = conn.execute("SELECT run_kommo_full_refresh(%s::uuid)", (run_id,)).fetchone()[0]
        assert (counts["bookings_added"], counts["foreign_key_checks"]) == (
            3, "per row: the role may not alter the tables")
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                conn.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(role))


def keys_seen_while_linking(url: str) -> None:
    """Records, for each booking link the swap inserts, how many foreign keys bookings has at that moment."""
    with psycopg.connect(url) as conn:
        conn.execute("""
            CREATE TABLE keys_seen (n int);
            CREATE FUNCTION count_keys() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO keys_seen SELECT count(*) FROM pg_constraint
                 WHERE contype = 'f' AND conrelid = 'bookings'::regclass;
                RETURN NEW;
            END $$;
            CREATE TRIGGER count_keys BEFORE INSERT ON booking_vehicles FOR EACH ROW EXECUTE FUNCTION count_keys();""")


@pytest.mark.parametrize("threshold, checks, keys_during", [("1", "bulk", {0}), ("1000", "per row", {3})])
def test_a_bulk_swap_really_runs_without_its_foreign_keys_and_a_row_swap_with_them(
        database_url, threshold, checks, keys_during):
    set_database(database_url, bulk_load_min_new_leads=threshold)
    keys_seen_while_linking(database_url)
    counts = runs.swap(database_url, stage_run(database_url, *THREE_LEADS))
    assert counts["foreign_key_checks"] == checks
    assert {n for (n,) in fetch_all(database_url, "SELECT n FROM keys_seen")} == keys_during
    assert fetch_one(database_url, "SELECT count(*) FROM keys_seen")[0] == counts["booking_vehicles_added"] == 2


@pytest.mark.parametrize("table, body, error, message", [
    # A failure after the keys were dropped (on the last table the swap writes).
    ("booking_vehicles", "RAISE EXCEPTION 'boom';", psycopg.errors.RaiseException, "boom"),
    # A (hypothetical) bug that links bookings to a client that does not exist: the keys added back at the
    # end refuse it, as a row check would.
    ("bookings", "NEW.client_id := gen_random_uuid(); RETURN NEW;", psycopg.errors.ForeignKeyViolation,
     "bookings_client_id_fkey"),
], ids=["a-failure-after-the-drop", "a-row-that-breaks-a-key"])
def test_a_bulk_swap_that_fails_leaves_the_foreign_keys_and_production_as_they_were(
        database_url, table, body, error, message):
    set_database(database_url, bulk_load_min_new_leads="1")
    keys = fetch_all(database_url, FOREIGN_KEYS)
    before = production_checksum(database_url)
    with psycopg.connect(database_url) as conn:
        conn.execute(f"""
            CREATE FUNCTION spoil() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} END $$;
            CREATE TRIGGER spoil BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION spoil();""")
    run_id = stage_run(database_url, *THREE_LEADS)
    with pytest.raises(error, match=message):
        runs.swap(database_url, run_id)
    assert fetch_all(database_url, FOREIGN_KEYS) == keys
    assert production_checksum(database_url) == before
    assert_keys_hold(database_url)


def swap_with_notices(url: str, run_id: str) -> tuple[dict, list[str]]:
    notices: list[str] = []
    with psycopg.connect(url) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        counts = conn.execute("SELECT run_kommo_full_refresh(%s::uuid)", (run_id,)).fetchone()[0]
    return counts, notices


def test_settings_that_do_not_parse_are_reported_and_the_defaults_used(database_url):
    set_database(database_url, bulk_load_min_new_leads="10,000")
    counts, notices = swap_with_notices(database_url, stage_run(database_url, *THREE_LEADS))
    assert counts["foreign_key_checks"] == "per row"  # 3 new leads, under the default 10,000
    assert "kommo.bulk_load_min_new_leads must be a whole number, got 10,000; using 10000" in notices

    set_database(database_url, bulk_load_min_new_leads="1", bulk_lock_timeout="soon")
    three_more = [(lead_id + 3, contact, status, vehicle) for lead_id, contact, status, vehicle in THREE_LEADS[0]]
    counts, notices = swap_with_notices(database_url, stage_run(database_url, three_more, THREE_LEADS[1]))
    assert (counts["new_leads"], counts["foreign_key_checks"]) == (3, "bulk")
    assert "kommo.bulk_lock_timeout must be an interval such as 2s or 500ms, got soon; using 2s" in notices


def test_the_foreign_keys_are_never_suspended_outside_the_swap(database_url):
    keys = fetch_all(database_url, FOREIGN_KEYS)
    with psycopg.connect(database_url, autocommit=True) as conn, pytest.raises(
            psycopg.errors.RaiseException, match="runs only inside run_kommo_full_refresh"):
        conn.execute("SELECT kommo_suspend_foreign_keys()")
    assert fetch_all(database_url, FOREIGN_KEYS) == keys


def test_a_run_record_reads_in_order(database_url):
    """started, swap started, finished: the swap's end is its real end, not its transaction's start."""
    run_id = stage_run(database_url, [(1, 900, 79790637, 11)])
    runs.swap(database_url, run_id)
    started, swap_started, finished = fetch_one(
        database_url, "SELECT started_at, swap_started_at, finished_at FROM kommo_import_runs WHERE id = %s",
        (run_id,))
    assert started <= swap_started <= finished
