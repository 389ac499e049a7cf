"""What the catalog shows of the production tables: every materialization, from a refresh of a year or from an
increment, names its partition and carries ``dagster/row_count`` counting the same rows (what production
holds of that year); every metadata key keeps one type across both."""

import dagster as dg
import psycopg

from kommo_assets.assets.common import CALENDAR_VIEW, PRODUCTION_KEYS
from kommo_assets.db.windows import window_row_counts
from kommo_assets.scope import window_for
from kommo_assets.settings import refresh_scope
from kommo_assets_tests.helpers import run_job

SYNC = "kommo_incremental_sync_job"


def _materializations(instance: dg.DagsterInstance, key: dg.AssetKey) -> list[dg.AssetMaterialization]:
    records = instance.fetch_materializations(key, limit=1000).records
    return [record.asset_materialization for record in records]


def _first_lead(sim, year: int) -> int:
    window = window_for(year)
    start, end = int(window.created_from.timestamp()), int(window.created_to.timestamp())
    return next(lead["id"] for lead in sim.dataset.iter_leads(window=(start, end)) if lead["status_id"] != 143)


def test_refreshes_and_increments_report_partitions_row_counts_and_stable_types(kommo_env, database_url):
    sim = kommo_env
    years = refresh_scope().years()  # the default scope at the real date: 2025 through the current year
    with dg.instance_for_test() as instance:
        for year in years:
            assert run_job("kommo_full_refresh_job", instance=instance, partition=str(year)).success
        changed = _first_lead(sim, years[0])
        sim.dataset.update_lead(changed, price=777)
        sim.dataset.clock.advance(1)
        sync = run_job(SYNC, instance=instance)
        assert sync.success

        with psycopg.connect(database_url) as conn:
            expected = {str(y): window_row_counts(conn, window_for(y)) for y in years}
        for key in PRODUCTION_KEYS:
            events = _materializations(instance, key)
            refreshes = [e for e in events if e.metadata["kind"].value == "full_refresh"]
            increments = [e for e in events if e.metadata["kind"].value == "increment"]
            assert sorted(e.partition for e in refreshes) == [str(y) for y in years], key
            # the increment reports the year it changed, and only that one
            assert [e.partition for e in increments] == [str(years[0])], key
            assert increments[0].metadata["leads_changed"].value >= 1
            # the latest materialization of each partition counts what production holds of that year now
            latest = {}
            for event in events:  # newest first
                latest.setdefault(event.partition, event)
            for partition, event in latest.items():
                assert event.metadata["dagster/row_count"].value == expected[partition][key.path[-1]], (
                    key, partition)
            # one type per key, whichever kind of run wrote it
            types: dict[str, set[type]] = {}
            for event in events:
                for name, value in event.metadata.items():
                    types.setdefault(name, set()).add(type(value))
            mixed = {name: kinds for name, kinds in types.items() if len(kinds - {dg.NullMetadataValue}) > 1}
            assert not mixed, (key, mixed)
        calendar = _materializations(instance, CALENDAR_VIEW)
        assert all(isinstance(e.metadata["dagster/row_count"].value, int) for e in calendar)
        assert calendar[0].metadata["dagster/row_count"].value == calendar[1].metadata["dagster/row_count"].value
