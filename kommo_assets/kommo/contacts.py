"""Contact batching: contact ids cut into batches of distinct ids, and one batch fetched from
``GET /api/v4/contacts?filter[id][]=...`` (the same fetch by ids serves leads: :func:`fetch_by_ids`)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kommo_assets.kommo.errors import KommoResponseError
from kommo_assets.kommo.fields import positive_int
from kommo_assets.kommo.responses import read_list
from kommo_assets.kommo.transport import Transport

CONTACTS_PATH = "/api/v4/contacts"


@dataclass
class ContactBatch:
    """One batch of ``/api/v4/contacts``: how many distinct ids were asked, and the contacts Kommo
    returned for them (deleted contacts are simply absent), in the order asked."""

    asked: int
    contacts: list[dict]


def distinct_batches(ids: Iterable[Any], size: int) -> Iterator[list[int]]:
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


def fetch_by_ids(transport: Transport, path: str, embedded: str, ids: list[int], page_size: int,
                 cancel: threading.Event | None = None, params: Iterable[tuple[str, str]] = ()) -> list[dict]:
    """The records of ``ids`` that exist on ``path`` (``GET path?filter[id][]=...``, the list under
    ``_embedded.<embedded>``), in the order asked, paged until a 204, a short page, or every id was seen.
    Records that were not asked for are dropped; more pages than the ids can fill mean Kommo ignores the
    filter: :class:`KommoResponseError`."""
    wanted = set(ids)
    max_pages = -(-len(ids) // page_size) + 1
    found: dict[int, dict] = {}
    for page in itertools.count(1):
        if page > max_pages:
            raise KommoResponseError(
                f"Kommo returned more than {max_pages - 1} page(s) of {embedded} for {len(ids)} ids on "
                f"GET {path}: it seems to ignore filter[id][]. Check the API version of the "
                f"account; the run cannot tell which {embedded} were asked for.",
                method="GET", path=path, page=page,
            )
        query = [("filter[id][]", str(record_id)) for record_id in ids]
        query += [*params, ("limit", str(page_size)), ("page", str(page))]
        # Not one of up to 250 records existing is possible, but a 204 on page 1 is confirmed first.
        get = transport.get_confirmed if page == 1 else transport.get
        body = get(path, query, page=page, cancel=cancel)
        if body is None:
            break
        answer = read_list(body, embedded, path, page, page_size)
        for record in answer.items:
            record_id = positive_int(record.get("id")) if isinstance(record, dict) else None
            if record_id in wanted and record_id not in found:
                found[record_id] = record
        if answer.ends_range or len(found) == len(wanted):
            break
    return [found[record_id] for record_id in ids if record_id in found]


def fetch_contacts(transport: Transport, ids: list[int], page_size: int,
                   cancel: threading.Event | None = None) -> list[dict]:
    """The contacts of ``ids`` that exist, in the order asked (:func:`fetch_by_ids`)."""
    return fetch_by_ids(transport, CONTACTS_PATH, "contacts", ids, page_size, cancel)


class ContactBatching:
    """Contact ids waiting to be asked for, cut into batches: from an iterator (read lazily), or handed
    in by the caller of a snapshot stream while it processes lead pages."""

    def __init__(self, size: int, source: Iterator[list[int]] | None = None) -> None:
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

    def on_fetched(self) -> None:
        self.in_flight -= 1
