"""Stages one increment: what changed in Kommo since the sync cursor, into the run's staging tables.

Free of Dagster: the increment asset, the sensor and the tests call these functions. The rows go through
the full refresh's writer (:class:`StagingWriter`), so a lead staged by an increment is the same row a full
refresh stages; ``run_kommo_increment`` then applies them with the swap's own statements.

What an increment stages:

* every lead updated since the cursor whose Kommo ``created_at`` lies in one of the windows in scope
  (``KOMMO_REFRESH_YEARS``, resolved on Kommo's clock), whatever its status (a lead moved to 143 is archived
  by the apply);
* the leads deleted since the cursor, from the events feed, into ``stg_kommo_lead_removals``;
* the leads restored or relinked since the cursor (the same feed) that the changed leads did not include,
  fetched by id: Kommo may leave their ``updated_at`` as it was;
* the contacts updated since the cursor that are clients already, or main contacts of staged leads;
* the main contacts of staged leads that are not clients yet, fetched by id;
* the vehicle and source options (their labels name new vehicles and sources).

The cursor is per window (``kommo_window_coverage``): the increment reads from the oldest coverage among the
windows in scope, a window never read from its first second, so a window that joins the scope (a new year,
a wider ``KOMMO_REFRESH_YEARS``) is imported whole; the apply moves every one of them to the increment's end.
The range read starts ``SYNC_MARGIN_S`` before the cursor: Kommo stamps changes on more than one server and
its list indexes lag, so a change can become visible a while after the second it is stamped with; it must
not fall between two syncs. Reading it again is harmless: staging keeps the newest version and applying the
same state twice changes nothing. What the run read in that margin is recorded (:class:`Seen`), so the
sensor's probe, which asks from the cursor less the margin too, starts a run only for what no sync read.

The cursor the run stores is Kommo's clock when it started reading (the earliest ``Date`` of its answers),
and never more than ``SYNC_MARGIN_S`` past the newest stamp the run actually read: a ``Date`` from a proxy
ahead of Kommo's servers cannot carry it past changes the next sync would not re-read.
"""

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg

from kommo_assets.db.staging import StagingWriter
from kommo_assets.db.windows import coverage, sync_cursor, window_params
from kommo_assets.kommo import KommoClient
from kommo_assets.kommo.changes import LEAD_DELETED, LeadEvent, Probe, Seen, latest_by_lead, touched_by_events
from kommo_assets.kommo.fields import SOURCE_FIELD_ID, VEHICLE_FIELD_ID, extract_kommo_epoch, positive_int
from kommo_assets.kommo.paging import ceil_epoch
from kommo_assets.scope import Window, YearScope

log = logging.getLogger(__name__)

# How far behind the cursor every sync re-reads, and the probe asks: wide enough for the late stamps Kommo
# is known to produce (servers' clocks, lagging list indexes); see docs/incremental.md for the choice and its
# cost. A change stamped earlier than this before it became visible is left to the nightly drift check.
SYNC_MARGIN_S = 120

# Leads found deleted leave the run's staging (listed before the events said so), and those production
# holds become removals.
_STAGE_REMOVALS = """
WITH removed AS (
    INSERT INTO stg_kommo_lead_removals (run_id, lead_id, reason)
    SELECT %(r)s, unnest(%(removals)s::bigint[]), 'deleted'
    ON CONFLICT (run_id, lead_id) DO NOTHING
    RETURNING lead_id
), unlinked AS (
    DELETE FROM stg_kommo_booking_vehicles WHERE run_id = %(r)s AND lead_id = ANY(%(ids)s::bigint[])
)
DELETE FROM stg_kommo_leads WHERE run_id = %(r)s AND lead_id = ANY(%(ids)s::bigint[])
"""
# Of the deleted leads, those production or the current-state mirror holds in one of the sync's windows
# (kommo_owned: the one definition of which rows a window's import may retire); a deleted lead of another
# year is left, as its own year's refresh would leave it to that refresh.
_REMOVABLE = """
SELECT DISTINCT l.id FROM unnest(%(ids)s::bigint[]) AS l(id)
  JOIN unnest(%(froms)s::timestamptz[], %(tos)s::timestamptz[]) AS w(created_from, created_to) ON true
 WHERE EXISTS (SELECT 1 FROM sales_leads s WHERE s.lead_code = 'kommo:' || l.id
                  AND kommo_owned(s.lead_code, s.kommo_created_at, w.created_from, w.created_to))
    OR EXISTS (SELECT 1 FROM bookings b WHERE b.source_payload_id = 'kommo:' || l.id
                  AND kommo_owned(b.source_payload_id, b.kommo_created_at, w.created_from, w.created_to))
    OR EXISTS (SELECT 1 FROM kommo_leads m WHERE m.lead_id = l.id
                  AND m.created_at >= w.created_from AND m.created_at < w.created_to)
 ORDER BY 1
"""
_CLIENT_CONTACTS = "SELECT kommo_contact_id FROM clients WHERE kommo_contact_id = ANY(%s::bigint[])"


