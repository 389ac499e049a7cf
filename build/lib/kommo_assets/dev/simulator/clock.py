"""The simulated account's clock: what Kommo's servers would stamp on ``updated_at`` and on events.

By default it follows real time, never reading earlier than the account's "today" (the newest generated
``updated_at``), so every change made through the simulator is newer than the generated history. Tests
can freeze it at a second (``set``), move it forward (``advance``) and let it run again (``resume``), to
make several changes within one second or to step time deterministically.
"""

from __future__ import annotations

import threading
import time


class Clock:
    """Thread-safe; ``now()`` is an int of Unix seconds, as Kommo stamps them."""

    def __init__(self, floor: int = 0) -> None:
        self._lock = threading.Lock()
        self._frozen: float | None = None
        # a real clock behind the account's "today" would stamp changes older than the history
        self._offset = max(0.0, float(floor) - time.time())

    def time(self) -> float:
        """The current simulated time in (fractional) seconds; the HTTP ``Date`` header uses it."""
        with self._lock:
            return self._frozen if self._frozen is not None else time.time() + self._offset

    def now(self) -> int:
        return int(self.time())

    @property
    def frozen(self) -> bool:
        with self._lock:
            return self._frozen is not None

    def set(self, ts: float, *, tick: bool = False) -> int:
        """Moves the clock to ``ts`` (either direction). Frozen there unless ``tick``, then it runs in
        real time from ``ts``. Returns the new reading."""
        ts = float(ts)
        with self._lock:
            if tick:
                self._frozen = None
                self._offset = ts - time.time()
            else:
                self._frozen = ts
        return self.now()

    def advance(self, seconds: float) -> int:
        """Moves the clock forward by ``seconds`` (a frozen clock stays frozen). Returns the new reading."""
        seconds = float(seconds)
        if seconds < 0:
            raise ValueError("the clock only moves forward; use set() to go back")
        with self._lock:
            if self._frozen is not None:
                self._frozen += seconds
            else:
                self._offset += seconds
        return self.now()

    def resume(self) -> int:
        """Lets a frozen clock run again from where it stands. Returns the reading."""
        with self._lock:
            if self._frozen is not None:
                self._offset = self._frozen - time.time()
                self._frozen = None
        return self.now()

    def state(self) -> dict:
        with self._lock:
            frozen = self._frozen is not None
        return {"now": self.now(), "frozen": frozen}
