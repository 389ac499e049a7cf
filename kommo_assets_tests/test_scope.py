"""The years in scope (KOMMO_REFRESH_YEARS) and the yearly partitions built from them: one definition, which
follows the calendar (a new year enters at its first second, UTC) and which the partitions, the schedules,
the requests and the sync all read."""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kommo_assets.assets.partitions import year_partitions
from kommo_assets.scope import FIRST_SEED_YEAR, ScopeError, YearScope, current_year, window_for

NEW_YEARS_EVE = datetime(2030, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def test_an_open_range_gains_the_new_year_at_its_first_second():
    scope = YearScope.parse("2028-")
    assert scope.years(NEW_YEARS_EVE) == (2028, 2029, 2030)
    assert scope.years(NEW_YEARS_EVE + timedelta(microseconds=1)) == (2028, 2029, 2030, 2031)
    # whatever the machine's zone: the year is UTC's
    assert scope.years(datetime(2031, 1, 1, 1, tzinfo=UTC).astimezone()) == (2028, 2029, 2030, 2031)


def test_no_year_is_in_scope_before_it_begins():
    assert YearScope.parse("2029-2031").years(NEW_YEARS_EVE.replace(year=2029)) == (2029,)
    assert YearScope.parse("2031-").years(NEW_YEARS_EVE) == ()
    assert not YearScope.parse("2031").contains(2031, NEW_YEARS_EVE)


def test_the_default_is_the_seed_year_through_the_real_current_year():
    scope = YearScope.parse(None)
    assert scope.years() == tuple(range(FIRST_SEED_YEAR, current_year() + 1))
    assert scope.contains(current_year())


def test_years_and_ranges_with_gaps():
    scope = YearScope.parse("2024,2026-2027, 2029-")
    assert scope.years(NEW_YEARS_EVE) == (2024, 2026, 2027, 2029, 2030)
    assert scope.gaps(NEW_YEARS_EVE) == (2025, 2028)
    assert str(scope) == "2024,2026-2027,2029-"
    assert scope.as_json() == [[2024, 2024], [2026, 2027], [2029, None]]


def test_a_window_is_the_half_open_utc_year():
    window = window_for(2026)
    assert (window.created_from, window.created_to) == (datetime(2026, 1, 1, tzinfo=UTC),
                                                        datetime(2027, 1, 1, tzinfo=UTC))
    assert (window.year, window.key) == (2026, "2026")
    assert window_for(created_from="2026-03-01", created_to="2026-04-01").year is None


@pytest.mark.parametrize("raw", ["2025-2024", "20x5", "2025-20", "1999-", ","])
def test_unreadable_scopes_are_refused(raw):
    with pytest.raises(ScopeError, match="KOMMO_REFRESH_YEARS must be years and ranges"):
        YearScope.parse(raw)


@pytest.mark.parametrize("raw", ["", "2025", "2025-", "2024,2026", "2023-2024,2026-", "2025-2030", "2024-"])
def test_the_partitions_are_the_years_in_scope_at_the_real_date(raw):
    """The keys Dagster offers (and backfills) are the scope's years now: an open scope's partitions include
    the year under way, a closed one's none past its end, a gap none at all."""
    scope = YearScope.parse(raw)
    assert year_partitions(scope).get_partition_keys() == [str(y) for y in scope.years()]


@given(first=st.integers(2000, 2090), span=st.integers(0, 5), open_end=st.booleans(),
       at=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC)))
def test_the_partitions_follow_the_scope_at_any_moment(first, span, open_end, at):
    # A scope that begins in a later year has no partition yet (Dagster's end_offset would show its first year
    # a year early; a run of it is refused as out of scope: partition_window).
    assume(at.year >= first)
    scope = YearScope.parse(f"{first}-" if open_end else f"{first}-{first + span}")
    keys = year_partitions(scope).get_partition_keys(current_time=at)
    assert keys == [str(y) for y in scope.years(at)]
