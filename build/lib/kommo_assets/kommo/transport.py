"""HTTP transport to Kommo: one keep-alive session, paced sends, retries with backoff and Retry-After,
and the counters behind :class:`ClientStats`.

Retries (exponential backoff with full jitter, at least 0.2x the cap; ``max_retries`` after the first
attempt): 408, 429, 500, 502, 503, 504, dropped connections, timeouts, and 200s whose body is empty, cut
off or not JSON. A ``Retry-After`` up to ``RETRY_AFTER_CAP_S`` is waited out; a longer one fails at once.
A 429 also pushes back every thread's next slot and lowers the pace by 10% (once per burst, down to half
of ``max_rps``); after 30 s without another, the pace rises again by 5% steps up to ``max_rps``.
401/403 raise :class:`KommoAuthError` at once; other 4xx, redirects (not followed: the token must not
travel) and bodies that will never read raise :class:`KommoResponseError`.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import requests

from kommo_assets.kommo.errors import KommoCancelled, KommoUnavailableError, redact
from kommo_assets.kommo.pacing import PACE_CATCH_UP, PacedAdapter, Pacer, Slot, write_pacing_possible
from kommo_assets.kommo.responses import (
    auth_error,
    decode_object,
    describe,
    error_body,
    page_text,
    retry_after_seconds,
    unexpected_status_error,
)

logger = logging.getLogger("kommo_assets.kommo")

USER_AGENT = "kommo-assets/0.1 (Kommo full refresh; python-requests)"
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# After a 429 the pace drops by this factor (once per burst), to no less than this share of max_rps.
THROTTLE_SLOWDOWN = 0.9
MIN_PACE_FRACTION = 0.5
# After a 429 has not recurred for this long, the pace rises again by this factor, up to max_rps.
RECOVER_QUIET_S = 30.0
RECOVER_FACTOR = 1.05
# A Retry-After larger than this is not waited out inside one run: the run fails and can be retried.
RETRY_AFTER_CAP_S = 300.0


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


class _Counters:
    """What every attempt did, counted from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = 0
        self._by_status: dict[int, int] = {}
        self._retries = 0
        self._throttled = 0
        self._errors = 0
        self._bytes = 0
        self._first_sent: float | None = None
        self._last_sent = 0.0
        self.earliest_date: datetime | None = None
        self.last_date: datetime | None = None

    def answered(self, date_header: str | None) -> None:
        """Notes the ``Date`` of an answer: Kommo's clock, which an incremental sync's cursor is taken from."""
        moment = http_date(date_header)
        if moment is None:
            return
        with self._lock:
            self.earliest_date = moment if self.earliest_date is None else min(self.earliest_date, moment)
            self.last_date = moment if self.last_date is None else max(self.last_date, moment)

    def attempt(self, *, status: int | None, nbytes: int, sent_at: float | None) -> None:
        with self._lock:
            self._requests += 1
            if status is None:
                self._errors += 1
            else:
                self._by_status[status] = self._by_status.get(status, 0) + 1
                self._throttled += status == 429
            self._bytes += nbytes
            if sent_at is not None:
                self._first_sent = sent_at if self._first_sent is None else self._first_sent
                self._last_sent = max(self._last_sent, sent_at)

    def unreadable(self) -> None:
        with self._lock:
            self._errors += 1

    def retry(self) -> None:
        with self._lock:
            self._retries += 1

    def snapshot(self) -> ClientStats:
        with self._lock:
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


def http_date(value: str | None) -> datetime | None:
    """An HTTP ``Date`` header as an aware datetime (UTC), or None when there is none or it cannot be read."""
    if not value:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


T = TypeVar("T")


def confirmed(ask: Callable[[], T | None], what: str) -> T | None:
    """The answer of ``ask`` (None: an answer of nothing, such as a 204 or an empty list), an empty one
    asked once more before it is believed: Kommo (or a proxy in front of it) sometimes answers 204 where
    there is data, and on a feed that would silently drop changes. The one way every feed confirms an
    empty answer; ``what`` names the request in the log."""
    answer = ask()
    if answer is None:
        logger.info("Kommo answered %s with nothing; asking once more before believing it", what)
        answer = ask()
    return answer


