"""The incremental sync at its edges, by the functions the asset and the sensor call (simulator over HTTP, real
Postgres): a spurious 204 on the events feed, a change stamped late inside the margin, a delete and a restore
in one second in either feed order, a Date header ahead of Kommo's servers (once, or on every answer), and a
record stamped in the future. Each time no change is lost and none costs more than one run."""

from datetime import UTC, datetime, timedelta

import pytest

from kommo_assets.db import connect
from kommo_assets.db.increment import SYNC_MARGIN_S, margin_seen, probe_changes
from kommo_assets.db.windows import sync_cursor
from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig
from kommo_assets.kommo.changes import Probe
from kommo_assets.scope import window_for
from kommo_assets_tests.helpers import fetch_one
from kommo_assets_tests.sync_support import YEAR, fast_client, full_refresh, increment

T0 = 1_800_000_000  # after every generated date: nothing generated lies in the margin
BOOKING_STATUSES = (79790634, 79790637)


@pytest.fixture
def sim():
    with KommoSimulator(SimulatorConfig(leads=80, seed=21, token="edges-token", rate_limit_rps=None)) as s:
        s.dataset.clock.set(T0)
        yield s


@pytest.fixture
def refreshed(sim, database_url):
    full_refresh(database_url, sim)
    return sim


def _leads(sim, count: int) -> list[int]:
    start, end = (int(datetime(y, 1, 1, tzinfo=UTC).timestamp()) for y in (2025, 2026))
    return [lead["id"] for lead in sim.dataset.iter_leads(window=(start, end))
            if lead["status_id"] in BOOKING_STATUSES][:count]


def _price(url: str, lead_id: int):
    return fetch_one(url, "SELECT value_amount FROM sales_leads WHERE lead_code = %s", (f"kommo:{lead_id}",))[0]


def _archived(url: str, lead_id: int) -> bool:
    return fetch_one(url, "SELECT archived_at IS NOT NULL FROM sales_leads WHERE lead_code = %s",
                     (f"kommo:{lead_id}",))[0]


def _cursor(url: str) -> datetime:
    """Where the next sync of the simulator's year reads from (its coverage)."""
    with connect(url) as conn:
        return sync_cursor(conn, [window_for(YEAR)])


def _probe(url: str, sim) -> Probe:
    """The sensor's probe: from the cursor less the margin, given what the last sync read."""
    with connect(url) as conn:
        cursor, seen = sync_cursor(conn, [window_for(YEAR)]), margin_seen(conn)
    with fast_client(sim) as client:
        return probe_changes(client, cursor, seen)


def _at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _synced_change(sim, url: str, lead: int, price: int) -> datetime:
    """A lead changed 30 s after the refresh, a sync a second later; returns the cursor it left."""
    sim.dataset.clock.advance(30)
    sim.dataset.update_lead(lead, price=price)
    sim.dataset.clock.advance(1)
    increment(url, sim)
    return _cursor(url)


def test_a_spurious_204_on_the_events_feed_loses_no_deletion(refreshed, database_url):
    (lead,) = _leads(refreshed, 1)
    refreshed.dataset.clock.advance(10)
    refreshed.dataset.delete_leads([lead])
    refreshed.dataset.clock.advance(1)
    refreshed.add_fault(kind="empty", path="/api/v4/events", times=1)
    assert increment(database_url, refreshed)["status"] == "succeeded"
    assert [f["fired"] for f in refreshed.faults()] == [1]
    assert _archived(database_url, lead)


def test_a_change_stamped_late_inside_the_margin_is_probed_and_applied(refreshed, database_url):
    first, late = _leads(refreshed, 2)
    cursor = _synced_change(refreshed, database_url, first, 1001)
    assert cursor == _at(T0 + 31)
    # What the sync read inside the margin does not start another run.
    idle = _probe(database_url, refreshed)
    assert not idle.anything and idle.asked_from == cursor - timedelta(seconds=SYNC_MARGIN_S)
    # An integration sends updated_at itself (or an index lags): a change stamped a minute before the cursor.
    refreshed.dataset.clock.advance(20)
    refreshed.dataset.update_lead(late, price=1002, updated_at=int(cursor.timestamp()) - 60)
    probe = _probe(database_url, refreshed)
    assert probe.changed == ["leads"] and probe.requests == 1
    increment(database_url, refreshed)
    assert (_price(database_url, first), _price(database_url, late)) == (1001, 1002)
    assert not _probe(database_url, refreshed).anything


