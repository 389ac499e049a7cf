"""Change tracking over real HTTP: the clock, updated_at filters and orders, the trash, the events feed,
every mutation's effect on listings, events and updated_at, and the ground truth a full refresh sees."""

from __future__ import annotations

import hashlib
import json
import time
from email.utils import parsedate_to_datetime

import pytest
import requests

from kommo_assets.dev.simulator import (
    API_USER_ID,
    COLLECT_FIELD_ID,
    CONTACT_EMAIL_FIELD_ID,
    CONTACT_ID_BASE,
    CONTACT_PHONE_FIELD_ID,
    DELIVERY_FIELD_ID,
    LEAD_ID_BASE,
    PIPELINE_CORPORATE,
    PIPELINE_RENTAL,
    SOURCE_FIELD_ID,
    STATUS_BOT_ANSWERING,
    STATUS_CONFIRMED,
    STATUS_FOLLOW_UP,
    STATUS_LOST,
    VEHICLE_FIELD_ID,
    Dataset,
    KommoSimulator,
    LeadQuery,
    SimulatorConfig,
)

TOKEN = "change-token"
T0 = 1_800_000_000  # 2027-01-15 08:00:00 UTC, after every generated date
EVENT_KEYS = {"id", "type", "entity_id", "entity_type", "created_by", "created_at", "value_after",
              "value_before", "account_id", "_links", "_embedded"}


@pytest.fixture()
def sim():
    with KommoSimulator(SimulatorConfig(leads=400, seed=9, token=TOKEN, rate_limit_rps=0)) as s:
        s.dataset.clock.set(T0)
        yield s


def mutate(sim: KommoSimulator, *specs: dict) -> list[dict]:
    r = requests.post(f"{sim.base_url}/_simulator/mutations", json=list(specs))
    assert r.status_code == 200, r.text
    return r.json()["results"]


def get_all(http: requests.Session, url: str, key: str, params: dict, limit: int) -> list[dict]:
    """Pages until 204, checking every page's envelope on the way."""
    out: list[dict] = []
    page = 1
    while True:
        r = http.get(url, params={**params, "limit": limit, "page": page})
        if r.status_code == 204:
            assert r.content == b""
            return out
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/hal+json"
        body = r.json()
        assert body["_page"] == page and f"page={page + 1}" in body["_links"]["next"]["href"]
        assert len(body["_embedded"][key]) <= limit
        out += body["_embedded"][key]
        page += 1


def events(sim: KommoSimulator, http: requests.Session, **params) -> list[dict]:
    return get_all(http, f"{sim.base_url}/api/v4/events", "events", params, 100)


def lead(sim: KommoSimulator, http: requests.Session, lead_id: int) -> dict:
    r = http.get(f"{sim.base_url}/api/v4/leads/{lead_id}", params={"with": "contacts"})
    assert r.status_code == 200
    return r.json()


def cf(entity: dict, field_id: int):
    item = next((it for it in entity["custom_fields_values"] or () if it["field_id"] == field_id), None)
    return None if item is None else item["values"][0]


def main_contact(entity: dict) -> int | None:
    return next((c["id"] for c in entity["_embedded"]["contacts"] if c["is_main"]), None)


# --- the clock -------------------------------------------------------------------------------------


def test_clock_freezes_advances_resumes_and_dates_responses(sim, http):
    ctl = f"{sim.base_url}/_simulator/clock"
    assert requests.get(ctl).json() == {"now": T0, "frozen": True}
    r = http.get(f"{sim.base_url}/api/v4/leads", params={"limit": 1})
    assert parsedate_to_datetime(r.headers["Date"]).timestamp() == T0
    assert requests.post(ctl, json={"advance": 90}).json() == {"now": T0 + 90, "frozen": True}
    time.sleep(1.1)
    assert requests.get(ctl).json()["now"] == T0 + 90  # frozen: real time does not move it
    assert requests.post(ctl, json={"set": T0 + 10}).json()["now"] == T0 + 10  # back, if asked
    resumed = requests.post(ctl, json={"resume": True}).json()
    assert resumed["frozen"] is False and resumed["now"] in (T0 + 10, T0 + 11)
    time.sleep(1.1)
    assert T0 + 11 <= requests.get(ctl).json()["now"] <= T0 + 13
    assert requests.post(ctl, json={"set": T0, "tick": True}).json()["frozen"] is False
    assert requests.post(ctl, json={"advance": -1}).status_code == 400
    assert requests.post(ctl, json={}).status_code == 400
    # the same through mutations (so a mutate fault can move time while a client pages)
    assert mutate(sim, {"op": "set_clock", "ts": T0 + 500}, {"op": "advance_clock", "seconds": 5}) == [
        {"now": T0 + 500}, {"now": T0 + 505}]
    assert sim.dataset.clock.frozen


def test_default_clock_is_real_time_but_never_before_the_generated_history():
    ds = Dataset(SimulatorConfig(leads=50, seed=1))
    assert not ds.clock.frozen and abs(ds.clock.now() - max(time.time(), ds.now)) <= 2
    future = Dataset(SimulatorConfig(leads=50, seed=1, year=2090))
    assert future.clock.now() >= future.now  # the account's "today" is ahead of real time
    newest = max(x["updated_at"] for x in future.iter_leads())
    lead_id = LEAD_ID_BASE + 7
    assert future.update_lead(lead_id, price=5)["updated_at"] > newest


