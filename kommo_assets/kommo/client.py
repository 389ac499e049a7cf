"""The Kommo API v4 client: paging, pacing, retries and concurrency for a full export of leads.

Free of Dagster: a resource wraps it. It follows Kommo's real behaviour: 204 for empty results, short
last pages, a ``_links.next`` that may be sent on the last page too, filters that are silently
ignored, 7 requests/s with HTML 429s and usually no Retry-After, 403 for blocked accounts.
"""

from __future__ import annotations

import contextlib
import email.utils
import itertools
import json
import logging
import math
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import requests
import urllib3
import urllib3.connection
import urllib3.poolmanager
from requests.adapters import HTTPAdapter

from kommo_assets.kommo.errors import (
    KommoAuthError,
    KommoError,
    KommoResponseError,
    KommoUnavailableError,
    redact,
)
from kommo_assets.kommo.fields import extract_kommo_epoch, positive_int
from kommo_assets.kommo.pacing import Pacer

logger = logging.getLogger("kommo_assets.kommo")

USER_AGENT = "kommo-assets/0.1 (Kommo full refresh; python-requests)"
MAX_PAGE_SIZE = 250  # Kommo's hard cap on `limit`
LOST_STATUS_ID = 143  # "Closed - lost", present in every pipeline
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# After a 429 the pace drops by this factor (once per burst), to no less than this share of max_rps.
THROTTLE_SLOWDOWN = 0.9
MIN_PACE_FRACTION = 0.5
# After a 429 has not recurred for this long, the pace rises again by this factor, up to max_rps.
RECOVER_QUIET_S = 30.0
RECOVER_FACTOR = 1.05
# A Retry-After larger than this is not waited out inside one run: the run fails and can be retried.
RETRY_AFTER_CAP_S = 300.0
# The pacer may make up this share of an interval when a send was late (the window rule still holds).
PACE_CATCH_UP = 0.5

# The pace: under Kommo's 7 requests/s with a margin, since its limiter counts arrivals and the network
# moves requests closer together. With the window rule of the pacer, 8 sends never fall within 1.0145 s
# of each other on the wire: the network must bring them 14.5 ms closer within a second for Kommo to see
# an 8th. If it does, the 429 slows every thread down (THROTTLE_SLOWDOWN) until things stay quiet. A
# wider margin is a lower KOMMO_MAX_RPS (6.8: 29 ms), at about 1.5% of the run each 0.1.
DEFAULT_MAX_RPS = 6.9

LEADS_PATH = "/api/v4/leads"
CONTACTS_PATH = "/api/v4/contacts"
PIPELINES_PATH = "/api/v4/leads/pipelines"

class _Cancelled(KommoError):
    """The iteration that owns this request was closed, or the client was: the request gave up."""

    def __init__(
        self, message: str = "the Kommo request was abandoned: its iteration stopped or the client was closed"
    ) -> None:
        super().__init__(message)


@dataclass(frozen=True)
class ClientStats:
    """A snapshot of what the client has done so far (all attempts, retries included)."""

    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    retries: int = 0
    throttled_429: int = 0
    errors: int = 0  # attempts that got no readable response: connection errors, timeouts, bad bodies
    bytes_received: int = 0
    sending_seconds: float = 0.0  # from the first request sent to the last one


@dataclass
class LeadPage:
    """One page of ``/api/v4/leads`` after client-side filtering.

    ``leads`` are the raw API dicts that passed every filter; ``received`` is how many leads the page
    listed before filtering, not counting those listed again from the page before (the leads of the
    keyset cursor's second) or beyond its slice's end after a split; ``page`` numbers the lead requests
    of the export in the order they were made. ``skipped`` counts what was dropped, by reason: ``outside_window`` (created_at
    not in [from, to)), ``excluded_status``, ``deleted`` (``is_deleted`` true), ``duplicate`` (the
    same lead twice on this page: the most recently updated copy is kept), ``invalid`` (not an object,
    no id, or no readable created_at).
    """

    page: int
    leads: list[dict]
    received: int
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class ContactBatch:
    """One batch of ``/api/v4/contacts``: how many distinct ids were asked, and the contacts Kommo
    returned for them (deleted contacts are simply absent), in the order asked."""

    asked: int
    contacts: list[dict]


@dataclass
class FieldOptions:
    """The enum options (``enum_id -> value``) of one select lead field, see :meth:`KommoClient.field_enums`."""

    field_id: int
    options: dict[int, str]


@dataclass
class _RawPage:
    page: int
    items: list[Any]
    ends_range: bool


# A snapshot stream pages leads with about this many pages in flight (at 400 ms a page and 6.9 requests/s
# that is their share of the pace) and keeps this many full contact batches in reserve for the end.
LEAD_PAGES_IN_FLIGHT = 2
RESERVE_BATCHES = 2
# Leads are read as this many keyset chains at once (one more than the pages they keep in flight, so a
# chain whose answer is being processed leaves none idle); a chain that is finished takes half of what
# the longest one has left when that is at least this many pages.
LEAD_CHAINS = LEAD_PAGES_IN_FLIGHT + 1
SPLIT_MIN_PAGES = 4
# A second with more than a page of leads is read in passes until two agree; this many at most.
MAX_SECOND_PASSES = 4


