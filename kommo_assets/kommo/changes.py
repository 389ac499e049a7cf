"""Change tracking: what changed in the account since a moment on Kommo's clock, for an incremental sync.

* Changed leads: ``GET /api/v4/leads`` by ``filter[updated_at][from]``, ``order[updated_at]=asc``, keyset-paged
  exactly as the full export pages ``created_at`` (:class:`KeysetPaging` over an open-ended ``updated_at``
  range), ``with=contacts,catalog_elements``, every status (143 too: a lead lost since is archived).
* Deleted, restored and relinked leads: the events feed, ``GET /api/v4/events`` with ``filter[type]=lead_deleted,
  lead_restored,entity_linked,entity_unlinked`` (a restoration or a relink may leave ``updated_at`` as it was). Not ``with=only_deleted``: that lists the trash, and a lead emptied from the trash (or
  deleted for good at once) is in no list any more, so a sync reading the trash would never learn that
  it is gone. The events feed keeps the deletion whatever becomes of the lead afterwards.
* Changed contacts: ``GET /api/v4/contacts`` by ``filter[updated_at][from]``, keyset-paged the same way (a
  contact edit does not touch its leads' ``updated_at``).
* The probe: whether anything changed since a moment that a sync has not read yet, in at most 3 requests.

Every feed believes an empty answer only after asking twice (:func:`~kommo_assets.kommo.transport.confirmed`),
except the probe, whose budget is 3 requests and whose empty answer moves no cursor.

Kommo silently ignores filters it does not understand, so everything is re-checked here: the key in range,
``is_deleted``, the event's type, entity and time. The clock is Kommo's own: the ``Date`` header of its
answers (:attr:`ChangeTracker.clock`), never this machine's.
"""

from __future__ import annotations

import itertools
import json
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kommo_assets.kommo.contacts import CONTACTS_PATH
from kommo_assets.kommo.errors import KommoResponseError
from kommo_assets.kommo.fanout import Plan, fan_out
from kommo_assets.kommo.fields import extract_kommo_epoch, positive_int
from kommo_assets.kommo.paging import LEADS_PATH, KeyRange, KeysetPaging, LeadPage, PageRequest, ceil_epoch
from kommo_assets.kommo.responses import ListPage, read_list
from kommo_assets.kommo.transport import Transport, confirmed

EVENTS_PATH = "/api/v4/events"
EVENTS_PAGE_SIZE = 100  # Kommo's cap on the events feed's `limit`
LEAD_DELETED = "lead_deleted"
LEAD_RESTORED = "lead_restored"
REMOVAL_EVENTS = (LEAD_DELETED, LEAD_RESTORED)
# A contact linked to or unlinked from a lead (a relink of its main contact, a merge of contacts): Kommo does
# not document that these move the lead's updated_at, so the changed-leads feed may never list the lead.
LINK_EVENTS = ("entity_linked", "entity_unlinked")
LEAD_EVENTS = (*REMOVAL_EVENTS, *LINK_EVENTS)
# A feed that keeps sending events beyond this many pages is not honouring its filters.
MAX_EVENT_PAGES = 10_000
# The probe's budget: each of its at most 3 requests gives up after this long, with no retry and no
# Retry-After wait (the sensor skips the tick instead), so a probe ends within 10 s.
PROBE_TIMEOUT_S = 3.0
PROBE_MAX_LEADS = 250  # Kommo's cap on `limit` for leads and contacts


@dataclass(frozen=True)
class LeadEvent:
    """A deletion or restoration of one lead, read from the events feed."""

    lead_id: int
    type: str  # one of LEAD_EVENTS
    created_at: datetime
    id: str = ""  # Kommo's event id

    @property
    def order(self) -> tuple[datetime, int, str]:
        """Which of two events came later: the later second, and within one second the greater id. Kommo's
        ids grow with time (ULID-shaped strings of one length: time first, then a sequence; numbers in older
        accounts: longer is greater), while the feed's order within one second is not documented."""
        return self.created_at, len(self.id), self.id


def latest_by_lead(events: Iterable[LeadEvent]) -> dict[int, LeadEvent]:
    """Each lead's newest deletion or restoration (:attr:`LeadEvent.order`), whatever the feed's order; link
    events decide nothing here."""
    newest: dict[int, LeadEvent] = {}
    for event in events:
        if event.type not in REMOVAL_EVENTS:
            continue
        known = newest.get(event.lead_id)
        if known is None or event.order > known.order:
            newest[event.lead_id] = event
    return newest