@dataclass
class IncrementResult:
    """What staging an increment did, and the range of Kommo's clock it covers: ``[sync_from, sync_to)``."""

    sync_from: datetime | None = None
    sync_to: datetime | None = None  # Kommo's clock at the run's first answer: the next cursor
    windows: tuple[Window, ...] = ()  # the windows in scope on Kommo's clock, each covered up to sync_to
    leads: int = 0
    removals: int = 0
    restored: int = 0  # leads whose newest event is a restoration (they come back as changed leads)
    contacts: int = 0
    vehicle_links: int = 0
    leads_received: int = 0
    leads_fetched: int = 0  # restored or relinked leads the feed did not list, fetched by id
    contacts_received: int = 0
    contacts_fetched: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    seen: Seen | None = None  # what the run read from the next cursor less the margin on (for the probe)

    def as_metadata(self) -> dict:
        return {
            "sync_from": self.sync_from.isoformat() if self.sync_from else None,
            "sync_to": self.sync_to.isoformat() if self.sync_to else None,
            "windows": [w.key for w in self.windows],
            "leads": self.leads,
            "removals": self.removals,
            "restored": self.restored,
            "contacts": self.contacts,
            "vehicle_links": self.vehicle_links,
            "leads_received": self.leads_received,
            "leads_fetched": self.leads_fetched,
            "contacts_received": self.contacts_received,
            "contacts_fetched": self.contacts_fetched,
            "skipped": dict(self.skipped),
            "seconds": round(self.seconds, 3),
            "margin_seen": self.seen.as_json() if self.seen else None,
        }


def in_windows(lead: dict, windows: Sequence[Window]) -> bool:
    """Whether the lead's Kommo ``created_at`` lies in one of ``windows`` (half-open)."""
    created = extract_kommo_epoch(lead.get("created_at")) if isinstance(lead, dict) else None
    return created is not None and any(w.created_from <= created < w.created_to for w in windows)


def stage_increment(
    conn: psycopg.Connection,
    run_id: str,
    client: KommoClient,
    scope: YearScope,
    *,
    on_progress: Callable[[str, IncrementResult], None] | None = None,
) -> IncrementResult:
    """Stages what changed in the windows of ``scope`` since their coverage (less the margin) into run
    ``run_id``, on ``conn``.

    ``client`` must be fresh: Kommo's clock at its first answer is the moment the scope is resolved at (a new
    year is in scope from its first second on Kommo's clock) and, cross-checked (:func:`next_cursor`),
    becomes ``sync_to``, the coverage the apply stores for every window (every change stamped before it is in
    this increment). Leads are read before the events feed, so a lead listed and then deleted ends up
    removed, and one deleted and restored meanwhile is listed."""
    started = time.monotonic()
    result = IncrementResult()
    tracker = client.changes()
    writer = StagingWriter(conn, run_id)
    # First requests: their Date is the increment's end on Kommo's clock.
    for field_id in (VEHICLE_FIELD_ID, SOURCE_FIELD_ID):
        options = client.field_options(field_id)
        writer.write_field_options(options.field_id, options.options)
    if client.kommo_clock is None:
        raise RuntimeError("Kommo's answers carry no readable Date header: the sync has no clock to "
                           "take its cursor from, so it cannot run.")
    windows = scope.windows(client.kommo_clock)
    if not windows:
        raise ValueError(f"no year of KOMMO_REFRESH_YEARS={scope} has begun on Kommo's clock "
                         f"({client.kommo_clock.isoformat()}): nothing to sync yet")
    result.windows = windows
    cursor = sync_cursor(conn, windows)
    since = cursor - timedelta(seconds=SYNC_MARGIN_S)
    result.sync_from = since

    # Relinks matter only to the windows already covered (one read whole lists every lead of its own), from
    # their coverage less the margin; the oldest such coverage is where they are read from.
    covered = [moment for moment in coverage(conn, windows).values() if moment is not None]
    links_since = min(covered) - timedelta(seconds=SYNC_MARGIN_S) if covered else None

    read = Seen(ceil_epoch(since))
    lead_contacts = _stage_changed_leads(writer, tracker, since, windows, result, on_progress, read)
    events = _stage_removals(conn, run_id, tracker, since, links_since, windows, result, read)
    lead_contacts |= _stage_touched_leads(writer, client, events, windows, result, read)
    _stage_contacts(conn, writer, client, tracker, since, lead_contacts, result, read)
    result.sync_to, result.seen = next_cursor(cursor, client.kommo_clock, read)
    if on_progress:
        on_progress("contacts", result)
    _, result.contacts, result.vehicle_links = writer.finish(keep_unreferenced_contacts=True)
    with conn.transaction():
        # The writer counted leads as they were added; some were then found deleted.
        (result.leads,) = conn.execute("SELECT count(*) FROM stg_kommo_leads WHERE run_id = %s",
                                       (run_id,)).fetchone()
    result.seconds = time.monotonic() - started
    return result


