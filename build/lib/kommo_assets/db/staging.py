"""Streams a Kommo snapshot into the staging tables of one run, page by page, with COPY.

Free of Dagster: the staging asset, the benchmark and the tests all call :func:`stage_snapshot`.
Typed columns are extracted once here (by :mod:`kommo_assets.kommo.fields`); the raw payload is kept.

Everything the database does per page hides behind the requests in flight: the client keeps fetching
while a page is copied in, and each page's contacts are asked for as soon as the page is staged (the
database says which of its contact ids are new to the run), so contacts do not wait for the last lead
page. What is left after the last answer is a count and an ANALYZE.
"""

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime
from operator import attrgetter

import psycopg

from kommo_assets.db.runs import ImportRuns
from kommo_assets.kommo import ContactBatch, FieldOptions, KommoClient, LeadPage
from kommo_assets.kommo.errors import InvalidPayload
from kommo_assets.kommo.fields import (
    MAX_NESTING,
    SOURCE_FIELD_ID,
    VEHICLE_FIELD_ID,
    StagedContact,
    StagedLead,
    clean_text,
    nesting_exceeds,
    sanitize_payload,
    staged_contact,
    staged_lead,
)

log = logging.getLogger(__name__)

# The typed columns of the staging tables are the fields of StagedLead and StagedContact, by name: the one
# list of them. Each staged row is (run_id, payload, *those fields).
_LEAD_FIELDS = tuple(f.name for f in fields(StagedLead))
_CONTACT_FIELDS = tuple(f.name for f in fields(StagedContact))
LEAD_COLUMNS = ("run_id", "payload", *_LEAD_FIELDS)
CONTACT_COLUMNS = ("run_id", "payload", *_CONTACT_FIELDS)
_lead_values = attrgetter(*_LEAD_FIELDS)
_contact_values = attrgetter(*_CONTACT_FIELDS)


def lead_row(run_id: str, payload: str, lead: StagedLead) -> tuple:
    """The values of ``LEAD_COLUMNS`` for one lead (its payload as JSON text)."""
    return (run_id, payload, *_lead_values(lead))


def contact_row(run_id: str, payload: str, contact: StagedContact) -> tuple:
    """The values of ``CONTACT_COLUMNS`` for one contact (its payload as JSON text)."""
    return (run_id, payload, *_contact_values(contact))


def _set_from_excluded(columns: Iterable[str], key: str) -> str:
    """``column = EXCLUDED.column, ...`` for the merge's ON CONFLICT, its conflict key and run_id left out."""
    return ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c not in (key, "run_id"))


HEARTBEAT_EVERY_S = 5.0

# Staging tables fed through COPY into a temporary table, then merged with ON CONFLICT: COPY cannot skip
# the duplicates that data moving while paging produces (a newer version listed again), and a lead seen
# twice keeps its most recently updated version.
# tmp_stg_contact_ids holds the run's main-contact ids seen so far, so each page yields the ids that are
# new (to be fetched) without the process remembering them all.
_PREPARE = """
CREATE TEMP TABLE IF NOT EXISTS tmp_stg_leads (LIKE stg_kommo_leads INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS tmp_stg_contacts (LIKE stg_kommo_contacts INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS tmp_stg_contact_ids (contact_id bigint PRIMARY KEY);
TRUNCATE tmp_stg_contact_ids;
"""
# One statement per lead page: merge the page, keep the run's vehicle links in step with the leads as
# merged (a lead seen again may have lost or changed its vehicle), and return the counts and the
# page's contact ids that the run has not seen yet.
_MERGE_LEADS = f"""
WITH merged AS (
    INSERT INTO stg_kommo_leads AS s
    SELECT DISTINCT ON (lead_id) * FROM tmp_stg_leads ORDER BY lead_id, updated_at DESC NULLS LAST
    ON CONFLICT (run_id, lead_id) DO UPDATE SET {_set_from_excluded(LEAD_COLUMNS, "lead_id")}, staged_at = now()
    WHERE s.updated_at IS NULL OR EXCLUDED.updated_at >= s.updated_at
    RETURNING s.lead_id, s.contact_id, s.vehicle_enum_id, (s.xmax = 0) AS inserted
), unlinked AS (
    DELETE FROM stg_kommo_booking_vehicles b USING merged m
     WHERE b.run_id = %(r)s AND b.lead_id = m.lead_id AND m.vehicle_enum_id IS NULL AND NOT m.inserted
), linked AS (
    INSERT INTO stg_kommo_booking_vehicles AS b (run_id, lead_id, vehicle_enum_id)
    SELECT %(r)s, m.lead_id, m.vehicle_enum_id FROM merged m WHERE m.vehicle_enum_id IS NOT NULL
    ON CONFLICT (run_id, lead_id) DO UPDATE SET vehicle_enum_id = EXCLUDED.vehicle_enum_id
    WHERE b.vehicle_enum_id <> EXCLUDED.vehicle_enum_id
), new_contacts AS (
    INSERT INTO tmp_stg_contact_ids (contact_id)
    SELECT DISTINCT m.contact_id FROM merged m WHERE m.contact_id IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING contact_id
)
SELECT (SELECT count(*) FROM merged WHERE inserted),
       (SELECT count(*) FROM merged WHERE NOT inserted),
       (SELECT coalesce(array_agg(contact_id ORDER BY contact_id), '{{}}') FROM new_contacts)
"""
_MERGE_CONTACTS = f"""
WITH merged AS (
    INSERT INTO stg_kommo_contacts AS s
    SELECT DISTINCT ON (contact_id) * FROM tmp_stg_contacts ORDER BY contact_id
    ON CONFLICT (run_id, contact_id) DO UPDATE SET {_set_from_excluded(CONTACT_COLUMNS, "contact_id")}
    RETURNING (s.xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted) FROM merged
"""
# Statistics of the run's rows: the preview, the checks and the swap select staging by run id, and the
# planner must not take 100,000 fresh rows of a new run for none (nested loops over a whole run). Only
# run_id, whose statistics target is small (migration 0006): a few thousand sampled rows, ~20-50 ms.
_ANALYZE = """
ANALYZE stg_kommo_leads (run_id), stg_kommo_contacts (run_id), stg_kommo_booking_vehicles (run_id),
        stg_kommo_field_options (run_id)
"""

