"""The Kommo API v4 client: a small facade over the transport, keyset paging, contact batching and the
fan-out, for a full export of leads.

Free of Dagster: a resource wraps it. It follows Kommo's real behaviour: 204 for empty results, short
last pages, a ``_links.next`` that may be sent on the last page too, filters that are silently
ignored, 7 requests/s with HTML 429s and usually no Retry-After, 403 for blocked accounts.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from kommo_assets.kommo.changes import ChangeTracker
from kommo_assets.kommo.contacts import (
    ContactBatch,
    ContactBatching,
    distinct_batches,
    fetch_by_ids,
    fetch_contacts,
)
from kommo_assets.kommo.errors import KommoResponseError
from kommo_assets.kommo.fanout import LEAD_CHAINS, Plan, SnapshotStream, fan_out
from kommo_assets.kommo.fields import positive_int
from kommo_assets.kommo.pacing import DEFAULT_MAX_RPS
from kommo_assets.kommo.paging import LEADS_PATH, KeyRange, KeysetPaging, LeadPage, PageRequest
from kommo_assets.kommo.responses import ListPage, read_list
from kommo_assets.kommo.transport import ClientStats, Transport

logger = logging.getLogger("kommo_assets.kommo")

MAX_PAGE_SIZE = 250  # Kommo's hard cap on `limit`
LOST_STATUS_ID = 143  # "Closed - lost", present in every pipeline
LEAD_EMBEDS = ("with", "contacts,catalog_elements")


@dataclass
class FieldOptions:
    """The enum options (``enum_id -> value``) of one select lead field (:meth:`KommoClient.field_enums`)."""

    field_id: int
    options: dict[int, str]


class KommoClient:
    """A paced, retrying client for the parts of Kommo API v4 the import needs.

    One instance holds one :class:`Transport`: a keep-alive session (a pool of at least ``max_in_flight``
    connections) and one pacer, so every attempt of every request, from any thread, takes a slot at
    ``max_rps``, right before it is written: any ``ceil(max_rps) + 1`` consecutive sends span at least
    ``ceil(max_rps)/max_rps`` seconds on the wire (at 6.9/s: never 8 sends within 1.0145 s). Lists are
    fetched by up to ``max_in_flight`` threads at once within that pace.

    Retries, ``Retry-After`` and errors: see :mod:`kommo_assets.kommo.transport` (``max_retries`` retries
    after the first attempt; a ``Retry-After`` beyond 300 s fails at once). A 204 that would end a list
    or say "not found" is asked once more before it is believed. The access token goes only into the
    ``Authorization`` header and is redacted from every message.
    """

    def __init__(
        self,
        base_url: str,
        access_token: str,
        *,
        max_rps: float = DEFAULT_MAX_RPS,
        max_in_flight: int = 6,
        timeout: float = 30.0,
        max_retries: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        page_size: int = 250,
    ) -> None:
        base_url = (base_url or "").strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", base_url):
            raise ValueError(f"base_url must look like https://<subdomain>.kommo.com, got {base_url!r}")
        if not access_token or not access_token.strip():
            raise ValueError("access_token is empty: set KOMMO_ACCESS_TOKEN to a long-lived Kommo token")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}, got {page_size}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.base_url = base_url
        self.max_rps = max_rps
        self.max_in_flight = max_in_flight
        self.page_size = page_size
        self._transport = Transport(
            base_url, access_token.strip(), max_rps=max_rps, pool_size=max(max_in_flight, 10),
            timeout=timeout, max_retries=max_retries, backoff_base=backoff_base, backoff_max=backoff_max,
        )

    def __repr__(self) -> str:
        return (
            f"KommoClient(base_url={self.base_url!r}, access_token=<redacted>, max_rps={self.max_rps}, "
            f"max_in_flight={self.max_in_flight})"
        )

    def close(self) -> None:
        """Closes the session; requests still waiting for a slot or a backoff give up."""
        self._transport.close()

    def __enter__(self) -> KommoClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def stats(self) -> ClientStats:
        return self._transport.stats

    @property
    def kommo_clock(self) -> datetime | None:
        """Kommo's clock at its first answer to this client (the HTTP ``Date`` header), cross-checked with
        the later ones: the earliest ``Date`` of its answers so far, so one answer from a proxy whose clock
        is ahead of Kommo's servers cannot move a cursor taken from it past changes. None before any."""
        return self._transport.earliest_answer_date

    # --- leads ------------------------------------------------------------------------------------

    def iter_lead_pages(
        self,
        created_from: datetime,
        created_to: datetime,
        *,
        exclude_status_ids: Iterable[int] = frozenset({LOST_STATUS_ID}),
    ) -> Iterator[LeadPage]:
        """Yields every page of leads created in the half-open window [created_from, created_to).

        Naive datetimes are taken as UTC. The window is read in time slices by keyset paging
        (``filter[created_at][from]=<cursor>``, ``[to]=<slice end - 1>``, Kommo's range being inclusive
        and in seconds, ``order[created_at]=asc``), up to ``LEAD_CHAINS`` slices at once, so a lead that
        exists throughout the export is listed once whatever is deleted, restored or added meanwhile (see
        :class:`KeysetPaging`). Since Kommo silently ignores filters it does not understand, each lead is
        re-checked here (window, status not in ``exclude_status_ids``, not ``is_deleted``); a server that
        ignores the range or the order is refused (:class:`KommoResponseError`), as keyset paging would
        be unsafe. A lead repeated on one page is yielded once (its most recently updated copy); a lead
        whose newer version Kommo lists again at the cursor is yielded again (the caller keeps the newer
        copy: staging merges on the lead id).

        Pages are yielded **as they complete, so not in window order**. At most about
        ``2 * max_in_flight`` pages are held in memory. Closing the iterator early (``break``) cancels
        what is pending and joins the threads; a page that fails after retries raises from the iterator.
        The window is checked at once (a ValueError when it is empty); nothing is requested until the
        first ``next()``.
        """
        window = KeyRange.between("created_at", created_from, created_to)
        return self.read_leads(self.lead_paging(window, exclude_status_ids))

    def read_leads(self, paging: KeysetPaging) -> Iterator[LeadPage]:
        """Yields the pages of ``paging`` as they complete, as :meth:`iter_lead_pages` does."""
        return fan_out(Plan(leads=paging, ask_leads=self._ask_leads), self.max_in_flight, "kommo-leads")

    def lead_paging(self, keys: KeyRange, exclude_status_ids: Iterable[int] = frozenset({LOST_STATUS_ID})
                    ) -> KeysetPaging:
        """The keyset paging of the leads in ``keys``, as this client reads them (its page size, chains)."""
        return KeysetPaging(keys, limit=self.page_size, chains=min(LEAD_CHAINS, self.max_in_flight),
                            excluded=frozenset(int(status) for status in exclude_status_ids),
                            params=[LEAD_EMBEDS])

    def _ask_leads(self, request: PageRequest, cancel: threading.Event) -> ListPage | None:
        """One answer to a lead request; None when it lists no leads (a 204 or an empty list)."""
        body = self._transport.get(LEADS_PATH, request.params, page=request.number, cancel=cancel)
        if body is None:
            return None
        answer = read_list(body, "leads", LEADS_PATH, request.number, self.page_size)
        return answer if answer.items else None

    def leads_by_id(self, lead_ids: Iterable[int], *, batch_size: int = 250) -> Iterator[list[dict]]:
        """The leads of ``lead_ids`` that exist (deleted ones are absent), one list per batch of up to
        ``batch_size`` distinct ids, each ``GET /api/v4/leads?filter[id][]=...`` with the embeds of every lead
        read (contacts, catalog elements), one batch after another: the sync asks for a few leads an event
        named (a restoration, a relink) that the changed-leads feed did not list."""
        for ids in distinct_batches(lead_ids, batch_size):
            yield fetch_by_ids(self._transport, LEADS_PATH, "leads", ids, self.page_size, params=[LEAD_EMBEDS])

    # --- contacts ---------------------------------------------------------------------------------

    def iter_contact_batches(
        self, contact_ids: Iterable[int], *, batch_size: int = 250
    ) -> Iterator[list[dict]]:
        """Yields the contacts for ``contact_ids``, one list per batch of ids.

        ``contact_ids`` is read lazily, as batches are needed (a server-side cursor can feed it), and
        cut into batches of ``batch_size`` distinct ids: None and anything that is not a positive
        integer is ignored and an id repeated within a batch is asked once, so ``main_contact_id``
        results can be passed as they are. Nothing remembers ids across batches (memory stays flat):
        pass distinct ids, e.g. from ``SELECT DISTINCT``, for every id to be asked exactly once. Each
        batch is ``GET /api/v4/contacts?filter[id][]=...`` paged until a 204, a short page, or every id
        of the batch was seen. Batches are fetched concurrently within the pace and yielded as they
        complete (not in order). Ids Kommo does not return (deleted contacts) are simply absent;
        contacts Kommo returns that were not asked for are dropped, and a batch that keeps paging
        beyond what its ids can fill means Kommo ignored the filter: :class:`KommoResponseError`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        contacts = ContactBatching(batch_size, source=distinct_batches(contact_ids, batch_size))
        plan = Plan(contacts=contacts, fetch_contacts=self._fetch_contacts)
        return _contact_lists(fan_out(plan, self.max_in_flight, "kommo-contacts"))

    def _fetch_contacts(self, ids: list[int], cancel: threading.Event) -> list[dict]:
        return fetch_contacts(self._transport, ids, self.page_size, cancel)

    # --- change tracking --------------------------------------------------------------------------

    def changes(self) -> ChangeTracker:
        """What changed since a moment (leads, deletions, contacts, the probe), over this client's pace."""
        return ChangeTracker(self._transport, page_size=self.page_size, max_in_flight=self.max_in_flight,
                             lead_paging=self.lead_paging, ask_leads=self._ask_leads)

    # --- the whole snapshot -----------------------------------------------------------------------

    def stream_snapshot(
        self,
        created_from: datetime,
        created_to: datetime,
        *,
        field_ids: Iterable[int] = (),
        exclude_status_ids: Iterable[int] = frozenset({LOST_STATUS_ID}),
        contact_batch_size: int = 250,
    ) -> SnapshotStream:
        """Everything a full export needs, as one stream over one pool of ``max_in_flight`` threads.

        Iterating the returned :class:`SnapshotStream` yields, as they complete: a
        :class:`FieldOptions` for each of ``field_ids``, every :class:`LeadPage` of the window (as
        :meth:`iter_lead_pages`), and a :class:`ContactBatch` for every batch of contact ids the
        caller hands back with :meth:`SnapshotStream.add_contact_ids` while it processes lead pages.
        Contacts thus start with the first lead pages instead of after the last one, and the pace
        never idles between the two: full contact batches go first, lead pages fill the remaining
        slots, and the last partial batch goes once every lead page has been processed (the caller
        came back for the next item). The stream ends when all of that is done.

        The caller passes each contact id once (a database can tell which ids are new); ids are
        deduplicated within a batch only, and at most about ``max_in_flight`` batches of them wait in
        memory. Closing the stream early cancels what is pending and joins the threads.
        """
        if contact_batch_size < 1:
            raise ValueError(f"contact_batch_size must be at least 1, got {contact_batch_size}")
        window = KeyRange.between("created_at", created_from, created_to)
        paging = self.lead_paging(window, exclude_status_ids)
        contacts = ContactBatching(contact_batch_size)
        plan = Plan(fields=[int(field_id) for field_id in field_ids], fetch_field=self.field_options,
                    leads=paging, ask_leads=self._ask_leads, contacts=contacts,
                    fetch_contacts=self._fetch_contacts)
        return SnapshotStream(fan_out(plan, self.max_in_flight, "kommo-snapshot"), contacts)

    # --- custom fields ----------------------------------------------------------------------------

    def get_custom_field(self, field_id: int, *, cancel: threading.Event | None = None) -> dict | None:
        """The definition of lead custom field ``field_id`` (``GET /api/v4/leads/custom_fields/{id}``),
        or None when Kommo says it does not exist (204 or 404)."""
        path = f"/api/v4/leads/custom_fields/{int(field_id)}"
        # Confirmed: a spurious 204 here would silently drop every vehicle name.
        return self._transport.get_confirmed(path, [], none_on_404=True, cancel=cancel)

    def field_enums(self, field_id: int, *, cancel: threading.Event | None = None) -> dict[int, str]:
        """``enum_id -> value`` of a select/multiselect lead field; {} (with a warning) when the field
        does not exist or has no enums. Enums without a usable id are skipped; values are str()."""
        definition = self.get_custom_field(field_id, cancel=cancel)
        if definition is None:
            logger.warning("Kommo lead custom field %s does not exist; it has no enum options", field_id)
            return {}
        enums = definition.get("enums")
        if enums is None:
            return {}
        if not isinstance(enums, list):
            raise KommoResponseError(
                f"Kommo sent `enums` of lead custom field {field_id} as {type(enums).__name__}, not a list, "
                f"on GET /api/v4/leads/custom_fields/{field_id}; the response shape changed.",
                method="GET",
                path=f"/api/v4/leads/custom_fields/{field_id}",
            )
        result: dict[int, str] = {}
        for enum in enums:
            enum_id = positive_int(enum.get("id")) if isinstance(enum, dict) else None
            if enum_id is not None:
                value = enum.get("value")
                result[enum_id] = "" if value is None else str(value)
        return result

    def field_options(self, field_id: int, cancel: threading.Event | None = None) -> FieldOptions:
        """:meth:`field_enums` as a :class:`FieldOptions`, as a snapshot stream yields it."""
        return FieldOptions(field_id, self.field_enums(field_id, cancel=cancel))


def _contact_lists(batches: Iterator[ContactBatch]) -> Iterator[list[dict]]:
    with contextlib.closing(batches):
        for batch in batches:
            yield batch.contacts