@dataclass(frozen=True)
class _Retry:
    """An attempt that may be retried: why it failed, and how long Kommo asked to wait, if it did."""

    failure: str
    status: int | None = None
    retry_after: float | None = None


class Transport:
    """Paced, retrying GETs to one Kommo account, from any number of threads.

    Every attempt of every request takes a slot of one :class:`Pacer` at ``max_rps``, right before it is
    written (see :class:`PacedAdapter`). The token goes only into the ``Authorization`` header and is
    redacted from every message.
    """

    def __init__(self, base_url: str, token: str, *, max_rps: float, pool_size: int, timeout: float,
                 max_retries: int, backoff_base: float, backoff_max: float) -> None:
        self.base_url = base_url
        self.max_rps = max_rps
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.closed = threading.Event()
        self._token = token
        self._pacer = Pacer(max_rps, window=max(1, math.ceil(max_rps)), catch_up=PACE_CATCH_UP)
        self._counters = _Counters()
        self._session = requests.Session()
        adapter = PacedAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self._session.headers.update(
            {"Authorization": f"Bearer {token}", "Accept": "application/hal+json", "User-Agent": USER_AGENT}
        )
        # Slots are taken inside the connection, right before the write; a proxy whose connections
        # cannot report that (SOCKS) takes them before the request instead (slower, never faster).
        self._paced_on_write = write_pacing_possible(self._session, base_url)

    def close(self) -> None:
        """Closes the session; requests still waiting for a slot or a backoff give up."""
        self.closed.set()
        self._session.close()

    @property
    def stats(self) -> ClientStats:
        return self._counters.snapshot()

    @property
    def earliest_answer_date(self) -> datetime | None:
        """The earliest ``Date`` Kommo has answered with so far: never later than its first answer's, unless
        every answer so far was ahead (a Date ahead on one answer, from a proxy, cannot move it forward)."""
        return self._counters.earliest_date

    @property
    def last_answer_date(self) -> datetime | None:
        """The latest ``Date`` Kommo has answered with so far."""
        return self._counters.last_date

    def get(self, path: str, params: list[tuple[str, str]], *, page: int | None = None,
            cancel: threading.Event | None = None, none_on_404: bool = False) -> dict | None:
        """GETs ``path`` with retries; returns the decoded JSON object, or None for 204 (no content).

        Exceptions are raised outside every ``except`` block, so no requests exception (whose request
        object holds the Authorization header) ends up in ``__cause__`` or ``__context__``.
        """
        stop = cancel if cancel is not None else self.closed
        attempts = self.max_retries + 1
        outcome = _Retry("no attempt")
        last_status: int | None = None
        for attempt in range(1, attempts + 1):
            if self.closed.is_set() or stop.is_set():
                raise KommoCancelled()
            outcome = self._attempt(path, params, page, stop, none_on_404)
            if not isinstance(outcome, _Retry):
                return outcome
            last_status = outcome.status if outcome.status is not None else last_status
            if attempt == attempts:
                break
            self._pause(outcome, attempt, attempts, f"GET {path}{page_text(page)}", stop)
        raise KommoUnavailableError(
            redact(
                f"Kommo kept failing ({outcome.failure}) on GET {path}{page_text(page)} after {attempts} "
                "attempts; the run can be retried later.",
                self._token,
            ),
            method="GET", path=path, page=page, status=last_status,
        )

    def get_confirmed(self, path: str, params: list[tuple[str, str]], **options: Any) -> dict | None:
        """:meth:`get`, asking once more before believing an answer of nothing (204, or 404 with
        ``none_on_404``): where something is expected, a spurious empty answer would silently drop data."""
        return confirmed(lambda: self.get(path, params, **options), f"GET {path}")

    def _attempt(self, path: str, params: list[tuple[str, str]], page: int | None, stop: threading.Event,
                 none_on_404: bool) -> dict | None | _Retry:
        """One paced attempt: the body, None (204, or 404 with ``none_on_404``), or a retryable failure."""
        response, content, failure = self._send(path, params, page, stop)
        if response is None:
            return _Retry(failure)
        status = response.status_code
        if status == 204 or (status == 404 and none_on_404):
            return None
        if status == 200:
            body, failure = decode_object(content, path, page)
            if body is not None:
                return body
            self._counters.unreadable()
            return _Retry(failure, status)
        if status in (401, 403):
            raise auth_error(status, path, page)
        if status not in RETRYABLE_STATUSES:
            raise unexpected_status_error(status, path, page, response, self._token)
        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        if retry_after is not None and retry_after > RETRY_AFTER_CAP_S:
            raise KommoUnavailableError(
                f"Kommo answered HTTP {status} on GET {path}{page_text(page)} and asked to wait "
                f"{retry_after:.0f} s (Retry-After) before trying again, more than the "
                f"{RETRY_AFTER_CAP_S:.0f} s a run waits out; the run can be retried later.",
                method="GET", path=path, page=page, status=status,
            )
        return _Retry(f"HTTP {status}{error_body(response, self._token)}", status, retry_after)

    def _send(self, path: str, params: list[tuple[str, str]], page: int | None,
              stop: threading.Event) -> tuple[requests.Response | None, bytes, str]:
        """Sends one request in its slot: (the response and its body, "") or (None, b"", why it failed)."""
        slot = Slot(self._pacer, stop)
        response: requests.Response | None = None
        content = b""
        failure = ""
        try:
            with slot.covering(on_write=self._paced_on_write):
                response = self._session.get(
                    self.base_url + path, params=params, timeout=self.timeout, allow_redirects=False
                )
            content = response.content
        except requests.Timeout:
            failure = f"no response within {self.timeout:g} s"
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            failure = f"the connection failed or was cut off: {describe(exc, self._token)}"
        except requests.RequestException as exc:
            failure = f"the request failed: {describe(exc, self._token)}"
        if response is not None and not slot.granted:
            # The request went out through a connection that did not take a slot (a proxy type not
            # wired for it): one request was unpaced; from now on slots come before requests.
            logger.warning("Kommo: requests to %s bypass write pacing; pacing before each request",
                           self.base_url)
            self._paced_on_write = False
        status = None if response is None or failure else response.status_code
        elapsed_ms = (time.monotonic() - (slot.granted_at or time.monotonic())) * 1000
        logger.debug("GET %s%s -> %s in %.0f ms", path, page_text(page), status or "no response", elapsed_ms)
        self._counters.attempt(status=status, nbytes=0 if status is None else len(content),
                               sent_at=slot.granted_at)
        if status is None:
            return None, b"", failure
        if status < 400:
            # Only Kommo's own answers set its clock: a 429 or 5xx may come from a proxy in between.
            self._counters.answered(response.headers.get("Date"))
            before = self._pacer.rate
            after = self._pacer.recover(RECOVER_FACTOR, quiet_s=RECOVER_QUIET_S)
            if after > before:
                logger.info("Kommo: no 429 for %.0f s; pacing up to %.2f requests/s", RECOVER_QUIET_S, after)
        return response, content, ""

    def _pause(self, outcome: _Retry, attempt: int, attempts: int, where: str, stop: threading.Event) -> None:
        """Waits before the next attempt: a backoff, at least what Kommo asked for."""
        cap = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        # Full jitter spreads the threads out; the floor keeps a retry from firing right back.
        delay = random.uniform(0.2 * cap, cap)
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        self._counters.retry()
        logger.warning("Kommo: %s on %s (attempt %d of %d); retrying in %.2f s",
                       outcome.failure, where, attempt, attempts, delay)
        if outcome.status == 429:
            # Every thread cools down, not only this one: the account-wide limit was hit. The next
            # acquire() waits the penalty out. The pace drops too, so a limit that is lower than ours
            # (another integration sharing the account's quota) stops costing 429s.
            self._pacer.penalize(delay)
            before = self._pacer.rate
            after = self._pacer.slow_down(THROTTLE_SLOWDOWN, floor=self.max_rps * MIN_PACE_FRACTION)
            if after < before:
                logger.warning("Kommo throttled the client: pacing down to %.2f requests/s", after)
        elif stop.wait(delay):
            raise KommoCancelled()
