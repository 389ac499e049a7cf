"""Test helpers: run a job in process, read production state, checksum the production tables."""

import hashlib
from contextlib import nullcontext

import dagster as dg
import psycopg

PRODUCTION_TABLES = ("clients", "vehicles", "sales_leads", "bookings", "booking_vehicles", "calendar_events",
                     "zoho_outbox")



def run_job(name: str, *, instance: dg.DagsterInstance | None = None, tags: dict | None = None,
            fast_retry: bool = False, resources: dict | None = None, **config) -> dg.ExecuteInProcessResult:
    """``resources`` replace the code location's (e.g. a snapshot export resource built with a directory)."""
    from kommo_assets.definitions import defs

    if fast_retry:
        defs = fast_retry_definitions(defs)
    if resources:
        defs = with_resources(defs, **resources)
    run_config: dict = {"ops": {"kommo_staging": {"config": config}}} if config else {}
    context = nullcontext(instance) if instance else dg.DagsterInstance.ephemeral()
    with context as inst:
        return defs.resolve_job_def(name).execute_in_process(
            instance=inst, run_config=run_config, raise_on_error=False, tags=tags
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
