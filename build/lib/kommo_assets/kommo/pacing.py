"""Wire pacing: a thread-safe pacer that spaces request sends under Kommo's requests-per-second limit,
and the HTTP adapter whose connections take its slot right before they write a request.

Kommo allows 7 requests/s and blocks accounts that keep exceeding it, so the client never bursts past
the limit: every send (retries included) takes a slot, slots follow a steady schedule of ``1/rate``,
and any ``window + 1`` consecutive sends span at least ``window/rate`` seconds, measured between the
moments the requests were really written.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import requests
import urllib3
import urllib3.connection
import urllib3.poolmanager
from requests.adapters import HTTPAdapter

from kommo_assets.kommo.errors import KommoCancelled

# Longest single sleep while a cancel event is being watched, so a cancelled waiter leaves promptly.
_CANCEL_POLL_S = 0.05

# The pace: under Kommo's 7 requests/s with a margin, since its limiter counts arrivals and the network
# moves requests closer together. With the window rule of the pacer, 8 sends never fall within 1.0145 s
# of each other on the wire: the network must bring them 14.5 ms closer within a second for Kommo to see
# an 8th. If it does, the 429 slows every thread down (see the transport) until things stay quiet. A
# wider margin is a lower KOMMO_MAX_RPS (6.8: 29 ms), at about 1.5% of the run each 0.1.
DEFAULT_MAX_RPS = 6.9
# The pacer may make up this share of an interval when a send was late (the window rule still holds).
PACE_CATCH_UP = 0.5


class Pacer:
    """Hands out send slots at ``rate_per_second``, shared by every thread of a client.

    Two rules decide when the next slot is due; a slot is granted when both allow it:

    * **the schedule**: slots are planned ``1/rate`` apart. With ``catch_up=0`` (the default) the next
      slot is planned from the moment the previous one was granted, so N acquires take (N-1)/rate
      seconds and a late grant delays every later one. With ``catch_up=c`` (0 < c < 1) a late grant
      may be made up: the next slot is planned ``1/rate`` after the previous *planned* slot, but never
      sooner than ``(1 - c)/rate`` after the previous grant. Idle time is never banked: after a pause
      the schedule restarts from the first new grant.
    * **the window**: any ``window + 1`` consecutive sends span at least ``window/rate`` seconds. With
      ``window = 7`` and a rate of 6.9/s, no 8 sends ever fall within 1.0145 s, so a server that allows
      7 requests in any sliding second never sees an 8th, even while the schedule catches up. A send
      is stamped when its request was written (see ``hold``), which makes the rule hold on the wire.

    Waiters queue on a lock and only the head of the queue sleeps, so two threads never squeeze the
    same slot. ``acquire(hold=True)`` keeps the queue until ``release()``, called the moment the
    request has really been written; the send is stamped then (and with ``window = 1`` the next slot
    is ``1/rate`` after it), so a pause between grant and write (garbage collection, a busy GIL)
    delays the next send instead of squeezing it.

    ``penalize(seconds)`` pushes every future slot back (after a 429, so all threads cool down,
    including one already waiting for its slot); ``slow_down()`` lowers the rate for a limit that turns
    out lower than configured, and ``recover()`` raises it back step by step once things stay quiet.

    ``clock`` (monotonic seconds) and ``sleep`` can be injected for tests.
    """

    def __init__(
        self,
        rate_per_second: float,
        *,
        window: int = 1,
        catch_up: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate_per_second > 0:
            raise ValueError(f"rate_per_second must be positive, got {rate_per_second!r}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window!r}")
        if not 0.0 <= catch_up < 1.0:
            raise ValueError(f"catch_up must be in [0, 1), got {catch_up!r}")
        self.rate = float(rate_per_second)
        self.base_rate = self.rate
        self.interval = 1.0 / self.rate
        self.window = int(window)
        self.catch_up = float(catch_up)
        self._clock = clock
        self._sleep = sleep
        self._turn = threading.Lock()  # the queue of waiters: only its holder sleeps toward the slot
        self._state = threading.Lock()  # guards the fields below, also taken by penalize()
        self._next_slot: float | None = None  # the schedule: when the next slot is planned
        self._not_before: float | None = None  # a penalty: no slot before this
        self._sends: deque[float] = deque(maxlen=self.window)  # stamps of the latest sends
        self._slowed_at: float | None = None
        self._recovered_at: float | None = None

    def __repr__(self) -> str:
        return f"Pacer(rate_per_second={self.rate}, window={self.window}, catch_up={self.catch_up})"

    def _due(self) -> float | None:
        """When the next slot may be granted (None: at once). Caller holds ``_state``."""
        due = self._next_slot
        if len(self._sends) == self.window:
            span = self._sends[0] + self.window * self.interval
            due = span if due is None else max(due, span)
        if self._not_before is not None:
            due = self._not_before if due is None else max(due, self._not_before)
        return due

    def acquire(self, cancel: threading.Event | None = None, *, hold: bool = False) -> bool:
        """Blocks until the next send slot and claims it.

        Returns True when the slot was granted, False when ``cancel`` was set while waiting (the caller
        should then give up without sending). With ``hold=True`` a granted caller must call
        :meth:`release` once its request is on the wire (or has failed); until then nobody else gets a
        slot.
        """
        if cancel is None:
            self._turn.acquire()
        else:
            while not self._turn.acquire(timeout=_CANCEL_POLL_S):
                if cancel.is_set():
                    return False
        granted = False
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    return False
                with self._state:
                    now = self._clock()
                    due = self._due()
                    wait = 0.0 if due is None else due - now
                    if wait <= 0:
                        planned = self._next_slot
                        earliest = now + self.interval * (1.0 - self.catch_up)
                        if planned is None or self.catch_up == 0.0 or now - planned >= self.interval:
                            # No backlog to make up (or idle since): plan from this grant.
                            self._next_slot = now + self.interval
                        else:
                            self._next_slot = max(planned + self.interval, earliest)
                        if not hold:  # a held slot is stamped by release(), once written
                            self._sends.append(now)
                        granted = True
                        return True
                # Re-read after sleeping: penalize() may have moved the slot while we slept.
                self._sleep(wait if cancel is None else min(wait, _CANCEL_POLL_S))
        finally:
            if not (granted and hold):
                self._turn.release()

    def release(self) -> None:
        """Ends a held slot (see ``acquire(hold=True)``): the send is stamped now."""
        with self._state:
            now = self._clock()
            self._sends.append(now)
            if self.window == 1 and (self._next_slot is None or self._next_slot < now + self.interval):
                self._next_slot = now + self.interval
        self._turn.release()

    def slow_down(self, factor: float, *, floor: float, min_gap_s: float = 1.0) -> float:
        """Multiplies the rate by ``factor`` (< 1), never below ``floor``; returns the new rate.

        Calls within ``min_gap_s`` of the last reduction are ignored, so one burst of 429s (every
        thread in flight gets one) lowers the rate once.
        """
        with self._state:
            now = self._clock()
            if self._slowed_at is not None and now - self._slowed_at < min_gap_s:
                return self.rate
            self._slowed_at = now
            self.rate = max(floor, self.rate * factor)
            self.interval = 1.0 / self.rate
            return self.rate

    def recover(self, factor: float, *, quiet_s: float) -> float:
        """After ``quiet_s`` without a slow-down (and between two raises), multiplies the rate by
        ``factor`` (> 1), never above the rate the pacer was built with; returns the rate."""
        with self._state:
            if self.rate >= self.base_rate or self._slowed_at is None:
                return self.rate
            now = self._clock()
            last = max(self._slowed_at, self._recovered_at or self._slowed_at)
            if now - last < quiet_s:
                return self.rate
            self._recovered_at = now
            self.rate = min(self.base_rate, self.rate * factor)
            self.interval = 1.0 / self.rate
            return self.rate

    def penalize(self, seconds: float) -> None:
        """Pushes every future slot to at least ``seconds`` from now (never pulls a slot earlier)."""
        if seconds <= 0:
            return
        with self._state:
            until = self._clock() + seconds
            if self._not_before is None or self._not_before < until:
                self._not_before = until


def write_pacing_possible(session: requests.Session, base_url: str) -> bool:
    """Whether requests to ``base_url`` go through connections that take their slot on write: directly
    or through an HTTP(S) proxy, but not a SOCKS proxy (whose connection classes are not ours)."""
    try:
        settings = session.merge_environment_settings(base_url, {}, None, None, None)
        proxy = requests.utils.select_proxy(base_url, settings.get("proxies") or {})
    except Exception:  # noqa: BLE001 - unreadable proxy settings: the safe, slower way
        return False
    return proxy is None or urllib.parse.urlsplit(proxy).scheme.lower() in ("http", "https")


class Slot:
    """One attempt's pacer slot: taken right before the write, stamped once the request is written."""

    __slots__ = ("_cancel", "_pacer", "granted", "granted_at", "_held")

    def __init__(self, pacer: Pacer, cancel: threading.Event) -> None:
        self._pacer = pacer
        self._cancel = cancel
        self.granted = False
        self.granted_at: float | None = None
        self._held = False

    def take(self) -> None:
        """Waits for the slot; raises KommoCancelled if the attempt was abandoned."""
        if not self._pacer.acquire(self._cancel, hold=True):
            raise KommoCancelled()
        self.granted = True
        self.granted_at = time.monotonic()
        self._held = True

    def sent(self) -> None:
        """The request has been written (or failed): the pacer stamps the send and serves the next."""
        if self._held:
            self._held = False
            self._pacer.release()

    @contextlib.contextmanager
    def covering(self, *, on_write: bool) -> Iterator[None]:
        """Covers the one request sent inside the block: the slot is taken by the connection right
        before it writes (``on_write``, see :class:`PacedAdapter`) or now, and stamped once written."""
        if on_write:
            _send_slot.current = self
        else:
            self.take()
        try:
            yield
        finally:
            _send_slot.current = None
            self.sent()  # no-op if the write already stamped it