# --- leads: updated_at, orders, ids, keyset --------------------------------------------------------


def test_updated_at_filter_and_orders_see_exactly_the_changed_leads(sim, http):
    touched_t0 = [LEAD_ID_BASE + k for k in (300, 5, 77)]
    touched_t1 = [LEAD_ID_BASE + k for k in (40, 41)]
    mutate(sim, *({"op": "update_lead", "lead_id": x, "price": 100 + n} for n, x in enumerate(touched_t0)))
    sim.dataset.clock.advance(7)
    mutate(sim, *({"op": "update_lead", "lead_id": x, "name": "edited"} for x in touched_t1))
    url = f"{sim.base_url}/api/v4/leads"

    got = get_all(http, url, "leads", {"filter[updated_at][from]": T0, "order[updated_at]": "asc"}, 2)
    assert [x["id"] for x in got] == sorted(touched_t0) + sorted(touched_t1)
    assert [x["updated_at"] for x in got] == [T0] * 3 + [T0 + 7] * 2
    got = get_all(http, url, "leads", {"filter[updated_at][from]": T0, "order[updated_at]": "desc"}, 250)
    assert [x["id"] for x in got] == sorted(touched_t1, reverse=True) + sorted(touched_t0, reverse=True)
    got = get_all(http, url, "leads", {"filter[updated_at][from]": T0, "filter[updated_at][to]": T0 + 6}, 250)
    assert [x["id"] for x in got] == sorted(touched_t0)  # order[id] by default, range inclusive
    got = get_all(http, url, "leads", {"filter[updated_at][from]": T0 + 7, "filter[updated_at][to]": T0 + 7,
                                       "order[id]": "desc"}, 250)
    assert [x["id"] for x in got] == sorted(touched_t1, reverse=True)
    ids = {"filter[id][]": [touched_t0[0], touched_t1[0], LEAD_ID_BASE + 1]}
    got = get_all(http, url, "leads", {**ids, "filter[updated_at][from]": T0, "order[updated_at]": "asc"}, 250)
    assert [x["id"] for x in got] == [touched_t0[0], touched_t1[0]]
    # created_at keeps working alongside, in both orders
    ds = sim.dataset
    window = {"filter[created_at][from]": ds.window_start, "filter[created_at][to]": ds.window_end - 1}
    got = get_all(http, url, "leads", {**window, "filter[updated_at][from]": T0, "order[created_at]": "desc"}, 250)
    expected = [x for x in ds.iter_leads(window=(ds.window_start, ds.window_end)) if x["updated_at"] >= T0]
    assert [x["id"] for x in got] == [x["id"] for x in sorted(expected, key=lambda x: x["created_at"], reverse=True)]
    assert expected


def test_updated_at_keyset_paging_with_an_inclusive_cursor_reads_every_change_once(sim, http):
    # 7 leads changed in one second, 3 in the next: a page of 4 cannot hold a second, so the client pages
    # by `page` inside the cursor's second, as the full export does for created_at
    first = [LEAD_ID_BASE + k for k in range(100, 107)]
    mutate(sim, *({"op": "update_lead", "lead_id": x, "price": 1} for x in first))
    sim.dataset.clock.advance(1)
    second = [LEAD_ID_BASE + k for k in (3, 2, 1)]
    mutate(sim, *({"op": "update_lead", "lead_id": x, "price": 2} for x in second))
    url = f"{sim.base_url}/api/v4/leads"
    cursor, seen, requests_made = T0, [], 0
    while True:
        page_no, batch = 1, []
        while True:
            r = http.get(url, params={"filter[updated_at][from]": cursor, "order[updated_at]": "asc",
                                      "limit": 4, "page": page_no})
            requests_made += 1
            if r.status_code == 204:
                break
            leads = r.json()["_embedded"]["leads"]
            batch += leads
            if leads[-1]["updated_at"] != cursor or len(leads) < 4:
                break
            page_no += 1
        new = [x for x in batch if x["id"] not in {s["id"] for s in seen}]
        if not new:
            break
        seen += new
        cursor = max(x["updated_at"] for x in batch)
    assert [x["id"] for x in seen] == sorted(first) + sorted(second)
    assert requests_made < 10