class KommoClient:
    """A paced, retrying client for the parts of Kommo API v4 the import needs.

    One instance holds one keep-alive ``requests.Session`` (a pool of at least ``max_in_flight``
    connections) and one :class:`Pacer`: every attempt of every request, from any thread, takes a
    slot at ``max_rps``. Lists are fetched by up to ``max_in_flight`` threads at once within that pace.

    A request takes its slot only once it is ready to go (connected, headers built), right before it
    is written, and holds it until it has been written: the pacer then stamps the send, and any
    ``ceil(max_rps) + 1`` consecutive sends span at least ``ceil(max_rps)/max_rps`` seconds on the
    wire (at 6.9/s: never 8 sends within 1.0145 s), even when the process pauses (GC, a busy GIL)
    between grant and write. A late send is made up by the next ones, within that rule, so pauses do
    not add up to a slower pace.

    Retries (with exponential backoff and full jitter, at least 0.2x the cap; at most ``max_retries``
    retries after the first attempt, so ``max_retries + 1`` attempts): 408, 429, 500, 502, 503, 504,
    dropped connections, timeouts, and 200s whose body is empty, cut off or not JSON. ``Retry-After``
    (seconds or an HTTP date, capped at 300 s) is honoured when present. A 429 also pushes back every
    thread's next slot and lowers the pace by 10% (once per burst, down to half of ``max_rps``); after
    30 s without another, the pace rises again by 5% steps up to ``max_rps``.
    401/403 raise :class:`KommoAuthError` at once; other 4xx, redirects (not followed: the token must
    not travel) and JSON that is not an object raise :class:`KommoResponseError`. A 204 that would
    end a list or say "not found" is asked once more before it is believed.
    The access token goes only into the ``Authorization`` header and is redacted from every message.
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
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.page_size = page_size
        self._token = access_token.strip()
        self._pacer = Pacer(max_rps, window=max(1, math.ceil(max_rps)), catch_up=PACE_CATCH_UP)
        self._closed = threading.Event()
        self._stats_lock = threading.Lock()
        self._requests = 0
        self._by_status: dict[int, int] = {}
        self._retries = 0
        self._throttled = 0
        self._errors = 0
        self._bytes = 0
        self._first_sent: float | None = None
        self._last_sent = 0.0

        self._session = requests.Session()
        pool = max(max_in_flight, 10)
        adapter = _PacedAdapter(pool_connections=1, pool_maxsize=pool, max_retries=0)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self._session.headers.update(
            {
                "Authorization": f"Bearer {self._token}",
                "Accept": "application/hal+json",
                "User-Agent": USER_AGENT,
            }
        )
        # Slots are taken inside the connection, right before the write; a proxy whose connections
        # cannot report that (SOCKS) takes them before the request instead (slower, never faster).
        self._paced_on_write = _write_pacing_possible(self._session, base_url)

    def __repr__(self) -> str:
        return (
            f"KommoClient(base_url={self.base_url!r}, access_token=<redacted>, max_rps={self.max_rps}, "
            f"max_in_flight={self.max_in_flight})"
        )

    # --- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the session; requests still waiting for a slot or a backoff give up."""
        self._closed.set()
        self._session.close()

    def __enter__(self) -> KommoClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def stats(self) -> ClientStats:
        with self._stats_lock:
            return ClientStats(
                requests=self._requests,
                by_status=dict(self._by_status),
                retries=self._retries,
                throttled_429=self._throttled,
                errors=self._errors,
                bytes_received=self._bytes,
                sending_seconds=(
                    0.0 if self._first_sent is None else round(self._last_sent - self._first_sent, 3)
                ),
            )

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
        :class:`_LeadPaging`). Since Kommo silently ignores filters it does not understand, each lead is
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
        paging = self._lead_paging(created_from, created_to, exclude_status_ids)
        return self._fan_out(_Plan(leads=paging), "kommo-leads")

    def _lead_paging(
        self, created_from: datetime, created_to: datetime, exclude_status_ids: Iterable[int]
    ) -> _LeadPaging:
        from_ts = _ceil_epoch(created_from)
        to_ts = _ceil_epoch(created_to)
        if to_ts <= from_ts:
            raise ValueError(
                f"empty window: created_to {created_to} is not after created_from {created_from}"
            )
        excluded = frozenset(int(status) for status in exclude_status_ids)
        return _LeadPaging(self, from_ts, to_ts, excluded, chains=min(LEAD_CHAINS, self.max_in_flight))

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
        contacts = _ContactBatching(self, batch_size, source=_distinct_batches(contact_ids, batch_size))
        return self._contact_lists(self._fan_out(_Plan(contacts=contacts), "kommo-contacts"))

    @staticmethod
    def _contact_lists(batches: Iterator[ContactBatch]) -> Iterator[list[dict]]:
        with contextlib.closing(batches):
            for batch in batches:
                yield batch.contacts

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
        paging = self._lead_paging(created_from, created_to, exclude_status_ids)
        contacts = _ContactBatching(self, contact_batch_size)
        fields = [int(field_id) for field_id in field_ids]
        plan = _Plan(fields=fields, leads=paging, contacts=contacts, client=self)
        return SnapshotStream(self._fan_out(plan, "kommo-snapshot"), contacts)

    def _fetch_field_options(self, field_id: int, cancel: threading.Event) -> FieldOptions:
        return FieldOptions(field_id, self.field_enums(field_id, cancel=cancel))

    def _fetch_contact_batch(self, ids: list[int], cancel: threading.Event) -> list[dict]:
        wanted = set(ids)
        limit = self.page_size
        max_pages = -(-len(ids) // limit) + 1
        found: dict[int, dict] = {}
        for page in itertools.count(1):
            if page > max_pages:
                raise KommoResponseError(
                    f"Kommo returned more than {max_pages - 1} page(s) of contacts for {len(ids)} ids on "
                    f"GET {CONTACTS_PATH}: it seems to ignore filter[id][]. Check the API version of the "
                    "account; the run cannot tell which contacts were asked for.",
                    method="GET",
                    path=CONTACTS_PATH,
                    page=page,
                )
            params = [("filter[id][]", str(contact_id)) for contact_id in ids]
            params += [("limit", str(limit)), ("page", str(page))]
            body = self._get(CONTACTS_PATH, params, page=page, cancel=cancel)
            if body is None and page == 1:
                # Not one of up to 250 contacts exists: possible, but confirm it before trusting a 204.
                body = self._get(CONTACTS_PATH, params, page=page, cancel=cancel)
            if body is None:
                break
            raw = self._list_page(body, "contacts", CONTACTS_PATH, page, limit)
            for contact in raw.items:
                if not isinstance(contact, dict):
                    continue
                contact_id = positive_int(contact.get("id"))
                if contact_id in wanted and contact_id not in found:
                    found[contact_id] = contact
            if raw.ends_range or len(found) == len(wanted):
                break
        return [found[contact_id] for contact_id in ids if contact_id in found]

    # --- custom fields and pipelines --------------------------------------------------------------

    def get_custom_field(self, field_id: int, *, cancel: threading.Event | None = None) -> dict | None:
        """The definition of lead custom field ``field_id`` (``GET /api/v4/leads/custom_fields/{id}``),
        or None when Kommo says it does not exist (204 or 404)."""
        path = f"/api/v4/leads/custom_fields/{int(field_id)}"
        body = self._get(path, [], none_on_404=True, cancel=cancel)
        if body is None:  # confirm: a spurious 204 here would silently drop every vehicle name
            body = self._get(path, [], none_on_404=True, cancel=cancel)
        return body

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
            if not isinstance(enum, dict):
                continue
            enum_id = positive_int(enum.get("id"))
            if enum_id is not None:
                value = enum.get("value")
                result[enum_id] = "" if value is None else str(value)
        return result

    def get_pipelines(self) -> list[dict]:
        """Every lead pipeline with its ``_embedded.statuses`` (``GET /api/v4/leads/pipelines``, one
        page: Kommo caps accounts at 50 pipelines)."""
        body = self._get(PIPELINES_PATH, [])
        if body is None:  # every account has a pipeline: confirm before believing a 204
            body = self._get(PIPELINES_PATH, [])
        if body is None:
            return []
        return [
            item
            for item in self._list_page(body, "pipelines", PIPELINES_PATH, None, None).items
            if isinstance(item, dict)
        ]

    # --- plumbing ---------------------------------------------------------------------------------

    def _fan_out(self, plan: _Plan, name: str) -> Iterator[Any]:
        """Runs the plan's tasks on up to ``max_in_flight`` threads and yields what they produce as they
        complete (ties in submission order). The plan is asked for work whenever a thread is free, and
        again each time the caller comes back for the next item (what it did with the last one may
        have created work). Any error cancels the rest and propagates; closing the generator cancels
        pending work and joins the threads."""
        cancel = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix=name)
        pending: dict[Future[Any], tuple[int, _Task]] = {}
        order = itertools.count()

        def refill() -> None:
            while len(pending) < self.max_in_flight:
                task = plan.next_task()
                if task is None:
                    return
                pending[pool.submit(task.run, task.arg, cancel)] = (next(order), task)

        try:
            while True:
                refill()
                if not pending:
                    if plan.finished():
                        return
                    raise RuntimeError(f"{name}: nothing in flight and nothing to start, yet not finished")
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: pending[f][0]):
                    _, task = pending.pop(future)
                    item = plan.on_result(task, future.result())
                    # Refill before handing the item over, so the pool keeps working while the caller does.
                    refill()
                    if item is not None:
                        yield item
                        plan.on_processed(task)
        finally:
            cancel.set()
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _list_page(body: dict, key: str, path: str, page: int | None, limit: int | None) -> _RawPage:
        """Reads ``_embedded.<key>`` of a list response and whether the range ends with this page."""
        embedded = body.get("_embedded")
        items = embedded.get(key) if isinstance(embedded, dict) else None
        if (embedded is not None and not isinstance(embedded, dict)) or (
            items is not None and not isinstance(items, list)
        ):
            raise KommoResponseError(
                f"Kommo sent a list response without a readable _embedded.{key} on GET {path}"
                f"{_page_text(page)}; the API's response shape changed and the client needs updating.",
                method="GET",
                path=path,
                page=page,
            )
        items = items or []
        links = body.get("_links")
        has_next = (
            isinstance(links, dict)
            and isinstance(links.get("next"), dict)
            and bool(links["next"].get("href"))
        )
        ends = not items or not has_next or (limit is not None and len(items) < limit)
        return _RawPage(page or 1, items, ends)

    def _backoff(self, retry: int) -> float:
        cap = min(self.backoff_max, self.backoff_base * (2**retry))
        # Full jitter spreads the threads out; the floor keeps a retry from firing right back.
        return random.uniform(0.2 * cap, cap)

    def _get(
        self,
        path: str,
        params: list[tuple[str, str]],
        *,
        page: int | None = None,
        cancel: threading.Event | None = None,
        none_on_404: bool = False,
    ) -> Any:
        """GETs ``path`` with retries; returns the decoded JSON object, or None for 204 (no content).

        Exceptions are raised outside every ``except`` block, so no requests exception (whose request
        object holds the Authorization header) ends up in ``__cause__`` or ``__context__``.
        """
        url = self.base_url + path
        where = f"GET {path}{_page_text(page)}"
        stop = cancel if cancel is not None else self._closed
        attempts = self.max_retries + 1
        failure = ""
        last_status: int | None = None
        for attempt in range(1, attempts + 1):
            if self._closed.is_set() or stop.is_set():
                raise _Cancelled()
            slot = _Slot(self._pacer, stop)
            response: requests.Response | None = None
            failure = ""
            try:
                if self._paced_on_write:
                    # The connection takes the slot right before it writes (see _SignallingHTTPConnection).
                    _send_slot.current = slot
                else:
                    slot.take()
                try:
                    response = self._session.get(
                        url, params=params, timeout=self.timeout, allow_redirects=False
                    )
                finally:
                    _send_slot.current = None
                    slot.sent()  # no-op if the write already stamped it
                content = response.content
            except requests.Timeout:
                failure = f"no response within {self.timeout:g} s"
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                failure = f"the connection failed or was cut off: {_describe(exc, self._token)}"
            except requests.RequestException as exc:
                failure = f"the request failed: {_describe(exc, self._token)}"
            if response is not None and not slot.granted:
                # The request went out through a connection that did not take a slot (a proxy type
                # not wired for it): one request was unpaced; from now on slots come before requests.
                logger.warning("Kommo: requests to %s bypass write pacing; pacing before each request",
                               self.base_url)
                self._paced_on_write = False
            if slot.granted_at is not None:
                with self._stats_lock:
                    if self._first_sent is None:
                        self._first_sent = slot.granted_at
                    self._last_sent = max(self._last_sent, slot.granted_at)
            elapsed_ms = (time.monotonic() - (slot.granted_at or time.monotonic())) * 1000
            status = None if response is None or failure else response.status_code
            logger.debug(
                "GET %s%s -> %s in %.0f ms", path, _page_text(page), status or "no response", elapsed_ms
            )
            self._count(status=status, error=status is None, nbytes=0 if status is None else len(content))
            if status is not None and status < 400:
                self._pacer.recover(RECOVER_FACTOR, quiet_s=RECOVER_QUIET_S)

            retry_after: float | None = None
            if status is not None:
                last_status = status
                if status == 204:
                    return None
                if status == 200:
                    body, failure = _decode(content)
                    if isinstance(body, dict):
                        return body
                    if body is not None:
                        raise KommoResponseError(
                            f"Kommo answered {where} with a JSON {type(body).__name__} instead of an "
                            "object; the API's response shape changed and the client needs updating.",
                            method="GET",
                            path=path,
                            page=page,
                            status=status,
                        )
                    self._count_error_only()
                elif status in (401, 403):
                    raise _auth_error(status, path, page)
                elif status == 404 and none_on_404:
                    return None
                elif status in RETRYABLE_STATUSES:
                    failure = f"HTTP {status}"
                    retry_after = _retry_after(response.headers.get("Retry-After"))
                else:
                    raise _unexpected_status_error(status, path, page, response, self._token)
            if attempt == attempts:
                break

            delay = self._backoff(attempt - 1)
            if retry_after is not None:
                delay = max(delay, min(retry_after, RETRY_AFTER_CAP_S))
            with self._stats_lock:
                self._retries += 1
            logger.warning(
                "Kommo: %s on %s (attempt %d of %d); retrying in %.2f s",
                failure,
                where,
                attempt,
                attempts,
                delay,
            )
            if status == 429:
                # Every thread cools down, not only this one: the account-wide limit was hit. The
                # next acquire() waits the penalty out. The pace drops too, so a limit that is lower
                # than ours (another integration sharing the account's quota) stops costing 429s.
                self._pacer.penalize(delay)
                before = self._pacer.rate
                after = self._pacer.slow_down(THROTTLE_SLOWDOWN, floor=self.max_rps * MIN_PACE_FRACTION)
                if after < before:
                    logger.warning("Kommo throttled the client: pacing down to %.2f requests/s", after)
            elif stop.wait(delay):
                raise _Cancelled()
        raise KommoUnavailableError(
            redact(
                f"Kommo kept failing ({failure}) on {where} after {attempts} attempts; "
                "the run can be retried later.",
                self._token,
            ),
            method="GET",
            path=path,
            page=page,
            status=last_status,
        )

    def _count(self, *, status: int | None, error: bool, nbytes: int) -> None:
        with self._stats_lock:
            self._requests += 1
            if status is not None:
                self._by_status[status] = self._by_status.get(status, 0) + 1
                if status == 429:
                    self._throttled += 1
            if error:
                self._errors += 1
            self._bytes += nbytes

    def _count_error_only(self) -> None:
        with self._stats_lock:
            self._errors += 1