@pytest.mark.parametrize("ties_oldest_first", [False, True], ids=["newest-first", "oldest-first"])
@pytest.mark.parametrize("last", ["restored", "deleted"])
def test_a_delete_and_a_restore_in_one_second_are_resolved_by_event_id(refreshed, database_url, ties_oldest_first,
                                                                       last):
    (lead,) = _leads(refreshed, 1)
    refreshed.dataset.events.ties_oldest_first = ties_oldest_first  # Kommo does not document this order
    refreshed.dataset.clock.advance(10)
    if last == "restored":
        refreshed.dataset.delete_leads([lead])
        refreshed.dataset.restore_leads([lead])
    else:
        refreshed.dataset.delete_leads([lead])
        refreshed.dataset.clock.advance(1)
        refreshed.dataset.restore_leads([lead])
        refreshed.dataset.delete_leads([lead])  # the same second as the restore
    refreshed.dataset.clock.advance(1)
    increment(database_url, refreshed)
    assert _archived(database_url, lead) is (last == "deleted")


def test_one_date_header_ahead_does_not_move_the_cursor_past_changes(refreshed, database_url):
    first, second = _leads(refreshed, 2)
    refreshed.dataset.clock.advance(10)
    refreshed.dataset.update_lead(first, price=2001)
    # The run's first answer comes through a proxy whose clock is an hour ahead of Kommo's servers.
    refreshed.add_fault(kind="date", path="/api/v4/leads/custom_fields/", offset_s=3600, times=1)
    increment(database_url, refreshed)
    assert [f["fired"] for f in refreshed.faults()] == [1]
    assert _cursor(database_url) == _at(T0 + 10)  # the other answers' Date, not the proxy's
    refreshed.dataset.clock.advance(5)
    refreshed.dataset.update_lead(second, price=2002)
    assert _probe(database_url, refreshed).changed == ["leads"]
    increment(database_url, refreshed)
    assert (_price(database_url, first), _price(database_url, second)) == (2001, 2002)


def test_a_proxy_ahead_on_every_answer_moves_the_cursor_no_further_than_the_margin_past_what_was_read(
        refreshed, database_url):
    first, second = _leads(refreshed, 2)
    refreshed.dataset.clock.advance(10)
    refreshed.dataset.update_lead(first, price=3001)
    refreshed.add_fault(kind="date", path="/api/", offset_s=3600, times=-1)
    increment(database_url, refreshed)
    assert _cursor(database_url) == _at(T0 + 10 + SYNC_MARGIN_S)  # the newest stamp read, plus the margin
    refreshed.clear_faults()
    refreshed.dataset.clock.advance(5)
    refreshed.dataset.update_lead(second, price=3002)  # stamped before that cursor, inside its margin
    assert _probe(database_url, refreshed).changed == ["leads"]
    increment(database_url, refreshed)
    assert _price(database_url, second) == 3002


def test_a_record_stamped_in_the_future_costs_one_run_not_one_per_tick(refreshed, database_url):
    (lead,) = _leads(refreshed, 1)
    refreshed.dataset.clock.advance(10)
    refreshed.dataset.update_lead(lead, price=4001, updated_at=T0 + 3600)  # an hour ahead of Kommo's clock
    assert _probe(database_url, refreshed).changed == ["leads"]
    increment(database_url, refreshed)
    assert _price(database_url, lead) == 4001
    assert _cursor(database_url) == _at(T0 + 10)  # the Date, not the stamp
    for _ in range(3):  # the next ticks
        refreshed.dataset.clock.advance(60)
        assert not _probe(database_url, refreshed).anything
    refreshed.dataset.update_lead(lead, price=4002)  # changed again: stamped now, and found
    assert _probe(database_url, refreshed).changed == ["leads"]


def test_a_deletion_stamped_before_the_cursor_by_a_clock_that_jumped_back_is_applied(refreshed, database_url):
    first, gone = _leads(refreshed, 2)
    cursor = int(_synced_change(refreshed, database_url, first, 5001).timestamp())
    refreshed.dataset.clock.set(cursor - 45)  # a server of Kommo's 45 s behind the others
    refreshed.dataset.delete_leads([gone])
    refreshed.dataset.clock.set(cursor + 10)
    assert _probe(database_url, refreshed).changed == ["lead_events"]
    increment(database_url, refreshed)
    assert _archived(database_url, gone)
    assert not _probe(database_url, refreshed).anything
