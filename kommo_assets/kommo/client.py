"""The Kommo API v4 client: paging, pacing, retries and concurrency for a full export of leads.

Free of Dagster: a resource wraps it. It follows Kommo's real behaviour: 204 for empty results, short
last pages, a ``_links.next`` that may be sent on the last page too, filters that are silently
ignored, 7 requests/s with HTML 429s and usually no Retry-After, 403 for blocked accounts.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

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
# A Retry-After larger than this is not waited out inside one run: the run fails and can be retried.
RETRY_AFTER_CAP_S = 300.0

LEADS_PATH = "/api/v4/leads"
CONTACTS_PATH = "/api/v4/contacts"
PIPELINES_PATH = "/api/v4/leads/pipelines"

T = TypeVar("T")
R = TypeVar("R")


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


@dataclass
class LeadPage:
    """One page of ``/api/v4/leads`` after client-side filtering.

    ``leads`` are the raw API dicts that passed every filter; ``received`` is the raw count on the page
    before filtering; ``skipped`` counts what was dropped, by reason: ``outside_window`` (created_at
    not in [from, to)), ``excluded_status``, ``deleted`` (``is_deleted`` true), ``duplicate`` (already
    yielded on an earlier page of this iteration: data moved while paging), ``invalid`` (not an
    object, no id, or no readable created_at).
    """

    page: int
    leads: list[dict]
    received: int
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class _RawPage:
    page: int
    items: list[Any]
    ends_range: bool


class KommoClient:
    """A paced, retrying client for the parts of Kommo API v4 the import needs.

    One instance holds one keep-alive ``requests.Session`` (a pool of at least ``max_in_flight``
    connections) and one :class:`Pacer`: every attempt of every request, from any thread, takes a
    slot at ``max_rps``. Lists are fetched by up to ``max_in_flight`` threads at once within that pace.

    A slot is held until its request has actually been written to the socket, so sends are at least
    ``1/max_rps`` apart on the wire even when the process pauses (GC) between grant and write.

    Retries (with exponential backoff and full jitter, at least 0.2x the cap; at most ``max_retries``
    retries after the first attempt, so ``max_retries + 1`` attempts): 408, 429, 500, 502, 503, 504,
    dropped connections, timeouts, and 200s whose body is empty, cut off or not JSON. ``Retry-After``
    (seconds or an HTTP date, capped at 300 s) is honoured when present. A 429 also pushes back every
    thread's next slot and lowers the pace by 10% (once per burst, down to half of ``max_rps``).
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
        max_rps: float = 6.8,
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
        self._pacer = Pacer(max_rps)
        self._closed = threading.Event()
        self._stats_lock = threading.Lock()
        self._requests = 0
        self._by_status: dict[int, int] = {}
        self._retries = 0
        self._throttled = 0
        self._errors = 0
        self._bytes = 0

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

        Naive datetimes are taken as UTC. The server-side filter is
        ``filter[created_at][from]=<from>`` and ``[to]=<to - 1>`` (Kommo's range is inclusive, in
        seconds), ``order[id]=asc``; since Kommo silently ignores filters it does not understand, each
        lead is re-checked here (window, status not in ``exclude_status_ids``, not ``is_deleted``) and
        leads already yielded by this iteration are dropped.

        Pages are fetched speculatively by up to ``max_in_flight`` threads and yielded **as they
        complete, so not necessarily in page order**. Paging ends at a 204, an empty page, a page with
        fewer items than the limit, or a page without ``_links.next``; pages already in flight past the
        end come back empty and are not yielded. At most about ``2 * max_in_flight`` pages are held in
        memory. Closing the iterator early (``break``) cancels what is pending and joins the threads; a
        page that fails after retries raises from the iterator. The window is checked at once (a
        ValueError when it is empty); nothing is requested until the first ``next()``.
        """
        from_ts = _ceil_epoch(created_from)
        to_ts = _ceil_epoch(created_to)
        if to_ts <= from_ts:
            raise ValueError(
                f"empty window: created_to {created_to} is not after created_from {created_from}"
            )
        excluded = frozenset(int(status) for status in exclude_status_ids)
        return self._lead_pages(from_ts, to_ts, excluded)

    def _lead_pages(self, from_ts: int, to_ts: int, excluded: frozenset[int]) -> Iterator[LeadPage]:
        limit = self.page_size
        base_params = [
            ("limit", str(limit)),
            ("with", "contacts,catalog_elements"),
            ("filter[created_at][from]", str(from_ts)),
            ("filter[created_at][to]", str(to_ts - 1)),
            ("order[id]", "asc"),
        ]
        range_ended = threading.Event()
        end_lock = threading.Lock()
        end_pages: set[int] = set()  # pages that signalled the end (short, empty or 204)

        def page_numbers() -> Iterator[int]:
            for number in itertools.count(1):
                if range_ended.is_set():
                    return
                yield number

        def get_page(page: int, cancel: threading.Event) -> _RawPage:
            params = [*base_params, ("page", str(page))]
            body = self._get(LEADS_PATH, params, page=page, cancel=cancel)
            return (
                _RawPage(page, [], True)
                if body is None
                else self._list_page(body, "leads", LEADS_PATH, page, limit)
            )

        def fetch(page: int, cancel: threading.Event) -> _RawPage:
            raw = get_page(page, cancel)
            if raw.ends_range:
                with end_lock:
                    first_end = not any(other < page for other in end_pages)
                    end_pages.add(page)
                if not raw.items and first_end:
                    # An empty answer that would end the range where no earlier page did is asked once
                    # more: a spurious 204 (a proxy, a hiccup) must not silently cut the export short.
                    logger.info("Kommo sent no leads on GET %s page %d; asking once more", LEADS_PATH, page)
                    raw = get_page(page, cancel)
                    if raw.items and not raw.ends_range:
                        with end_lock:
                            end_pages.discard(page)
                if raw.ends_range:
                    range_ended.set()
            return raw

        seen: set[int] = set()
        for raw in self._fan_out(page_numbers(), fetch, "kommo-leads"):
            if not raw.items:
                continue
            yield self._filter_leads(raw, from_ts, to_ts, excluded, seen)

    @staticmethod
    def _filter_leads(
        raw: _RawPage, from_ts: int, to_ts: int, excluded: frozenset[int], seen: set[int]
    ) -> LeadPage:
        kept: list[dict] = []
        skipped: dict[str, int] = {}

        def skip(reason: str) -> None:
            skipped[reason] = skipped.get(reason, 0) + 1

        for lead in raw.items:
            if not isinstance(lead, dict):
                skip("invalid")
                continue
            lead_id = positive_int(lead.get("id"))
            created = extract_kommo_epoch(lead.get("created_at"))
            if lead_id is None or created is None:
                skip("invalid")
            elif not from_ts <= created.timestamp() < to_ts:
                skip("outside_window")
            elif positive_int(lead.get("status_id")) in excluded:
                skip("excluded_status")
            elif lead.get("is_deleted") is True:
                skip("deleted")
            elif lead_id in seen:
                skip("duplicate")
            else:
                seen.add(lead_id)
                kept.append(lead)
        return LeadPage(page=raw.page, leads=kept, received=len(raw.items), skipped=skipped)

    # --- contacts ---------------------------------------------------------------------------------

    def iter_contact_batches(
        self, contact_ids: Iterable[int], *, batch_size: int = 250
    ) -> Iterator[list[dict]]:
        """Yields the contacts for ``contact_ids``, one list per batch of ids.

        Ids are made distinct (first occurrence keeps its place; None and anything that is not a
        positive integer is ignored, so ``main_contact_id`` results can be passed as they are) and cut
        into batches of
        ``batch_size``; each batch is ``GET /api/v4/contacts?filter[id][]=...`` paged until a 204, a
        short page, or every id of the batch was seen. Batches are fetched concurrently within the pace
        and yielded as they complete (not in order). Ids Kommo does not return (deleted contacts) are
        simply absent; contacts Kommo returns that were not asked for are dropped, and a batch that
        keeps paging beyond what its ids can fill means Kommo ignored the filter:
        :class:`KommoResponseError`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        usable = (positive_int(contact_id) for contact_id in contact_ids)
        distinct = list(dict.fromkeys(contact_id for contact_id in usable if contact_id is not None))
        batches = (distinct[start : start + batch_size] for start in range(0, len(distinct), batch_size))
        return self._fan_out(batches, self._fetch_contact_batch, "kommo-contacts")

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

    def get_custom_field(self, field_id: int) -> dict | None:
        """The definition of lead custom field ``field_id`` (``GET /api/v4/leads/custom_fields/{id}``),
        or None when Kommo says it does not exist (204 or 404)."""
        path = f"/api/v4/leads/custom_fields/{int(field_id)}"
        body = self._get(path, [], none_on_404=True)
        if body is None:  # confirm: a spurious 204 here would silently drop every vehicle name
            body = self._get(path, [], none_on_404=True)
        return body

    def field_enums(self, field_id: int) -> dict[int, str]:
        """``enum_id -> value`` of a select/multiselect lead field; {} (with a warning) when the field
        does not exist or has no enums. Enums without a usable id are skipped; values are str()."""
        definition = self.get_custom_field(field_id)
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

    def _fan_out(
        self, tasks: Iterator[T], fetch: Callable[[T, threading.Event], R], name: str
    ) -> Iterator[R]:
        """Runs ``fetch`` over ``tasks`` on up to ``max_in_flight`` threads and yields results as they
        complete (ties in submission order). ``tasks`` is pulled lazily, only to refill free slots, so a
        task iterator that stops ends the scheduling. Any error cancels the rest and propagates; closing
        the generator cancels pending work and joins the threads."""
        cancel = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix=name)
        pending: dict[Future[R], int] = {}
        order = itertools.count()

        def refill() -> None:
            while len(pending) < self.max_in_flight:
                task = next(tasks, _END)
                if task is _END:
                    return
                pending[pool.submit(fetch, task, cancel)] = next(order)

        try:
            refill()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                ready = sorted(done, key=pending.__getitem__)
                for future in ready:
                    del pending[future]
                results = [future.result() for future in ready]
                # Refill before handing results over, so the pool keeps working while the caller does.
                refill()
                yield from results
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
    ) -> dict | None:
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
            if self._closed.is_set() or stop.is_set() or not self._pacer.acquire(stop, hold=True):
                raise _Cancelled()
            started = time.monotonic()
            response: requests.Response | None = None
            failure = ""
            try:
                # The slot is held until the request is written (see _SentSignal), so a pause
                # between the grant and the write delays the next send instead of squeezing it.
                _sent_signal.arm(self._pacer.release)
                try:
                    response = self._session.get(
                        url, params=params, timeout=self.timeout, allow_redirects=False
                    )
                finally:
                    _sent_signal.fire()  # no-op if the write already released it
                content = response.content
            except requests.Timeout:
                failure = f"no response within {self.timeout:g} s"
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                failure = f"the connection failed or was cut off: {_describe(exc, self._token)}"
            except requests.RequestException as exc:
                failure = f"the request failed: {_describe(exc, self._token)}"
            elapsed_ms = (time.monotonic() - started) * 1000
            status = None if response is None or failure else response.status_code
            logger.debug(
                "GET %s%s -> %s in %.0f ms", path, _page_text(page), status or "no response", elapsed_ms
            )
            self._count(status=status, error=status is None, nbytes=0 if status is None else len(content))

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


_END: Any = object()


class _SentSignal(threading.local):
    """Per thread: what to call once the current request has been written to the socket."""

    callback: Callable[[], None] | None = None

    def arm(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def fire(self) -> None:
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()


_sent_signal = _SentSignal()


class _SignallingHTTPConnection(urllib3.connection.HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().request(*args, **kwargs)
        finally:
            _sent_signal.fire()


class _SignallingHTTPSConnection(urllib3.connection.HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().request(*args, **kwargs)
        finally:
            _sent_signal.fire()


class _SignallingHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _SignallingHTTPConnection


class _SignallingHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _SignallingHTTPSConnection


_SIGNALLING_POOLS = {"http": _SignallingHTTPPool, "https": _SignallingHTTPSPool}


class _PacedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections report the moment a request has been written (to release the
    pacer's slot then). Where the report cannot be wired (e.g. a SOCKS proxy), the slot is released
    when the response arrives instead: slower, never faster than the pace."""

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
