"""A thread-safe pacer that spaces request sends evenly under Kommo's requests-per-second limit.

Kommo allows 7 requests/s and blocks accounts that keep exceeding it, so the client never bursts:
every send (retries included) takes the next slot, and slots are at least ``1/rate`` apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# Longest single sleep while a cancel event is being watched, so a cancelled waiter leaves promptly.
_CANCEL_POLL_S = 0.05


class Pacer:
    """Hands out send slots spaced ``1/rate_per_second`` apart, shared by every thread of a client.

    The first ``acquire()`` returns at once; each later one returns no sooner than ``1/rate`` after the
    previous one, so N acquires take (N-1)/rate seconds. Waiters queue on a lock and only the head of
    the queue sleeps, so two threads never get slots closer than ``1/rate``: the next slot is measured
    from the moment the previous one was actually granted, which keeps a late wake-up from squeezing
    the following send.

    ``acquire(hold=True)`` goes further: the caller keeps the queue until it calls ``release()``, at the
    moment its request has really been written, and the next slot is measured from then. A pause
    between the grant and the write (a garbage-collection pause of a big process easily takes more
    than the 29 ms that 6.8 req/s leaves under a 7 req/s limit over 8 requests) then delays the next
    send instead of squeezing it.

    ``penalize(seconds)`` pushes every future slot back (after a 429, so all threads cool down,
    including one already waiting for its slot); ``slow_down()`` lowers the rate for good, for a limit
    that turns out lower than configured.

    ``clock`` (monotonic seconds) and ``sleep`` can be injected for tests.
    """

    def __init__(
        self,
        rate_per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate_per_second > 0:
            raise ValueError(f"rate_per_second must be positive, got {rate_per_second!r}")
        self.rate = float(rate_per_second)
        self.interval = 1.0 / self.rate
        self._clock = clock
        self._sleep = sleep
        self._turn = threading.Lock()  # the queue of waiters: only its holder sleeps toward the slot
        self._state = threading.Lock()  # guards _next_slot, also taken by penalize()
        self._next_slot: float | None = None
        self._slowed_at: float | None = None

    def __repr__(self) -> str:
        return f"Pacer(rate_per_second={self.rate})"

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
                    wait = 0.0 if self._next_slot is None else self._next_slot - now
                    if wait <= 0:
                        # Measured from the real grant time, not the planned slot: never closer than 1/rate.
                        self._next_slot = now + self.interval
                        granted = True
                        return True
                # Re-read after sleeping: penalize() may have moved the slot while we slept.
                self._sleep(wait if cancel is None else min(wait, _CANCEL_POLL_S))
        finally:
            if not (granted and hold):
                self._turn.release()

    def release(self) -> None:
        """Ends a held slot (see ``acquire(hold=True)``): the next slot is ``1/rate`` from now."""
        with self._state:
            until = self._clock() + self.interval
            if self._next_slot is None or self._next_slot < until:
                self._next_slot = until
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

    def penalize(self, seconds: float) -> None:
        """Pushes every future slot to at least ``seconds`` from now (never pulls a slot earlier)."""
        if seconds <= 0:
            return
        with self._state:
            until = self._clock() + seconds
            if self._next_slot is None or self._next_slot < until:
                self._next_slot = until
