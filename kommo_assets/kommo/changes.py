"""Change tracking: what changed in the account since a moment on Kommo's clock, for an incremental sync.

* Changed leads: ``GET /api/v4/leads`` by ``filter[updated_at][from]``, ``order[updated_at]=asc``, keyset-paged
  exactly as the full export pages ``created_at`` (:class:`KeysetPaging` over an open-ended ``updated_at``
  range), ``with=contacts,catalog_elements``, every status (143 too: a lead lost since is archived).
* Deleted and restored leads: the events feed, ``GET /api/v4/events`` with ``filter[type]=lead_deleted,
  lead_restored``. Not ``with=only_deleted``: that lists the trash, and a lead emptied from the trash (or
  deleted for good at once) is in no list any more, so a sync reading the trash would never learn that
  it is gone. The events feed keeps the deletion whatever becomes of the lead afterwards.
* Changed contacts: ``GET /api/v4/contacts`` by ``filter[updated_at][from]``, keyset-paged the same way (a
  contact edit does not touch its leads' ``updated_at``).
* The probe: whether anything changed since a moment, in at most 3 requests of one item each.

Kommo silently ignores filters it does not understand, so everything is re-checked here: the key in range,
``is_deleted``, the event's type, entity and time. The clock is Kommo's own: the ``Date`` header of its
answers (:attr:`ChangeTracker.clock`), never this machine's.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kommo_assets.kommo.contacts import CONTACTS_PATH
from kommo_assets.kommo.errors import KommoResponseError
from kommo_assets.kommo.fanout import Plan, fan_out
from kommo_assets.kommo.fields import extract_kommo_epoch, positive_int
from kommo_assets.kommo.paging import LEADS_PATH, KeyRange, KeysetPaging, LeadPage, PageRequest, ceil_epoch
from kommo_assets.kommo.responses import ListPage, read_list
from kommo_assets.kommo.transport import Transport

EVENTS_PATH = "/api/v4/events"
EVENTS_PAGE_SIZE = 100  # Kommo's cap on the events feed's `limit`
LEAD_DELETED = "lead_deleted"
LEAD_RESTORED = "lead_restored"
REMOVAL_EVENTS = (LEAD_DELETED, LEAD_RESTORED)
# A feed that keeps sending events beyond this many pages is not honouring its filters.
MAX_EVENT_PAGES = 10_000


@dataclass(frozen=True)
class LeadEvent:
    """The newest deletion or restoration of one lead seen in the events feed."""

    lead_id: int
    type: str  # LEAD_DELETED or LEAD_RESTORED
    created_at: datetime


@dataclass
class Probe:
    """The answer to "did anything change since ``since``": what changed (empty: nothing), Kommo's clock
    at its first answer, and how many requests it took."""

    since: datetime
    changed: list[str] = field(default_factory=list)  # "leads", "contacts", "lead_events"
    clock: datetime | None = None
    requests: int = 0

    @property
    def anything(self) -> bool:
        return bool(self.changed)


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
        """Kommo's clock at its first answer on this client (the HTTP ``Date`` header); None before any."""
        return self._transport.first_answer_date

    # --- leads --------------------------------------------------------------------------------------

    def changed_lead_pages(self, since: datetime) -> Iterator[LeadPage]:
        """Every lead updated at or after ``since`` (whole seconds), any status, not deleted, as pages that
        complete one after another (one keyset chain: an open-ended range)."""
        paging = self._lead_paging(KeyRange.between("updated_at", since, None), ())
        return fan_out(Plan(leads=paging, ask_leads=self._ask_leads), self._max_in_flight, "kommo-changes")

    def lead_events(self, since: datetime) -> dict[int, LeadEvent]:
        """The newest deletion or restoration of each lead since ``since``, from the events feed.

        The feed lists the newest first and is paged by offset: an event recorded while it is read pushes
        the others down, so one may come twice (it is counted once) but none is skipped; one recorded after
        the first page was read is left to the next sync, whose range starts before it. Paging stops at the
        first event older than ``since`` too, in case Kommo ignored ``filter[created_at]``.
        """
        start = _epoch(since)
        newest: dict[int, LeadEvent] = {}
        seen: set[str] = set()
        for page in itertools.count(1):
            if page > MAX_EVENT_PAGES:
                raise KommoResponseError(
                    f"Kommo kept sending events beyond {MAX_EVENT_PAGES} pages on GET {EVENTS_PATH}: it seems "
                    "to ignore the feed's filters; the sync cannot tell which leads were deleted.",
                    method="GET", path=EVENTS_PATH, page=page,
                )
            params = _event_params(start, limit=EVENTS_PAGE_SIZE) + [("page", str(page))]
            body = self._transport.get(EVENTS_PATH, params, page=page)
            if body is None:
                break
            answer = read_list(body, "events", EVENTS_PATH, page, EVENTS_PAGE_SIZE)
            older = False
            for event in answer.items:
                parsed = _lead_event(event)
                if parsed is None:
                    continue
                event_id, lead_event = parsed
                if lead_event.created_at.timestamp() < start:
                    older = True
                    continue
                if event_id in seen:
                    continue
                seen.add(event_id)
                # Newest first: the first event of a lead is its latest.
                newest.setdefault(lead_event.lead_id, lead_event)
            if answer.ends_range or older:
                break
        return newest

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

    def probe(self, since: datetime) -> Probe:
        """Whether anything changed at or after ``since``, in at most 3 requests of one item each, stopping
        at the first that says yes: the most recently updated lead, the most recently updated contact, the
        newest lead deletion or restoration. Each is re-checked against ``since`` here, so a server that
        ignored the filter (and listed the newest item anyway) still answers right."""
        start = _epoch(since)
        result = Probe(since=since)
        before = self._transport.stats.requests
        newest = [("limit", "1"), ("filter[updated_at][from]", str(start)), ("order[updated_at]", "desc")]
        checks = (
            ("leads", LEADS_PATH, newest, "leads", "updated_at"),
            ("contacts", CONTACTS_PATH, newest, "contacts", "updated_at"),
            ("lead_events", EVENTS_PATH, _event_params(start, limit=1), "events", "created_at"),
        )
        for name, path, params, key, stamp in checks:
            # Not asked twice on a 204 (the budget is 3): a spurious one hides a change for one tick only,
            # since an idle tick leaves the cursor where it is.
            body = self._transport.get(path, params)
            if result.clock is None:
                result.clock = self._transport.last_answer_date
            if body is None:
                continue
            items = read_list(body, key, path, 1, None).items
            if any(_stamped_since(item, stamp, start) and _counts(item, name) for item in items):
                result.changed.append(name)
                break
        result.requests = self._transport.stats.requests - before
        return result