def test_updated_at_cursor_index_matches_a_full_scan():
    ds = Dataset(SimulatorConfig(leads=3000, seed=4))
    ds.clock.set(T0)
    for k in range(0, 3000, 97):
        ds.update_lead(LEAD_ID_BASE + k, price=k)
        ds.clock.advance(k % 3)
    assert ds.find_lead_ids(LeadQuery(updated_from=0, order_field="updated_at"), 0, 1)  # builds the index
    ds.delete_leads([LEAD_ID_BASE + 97, LEAD_ID_BASE + 5, LEAD_ID_BASE + 6])
    ds.restore_leads([LEAD_ID_BASE + 6])
    ds.add_lead(ds.window_start)
    ds.add_lead(updated_at=T0 + 3)
    every = sorted(ds.iter_leads(()), key=lambda x: (x["updated_at"], x["id"]))
    stamps = sorted({x["updated_at"] for x in every})
    for cursor in (stamps[0], stamps[len(stamps) // 2], T0, T0 + 40, stamps[-1], stamps[-1] + 1):
        for to in (None, cursor + 30 * 86400):
            q = LeadQuery(updated_from=cursor, updated_to=to, order_field="updated_at")
            want = [x["id"] for x in every if x["updated_at"] >= cursor and (to is None or x["updated_at"] <= to)]
            assert ds.find_lead_ids(q, 0, 10_000) == want
            assert ds.find_lead_ids(LeadQuery(updated_from=cursor, updated_to=to, order_field="updated_at",
                                              order_desc=True), 0, 10_000) == want[::-1]
            assert ds.count_leads(q) == len(want)


# --- the trash: delete, restore, purge -------------------------------------------------------------


def test_deleted_leads_leave_the_lists_go_to_the_trash_and_come_back_restored(sim, http):
    url = f"{sim.base_url}/api/v4/leads"
    gone = [LEAD_ID_BASE + 10, LEAD_ID_BASE + 11, LEAD_ID_BASE + 250]
    before = lead(sim, http, gone[0])
    assert mutate(sim, {"op": "delete_leads", "ids": gone + [1]}) == [{"deleted": 3}]
    assert http.get(f"{url}/{gone[0]}").status_code == 204
    listed = get_all(http, url, "leads", {}, 250)
    assert not {x["id"] for x in listed} & set(gone) and len(listed) == 397
    trash = get_all(http, url, "leads", {"with": "only_deleted"}, 2)
    assert trash == [{"id": x, "updated_at": T0, "is_deleted": True} for x in gone]
    assert sim.dataset.deleted_lead_ids() == gone
    assert http.get(url, params={"with": "only_deleted", "filter[updated_at][from]": T0 + 1}).status_code == 204
    got = http.get(url, params={"with": "contacts,only_deleted", "filter[id][]": [gone[1], LEAD_ID_BASE]})
    assert got.json()["_embedded"]["leads"] == [{"id": gone[1], "updated_at": T0, "is_deleted": True}]

    sim.dataset.clock.advance(60)
    assert mutate(sim, {"op": "restore_leads", "ids": [gone[0], gone[1], LEAD_ID_BASE + 12]}) == [{"restored": 2}]
    back = lead(sim, http, gone[0])
    assert back["id"] == gone[0] and back["updated_at"] == T0 + 60
    assert {k: v for k, v in back.items() if k not in ("updated_at", "updated_by")} == {
        k: v for k, v in before.items() if k not in ("updated_at", "updated_by")}
    listed = get_all(http, url, "leads", {"limit": 250}, 250)
    assert [x["id"] for x in listed][10:12] == gone[:2]  # at their place in id order
    assert [x["id"] for x in get_all(http, url, "leads", {"with": "only_deleted"}, 250)] == [gone[2]]
    changed = get_all(http, url, "leads", {"filter[updated_at][from]": T0 + 60, "order[updated_at]": "asc"}, 250)
    assert [x["id"] for x in changed] == gone[:2]

    assert mutate(sim, {"op": "purge_leads", "ids": [gone[2]]}) == [{"purged": 1}]
    assert http.get(url, params={"with": "only_deleted"}).status_code == 204
    assert mutate(sim, {"op": "restore_leads", "ids": [gone[2]]}) == [{"restored": 0}]
    types = [(e["type"], e["entity_id"], e["created_at"]) for e in events(sim, http, **{"filter[entity]": "lead"})]
    assert types == [("lead_restored", gone[1], T0 + 60), ("lead_restored", gone[0], T0 + 60),
                     ("lead_deleted", gone[2], T0), ("lead_deleted", gone[1], T0), ("lead_deleted", gone[0], T0)]


# --- the events feed -------------------------------------------------------------------------------


def test_events_filters_forms_paging_shape_and_204(sim, http):
    url = f"{sim.base_url}/api/v4/events"
    assert http.get(url).status_code == 204  # an untouched account has no events
    a, b = LEAD_ID_BASE + 1, LEAD_ID_BASE + 2
    c = next(x["id"] for x in sim.dataset.iter_leads(()) if x["status_id"] == STATUS_CONFIRMED)
    contact_id = next(x for x in range(CONTACT_ID_BASE, CONTACT_ID_BASE + 400) if sim.dataset.contact(x))
    mutate(sim, {"op": "delete_leads", "ids": [a, b]})
    sim.dataset.clock.advance(10)
    mutate(sim, {"op": "restore_leads", "ids": [a]}, {"op": "update_lead", "lead_id": c, "status_id": STATUS_LOST},
           {"op": "update_contact", "contact_id": contact_id, "name": "Ana Núñez"})
    sim.dataset.clock.advance(10)
    mutate(sim, {"op": "delete_leads", "ids": [c]})

    deleted_or_restored = [("lead_deleted", c), ("lead_restored", a), ("lead_deleted", b), ("lead_deleted", a)]
    for params in ({"filter[type][]": ["lead_deleted", "lead_restored"]},
                   {"filter[type]": "lead_deleted,lead_restored"},
                   {"filter[type][0]": "lead_deleted", "filter[type][1]": "lead_restored"},
                   {"filter[type][]": ["lead_deleted", "lead_restored"], "filter[entity][]": "lead"}):
        got = events(sim, http, **params)
        assert [(e["type"], e["entity_id"]) for e in got] == deleted_or_restored, params
    every = events(sim, http)
    assert len(every) == 6 and [e["created_at"] for e in every] == sorted((e["created_at"] for e in every),
                                                                          reverse=True)
    assert [e["type"] for e in events(sim, http, **{"filter[entity][]": "contact"})] == ["name_field_changed"]
    assert len(events(sim, http, **{"filter[entity]": "lead,contact"})) == 6
    assert [e["entity_id"] for e in events(sim, http, **{"filter[entity]": "lead", "filter[entity_id][]": a})] == [a, a]
    assert [e["created_at"] for e in events(sim, http, **{"filter[created_at][from]": T0 + 10})] == [T0 + 20] + [T0 + 10] * 3
    assert len(events(sim, http, **{"filter[created_at][from]": T0 + 1, "filter[created_at][to]": T0 + 10})) == 3
    assert len(events(sim, http, **{"filter[created_at]": T0 + 20})) == 1  # one timestamp: from then on
    assert len(events(sim, http, **{"filter[created_at]": f"{T0},{T0 + 10}"})) == 5
    assert [e["entity_id"] for e in events(sim, http, **{
        "filter[value_after][leads_statuses][0][pipeline_id]": PIPELINE_RENTAL,
        "filter[value_after][leads_statuses][0][status_id]": STATUS_LOST})] == [c]
    assert http.get(url, params={"filter[type]": "lead_added"}).status_code == 204
    assert http.get(url, params={"filter[created_at][from]": T0 + 21}).status_code == 204

    # paging: pages of 3, then 204 past the end; the same order as one page
    assert [e["id"] for e in get_all(http, url, "events", {}, 3)] == [e["id"] for e in every]
    assert [e["id"] for e in get_all(http, url, "events", {}, 5)] == [e["id"] for e in every]
    r = http.get(url, params={"limit": 3, "page": 3})
    assert r.status_code == 204 and r.content == b""
    shape = every[-1]
    assert set(shape) == EVENT_KEYS and isinstance(shape["id"], str) and len(shape["id"]) == 26
    assert shape == {**shape, "type": "lead_deleted", "entity_type": "lead", "entity_id": a, "created_at": T0,
                     "created_by": API_USER_ID, "value_after": [], "value_before": [], "account_id": 31_415_926}
    assert shape["_links"]["self"]["href"] == f"{sim.base_url}/api/v4/events/{shape['id']}"
    assert shape["_embedded"]["entity"]["id"] == a
    assert http.get(f"{url}/{shape['id']}").json() == shape
    assert http.get(f"{url}/01aaaaaaaaaaaaaaaaaaaaaaaa").status_code == 204
    assert len({e["id"] for e in every}) == 6


def test_events_limit_is_capped_at_100(sim, http):
    mutate(sim, *({"op": "update_lead", "lead_id": LEAD_ID_BASE + k, "price": 7} for k in range(130)))
    url = f"{sim.base_url}/api/v4/events"
    r = http.get(url, params={"limit": 250})
    assert len(r.json()["_embedded"]["events"]) == 100 and "limit=100" in r.json()["_links"]["next"]["href"]
    assert len(http.get(url).json()["_embedded"]["events"]) == 50  # no limit: the usual 50
    assert len(http.get(url, params={"limit": 100, "page": 2}).json()["_embedded"]["events"]) == 30


# --- each mutation -----------------------------------------------------------------------------------


def test_create_a_lead_with_a_new_contact_vehicle_dates_and_status(sim, http):
    delivery, collect = T0 + 3 * 86400, T0 + 6 * 86400
    [created] = mutate(sim, {"op": "add_lead", "status_id": STATUS_CONFIRMED, "price": 450, "name": "New booking",
                             "main_contact": {"name": "Zoë Weiß", "phone": "+49 151 000", "email": "zoe@web.de"},
                             "custom_fields": {str(VEHICLE_FIELD_ID): 1000004, str(SOURCE_FIELD_ID): 2000002,
                                               str(DELIVERY_FIELD_ID): delivery, str(COLLECT_FIELD_ID): collect}})
    new = lead(sim, http, created["id"])
    assert created["id"] == LEAD_ID_BASE + 400
    assert (new["status_id"], new["pipeline_id"], new["price"], new["name"]) == (
        STATUS_CONFIRMED, PIPELINE_RENTAL, 450, "New booking")
    assert new["created_at"] == new["updated_at"] == T0 and new["created_by"] == API_USER_ID
    assert cf(new, VEHICLE_FIELD_ID)["enum_id"] == 1000004 and cf(new, SOURCE_FIELD_ID)["value"] == "Website"
    assert cf(new, DELIVERY_FIELD_ID) == {"value": delivery} and cf(new, COLLECT_FIELD_ID) == {"value": collect}
    contact_id = main_contact(new)
    assert new["_embedded"]["contacts"] == [{"id": contact_id, "is_main": True, "_links": {
        "self": {"href": f"{sim.base_url}/api/v4/contacts/{contact_id}"}}}]
    contact = http.get(f"{sim.base_url}/api/v4/contacts/{contact_id}").json()
    assert (contact["name"], contact["first_name"], contact["last_name"]) == ("Zoë Weiß", "Zoë", "Weiß")
    assert cf(contact, CONTACT_PHONE_FIELD_ID)["value"] == "+49 151 000"
    assert cf(contact, CONTACT_EMAIL_FIELD_ID)["value"] == "zoe@web.de"
    assert contact["created_at"] == contact["updated_at"] == T0
    got = [(e["type"], e["entity_id"]) for e in events(sim, http)]
    assert got == [("lead_added", created["id"]), ("contact_added", contact_id)]
    # created with a past created_at (an import): listed by its creation date, changed now
    [old] = mutate(sim, {"op": "add_lead", "created_at": sim.dataset.window_start + 60, "main_contact": contact_id})
    old_lead = lead(sim, http, old["id"])
    assert old_lead["created_at"] == sim.dataset.window_start + 60 and old_lead["updated_at"] == T0
    assert main_contact(old_lead) == contact_id


def test_edit_fields_bumps_updated_at_and_records_one_event_per_change(sim, http):
    target = LEAD_ID_BASE + 20
    before = lead(sim, http, target)
    sim.dataset.clock.advance(3)
    mutate(sim, {"op": "update_lead", "lead_id": target, "price": before["price"] + 5, "name": "Renamed",
                 "custom_fields": {str(VEHICLE_FIELD_ID): 1000009, str(SOURCE_FIELD_ID): 2000006,
                                   str(DELIVERY_FIELD_ID): T0 + 86400, str(COLLECT_FIELD_ID): None}})
    after = lead(sim, http, target)
    assert after["updated_at"] == T0 + 3 and after["updated_by"] == API_USER_ID
    assert after["price"] == before["price"] + 5 and after["name"] == "Renamed"
    assert cf(after, VEHICLE_FIELD_ID)["enum_id"] == 1000009 and cf(after, SOURCE_FIELD_ID)["value"] == "WhatsApp"
    assert cf(after, DELIVERY_FIELD_ID) == {"value": T0 + 86400} and cf(after, COLLECT_FIELD_ID) is None
    got = {e["type"]: e for e in events(sim, http, **{"filter[entity_id]": target, "filter[entity]": "lead"})}
    assert got["sale_field_changed"]["value_after"] == [{"sale_field_value": {"sale": before["price"] + 5}}]
    assert got["sale_field_changed"]["value_before"] == [{"sale_field_value": {"sale": before["price"]}}]
    assert got["name_field_changed"]["value_after"] == [{"name_field_value": {"name": "Renamed"}}]
    vehicle = got[f"custom_field_{VEHICLE_FIELD_ID}_value_changed"]
    assert vehicle["value_after"] == [{"custom_field_value": {
        "field_id": VEHICLE_FIELD_ID, "field_type": 4, "enum_id": 1000009, "text": cf(after, VEHICLE_FIELD_ID)["value"]}}]
    had_collect = cf(before, COLLECT_FIELD_ID) is not None
    assert (f"custom_field_{COLLECT_FIELD_ID}_value_changed" in got) == had_collect
    assert {e["created_at"] for e in got.values()} == {T0 + 3}
    generic = events(sim, http, **{"filter[type]": "custom_field_value_changed"})
    assert {e["type"] for e in generic} <= {f"custom_field_{f}_value_changed" for f in (
        VEHICLE_FIELD_ID, SOURCE_FIELD_ID, DELIVERY_FIELD_ID, COLLECT_FIELD_ID)} and generic
    # nothing else moved
    assert {k: v for k, v in after.items() if k not in ("price", "name", "updated_at", "updated_by",
                                                        "custom_fields_values")} == {
        k: v for k, v in before.items() if k not in ("price", "name", "updated_at", "updated_by",
                                                     "custom_fields_values")}


@pytest.mark.parametrize("status_id,pipeline_id,closed", [
    (STATUS_LOST, PIPELINE_RENTAL, True), (STATUS_BOT_ANSWERING, PIPELINE_RENTAL, False),
    (STATUS_FOLLOW_UP, PIPELINE_RENTAL, False), (STATUS_LOST, PIPELINE_CORPORATE, True),
])
def test_status_moves(sim, http, status_id, pipeline_id, closed):
    target = next(x["id"] for x in sim.dataset.iter_leads(()) if x["status_id"] == STATUS_CONFIRMED)
    before = lead(sim, http, target)
    changes = {"status_id": status_id} if pipeline_id == PIPELINE_RENTAL else {
        "status_id": status_id, "pipeline_id": pipeline_id}
    mutate(sim, {"op": "update_lead", "lead_id": target, **changes})
    after = lead(sim, http, target)
    assert (after["status_id"], after["pipeline_id"], after["updated_at"]) == (status_id, pipeline_id, T0)
    assert after["closed_at"] == (T0 if closed else None)
    [e] = events(sim, http, **{"filter[type][]": "lead_status_changed"})
    assert e["entity_id"] == target and e["created_at"] == T0
    assert e["value_after"] == [{"lead_status": {"id": status_id, "pipeline_id": pipeline_id}}]
    assert e["value_before"] == [{"lead_status": {"id": STATUS_CONFIRMED, "pipeline_id": before["pipeline_id"]}}]
    by_status = http.get(f"{sim.base_url}/api/v4/leads", params={
        "filter[statuses][0][pipeline_id]": pipeline_id, "filter[statuses][0][status_id]": status_id, "limit": 250})
    assert target in [x["id"] for x in by_status.json()["_embedded"]["leads"]]


def test_relink_the_main_contact_to_an_existing_or_a_new_contact(sim, http):
    target = next(x["id"] for x in sim.dataset.iter_leads() if len(x["_embedded"]["contacts"]) == 2)
    before = lead(sim, http, target)
    old_main = main_contact(before)
    other = next(c["id"] for c in before["_embedded"]["contacts"] if not c["is_main"])
    existing = next(c for c in range(CONTACT_ID_BASE + 300, CONTACT_ID_BASE + 400)
                    if sim.dataset.contact(c) is not None and c not in (old_main, other))
    sim.dataset.clock.advance(1)
    mutate(sim, {"op": "update_lead", "lead_id": target, "main_contact": existing})
    after = lead(sim, http, target)
    assert [(c["id"], c["is_main"]) for c in after["_embedded"]["contacts"]] == [
        (existing, True), (old_main, False), (other, False)]
    assert after["updated_at"] == T0 + 1
    assert [(e["type"], e["value_after"]) for e in events(sim, http)] == [
        ("entity_linked", [{"link": {"entity": {"id": existing, "type": "contact"}}}])]

    sim.dataset.clock.advance(1)
    mutate(sim, {"op": "update_lead", "lead_id": target, "contact_ids": [existing]})  # unlink the others
    [created] = mutate(sim, {"op": "update_lead", "lead_id": target, "main_contact": {"name": "Neu"}})
    new_main = main_contact(created["lead"])
    assert new_main not in (existing, old_main, other) and sim.dataset.contact(new_main)["name"] == "Neu"
    assert main_contact(lead(sim, http, target)) == new_main and lead(sim, http, target)["updated_at"] == T0 + 2
    kinds = [(e["type"], e["entity_id"]) for e in events(sim, http, **{"filter[created_at][from]": T0 + 2})]
    assert kinds == [("entity_linked", target), ("contact_added", new_main), ("entity_unlinked", target),
                     ("entity_unlinked", target)]
    r = requests.post(f"{sim.base_url}/_simulator/mutations", json={
        "op": "update_lead", "lead_id": target, "main_contact": CONTACT_ID_BASE + 10**6})
    assert r.status_code == 400 and main_contact(lead(sim, http, target)) == new_main
    r = requests.post(f"{sim.base_url}/_simulator/mutations", json={
        "op": "update_lead", "lead_id": target, "main_contact": {"name": "x"}, "colour": "red"})
    assert r.status_code == 400 and len(sim.dataset.events.all()) == len(events(sim, http))  # nothing made


def test_edit_a_contact_moves_its_updated_at_not_the_leads(sim, http):
    lead_row = next(x for x in sim.dataset.iter_leads() if main_contact(x) and sim.dataset.contact(main_contact(x)))
    contact_id = main_contact(lead_row)
    before = sim.dataset.contact(contact_id)
    sim.dataset.clock.advance(4)
    [r] = mutate(sim, {"op": "update_contact", "contact_id": contact_id, "name": "Ольга Смирнова",
                       "phone": "+7 916 1234567", "email": None})
    contact = http.get(f"{sim.base_url}/api/v4/contacts/{contact_id}").json()
    assert contact == r["contact"]
    assert (contact["first_name"], contact["last_name"], contact["updated_at"]) == ("Ольга", "Смирнова", T0 + 4)
    assert cf(contact, CONTACT_PHONE_FIELD_ID)["value"] == "+7 916 1234567"
    assert cf(contact, CONTACT_EMAIL_FIELD_ID) is None
    assert contact["created_at"] == before["created_at"]
    assert lead(sim, http, lead_row["id"])["updated_at"] == lead_row["updated_at"]  # the lead did not change
    got = {e["type"]: e for e in events(sim, http, **{"filter[entity]": "contact"})}
    assert got["name_field_changed"]["value_after"] == [{"name_field_value": {"name": "Ольга Смирнова"}}]
    assert got[f"custom_field_{CONTACT_PHONE_FIELD_ID}_value_changed"]["value_after"][0]["custom_field_value"][
        "text"] == "+7 916 1234567"
    had_email = cf(before, CONTACT_EMAIL_FIELD_ID) is not None
    assert (f"custom_field_{CONTACT_EMAIL_FIELD_ID}_value_changed" in got) == had_email
    mutate(sim, {"op": "delete_contacts", "ids": [contact_id]})
    assert [e["type"] for e in events(sim, http, **{"filter[type]": "contact_deleted"})] == ["contact_deleted"]
    r = requests.post(f"{sim.base_url}/_simulator/mutations", json={"op": "update_contact", "contact_id": contact_id,
                                                                    "name": "x"})
    assert r.status_code == 400


def test_several_mutations_in_one_second_share_it_and_keep_their_order(sim, http):
    a, b = LEAD_ID_BASE + 60, LEAD_ID_BASE + 61
    mutate(sim, {"op": "update_lead", "lead_id": a, "price": 1}, {"op": "update_lead", "lead_id": b, "price": 2},
           {"op": "update_lead", "lead_id": a, "price": 3}, {"op": "delete_leads", "ids": [b]},
           {"op": "restore_leads", "ids": [b]})
    assert lead(sim, http, a)["updated_at"] == lead(sim, http, b)["updated_at"] == T0
    assert lead(sim, http, a)["price"] == 3
    got = events(sim, http)
    assert [(e["type"], e["entity_id"]) for e in got] == [
        ("lead_restored", b), ("lead_deleted", b), ("sale_field_changed", a), ("sale_field_changed", b),
        ("sale_field_changed", a)]
    assert {e["created_at"] for e in got} == {T0}
    ids = [e["id"] for e in got]
    assert ids == sorted(ids, reverse=True)  # ids sort like the feed: by time, then by recording order
    changed = get_all(http, f"{sim.base_url}/api/v4/leads", "leads",
                      {"filter[updated_at][from]": T0, "order[updated_at]": "asc"}, 250)
    assert [x["id"] for x in changed] == [a, b]


# --- contacts list ---------------------------------------------------------------------------------


def test_contacts_list_by_updated_at_with_paging_and_orders(sim, http):
    url = f"{sim.base_url}/api/v4/contacts"
    ds = sim.dataset
    every = get_all(http, url, "contacts", {}, 250)
    assert [c["id"] for c in every] == sorted(c["id"] for c in every) and len(every) > 200
    edited = [every[k]["id"] for k in (150, 3, 90)]
    for n, contact_id in enumerate(edited):
        mutate(sim, {"op": "update_contact", "contact_id": contact_id, "email": f"x{n}@example.org"})
        ds.clock.advance(n)
    new_id = mutate(sim, {"op": "add_contact", "name": "Late Comer"})[0]["id"]
    got = get_all(http, url, "contacts", {"filter[updated_at][from]": T0, "order[updated_at]": "asc"}, 2)
    assert [(c["id"], c["updated_at"]) for c in got] == [
        (min(edited[:2]), T0), (max(edited[:2]), T0), (edited[2], T0 + 1), (new_id, T0 + 3)]
    got = get_all(http, url, "contacts", {"filter[updated_at][from]": T0 + 1, "order[updated_at]": "desc"}, 250)
    assert [c["id"] for c in got] == [new_id, edited[2]]
    # the generated history, ordered and filtered by updated_at, equals the ground truth
    mid = sorted(c["updated_at"] for c in every)[len(every) // 2]
    got = get_all(http, url, "contacts", {"filter[updated_at][from]": mid, "filter[updated_at][to]": T0 - 1,
                                          "order[updated_at]": "asc"}, 50)
    truth = sorted((c["updated_at"], c["id"]) for c in (ds.contact(x["id"]) for x in every)
                    if mid <= c["updated_at"] < T0)
    assert [(c["updated_at"], c["id"]) for c in got] == truth and truth
    assert all(c == ds.contact(c["id"]) for c in got)
    got = get_all(http, url, "contacts", {"order[created_at]": "desc", "filter[created_at][to]": every[5]["created_at"]}, 250)
    assert [c["created_at"] for c in got] == sorted((c["created_at"] for c in got), reverse=True)
    # id batches as before, now also narrowed by date
    batch = {"filter[id][]": [edited[0], edited[2], every[0]["id"]]}
    assert [c["id"] for c in get_all(http, url, "contacts", batch, 250)] == sorted(batch["filter[id][]"])
    got = get_all(http, url, "contacts", {**batch, "filter[updated_at][from]": T0}, 250)
    assert [c["id"] for c in got] == sorted(edited[::2])


# --- limiter, latency and faults on the new endpoints --------------------------------------------------


def test_events_count_against_the_rate_limit_and_take_faults_and_latency():
    with KommoSimulator(SimulatorConfig(leads=50, token=TOKEN, rate_limit_rps=3)) as s, requests.Session() as http:
        http.headers["Authorization"] = f"Bearer {TOKEN}"
        s.dataset.delete_leads([LEAD_ID_BASE])
        urls = [f"{s.base_url}/api/v4/events", f"{s.base_url}/api/v4/leads?with=only_deleted",
                f"{s.base_url}/api/v4/contacts?order[updated_at]=asc", f"{s.base_url}/api/v4/events"]
        codes = [http.get(u).status_code for u in urls]
        assert codes == [200, 200, 200, 429]  # one window for every endpoint
        time.sleep(1.05)
        s.set_rate_limit(0)
        event_id = s.dataset.events.all()[0].id
        s.add_fault(kind="status", path="/api/v4/events", status=500, times=2)
        assert http.get(f"{s.base_url}/api/v4/events/{event_id}").status_code == 500
        assert http.get(f"{s.base_url}/api/v4/events").status_code == 500
        assert http.get(f"{s.base_url}/api/v4/events").status_code == 200
        s.add_fault(kind="mutate", path="/api/v4/events", op="restore_leads", ids=[LEAD_ID_BASE])
        got = http.get(f"{s.base_url}/api/v4/events").json()["_embedded"]["events"]
        assert [e["type"] for e in got] == ["lead_restored", "lead_deleted"]  # applied before answering
        s.add_fault(kind="empty", path="/api/v4/events")
        assert http.get(f"{s.base_url}/api/v4/events").status_code == 204
        s.set_latency(250)
        t0 = time.monotonic()
        assert http.get(f"{s.base_url}/api/v4/events").status_code == 200
        assert time.monotonic() - t0 >= 0.25
        assert http.post(f"{s.base_url}/api/v4/events").status_code == 405
        stats = s.stats()
        assert stats["by_path"]["/api/v4/events"] >= 6 and stats["throttled_429"] == 1


# --- ground truth ----------------------------------------------------------------------------------


def test_ground_truth_of_a_window_reflects_every_mutation(sim, http):
    ds = sim.dataset
    window = (ds.window_start, ds.window_end)
    inside = [x["id"] for x in ds.iter_leads((), window=window)]
    mutate(sim, {"op": "delete_leads", "ids": inside[:3]}, {"op": "restore_leads", "ids": inside[:1]},
           {"op": "update_lead", "lead_id": inside[5], "status_id": STATUS_LOST},
           {"op": "add_lead", "created_at": ds.window_start + 1, "main_contact": {"name": "In Window"}},
           {"op": "add_lead", "created_at": ds.window_end},
           {"op": "update_contact", "contact_id": CONTACT_ID_BASE + 7, "name": "Edited"})
    truth = list(ds.iter_leads(window=window))
    api = get_all(http, f"{sim.base_url}/api/v4/leads", "leads", {
        "filter[created_at][from]": window[0], "filter[created_at][to]": window[1] - 1,
        "order[created_at]": "asc", "with": "contacts"}, 250)
    assert sorted(api, key=lambda x: x["id"]) == truth
    ids = [x["id"] for x in truth]
    assert inside[0] in ids and not {inside[1], inside[2]} & set(ids) and LEAD_ID_BASE + 401 not in ids
    assert next(x for x in truth if x["id"] == inside[5])["status_id"] == STATUS_LOST
    assert ds.contact(main_contact(truth[-1]))["name"] == "In Window"
    assert ds.contact(CONTACT_ID_BASE + 7)["name"] == "Edited"


def test_the_default_dataset_is_unchanged_and_untouched_accounts_have_no_changes():
    # the benchmark's figures depend on this: same seed, same leads and contacts
    ds = Dataset(SimulatorConfig(leads=2000, seed=1))
    digest = hashlib.sha256()
    for x in ds.iter_leads(("contacts", "catalog_elements")):
        digest.update(json.dumps(x, sort_keys=True).encode())
        for c in x["_embedded"]["contacts"]:
            digest.update(json.dumps(ds.contact(c["id"]), sort_keys=True).encode())
    assert digest.hexdigest() == GOLDEN_2000_SEED_1
    assert ds.events.all() == [] and ds.deleted_lead_ids() == []
    # every contact's listing dates are the dates it is served with
    for contact_id in ds.find_contact_ids(None, 0, 300):
        c = ds.contact(contact_id)
        assert ds._contact_times(contact_id, ds._state) == (c["created_at"], c["updated_at"])


GOLDEN_2000_SEED_1 = "518799e7caee9e0e1c07cbf182c0b7918e355e85028c0b27e72f2bcc649ea043"


def test_contact_date_index_after_changes_matches_a_full_scan():
    ds = Dataset(SimulatorConfig(leads=1500, seed=6))
    ds.clock.set(T0)
    assert ds.find_contact_ids(None, 0, 5, updated_from=0, order_field="updated_at")  # builds the index
    every = ds.find_contact_ids(None, 0, 10_000)
    ds.update_contact(every[10], name="A B")
    ds.clock.advance(2)
    ds.update_contact(every[3], email="a@b.c")
    ds.delete_contacts([every[20], every[3]])
    added = ds.add_contact(name="C D", created_at=ds.window_start)
    ds.put_raw_contact(CONTACT_ID_BASE + 10**6, {"id": CONTACT_ID_BASE + 10**6, "updated_at": T0 - 5})
    current = ds.find_contact_ids(None, 0, 10_000)
    assert added in current and every[3] not in current and CONTACT_ID_BASE + 10**6 in current
    for field, position in (("updated_at", 1), ("created_at", 0)):
        want = sorted(current, key=lambda c: (ds._contact_times(c, ds._state)[position], c))
        assert ds.find_contact_ids(None, 0, 10_000, order_field=field) == want
        assert ds.find_contact_ids(None, 0, 10_000, order_field=field, order_desc=True) == want[::-1]
    assert ds.find_contact_ids(None, 0, 10, updated_from=T0 - 5, order_field="updated_at") == [
        CONTACT_ID_BASE + 10**6, every[10], added]


def test_a_date_fault_puts_one_answer_ahead_of_the_servers_clock(sim, http):
    sim.add_fault(kind="date", path="/api/v4/leads", offset_s=3600, times=1)
    dates = [parsedate_to_datetime(http.get(f"{sim.base_url}/api/v4/leads", params={"limit": 1}).headers["Date"])
             for _ in range(2)]
    assert [d.timestamp() for d in dates] == [T0 + 3600, T0]  # the same connection, the next answer honest


def test_events_of_one_second_can_be_served_oldest_first(sim, http):
    lead_id = next(sim.dataset.lead_ids())
    sim.dataset.delete_leads([lead_id])
    sim.dataset.restore_leads([lead_id])
    newest_first = [e["type"] for e in events(sim, http, **{"filter[entity]": "lead"})]
    sim.dataset.events.ties_oldest_first = True
    oldest_first = [e["type"] for e in events(sim, http, **{"filter[entity]": "lead"})]
    assert newest_first == ["lead_restored", "lead_deleted"] and oldest_first == newest_first[::-1]