@dataclass(frozen=True)
class _Task:
    kind: str  # "field", "lead", "contacts"
    arg: Any
    run: Callable[[Any, threading.Event], Any]


@dataclass
class _Slice:
    """One time slice of the window, ``start <= created_at < end``, read as a chain of keyset requests."""

    start: int
    end: int  # exclusive; lowered when the slice is split (see _LeadPaging.take)
    cursor: int  # inclusive lower bound of the next request
    seen_at_cursor: dict[int, float] = field(default_factory=dict)  # id -> updated_at, leads at the cursor
    second_page: int = 0  # > 0 while one second holds more leads than a page: offset paging inside it
    second_passes: int = 0  # passes over that second so far (see _LeadPaging._on_second_page)
    pass_ids: set[int] = field(default_factory=set)  # ids of that second listed in the current pass
    last_pass_ids: set[int] | None = None  # and in the pass before
    busy: bool = False
    done: bool = False
    requests: int = 0
    received: int = 0  # leads listed in [start, cursor): the slice's density, for splitting
    last_full: bool = False  # the previous answer was a full page


@dataclass(frozen=True, eq=False)
class _LeadRequest:
    slice: _Slice
    number: int  # the request's number in the export (LeadPage.page, messages)
    params: list[tuple[str, str]]
    created_from: int
    created_to: int  # inclusive
    after_full: bool  # the slice's previous answer was a full page
    in_second: bool  # offset paging inside one second


