"""What an increment stages and applies, by the functions the asset calls (simulator over HTTP, real Postgres):
the configured windows decide which changed and deleted leads it touches, a lead deleted after it was
listed is not added, a restored lead comes back with the same ids, and an edited contact updates its client."""

from datetime import UTC, datetime

import pytest

from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig
from kommo_assets_tests.helpers import fetch_all, fetch_one
from kommo_assets_tests.sync_support import full_refresh, increment

T0 = 1_800_000_000


@pytest.fixture
def sim():
    with KommoSimulator(SimulatorConfig(leads=80, seed=21, token="staging-token", rate_limit_rps=None)) as s:
        s.dataset.clock.set(T0)
        yield s


def _lead_of(sim, year: int) -> dict:
    start, end = (int(datetime(y, 1, 1, tzinfo=UTC).timestamp()) for y in (year, year + 1))
    return next(lead for lead in sim.dataset.iter_leads(window=(start, end))
                if lead["status_id"] in (79790634, 79790637))


def _sales_lead(url: str, lead_id: int):
    return fetch_one(url, "SELECT id, archived_at IS NOT NULL, value_amount FROM sales_leads WHERE lead_code = %s",
                     (f"kommo:{lead_id}",))


def test_only_the_configured_windows_are_touched(sim, database_url):
    full_refresh(database_url, sim, 2025)
    full_refresh(database_url, sim, 2024)
    old, new = _lead_of(sim, 2024), _lead_of(sim, 2025)
    sim.dataset.clock.advance(10)
    sim.dataset.update_lead(old["id"], price=11)
    sim.dataset.update_lead(new["id"], price=22)
    counts = increment(database_url, sim, years=(2025,))
    assert counts["status"] == "succeeded"
    assert _sales_lead(database_url, new["id"])[2] == 22
    assert _sales_lead(database_url, old["id"])[2] != 11  # 2024 is not synced
    sim.dataset.delete_leads([old["id"]])
    increment(database_url, sim, years=(2025,))
    assert _sales_lead(database_url, old["id"])[1] is False  # nor are its deletions
    increment(database_url, sim, years=(2025, 2024))
    assert _sales_lead(database_url, old["id"])[1] is True


def test_deleted_restored_and_contacts(sim, database_url):
    full_refresh(database_url, sim)
    lead = _lead_of(sim, 2025)
    before = _sales_lead(database_url, lead["id"])
    sim.dataset.clock.advance(5)
    sim.dataset.delete_leads([lead["id"]])
    new_id = sim.dataset.add_lead(created_at=int(datetime(2025, 6, 1, tzinfo=UTC).timestamp()), status_id=79790634,
                                  name="Listed then deleted", main_contact={"name": "Brand New"})
    sim.dataset.delete_leads([new_id])
    increment(database_url, sim)
    assert _sales_lead(database_url, lead["id"])[1] is True
    assert _sales_lead(database_url, new_id) is None  # never added
    assert fetch_one(database_url, "SELECT is_active FROM bookings WHERE source_payload_id = %s",
                     (f"kommo:{lead['id']}",))[0] is False
    sim.dataset.clock.advance(5)
    sim.dataset.restore_leads([lead["id"]])
    contact_id = lead["_embedded"]["contacts"][0]["id"]
    sim.dataset.update_contact(contact_id, name="Renamed Client")
    increment(database_url, sim)
    after = _sales_lead(database_url, lead["id"])
    assert after[0] == before[0] and after[1] is False  # the same row back
    assert fetch_all(database_url, "SELECT name FROM clients WHERE kommo_contact_id = %s", (contact_id,)) == [
        ("Renamed Client",)]


def test_a_restore_and_a_relink_that_leave_updated_at_as_it_was_are_applied(sim, database_url):
    """Kommo does not document that a restoration or a change of main contact moves a lead's updated_at: the
    sync reads both from the events feed and fetches such a lead by id."""
    full_refresh(database_url, sim)
    restored, relinked = [lead for lead in sim.dataset.iter_leads(window=(
        int(datetime(2025, 1, 1, tzinfo=UTC).timestamp()), int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())))
        if lead["status_id"] in (79790634, 79790637) and lead["_embedded"]["contacts"]][:2]
    sim.dataset.clock.advance(5)
    sim.dataset.delete_leads([restored["id"]])
    increment(database_url, sim)
    assert _sales_lead(database_url, restored["id"])[1] is True
    other = next(c["id"] for lead in sim.dataset.iter_leads() for c in lead["_embedded"]["contacts"]
                 if c["id"] != relinked["_embedded"]["contacts"][0]["id"] and sim.dataset.contact(c["id"]))
    sim.dataset.clock.advance(600)  # both leads' updated_at now lie far behind the cursor and its margin
    increment(database_url, sim)
    sim.dataset.clock.advance(5)
    sim.dataset.restore_leads([restored["id"]], touch=False)
    sim.dataset.update_lead(relinked["id"], main_contact=other, touch=False)
    counts = increment(database_url, sim)
    assert counts["status"] == "succeeded"
    assert _sales_lead(database_url, restored["id"])[1] is False
    assert fetch_one(database_url, "SELECT c.kommo_contact_id FROM sales_leads s JOIN clients c ON c.id = s.client_id"
                                   " WHERE s.lead_code = %s", (f"kommo:{relinked['id']}",))[0] == other
    staged = fetch_one(database_url, "SELECT stats -> 'leads_fetched' FROM kommo_import_runs WHERE id = %s",
                       (counts["run_id"],))[0]
    assert staged == 2
