"""Tests of the keyset paging state machine, fed prepared answers, without HTTP: every lead passed on
exactly once through splits, crowded seconds, repeats at the cursor and empty answers, and servers that
ignore what paging relies on refused. The HTTP-level paging tests are in test_client.py."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from kommo_assets.kommo import KommoResponseError
from kommo_assets.kommo.paging import (
    MAX_SECOND_PASSES,
    KeyRange,
    KeysetPaging,
    LeadPage,
    PageRequest,
    ceil_epoch,
)
from kommo_assets.kommo.responses import ListPage
from kommo_assets.kommo.transport import confirmed

LIMIT = 50
START = 1_700_000_000
WINDOW = KeyRange("created_at", START, START + 300_000)


def lead(lead_id: int, created: int, *, updated: int | None = None, status: int = 7, **extra: object) -> dict:
    return {"id": lead_id, "created_at": created, "updated_at": created if updated is None else updated,
            "status_id": status, **extra}


def answer(request: PageRequest, leads: list[dict], *, full: bool | None = None) -> ListPage:
    """The answer listing ``leads``; full (more to come) when it holds a whole page, unless told."""
    return ListPage(request.number, leads, ends_range=not (len(leads) == LIMIT if full is None else full))


class FakeKommo:
    """Answers lead requests as Kommo does, from leads in memory: the key range inclusive, ordered by the
    key (ties by id), or by id alone, ``page`` counted in offsets. ``before`` runs ahead of each answer
    (to change the data meanwhile); ``asked`` keeps every request."""

    def __init__(self, leads: list[dict], before: Callable[[PageRequest], None] | None = None) -> None:
        self.leads = {item["id"]: item for item in leads}
        self.before = before
        self.asked: list[PageRequest] = []

    def answer(self, request: PageRequest) -> ListPage | None:
        self.asked.append(request)
        if self.before is not None:
            self.before(request)
        params = dict(request.params)
        key = next(name[len("order["):-1] for name in params if name.startswith("order["))
        key = key if key != "id" else next(name[len("filter["):-len("][from]")] for name in params
                                           if name.endswith("][from]"))
        low, high = int(params[f"filter[{key}][from]"]), params.get(f"filter[{key}][to]")
        rows = [item for item in self.leads.values()
                if low <= item[key] and (high is None or item[key] <= int(high))]
        by_id = "order[id]" in params
        rows.sort(key=lambda item: item["id"] if by_id else (item[key], item["id"]))
        offset = (int(params["page"]) - 1) * int(params["limit"])
        chunk = [dict(item) for item in rows[offset:offset + int(params["limit"])]]
        return answer(request, chunk) if chunk else None


def drain(paging: KeysetPaging, server: FakeKommo) -> list[LeadPage]:
    """Runs the paging to its end the way the fan-out does: every request it allows in flight at once,
    answers fed oldest first, each empty answer asked once more."""
    pages: list[LeadPage] = []
    in_flight: deque[PageRequest] = deque()
    while not paging.done():
        while (request := paging.take()) is not None:
            in_flight.append(request)
        request = in_flight.popleft()
        page = paging.feed(request, confirmed(lambda: server.answer(request), 'test'))  # noqa: B023
        if page is not None:
            pages.append(page)
            paging.on_processed()
    assert not in_flight
    return pages


def passed_on(pages: list[LeadPage]) -> list[int]:
    return [item["id"] for page in pages for item in page.leads]


def paging(keys: KeyRange = WINDOW, chains: int = 3, **options: object) -> KeysetPaging:
    return KeysetPaging(keys, limit=LIMIT, chains=chains, **options)


# --- every lead once ---------------------------------------------------------------------------------


def test_a_skewed_window_is_split_for_the_chains_that_finished_and_every_lead_comes_once() -> None:
    # A few leads early, 1500 in the last third: the first two slices end at once, the third is cut.
    leads = [lead(k, START + k * 997) for k in range(1, 11)]
    leads += [lead(100 + k, START + 200_000 + k * 60) for k in range(1500)]
    machine = paging()
    pages = drain(machine, FakeKommo(leads))
    ids = passed_on(pages)
    assert sorted(ids) == sorted(item["id"] for item in leads)
    assert machine.splits >= 2 and len(machine.slices) == 3 + machine.splits
    assert sum(page.received for page in pages) == len(leads)  # no lead counted twice


def test_leads_a_slice_asked_for_beyond_a_split_are_left_to_the_new_slice() -> None:
    # The last slice looks dense (60 leads in its first 600 s) but is sparse after that: it is split while
    # its second request is in flight, and that answer reaches past the cut; the new slice lists those.
    base = START + 200_000
    leads = [lead(k + 1, base + 10 * k) for k in range(60)]
    leads += [lead(1000 + k, base + 1000 + 2400 * k) for k in range(40)]
    machine = paging()
    pages = drain(machine, FakeKommo(leads))
    ids = passed_on(pages)
    assert machine.splits >= 1
    assert len(ids) == len(set(ids)) and set(ids) == {item["id"] for item in leads}
    assert sum(page.received for page in pages) == len(leads)


def test_the_first_requests_ask_for_equal_slices_of_the_window_by_created_at() -> None:
    machine = paging()
    requests = [machine.take() for _ in range(3)]
    assert machine.take() is None  # every slice has a request in flight and none can be split yet
    assert [dict(r.params) for r in requests] == [
        {"limit": "50", "filter[created_at][from]": str(start),
         "filter[created_at][to]": str(start + 99_999), "order[created_at]": "asc", "page": "1"}
        for start in (START, START + 100_000, START + 200_000)
    ]


def test_leads_repeated_at_the_inclusive_cursor_are_passed_on_once_unless_newer() -> None:
    machine = paging(chains=1)
    first = machine.take()
    page = [lead(k, START + k) for k in range(1, LIMIT)] + [lead(900, START + LIMIT - 1)]
    assert len(machine.feed(first, answer(first, page)).leads) == LIMIT
    second = machine.take()
    assert dict(second.params)["filter[created_at][from]"] == str(START + LIMIT - 1)
    again = [lead(LIMIT - 1, START + LIMIT - 1), lead(900, START + LIMIT - 1, updated=START + 10**6),
             lead(1000, START + 5000)]
    result = machine.feed(second, answer(second, again))
    # The unchanged repeat is dropped and not counted; the lead updated meanwhile is passed on again.
    assert [item["id"] for item in result.leads] == [900, 1000]
    assert result.received == 1
    assert machine.done() is False and machine.paging is False


def test_a_crowded_second_is_read_by_offset_in_passes_until_two_agree() -> None:
    crowded = START + 500
    leads = [lead(k, crowded) for k in range(1, 121)] + [lead(200, crowded + 1), lead(201, START + 9000)]
    server = FakeKommo(leads)
    pages = drain(paging(chains=1), server)
    assert sorted(passed_on(pages)) == sorted(item["id"] for item in leads)
    inside = [dict(r.params) for r in server.asked if "order[id]" in dict(r.params)]
    # Two passes of three pages (50, 50, 20), within that second alone; then the cursor moves past it.
    assert [p["page"] for p in inside] == ["1", "2", "3"] * 2
    assert all(p["filter[created_at][from]"] == p["filter[created_at][to]"] == str(crowded) for p in inside)
    assert dict(server.asked[-1].params)["filter[created_at][from]"] == str(crowded + 1)


def test_a_lead_deleted_during_a_pass_over_a_crowded_second_brings_another_pass() -> None:
    crowded = START + 500
    leads = [lead(k, crowded) for k in range(1, 121)]

    def delete_one(request: PageRequest) -> None:
        params = dict(request.params)
        if params.get("order[id]") and params["page"] == "2" and 10 in server.leads:
            del server.leads[10]  # lead 51 moves up to page 1 and this pass never lists it

    server = FakeKommo(leads, before=delete_one)
    pages = drain(paging(chains=1), server)
    assert set(passed_on(pages)) == set(range(1, 121))  # 10 was passed on before it was deleted
    offsets = [dict(r.params)["page"] for r in server.asked if "order[id]" in dict(r.params)]
    assert offsets == ["1", "2", "3"] * 3


def test_a_crowded_second_that_changes_in_every_pass_fails() -> None:
    crowded = START + 500
    leads = [lead(k, crowded) for k in range(1, 121)]

    def delete_each_pass(request: PageRequest) -> None:
        params = dict(request.params)
        if params.get("order[id]") and params["page"] == "2":
            del server.leads[min(server.leads)]

    server = FakeKommo(leads, before=delete_each_pass)
    with pytest.raises(KommoResponseError) as caught:
        drain(paging(chains=1), server)
    assert f"changed during each of {MAX_SECOND_PASSES} passes" in str(caught.value)


# --- empty answers -----------------------------------------------------------------------------------


def test_a_spurious_empty_answer_is_asked_again_and_the_second_answer_believed() -> None:
    machine = paging(chains=1)
    request = machine.take()
    answers = iter([None, answer(request, [lead(1, START + 1)])])
    got = confirmed(lambda: next(answers), 'test')
    assert [item["id"] for item in machine.feed(request, got).leads] == [1]
    assert machine.paging is False


def test_an_empty_answer_where_a_slice_starts_ends_that_slice() -> None:
    machine = paging(chains=1)
    request = machine.take()
    assert machine.feed(request, None) is None
    assert machine.done()


def test_an_empty_answer_after_a_full_page_fails_instead_of_leaving_a_hole() -> None:
    machine = paging(chains=1)
    first = machine.take()
    machine.feed(first, answer(first, [lead(k, START + k) for k in range(1, LIMIT + 1)]))
    second = machine.take()
    assert second.after_full
    with pytest.raises(KommoResponseError) as caught:
        machine.feed(second, None)  # None: empty twice, see transport.confirmed
    assert "the listing is inconsistent" in str(caught.value) and caught.value.page == 2


# --- servers that ignore what paging relies on -------------------------------------------------------


def test_a_full_page_outside_the_requested_range_is_refused() -> None:
    machine = paging(chains=1)
    request = machine.take()
    with pytest.raises(KommoResponseError) as caught:
        machine.feed(request, answer(request, [lead(k, START - 10_000 + k) for k in range(1, LIMIT + 1)]))
    assert "ignores filter[created_at]" in str(caught.value)


def test_a_page_out_of_created_at_order_is_refused() -> None:
    machine = paging(chains=1)
    request = machine.take()
    with pytest.raises(KommoResponseError) as caught:
        machine.feed(request, answer(request, [lead(1, START + 20), lead(2, START + 10)]))
    assert "not in created_at order although order[created_at]=asc was asked" in str(caught.value)


def test_a_server_ignoring_page_inside_a_crowded_second_is_refused() -> None:
    machine = paging(chains=1)
    crowd = [lead(k, START) for k in range(1, LIMIT + 1)]
    request = machine.take()
    machine.feed(request, answer(request, crowd))
    for _ in range(2):  # page 1 of the pass, then a "page 2" that lists page 1 again
        request = machine.take()
        assert request.in_second
        if dict(request.params)["page"] == "2":
            with pytest.raises(KommoResponseError) as caught:
                machine.feed(request, answer(request, crowd))
        else:
            machine.feed(request, answer(request, crowd))
    assert "it ignores `page`" in str(caught.value)


# --- the keyed field, and the client-side checks -----------------------------------------------------


def test_the_keyed_field_is_a_parameter_and_an_open_ended_range_is_one_chain() -> None:
    since = START + 1000
    leads = [lead(k, START - 50_000 + k, updated=since + (k * 37) % 400) for k in range(1, 301)]
    leads += [lead(900, START, updated=since - 1)]  # updated before the range
    machine = paging(KeyRange("updated_at", since, None), chains=3)
    server = FakeKommo(leads)
    pages = drain(machine, server)
    assert sorted(passed_on(pages)) == list(range(1, 301))
    assert machine.chains == 1
    first = dict(server.asked[0].params)
    assert first == {"limit": "50", "filter[updated_at][from]": str(since), "order[updated_at]": "asc",
                     "page": "1"}
    assert not any("created_at" in name for r in server.asked for name, _ in r.params)


def test_leads_failing_the_client_side_checks_are_skipped_by_reason() -> None:
    machine = paging(chains=1, excluded=frozenset({143}), params=[("with", "contacts")])
    request = machine.take()
    assert ("with", "contacts") in request.params
    page = [
        lead(1, START + 1),
        lead(2, START + 2, status=143),
        lead(3, START + 3, is_deleted=True),
        lead(4, START + 4, updated=START + 4),
        lead(4, START + 4, updated=START + 99, name="newer copy"),
        {"id": "junk", "created_at": START + 5},
        "not a lead",
        lead(5, WINDOW.end + 10),  # beyond the window, though Kommo listed it
    ]
    result = machine.feed(request, answer(request, page))
    assert [item["id"] for item in result.leads] == [1, 4]
    assert result.leads[1]["name"] == "newer copy"
    assert result.skipped == {"excluded_status": 1, "deleted": 1, "duplicate": 1, "invalid": 2,
                              "outside_window": 1}
    assert result.received == len(page)


def test_window_bounds_round_up_to_whole_seconds_and_an_empty_window_is_refused() -> None:
    assert ceil_epoch(datetime(2025, 1, 1, tzinfo=UTC)) == 1735689600
    assert ceil_epoch(datetime(2025, 1, 1, 0, 0, 0, 1, tzinfo=UTC)) == 1735689601
    assert ceil_epoch(datetime(2025, 1, 1)) == 1735689600  # naive is UTC
    with pytest.raises(ValueError, match="empty window"):
        KeyRange.between("created_at", datetime(2025, 1, 2), datetime(2025, 1, 1))
