"""The account's events feed (``GET /api/v4/events``): what the simulator's mutations record.

Events are appended by the dataset's mutations, stamped with the simulator clock, and served newest
first (``created_at`` descending, then the reverse of the order they were recorded in; Kommo does not say
how it orders the events of one second, so ``EventLog.ties_oldest_first`` serves those the other way). Ids are strings
shaped like Kommo's (26 lowercase Crockford base32 characters, time first), unique and deterministic.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MAX_EVENTS_LIMIT = 100

# legacy numeric field-type codes that event values carry instead of the type names of the v4 models
FIELD_TYPE_CODES = {
    "text": 1, "numeric": 2, "checkbox": 3, "select": 4, "multiselect": 5, "date": 6, "url": 7,
    "multitext": 8, "textarea": 9, "radiobutton": 10, "streetaddress": 11, "smart_address": 13,
    "birthday": 14, "date_time": 19,
}

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_CUSTOM_FIELD_TYPE = re.compile(r"custom_field_\d+_value_changed")


def _b32(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_CROCKFORD[n & 31])
        n >>= 5
    return "".join(reversed(out))


def event_id(created_at: int, seq: int) -> str:
    """A ULID-shaped id: 48 bits of milliseconds, then 80 bits holding the recording sequence."""
    return _b32(max(0, created_at) * 1000, 10) + _b32(seq, 16)


@dataclass(frozen=True)
class Event:
    seq: int
    id: str
    type: str
    entity_type: str  # lead | contact
    entity_id: int
    created_at: int
    created_by: int
    value_after: tuple
    value_before: tuple


@dataclass(frozen=True)
class EventQuery:
    """A normalized events-list query. ``None`` means "no such filter"."""

    ids: frozenset[str] | None = None
    types: frozenset[str] | None = None
    entities: frozenset[str] | None = None
    entity_ids: frozenset[int] | None = None  # applied only with exactly one entity, as Kommo requires
    created_from: int | None = None
    created_to: int | None = None
    created_by: frozenset[int] | None = None
    # (pipeline_id, status_id) pairs of lead_status_changed events; a None half matches anything
    status_after: frozenset[tuple[int | None, int | None]] | None = None
    status_before: frozenset[tuple[int | None, int | None]] | None = None

    def matches(self, e: Event) -> bool:
        if self.ids is not None and e.id not in self.ids:
            return False
        if self.types is not None and e.type not in self.types and not (
            "custom_field_value_changed" in self.types and _CUSTOM_FIELD_TYPE.fullmatch(e.type)
        ):
            return False
        if self.entities is not None:
            if e.entity_type not in self.entities:
                return False
            if self.entity_ids is not None and len(self.entities) == 1 and e.entity_id not in self.entity_ids:
                return False
        if self.created_from is not None and e.created_at < self.created_from:
            return False
        if self.created_to is not None and e.created_at > self.created_to:
            return False
        if self.created_by is not None and e.created_by not in self.created_by:
            return False
        if self.status_after is not None and not _status_in(e.value_after, self.status_after):
            return False
        return self.status_before is None or _status_in(e.value_before, self.status_before)


def _status_in(values: tuple, pairs: frozenset) -> bool:
    for v in values:
        status = v.get("lead_status") if isinstance(v, Mapping) else None
        if status is None:
            continue
        for pipeline_id, status_id in pairs:
            if (pipeline_id is None or status["pipeline_id"] == pipeline_id) and (
                status_id is None or status["id"] == status_id
            ):
                return True
    return False


class EventLog:
    """Append-only, thread-safe."""

    def __init__(self, account_id: int) -> None:
        self.account_id = account_id
        self._lock = threading.Lock()
        self._events: list[Event] = []
        # Events of one second in the order they were recorded (oldest first) instead of the reverse.
        self.ties_oldest_first = False

    def record(self, type_: str, entity_type: str, entity_id: int, created_at: int, created_by: int,
               value_after: Iterable[dict] = (), value_before: Iterable[dict] = ()) -> Event:
        with self._lock:
            seq = len(self._events) + 1
            e = Event(seq, event_id(created_at, seq), type_, entity_type, int(entity_id), int(created_at),
                      int(created_by), tuple(value_after), tuple(value_before))
            self._events.append(e)
            return e

    def __len__(self) -> int:
        return len(self._events)

    def find(self, query: EventQuery, offset: int, limit: int) -> list[Event]:
        """One page of matching events, newest first."""
        with self._lock:
            events = list(self._events)
        hits = [e for e in events if query.matches(e)]
        tie = -1 if self.ties_oldest_first else 1
        hits.sort(key=lambda e: (e.created_at, tie * e.seq), reverse=True)
        return hits[offset:offset + limit]

    def get(self, event_id_: str) -> Event | None:
        with self._lock:
            return next((e for e in self._events if e.id == event_id_), None)

    def all(self) -> list[Event]:
        """Every event in the order recorded (ground truth for tests)."""
        with self._lock:
            return list(self._events)

    def render(self, e: Event, base_url: str) -> dict:
        collection = "leads" if e.entity_type == "lead" else f"{e.entity_type}s"
        return {
            "id": e.id,
            "type": e.type,
            "entity_id": e.entity_id,
            "entity_type": e.entity_type,
            "created_by": e.created_by,
            "created_at": e.created_at,
            "value_after": copy.deepcopy(list(e.value_after)),
            "value_before": copy.deepcopy(list(e.value_before)),
            "account_id": self.account_id,
            "_links": {"self": {"href": f"{base_url}/api/v4/events/{e.id}"}},
            "_embedded": {"entity": {"id": e.entity_id, "_links": {
                "self": {"href": f"{base_url}/api/v4/{collection}/{e.entity_id}"}}}},
        }
