"""What the Dagster catalog says of each asset: its key (where it lives), its group, and for each table the
Kommo assets write its name, its columns, where a column comes straight from a Kommo staging column, who owns
it and whether it holds personal data.

The columns are written out here, in the order and with the types ``information_schema.columns`` reports for
a database the migrations built; ``kommo_assets_tests/test_catalog.py`` compares the two, so
a migration that changes a table fails that test until this description follows it.
"""

from datetime import datetime

import dagster as dg

# Asset keys say where the data lives, so they cannot collide with another code location's `bookings`:
# a table is [database, schema, table]. DATABASE names the app's PostgreSQL database (KOMMO_DATABASE_URL),
# whatever it is called in a deployment (`kommo` locally, `postgres` on Supabase); SCHEMA is the one the
# migrations create the tables in (the connection's current schema: public on a fresh database and on
# Supabase). Kommo's API, outside, is [kommo, api]. The incremental sync is not a table: its state (each
# year's coverage, the cursor) lives in the app's database, so its key names the database only.
DATABASE = "app_db"
SCHEMA = "public"


def table_key(table: str) -> dg.AssetKey:
    """The key of a table (or view) of the app's database."""
    return dg.AssetKey([DATABASE, SCHEMA, table])


def table_of(key: dg.AssetKey) -> str:
    """The table an asset key names (its last part)."""
    return key.path[-1]


KOMMO_API = dg.AssetKey(["kommo", "api"])
STG_LEADS = table_key("stg_kommo_leads")
STG_CONTACTS = table_key("stg_kommo_contacts")
STG_BOOKING_VEHICLES = table_key("stg_kommo_booking_vehicles")
STAGING_KEYS = (STG_LEADS, STG_CONTACTS, STG_BOOKING_VEHICLES)
PRODUCTION_TABLES = ("vehicles", "clients", "sales_leads", "bookings", "booking_vehicles")
PRODUCTION_KEYS = tuple(table_key(table) for table in PRODUCTION_TABLES)
BOOKINGS = table_key("bookings")
BOOKING_VEHICLES = table_key("booking_vehicles")
CALENDAR_VIEW = table_key("calendar_events_expanded")
INCREMENT = dg.AssetKey([DATABASE, "kommo_increment"])
# The local drift check of bookings (assets/increment.py), which the dry run's job selects.
MIRROR_CHECK_KEY = dg.AssetCheckKey(BOOKINGS, "bookings_follow_mirror")

# The asset groups: the full refresh's assets, and the incremental sync apart (never in a refresh's selection).
KOMMO_GROUP = "kommo"
SYNC_GROUP = "kommo_sync"

# Who answers for the Kommo import's assets: the team that runs this code location. One owner for every
# asset; the UI filters and the catalog groups by it.
OWNERS = ["team:data-platform"]

# The tag of assets that hold personal data (names, phones, emails): a key without a value, as Dagster's
# own kind tags are.
PII = {"pii": ""}


def timestamp(moment: datetime | None) -> dg.MetadataValue:
    """A moment as the UI plots it (a timestamp), or null: one type per metadata key."""
    return dg.MetadataValue.null() if moment is None else dg.MetadataValue.timestamp(moment)


# name, then the type as information_schema.columns.data_type spells it, then "not null" where it is one.
_COLUMNS = {
    "vehicles": """
        id uuid not null
        kommo_vehicle_id bigint
        name text not null
        created_at timestamp with time zone not null
        updated_at timestamp with time zone not null
    """,
    "clients": """
        id uuid not null
        kommo_contact_id bigint
        name text
        phone text
        email text
        created_at timestamp with time zone not null
        updated_at timestamp with time zone not null
    """,
    "sales_leads": """
        id uuid not null
        lead_code text not null
        client_id uuid
        name text
        stage_id bigint
        pipeline_id bigint
        value_amount numeric
        owner_id uuid
        expected_close_at timestamp with time zone
        source text
        archived_at timestamp with time zone
        kommo_created_at timestamp with time zone
        kommo_updated_at timestamp with time zone
        created_at timestamp with time zone not null
        updated_at timestamp with time zone not null
    """,
    "bookings": """
        id uuid not null
        client_id uuid
        sales_lead_id uuid
        channel text not null
        source text
        source_payload_id text
        status text not null
        kommo_status_id bigint
        owner_id uuid
        vehicle_id uuid
        start_at timestamp with time zone
        end_at timestamp with time zone
        is_active boolean not null
        created_at timestamp with time zone not null
        updated_at timestamp with time zone not null
        kommo_created_at timestamp with time zone
    """,
    "booking_vehicles": """
        booking_id uuid not null
        vehicle_id uuid not null
        primary boolean not null
        created_at timestamp with time zone not null
    """,
    "stg_kommo_leads": """
        run_id uuid not null
        lead_id bigint not null
        payload jsonb not null
        contact_id bigint
        status_id bigint
        pipeline_id bigint
        responsible_user_id bigint
        price numeric
        name text
        vehicle_enum_id bigint
        source_enum_id bigint
        delivery_at timestamp with time zone
        collect_at timestamp with time zone
        created_at timestamp with time zone
        updated_at timestamp with time zone
        closed_at timestamp with time zone
        staged_at timestamp with time zone not null
    """,
    "stg_kommo_contacts": """
        run_id uuid not null
        contact_id bigint not null
        payload jsonb not null
        name text
        phone text
        email text
        staged_at timestamp with time zone not null
    """,
    "stg_kommo_booking_vehicles": """
        run_id uuid not null
        lead_id bigint not null
        vehicle_enum_id bigint not null
    """,
    # A view (sql/functions/30_calendar_events_expanded.sql): PostgreSQL reports every view column nullable.
    "calendar_events_expanded": """
        kind text
        id uuid
        event_id uuid
        booking_id uuid
        title text
        vehicle_id uuid
        start_at timestamp with time zone
        end_at timestamp with time zone
    """,
}

