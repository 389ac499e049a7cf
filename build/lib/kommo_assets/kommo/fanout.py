"""The fan-out: what a pool of threads fetches next (select-field options, lead pages, contact batches)
within the shared pace, and the stream that hands the results over as they complete."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from kommo_assets.kommo.contacts import ContactBatch, ContactBatching
from kommo_assets.kommo.paging import KeysetPaging, PageRequest
from kommo_assets.kommo.responses import ListPage
from kommo_assets.kommo.transport import confirmed

# A snapshot stream pages leads with about this many pages in flight (at 400 ms a page and 6.9 requests/s
# that is their share of the pace) and keeps this many full contact batches in reserve for the end.
LEAD_PAGES_IN_FLIGHT = 2
RESERVE_BATCHES = 2
# Leads are read as this many keyset chains at once: one more than the pages they keep in flight, so a
# chain whose answer is being processed leaves none idle.
LEAD_CHAINS = LEAD_PAGES_IN_FLIGHT + 1

AskLeads = Callable[[PageRequest, threading.Event], ListPage | None]
FetchContacts = Callable[[list[int], threading.Event], list[dict]]


@dataclass(frozen=True)
class Task:
    kind: str  # "field", "lead", "contacts"
    arg: Any
    run: Callable[[Any, threading.Event], Any]


class Plan:
    """What a fan-out fetches next: select-field options first; while leads are being paged, lead pages
    and full contact batches by the policy of ``_while_paging``; then the remaining full batches and,
    once every lead page is processed, the last partial batch.

    ``fetch_field(field_id, cancel)`` fetches one field's options; ``ask_leads(request, cancel)`` asks
    for one lead page once (None: it listed nothing); ``fetch_contacts(ids, cancel)`` fetches the
    contacts of one batch. Everything but the fetches runs on the consumer's thread.
    """

    def __init__(
        self,
        *,
        fields: Iterable[int] = (),
        fetch_field: Callable[[int, threading.Event], Any] | None = None,
        leads: KeysetPaging | None = None,
        ask_leads: AskLeads | None = None,
        contacts: ContactBatching | None = None,
        fetch_contacts: FetchContacts | None = None,
    ) -> None:
        self.fields = list(fields)
        self.fields_in_flight = 0
        self.fetch_field = fetch_field
        self.leads = leads
        self.ask_leads = ask_leads
        self.contacts = contacts
        self.fetch_contacts = fetch_contacts

    def _leads_done(self) -> bool:
        return self.leads is None or self.leads.done()

    def next_task(self) -> Task | None:
        if self.fields:
            assert self.fetch_field is not None
            self.fields_in_flight += 1
            return Task("field", self.fields.pop(0), self.fetch_field)
        leads, contacts = self.leads, self.contacts
        if leads is not None and contacts is not None and leads.paging:
            return self._while_paging(leads, contacts)
        if contacts is not None and (batch := contacts.take(partial=False)) is not None:
            return Task("contacts", batch, self._fetch_contacts)
        if leads is not None and (request := leads.take()) is not None:
            return Task("lead", request, self._fetch_lead)
        if contacts is not None and self._leads_done() and (batch := contacts.take(partial=True)) is not None:
            return Task("contacts", batch, self._fetch_contacts)
        return None

    def _while_paging(self, leads: KeysetPaging, contacts: ContactBatching) -> Task | None:
        """While leads are being paged: a couple of lead requests in flight keep paging at their share of
        the pace, and contact batches take the other slots. A few full batches are kept in reserve (a
        bounded number, so memory stays flat) and spent whenever there is no lead request to make: then
        the last slices are waiting for their answers, and a slot left idle would be lost."""
        ready = contacts.ready()
        if ready > RESERVE_BATCHES or (ready and leads.in_flight >= LEAD_PAGES_IN_FLIGHT):
            batch = contacts.take(partial=False)
            if batch is not None:
                return Task("contacts", batch, self._fetch_contacts)
        request = leads.take()
        if request is not None:
            return Task("lead", request, self._fetch_lead)
        batch = contacts.take(partial=False)
        return None if batch is None else Task("contacts", batch, self._fetch_contacts)

    def _fetch_contacts(self, ids: list[int], cancel: threading.Event) -> ContactBatch:
        assert self.fetch_contacts is not None
        return ContactBatch(len(ids), self.fetch_contacts(ids, cancel))

    def _fetch_lead(
        self, request: PageRequest, cancel: threading.Event
    ) -> tuple[PageRequest, ListPage | None]:
        assert self.ask_leads is not None
        ask = self.ask_leads
        return request, confirmed(lambda: ask(request, cancel), f"keyset request {request.number}")

    def on_result(self, task: Task, result: Any) -> Any:
        """The item to hand over for a finished task (None: nothing to hand over)."""
        if task.kind == "lead":
            assert self.leads is not None
            return self.leads.feed(*result)
        if task.kind == "contacts":
            assert self.contacts is not None
            self.contacts.on_fetched()
        else:
            self.fields_in_flight -= 1
        return result

    def on_processed(self, task: Task) -> None:
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


def fan_out(plan: Plan, max_in_flight: int, name: str) -> Iterator[Any]:
    """Runs the plan's tasks on up to ``max_in_flight`` threads and yields what they produce as they
    complete (ties in submission order). The plan is asked for work whenever a thread is free, and again
    each time the caller comes back for the next item (what it did with the last one may have created
    work). Any error cancels the rest and propagates; closing the generator cancels pending work and
    joins the threads."""
    cancel = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix=name)
    pending: dict[Future[Any], tuple[int, Task]] = {}
    order = itertools.count()

    def refill() -> None:
        while len(pending) < max_in_flight:
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


class SnapshotStream:
    """The stream of :meth:`KommoClient.stream_snapshot`: iterate it for ``FieldOptions``, ``LeadPage``
    and ``ContactBatch`` items; hand contact ids back with :meth:`add_contact_ids`."""

    def __init__(self, items: Iterator[Any], contacts: ContactBatching) -> None:
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
