"""Change tracking over HTTP against the simulator: Kommo's clock from the Date header, the probe's request
budget, changed leads of every status, the newest deletion or restoration of each lead, changed contacts."""

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig
from kommo_assets.kommo.changes import LEAD_DELETED, LEAD_RESTORED, latest_by_lead, touched_by_events
from kommo_assets_tests.kommo.support import TOKEN, fast_client

T0 = 1_800_000_000  # after every generated date


@pytest.fixture
def sim() -> Iterator[KommoSimulator]:
    with KommoSimulator(SimulatorConfig(leads=300, seed=5, token=TOKEN, rate_limit_rps=None)) as simulator:
        simulator.dataset.clock.set(T0)
        yield simulator


def _at(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def test_kommo_clock_is_the_date_header_of_the_first_answer(sim: KommoSimulator) -> None:
    with fast_client(sim) as client:
        assert client.kommo_clock is None
        client.field_options(1234163)
        sim.dataset.clock.advance(30)
        client.field_options(823206)
        assert client.kommo_clock == _at(T0)


def test_probe_of_an_idle_account_takes_three_requests_and_finds_nothing(sim: KommoSimulator) -> None:
    sim.dataset.clock.advance(10)
    with fast_client(sim) as client:
        probe = client.changes().probe(_at(T0 + 1))
    assert not probe.anything and probe.changed == []
    assert probe.requests == 3
    assert probe.clock == _at(T0 + 10)


@pytest.mark.parametrize("change, found", [("edit", "leads"), ("contact", "contacts"), ("delete", "lead_events")])
def test_probe_finds_each_kind_of_change_and_stops_there(sim: KommoSimulator, change: str, found: str) -> None:
    lead = next(sim.dataset.iter_leads())
    sim.dataset.clock.advance(5)
    if change == "edit":
        sim.dataset.update_lead(lead["id"], price=777)
    elif change == "contact":
        contact_id = lead["_embedded"]["contacts"][0]["id"]
        sim.dataset.update_contact(contact_id, name="Renamed Person")
    else:
        sim.dataset.delete_leads([lead["id"]])
    with fast_client(sim) as client:
        probe = client.changes().probe(_at(T0 + 5))
    assert probe.changed == [found]
    assert probe.requests == {"leads": 1, "contacts": 2, "lead_events": 3}[found]


def test_changed_leads_include_every_status_and_leave_deleted_ones_to_the_events(sim: KommoSimulator) -> None:
    leads = [lead["id"] for lead in sim.dataset.iter_leads()][:4]
    sim.dataset.clock.advance(60)
    sim.dataset.update_lead(leads[0], status_id=143)
    sim.dataset.update_lead(leads[1], price=12)
    sim.dataset.delete_leads([leads[2]])
    sim.dataset.delete_leads([leads[3]])
    sim.dataset.clock.advance(1)
    sim.dataset.restore_leads([leads[3]])
    with fast_client(sim) as client:
        changes = client.changes()
        changed = {lead["id"]: lead for page in changes.changed_lead_pages(_at(T0 + 60)) for lead in page.leads}
        events = latest_by_lead(changes.lead_events(_at(T0 + 60)))
    assert set(changed) == {leads[0], leads[1], leads[3]}
    assert changed[leads[0]]["status_id"] == 143
    assert {lead_id: e.type for lead_id, e in events.items()} == {leads[2]: LEAD_DELETED, leads[3]: LEAD_RESTORED}
    with fast_client(sim) as client:
        assert client.changes().lead_events(_at(T0 + 62)) == []


def test_changed_contacts_are_keyset_paged_by_updated_at(sim: KommoSimulator) -> None:
    contact_ids = sorted({c["id"] for lead in sim.dataset.iter_leads() for c in lead["_embedded"]["contacts"]})[:3]
    sim.dataset.clock.advance(120)
    for contact_id in contact_ids:
        sim.dataset.update_contact(contact_id, phone="+1 555 0100")
    with fast_client(sim, page_size=2) as client:
        found = [c["id"] for page in client.changes().changed_contact_pages(_at(T0 + 120)) for c in page.leads]
    assert sorted(found) == contact_ids


def test_relinks_are_read_from_their_own_start_and_deletions_from_theirs(sim: KommoSimulator) -> None:
    """A window read whole needs no relinks (its every lead is listed), a covered one needs them from its
    coverage: relinks are asked from ``links_since``, deletions from ``since``, in one read when both agree."""
    first, second, other = [lead for lead in sim.dataset.iter_leads() if lead["_embedded"]["contacts"]][:3]
    contact = other["_embedded"]["contacts"][0]["id"]
    sim.dataset.clock.advance(10)
    sim.dataset.delete_leads([first["id"]])
    sim.dataset.update_lead(second["id"], main_contact=contact, touch=False)  # relinked at T0 + 10
    with fast_client(sim) as client:
        tracker = client.changes()
        kinds = {(e.lead_id, e.type) for e in tracker.lead_events(_at(T0), _at(T0))}
        assert (first["id"], LEAD_DELETED) in kinds and (second["id"], "entity_linked") in kinds
        before = client.stats.requests
        assert {e.type for e in tracker.lead_events(_at(T0), None)} == {LEAD_DELETED}
        assert client.stats.requests - before == 1  # one read, of deletions and restorations only
        later = {(e.lead_id, e.type) for e in tracker.lead_events(_at(T0), _at(T0 + 11))}
        assert later == {(first["id"], LEAD_DELETED)}  # the relink is older than links_since
        assert touched_by_events(tracker.lead_events(_at(T0), _at(T0))) == {second["id"]: T0 + 10}