_SURROGATE = re.compile(r"[\ud800-\udfff]")


def payload_json(obj: object) -> str:
    """The JSON text of a raw payload, as ``jsonb`` accepts it: the same document as
    ``json.dumps(sanitize_payload(obj))``, without the deep copy when nothing needs cleaning (the usual
    case): NUL characters, lone surrogates and NaN/inf take the slow, sanitizing path.

    Raises :class:`InvalidPayload` for a payload nested deeper than ``MAX_NESTING``: no Kommo record is,
    and the walks that store it recurse."""
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except RecursionError:  # deeper than the stack allows, so far deeper than MAX_NESTING
        raise InvalidPayload(f"the payload nests deeper than {MAX_NESTING} levels") from None
    except (ValueError, TypeError):
        text = None
    # Each level opens a bracket, so a text with few of them is shallow enough: only the rest is walked.
    if (text is None or text.count("{") + text.count("[") > MAX_NESTING) and nesting_exceeds(obj):
        raise InvalidPayload(f"the payload nests deeper than {MAX_NESTING} levels")
    if text is None or "\\u0000" in text or _SURROGATE.search(text):
        text = json.dumps(sanitize_payload(obj), ensure_ascii=False, separators=(",", ":"))
    return text


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
    kommo_clock: datetime | None = None  # Kommo's clock at the export's first answer (its Date header)

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


@dataclass
class LeadsWritten:
    """What staging one page of leads did: rows added, rows the run had already (staged once, newest
    version kept), and the main-contact ids that are new to the run."""

    added: int
    repeated: int
    new_contact_ids: list[int]