# Columns the swap (sql/functions/20_run_kommo_full_refresh.sql, through kommo_snapshot) copies from a staged
# Kommo column, unchanged or with its pair as the fallback (start/end: delivery, else collect, and back).
# Columns it looks up or computes (client_id, owner_id, status, source, vehicle_id) are left out.
_LINEAGE = {
    "bookings": {
        "source_payload_id": [(STG_LEADS, "lead_id")],
        "kommo_status_id": [(STG_LEADS, "status_id")],
        "start_at": [(STG_LEADS, "delivery_at"), (STG_LEADS, "collect_at")],
        "end_at": [(STG_LEADS, "collect_at"), (STG_LEADS, "delivery_at")],
        "kommo_created_at": [(STG_LEADS, "created_at")],
    },
    "sales_leads": {
        "lead_code": [(STG_LEADS, "lead_id")],
        "name": [(STG_LEADS, "name")],
        "stage_id": [(STG_LEADS, "status_id")],
        "pipeline_id": [(STG_LEADS, "pipeline_id")],
        "value_amount": [(STG_LEADS, "price")],
        "expected_close_at": [(STG_LEADS, "closed_at")],
        "kommo_created_at": [(STG_LEADS, "created_at")],
        "kommo_updated_at": [(STG_LEADS, "updated_at")],
    },
    "clients": {
        "kommo_contact_id": [(STG_CONTACTS, "contact_id")],
        "name": [(STG_CONTACTS, "name")],
        "phone": [(STG_CONTACTS, "phone")],
        "email": [(STG_CONTACTS, "email")],
    },
    "vehicles": {
        "kommo_vehicle_id": [(STG_BOOKING_VEHICLES, "vehicle_enum_id")],
    },
}

_PERSONAL = {"clients", "stg_kommo_contacts"}


def table_columns(table: str) -> list[tuple[str, str, bool]]:
    """The columns of ``table`` as described above: (name, data type, nullable), in table order."""
    columns = []
    for line in _COLUMNS[table].strip().splitlines():
        line = line.strip()
        required = line.endswith(" not null")
        name, data_type = line.removesuffix(" not null").split(" ", 1)
        columns.append((name, data_type, not required))
    return columns


def column_schema(table: str) -> dg.TableSchema:
    return dg.TableSchema(columns=[
        dg.TableColumn(name, data_type, constraints=dg.TableColumnConstraints(nullable=nullable))
        for name, data_type, nullable in table_columns(table)
    ])


def column_lineage(table: str) -> dg.TableColumnLineage | None:
    deps = _LINEAGE.get(table)
    if deps is None:
        return None
    return dg.TableColumnLineage(deps_by_column={
        column: [dg.TableColumnDep(asset_key=key, column_name=source) for key, source in sources]
        for column, sources in deps.items()
    })


def tables() -> list[str]:
    """Every table (and the view) the catalog describes."""
    return list(_COLUMNS)


def table_spec_args(key: dg.AssetKey) -> dict:
    """The catalog's part of the AssetSpec (or @asset) of the table asset ``key``: metadata, owners, tags."""
    table = table_of(key)
    metadata = {
        "dagster/table_name": f"{SCHEMA}.{table}",
        "dagster/column_schema": column_schema(table),
    }
    lineage = column_lineage(table)
    if lineage is not None:
        metadata["dagster/column_lineage"] = lineage
    return {"metadata": metadata, "owners": OWNERS, "tags": PII if table in _PERSONAL else {}}
