"""Two windows end to end (simulator over HTTP -> staging -> drop guard -> swap): a refresh of 2026 next to
2025 is no drop and leaves every 2025 row as it was, and the other way round; created_at is Kommo's."""

from datetime import UTC, datetime

from kommo_assets.db.runs import get_run
from kommo_assets_tests.db.test_windows import PREVIEWED, rows_of
from kommo_assets_tests.helpers import fetch_all, run_job


def window_codes(sim, year: int) -> dict[str, datetime]:
    """code -> Kommo created_at of the leads a refresh of ``year`` imports."""
    start, end = (int(datetime(y, 1, 1, tzinfo=UTC).timestamp()) for y in (year, year + 1))
    return {f"kommo:{lead['id']}": datetime.fromtimestamp(lead["created_at"], UTC)
            for lead in sim.dataset.iter_leads() if start <= lead["created_at"] < end and lead["status_id"] != 143}


def refresh(year: int, database_url: str) -> dict:
    """A full refresh of ``year``; returns its run after checking its preview said what the swap did."""
    result = run_job("kommo_full_refresh_job", partition=str(year))
    assert result.success
    run = get_run(database_url, result.run_id)
    assert run["status"] == "succeeded"
    preview, counts = run["change_preview"], run["swap_counts"]
    assert {k: preview[section][n] for k, (section, n) in PREVIEWED.items()} == {k: counts[k] for k in PREVIEWED}
    return run


def test_2025_and_2026_refreshed_in_turn_both_stay_active(kommo_env, database_url):
    sim = kommo_env
    leads_2025, leads_2026 = window_codes(sim, 2025), window_codes(sim, 2026)
    # the simulator spreads its leads from November 2024 to February 2026: 2026 holds far fewer
    assert len(leads_2025) > 5 * len(leads_2026) > 0

    refresh(2025, database_url)
    rows_2025 = rows_of(database_url, list(leads_2025))

    run = refresh(2026, database_url)
    assert run["previous_leads_count"] is None  # no earlier refresh of 2026: not a drop against 2025
    assert (run["swap_counts"]["sales_leads_archived"], run["swap_counts"]["bookings_deactivated"]) == (0, 0)
    assert rows_of(database_url, list(leads_2025)) == rows_2025

    # a 2026 lead deleted in Kommo: the next 2026 refresh takes exactly that one away
    gone = min(leads_2026)
    sim.dataset.delete_leads([int(gone.split(":")[1])])
    run = refresh(2026, database_url)
    assert run["previous_leads_count"] == len(leads_2026)
    assert run["swap_counts"]["sales_leads_archived"] == 1
    assert rows_of(database_url, list(leads_2025)) == rows_2025
    rows_2026 = rows_of(database_url, list(leads_2026))

    run = refresh(2025, database_url)
    assert run["previous_leads_count"] == len(leads_2025)
    assert not any(run["swap_counts"][k] for k in PREVIEWED)
    assert rows_of(database_url, list(leads_2026)) == rows_2026

    archived = dict(fetch_all(database_url, "SELECT lead_code, archived_at IS NOT NULL FROM sales_leads"))
    assert archived == {**{code: False for code in [*leads_2025, *leads_2026]}, gone: True}
    # created_at is the lead's Kommo created_at, in both windows
    assert dict(fetch_all(database_url, "SELECT lead_code, created_at FROM sales_leads")) == {
        **leads_2025, **leads_2026}
