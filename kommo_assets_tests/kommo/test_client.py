"""Tests of the Kommo client against the Kommo simulator over real HTTP (nothing is mocked).

Tests about data and failures run the simulator without its rate limiter and the client at a high
pace, to stay fast; the pacing tests run both at Kommo's real limits.
"""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest

from kommo_assets.dev.simulator import KommoSimulator, LeadQuery, SimulatorConfig
from kommo_assets.kommo import (
    VEHICLE_FIELD_ID,
    KommoAuthError,
    KommoClient,
    KommoError,
    KommoResponseError,
    KommoUnavailableError,
    main_contact_id,
    redact,
)
from kommo_assets.kommo.client import (
    DEFAULT_MAX_RPS,
    LEAD_CHAINS,
    ContactBatch,
    FieldOptions,
    LeadPage,
    _ceil_epoch,
    _ContactBatching,
    _Plan,
    _retry_after,
)

TOKEN = "simulator-token"
LEADS = "/api/v4/leads"
YEAR_FROM = datetime(2025, 1, 1, tzinfo=UTC)
YEAR_TO = datetime(2026, 1, 1, tzinfo=UTC)
WITH = ("contacts", "catalog_elements")

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sim() -> Iterator[KommoSimulator]:
    """2000 leads, ~1600 of them created in 2025; no rate limiter (pacing has its own tests)."""
    with KommoSimulator(SimulatorConfig(leads=2000, seed=1, token=TOKEN, rate_limit_rps=None)) as simulator:
        yield simulator


def fast_client(simulator: KommoSimulator, **overrides: object) -> KommoClient:
    options: dict = {"max_rps": 200.0, "backoff_base": 0.01, "backoff_max": 0.05, "max_retries": 4}
    options.update(overrides)
    return KommoClient(simulator.base_url, TOKEN, **options)


def truth(simulator: KommoSimulator, start: datetime = YEAR_FROM, end: datetime = YEAR_TO) -> dict[int, dict]:
    """The simulator's own view of what the export must return: created in [start, end), not lost."""
    lo, hi = start.timestamp(), end.timestamp()
    return {
        lead["id"]: lead
        for lead in simulator.dataset.iter_leads(WITH)
        if lo <= lead["created_at"] < hi and lead["status_id"] != 143
    }


def collect(client: KommoClient, start: datetime = YEAR_FROM, end: datetime = YEAR_TO) -> list[dict]:
    return [lead for page in client.iter_lead_pages(start, end) for lead in page.leads]


def assert_exactly(leads: list[dict], expected: dict[int, dict]) -> None:
    ids = [lead["id"] for lead in leads]
    assert len(ids) == len(set(ids)), "a lead was yielded twice"
    assert set(ids) == set(expected)
    for lead in leads:
        assert lead == expected[lead["id"]]


def kommo_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("kommo-leads", "kommo-contacts"))]


def window_query() -> LeadQuery:
    return LeadQuery(created_from=int(YEAR_FROM.timestamp()), created_to=int(YEAR_TO.timestamp()) - 1)


def serve_page(simulator: KommoSimulator, path: str, page: int, body: object) -> None:
    """Makes the simulator answer ``page`` of ``path`` with ``body`` from now on."""
    simulator.add_fault(
        kind="status",
        path=path,
        query={"page": str(page)},
        status=200,
        times=-1,
        body=json.dumps(body),
        content_type="application/hal+json",
    )


# --- leads ---------------------------------------------------------------------------------------