class _LeadPaging:
    """The leads of one window, read in time slices by keyset paging.

    Offset paging (``page=N``) loses a lead whenever the list shifts while it is read: a lead deleted on
    an earlier page moves every later one up, and the one crossing a page boundary is never listed (with
    pages fetched concurrently, an insertion does the same). So each slice of the window is read as a
    chain of requests ``filter[created_at][from]=<cursor>`` ordered by ``created_at``, the cursor moving
    to the last ``created_at`` listed: a lead that exists from the start to the end of the export is
    listed whatever else is deleted, restored or added meanwhile. The cursor is inclusive (leads share
    seconds), so the leads of the cursor's second come again at the top of the next page; they are passed
    on only when Kommo sends a newer version. A second holding a full page of leads is read by offset
    paging inside that second alone (``order[id]``), in passes until two agree (see ``_on_second_page``),
    then the cursor moves past it.

    The window starts as ``chains`` equal slices read concurrently, one request in flight each, within
    the shared pace. When a slice is finished while another still has several pages to go, the longer
    one is cut in two at the middle of what it has left (leads it had already asked for beyond the cut
    are dropped from its answer: the new slice lists them), so uneven data does not leave one chain
    paging alone at the end.

    After a full page the next answer cannot be empty (it starts with the leads of the cursor's second),
    unless those leads were deleted in between: an empty answer there, twice, fails the export with a
    clear message instead of leaving a silent hole. Any empty answer is asked once more before it is
    believed. A server that answers outside the requested range or out of order, or ignores ``page``
    inside a crowded second, makes paging unsafe: that is a :class:`KommoResponseError` too.

    ``take``, ``on_result`` and ``on_processed`` run on the consumer's thread, ``fetch`` on the pool's:
    it only reads the request ``take`` built."""

    def __init__(self, client: KommoClient, from_ts: int, to_ts: int, excluded: frozenset[int],
                 chains: int) -> None:
        self.client = client
        self.from_ts = from_ts
        self.to_ts = to_ts
        self.excluded = excluded
        self.limit = client.page_size
        self.chains = max(1, min(chains, to_ts - from_ts))
        edges = [from_ts + (to_ts - from_ts) * k // self.chains for k in range(self.chains + 1)]
        self.slices = [_Slice(edges[k], edges[k + 1], edges[k]) for k in range(self.chains)]
        self._numbers = itertools.count(1)
        self.splits = 0
        self.unprocessed = 0

    @property
    def paging(self) -> bool:
        """Some slice has pages left to ask for."""
        return any(not s.done for s in self.slices)

    @property
    def in_flight(self) -> int:
        return sum(1 for s in self.slices if s.busy)

    def done(self) -> bool:
        """Every slice was read and every page processed by the caller."""
        return not self.paging and self.unprocessed == 0

    def take(self) -> _LeadRequest | None:
        idle = [s for s in self.slices if not s.busy and not s.done]
        if not idle:
            split = self._split()
            if split is None:
                return None
            idle = [split]
        s = min(idle, key=lambda x: (x.requests, x.start))  # keeps the chains level
        s.busy = True
        params = [("limit", str(self.limit)), ("with", "contacts,catalog_elements"),
                  ("filter[created_at][from]", str(s.cursor))]
        if s.second_page:
            params += [("filter[created_at][to]", str(s.cursor)), ("order[id]", "asc"),
                       ("page", str(s.second_page))]
            created_to = s.cursor
        else:
            params += [("filter[created_at][to]", str(s.end - 1)), ("order[created_at]", "asc"), ("page", "1")]
            created_to = s.end - 1
        return _LeadRequest(s, next(self._numbers), params, s.cursor, created_to, after_full=s.last_full,
                            in_second=bool(s.second_page))

    def _split(self) -> _Slice | None:
        """A new slice cut from the one with the most pages left, when fewer than ``chains`` are left and
        that one has at least SPLIT_MIN_PAGES left by the density it has shown so far."""
        active = [s for s in self.slices if not s.done]
        if not active or len(active) >= self.chains:
            return None

        def pages_left(s: _Slice) -> float:
            if s.second_page or s.received == 0 or s.cursor <= s.start:
                return 0.0
            return s.received / (s.cursor - s.start) * (s.end - s.cursor) / self.limit

        longest = max(active, key=pages_left)
        if pages_left(longest) < SPLIT_MIN_PAGES or longest.end - longest.cursor < 2:
            return None
        middle = (longest.cursor + longest.end) // 2
        cut = _Slice(middle, longest.end, middle)
        longest.end = middle
        self.slices.append(cut)
        self.splits += 1
        return cut

    def fetch(self, request: _LeadRequest, cancel: threading.Event) -> tuple[_LeadRequest, _RawPage]:
        raw = self._ask(request, cancel)
        if raw is None:
            # A spurious 204 (a proxy, a hiccup) must not silently cut a slice short: it is asked once more.
            logger.info("Kommo sent no leads on GET %s (request %d); asking once more", LEADS_PATH,
                        request.number)
            raw = self._ask(request, cancel)
            if raw is None and request.after_full and not request.in_second:
                raise KommoResponseError(
                    f"Kommo listed no leads created from {_iso(request.created_from)} on GET {LEADS_PATH} "
                    "(twice), although the page before ended with leads created then: the listing is "
                    "inconsistent (leads deleted at that moment, or an API fault), and the export cannot "
                    "tell whether leads are missing. Nothing was changed; run the refresh again.",
                    method="GET", path=LEADS_PATH, page=request.number,
                )
        return request, raw if raw is not None else _RawPage(request.number, [], True)

    def _ask(self, request: _LeadRequest, cancel: threading.Event) -> _RawPage | None:
        """One answer to the request; None when it lists no leads (a 204 or an empty list)."""
        body = self.client._get(LEADS_PATH, request.params, page=request.number, cancel=cancel)
        if body is None:
            return None
        raw = self.client._list_page(body, "leads", LEADS_PATH, request.number, self.limit)
        return raw if raw.items else None

    def on_result(self, result: tuple[_LeadRequest, _RawPage]) -> LeadPage | None:
        request, raw = result
        s = request.slice
        s.busy = False
        s.requests += 1
        full = not raw.ends_range
        s.last_full = full
        # The leads the request asked for, by the created_at Kommo ordered them by; anything else
        # (unreadable or out-of-range created_at: bad data) goes on to the filter, which skips it.
        moments = [extract_kommo_epoch(lead.get("created_at")) if isinstance(lead, dict) else None
                   for lead in raw.items]
        in_range: list[tuple[int, int]] = []  # (position on the page, created_at)
        for position, moment in enumerate(moments):
            if moment is not None and request.created_from <= moment.timestamp() <= request.created_to:
                in_range.append((position, int(moment.timestamp())))
        stamps = [ts for _, ts in in_range]
        if any(later < earlier for earlier, later in itertools.pairwise(stamps)):
            raise KommoResponseError(
                f"Kommo answered GET {LEADS_PATH} (request {request.number}) with leads not in created_at "
                "order although order[created_at]=asc was asked: the export cannot page safely. Check the "
                "account's API version.",
                method="GET", path=LEADS_PATH, page=request.number,
            )
        beyond = {position for position, ts in in_range if ts >= s.end}  # the slice was split meanwhile
        previous = s.seen_at_cursor
        if request.in_second:
            self._on_second_page(request, raw, s, [position for position, _ in in_range], full)
        elif not full or beyond:
            s.done = True  # a short page, or one that reached past the (new) end of the slice
        elif not stamps:
            raise KommoResponseError(
                f"Kommo answered GET {LEADS_PATH} (request {request.number}) with a full page of leads "
                f"none of which was created in the requested range (from {_iso(request.created_from)}): it "
                "ignores filter[created_at] and the export cannot page safely. Check the account's API version.",
                method="GET", path=LEADS_PATH, page=request.number,
            )
        else:
            last = stamps[-1]
            if last == s.cursor:  # a whole page within one second: read that second by offset
                s.second_page, s.second_passes, s.pass_ids, s.last_pass_ids = 1, 1, set(), None
            else:
                s.cursor, s.seen_at_cursor = last, {}
        if s.second_page or (full and not s.done):
            # The slice goes on at its cursor: remember the leads listed there (a new dict: `previous`
            # still filters this page), so the next answer passes them on only if newer.
            seen = dict(s.seen_at_cursor)
            for position, ts in in_range:
                lead = raw.items[position]
                if ts == s.cursor and (lead_id := positive_int(lead.get("id"))) is not None:
                    seen[lead_id] = max(_updated_at(lead), seen.get(lead_id, float("-inf")))
            s.seen_at_cursor = seen
        # Leads of the previous cursor's second come again: only newer versions are passed on.
        items = []
        repeats = 0
        for position, lead in enumerate(raw.items):
            if position in beyond:
                continue
            lead_id = positive_int(lead.get("id")) if isinstance(lead, dict) else None
            if lead_id is not None and lead_id in previous:
                repeats += 1
                if _updated_at(lead) <= previous[lead_id]:
                    continue
            items.append((lead, moments[position]))
        listed = len(raw.items) - repeats - len(beyond)
        s.received += listed
        if not items:
            return None
        self.unprocessed += 1
        return self._filter(raw.page, items, listed)

    def _on_second_page(self, request: _LeadRequest, raw: _RawPage, s: _Slice, positions: list[int],
                        full: bool) -> None:
        """Moves a slice on after a page of offset paging inside one crowded second.

        Offset pages shift when a lead of that second is deleted meanwhile, and the lead crossing a page
        boundary is then not listed. So the second is read in passes, each from page 1 to a short page,
        until two passes in a row list the same leads: a deletion during a pass removes a lead listed by
        the pass before, so a pass that lost a lead can never equal the one before it. Leads already
        passed on are not passed on again. Kommo does not say how it orders leads of one second
        between the two kinds of request, so passes are compared with each other only."""
        ids = {lead_id for position in positions if (lead_id := positive_int(raw.items[position].get("id")))}
        if full and s.second_page > 1 and not ids - s.pass_ids:
            # A full page listing nothing new within the pass: Kommo ignores `page` here, and paging on
            # would never end.
            raise KommoResponseError(
                f"Kommo answered GET {LEADS_PATH} (request {request.number}) for page {s.second_page} of the "
                f"leads created at {_iso(request.created_from)} with leads it had listed already: it ignores "
                "`page` and the export cannot page safely. Check the account's API version.",
                method="GET", path=LEADS_PATH, page=request.number,
            )
        s.pass_ids |= ids
        if full:
            s.second_page += 1
        elif s.pass_ids == s.last_pass_ids:  # the second is read: on to the next one
            s.second_page, s.cursor, s.seen_at_cursor = 0, s.cursor + 1, {}
            s.pass_ids, s.last_pass_ids = set(), None
            s.done = s.cursor >= s.end
        elif s.second_passes >= MAX_SECOND_PASSES:
            raise KommoResponseError(
                f"The leads Kommo lists as created at {_iso(request.created_from)} changed during each of "
                f"{MAX_SECOND_PASSES} passes over them (GET {LEADS_PATH}, request {request.number}): the export "
                "cannot tell whether leads are missing. Nothing was changed; run the refresh again later.",
                method="GET", path=LEADS_PATH, page=request.number,
            )
        else:  # read it again, and compare
            s.second_page, s.second_passes = 1, s.second_passes + 1
            s.pass_ids, s.last_pass_ids = set(), s.pass_ids

    def on_processed(self) -> None:
        self.unprocessed -= 1

    def _filter(self, page: int, items: list[tuple[Any, datetime | None]], received: int) -> LeadPage:
        """The page's leads that pass the client-side checks; ``items`` pairs each with its created_at."""
        kept: dict[int, dict] = {}  # lead id -> lead, in page order
        skipped: dict[str, int] = {}
        from_ts, to_ts, excluded = self.from_ts, self.to_ts, self.excluded

        def skip(reason: str) -> None:
            skipped[reason] = skipped.get(reason, 0) + 1

        for lead, created in items:
            if not isinstance(lead, dict):
                skip("invalid")
                continue
            lead_id = positive_int(lead.get("id"))
            if lead_id is None or created is None:
                skip("invalid")
            elif not from_ts <= created.timestamp() < to_ts:
                skip("outside_window")
            elif positive_int(lead.get("status_id")) in excluded:
                skip("excluded_status")
            elif lead.get("is_deleted") is True:
                skip("deleted")
            elif lead_id in kept:
                skip("duplicate")
                if _updated_at(lead) > _updated_at(kept[lead_id]):
                    kept[lead_id] = lead
            else:
                kept[lead_id] = lead
        return LeadPage(page=page, leads=list(kept.values()), received=received, skipped=skipped)


def _updated_at(lead: dict) -> float:
    moment = extract_kommo_epoch(lead.get("updated_at"))
    return float("-inf") if moment is None else moment.timestamp()


def _distinct_batches(ids: Iterable[Any], size: int) -> Iterator[list[int]]:
    """Lazily cuts ``ids`` into batches of ``size`` distinct positive ids (None and junk skipped; an id
    equal to the one before it is skipped across batch boundaries too)."""
    batch: list[int] = []
    in_batch: set[int] = set()
    last: int | None = None
    for value in ids:
        contact_id = positive_int(value)
        if contact_id is None or contact_id in in_batch or contact_id == last:
            continue
        last = contact_id
        batch.append(contact_id)
        in_batch.add(contact_id)
        if len(batch) == size:
            yield batch
            batch, in_batch = [], set()
    if batch:
        yield batch


class _ContactBatching:
    """Contact ids waiting to be asked for, cut into batches: from an iterator (read lazily), or handed
    in by the caller of a snapshot stream while it processes lead pages."""

    def __init__(self, client: KommoClient, size: int, source: Iterator[list[int]] | None = None) -> None:
        self.client = client
        self.size = size
        self._source = source
        self._waiting: list[int] = []
        self._in_waiting: set[int] = set()
        self.in_flight = 0
        self.requested = 0  # distinct ids put into batches

    def add(self, ids: Iterable[Any]) -> None:
        for value in ids:
            contact_id = positive_int(value)
            if contact_id is not None and contact_id not in self._in_waiting:
                self._waiting.append(contact_id)
                self._in_waiting.add(contact_id)

    def take(self, *, partial: bool) -> list[int] | None:
        """The next batch: a full one, or (``partial``) whatever is waiting; None when there is none."""
        if self._source is not None:
            batch = next(self._source, None)
            if batch is None:
                self._source = None
        elif len(self._waiting) >= self.size or (partial and self._waiting):
            batch, self._waiting = self._waiting[: self.size], self._waiting[self.size :]
            self._in_waiting.difference_update(batch)
        else:
            batch = None
        if batch is None:
            return None
        self.in_flight += 1
        self.requested += len(batch)
        return batch

    def ready(self) -> int:
        """Full batches waiting."""
        return len(self._waiting) // self.size

    def idle(self) -> bool:
        return self._source is None and not self._waiting and self.in_flight == 0

    def fetch(self, ids: list[int], cancel: threading.Event) -> ContactBatch:
        return ContactBatch(len(ids), self.client._fetch_contact_batch(ids, cancel))


class _Plan:
    """What a fan-out fetches next: select-field options first; while leads are being paged, lead pages
    and full contact batches by the policy of ``_while_paging``; then the remaining full
    batches and, once every lead page is processed, the last partial batch."""

    def __init__(
        self,
        *,
        fields: list[int] | None = None,
        leads: _LeadPaging | None = None,
        contacts: _ContactBatching | None = None,
        client: KommoClient | None = None,
    ) -> None:
        self.fields = list(fields or [])
        self.fields_in_flight = 0
        self.leads = leads
        self.contacts = contacts
        self.client = client

    def _leads_done(self) -> bool:
        return self.leads is None or self.leads.done()

    def next_task(self) -> _Task | None:
        if self.fields:
            assert self.client is not None
            self.fields_in_flight += 1
            return _Task("field", self.fields.pop(0), self.client._fetch_field_options)
        leads, contacts = self.leads, self.contacts
        if leads is not None and contacts is not None and leads.paging:
            return self._while_paging(leads, contacts)
        if self.contacts is not None:
            batch = self.contacts.take(partial=False)
            if batch is not None:
                return _Task("contacts", batch, self.contacts.fetch)
        if self.leads is not None:
            request = self.leads.take()
            if request is not None:
                return _Task("lead", request, self.leads.fetch)
        if self.contacts is not None and self._leads_done():
            batch = self.contacts.take(partial=True)
            if batch is not None:
                return _Task("contacts", batch, self.contacts.fetch)
        return None

    def _while_paging(self, leads: _LeadPaging, contacts: _ContactBatching) -> _Task | None:
        """While leads are being paged: a couple of lead requests in flight keep paging at their share of
        the pace, and contact batches take the other slots. A few full batches are kept in reserve (a
        bounded number, so memory stays flat) and spent whenever there is no lead request to make: then
        the last slices are waiting for their answers, and a slot left idle would be lost."""
        ready = contacts.ready()
        if ready > RESERVE_BATCHES or (ready and leads.in_flight >= LEAD_PAGES_IN_FLIGHT):
            batch = contacts.take(partial=False)
            if batch is not None:
                return _Task("contacts", batch, contacts.fetch)
        request = leads.take()
        if request is not None:
            return _Task("lead", request, leads.fetch)
        batch = contacts.take(partial=False)
        return None if batch is None else _Task("contacts", batch, contacts.fetch)

    def on_result(self, task: _Task, result: Any) -> Any:
        if task.kind == "lead":
            assert self.leads is not None
            return self.leads.on_result(result)
        if task.kind == "contacts":
            assert self.contacts is not None
            self.contacts.in_flight -= 1
        else:
            self.fields_in_flight -= 1
        return result

    def on_processed(self, task: _Task) -> None:
        if task.kind == "lead":
            assert self.leads is not None
            self.leads.on_processed()

    def finished(self) -> bool:
        return (
            not self.fields
            and self.fields_in_flight == 0
            and self._leads_done()
            and (self.contacts is None or self.contacts.idle())
        )


class SnapshotStream:
    """The stream of :meth:`KommoClient.stream_snapshot`: iterate it for ``FieldOptions``, ``LeadPage``
    and ``ContactBatch`` items; hand contact ids back with :meth:`add_contact_ids`."""

    def __init__(self, items: Iterator[Any], contacts: _ContactBatching) -> None:
        self._items = items
        self._contacts = contacts

    def __iter__(self) -> Iterator[Any]:
        return self._items

    def add_contact_ids(self, ids: Iterable[int]) -> None:
        """Contact ids to fetch (each once: the stream does not remember ids it has asked for)."""
        self._contacts.add(ids)

    @property
    def contacts_requested(self) -> int:
        """Distinct ids put into contact batches so far."""
        return self._contacts.requested

    def close(self) -> None:
        close = getattr(self._items, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> SnapshotStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _write_pacing_possible(session: requests.Session, base_url: str) -> bool:
    """Whether requests to ``base_url`` go through connections that take their slot on write: directly
    or through an HTTP(S) proxy, but not a SOCKS proxy (whose connection classes are not ours)."""
    try:
        settings = session.merge_environment_settings(base_url, {}, None, None, None)
        proxy = requests.utils.select_proxy(base_url, settings.get("proxies") or {})
    except Exception:  # noqa: BLE001 - unreadable proxy settings: the safe, slower way
        return False
    return proxy is None or urllib.parse.urlsplit(proxy).scheme.lower() in ("http", "https")


class _Slot:
    """One attempt's pacer slot: taken right before the write, stamped once the request is written."""

    __slots__ = ("_cancel", "_pacer", "granted", "granted_at", "_held")

    def __init__(self, pacer: Pacer, cancel: threading.Event) -> None:
        self._pacer = pacer
        self._cancel = cancel
        self.granted = False
        self.granted_at: float | None = None
        self._held = False

    def take(self) -> None:
        """Waits for the slot; raises _Cancelled if the attempt was abandoned."""
        if not self._pacer.acquire(self._cancel, hold=True):
            raise _Cancelled()
        self.granted = True
        self.granted_at = time.monotonic()
        self._held = True

    def sent(self) -> None:
        """The request has been written (or failed): the pacer stamps the send and serves the next."""
        if self._held:
            self._held = False
            self._pacer.release()


class _SendSlot(threading.local):
    """Per thread: the slot the next request written on this thread must take."""

    current: _Slot | None = None


_send_slot = _SendSlot()


class _TakesSlotOnWrite:
    """Mixin for a urllib3 connection: a request with a pending slot (``_send_slot``) connects first, then
    takes the slot right before the write and stamps it once written; the slot covers the write only."""

    def request(self, *args: Any, **kwargs: Any) -> None:
        slot = _send_slot.current
        if slot is None:
            super().request(*args, **kwargs)
            return
        _send_slot.current = None
        if self.sock is None:
            self.connect()
        slot.take()
        try:
            super().request(*args, **kwargs)
        finally:
            slot.sent()


class _SignallingHTTPConnection(_TakesSlotOnWrite, urllib3.connection.HTTPConnection):
    pass


class _SignallingHTTPSConnection(_TakesSlotOnWrite, urllib3.connection.HTTPSConnection):
    pass


class _SignallingHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _SignallingHTTPConnection


class _SignallingHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _SignallingHTTPSConnection


_SIGNALLING_POOLS = {"http": _SignallingHTTPPool, "https": _SignallingHTTPSPool}


class _PacedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections take the pacer's slot right before they write a request and
    stamp it once written. Where that cannot be wired (e.g. a SOCKS proxy), the slot is taken before
    the request and released when the response arrives instead: slower, never faster than the pace."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_SIGNALLING_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if getattr(manager, "pool_classes_by_scheme", None) == urllib3.poolmanager.pool_classes_by_scheme:
            manager.pool_classes_by_scheme = dict(_SIGNALLING_POOLS)
        return manager


def _page_text(page: int | None) -> str:
    return "" if page is None else f" page {page}"


def _ceil_epoch(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = moment.timestamp()
    whole = int(seconds)
    return whole if whole == seconds else whole + (1 if seconds > 0 else 0)


def _decode(content: bytes) -> tuple[object, str]:
    """The decoded JSON of a 200 body, or (None, why it cannot be read): empty, cut-off or non-JSON
    bodies, which a proxy or a dropped connection produced and a retry usually fixes."""
    if not content.strip():
        return None, "an empty body with HTTP 200"
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError) as exc:
        return (
            None,
            f"a body that is not valid JSON ({type(exc).__name__} at char {getattr(exc, 'pos', '?')})",
        )
    if body is None:
        return None, "a JSON null body"
    return body, ""


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


_QUERY_RE = re.compile(r"\?[^\s'\")]*")


def _describe(exc: BaseException, token: str) -> str:
    """A short, token-free description of a requests exception: class name and reason, query strings
    cut out (they can hold hundreds of ids), at most 200 characters."""
    text = _QUERY_RE.sub("?...", str(exc))
    text = redact(text, token)
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _auth_error(status: int, path: str, page: int | None) -> KommoAuthError:
    where = f"GET {path}{_page_text(page)}"
    if status == 401:
        message = (
            f"Kommo rejected the access token (HTTP 401) on {where}: it is revoked or expired. "
            "Create a new long-lived token and set KOMMO_ACCESS_TOKEN."
        )
    else:
        message = (
            f"Kommo refused access (HTTP 403) on {where}: the account is blocked for exceeding the API "
            "rate limit, or requests from this IP address are not allowed. Contact Kommo support to "
            "unblock it; do not retry until then, as retries prolong a block."
        )
    return KommoAuthError(message, method="GET", path=path, page=page, status=status)


def _unexpected_status_error(
    status: int, path: str, page: int | None, response: requests.Response, token: str
) -> KommoResponseError:
    where = f"GET {path}{_page_text(page)}"
    if 300 <= status < 400:
        hint = (
            "Kommo redirected the request; check KOMMO_BASE_URL (use https://<subdomain>.kommo.com, "
            "not www.kommo.com)."
        )
    else:
        detail = ""
        if "json" in (response.headers.get("Content-Type") or ""):
            try:
                problem = response.json()
            except ValueError:
                problem = None
            if isinstance(problem, dict):
                parts = [str(problem.get(key)) for key in ("title", "detail") if problem.get(key)]
                detail = ": " + "; ".join(parts)[:200] if parts else ""
        hint = f"Kommo answered{detail}. Check KOMMO_BASE_URL and the request; this is not retried."
    message = redact(f"Unexpected HTTP {status} on {where}. {hint}", token)
    return KommoResponseError(message, method="GET", path=path, page=page, status=status)


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()