@dataclass
class Seen:
    """What a sync read of the changes stamped at or after ``since`` (epoch seconds): leads and contacts by id
    with their ``updated_at``, lead events by id with their ``created_at``. The probe compares the feeds with it, so a change the sync
    already applied does not start another run, while one that came in after it (a late stamp, a record
    changed again) does. A record changed again within the second of the version the sync read carries the
    same stamp: its version (:func:`version`) tells the two apart."""

    since: int
    leads: dict[int, int] = field(default_factory=dict)
    contacts: dict[int, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    # The version of each lead and contact read (:func:`version`), by "leads:<id>" / "contacts:<id>": two
    # versions of a record stamped in the same second (a late stamp, an index that lagged) have one
    # updated_at, so the stamp alone cannot tell the probe that the second is new.
    versions: dict[str, int] = field(default_factory=dict)

    def note(self, kind: str, record: dict) -> None:
        """Notes the ``updated_at`` and version of a lead or contact (``kind``: "leads" or "contacts") a feed
        listed (the newest stamp if listed twice)."""
        record_id = positive_int(record.get("id"))
        moment = extract_kommo_epoch(record.get("updated_at"))
        if record_id is None or moment is None:
            return
        stamps: dict[int, int] = getattr(self, kind)
        stamp = int(moment.timestamp())
        if stamp >= stamps.get(record_id, stamp):
            stamps[record_id] = stamp
            self.versions[f"{kind}:{record_id}"] = version(record)

    def as_json(self) -> dict:
        return {"since": self.since, "leads": sorted(self.leads.items()), "contacts": sorted(self.contacts.items()),
                "events": sorted(self.events.items()), "versions": sorted(self.versions.items())}

    @classmethod
    def from_json(cls, data: object) -> Seen | None:
        """The record :meth:`as_json` wrote; None for anything else (a run that recorded none)."""
        if not isinstance(data, dict) or not isinstance(data.get("since"), int):
            return None
        try:
            return cls(data["since"], {int(i): int(s) for i, s in data.get("leads", [])},
                       {int(i): int(s) for i, s in data.get("contacts", [])},
                       {str(i): int(s) for i, s in data.get("events", [])},
                       {str(k): int(v) for k, v in data.get("versions", [])})
        except (TypeError, ValueError):
            return None


@dataclass
class Probe:
    """The answer to "did anything change since ``since``": what changed (empty: nothing), Kommo's clock
    at its first answer, and how many requests it took."""

    since: datetime  # the cursor
    changed: list[str] = field(default_factory=list)  # "leads", "contacts", "lead_events"
    clock: datetime | None = None
    requests: int = 0
    asked_from: datetime | None = None  # the cursor less the margin a sync re-reads (what it compared with)

    @property
    def anything(self) -> bool:
        return bool(self.changed)


# What a version covers: the fields of a lead or contact the import reads. Not the embeds (the probe asks
# without the ones a sync reads; a relink is an event of its own), not `_links` (they repeat each request's
# query string), and not what Kommo may change without moving updated_at that the import never reads
# (closest_task_at, score, ...): such a change would start a run that applies nothing.
VERSIONED_FIELDS = ("id", "name", "first_name", "last_name", "price", "status_id", "pipeline_id",
                    "responsible_user_id", "created_at", "updated_at", "closed_at", "is_deleted",
                    "custom_fields_values")


def version(record: dict) -> int:
    """A record's version as the import reads it: a checksum of :data:`VERSIONED_FIELDS`."""
    body = {k: record.get(k) for k in VERSIONED_FIELDS}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode())


def _epoch(moment: datetime) -> int:
    return ceil_epoch(moment)


