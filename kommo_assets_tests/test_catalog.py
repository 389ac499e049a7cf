"""What the catalog shows of the tables: every materialization of a production table, from a refresh of a year
or from an increment, names its partition and carries ``dagster/row_count`` counting the same rows (what
production holds of that year); every metadata key keeps one type across both. Every table asset's definition
names its table, describes its columns as a freshly migrated database has them, and carries its owners, its
pii tag, its code reference and (where a column comes straight from Kommo) its column lineage."""

from pathlib import Path

import dagster as dg
import psycopg

from kommo_assets.assets import catalog
from kommo_assets.assets.catalog import (
    BOOKINGS,
    CALENDAR_VIEW,
    INCREMENT,
    KOMMO_API,
    PRODUCTION_KEYS,
    STAGING_KEYS,
    STG_BOOKING_VEHICLES,
    STG_CONTACTS,
    STG_LEADS,
    table_key,
)
from kommo_assets.db.windows import window_row_counts
from kommo_assets.definitions import defs
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


TABLE_KEYS = (*STAGING_KEYS, *PRODUCTION_KEYS, CALENDAR_VIEW)

_COLUMNS_SQL = """
SELECT column_name, data_type, is_nullable = 'YES'
  FROM information_schema.columns
 WHERE table_schema = %s AND table_name = %s
 ORDER BY ordinal_position
"""


def _node(key: dg.AssetKey):
    return defs.resolve_asset_graph().get(key)


class _Table:
    """The table's catalog metadata (name, column schema, lineage), raw or wrapped in a MetadataValue."""

    def __init__(self, key: dg.AssetKey):
        self.metadata = _node(key).metadata

    def _get(self, name: str):
        value = self.metadata.get(name)
        return value.value if isinstance(value, dg.MetadataValue) else value

    table_name = property(lambda self: self._get("dagster/table_name"))
    column_schema = property(lambda self: self._get("dagster/column_schema"))
    column_lineage = property(lambda self: self._get("dagster/column_lineage"))


def test_every_asset_key_says_where_it_lives():
    """No bare keys: a table's key is [database, schema, table] and matches its dagster/table_name; Kommo's
    API is under kommo; the sync, not a table, under the database alone."""
    keys = set(defs.resolve_asset_graph().get_all_asset_keys())
    assert keys == {*TABLE_KEYS, KOMMO_API, INCREMENT}
    assert BOOKINGS.to_user_string() == "app_db/public/bookings"
    assert (KOMMO_API.path, INCREMENT.path) == (["kommo", "api"], ["app_db", "kommo_increment"])
    for key in TABLE_KEYS:
        database, schema, table = key.path
        assert database == catalog.DATABASE and f"{schema}.{table}" == _Table(key).table_name, key
    # the checks hang off the prefixed keys too
    checked = {check_key.asset_key for check_key in defs.resolve_asset_graph().asset_check_keys}
    assert checked == {STG_LEADS, STG_BOOKING_VEHICLES, BOOKINGS}


def _schema_differences(conn: psycopg.Connection, key: dg.AssetKey) -> list[str]:
    """Where the definition's column schema and the database's table disagree (empty: they agree)."""
    schema_name, table = _Table(key).table_name.split(".")
    described = [(c.name, c.type, c.constraints.nullable) for c in _Table(key).column_schema.columns]
    actual = [tuple(row) for row in conn.execute(_COLUMNS_SQL, (schema_name, table)).fetchall()]
    if not actual:
        return [f"{schema_name}.{table} does not exist"]
    differences = [f"{schema_name}.{table} has {column}, not described" for column in actual
                   if column not in described]
    differences += [f"{schema_name}.{table} lacks described {column}" for column in described
                    if column not in actual]
    if not differences and described != actual:
        differences.append(f"{schema_name}.{table}: columns in another order than described")
    return differences


def test_every_table_asset_names_its_table_and_its_columns_as_the_migrations_made_them(database_url):
    assert set(catalog.tables()) == {key.path[-1] for key in TABLE_KEYS}
    with psycopg.connect(database_url) as conn:
        for key in TABLE_KEYS:
            assert _Table(key).table_name == f"public.{key.path[-1]}", key
            assert _schema_differences(conn, key) == [], key


def test_the_schema_check_sees_a_column_the_description_lacks(database_url):
    """What keeps the description from drifting: a migration that adds a column fails the test above."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE bookings ADD COLUMN notes text")
        assert _schema_differences(conn, BOOKINGS) == [
            "public.bookings has ('notes', 'text', True), not described"]
        conn.execute("ALTER TABLE bookings DROP COLUMN notes, ALTER COLUMN channel DROP NOT NULL")
        assert _schema_differences(conn, BOOKINGS) == [
            "public.bookings has ('channel', 'text', True), not described",
            "public.bookings lacks described ('channel', 'text', False)"]


def test_owners_pii_tags_code_references_and_freshness():
    graph = defs.resolve_asset_graph()
    for node in graph.asset_nodes:
        assert node.owners == catalog.OWNERS, node.key
    personal = {key for key in TABLE_KEYS if "pii" in _node(key).tags}
    assert personal == {table_key("clients"), STG_CONTACTS}
    assert _node(STG_CONTACTS).tags["pii"] == ""
    # every asset Dagster computes points at the module that defines it (kommo_api is external: no code)
    for node in graph.asset_nodes:
        if not node.is_executable:
            continue
        references = node.metadata["dagster/code_references"].code_references
        assert [Path(r.file_path).parent.name for r in references] == ["assets"], node.key
        assert all(Path(r.file_path).is_file() and r.line_number > 0 for r in references), node.key
    # the nightly dry run refreshes staging daily; production's freshness is the bookings_fresh check
    for key in STAGING_KEYS:
        policy = _node(key).freshness_policy
        assert isinstance(policy, dg.FreshnessPolicy), key
    assert all(_node(key).freshness_policy is None for key in PRODUCTION_KEYS)


def test_column_lineage_names_staging_columns_that_exist_upstream():
    bookings = _Table(BOOKINGS).column_lineage
    assert {(d.asset_key, d.column_name) for d in bookings.deps_by_column["start_at"]} == {
        (STG_LEADS, "delivery_at"), (STG_LEADS, "collect_at")}
    assert [(d.asset_key, d.column_name) for d in bookings.deps_by_column["kommo_status_id"]] == [
        (STG_LEADS, "status_id")]
    sales = _Table(table_key("sales_leads")).column_lineage
    assert [(d.asset_key, d.column_name) for d in sales.deps_by_column["value_amount"]] == [(STG_LEADS, "price")]

    def columns(key):
        return {c.name for c in _Table(key).column_schema.columns}

    for key in TABLE_KEYS:
        lineage = _Table(key).column_lineage
        if lineage is None:
            continue
        for column, deps in lineage.deps_by_column.items():
            assert column in columns(key), (key, column)
            for dep in deps:
                assert dep.asset_key in _node(key).parent_keys, (key, dep)
                assert dep.column_name in columns(dep.asset_key), (key, dep)
