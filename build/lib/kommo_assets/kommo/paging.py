"""Keyset paging of Kommo's lead list, as a state machine without HTTP: it says which request to make
next (:meth:`KeysetPaging.take`) and is fed each answer (:meth:`KeysetPaging.feed`), which it turns into
a :class:`LeadPage` of leads passed on exactly once.

Offset paging (``page=N``) loses a lead whenever the list shifts while it is read: a lead deleted on an
earlier page moves every later one up, and the one crossing a page boundary is never listed (with pages
fetched concurrently, an insertion does the same). So the range is read as chains of requests
``filter[<key>][from]=<cursor>`` ordered by ``<key>``, the cursor moving to the last ``<key>`` listed:
a lead that exists from the start to the end of the export is listed whatever else is deleted, restored
or added meanwhile. The key is a timestamp field of the lead: ``created_at`` over a closed window for a
full export; ``updated_at`` from a moment on (open-ended) works the same way.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kommo_assets.kommo.errors import KommoResponseError
from kommo_assets.kommo.fields import extract_kommo_epoch, positive_int
from kommo_assets.kommo.responses import ListPage

logger = logging.getLogger("kommo_assets.kommo")

LEADS_PATH = "/api/v4/leads"
# A finished chain takes half of what the longest one has left when that is at least this many pages.
SPLIT_MIN_PAGES = 4
# A second with more than a page of leads is read in passes until two agree; this many at most.
MAX_SECOND_PASSES = 4


def ceil_epoch(moment: datetime) -> int:
    """``moment`` in whole epoch seconds, rounded up (naive datetimes are UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = moment.timestamp()
    whole = int(seconds)
    return whole if whole == seconds else whole + (1 if seconds > 0 else 0)


@dataclass(frozen=True)
class KeyRange:
    """The leads to page over: ``start <= lead[key] < end`` in epoch seconds; ``end`` None is open-ended."""

    key: str  # a timestamp field Kommo filters and orders by: "created_at", "updated_at"
    start: int
    end: int | None = None

    @classmethod
    def between(cls, key: str, start: datetime, end: datetime | None) -> KeyRange:
        """The range of ``[start, end)`` rounded up to whole seconds; a ValueError when it is empty."""
        keys = cls(key, ceil_epoch(start), None if end is None else ceil_epoch(end))
        if keys.end is not None and keys.end <= keys.start:
            raise ValueError(f"empty window: {key} to {end} is not after {key} from {start}")
        return keys


@dataclass
class LeadPage:
    """One page of ``/api/v4/leads`` after client-side filtering.

    ``leads`` are the raw API dicts that passed every filter; ``received`` is how many leads the page
    listed before filtering, not counting those listed again from the page before (the leads of the
    keyset cursor's second) or beyond its slice's end after a split; ``page`` numbers the lead requests
    of the export in the order they were made. ``skipped`` counts what was dropped, by reason:
    ``outside_window`` (the key not in [start, end)), ``excluded_status``, ``deleted`` (``is_deleted``
    true), ``duplicate`` (the same lead twice on this page: the most recently updated copy is kept),
    ``invalid`` (not an object, no id, or no readable key).
    """

    page: int
    leads: list[dict]
    received: int
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class Slice:
    """One part of the range, ``start <= key < end``, read as a chain of keyset requests."""

    start: int
    end: int | None  # exclusive (None: open-ended); lowered when the slice is split
    cursor: int  # inclusive lower bound of the next request
    seen_at_cursor: dict[int, float] = field(default_factory=dict)  # id -> updated_at, leads at the cursor
    second_page: int = 0  # > 0 while one second holds more leads than a page: offset paging inside it
    second_passes: int = 0  # passes over that second so far (see KeysetPaging._on_second_page)
    pass_ids: set[int] = field(default_factory=set)  # ids of that second listed in the current pass
    last_pass_ids: set[int] | None = None  # and in the pass before
    busy: bool = False
    done: bool = False
    requests: int = 0
    received: int = 0  # leads listed in [start, cursor): the slice's density, for splitting
    last_full: bool = False  # the previous answer was a full page


@dataclass(frozen=True, eq=False)
class PageRequest:
    """The next request of a slice: ``params`` of ``GET /api/v4/leads``, asking for leads whose key is in
    ``[key_from, key_to]`` (inclusive; ``key_to`` None: no upper bound)."""

    slice: Slice
    number: int  # the request's number in the export (LeadPage.page, messages)
    params: list[tuple[str, str]]
    key_from: int
    key_to: int | None
    after_full: bool  # the slice's previous answer was a full page
    in_second: bool  # offset paging inside one second


def updated_at(lead: dict) -> float:
    moment = extract_kommo_epoch(lead.get("updated_at"))
    return float("-inf") if moment is None else moment.timestamp()


class KeysetPaging:
    """The leads of one key range, read in slices by keyset paging.

    The cursor is inclusive (leads share seconds), so the leads of the cursor's second come again at the
    top of the next page; they are passed on only when Kommo sends a newer version. A second holding a
    full page of leads is read by offset paging inside that second alone (``order[id]``), in passes until
    two agree (see ``_on_second_page``), then the cursor moves past it.

    A closed range starts as ``chains`` equal slices read concurrently, one request in flight each. When a
    slice is finished while another still has several pages to go, the longer one is cut in two at the
    middle of what it has left (leads it had already asked for beyond the cut are dropped from its answer:
    the new slice lists them), so uneven data does not leave one chain paging alone at the end. An
    open-ended range is one chain.

    After a full page the next answer cannot be empty (it starts with the leads of the cursor's second),
    unless those leads were deleted in between: an empty answer there (asked twice, see
    :func:`~kommo_assets.kommo.transport.confirmed`) fails the export with a clear message instead of leaving a silent hole. A
    server that answers outside the requested range or out of order, or ignores ``page`` inside a crowded
    second, makes paging unsafe: that is a :class:`KommoResponseError` too.

    Leads are re-checked here since Kommo silently ignores filters it does not understand: key in range,
    status not in ``excluded``, not ``is_deleted``; a lead repeated on one page is passed on once.
    """

    def __init__(self, keys: KeyRange, *, limit: int, chains: int, excluded: frozenset[int] = frozenset(),
                 params: Sequence[tuple[str, str]] = ()) -> None:
        self.keys = keys
        self.limit = limit
        self.excluded = excluded
        self.params = list(params)
        self._verb = keys.key.removesuffix("_at")  # "leads created at ...", "leads updated at ..."
        if keys.end is None:
            self.chains = 1
            self.slices = [Slice(keys.start, None, keys.start)]
        else:
            self.chains = max(1, min(chains, keys.end - keys.start))
            edges = [keys.start + (keys.end - keys.start) * k // self.chains for k in range(self.chains + 1)]
            self.slices = [Slice(edges[k], edges[k + 1], edges[k]) for k in range(self.chains)]
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

    def take(self) -> PageRequest | None:
        """The next request to make (its slice is busy until it is fed the answer); None while every
        slice with pages left waits for an answer and none can be split."""
        idle = [s for s in self.slices if not s.busy and not s.done]
        if not idle:
            split = self._split()
            if split is None:
                return None
            idle = [split]
        s = min(idle, key=lambda x: (x.requests, x.start))  # keeps the chains level
        s.busy = True
        key = self.keys.key
        params = [("limit", str(self.limit)), *self.params, (f"filter[{key}][from]", str(s.cursor))]
        if s.second_page:
            key_to: int | None = s.cursor
            params += [(f"filter[{key}][to]", str(s.cursor)), ("order[id]", "asc"),
                       ("page", str(s.second_page))]
        else:
            key_to = None if s.end is None else s.end - 1
            params += [] if key_to is None else [(f"filter[{key}][to]", str(key_to))]
            params += [(f"order[{key}]", "asc"), ("page", "1")]
        return PageRequest(s, next(self._numbers), params, s.cursor, key_to, after_full=s.last_full,
                           in_second=bool(s.second_page))

    def _split(self) -> Slice | None:
        """A new slice cut from the one with the most pages left, when fewer than ``chains`` are left and
        that one has at least SPLIT_MIN_PAGES left by the density it has shown so far."""
        active = [s for s in self.slices if not s.done]
        if not active or len(active) >= self.chains:
            return None

        def pages_left(s: Slice) -> float:
            if s.end is None or s.second_page or s.received == 0 or s.cursor <= s.start:
                return 0.0
            return s.received / (s.cursor - s.start) * (s.end - s.cursor) / self.limit

        longest = max(active, key=pages_left)
        if pages_left(longest) < SPLIT_MIN_PAGES or longest.end is None or longest.end - longest.cursor < 2:
            return None
        middle = (longest.cursor + longest.end) // 2
        cut = Slice(middle, longest.end, middle)
        longest.end = middle
        self.slices.append(cut)
        self.splits += 1
        return cut

    def feed(self, request: PageRequest, answer: ListPage | None) -> LeadPage | None:
        """Moves the request's slice on by its answer (None: it listed no leads, twice); returns the leads
        to pass on, or None when there are none (then there is nothing to process)."""
        if answer is None:
            if request.after_full and not request.in_second:
                raise self._error(
                    request,
                    f"Kommo listed no leads {self._verb} from {_iso(request.key_from)} on GET {LEADS_PATH} "
                    f"(twice), although the page before ended with leads {self._verb} then: the listing is "
                    "inconsistent (leads deleted at that moment, or an API fault), and the export cannot "
                    "tell whether leads are missing. Nothing was changed; run the refresh again.",
                )
            answer = ListPage(request.number, [], True)
        s = request.slice
        s.busy = False
        s.requests += 1
        full = not answer.ends_range
        s.last_full = full
        # The leads the request asked for, by the key Kommo ordered them by; anything else (unreadable or
        # out-of-range key: bad data) goes on to the filter, which skips it.
        moments = [extract_kommo_epoch(lead.get(self.keys.key)) if isinstance(lead, dict) else None
                   for lead in answer.items]
        in_range = self._in_range(request, moments)
        # Leads beyond the slice's end: it was split meanwhile, and the new slice lists them.
        beyond = {position for position, ts in in_range if s.end is not None and ts >= s.end}
        previous = s.seen_at_cursor
        self._advance(request, answer, in_range, full, bool(beyond))
        if s.second_page or (full and not s.done):
            self._remember_cursor(s, answer, in_range)
        items, listed = self._new_items(answer, moments, previous, beyond)
        s.received += listed
        if not items:
            return None
        self.unprocessed += 1
        return self._filter(answer.page, items, listed)

    def on_processed(self) -> None:
        """The caller has processed a page :meth:`feed` returned."""
        self.unprocessed -= 1

    def _in_range(self, request: PageRequest, moments: list[datetime | None]) -> list[tuple[int, int]]:
        """(position on the page, key) of the leads within the requested range, checked to be in order."""
        in_range = [
            (position, int(moment.timestamp()))
            for position, moment in enumerate(moments)
            if moment is not None and request.key_from <= moment.timestamp()
            and (request.key_to is None or moment.timestamp() <= request.key_to)
        ]
        key = self.keys.key
        if any(later < earlier for (_, earlier), (_, later) in itertools.pairwise(in_range)):
            raise self._error(
                request,
                f"Kommo answered GET {LEADS_PATH} (request {request.number}) with leads not in {key} order "
                f"although order[{key}]=asc was asked: the export cannot page safely. Check the account's "
                "API version.",
            )
        return in_range

    def _advance(self, request: PageRequest, answer: ListPage, in_range: list[tuple[int, int]], full: bool,
                 beyond: bool) -> None:
        """Moves the slice's cursor (or its offset inside a crowded second) on, or ends the slice."""
        s = request.slice
        if request.in_second:
            self._on_second_page(request, answer, s, [position for position, _ in in_range], full)
        elif not full or beyond:
            s.done = True  # a short page, or one that reached past the (new) end of the slice
        elif not in_range:
            raise self._error(
                request,
                f"Kommo answered GET {LEADS_PATH} (request {request.number}) with a full page of leads "
                f"none of which was {self._verb} in the requested range (from {_iso(request.key_from)}): it "
                f"ignores filter[{self.keys.key}] and the export cannot page safely. Check the account's "
                "API version.",
            )
        elif (last := in_range[-1][1]) == s.cursor:  # a whole page within one second: read it by offset
            s.second_page, s.second_passes, s.pass_ids, s.last_pass_ids = 1, 1, set(), None
        else:
            s.cursor, s.seen_at_cursor = last, {}

    @staticmethod
    def _remember_cursor(s: Slice, answer: ListPage, in_range: list[tuple[int, int]]) -> None:
        """The slice goes on at its cursor: remembers the leads listed there (in a new dict: the one
        before still filters this page), so the next answer passes them on only if newer."""
        seen = dict(s.seen_at_cursor)
        for position, ts in in_range:
            lead = answer.items[position]
            if ts == s.cursor and (lead_id := positive_int(lead.get("id"))) is not None:
                seen[lead_id] = max(updated_at(lead), seen.get(lead_id, float("-inf")))
        s.seen_at_cursor = seen

    @staticmethod
    def _new_items(answer: ListPage, moments: list[datetime | None], previous: dict[int, float],
                   beyond: set[int]) -> tuple[list[tuple[Any, datetime | None]], int]:
        """The leads to pass on, with their key, and how many the page listed that were not repeats:
        leads of the previous cursor's second come again, and only newer versions are passed on."""
        items = []
        repeats = 0
        for position, lead in enumerate(answer.items):
            if position in beyond:
                continue
            lead_id = positive_int(lead.get("id")) if isinstance(lead, dict) else None
            if lead_id is not None and lead_id in previous:
                repeats += 1
                if updated_at(lead) <= previous[lead_id]:
                    continue
            items.append((lead, moments[position]))
        return items, len(answer.items) - repeats - len(beyond)

    def _on_second_page(self, request: PageRequest, answer: ListPage, s: Slice, positions: list[int],
                        full: bool) -> None:
        """Moves a slice on after a page of offset paging inside one crowded second.

        Offset pages shift when a lead of that second is deleted meanwhile, and the lead crossing a page
        boundary is then not listed. So the second is read in passes, each from page 1 to a short page,
        until two passes in a row list the same leads: a deletion during a pass removes a lead listed by
        the pass before, so a pass that lost a lead can never equal the one before it. Leads already
        passed on are not passed on again. Kommo does not say how it orders leads of one second
        between the two kinds of request, so passes are compared with each other only."""
        ids = {lead_id for position in positions
               if (lead_id := positive_int(answer.items[position].get("id"))) is not None}
        if full and s.second_page > 1 and not ids - s.pass_ids:
            # A full page listing nothing new within the pass: Kommo ignores `page` here, and paging on
            # would never end.
            raise self._error(
                request,
                f"Kommo answered GET {LEADS_PATH} (request {request.number}) for page {s.second_page} of "
                f"the leads {self._verb} at {_iso(request.key_from)} with leads it had listed already: it "
                "ignores `page` and the export cannot page safely. Check the account's API version.",
            )
        s.pass_ids |= ids
        if full:
            s.second_page += 1
        elif s.pass_ids == s.last_pass_ids:  # the second is read: on to the next one
            s.second_page, s.cursor, s.seen_at_cursor = 0, s.cursor + 1, {}
            s.pass_ids, s.last_pass_ids = set(), None
            s.done = s.end is not None and s.cursor >= s.end
        elif s.second_passes >= MAX_SECOND_PASSES:
            raise self._error(
                request,
                f"The leads Kommo lists as {self._verb} at {_iso(request.key_from)} changed during each of "
                f"{MAX_SECOND_PASSES} passes over them (GET {LEADS_PATH}, request {request.number}): the "
                "export cannot tell whether leads are missing. Nothing was changed; run the refresh again "
                "later.",
            )
        else:  # read it again, and compare
            s.second_page, s.second_passes = 1, s.second_passes + 1
            s.pass_ids, s.last_pass_ids = set(), s.pass_ids

    def _filter(self, page: int, items: list[tuple[Any, datetime | None]], received: int) -> LeadPage:
        """The page's leads that pass the client-side checks; ``items`` pairs each with its key."""
        kept: dict[int, dict] = {}  # lead id -> lead, in page order
        skipped: dict[str, int] = {}
        start, end, excluded = self.keys.start, self.keys.end, self.excluded
        for lead, moment in items:
            lead_id = positive_int(lead.get("id")) if isinstance(lead, dict) else None
            if lead_id is None or moment is None:
                reason = "invalid"
            elif not (start <= moment.timestamp() and (end is None or moment.timestamp() < end)):
                reason = "outside_window"
            elif positive_int(lead.get("status_id")) in excluded:
                reason = "excluded_status"
            elif lead.get("is_deleted") is True:
                reason = "deleted"
            elif lead_id in kept:
                reason = "duplicate"
                if updated_at(lead) > updated_at(kept[lead_id]):
                    kept[lead_id] = lead
            else:
                kept[lead_id] = lead
                continue
            skipped[reason] = skipped.get(reason, 0) + 1
        return LeadPage(page=page, leads=list(kept.values()), received=received, skipped=skipped)

    @staticmethod
    def _error(request: PageRequest, message: str) -> KommoResponseError:
        return KommoResponseError(message, method="GET", path=LEADS_PATH, page=request.number)


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()
