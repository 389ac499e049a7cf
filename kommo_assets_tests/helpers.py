"""Test helpers: throwaway databases, run a job in process, read production state, checksum the production
tables."""

import hashlib
import uuid
from contextlib import nullcontext

import dagster as dg
import psycopg
from psycopg import sql

PRODUCTION_TABLES = ("clients", "vehicles", "sales_leads", "bookings", "booking_vehicles", "calendar_events",
                     "zoho_outbox")


def database_name(url: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(url)["dbname"]


def url_for_database(admin_url: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(admin_url, dbname=name)


def create_database(admin_url: str, template: str | None = None, prefix: str = "kommo_test") -> tuple[str, str]:
    """(name, url) of a new database, copied from ``template`` when given (otherwise empty)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(query)
    return name, url_for_database(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def run_job(name: str, *, instance: dg.DagsterInstance | None = None, tags: dict | None = None,
            fast_retry: bool = False, resources: dict | None = None, partition: str | None = None,
            definitions: dg.Definitions | None = None, **config) -> dg.ExecuteInProcessResult:
    """Runs ``name`` of the code location's Definitions (or ``definitions``) in process; errors are results.
    ``resources`` replace the code location's (e.g. a snapshot export resource built with a directory).
    The full refresh and the dry run run ``partition`` (default: the simulator's dataset year, which holds
    most of its leads); the sync has no partition."""
    from kommo_assets.dev.simulator import SimulatorConfig
    from kommo_assets.jobs import INCREMENTAL_SYNC_JOB

    if definitions is None:
        from kommo_assets.definitions import defs
    else:
        defs = definitions

    if fast_retry:
        defs = fast_retry_definitions(defs)
    if resources:
        defs = with_resources(defs, **resources)
    run_config: dict = {"ops": {"kommo_staging": {"config": config}}} if config else {}
    context = nullcontext(instance) if instance else dg.DagsterInstance.ephemeral()
    with context as inst:
        if name != INCREMENTAL_SYNC_JOB and partition is None:
            partition = str(SimulatorConfig.year)
        return defs.resolve_job_def(name).execute_in_process(
            instance=inst, run_config=run_config, raise_on_error=False, tags=tags, partition_key=partition
        )


def production_checksum(url: str) -> str:
    """A digest of every production table's full contents, in a stable order."""
    digest = hashlib.sha256()
    with psycopg.connect(url) as conn:
        for table in PRODUCTION_TABLES:
            rows = conn.execute(
                f"SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '') FROM {table} t"
            ).fetchone()[0]
            digest.update(f"{table}\n{rows}\n".encode())
    return digest.hexdigest()


def fetch_all(url: str, query: str, params=None) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def fetch_one(url: str, query: str, params=None):
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchone()


def fast_retry_definitions(defs: dg.Definitions) -> dg.Definitions:
    """The same Definitions with a Kommo client that gives up after 2 quick retries (failure tests)."""
    from kommo_assets.resources.kommo import KommoResource

    kommo = KommoResource(base_url=dg.EnvVar("KOMMO_BASE_URL"), access_token=dg.EnvVar("KOMMO_ACCESS_TOKEN"),
                          max_retries=2, backoff_base_seconds=0.01)
    return with_resources(defs, kommo=kommo)


def with_resources(defs: dg.Definitions, **resources) -> dg.Definitions:
    """The same Definitions with some resources replaced."""
    return dg.Definitions(assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs,
                          sensors=defs.sensors, schedules=defs.schedules, executor=defs.executor,
                          resources={**defs.resources, **resources})