class ChangeTracker:
    """The change-tracking reads of one account, over the client's transport: one pace, one retry policy,
    the same errors as the full export (a 429 or 5xx retried, a 401/403 at once)."""

    def __init__(self, transport: Transport, *, page_size: int, max_in_flight: int,
                 lead_paging: Callable[[KeyRange, Iterable[int]], KeysetPaging],
                 ask_leads: Callable[[PageRequest, threading.Event], ListPage | None]) -> None:
        self._transport = transport
        self._page_size = page_size
        self._max_in_flight = max_in_flight
        self._lead_paging = lead_paging
        self._ask_leads = ask_leads

    @property
    def clock(self) -> datetime | None:
        """Kommo's clock at its first answer on this client (the HTTP ``Date`` header), cross-checked as
        :attr:`KommoClient.kommo_clock` is; None before any."""
        return self._transport.earliest_answer_date

    # --- leads --------------------------------------------------------------------------------------

    def changed_lead_pages(self, since: datetime) -> Iterator[LeadPage]:
        """Every lead updated at or after ``since`` (whole seconds), any status, not deleted, as pages that
        complete one after another (one keyset chain: an open-ended range)."""
        paging = self._lead_paging(KeyRange.between("updated_at", since, None), ())
        return fan_out(Plan(leads=paging, ask_leads=self._ask_leads), self._max_in_flight, "kommo-changes")

    def lead_events(self, since: datetime, links_since: datetime | None = None) -> list[LeadEvent]:
        """Every lead deletion or restoration since ``since`` and every relink (:data:`LINK_EVENTS`) since
        ``links_since`` (None: none), from the events feed, each once (:func:`latest_by_lead` says which one
        decides a lead). One read when both start in the same second (the usual case), else one each: a window
        read whole needs no relinks, and its deletions go back to its first second.

        The feed lists the newest first and is paged by offset: an event recorded while it is read pushes
        the others down, so one may come twice (it is kept once) but none is skipped; one recorded after
        the first page was read is left to the next sync, whose range starts before it. An empty page is
        asked twice before it is believed. Paging stops at the first event older than ``since`` too, in
        case Kommo ignored ``filter[created_at]``.
        """
        start = _epoch(since)
        events: dict[str, LeadEvent] = {}
        if links_since is None:
            reads = [(start, REMOVAL_EVENTS)]
        elif _epoch(links_since) <= start:
            reads = [(start, LEAD_EVENTS)]
        else:
            reads = [(start, REMOVAL_EVENTS), (_epoch(links_since), LINK_EVENTS)]
        for read_start, types in reads:
            self._read_events(read_start, types, events)
        return list(events.values())

    def _read_events(self, start: int, types: tuple[str, ...], events: dict[str, LeadEvent]) -> None:
        """The events of ``types`` from ``start`` on, into ``events`` by id."""
        for page in itertools.count(1):
            if page > MAX_EVENT_PAGES:
                raise KommoResponseError(
                    f"Kommo kept sending events beyond {MAX_EVENT_PAGES} pages on GET {EVENTS_PATH}: it seems "
                    "to ignore the feed's filters; the sync cannot tell which leads were deleted.",
                    method="GET", path=EVENTS_PATH, page=page,
                )
            answer = confirmed(lambda page=page: self._ask_events(start, types, page),
                               f"GET {EVENTS_PATH} page {page}")
            if answer is None:
                break
            older = False
            for item in answer.items:
                event = _lead_event(item)
                if event is None or event.type not in types:
                    continue
                if event.created_at.timestamp() < start:
                    older = True
                    continue
                events.setdefault(event.id, event)
            if answer.ends_range or older:
                break

    def _ask_events(self, start: int, types: tuple[str, ...], page: int) -> ListPage | None:
        """One page of the lead events of ``types`` from ``start``; None when it lists none (204 or empty)."""
        params = _event_params(start, limit=EVENTS_PAGE_SIZE, types=types) + [("page", str(page))]
        body = self._transport.get(EVENTS_PATH, params, page=page)
        if body is None:
            return None
        answer = read_list(body, "events", EVENTS_PATH, page, EVENTS_PAGE_SIZE)
        return answer if answer.items else None

    # --- contacts -----------------------------------------------------------------------------------

    def changed_contact_pages(self, since: datetime) -> Iterator[LeadPage]:
        """Every contact updated at or after ``since``, keyset-paged by ``updated_at`` as leads are; each
        page's ``leads`` holds contacts (the paging is the leads', the path is the contacts')."""
        paging = KeysetPaging(KeyRange.between("updated_at", since, None), limit=self._page_size, chains=1)
        return fan_out(Plan(leads=paging, ask_leads=self._ask_contacts), self._max_in_flight,
                       "kommo-contact-changes")

    def _ask_contacts(self, request: PageRequest, cancel: threading.Event) -> ListPage | None:
        body = self._transport.get(CONTACTS_PATH, request.params, page=request.number, cancel=cancel)
        if body is None:
            return None
        answer = read_list(body, "contacts", CONTACTS_PATH, request.number, self._page_size)
        return answer if answer.items else None

    # --- the probe ----------------------------------------------------------------------------------

    def probe(self, cursor: datetime, *, margin_s: int = 0, seen: Seen | None = None) -> Probe:
        """Whether anything changed that the last sync has not read, in at most 3 requests, stopping at the
        first that says yes: the most recently updated leads, the most recently updated contacts, the newest
        lead deletions or restorations.

        With ``seen`` (what the last sync read, see :class:`Seen`) it asks from ``cursor`` less ``margin_s``
        (the margin a sync re-reads: a change stamped late, inside it, is found), as many items of each feed
        as the sync read there plus one, and counts only what the sync did not read. Without it, it asks for
        one item of each from ``cursor`` itself. Each item is re-checked against the range here, so a server
        that ignored the filter (and listed the newest item anyway) still answers right. Not asked twice on
        a 204 (the budget is 3): a spurious one hides a change for one tick only, since an idle tick leaves
        the cursor where it is."""
        start = _epoch(cursor)
        if seen is not None and seen.since <= start:
            start = max(start - max(0, int(margin_s)), seen.since)
        else:
            seen = None
        result = Probe(since=cursor, asked_from=datetime.fromtimestamp(start, UTC))
        before = self._transport.stats.requests
        known = seen or Seen(start)
        checks = (
            ("leads", LEADS_PATH, "leads", "updated_at", _read_since(known.leads, start), PROBE_MAX_LEADS),
            ("contacts", CONTACTS_PATH, "contacts", "updated_at", _read_since(known.contacts, start),
             PROBE_MAX_LEADS),
            ("lead_events", EVENTS_PATH, "events", "created_at", _read_since(known.events, start),
             EVENTS_PAGE_SIZE),
        )
        for name, path, key, stamp, read, cap in checks:
            limit = min(cap, len(read) + 1)
            if name == "lead_events":
                params = _event_params(start, limit=limit)
            else:
                params = [("limit", str(limit)), (f"filter[{stamp}][from]", str(start)),
                          (f"order[{stamp}]", "desc")]
            body = self._transport.get(path, params)
            if result.clock is None:
                result.clock = self._transport.last_answer_date
            if body is None:
                continue
            items = read_list(body, key, path, 1, None).items
            fresh = [item for item in items if _stamped_since(item, stamp, start) and _counts(item, name)
                     and not _was_read(item, name, stamp, read, known.versions)]
            # A full page of what the sync read when it read as much as a page holds: the rest is unknown.
            if fresh or (len(read) >= cap and len(items) >= limit):
                result.changed.append(name)
                break
        result.requests = self._transport.stats.requests - before
        return result


