"""Production derived from the current-state mirror (simulator over HTTP, real Postgres): the mirror holds
Kommo's latest state after a refresh and after increments; an edit of a mapping table or a source option
renamed in Kommo re-derives every lead it reaches with the next sync, with no lead changed in Kommo and no
Kommo request beyond the field definitions; the local drift check finds a write to production outside the
import, per year, and a refresh heals it."""

from datetime import UTC, datetime

import pytest

from kommo_assets.db import connect
from kommo_assets.db.windows import mirror_drift, rules_changed
from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig
from kommo_assets.kommo.fields import SOURCE_FIELD_ID
from kommo_assets.reporting import drift_count
from kommo_assets.scope import window_for
from kommo_assets_tests.helpers import fetch_all, fetch_one
from kommo_assets_tests.sync_support import full_refresh, increment, production_rows

T0 = 1_800_000_000
BOOKING_STATUSES = (79790634, 79790637, 79790640, 142)


@pytest.fixture
def sim():
    with KommoSimulator(SimulatorConfig(leads=120, seed=5, token="mirror-token", rate_limit_rps=None)) as s:
        s.dataset.clock.set(T0)
        yield s


def _drift(url: str, year: int = 2025) -> dict:
    with connect(url, autocommit=True) as conn:
        return mirror_drift(conn, window_for(year))


def _mirror(url: str) -> dict[int, tuple]:
    return {row[0]: row[1:] for row in fetch_all(
        url, "SELECT lead_id, status_id, price, source_enum_id, contact_id FROM kommo_leads")}


def _booking_sources(url: str, enum_id: int) -> list[str | None]:
    return [row[0] for row in fetch_all(
        url, "SELECT b.source FROM bookings b JOIN kommo_leads m ON 'kommo:' || m.lead_id = b.source_payload_id"
             " WHERE b.is_active AND m.source_enum_id = %s", (enum_id,))]


def _busiest_source(url: str) -> tuple[int, int]:
    """The source option most active bookings carry, and how many carry it."""
    return fetch_one(url, "SELECT m.source_enum_id, count(*) FROM kommo_leads m JOIN bookings b"
                          " ON b.source_payload_id = 'kommo:' || m.lead_id AND b.is_active"
                          " WHERE m.source_enum_id IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1")


def test_the_mirror_holds_kommos_latest_state(sim, database_url):
    full_refresh(database_url, sim)
    staged = {lead["id"]: lead for lead in sim.dataset.iter_leads(
        window=tuple(int(t.timestamp()) for t in (window_for(2025).created_from, window_for(2025).created_to)))}
    mirror = _mirror(database_url)
    # (a full refresh asks Kommo for every status but 143, closed and lost)
    assert set(mirror) == {i for i, lead in staged.items() if lead["status_id"] != 143} and len(mirror) > 50
    assert all(mirror[i][:2] == (staged[i]["status_id"], staged[i]["price"]) for i in mirror)
    lead_id = next(i for i, lead in staged.items() if lead["status_id"] in BOOKING_STATUSES)
    gone = next(i for i in staged if i != lead_id)
    sim.dataset.clock.advance(5)
    sim.dataset.update_lead(lead_id, price=4321, status_id=142)
    sim.dataset.delete_leads([gone])
    assert increment(database_url, sim)["status"] == "succeeded"
    mirror = _mirror(database_url)
    assert mirror[lead_id][:2] == (142, 4321)
    assert gone not in mirror
    assert drift_count(_drift(database_url)) == 0


@pytest.mark.parametrize("table", ["kommo_source_map", "kommo_status_map", "kommo_user_map"])
def test_a_mapping_edit_rederives_every_lead_it_reaches_with_the_next_sync(sim, database_url, table):
    full_refresh(database_url, sim)
    with connect(database_url, autocommit=True) as conn:
        if table == "kommo_source_map":
            enum_id, n = _busiest_source(database_url)
            conn.execute("INSERT INTO kommo_source_map (enum_id, source) VALUES (%s, 'Renamed by the app')",
                         (enum_id,))
            query = ("SELECT count(*) FROM bookings b JOIN kommo_leads m ON b.source_payload_id = 'kommo:' ||"
                     " m.lead_id WHERE b.is_active AND m.source_enum_id = %s AND b.source = 'Renamed by the app'")
        elif table == "kommo_status_map":
            enum_id, n = fetch_one(database_url, "SELECT kommo_status_id, count(*) FROM bookings WHERE is_active"
                                                 " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1")
            conn.execute("UPDATE kommo_status_map SET booking_status = 'cancelled' WHERE status_id = %s", (enum_id,))
            query = ("SELECT count(*) FROM bookings WHERE is_active AND kommo_status_id = %s"
                     " AND status = 'cancelled'")
        else:
            enum_id, n = fetch_one(database_url, "SELECT responsible_user_id, count(*) FROM kommo_leads m JOIN"
                                                 " bookings b ON b.source_payload_id = 'kommo:' || m.lead_id"
                                                 " WHERE b.is_active GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1")
            conn.execute("INSERT INTO kommo_user_map (kommo_user_id, owner_id) VALUES"
                         " (%s, '00000000-0000-0000-0000-00000000abcd')", (enum_id,))
            query = ("SELECT count(*) FROM bookings b JOIN kommo_leads m ON b.source_payload_id = 'kommo:' ||"
                     " m.lead_id WHERE b.is_active AND m.responsible_user_id = %s"
                     " AND b.owner_id = '00000000-0000-0000-0000-00000000abcd'")
        assert rules_changed(conn) != []
    assert n >= 3
    # The local check sees the edit before any sync: production no longer follows the rules.
    assert _drift(database_url)["bookings"]["update"] == n
    assert fetch_one(database_url, query, (enum_id,))[0] == 0
    sim.reset_stats()
    counts = increment(database_url, sim)  # nothing changed in Kommo
    assert counts["status"] == "succeeded"
    assert counts["bookings_updated"] == n and counts["rederived_leads"] >= n
    assert fetch_one(database_url, query, (enum_id,))[0] == n
    assert drift_count(_drift(database_url)) == 0
    with connect(database_url, autocommit=True) as conn:
        assert rules_changed(conn) == []
    # Kommo was asked what any sync asks (the two fields' options and the three feeds), nothing more.
    asked = sim.stats()["by_path"]
    assert set(asked) <= {"/api/v4/leads/custom_fields/1234163", "/api/v4/leads/custom_fields/823206",
                          "/api/v4/leads", "/api/v4/contacts", "/api/v4/events"}, asked
    assert sum(asked.values()) <= 10, asked
    # The next sync has nothing left to re-derive.
    assert increment(database_url, sim)["rederived_leads"] == 0


