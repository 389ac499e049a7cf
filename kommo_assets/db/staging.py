"""Streams a Kommo snapshot into the staging tables of one run, page by page, with COPY.

Free of Dagster: the staging asset, the benchmark and the tests all call :func:`stage_snapshot`.
Typed columns are extracted once here (by :mod:`kommo_assets.kommo.fields`); the raw payload is kept.
"""

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb

from kommo_assets.db import connect
from kommo_assets.kommo.client import KommoClient
from kommo_assets.kommo.errors import InvalidPayload
from kommo_assets.kommo.fields import (
    SOURCE_FIELD_ID,
    VEHICLE_FIELD_ID,
    sanitize_payload,
    staged_contact,
    staged_lead,
)

log = logging.getLogger(__name__)

LEAD_COLUMNS = (
    "lead_id", "payload", "contact_id", "status_id", "pipeline_id", "responsible_user_id", "price", "name",
    "vehicle_enum_id", "source_enum_id", "delivery_at", "collect_at", "created_at", "updated_at", "closed_at",
)
CONTACT_COLUMNS = ("contact_id", "payload", "name", "phone", "email")

# Staging tables fed through COPY into a temporary table, then merged with ON CONFLICT: COPY cannot skip
# the duplicates that page shifts produce, and a lead seen twice keeps its most recently updated version.
_PREPARE = """
CREATE TEMP TABLE IF NOT EXISTS tmp_stg_leads (LIKE stg_kommo_leads INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS tmp_stg_contacts (LIKE stg_kommo_contacts INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
"""
_MERGE_LEADS = """
INSERT INTO stg_kommo_leads AS s
SELECT DISTINCT ON (lead_id) * FROM tmp_stg_leads ORDER BY lead_id, updated_at DESC NULLS LAST
ON CONFLICT (run_id, lead_id) DO UPDATE SET
    payload = EXCLUDED.payload, contact_id = EXCLUDED.contact_id, status_id = EXCLUDED.status_id,
    pipeline_id = EXCLUDED.pipeline_id, responsible_user_id = EXCLUDED.responsible_user_id,
    price = EXCLUDED.price, name = EXCLUDED.name, vehicle_enum_id = EXCLUDED.vehicle_enum_id,
    source_enum_id = EXCLUDED.source_enum_id, delivery_at = EXCLUDED.delivery_at,
    collect_at = EXCLUDED.collect_at, created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at,
    closed_at = EXCLUDED.closed_at, staged_at = now()
WHERE s.updated_at IS NULL OR EXCLUDED.updated_at >= s.updated_at
"""
_MERGE_CONTACTS = """
INSERT INTO stg_kommo_contacts AS s
SELECT DISTINCT ON (contact_id) * FROM tmp_stg_contacts ORDER BY contact_id
ON CONFLICT (run_id, contact_id) DO UPDATE SET
    payload = EXCLUDED.payload, name = EXCLUDED.name, phone = EXCLUDED.phone, email = EXCLUDED.email
"""


@dataclass
class StagingResult:
    leads: int = 0
    contacts: int = 0
    vehicle_links: int = 0
    lead_pages: int = 0
    contact_batches: int = 0
    leads_received: int = 0
    contacts_requested: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def as_metadata(self) -> dict:
        return {
            "leads": self.leads,
            "contacts": self.contacts,
            "vehicle_links": self.vehicle_links,
            "lead_pages": self.lead_pages,
            "contact_batches": self.contact_batches,
            "leads_received": self.leads_received,
            "contacts_requested": self.contacts_requested,
            "contacts_missing": self.contacts_requested - self.contacts,
            "skipped": dict(self.skipped),
            "seconds": round(self.seconds, 3),
        }