def _read_since(stamps: dict, start: int) -> dict:
    return {item_id: stamp for item_id, stamp in stamps.items() if stamp >= start}


def _was_read(item: dict, name: str, stamp: str, read: dict, versions: dict[str, int]) -> bool:
    """Whether the last sync read this very item: the same event, or the same record with the same stamp and
    (when the sync recorded it) the same version."""
    if name == "lead_events":
        event = _lead_event(item)
        return event is not None and event.id in read
    moment = extract_kommo_epoch(item.get(stamp))
    item_id = positive_int(item.get("id"))
    if moment is None or item_id is None or read.get(item_id) != int(moment.timestamp()):
        return False
    known = versions.get(f"{name}:{item_id}")
    return known is None or known == version(item)


def touched_by_events(events: Iterable[LeadEvent]) -> dict[int, int]:
    """The leads whose current state the events say to read again, though their ``updated_at`` may not have
    moved: restored (their newest removal event) or relinked, and not deleted; each with the epoch second of
    its newest such event."""
    events = list(events)
    newest = latest_by_lead(events)
    touched: dict[int, int] = {}
    for event in events:
        if event.type in LINK_EVENTS or (event.type == LEAD_RESTORED and newest[event.lead_id] is event):
            at = int(event.created_at.timestamp())
            touched[event.lead_id] = max(at, touched.get(event.lead_id, at))
    return {lead_id: at for lead_id, at in touched.items()
            if lead_id not in newest or newest[lead_id].type != LEAD_DELETED}


def _event_params(start: int, *, limit: int, types: tuple[str, ...] = LEAD_EVENTS) -> list[tuple[str, str]]:
    return [("filter[type]", ",".join(types)), ("filter[entity]", "lead"),
            ("filter[created_at][from]", str(start)), ("limit", str(limit))]


def _stamped_since(item: object, key: str, start: int) -> bool:
    if not isinstance(item, dict):
        return False
    moment = extract_kommo_epoch(item.get(key))
    return moment is not None and moment.timestamp() >= start


def _counts(item: dict, name: str) -> bool:
    """Whether a probed item is a change the sync would act on (an event of another type, a lead marked
    deleted in a list, a record without a readable id, are not: the sync skips them, so they would start a run
    on every tick)."""
    if name == "lead_events":
        return _lead_event(item) is not None
    return item.get("is_deleted") is not True and positive_int(item.get("id")) is not None


def _lead_event(event: object) -> LeadEvent | None:
    """A lead's deletion, restoration or link change, with its id; None for anything else or unreadable."""
    if not isinstance(event, dict):
        return None
    kind = event.get("type")
    lead_id = positive_int(event.get("entity_id"))
    created = extract_kommo_epoch(event.get("created_at"))
    if kind not in LEAD_EVENTS or event.get("entity_type") not in (None, "lead") or lead_id is None \
            or created is None:
        return None
    event_id = event.get("id")
    event_id = str(event_id) if event_id is not None else f"{kind}:{lead_id}:{int(created.timestamp())}"
    return LeadEvent(lead_id, kind, created.astimezone(UTC), event_id)