def test_a_source_option_renamed_in_kommo_reaches_every_booking_that_carries_it(sim, database_url):
    full_refresh(database_url, sim)
    enum_id, n = _busiest_source(database_url)
    sim.dataset.clock.advance(5)
    sim.dataset.rename_option(SOURCE_FIELD_ID, enum_id, "Instagram (renamed)")  # no lead's updated_at moves
    counts = increment(database_url, sim)
    assert counts["rederived_leads"] >= n
    assert _booking_sources(database_url, enum_id) == ["Instagram (renamed)"] * n
    assert drift_count(_drift(database_url)) == 0


def test_the_local_drift_check_finds_a_write_outside_the_import_and_a_refresh_heals_it(sim, database_url):
    full_refresh(database_url, sim)
    full_refresh(database_url, sim, 2024)
    assert drift_count(_drift(database_url)) == 0
    assert drift_count(_drift(database_url, 2024)) == 0
    with connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE bookings SET start_at = start_at + interval '1 day' WHERE id = (SELECT id FROM"
                     " bookings WHERE is_active AND kommo_created_at >= '2025-01-01' AND start_at IS NOT NULL"
                     " ORDER BY source_payload_id LIMIT 1)")
        conn.execute("UPDATE bookings SET is_active = false WHERE id IN (SELECT id FROM bookings WHERE is_active"
                     " AND kommo_created_at >= '2025-01-01' ORDER BY source_payload_id DESC LIMIT 2)")
    drift = _drift(database_url)
    # one moved, two deactivated: the swap would move one back and re-activate two
    assert drift["bookings"]["field_changes"] == {"dates": 1, "reactivated": 2}
    assert drift["bookings"]["add"] == 0 and drift["bookings"]["deactivate"] == 0
    assert drift_count(drift) == 3
    assert drift_count(_drift(database_url, 2024)) == 0  # per year: the other year is clean
    full_refresh(database_url, sim)
    assert drift_count(_drift(database_url)) == 0


def test_a_full_refresh_of_one_year_rederives_a_rule_change_in_every_year(sim, database_url):
    full_refresh(database_url, sim)
    full_refresh(database_url, sim, 2024)
    enum_id, _ = _busiest_source(database_url)
    with connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO kommo_source_map (enum_id, source) VALUES (%s, 'Mapped')", (enum_id,))
    full_refresh(database_url, sim, 2024)
    assert set(_booking_sources(database_url, enum_id)) == {"Mapped"}
    for year in (2024, 2025):
        assert drift_count(_drift(database_url, year)) == 0


def test_a_lead_of_a_status_never_imported_leaves_the_mirror_when_deleted(sim, database_url):
    full_refresh(database_url, sim)
    lead_id = next(i for i, row in _mirror(database_url).items() if row[0] != 143)
    sim.dataset.clock.advance(5)
    sim.dataset.update_lead(lead_id, status_id=143)
    increment(database_url, sim)
    assert _mirror(database_url)[lead_id][0] == 143
    sim.dataset.clock.advance(5)
    sim.dataset.delete_leads([lead_id])
    increment(database_url, sim)
    assert lead_id not in _mirror(database_url)


def test_derived_from_the_mirror_equals_a_refresh(sim, database_url, pg_admin_url, template_url):
    """After increments and a mapping edit, production equals a fresh refresh with the same mapping."""
    from kommo_assets_tests.helpers import create_database, database_name, drop_database

    full_refresh(database_url, sim)
    sim.dataset.clock.advance(5)
    lead = next(lead for lead in sim.dataset.iter_leads() if lead["status_id"] in BOOKING_STATUSES
                and lead["created_at"] >= int(datetime(2025, 1, 1, tzinfo=UTC).timestamp()))
    sim.dataset.update_lead(lead["id"], price=77)
    enum_id, _ = _busiest_source(database_url)
    edit = "INSERT INTO kommo_source_map (enum_id, source) VALUES (%s, 'Mapped')"
    with connect(database_url, autocommit=True) as conn:
        conn.execute(edit, (enum_id,))
    increment(database_url, sim)
    name, other = create_database(pg_admin_url, database_name(template_url), prefix="kommo_mirror")
    try:
        with connect(other, autocommit=True) as conn:
            conn.execute(edit, (enum_id,))
        full_refresh(other, sim)
        assert production_rows(database_url) == production_rows(other)
    finally:
        drop_database(pg_admin_url, name)
