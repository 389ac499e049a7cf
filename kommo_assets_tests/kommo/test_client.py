"""Tests of the Kommo client facade against the Kommo simulator over real HTTP (nothing is mocked): leads,
contacts, custom fields and the snapshot stream.

Tests about data and failures run the simulator without its rate limiter and the client at a high
pace, to stay fast; the pacing tests (test_pacing.py) run both at Kommo's real limits.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig
from kommo_assets.kommo import (
    VEHICLE_FIELD_ID,
    ContactBatch,
    FieldOptions,
    KeyRange,
    KommoClient,
    KommoResponseError,
    LeadPage,
    main_contact_id,
    redact,
)
from kommo_assets.kommo.errors import InvalidPayload
from kommo_assets.kommo.fanout import LEAD_CHAINS
from kommo_assets.kommo.fields import staged_lead
from kommo_assets_tests.kommo.support import (
    LEADS,
    TOKEN,
    WITH,
    YEAR_FROM,
    YEAR_TO,
    assert_exactly,
    collect,
    fast_client,
    kommo_threads,
    serve_page,
    truth,
    window_query,
)

pytestmark = pytest.mark.timeout(60)


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


def test_a_number_too_long_for_python_in_a_page_spoils_only_its_lead(sim: KommoSimulator) -> None:
    """json.loads refuses a number of more than 4,300 digits (ValueError), which failed the page on every
    retry; its digits now stay text, and the parser skips the one lead as having no usable id."""
    items = sim.dataset.leads(sim.dataset.find_lead_ids(window_query(), 0, 2), WITH)
    body = json.dumps({"_page": 1, "_links": {"self": {"href": f"{sim.base_url}{LEADS}"}},
                       "_embedded": {"leads": items}})
    huge = "9" * 5000
    body = body.replace(f'"id": {items[1]["id"]},', f'"id": {huge},', 1)
    assert huge in body
    sim.add_fault(kind="status", path=LEADS, query={"page": "1"}, status=200, times=-1, body=body,
                  content_type="application/hal+json")
    with fast_client(sim, max_in_flight=1) as client:
        pages = list(client.iter_lead_pages(YEAR_FROM, YEAR_TO))
        assert client.stats.requests == 1 and client.stats.retries == 0
    assert [lead["id"] for page in pages for lead in page.leads] == [items[0]["id"]]
    assert sum(page.skipped.get("invalid", 0) for page in pages) == 1
    with pytest.raises(InvalidPayload, match="no usable id"):
        staged_lead({**items[1], "id": huge})


# --- contacts, fields ----------------------------------------------------------------------------


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


def test_field_enums_and_custom_fields(sim: KommoSimulator) -> None:
    with fast_client(sim) as client:
        enums = client.field_enums(VEHICLE_FIELD_ID)
        assert enums == {item["id"]: item["value"] for item in sim.dataset.field(VEHICLE_FIELD_ID)["enums"]}
        assert len(enums) == 30
        assert client.get_custom_field(VEHICLE_FIELD_ID)["type"] == "select"
        assert client.get_custom_field(4242) is None
        assert client.field_enums(4242) == {}


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


def test_leads_can_be_paged_over_updated_at_from_a_moment_on(sim: KommoSimulator) -> None:
    """The same keyset paging reads an open-ended range of another key: every lead updated since a
    moment, ordered by updated_at, asked without an upper bound, each passed on once."""
    since = datetime(2025, 6, 1, tzinfo=UTC)
    expected = {lead["id"]: lead for lead in sim.dataset.iter_leads(WITH)
                if lead["updated_at"] >= since.timestamp() and lead["status_id"] != 143}
    with fast_client(sim) as client:
        paging = client.lead_paging(KeyRange.between("updated_at", since, None))
        leads = [lead for page in client.read_leads(paging) for lead in page.leads]
    assert len(expected) > 250
    assert_exactly(leads, expected)
    assert paging.chains == 1