def next_cursor(cursor: datetime, earliest: datetime, read: Seen) -> tuple[datetime, Seen]:
    """The cursor a run that read ``read`` (from ``cursor`` less the margin on) may store, and what it read
    from that cursor less the margin on, for the probe.

    The cursor is Kommo's clock when the run began reading (``earliest``: the earliest ``Date`` of its
    answers, so one ``Date`` ahead is outvoted by the others), but never more than ``SYNC_MARGIN_S`` past the
    newest stamp the run read (a proxy whose every ``Date`` is ahead cannot carry it further than the next
    sync re-reads), never without such a stamp (nothing read, nothing proven), and never back."""
    stamps = [*read.leads.values(), *read.contacts.values(), *read.events.values()]
    moved = min(earliest, _at(max(stamps) + SYNC_MARGIN_S)) if stamps else cursor
    sync_to = max(cursor, moved)
    bound = ceil_epoch(sync_to) - SYNC_MARGIN_S
    leads = {i: t for i, t in read.leads.items() if t >= bound}
    contacts = {i: t for i, t in read.contacts.items() if t >= bound}
    versions = {k: v for k, v in read.versions.items()
                if int(k.partition(":")[2]) in (leads if k.startswith("leads:") else contacts)}
    seen = Seen(bound, leads, contacts, {e: t for e, t in read.events.items() if t >= bound}, versions)
    return sync_to, seen