class StagingWriter:
    """Writes one run's rows; every write is its own short transaction, so progress is visible and a
    failure keeps what was staged for inspection."""

    def __init__(self, conn: psycopg.Connection, run_id: str):
        self.conn = conn
        self.run_id = run_id
        self.leads_added = 0
        self.contacts_added = 0
        self.leads_updated = 0  # leads staged again with a newer version (their contact may have moved)
        self._beat_at = 0.0
        with conn.transaction():
            conn.execute(_PREPARE)

    def write_field_options(self, field_id: int, options: dict[int, str]) -> None:
        """Stages a select field's options. Labels are cleaned like every other text (a NUL would fail the
        insert, and with it the run); an option whose label is left empty is not staged, so its leads get
        the fallback of an unknown option (a placeholder vehicle name, no source)."""
        labels = [(enum_id, clean_text(value)) for enum_id, value in options.items()]
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO stg_kommo_field_options (run_id, field_id, enum_id, value) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (run_id, field_id, enum_id) DO UPDATE SET value = EXCLUDED.value",
                [(self.run_id, field_id, enum_id, label) for enum_id, label in labels if label is not None],
            )

    def write_leads(self, leads: Iterable[dict], skipped: Counter) -> LeadsWritten:
        """Stages a page of leads. Unusable payloads are counted in ``skipped``, not raised."""
        rows = []
        for lead in leads:
            try:
                s = staged_lead(lead)
                payload = payload_json(lead)
            except InvalidPayload:
                skipped["invalid_lead"] += 1
                continue
            rows.append(lead_row(self.run_id, payload, s))
        if not rows:
            return LeadsWritten(0, 0, [])
        with self.conn.transaction(), self.conn.cursor() as cur:
            self._copy(cur, "tmp_stg_leads", LEAD_COLUMNS, rows)
            cur.execute(_MERGE_LEADS, {"r": self.run_id})
            added, updated, new_ids = cur.fetchone()
            self._heartbeat(cur)
        self.leads_added += added
        self.leads_updated += updated
        return LeadsWritten(added, len(rows) - added, new_ids)

    def write_contacts(self, contacts: Iterable[dict], skipped: Counter) -> int:
        """Stages a batch of contacts; returns how many are new to the run."""
        rows = []
        for contact in contacts:
            try:
                s = staged_contact(contact)
                payload = payload_json(contact)
            except InvalidPayload:
                skipped["invalid_contact"] += 1
                continue
            rows.append(contact_row(self.run_id, payload, s))
        if not rows:
            return 0
        with self.conn.transaction(), self.conn.cursor() as cur:
            self._copy(cur, "tmp_stg_contacts", CONTACT_COLUMNS, rows)
            cur.execute(_MERGE_CONTACTS)
            (added,) = cur.fetchone()
            self._heartbeat(cur)
        self.contacts_added += added
        return added

    @staticmethod
    def _copy(cur: psycopg.Cursor, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def _heartbeat(self, cur: psycopg.Cursor) -> None:
        now = time.monotonic()
        if now - self._beat_at >= HEARTBEAT_EVERY_S:
            self._beat_at = now
            ImportRuns(self.conn).heartbeat(self.run_id)

    def finish(self, *, keep_unreferenced_contacts: bool = False) -> tuple[int, int, int]:
        """Counts what the run staged and gives the planner statistics of it; returns the counts of
        leads, contacts and vehicle links. ``keep_unreferenced_contacts``: an increment stages contacts
        for the clients they update, whether or not a staged lead points at them."""
        with self.conn.transaction(), self.conn.cursor() as cur:
            orphans = 0
            if self.leads_updated and not keep_unreferenced_contacts:
                # A lead staged twice keeps its newest version, whose main contact may differ: staged
                # contacts that no staged lead points at any more are dropped.
                cur.execute(
                    "DELETE FROM stg_kommo_contacts c WHERE c.run_id = %(r)s AND NOT EXISTS"
                    " (SELECT 1 FROM stg_kommo_leads l WHERE l.run_id = %(r)s AND l.contact_id = c.contact_id)",
                    {"r": self.run_id},
                )
                orphans = cur.rowcount
            # Leads and contacts were counted as they were merged (the wide lead rows are not scanned
            # again); the links are a narrow table.
            cur.execute("SELECT count(*) FROM stg_kommo_booking_vehicles WHERE run_id = %s", (self.run_id,))
            (links,) = cur.fetchone()
            ImportRuns(self.conn).heartbeat(self.run_id)
        try:
            with self.conn.transaction():
                # Autovacuum may be analyzing a table right now: then its statistics are fresh anyway.
                self.conn.execute("SET LOCAL lock_timeout = '500ms'")
                self.conn.execute(_ANALYZE)
        except psycopg.errors.LockNotAvailable:
            log.info("staging statistics left to autovacuum (it holds a staging table)")
        return self.leads_added, self.contacts_added - orphans, links


def stage_snapshot(
    conn: psycopg.Connection,
    run_id: str,
    client: KommoClient,
    created_from: datetime,
    created_to: datetime,
    *,
    on_progress: Callable[[str, StagingResult], None] | None = None,
) -> StagingResult:
    """Fetches the window's leads, their main contacts and the select-field options into staging, on
    ``conn`` (each page its own transaction).

    One stream (:meth:`KommoClient.stream_snapshot`) feeds it: as each lead page is staged, the contact
    ids it brought that the run has not seen go back to the stream, whose contact batches interleave
    with the remaining lead pages under the one pace. Memory stays flat: the process holds the pages in
    flight, never the snapshot or its ids.
    """
    started = time.monotonic()
    result = StagingResult()
    return _stage(conn, run_id, client, created_from, created_to, on_progress, result, started)


def _stage(conn: psycopg.Connection, run_id: str, client: KommoClient, created_from: datetime, created_to: datetime,
           on_progress: Callable[[str, StagingResult], None] | None, result: StagingResult,
           started: float) -> StagingResult:
    writer = StagingWriter(conn, run_id)
    stream = client.stream_snapshot(created_from, created_to, field_ids=(VEHICLE_FIELD_ID, SOURCE_FIELD_ID))
    with stream:
        for item in stream:
            if isinstance(item, LeadPage):
                result.lead_pages += 1
                result.leads_received += item.received
                result.skipped.update(item.skipped)
                written = writer.write_leads(item.leads, result.skipped)
                if written.repeated:
                    result.skipped["duplicate"] += written.repeated
                stream.add_contact_ids(written.new_contact_ids)
                phase = "leads"
            elif isinstance(item, ContactBatch):
                result.contact_batches += 1
                writer.write_contacts(item.contacts, result.skipped)
                phase = "contacts"
            elif isinstance(item, FieldOptions):
                writer.write_field_options(item.field_id, item.options)
                continue
            else:  # pragma: no cover - the stream yields nothing else
                raise TypeError(f"unexpected item from the Kommo stream: {type(item).__name__}")
            if on_progress:
                on_progress(phase, result)
        result.contacts_requested = stream.contacts_requested
    result.kommo_clock = client.kommo_clock
    result.leads, result.contacts, result.vehicle_links = writer.finish()
    result.seconds = time.monotonic() - started
    return result
