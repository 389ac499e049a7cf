"""Tests of the fan-out plan: slices split for a chain that finished, and the reserve of contact batches
spent at the end (over real HTTP where pages are fetched)."""

from __future__ import annotations

from datetime import UTC, datetime

from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig
from kommo_assets.kommo import KeyRange, KeysetPaging
from kommo_assets.kommo.contacts import ContactBatching
from kommo_assets.kommo.fanout import LEAD_CHAINS, Plan
from kommo_assets_tests.kommo.support import YEAR_FROM, YEAR_TO, assert_exactly, fast_client, truth

WINDOW = KeyRange.between("created_at", YEAR_FROM, YEAR_TO)


def test_a_slice_with_leads_left_is_split_for_a_chain_that_finished() -> None:
    # Nearly every lead sits in the last third of the window: the first two slices end at once and the
    # third is cut in two, then again, so the chains stay busy; nothing is lost or passed on twice.
    with KommoSimulator(SimulatorConfig(leads=200, seed=3, rate_limit_rps=None)) as simulator:
        base = int(datetime(2025, 10, 1, tzinfo=UTC).timestamp())
        for k in range(3000):
            simulator.dataset.add_lead(base + k * 600, status_id=79790634)
        expected = truth(simulator)
        with fast_client(simulator, max_in_flight=3) as client:
            paging = client.lead_paging(WINDOW)
            pages = list(client.read_leads(paging))
            stats = client.stats
        assert_exactly([lead for page in pages for lead in page.leads], expected)
        assert paging.splits >= 2
        assert stats.requests <= -(-len(expected) // 250) * 1.05 + 2 * (LEAD_CHAINS + paging.splits)


def test_the_contact_reserve_is_spent_while_the_last_slice_waits_for_its_answer() -> None:
    # The end of an export: two slices are read, the last one has a request in flight, and two full
    # contact batches wait in reserve. Both go out now rather than after that answer: a slot left
    # idle at the end is lost.
    paging = KeysetPaging(WINDOW, limit=250, chains=LEAD_CHAINS)
    first, second, last = paging.slices
    first.done = second.done = True
    last.busy = True
    contacts = ContactBatching(250)
    contacts.add(range(1, 2 * 250 + 1))
    plan = Plan(leads=paging, contacts=contacts)
    tasks = [plan.next_task() for _ in range(3)]
    assert [task.kind if task else None for task in tasks] == ["contacts", "contacts", None]
    assert [len(task.arg) for task in tasks[:2]] == [250, 250]