def _at(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _stage_changed_leads(writer: StagingWriter, tracker, since: datetime, windows: Sequence[Window],
                         result: IncrementResult, on_progress, read: Seen) -> set[int]:
    """Every lead changed since ``since`` whose creation lies in a window; returns their new contact ids."""
    lead_contacts: set[int] = set()
    for page in tracker.changed_lead_pages(since):
        result.leads_received += page.received
        result.skipped.update(page.skipped)
        for lead in page.leads:
            read.note("leads", lead)
        kept = [lead for lead in page.leads if in_windows(lead, windows)]
        result.skipped["outside_windows"] += len(page.leads) - len(kept)
        written = writer.write_leads(kept, result.skipped)
        lead_contacts.update(written.new_contact_ids)
        if on_progress:
            on_progress("leads", result)
    return lead_contacts


def _stage_removals(conn: psycopg.Connection, run_id: str, tracker, since: datetime, links_since: datetime | None,
                    windows: Sequence[Window], result: IncrementResult, read: Seen) -> list[LeadEvent]:
    """The leads deleted since ``since`` (each lead's newest event decides, ties by event id) leave the run's
    staging; those production or the mirror holds in a window become removals. Returns the events read."""
    listed: list[LeadEvent] = tracker.lead_events(since, links_since)
    read.events.update((e.id, int(e.created_at.timestamp())) for e in listed)
    events = latest_by_lead(listed)
    deleted = sorted(lead_id for lead_id, event in events.items() if event.type == LEAD_DELETED)
    result.restored = len(events) - len(deleted)
    removed = _removable(conn, deleted, windows)
    result.skipped["deleted_outside_windows"] += len(deleted) - len(removed)
    if deleted:
        with conn.transaction():
            conn.execute(_STAGE_REMOVALS, {"r": run_id, "ids": deleted, "removals": removed})
    result.removals = len(removed)
    return listed


def _stage_touched_leads(writer: StagingWriter, client: KommoClient, events: list[LeadEvent],
                         windows: Sequence[Window], result: IncrementResult, read: Seen) -> set[int]:
    """The leads the events say changed (restored, relinked), fetched by id and staged (Kommo may leave their
    ``updated_at`` as it was); returns their new contact ids. A lead the changed-leads feed listed is fetched
    again when the version listed is stamped before the event: the feed is read before the events, so a
    quiet relink after that read would be missed (one made in the listed version's very second is not
    told apart)."""
    missing = sorted(lead_id for lead_id, at in touched_by_events(events).items()
                     if read.leads.get(lead_id, -1) < at)
    lead_contacts: set[int] = set()
    for batch in client.leads_by_id(missing):
        result.leads_fetched += len(batch)
        kept = [lead for lead in batch if in_windows(lead, windows)]
        result.skipped["outside_windows"] += len(batch) - len(kept)
        lead_contacts.update(writer.write_leads(kept, result.skipped).new_contact_ids)
    return lead_contacts


def _stage_contacts(conn: psycopg.Connection, writer: StagingWriter, client: KommoClient, tracker,
                    since: datetime, lead_contacts: set[int], result: IncrementResult, read: Seen) -> None:
    """Contacts changed since ``since`` that are clients (or main contacts of staged leads), and the main
    contacts of staged leads that are not clients yet, fetched by id."""
    changed_contacts: dict[int, dict] = {}
    for page in tracker.changed_contact_pages(since):
        result.contacts_received += page.received
        for contact in page.leads:
            contact_id = positive_int(contact.get("id"))
            if contact_id is not None:
                changed_contacts[contact_id] = contact
                read.note("contacts", contact)
    clients = _existing_clients(conn, [*changed_contacts, *lead_contacts])
    wanted = {cid for cid in changed_contacts if cid in clients or cid in lead_contacts}
    writer.write_contacts([changed_contacts[cid] for cid in sorted(wanted)], result.skipped)
    to_fetch = sorted(cid for cid in lead_contacts if cid not in clients and cid not in wanted)
    for batch in client.iter_contact_batches(to_fetch):
        result.contacts_fetched += len(batch)
        writer.write_contacts(batch, result.skipped)


def _removable(conn: psycopg.Connection, lead_ids: list[int], windows: Sequence[Window]) -> list[int]:
    if not lead_ids:
        return []
    params = {"ids": lead_ids, **window_params(windows)}
    with conn.transaction():
        return [row[0] for row in conn.execute(_REMOVABLE, params).fetchall()]


def _existing_clients(conn: psycopg.Connection, contact_ids: list[int]) -> set[int]:
    if not contact_ids:
        return set()
    with conn.transaction():
        rows = conn.execute(_CLIENT_CONTACTS, (sorted(set(contact_ids)),)).fetchall()
    return {row[0] for row in rows}


def probe_changes(client: KommoClient, cursor: datetime, seen: Seen | None = None) -> Probe:
    """The sensor's question: did anything change that no sync has read, from ``cursor`` less the margin
    (given what the last sync read there, ``seen``: :func:`margin_seen`)? At most 3 requests."""
    return client.changes().probe(cursor, margin_s=SYNC_MARGIN_S, seen=seen)


_LAST_SEEN = """
SELECT stats -> 'margin_seen' FROM kommo_import_runs
 WHERE kind = 'increment' AND status = 'succeeded' ORDER BY finished_at DESC LIMIT 1
"""


def margin_seen(conn: psycopg.Connection) -> Seen | None:
    """What the last successful increment read from its cursor less the margin on; None before any."""
    with conn.transaction():
        row = conn.execute(_LAST_SEEN).fetchone()
    return Seen.from_json(row[0]) if row else None


# --- what the sensor and the freshness check read and record -----------------------------------------

def record_sync_range(conn: psycopg.Connection, run_id: str, result: IncrementResult) -> None:
    """The increment's range on Kommo's clock, on its run record."""
    conn.execute("UPDATE kommo_import_runs SET sync_from = %s, sync_to = %s WHERE id = %s",
                 (result.sync_from, result.sync_to, run_id))


def record_drift(conn: psycopg.Connection, run_id: str, drift: int) -> None:
    """The dry run's drift (rows a full swap would still change after the increments) on its run record."""
    conn.execute("UPDATE kommo_import_runs SET stats = stats || jsonb_build_object('drift', %s::int) WHERE id = %s",
                 (drift, run_id))


def record_idle_tick(conn: psycopg.Connection, probe: Probe) -> bool:
    """A probe that found nothing changed since the windows' coverage proves production was up to date when it
    asked: that is recorded as ``kommo_sync_state.updated_at`` (what keeps an idle day fresh). The coverage
    stays where it is, so a change a spurious empty answer hid is found by the next tick. False when the
    probe found a change."""
    if probe.anything:
        return False
    with conn.transaction():
        conn.execute("INSERT INTO kommo_sync_state AS s (updated_at) VALUES (now()) ON CONFLICT (singleton)"
                     " DO UPDATE SET updated_at = EXCLUDED.updated_at")
    return True


_COVERED_AT = """
SELECT greatest(
    (SELECT updated_at FROM kommo_sync_state),
    (SELECT max(finished_at) FROM kommo_import_runs WHERE status = 'succeeded' AND kind IN ('full_refresh', 'increment'))),
    now()
"""


def covered_at(conn: psycopg.Connection) -> tuple[datetime | None, datetime]:
    """When a successful sync, an idle probe or a full refresh last brought production up to date, and the
    database's clock now (the two compared on one clock)."""
    with conn.transaction():
        covered, now = conn.execute(_COVERED_AT).fetchone()
    return covered, now


_LAST_INCREMENTS = """
SELECT id::text, status, finished_at, now() AS now,
       finished_at > coalesce((SELECT max(finished_at) FROM kommo_import_runs
                                WHERE kind = 'full_refresh' AND status = 'succeeded'), '-infinity') AS since_refresh
  FROM kommo_import_runs
 WHERE kind = 'increment' AND status <> 'running'
 ORDER BY finished_at DESC LIMIT 20
"""
# The windows a held increment touched that no full refresh has succeeded for since it stopped.
_UNREFRESHED = """
SELECT w.created_from, w.created_to
  FROM kommo_increment_changes_by_window(%(r)s::uuid, %(froms)s::timestamptz[], %(tos)s::timestamptz[]) w
 WHERE NOT EXISTS (SELECT 1 FROM kommo_import_runs f
                    WHERE f.kind = 'full_refresh' AND f.status = 'succeeded' AND f.finished_at > %(at)s
                      AND f.created_from = w.created_from AND f.created_to = w.created_to)
 ORDER BY 1
"""
MAX_BACKOFF_S = 3600.0


def sync_hold(conn: psycopg.Connection, interval_s: float, windows: Sequence[Window]) -> str | None:
    """Why the sensor must not start an increment now:

    * the last increment stopped as ``needs_review``: until an operator re-runs the sync with a higher
      ``KOMMO_SYNC_MAX_DEACTIVATIONS``, or a full refresh of each window (of ``windows``) it would have
      changed succeeds; a refresh of another year lifts nothing;
    * the last increments failed since the last success or full refresh: a backoff that doubles with each
      failure, so a revoked token does not start a run, and an alert, every tick."""
    with conn.transaction():
        rows = conn.execute(_LAST_INCREMENTS).fetchall()
    if not rows:
        return None
    run_id, status, finished_at, now, _ = rows[0]
    if status == "needs_review":
        arrays = {"r": run_id, "at": finished_at, **window_params(windows)}
        with conn.transaction():
            waiting = [Window(*row).key for row in conn.execute(_UNREFRESHED, arrays).fetchall()]
        if waiting:
            return (f"the last increment (finished {finished_at.isoformat()}) stopped as needs_review: start "
                    "kommo_incremental_sync_job with a higher KOMMO_SYNC_MAX_DEACTIVATIONS, or run a full "
                    f"refresh of {', '.join(waiting)}, to go on")
        return None
    failures = 0
    for _, row_status, _, _, since_refresh in rows:
        if row_status != "failed" or not since_refresh:
            break
        failures += 1
    if not failures:
        return None
    wait = min(interval_s * 2 ** (failures - 1), MAX_BACKOFF_S)
    resume = finished_at + timedelta(seconds=wait)
    if now < resume:
        return (f"the last {failures} increment(s) failed; the next attempt waits until {resume.isoformat()}")
    return None


def import_running(conn: psycopg.Connection) -> str | None:
    """The id of a Kommo import the database says is running (a run launched outside this instance too) and
    whose process is alive: one whose owner is gone (killed, host lost) holds no owner lock any more, and the
    next run's start closes it (the test ``start_kommo_import_run`` applies, ``kommo_import_run_owner_alive``)."""
    with conn.transaction():
        row = conn.execute("SELECT id FROM kommo_import_runs WHERE status = 'running'"
                           " AND kommo_import_run_owner_alive(id) LIMIT 1").fetchone()
    return None if row is None else str(row[0])