def _event_params(start: int, *, limit: int) -> list[tuple[str, str]]:
    return [("filter[type]", ",".join(REMOVAL_EVENTS)), ("filter[entity]", "lead"),
            ("filter[created_at][from]", str(start)), ("limit", str(limit))]


def _stamped_since(item: object, key: str, start: int) -> bool:
    if not isinstance(item, dict):
        return False
    moment = extract_kommo_epoch(item.get(key))
    return moment is not None and moment.timestamp() >= start


def _counts(item: dict, name: str) -> bool:
    """Whether a probed item is a change the sync would act on (an event of another type is not)."""
    return name != "lead_events" or _lead_event(item) is not None


def _lead_event(event: object) -> tuple[str, LeadEvent] | None:
    """(event id, the event) of a lead deletion or restoration; None for anything else or unreadable."""
    if not isinstance(event, dict):
        return None
    kind = event.get("type")
    lead_id = positive_int(event.get("entity_id"))
    created = extract_kommo_epoch(event.get("created_at"))
    if kind not in REMOVAL_EVENTS or event.get("entity_type") not in (None, "lead") or lead_id is None \
            or created is None:
        return None
    event_id = event.get("id")
    event_id = str(event_id) if event_id is not None else f"{kind}:{lead_id}:{int(created.timestamp())}"
    return event_id, LeadEvent(lead_id, kind, created.astimezone(UTC))