class _SendSlot(threading.local):
    """Per thread: the slot the next request written on this thread must take."""

    current: Slot | None = None


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


class PacedAdapter(HTTPAdapter):
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


# The interpreter's switch interval while the pacer's threads work (see prompt_threads).
PROMPT_SWITCH_INTERVAL_S = 0.0005


@contextlib.contextmanager
def prompt_threads() -> Iterator[None]:
    """The interpreter settings under which the pacer's threads keep the pace: process-wide, so the Kommo
    resource applies them where a run's process is set up, for as long as the run lasts.

    The threads must get the interpreter within a fraction of a millisecond when their slot is due and when
    their request has been written, also while the main thread parses and copies a page: any lag costs pace,
    because the window rule counts from the write. Two things made them lag:

    * the switch interval: with the default 5 ms a thread waits up to that long for the interpreter;
    * full garbage collections, which stop every thread while they walk every object alive, the hundreds of
      thousands that importing Dagster creates included: about 90 ms each, 25 times in a run of 500 requests.
      Those objects live as long as the process, so they are frozen (``gc.freeze``, made for this) for the
      run: collections then walk only what the run itself allocates. (Unless something else froze them
      already: then it is left to unfreeze them.)
    """
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(switch_interval, PROMPT_SWITCH_INTERVAL_S))
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        yield
    finally:
        if freeze:
            gc.unfreeze()
        sys.setswitchinterval(switch_interval)
