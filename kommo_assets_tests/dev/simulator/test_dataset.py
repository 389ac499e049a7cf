"""The simulated account's data: determinism, distributions, shapes, queries and mutations."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from kommo_assets.dev.simulator import (
    COLLECT_FIELD_ID,
    CONTACT_ID_BASE,
    DELIVERY_FIELD_ID,
    LEAD_ID_BASE,
    PIPELINE_CORPORATE,
    PIPELINE_RENTAL,
    SOURCE_FIELD_ID,
    STATUS_BOT_ANSWERING,
    STATUS_CAR_DELIVERED,
    STATUS_CONFIRMED,
    STATUS_CORPORATE_NEW,
    STATUS_FOLLOW_UP,
    STATUS_LOST,
    STATUS_QUOTE_SENT,
    STATUS_WON,
    VEHICLE_FIELD_ID,
    Dataset,
    LeadQuery,
    SimulatorConfig,
)

LEAD_KEYS = {
    "id", "name", "price", "responsible_user_id", "group_id", "status_id", "pipeline_id", "loss_reason_id",
    "created_by", "updated_by", "created_at", "updated_at", "closed_at", "closest_task_at",
    "custom_fields_values", "score", "account_id", "labor_cost", "is_deleted", "_links", "_embedded",
}
CONTACT_KEYS = {
    "id", "name", "first_name", "last_name", "responsible_user_id", "group_id", "created_by", "updated_by",
    "created_at", "updated_at", "closest_task_at", "custom_fields_values", "account_id", "is_deleted",
    "_links", "_embedded",
}


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return Dataset(SimulatorConfig(leads=5000, seed=1))


@pytest.fixture(scope="module")
def leads(ds: Dataset) -> list[dict]:
    return list(ds.iter_leads(with_=("contacts", "catalog_elements")))


def cf(lead: dict, field_id: int):
    for item in lead["custom_fields_values"] or ():
        if item["field_id"] == field_id:
            return item
    return None


def test_same_seed_same_json_and_different_seed_differs():
    a = Dataset(SimulatorConfig(leads=400, seed=7))
    b = Dataset(SimulatorConfig(leads=400, seed=7))
    c = Dataset(SimulatorConfig(leads=400, seed=8))
    dump = lambda d: json.dumps(list(d.iter_leads()), sort_keys=True)  # noqa: E731
    assert dump(a) == dump(b)
    assert dump(a) != dump(c)
    ids = [CONTACT_ID_BASE + j for j in range(400)]
    assert [a.contact(x) for x in ids] == [b.contact(x) for x in ids]
    assert [a.contact(x) for x in ids] != [c.contact(x) for x in ids]
    assert a.field(VEHICLE_FIELD_ID) == b.field(VEHICLE_FIELD_ID)


def test_lead_is_pure_function_of_seed_and_index_whatever_the_access_order():
    a = Dataset(SimulatorConfig(leads=3000, seed=3))
    b = Dataset(SimulatorConfig(leads=3000, seed=3))
    late = LEAD_ID_BASE + 2999
    first = a.lead(late)  # cold: nothing generated before
    list(b.iter_leads())  # warm: every block generated, in order
    assert first == b.lead(late)
    assert a.lead(LEAD_ID_BASE + 17) == b.lead(LEAD_ID_BASE + 17)


def test_lead_shape_matches_the_real_api(leads: list[dict]):
    for lead in leads[:300]:
        assert set(lead) == LEAD_KEYS
        assert isinstance(lead["price"], int)
        assert isinstance(lead["created_at"], int) and isinstance(lead["updated_at"], int)
        assert lead["is_deleted"] is False
        assert lead["_links"]["self"]["href"].endswith(f"/api/v4/leads/{lead['id']}")
        assert {"tags", "companies", "contacts", "catalog_elements"} <= set(lead["_embedded"])
        for c in lead["_embedded"]["contacts"]:
            assert set(c) == {"id", "is_main", "_links"}
    assert [x["id"] for x in leads] == list(range(LEAD_ID_BASE, LEAD_ID_BASE + 5000))
    assert any(lead["_embedded"]["catalog_elements"] for lead in leads)


def test_created_at_strictly_increasing_and_eighty_percent_in_the_year(ds: Dataset, leads: list[dict]):
    created = [x["created_at"] for x in leads]
    assert all(b > a for a, b in zip(created, created[1:], strict=False))
    assert created[0] >= ds.spread_start and created[-1] < ds.spread_end
    in_window = sum(ds.window_start <= c < ds.window_end for c in created)
    assert 0.75 <= in_window / len(created) <= 0.85
    # edge leads sit exactly on the window's boundaries (half-open window tests need them)
    assert ds.window_start in created and ds.window_end - 1 in created and ds.window_end in created
    for lead in leads:
        assert lead["updated_at"] >= lead["created_at"]
        if lead["status_id"] in (STATUS_WON, STATUS_LOST):
            assert lead["closed_at"] is not None
            assert lead["created_at"] <= lead["closed_at"] <= lead["updated_at"]
        else:
            assert lead["closed_at"] is None


def test_status_mix_and_pipelines_are_consistent(ds: Dataset, leads: list[dict]):
    share = Counter((x["pipeline_id"], x["status_id"]) for x in leads)
    n = len(leads)
    expected = {
        (PIPELINE_RENTAL, STATUS_LOST): 0.15,
        (PIPELINE_RENTAL, STATUS_BOT_ANSWERING): 0.10,
        (PIPELINE_RENTAL, STATUS_FOLLOW_UP): 0.10,
        (PIPELINE_RENTAL, STATUS_QUOTE_SENT): 0.15,
        (PIPELINE_RENTAL, STATUS_CONFIRMED): 0.20,
        (PIPELINE_RENTAL, STATUS_CAR_DELIVERED): 0.10,
        (PIPELINE_RENTAL, STATUS_WON): 0.15,
        (PIPELINE_CORPORATE, STATUS_CORPORATE_NEW): 0.04,
    }
    for key, target in expected.items():
        assert abs(share[key] / n - target) < 0.025, (key, share[key] / n)
    assert share[(PIPELINE_CORPORATE, STATUS_LOST)] > 0  # 143 exists in both pipelines
    valid = {(p["id"], s["id"]) for p in ds.pipelines() for s in p["_embedded"]["statuses"]}
    assert set(share) <= valid


def test_contacts_distribution(ds: Dataset, leads: list[dict]):
    n = len(leads)
    mains = [[c["id"] for c in x["_embedded"]["contacts"] if c["is_main"]] for x in leads]
    assert all(len(m) <= 1 for m in mains)
    distinct = {m[0] for m in mains if m}
    assert 0.63 <= len(distinct) / n <= 0.77
    no_contacts = sum(not x["_embedded"]["contacts"] for x in leads)
    assert 0.01 <= no_contacts / n <= 0.06
    dangling = sum(1 for m in mains if m and ds.contact(m[0]) is None)
    assert 0.003 <= dangling / n <= 0.025
    second = sum(any(not c["is_main"] for c in x["_embedded"]["contacts"]) for x in leads)
    assert 0.05 <= second / n <= 0.15
    for x in leads:
        for c in x["_embedded"]["contacts"]:
            if not c["is_main"]:
                assert ds.contact(c["id"]) is not None


def test_contact_shape_phones_emails_and_names(ds: Dataset, leads: list[dict]):
    ids = sorted({c["id"] for x in leads for c in x["_embedded"]["contacts"]})
    contacts = [c for c in (ds.contact(i) for i in ids) if c is not None]
    assert len(contacts) > 2500
    phones_per_contact = Counter()
    with_email = 0
    for c in contacts:
        assert set(c) >= CONTACT_KEYS
        for item in c["custom_fields_values"] or ():
            assert item["field_type"] == "multitext"
            assert item["field_code"] in ("PHONE", "EMAIL")
            for v in item["values"]:
                assert isinstance(v["value"], str) and isinstance(v["enum_id"], int)
                assert v["enum_code"] in ("WORK", "MOB", "OTHER")
            if item["field_code"] == "EMAIL":
                with_email += 1
                assert "@" in item["values"][0]["value"]
        phones = [i for i in c["custom_fields_values"] or () if i["field_code"] == "PHONE"]
        phones_per_contact[len(phones[0]["values"]) if phones else 0] += 1
    assert phones_per_contact[0] > 0 and phones_per_contact[1] > 0 and phones_per_contact[2] > 0
    assert 0 < with_email < len(contacts)
    assert any(not c["name"].isascii() for c in contacts)
    assert ds.contact(CONTACT_ID_BASE - 1) is None
    assert ds.contact(CONTACT_ID_BASE + 10**7) is None


def test_custom_fields_distribution_and_encoding(ds: Dataset, leads: list[dict]):
    n = len(leads)
    null = sum(x["custom_fields_values"] is None for x in leads)
    assert 0.015 <= null / n <= 0.06
    vehicle_enums = {e["id"] for e in ds.field(VEHICLE_FIELD_ID)["enums"]}
    source_enums = {e["id"]: e["value"] for e in ds.field(SOURCE_FIELD_ID)["enums"]}
    vehicles = [cf(x, VEHICLE_FIELD_ID) for x in leads]
    assert 0.05 <= sum(v is None for v in vehicles) / n <= 0.12
    unknown = 0
    for v in vehicles:
        if v is None:
            continue
        value = v["values"][0]
        assert v["field_type"] == "select" and isinstance(value["enum_id"], int) and value["enum_code"] is None
        assert " · " in value["value"]
        unknown += value["enum_id"] not in vehicle_enums
    assert 0.005 <= unknown / n <= 0.04
    sources = [cf(x, SOURCE_FIELD_ID) for x in leads]
    assert 0.08 <= sum(s is None for s in sources) / n <= 0.17
    for s in sources:
        if s is not None:
            assert source_enums[s["values"][0]["enum_id"]] == s["values"][0]["value"]
    both = only_d = only_c = neither = 0
    for x in leads:
        if x["custom_fields_values"] is None:
            continue
        d, c = cf(x, DELIVERY_FIELD_ID), cf(x, COLLECT_FIELD_ID)
        if d and c:
            both += 1
            dv, cv = d["values"][0]["value"], c["values"][0]["value"]
            assert isinstance(dv, int) and isinstance(cv, int)
            assert x["created_at"] < dv <= x["created_at"] + 61 * 86400
            assert dv + 86400 - 3600 <= cv <= dv + 14 * 86400 + 3600
        elif d:
            only_d += 1
        elif c:
            only_c += 1
        else:
            neither += 1
    m = n - null
    assert abs(both / m - 0.80) < 0.03 and abs(only_d / m - 0.07) < 0.02
    assert abs(only_c / m - 0.05) < 0.02 and abs(neither / m - 0.08) < 0.02
    numeric = [i for x in leads for i in x["custom_fields_values"] or () if i["field_type"] == "numeric"]
    assert numeric and all(isinstance(i["values"][0]["value"], str) for i in numeric)


def test_field_definitions_and_pipelines(ds: Dataset):
    vehicle = ds.field(VEHICLE_FIELD_ID)
    assert vehicle["type"] == "select" and len(vehicle["enums"]) == 30
    assert [e["id"] for e in vehicle["enums"]] == list(range(1000001, 1000031))
    assert len({e["value"] for e in vehicle["enums"]}) == 30
    source = ds.field(SOURCE_FIELD_ID)
    assert [e["value"] for e in source["enums"]] == [
        "Instagram", "Website", "Referral", "Google Ads", "Walk-in", "WhatsApp"]
    assert source["enums"][0]["id"] == 2000001
    assert ds.field(DELIVERY_FIELD_ID)["name"] == "Date/Time Delivery"
    assert ds.field(COLLECT_FIELD_ID)["type"] == "date_time"
    assert ds.field(999) is None
    pipes = {p["id"]: p for p in ds.pipelines()}
    assert set(pipes) == {PIPELINE_RENTAL, PIPELINE_CORPORATE}
    for p in pipes.values():
        ids = {s["id"] for s in p["_embedded"]["statuses"]}
        assert {142, 143} <= ids
        incoming = [s for s in p["_embedded"]["statuses"] if s["type"] == 1]
        assert len(incoming) == 1
    rental = {s["id"]: s["name"] for s in pipes[PIPELINE_RENTAL]["_embedded"]["statuses"]}
    assert rental[STATUS_BOT_ANSWERING] == "Request bot answering" and rental[143] == "Closed - lost"


def test_queries_match_brute_force(ds: Dataset, leads: list[dict]):
    def ids_of(q: LeadQuery) -> list[int]:
        return ds.find_lead_ids(q, 0, 10**9)

    window = [x for x in leads if ds.window_start <= x["created_at"] <= ds.window_end - 1]
    q = LeadQuery(created_from=ds.window_start, created_to=ds.window_end - 1)
    assert ids_of(q) == [x["id"] for x in window]
    assert ds.count_leads(q) == len(window)
    pairs = ((PIPELINE_RENTAL, STATUS_WON), (PIPELINE_CORPORATE, STATUS_LOST))
    q = LeadQuery(created_from=ds.window_start, created_to=ds.window_end - 1, statuses=pairs)
    assert ids_of(q) == [x["id"] for x in window if (x["pipeline_id"], x["status_id"]) in pairs]
    q = LeadQuery(order_field="updated_at", order_desc=True)
    expected = sorted(leads, key=lambda x: (x["updated_at"], x["id"]), reverse=True)
    assert ids_of(q) == [x["id"] for x in expected]
    mid = leads[2500]["updated_at"]
    q = LeadQuery(updated_from=mid, updated_to=mid + 30 * 86400)
    assert ids_of(q) == [x["id"] for x in leads if mid <= x["updated_at"] <= mid + 30 * 86400]
    q = LeadQuery(ids=(LEAD_ID_BASE + 5, LEAD_ID_BASE + 3, 1), order_field="created_at", order_desc=True)
    assert ids_of(q) == [LEAD_ID_BASE + 5, LEAD_ID_BASE + 3]
    assert ds.find_lead_ids(LeadQuery(order_desc=True), 10, 3) == [
        LEAD_ID_BASE + 4989, LEAD_ID_BASE + 4988, LEAD_ID_BASE + 4987]


def test_mutations():
    ds = Dataset(SimulatorConfig(leads=300, seed=2))
    first = LEAD_ID_BASE
    assert ds.delete_leads([first, first + 1, 999]) == 2
    assert ds.lead(first) is None
    assert [x["id"] for x in ds.iter_leads()][:2] == [first + 2, first + 3]
    assert ds.count_leads() == 298

    target = first + 10
    before = ds.lead(target)
    after = ds.update_lead(target, status_id=STATUS_CORPORATE_NEW, price=1234, name="Geändert",
                           custom_fields={VEHICLE_FIELD_ID: 1000003, DELIVERY_FIELD_ID: None})
    assert after == ds.lead(target)
    assert after["pipeline_id"] == PIPELINE_CORPORATE and after["price"] == 1234
    assert after["updated_at"] > before["updated_at"]
    assert cf(after, VEHICLE_FIELD_ID)["values"][0]["enum_id"] == 1000003
    assert cf(after, DELIVERY_FIELD_ID) is None
    closed = ds.update_lead(target, status_id=STATUS_LOST)
    assert closed["pipeline_id"] == PIPELINE_CORPORATE and closed["closed_at"] == closed["updated_at"]
    q = LeadQuery(statuses=((PIPELINE_CORPORATE, STATUS_LOST),))
    assert target in ds.find_lead_ids(q, 0, 1000)
    with pytest.raises(ValueError):
        ds.update_lead(target, created_at=1)
    with pytest.raises(KeyError):
        ds.update_lead(first, price=1)  # deleted

    new_id = ds.add_lead(ds.window_start + 5, status_id=STATUS_CONFIRMED, price=99)
    assert new_id == LEAD_ID_BASE + 300
    new = ds.lead(new_id)
    assert new["created_at"] == ds.window_start + 5 and new["status_id"] == STATUS_CONFIRMED
    assert [x["id"] for x in ds.iter_leads()][-1] == new_id
    ordered = ds.find_lead_ids(LeadQuery(order_field="created_at"), 0, 1000)
    created = [ds.lead(i)["created_at"] for i in ordered]
    assert created == sorted(created) and new_id in ordered
    ds.delete_leads([new_id])
    assert ds.add_lead(ds.window_start) == new_id + 1  # ids are never reused

    contact_id = next(c["id"] for x in ds.iter_leads() for c in x["_embedded"]["contacts"]
                      if ds.contact(c["id"]) is not None)
    assert ds.delete_contacts([contact_id]) == 1
    assert ds.contact(contact_id) is None
    assert ds.find_contact_ids([contact_id], 0, 10) == []

    ds.revoke_token()
    assert ds.token is None
    ds.set_token("fresh")
    assert ds.token == "fresh"
    with pytest.raises(ValueError):
        ds.apply_mutation({"op": "explode"})


def test_million_leads_start_instantly_and_stay_lazy():
    t0 = time.perf_counter()
    ds = Dataset(SimulatorConfig(leads=1_000_000))
    last = ds.lead(LEAD_ID_BASE + 999_999)
    q = LeadQuery(created_from=ds.window_start, created_to=ds.window_end - 1)
    page = ds.find_lead_ids(q, 999 * 250, 250)
    assert time.perf_counter() - t0 < 1.0
    assert last["created_at"] < ds.spread_end
    assert ds.count_leads(q) == 800_000 and len(page) == 250
    assert len(ds._blocks) < 10  # only touched blocks were generated