class StagingWriter:
    """Writes one run's rows; every write is its own short transaction, so progress is visible and a
    failure keeps what was staged for inspection."""

    def __init__(self, conn: psycopg.Connection, run_id: str):
        self.conn = conn
        self.run_id = run_id
        with conn.transaction():
            conn.execute(_PREPARE)

    def write_field_options(self, field_id: int, options: dict[int, str]) -> None:
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO stg_kommo_field_options (run_id, field_id, enum_id, value) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (run_id, field_id, enum_id) DO UPDATE SET value = EXCLUDED.value",
                [(self.run_id, field_id, enum_id, value) for enum_id, value in options.items()],
            )

    def write_leads(self, leads: Iterable[dict], skipped: Counter) -> int:
        """Stages a page of leads; returns how many rows it wrote. Unusable payloads are counted, not raised."""
        rows = []
        for lead in leads:
            try:
                s = staged_lead(lead)
            except InvalidPayload:
                skipped["invalid_lead"] += 1
                continue
            rows.append((
                self.run_id, s.lead_id, Jsonb(sanitize_payload(lead)), s.contact_id, s.status_id, s.pipeline_id,
                s.responsible_user_id, s.price, s.name, s.vehicle_enum_id, s.source_enum_id, s.delivery_at,
                s.collect_at, s.created_at, s.updated_at, s.closed_at,
            ))
        return self._copy_merge("tmp_stg_leads", ("run_id", *LEAD_COLUMNS), rows, _MERGE_LEADS)

    def write_contacts(self, contacts: Iterable[dict], skipped: Counter) -> int:
        rows = []
        for contact in contacts:
            try:
                s = staged_contact(contact)
            except InvalidPayload:
                skipped["invalid_contact"] += 1
                continue
            rows.append((self.run_id, s.contact_id, Jsonb(sanitize_payload(contact)), s.name, s.phone, s.email))
        return self._copy_merge("tmp_stg_contacts", ("run_id", *CONTACT_COLUMNS), rows, _MERGE_CONTACTS)

    def _copy_merge(self, temp_table: str, columns: tuple[str, ...], rows: list[tuple], merge_sql: str) -> int:
        if not rows:
            return 0
        with self.conn.transaction(), self.conn.cursor() as cur:
            with cur.copy(f"COPY {temp_table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(merge_sql)
            written = cur.rowcount
            cur.execute("UPDATE kommo_import_runs SET heartbeat_at = now() WHERE id = %s", (self.run_id,))
        return written

    def finish(self) -> tuple[int, int, int]:
        """Derives the vehicle links from the staged leads and stamps the run as staged; returns counts."""
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute(
                "INSERT INTO stg_kommo_booking_vehicles (run_id, lead_id, vehicle_enum_id)"
                " SELECT run_id, lead_id, vehicle_enum_id FROM stg_kommo_leads"
                " WHERE run_id = %s AND vehicle_enum_id IS NOT NULL ON CONFLICT DO NOTHING",
                (self.run_id,),
            )
            cur.execute(
                "SELECT (SELECT count(*) FROM stg_kommo_leads WHERE run_id = %(r)s),"
                "       (SELECT count(*) FROM stg_kommo_contacts WHERE run_id = %(r)s),"
                "       (SELECT count(*) FROM stg_kommo_booking_vehicles WHERE run_id = %(r)s)",
                {"r": self.run_id},
            )
            leads, contacts, links = cur.fetchone()
        return leads, contacts, links


def _distinct_contact_ids(database_url: str, run_id: str) -> Iterator[int]:
    """Streams the run's distinct main-contact ids from staging with a server-side cursor, so memory
    stays flat however many leads there are."""
    with connect(database_url) as conn, conn.cursor(name="kommo_contact_ids") as cur:
        cur.itersize = 5000
        cur.execute(
            "SELECT DISTINCT contact_id FROM stg_kommo_leads"
            " WHERE run_id = %s AND contact_id IS NOT NULL ORDER BY contact_id",
            (run_id,),
        )
        for (contact_id,) in cur:
            yield contact_id


def stage_snapshot(
    database_url: str,
    run_id: str,
    client: KommoClient,
    created_from: datetime,
    created_to: datetime,
    *,
    on_progress: Callable[[str, StagingResult], None] | None = None,
) -> StagingResult:
    """Fetches the window's leads, their main contacts and the select-field options into staging."""
    started = time.monotonic()
    result = StagingResult()
    with connect(database_url) as conn:
        writer = StagingWriter(conn, run_id)
        for field_id in (VEHICLE_FIELD_ID, SOURCE_FIELD_ID):
            writer.write_field_options(field_id, client.field_enums(field_id))

        for page in client.iter_lead_pages(created_from, created_to):
            result.lead_pages += 1
            result.leads_received += page.received
            result.skipped.update(page.skipped)
            writer.write_leads(page.leads, result.skipped)
            if on_progress:
                on_progress("leads", result)

        contact_ids = _CountingIterator(_distinct_contact_ids(database_url, run_id))
        for batch in client.iter_contact_batches(contact_ids):
            result.contact_batches += 1
            writer.write_contacts(batch, result.skipped)
            if on_progress:
                on_progress("contacts", result)
        result.contacts_requested = contact_ids.count

        result.leads, result.contacts, result.vehicle_links = writer.finish()
    result.seconds = time.monotonic() - started
    return result


class _CountingIterator:
    def __init__(self, inner: Iterator[int]):
        self.inner = inner
        self.count = 0

    def __iter__(self) -> "_CountingIterator":
        return self

    def __next__(self) -> int:
        value = next(self.inner)
        self.count += 1
        return value
