"""What the incremental sync's property test needs of the simulator, over real HTTP: late stamps (a change
stamped before the clock at which it becomes visible), changes that do not move ``updated_at`` (a relink, a
restore), option renames (no lead's ``updated_at`` moves), a faulty events feed, and a clock that jumps
days and across a new year."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import pytest
import requests

from kommo_assets.dev.simulator import (
    API_USER_ID,
    SOURCE_FIELD_ID,
    VEHICLE_FIELD_ID,
    KommoSimulator,
    SimulatorConfig,
)

TOKEN = "stamps-token"
T0 = 1_800_000_000  # 2027-01-15 08:00:00 UTC, after every generated date
NEW_YEAR = int(datetime(2028, 1, 1, tzinfo=UTC).timestamp())


@pytest.fixture()
def sim():
    with KommoSimulator(SimulatorConfig(leads=60, seed=4, token=TOKEN, rate_limit_rps=0)) as s:
        s.dataset.clock.set(T0)
        yield s


def _get(sim, http, path: str, **params) -> requests.Response:
    return http.get(f"{sim.base_url}{path}", params=params)


def _listed(sim, http, path: str, key: str, **params) -> list[dict]:
    r = _get(sim, http, path, limit=250, **params)
    assert r.status_code in (200, 204), r.text
    return [] if r.status_code == 204 else r.json()["_embedded"][key]


def _changed_since(sim, http, since: int) -> dict[int, int]:
    """Lead id -> updated_at of the leads a change-tracking client lists from ``since``."""
    return {lead["id"]: lead["updated_at"] for lead in _listed(
        sim, http, "/api/v4/leads", "leads", **{"filter[updated_at][from]": since, "order[updated_at]": "asc"})}


def _events(sim, http, **params) -> list[dict]:
    return _listed(sim, http, "/api/v4/events", "events", **params)


def _with_option(sim, field_id: int) -> dict:
    """A lead holding a value of select field ``field_id``."""
    return next(lead for lead in sim.dataset.iter_leads()
                if any(item["field_id"] == field_id for item in lead["custom_fields_values"] or ()))


def _option(lead: dict, field_id: int) -> dict:
    return next(item for item in lead["custom_fields_values"] if item["field_id"] == field_id)["values"][0]


# --- late stamps -------------------------------------------------------------------------------------

def test_late_stamps_stamp_changes_and_their_events_before_the_clock_the_answers_carry(sim, http):
    ds = sim.dataset
    lead, other, gone = (lead["id"] for lead in list(ds.iter_leads())[:3])
    contact = next(c["id"] for lead in ds.iter_leads() for c in lead["_embedded"]["contacts"]
                   if ds.contact(c["id"]) is not None)
    ds.clock.advance(100)  # T0 + 100
    with ds.late_stamps(45):
        ds.update_lead(lead, price=777)
        ds.delete_leads([gone])
        ds.update_contact(contact, name="Late Stamp")
        added = ds.add_lead(name="Added late")
    ds.update_lead(other, price=778)  # after the block: stamped by the clock again
    r = _get(sim, http, f"/api/v4/leads/{lead}")
    assert r.json()["updated_at"] == T0 + 55 and r.json()["price"] == 777
    assert parsedate_to_datetime(r.headers["Date"]).timestamp() == T0 + 100  # the clock: visible only now
    assert _changed_since(sim, http, T0 + 50) == {lead: T0 + 55, added: T0 + 55, other: T0 + 100}
    assert _get(sim, http, f"/api/v4/contacts/{contact}").json()["updated_at"] == T0 + 55
    stamps = {(e["type"], e["entity_id"]): e["created_at"] for e in _events(sim, http)}
    assert stamps[("lead_deleted", gone)] == stamps[("sale_field_changed", lead)] == T0 + 55
    assert stamps[("lead_added", added)] == stamps[("name_field_changed", contact)] == T0 + 55
    assert stamps[("sale_field_changed", other)] == T0 + 100
    # Newest first by stamp: the late deletion lists after the on-time change although it was made first.
    order = [(e["type"], e["entity_id"]) for e in _events(sim, http, **{"filter[entity]": "lead"})]
    assert order.index(("sale_field_changed", other)) < order.index(("lead_deleted", gone))


def test_late_stamps_nest_hold_only_for_the_calling_thread_and_refuse_a_stamp_ahead(sim):
    ds = sim.dataset
    first, second, third = (lead["id"] for lead in list(ds.iter_leads())[:3])
    stamped: dict[str, int] = {}

    def elsewhere() -> None:  # another thread, while this one is inside the block
        stamped["thread"] = ds.update_lead(third, price=3)["updated_at"]

    with ds.late_stamps(30):
        with ds.late_stamps(10):
            stamped["inner"] = ds.update_lead(first, price=1)["updated_at"]
        stamped["outer"] = ds.update_lead(second, price=2)["updated_at"]
        worker = threading.Thread(target=elsewhere)
        worker.start()
        worker.join()
    assert stamped == {"inner": T0 - 10, "outer": T0 - 30, "thread": T0}
    with pytest.raises(ValueError), ds.late_stamps(-5):
        pass


def test_late_s_on_a_mutation_over_http(sim, http):
    lead = next(sim.dataset.iter_leads())["id"]
    r = requests.post(f"{sim.base_url}/_simulator/mutations", json=[
        {"op": "update_lead", "lead_id": lead, "price": 901, "late_s": 60},
        {"op": "delete_leads", "ids": [lead], "late_s": 20},
        {"op": "restore_leads", "ids": [lead]},
    ])
    assert r.status_code == 200, r.text
    stamps = [(e.type, e.created_at) for e in sim.dataset.events.all() if e.entity_id == lead]
    assert stamps == [("sale_field_changed", T0 - 60), ("lead_deleted", T0 - 20), ("lead_restored", T0)]


# --- changes that do not move updated_at -----------------------------------------------------------

def test_a_relink_without_touch_changes_the_main_contact_and_records_events_but_keeps_updated_at(sim, http):
    ds = sim.dataset
    lead = next(lead for lead in ds.iter_leads() if lead["_embedded"]["contacts"])
    before = [c["id"] for c in lead["_embedded"]["contacts"]]
    ds.clock.advance(3600)
    changed = ds.update_lead(lead["id"], main_contact={"name": "Quiet Relink"}, touch=False)
    new_main = changed["_embedded"]["contacts"][0]
    assert new_main["is_main"] and new_main["id"] not in before
    served = _get(sim, http, f"/api/v4/leads/{lead['id']}", **{"with": "contacts"}).json()
    assert (served["updated_at"], served["updated_by"]) == (lead["updated_at"], lead["updated_by"])
    assert served["_embedded"]["contacts"][0]["id"] == new_main["id"]
    assert lead["id"] not in _changed_since(sim, http, T0)  # a change-tracking list does not show it
    linked = [e for e in _events(sim, http, **{"filter[entity]": "lead", "filter[type]": "entity_linked"})
              if e["entity_id"] == lead["id"]]
    assert [e["created_at"] for e in linked] == [T0 + 3600]
    with pytest.raises(ValueError):
        ds.update_lead(lead["id"], price=1, touch=False, updated_at=T0)


def test_a_restore_without_touch_brings_the_lead_back_as_it_was_deleted_and_records_the_event(sim, http):
    ds = sim.dataset
    quiet, moved = (lead for lead in list(ds.iter_leads())[:2])
    ds.clock.advance(60)
    ds.delete_leads([quiet["id"], moved["id"]])
    ds.clock.advance(60)
    ds.restore_leads([quiet["id"]], touch=False)
    r = requests.post(f"{sim.base_url}/_simulator/mutations",
                      json={"op": "restore_leads", "ids": [moved["id"]], "touch": True})
    assert r.status_code == 200 and r.json()["restored"] == 1
    served = _get(sim, http, f"/api/v4/leads/{quiet['id']}").json()
    assert (served["updated_at"], served["updated_by"]) == (quiet["updated_at"], quiet["updated_by"])
    assert _changed_since(sim, http, T0) == {moved["id"]: T0 + 120}
    restored = {e["entity_id"]: e["created_at"] for e in _events(sim, http, **{"filter[type]": "lead_restored"})}
    assert restored == {quiet["id"]: T0 + 120, moved["id"]: T0 + 120}
    assert sim.dataset.deleted_lead_ids() == []


# --- option renames ----------------------------------------------------------------------------------

@pytest.mark.parametrize("field_id", [SOURCE_FIELD_ID, VEHICLE_FIELD_ID])
def test_an_option_rename_shows_on_the_field_and_on_every_lead_holding_it_without_moving_updated_at(
        sim, http, field_id):
    ds = sim.dataset
    generated = _with_option(sim, field_id)
    enum_id = _option(generated, field_id)["enum_id"]
    # A lead edited before the rename holds the old label in its stored version; it must show the new one too.
    edited = ds.add_lead(name="Holds the option", custom_fields={str(field_id): enum_id})
    events_before = len(ds.events)
    ds.clock.advance(86_400)
    r = requests.post(f"{sim.base_url}/_simulator/mutations",
                      json={"op": "rename_option", "field_id": field_id, "enum_id": enum_id, "label": "Renamed ✓"})
    assert r.status_code == 200, r.text
    definition = _get(sim, http, f"/api/v4/leads/custom_fields/{field_id}").json()
    assert {e["id"]: e["value"] for e in definition["enums"]}[enum_id] == "Renamed ✓"
    for lead_id, updated_at in ((generated["id"], generated["updated_at"]), (edited, T0)):
        served = _get(sim, http, f"/api/v4/leads/{lead_id}").json()
        assert _option(served, field_id) == {"value": "Renamed ✓", "enum_id": enum_id, "enum_code": None}
        assert served["updated_at"] == updated_at
    listed = {lead["id"]: lead for lead in _listed(sim, http, "/api/v4/leads", "leads", **{"filter[id][]": edited})}
    assert _option(listed[edited], field_id)["value"] == "Renamed ✓"
    assert _changed_since(sim, http, T0 + 1) == {}
    assert len(ds.events) == events_before  # Kommo records no lead event for a settings change
    # A lead given the option afterwards carries the new label as well.
    later = ds.add_lead(name="After", custom_fields={str(field_id): enum_id})
    assert _option(ds.lead(later), field_id)["value"] == "Renamed ✓"


def test_an_option_rename_refuses_unknown_fields_and_options(sim):
    with pytest.raises(KeyError):
        sim.dataset.rename_option(SOURCE_FIELD_ID, 123, "x")
    with pytest.raises(ValueError):
        sim.dataset.rename_option(1218176, 1, "x")  # a date_time field has no options
    r = requests.post(f"{sim.base_url}/_simulator/mutations",
                      json={"op": "rename_option", "field_id": 999, "enum_id": 1, "label": "x"})
    assert r.status_code == 400


# --- a faulty events feed; a clock that jumps -------------------------------------------------------

def test_the_events_feed_takes_a_spurious_204_and_error_answers(sim, http):
    ds = sim.dataset
    lead = next(ds.iter_leads())["id"]
    ds.delete_leads([lead])
    params = {"filter[type]": "lead_deleted,lead_restored", "filter[entity]": "lead"}
    sim.add_fault(kind="empty", path="/api/v4/events")
    sim.add_fault(kind="status", path="/api/v4/events", status=429, after=1, times=1)
    sim.add_fault(kind="status", path="/api/v4/events", status=503, after=2, times=1)
    answers = [_get(sim, http, "/api/v4/events", **params) for _ in range(4)]
    assert [r.status_code for r in answers] == [204, 429, 503, 200]
    assert answers[0].content == b"" and "Retry-After" not in answers[1].headers
    assert [e["entity_id"] for e in answers[3].json()["_embedded"]["events"]] == [lead]


def test_the_clock_jumps_days_and_across_a_new_year(sim, http):
    ds = sim.dataset
    ds.clock.set(NEW_YEAR - 30)
    lead = ds.add_lead(created_at=NEW_YEAR - 30, name="Old year")
    ds.clock.advance(3 * 86_400)  # frozen: stays there
    r = _get(sim, http, "/api/v4/account")
    assert parsedate_to_datetime(r.headers["Date"]).timestamp() == NEW_YEAR - 30 + 3 * 86_400
    ds.update_lead(lead, price=5)
    assert _get(sim, http, f"/api/v4/leads/{lead}").json()["updated_at"] == NEW_YEAR - 30 + 3 * 86_400
    added = ds.add_lead(created_at=NEW_YEAR, name="First second of the year")
    created = _listed(sim, http, "/api/v4/leads", "leads", **{"filter[created_at][from]": NEW_YEAR})
    assert [x["id"] for x in created] == [added]
    assert ds.lead(added)["updated_by"] == API_USER_ID
