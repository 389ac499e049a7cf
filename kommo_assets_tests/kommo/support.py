"""What the Kommo client tests share: the simulator's token, a fast client, the ground truth of a window,
and assertions about what the client yielded."""

from __future__ import annotations

import json
import threading
import traceback
from datetime import UTC, datetime

from kommo_assets.dev.simulator import KommoSimulator, LeadQuery
from kommo_assets.kommo import KommoClient

TOKEN = "simulator-token"
LEADS = "/api/v4/leads"
YEAR_FROM = datetime(2025, 1, 1, tzinfo=UTC)
YEAR_TO = datetime(2026, 1, 1, tzinfo=UTC)
WITH = ("contacts", "catalog_elements")


def fast_client(simulator: KommoSimulator, **overrides: object) -> KommoClient:
    options: dict = {"max_rps": 200.0, "backoff_base": 0.01, "backoff_max": 0.05, "max_retries": 4}
    options.update(overrides)
    return KommoClient(simulator.base_url, TOKEN, **options)


def truth(simulator: KommoSimulator, start: datetime = YEAR_FROM, end: datetime = YEAR_TO) -> dict[int, dict]:
    """The simulator's own view of what the export must return: created in [start, end), not lost."""
    lo, hi = start.timestamp(), end.timestamp()
    return {
        lead["id"]: lead
        for lead in simulator.dataset.iter_leads(WITH)
        if lo <= lead["created_at"] < hi and lead["status_id"] != 143
    }


def collect(client: KommoClient, start: datetime = YEAR_FROM, end: datetime = YEAR_TO) -> list[dict]:
    return [lead for page in client.iter_lead_pages(start, end) for lead in page.leads]


def assert_exactly(leads: list[dict], expected: dict[int, dict]) -> None:
    ids = [lead["id"] for lead in leads]
    assert len(ids) == len(set(ids)), "a lead was yielded twice"
    assert set(ids) == set(expected)
    for lead in leads:
        assert lead == expected[lead["id"]]


def kommo_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("kommo-leads", "kommo-contacts"))]


def window_query() -> LeadQuery:
    return LeadQuery(created_from=int(YEAR_FROM.timestamp()), created_to=int(YEAR_TO.timestamp()) - 1)


def serve_page(simulator: KommoSimulator, path: str, page: int, body: object) -> None:
    """Makes the simulator answer ``page`` of ``path`` with ``body`` from now on."""
    simulator.add_fault(
        kind="status",
        path=path,
        query={"page": str(page)},
        status=200,
        times=-1,
        body=json.dumps(body),
        content_type="application/hal+json",
    )


def assert_token_free(exc: BaseException) -> None:
    texts = [str(exc), repr(exc), *map(str, exc.args), "".join(traceback.format_exception(exc))]
    for text in texts:
        assert TOKEN not in text
    assert exc.__cause__ is None and exc.__context__ is None