def test_leads_of_the_window_are_yielded_exactly_once_and_equal_the_ground_truth(sim: KommoSimulator) -> None:
    expected = truth(sim)
    with fast_client(sim) as client:
        pages = list(client.iter_lead_pages(YEAR_FROM, YEAR_TO))
        stats = client.stats
    leads = [lead for page in pages for lead in page.leads]
    assert_exactly(leads, expected)
    in_window = sim.dataset.count_leads(window_query())
    assert sum(page.received for page in pages) == in_window
    assert sum(page.skipped.get("excluded_status", 0) for page in pages) == in_window - len(expected)
    assert all(0 < len(page.leads) <= page.received <= 250 for page in pages)
    data_pages = -(-in_window // 250)
    assert len({page.page for page in pages}) == len(pages)
    # Each of the LEAD_CHAINS slices ends with its own short page, and each page after a slice's first
    # repeats the lead it ended with (the cursor is inclusive): a few requests more than the data needs.
    assert data_pages <= stats.requests <= data_pages + 2 * LEAD_CHAINS
    assert stats.by_status == {200: stats.requests} and stats.retries == 0


def test_the_query_asks_for_the_window_with_an_inclusive_upper_bound(sim: KommoSimulator) -> None:
    # A lead created in the last second of 2024 and one in the first second of 2026 sit on the edges.
    before = sim.dataset.add_lead(int(YEAR_FROM.timestamp()) - 1, status_id=79790634)
    first = sim.dataset.add_lead(int(YEAR_FROM.timestamp()), status_id=79790634)
    last = sim.dataset.add_lead(int(YEAR_TO.timestamp()) - 1, status_id=79790634)
    after = sim.dataset.add_lead(int(YEAR_TO.timestamp()), status_id=79790634)
    with fast_client(sim) as client:
        pages = list(client.iter_lead_pages(YEAR_FROM, YEAR_TO))
    ids = {lead["id"] for page in pages for lead in page.leads}
    assert {first, last} <= ids
    assert not {before, after} & ids
    # The server did the window filtering here: nothing had to be dropped for being outside.
    assert sum(page.skipped.get("outside_window", 0) for page in pages) == 0


def test_a_server_that_ignores_the_created_at_filter_or_order_is_refused(sim: KommoSimulator) -> None:
    """Kommo silently ignores filters it does not understand. Keyset paging relies on the created_at range
    and order being applied, so a server serving every lead unfiltered, in id order, must stop the export
    with a clear error rather than let it page on (the client-side filters behind it are proved by the
    bad-input corpus, end to end)."""
    everything = list(sim.dataset.iter_leads(WITH))[:250]
    everything[0], everything[1] = everything[1], everything[0]  # not in created_at order either
    serve_page(sim, LEADS, 1, {"_page": 1, "_links": {"next": {"href": f"{LEADS}?page=2"}},
                               "_embedded": {"leads": everything}})
    with fast_client(sim) as client, pytest.raises(KommoResponseError) as caught:
        collect(client)
    assert "the export cannot page safely" in str(caught.value)
    assert kommo_threads() == []


def test_a_whole_page_of_leads_created_in_one_second_is_read_by_offset_within_that_second() -> None:
    with KommoSimulator(SimulatorConfig(leads=300, seed=3, rate_limit_rps=None)) as simulator:
        second = int(datetime(2025, 6, 1, tzinfo=UTC).timestamp())
        crowd = [simulator.dataset.add_lead(second, status_id=79790634) for _ in range(600)]
        expected = truth(simulator)
        assert set(crowd) <= set(expected)
        with fast_client(simulator, max_in_flight=1) as client:
            pages = list(client.iter_lead_pages(YEAR_FROM, YEAR_TO))
        assert_exactly([lead for page in pages for lead in page.leads], expected)


CROWDED = int(datetime(2025, 6, 1, tzinfo=UTC).timestamp())  # a second holding more than a page of leads


def test_a_lead_deleted_while_a_crowded_second_is_read_does_not_hide_its_neighbour() -> None:
    # Inside the crowded second paging is by offset: the deletion moves every later lead of it up a
    # place, and the first pass misses the one crossing the page boundary; the second pass differs from
    # the first, so a third is read, and it agrees with the second.
    with KommoSimulator(SimulatorConfig(leads=300, seed=3, rate_limit_rps=None)) as simulator:
        crowd = [simulator.dataset.add_lead(CROWDED, status_id=79790634) for _ in range(600)]
        simulator.add_fault(kind="mutate", path=LEADS, query={"order[id]": "asc", "page": "2"}, times=1,
                            op="delete_leads", ids=[crowd[10]])
        with fast_client(simulator, max_in_flight=1) as client:
            yielded = {lead["id"] for lead in collect(client)}
        assert [rule["fired"] for rule in simulator.faults()] == [1]
        assert set(truth(simulator)) <= yielded  # everything that still exists, crowd[250] included


def test_a_spurious_204_right_after_a_crowded_second_is_asked_again() -> None:
    with KommoSimulator(SimulatorConfig(leads=300, seed=3, rate_limit_rps=None)) as simulator:
        for _ in range(300):
            simulator.dataset.add_lead(CROWDED, status_id=79790634)
        simulator.add_fault(kind="empty", path=LEADS, query={"filter[created_at][from]": str(CROWDED + 1)})
        with fast_client(simulator, max_in_flight=1) as client:
            assert_exactly(collect(client), truth(simulator))
        assert [rule["fired"] for rule in simulator.faults()] == [1]


def test_a_crowded_second_ordered_differently_by_created_at_and_by_id_is_read_exactly() -> None:
    # Kommo does not say how it orders leads of one second: here the keyset answer lists the newest ids
    # of the second first, the offset pages the oldest first. Passes are compared with each other only.
    with KommoSimulator(SimulatorConfig(leads=300, seed=3, rate_limit_rps=None)) as simulator:
        crowd = [simulator.dataset.add_lead(CROWDED, status_id=79790634) for _ in range(500)]
        body = {"_page": 1, "_links": {"next": {"href": f"{LEADS}?page=2"}},
                "_embedded": {"leads": simulator.dataset.leads(list(reversed(crowd))[:250], WITH)}}
        simulator.add_fault(kind="status", path=LEADS, status=200, times=-1, body=json.dumps(body),
                            content_type="application/hal+json",
                            query={"order[created_at]": "asc", "filter[created_at][from]": str(CROWDED)})
        start = datetime.fromtimestamp(CROWDED, UTC)
        with fast_client(simulator, max_in_flight=1) as client:
            leads = collect(client, start, start + timedelta(days=1))
        expected = truth(simulator, start, start + timedelta(days=1))
        assert set(crowd) <= set(expected)
        assert sorted(lead["id"] for lead in leads) == sorted(expected)


def test_a_server_ignoring_page_inside_a_crowded_second_is_refused() -> None:
    with KommoSimulator(SimulatorConfig(leads=300, seed=3, rate_limit_rps=None)) as simulator:
        second = int(datetime(2025, 6, 1, tzinfo=UTC).timestamp())
        crowd = [simulator.dataset.add_lead(second, status_id=79790634) for _ in range(600)]
        first_page = {"_page": 1, "_links": {"next": {"href": f"{LEADS}?page=2"}},
                      "_embedded": {"leads": simulator.dataset.leads(crowd[250:500], WITH)}}
        simulator.add_fault(kind="status", path=LEADS, query={"order[id]": "asc"}, status=200, times=-1,
                            body=json.dumps(first_page), content_type="application/hal+json")
        with fast_client(simulator, max_in_flight=1) as client, pytest.raises(KommoResponseError) as caught:
            collect(client)
    assert "it ignores `page`" in str(caught.value)


def test_leads_listed_again_at_the_cursor_are_passed_on_once() -> None:
    # One chain (max_in_flight=1) over 1000 leads: every page after the first starts with the lead the
    # page before ended with (the cursor is inclusive); that repeat is not passed on again.
    with KommoSimulator(SimulatorConfig(leads=1000, seed=3, rate_limit_rps=None)) as simulator:
        start, end = datetime(2020, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC)
        with fast_client(simulator, max_in_flight=1) as client:
            pages = list(client.iter_lead_pages(start, end))
            stats = client.stats
        assert_exactly([lead for page in pages for lead in page.leads], truth(simulator, start, end))
        assert [page.received for page in pages] == [250, 249, 249, 249, 3]
        assert stats.requests == 5 and stats.by_status == {200: 5}


@pytest.mark.parametrize("after", [0, 1, 4], ids=["a-slice-start", "second-request", "fifth-request"])
def test_a_spurious_204_does_not_cut_the_export_short(sim: KommoSimulator, after: int) -> None:
    sim.add_fault(kind="empty", path=LEADS, after=after, times=1)
    with fast_client(sim, max_in_flight=1) as client:
        assert_exactly(collect(client), truth(sim))
        assert client.stats.by_status[204] == 1
    assert [rule["fired"] for rule in sim.faults()] == [1]


EMPTY_LIST = {"kind": "status", "status": 200, "content_type": "application/hal+json",
              "body": json.dumps({"_page": 1, "_links": {}, "_embedded": {"leads": []}})}


@pytest.mark.parametrize("empty", [{"kind": "empty"}, EMPTY_LIST], ids=["204", "empty-list"])
def test_an_empty_answer_after_a_full_page_fails_the_export_instead_of_leaving_a_hole(
    sim: KommoSimulator, empty: dict
) -> None:
    # The fifth request continues a slice whose page was full: it cannot be empty, so two empty answers
    # there (a 204, or a 200 listing nothing) mean the listing is inconsistent.
    sim.add_fault(path=LEADS, after=4, times=-1, **empty)
    with fast_client(sim, max_in_flight=1) as client, pytest.raises(KommoResponseError) as caught:
        collect(client)
    assert "the listing is inconsistent" in str(caught.value) and "run the refresh again" in str(caught.value)
    assert kommo_threads() == []


def test_a_slice_with_leads_left_is_split_for_a_chain_that_finished() -> None:
    # Nearly every lead sits in the last third of the window: the first two slices end at once and the
    # third is cut in two, then again, so the chains stay busy; nothing is lost or passed on twice.
    with KommoSimulator(SimulatorConfig(leads=200, seed=3, rate_limit_rps=None)) as simulator:
        base = int(datetime(2025, 10, 1, tzinfo=UTC).timestamp())
        for k in range(3000):
            simulator.dataset.add_lead(base + k * 600, status_id=79790634)
        expected = truth(simulator)
        with fast_client(simulator, max_in_flight=3) as client:
            paging = client._lead_paging(YEAR_FROM, YEAR_TO, {143})
            pages = list(client._fan_out(_Plan(leads=paging), "kommo-leads"))
            stats = client.stats
        assert_exactly([lead for page in pages for lead in page.leads], expected)
        assert paging.splits >= 2
        assert stats.requests <= -(-len(expected) // 250) * 1.05 + 2 * (LEAD_CHAINS + paging.splits)


def test_the_contact_reserve_is_spent_while_the_last_slice_waits_for_its_answer(sim: KommoSimulator) -> None:
    # The end of an export: two slices are read, the last one has a request in flight, and two full
    # contact batches wait in reserve. Both go out now rather than after that answer: a slot left
    # idle at the end is lost.
    with fast_client(sim) as client:
        paging = client._lead_paging(YEAR_FROM, YEAR_TO, {143})
        first, second, last = paging.slices
        first.done = second.done = True
        last.busy = True
        contacts = _ContactBatching(client, 250)
        contacts.add(range(1, 2 * 250 + 1))
        plan = _Plan(leads=paging, contacts=contacts)
        tasks = [plan.next_task() for _ in range(3)]
    assert [task.kind if task else None for task in tasks] == ["contacts", "contacts", None]
    assert [len(task.arg) for task in tasks[:2]] == [250, 250]


def test_an_empty_window_yields_nothing(sim: KommoSimulator) -> None:
    with fast_client(sim) as client:
        assert (
            list(client.iter_lead_pages(datetime(2030, 1, 1, tzinfo=UTC), datetime(2031, 1, 1, tzinfo=UTC)))
            == []
        )
    with pytest.raises(ValueError):
        KommoClient(sim.base_url, TOKEN).iter_lead_pages(YEAR_TO, YEAR_FROM).__next__()


def test_stopping_early_cancels_pending_pages_and_joins_the_threads(sim: KommoSimulator) -> None:
    sim.set_latency(100)
    with fast_client(sim, max_rps=20.0) as client:
        pages = client.iter_lead_pages(YEAR_FROM, YEAR_TO)
        first = next(pages)
        pages.close()
        assert first.leads
        assert kommo_threads() == []
        sent = sim.stats()["requests"]
        time.sleep(0.3)
        assert sim.stats()["requests"] == sent
        assert sent <= 1 + 2 * client.max_in_flight


def test_a_full_page_without_a_next_link_ends_the_range(sim: KommoSimulator) -> None:
    items = sim.dataset.leads(sim.dataset.find_lead_ids(window_query(), 0, 250), WITH)
    assert len(items) == 250
    serve_page(
        sim,
        LEADS,
        1,
        {"_page": 1, "_links": {"self": {"href": f"{sim.base_url}{LEADS}"}}, "_embedded": {"leads": items}},
    )
    with fast_client(sim, max_in_flight=1) as client:
        pages = list(client.iter_lead_pages(YEAR_FROM, YEAR_TO))
        assert client.stats.requests == 1
    assert [page.page for page in pages] == [1] and pages[0].received == 250


def test_a_json_array_instead_of_an_object_is_a_response_error(sim: KommoSimulator) -> None:
    serve_page(sim, LEADS, 1, [])
    with fast_client(sim, max_in_flight=1) as client, pytest.raises(KommoResponseError) as caught:
        collect(client)
    assert "JSON list instead of an object" in str(caught.value)
    assert client.stats.retries == 0


def test_a_redirect_is_not_followed(sim: KommoSimulator) -> None:
    sim.add_fault(
        kind="status",
        path="/api/v4/leads/pipelines",
        path_exact=True,
        status=301,
        times=-1,
        headers={"Location": "https://www.kommo.com/"},
    )
    with fast_client(sim) as client, pytest.raises(KommoResponseError) as caught:
        client.get_pipelines()
    assert "HTTP 301" in str(caught.value) and "KOMMO_BASE_URL" in str(caught.value)
    assert client.stats.requests == 1


# --- contacts, fields, pipelines -----------------------------------------------------------------


def test_contact_batches_return_exactly_the_existing_contacts(sim: KommoSimulator) -> None:
    main_ids = [cid for lead in truth(sim).values() if (cid := main_contact_id(lead)) is not None]
    deleted = main_ids[10:15]
    sim.dataset.delete_contacts(deleted)
    distinct = list(dict.fromkeys(main_ids)) + [1, 999_999_999]  # and ids that never existed
    # A caller streams distinct ids (SELECT DISTINCT); repeats next to each other, or within one batch,
    # are still asked once.
    asked = [cid for cid in distinct for _ in (0, 1)]
    with fast_client(sim) as client:
        batches = list(client.iter_contact_batches(iter(asked), batch_size=100))
    assert len(batches) == -(-len(distinct) // 100)
    contacts = [contact for batch in batches for contact in batch]
    ids = [contact["id"] for contact in contacts]
    expected = {cid for cid in distinct if sim.dataset.contact(cid) is not None}
    assert len(ids) == len(set(ids))
    assert set(ids) == expected
    assert not set(deleted) & set(ids) and len(expected) < len(distinct)
    for contact in contacts[:200]:
        assert contact == sim.dataset.contact(contact["id"])


def test_contact_ids_are_read_lazily_and_not_remembered_across_batches(sim: KommoSimulator) -> None:
    """Memory stays flat: the id iterable is consumed as batches go out, and no set of every id asked is
    kept (an id repeated in a later batch is asked again; callers pass distinct ids)."""
    existing = sim.dataset.find_contact_ids(None, 0, 30)
    pulled: list[int] = []

    def ids():
        for cid in existing[:20] + existing[:5]:
            pulled.append(cid)
            yield cid

    with fast_client(sim, max_in_flight=1) as client:
        batches = client.iter_contact_batches(ids(), batch_size=10)
        first = next(batches)
        assert len(first) == 10 and len(pulled) <= 21  # one batch (and the id that ended it) read so far
        rest = list(batches)
    assert sorted(len(batch) for batch in rest) == [5, 10]
    assert sorted(c["id"] for batch in [first, *rest] for c in batch) == sorted(existing[:20] + existing[:5])


def test_the_snapshot_stream_interleaves_contacts_with_lead_pages(sim: KommoSimulator) -> None:
    """One stream, one pool: field options, lead pages and contact batches of the ids the caller hands
    back; contacts start before the last lead page, every id handed back is asked once, and the last
    partial batch waits until every lead page has been processed."""
    expected_leads = truth(sim)
    main_ids = {cid for lead in expected_leads.values() if (cid := main_contact_id(lead)) is not None}
    seen: set[int] = set()
    order: list[str] = []
    leads: list[dict] = []
    contacts: list[dict] = []
    with fast_client(sim) as client:
        stream = client.stream_snapshot(YEAR_FROM, YEAR_TO, field_ids=(VEHICLE_FIELD_ID, 823206),
                                        contact_batch_size=50)
        with stream:
            for item in stream:
                if isinstance(item, FieldOptions):
                    order.append("field")
                    assert item.options
                elif isinstance(item, LeadPage):
                    order.append("leads")
                    leads.extend(item.leads)
                    new = {cid for lead in item.leads if (cid := main_contact_id(lead)) is not None} - seen
                    seen.update(new)
                    stream.add_contact_ids(sorted(new))
                else:
                    assert isinstance(item, ContactBatch)
                    order.append("contacts")
                    assert item.asked <= 50
                    contacts.extend(item.contacts)
            asked = stream.contacts_requested
        stats = client.stats
    assert_exactly(leads, expected_leads)
    assert asked == len(main_ids)
    ids = [contact["id"] for contact in contacts]
    assert len(ids) == len(set(ids)) and set(ids) == {cid for cid in main_ids if sim.dataset.contact(cid)}
    assert order.count("field") == 2
    assert order.index("contacts") < len(order) - 1 - order[::-1].index("leads")  # before the last lead page
    data_pages = -(-sim.dataset.count_leads(window_query()) // 250)
    batches = -(-len(main_ids) // 50)
    # every batch but the last is full: the fewest requests, plus a short last page per slice and the
    # lead repeated at each cursor
    assert order.count("contacts") == batches
    assert data_pages + batches + 2 <= stats.requests <= data_pages + batches + 2 + 2 * LEAD_CHAINS


def test_closing_the_snapshot_stream_early_joins_its_threads(sim: KommoSimulator) -> None:
    sim.set_latency(50)
    with fast_client(sim, max_rps=50.0) as client:
        with client.stream_snapshot(YEAR_FROM, YEAR_TO, field_ids=(VEHICLE_FIELD_ID,)) as stream:
            next(iter(stream))
        assert [t for t in threading.enumerate() if t.name.startswith("kommo-snapshot")] == []


def test_contacts_of_no_ids_make_no_request(sim: KommoSimulator) -> None:
    with fast_client(sim) as client:
        assert list(client.iter_contact_batches([])) == []
        assert client.stats.requests == 0


def test_contacts_from_a_server_that_ignores_the_id_filter_are_refused(sim: KommoSimulator) -> None:
    everyone = [sim.dataset.contact(cid) for cid in sim.dataset.find_contact_ids(None, 0, 750)]
    for page in (1, 2, 3):
        chunk = everyone[(page - 1) * 250 : page * 250]
        serve_page(
            sim,
            "/api/v4/contacts",
            page,
            {
                "_page": page,
                "_links": {"self": {"href": "x"}, "next": {"href": "y"}},
                "_embedded": {"contacts": chunk},
            },
        )
    asked = [everyone[3]["id"], everyone[600]["id"], 999_999_999]
    with fast_client(sim) as client, pytest.raises(KommoResponseError) as caught:
        list(client.iter_contact_batches(asked))
    assert "ignore filter[id][]" in str(caught.value)
    # On a short batch the unasked contacts of an ignoring server are dropped, not passed on.
    sim.clear_faults()
    serve_page(
        sim, "/api/v4/contacts", 1, {"_page": 1, "_links": {}, "_embedded": {"contacts": everyone[:5]}}
    )
    with fast_client(sim) as client:
        assert list(client.iter_contact_batches([everyone[3]["id"], None, 0])) == [[everyone[3]]]


def test_field_enums_custom_fields_and_pipelines(sim: KommoSimulator) -> None:
    with fast_client(sim) as client:
        enums = client.field_enums(VEHICLE_FIELD_ID)
        assert enums == {item["id"]: item["value"] for item in sim.dataset.field(VEHICLE_FIELD_ID)["enums"]}
        assert len(enums) == 30
        assert client.get_custom_field(VEHICLE_FIELD_ID)["type"] == "select"
        assert client.get_custom_field(4242) is None
        assert client.field_enums(4242) == {}
        pipelines = client.get_pipelines()
        assert pipelines == sim.dataset.pipelines()
        assert {status["id"] for p in pipelines for status in p["_embedded"]["statuses"]} >= {142, 143}


# --- authentication ------------------------------------------------------------------------------


def assert_token_free(exc: BaseException) -> None:
    texts = [str(exc), repr(exc), *map(str, exc.args), "".join(traceback.format_exception(exc))]
    for text in texts:
        assert TOKEN not in text
    assert exc.__cause__ is None and exc.__context__ is None


def test_a_revoked_token_fails_fast_without_retries(sim: KommoSimulator) -> None:
    sim.dataset.revoke_token()
    with fast_client(sim) as client:
        started = time.monotonic()
        with pytest.raises(KommoAuthError) as caught:
            list(client.iter_lead_pages(YEAR_FROM, YEAR_TO))
        assert time.monotonic() - started < 2
        assert client.stats.retries == 0
    assert "HTTP 401" in str(caught.value) and "KOMMO_ACCESS_TOKEN" in str(caught.value)
    assert f"GET {LEADS}" in str(caught.value)
    assert caught.value.status == 401
    assert_token_free(caught.value)
    # Every slice's first request got its 401 at once; none was retried.
    assert sim.stats()["by_status"] == {"401": sim.stats()["requests"]}
    assert sim.stats()["requests"] <= 6


def test_a_banned_account_raises_an_auth_error() -> None:
    config = SimulatorConfig(leads=10, rate_limit_rps=1.0, ban_after_violations=1)
    with KommoSimulator(config) as simulator, fast_client(simulator, max_rps=50.0) as client:
        client.get_pipelines()
        with pytest.raises(KommoAuthError) as caught:
            client.get_pipelines()  # 429 (the violation that bans the account), then 403
    message = str(caught.value)
    assert "HTTP 403" in message and "support" in message and "do not retry" in message
    assert_token_free(caught.value)
    assert simulator.stats()["banned"] is True


def test_errors_survive_pickling_for_other_processes() -> None:
    error = KommoUnavailableError("Kommo kept failing", method="GET", path=LEADS, page=7, status=503)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.path, copy.page, copy.status) == ("Kommo kept failing", LEADS, 7, 503)
    assert isinstance(copy, KommoError)


def test_the_token_is_not_in_the_client_repr() -> None:
    client = KommoClient("https://acme.kommo.com", "secret-token-value")
    assert "secret-token-value" not in repr(client)
    assert redact("Bearer secret-token-value!", "secret-token-value") == "Bearer <redacted>!"


@pytest.mark.parametrize(
    "kwargs",
    [{"base_url": "acme.kommo.com"}, {"access_token": " "}, {"page_size": 251}, {"max_in_flight": 0}],
)
def test_bad_configuration_is_refused(kwargs: dict) -> None:
    options = {"base_url": "https://acme.kommo.com", "access_token": "t", **kwargs}
    with pytest.raises(ValueError):
        KommoClient(options.pop("base_url"), options.pop("access_token"), **options)


# --- failures and retries ------------------------------------------------------------------------


def test_a_burst_of_server_errors_is_retried_and_the_data_is_complete(sim: KommoSimulator) -> None:
    sim.add_fault(kind="status", path=LEADS, after=2, times=3, status=500)
    sim.add_fault(kind="status", path=LEADS, after=6, times=1, status=502)
    with fast_client(sim) as client:
        leads = collect(client)
        stats = client.stats
    assert_exactly(leads, truth(sim))
    assert stats.retries == 4 and stats.by_status[500] == 3 and stats.by_status[502] == 1


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "reset"},
        {"kind": "truncate", "mode": "full_length"},
        {"kind": "truncate", "mode": "honest"},
        {"kind": "status", "status": 200, "body": "<html>gateway hiccup</html>", "content_type": "text/html"},
    ],
    ids=["reset", "truncated-body", "truncated-json", "html-200"],
)
def test_broken_responses_are_retried(sim: KommoSimulator, fault: dict) -> None:
    sim.add_fault(path=LEADS, after=1, times=2, **fault)
    with fast_client(sim) as client:
        leads = collect(client)
        stats = client.stats
    assert_exactly(leads, truth(sim))
    assert stats.retries == 2 and stats.errors == 2


def test_a_slow_answer_beyond_the_timeout_is_retried(sim: KommoSimulator) -> None:
    sim.add_fault(kind="slow", path=LEADS, after=1, times=1, delay_s=1.5)
    with fast_client(sim, timeout=0.4) as client:
        leads = collect(client)
        assert client.stats.retries == 1
    assert_exactly(leads, truth(sim))


def test_persistent_failure_raises_unavailable_after_the_retries(sim: KommoSimulator) -> None:
    sim.add_fault(kind="status", path=LEADS, after=2, times=-1, status=503)
    with fast_client(sim, max_retries=2, max_in_flight=1) as client:
        with pytest.raises(KommoUnavailableError) as caught:
            collect(client)
    message = str(caught.value)
    assert message == (
        "Kommo kept failing (HTTP 503) on GET /api/v4/leads page 3 after 3 attempts; "
        "the run can be retried later."
    )
    assert caught.value.page == 3 and caught.value.status == 503
    assert_token_free(caught.value)
    assert kommo_threads() == []
    assert sim.faults()[0]["fired"] == 3


def test_persistent_timeouts_name_the_timeout(sim: KommoSimulator) -> None:
    sim.add_fault(kind="slow", path="/api/v4/leads/pipelines", path_exact=True, times=-1, delay_s=0.6)
    with (
        fast_client(sim, timeout=0.2, max_retries=1) as client,
        pytest.raises(KommoUnavailableError) as caught,
    ):
        client.get_pipelines()
    assert "no response within 0.2 s" in str(caught.value)
    assert "GET /api/v4/leads/pipelines after 2 attempts" in str(caught.value)


def test_an_unexpected_client_error_is_not_retried(sim: KommoSimulator) -> None:
    sim.add_fault(kind="status", path=LEADS, times=-1, status=400)
    with fast_client(sim, max_in_flight=1) as client, pytest.raises(KommoResponseError) as caught:
        collect(client)
    assert "Unexpected HTTP 400 on GET /api/v4/leads page 1" in str(caught.value)
    assert client.stats.retries == 0


def test_throttling_is_retried_after_cooling_down_and_honours_retry_after(
    sim: KommoSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    sim.add_fault(kind="status", path=LEADS, after=1, times=1, status=429)
    sim.add_fault(kind="status", path=LEADS, after=4, times=1, status=429, headers={"Retry-After": "1"})
    with fast_client(sim) as client:
        started = time.monotonic()
        leads = collect(client)
        elapsed = time.monotonic() - started
        stats = client.stats
    assert_exactly(leads, truth(sim))
    assert stats.throttled_429 == 2 and stats.retries == 2
    assert elapsed >= 0.95  # Retry-After: 1 held every thread back, not just the throttled one
    assert "pacing down to 180.00 requests/s" in caplog.text


def test_retries_are_logged_and_the_token_never_is(
    sim: KommoSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sim.add_fault(kind="status", path=LEADS, after=1, times=1, status=500)
    sim.add_fault(kind="reset", path=LEADS, after=3, times=1)
    with fast_client(sim) as client:
        collect(client)
        list(client.iter_contact_batches([30_000_001, 30_000_002]))
        sim.dataset.revoke_token()
        with pytest.raises(KommoError):
            client.get_pipelines()
    ours = [r for r in caplog.records if r.name == "kommo_assets.kommo"]
    assert any(r.levelno == logging.WARNING and "HTTP 500" in r.getMessage() for r in ours)
    assert any(
        r.levelno == logging.DEBUG and "GET /api/v4/leads page 1 -> 200" in r.getMessage() for r in ours
    )
    assert TOKEN not in caplog.text
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


# --- pacing against the simulator's real limiter -------------------------------------------------


@contextmanager
def simulator_process(*args: str) -> Iterator[str]:
    """The simulator in its own process, as Kommo is: the server's work then cannot delay the
    client's threads (or the other way round) through one shared GIL, which would blur arrival times
    by more than the 14.5 ms the 6.9-vs-7 margin leaves over 8 requests."""
    command = [sys.executable, "-m", "kommo_assets.dev.simulator", "--port", "0", "--token", TOKEN, *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline() if process.stdout else ""
        assert line.startswith("KOMMO_SIMULATOR_READY base_url="), line
        yield line.split("base_url=", 1)[1].strip()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def server_stats(base_url: str) -> dict:
    with urllib.request.urlopen(f"{base_url}/_simulator/stats", timeout=10) as response:
        return json.load(response)


WIDE_FROM, WIDE_TO = datetime(2020, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC)


def test_sixty_requests_at_the_default_pace_never_hit_the_limit() -> None:
    with simulator_process("--leads", "15000", "--seed", "5", "--rps", "7") as base_url:
        with KommoClient(base_url, TOKEN) as client:
            started = time.monotonic()
            pages = list(client.iter_lead_pages(WIDE_FROM, WIDE_TO))
            elapsed = time.monotonic() - started
            stats = client.stats
        server = server_stats(base_url)
    assert sum(page.received for page in pages) == 15_000
    assert stats.requests >= 60
    assert server["throttled_429"] == 0 and stats.throttled_429 == 0
    assert server["max_requests_in_any_second"] <= 7
    assert elapsed >= (stats.requests - 1) / DEFAULT_MAX_RPS - 0.05


def test_concurrency_keeps_the_pace_under_latency() -> None:
    # 9300 leads, 7440 of them created in 2025 (the simulator puts 80% in the year): 30 pages of data.
    with simulator_process("--leads", "9300", "--seed", "6", "--rps", "7", "--latency-ms", "400") as base_url:
        with KommoClient(base_url, TOKEN) as client:
            started = time.monotonic()
            pages = list(client.iter_lead_pages(YEAR_FROM, YEAR_TO))
            elapsed = time.monotonic() - started
            requests = client.stats.requests
        server = server_stats(base_url)
    assert sum(page.received for page in pages) == 7_440
    assert 30 <= len(pages) == requests <= 30 + 2 * LEAD_CHAINS  # a short last page per slice, repeats
    # One at a time, 400 ms each, would take 12 s or more; paced and concurrent it is ~requests/6.9
    # plus the last round trip (the slack absorbs timer and scheduling delays on a busy machine).
    assert elapsed <= requests / DEFAULT_MAX_RPS + 1.5
    assert server["max_in_flight"] >= 3
    assert server["throttled_429"] == 0


# --- small pure helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("", None), ("3", 3.0), (" 2.5 ", 2.5), ("-4", 0.0), ("soon", None)],
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert _retry_after(header) == expected


def test_retry_after_http_date() -> None:
    from email.utils import format_datetime

    when = datetime.now(UTC).replace(microsecond=0)
    seconds = _retry_after(format_datetime(when.fromtimestamp(when.timestamp() + 10, UTC), usegmt=True))
    assert seconds is not None and 8 <= seconds <= 10.5


def test_window_bounds_round_up_to_whole_seconds() -> None:
    assert _ceil_epoch(datetime(2025, 1, 1, tzinfo=UTC)) == 1735689600
    assert _ceil_epoch(datetime(2025, 1, 1, 0, 0, 0, 1, tzinfo=UTC)) == 1735689601
    assert _ceil_epoch(datetime(2025, 1, 1)) == 1735689600  # naive is UTC
