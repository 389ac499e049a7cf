"""Reading Kommo's answers: JSON bodies, list pages, ``Retry-After``, and the errors a status turns into.

Every message says where it happened and what to do next, and is free of the token and of query strings.
"""

from __future__ import annotations

import email.utils
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests

from kommo_assets.kommo.errors import KommoAuthError, KommoResponseError, redact


@dataclass
class ListPage:
    """The items of one list response (``_embedded.<key>``) and whether the range ends with this page:
    no items, no ``_links.next``, or fewer items than the limit asked."""

    page: int
    items: list[Any]
    ends_range: bool


def page_text(page: int | None) -> str:
    return "" if page is None else f" page {page}"


def read_list(body: dict, key: str, path: str, page: int | None, limit: int | None) -> ListPage:
    """Reads ``_embedded.<key>`` of a list response and whether the range ends with this page."""
    embedded = body.get("_embedded")
    items = embedded.get(key) if isinstance(embedded, dict) else None
    if (embedded is not None and not isinstance(embedded, dict)) or (
        items is not None and not isinstance(items, list)
    ):
        raise KommoResponseError(
            f"Kommo sent a list response without a readable _embedded.{key} on GET {path}"
            f"{page_text(page)}; the API's response shape changed and the client needs updating.",
            method="GET",
            path=path,
            page=page,
        )
    items = items or []
    links = body.get("_links")
    has_next = (
        isinstance(links, dict) and isinstance(links.get("next"), dict) and bool(links["next"].get("href"))
    )
    ends = not items or not has_next or (limit is not None and len(items) < limit)
    return ListPage(page or 1, items, ends)


# Python's int() refuses more than 4,300 digits, so json.loads would fail the whole page (and every retry of
# it) on one such number. Keeping the digits as text lets the parser judge the one field instead: no id has
# more than 19 digits, so the record is skipped as unreadable (kommo/fields.py, positive_int).
_MAX_INT_DIGITS = 4000


def _int_or_digits(text: str) -> int | str:
    return int(text) if len(text) <= _MAX_INT_DIGITS else text


def decode_object(content: bytes, path: str, page: int | None) -> tuple[dict | None, str]:
    """The JSON object of a 200 body, or (None, why it cannot be read) for empty, cut-off or non-JSON
    bodies, which a proxy or a dropped connection produced and a retry usually fixes.

    A body that decodes to something else than an object, or is nested too deeply to decode, is the same
    on every attempt: :class:`KommoResponseError` at once.
    """
    if not content.strip():
        return None, "an empty body with HTTP 200"
    too_deep = False
    try:
        body = json.loads(content, parse_int=_int_or_digits)
    except RecursionError:
        too_deep = True  # raised below, outside the except block, with no traceback of the decoder
    except (ValueError, UnicodeDecodeError) as exc:
        position = getattr(exc, "pos", "?")
        return None, f"a body that is not valid JSON ({type(exc).__name__} at char {position})"
    where = f"GET {path}{page_text(page)}"
    if too_deep:
        raise KommoResponseError(
            f"Kommo answered {where} with JSON nested too deeply to decode ({len(content)} bytes): a record "
            "in it holds a structure hundreds of levels deep. Find and fix that record in Kommo (or report "
            "the API fault), then run the refresh again; this is not retried.",
            method="GET", path=path, page=page, status=200,
        )
    if body is None:
        return None, "a JSON null body"
    if not isinstance(body, dict):
        raise KommoResponseError(
            f"Kommo answered {where} with a JSON {type(body).__name__} instead of an object; the API's "
            "response shape changed and the client needs updating.",
            method="GET", path=path, page=page, status=200,
        )
    return body, ""


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


_QUERY_RE = re.compile(r"\?[^\s'\")]*")


def describe(exc: BaseException, token: str) -> str:
    """A short, token-free description of a requests exception: class name and reason, query strings
    cut out (they can hold hundreds of ids), at most 200 characters."""
    text = _QUERY_RE.sub("?...", str(exc))
    text = redact(text, token)
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def auth_error(status: int, path: str, page: int | None) -> KommoAuthError:
    where = f"GET {path}{page_text(page)}"
    if status == 401:
        message = (
            f"Kommo rejected the access token (HTTP 401) on {where}: it is revoked or expired. "
            "Create a new long-lived token and set KOMMO_ACCESS_TOKEN."
        )
    else:
        message = (
            f"Kommo refused access (HTTP 403) on {where}: the account is blocked for exceeding the API "
            "rate limit, or requests from this IP address are not allowed. Contact Kommo support to "
            "unblock it; do not retry until then, as retries prolong a block."
        )
    return KommoAuthError(message, method="GET", path=path, page=page, status=status)


def unexpected_status_error(
    status: int, path: str, page: int | None, response: requests.Response, token: str
) -> KommoResponseError:
    where = f"GET {path}{page_text(page)}"
    if 300 <= status < 400:
        hint = (
            "Kommo redirected the request; check KOMMO_BASE_URL (use https://<subdomain>.kommo.com, "
            "not www.kommo.com)."
        )
    else:
        hint = (
            f"Kommo answered{_problem_detail(response)}. Check KOMMO_BASE_URL and the request; "
            "this is not retried."
        )
    message = redact(f"Unexpected HTTP {status} on {where}. {hint}", token)
    return KommoResponseError(message, method="GET", path=path, page=page, status=status)


_TITLE_RE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def error_body(response: requests.Response, token: str) -> str:
    """What an error's body says, for the log: ``: <title>; <detail>`` of problem+json, or ``: <title>``
    of an HTML page that says more than its status (Kommo's 429 and its proxies' 5xx are nginx pages),
    token-free, at most 200 characters; "" when it says nothing more."""
    detail = _problem_detail(response)
    if not detail and "html" in (response.headers.get("Content-Type") or ""):
        found = _TITLE_RE.search(response.content[:4096].decode("utf-8", "replace"))
        title = " ".join(found.group(1).split()) if found else ""
        # nginx's own pages ("429 Too Many Requests") only restate the status
        detail = f": {title[:200]}" if title and not title.startswith(str(response.status_code)) else ""
    return redact(detail, token)


def _problem_detail(response: requests.Response) -> str:
    """``: <title>; <detail>`` of a problem+json body, at most 200 characters; "" when there is none."""
    if "json" not in (response.headers.get("Content-Type") or ""):
        return ""
    try:
        problem = json.loads(response.content)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ""
    if not isinstance(problem, dict):
        return ""
    parts = [str(problem.get(key)) for key in ("title", "detail") if problem.get(key)]
    return ": " + "; ".join(parts)[:200] if parts else ""
