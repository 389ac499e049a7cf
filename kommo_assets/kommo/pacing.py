"""A thread-safe pacer that spaces request sends under Kommo's requests-per-second limit.

Kommo allows 7 requests/s and blocks accounts that keep exceeding it, so the client never bursts past
the limit: every send (retries included) takes a slot, slots follow a steady schedule of ``1/rate``,
and any ``window + 1`` consecutive sends span at least ``window/rate`` seconds, measured between the
moments the requests were really written.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

# Longest single sleep while a cancel event is being watched, so a cancelled waiter leaves promptly.
_CANCEL_POLL_S = 0.05


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
