"""The errors the Kommo client raises, and the redaction every message goes through.

Each message says what happened, where (method, path, page) and what to do next; none carries the
access token, a header or a long query string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, unquote

REDACTED = "<redacted>"
# Shorter texts are no secret worth the damage of replacing them everywhere in a message.
MIN_SECRET_CHARS = 4


def secret_forms(secret: str) -> set[str]:
    """The ways a secret shows up in a text: as is, escaped by ``repr``/JSON (an error quoting a header
    with a CR in it), percent-encoded (a URL) or percent-decoded (a password taken out of a URL)."""
    forms = {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1], secret.encode("unicode_escape").decode(),
             quote(secret, safe=""), quote_plus(secret), unquote(secret)}
    return {form for form in forms if len(form) >= MIN_SECRET_CHARS}


def redact(text: str, secrets: str | Iterable[str | None] | None) -> str:
    """Returns ``text`` with every form (:func:`secret_forms`) of every secret replaced by ``<redacted>``.

    The one redaction of the project: Kommo errors, run records, Dagster events and Slack alerts all use it.
    """
    if not secrets:
        return text
    if isinstance(secrets, str):
        secrets = (secrets,)
    forms = set().union(*(secret_forms(s) for s in secrets if s))
    # Longest first, so a form that contains another is replaced whole.
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, REDACTED)
    return text


class KommoError(Exception):
    """Base class of everything the Kommo client raises about the API.

    ``method``, ``path``, ``page`` and ``status`` say where it happened; the message is already redacted.
    """

    def __init__(
        self,
        message: str,
        *,
        method: str | None = None,
        path: str | None = None,
        page: int | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.path = path
        self.page = page
        self.status = status

    def __str__(self) -> str:
        return self.message


class KommoAuthError(KommoError):
    """HTTP 401 or 403: the token is revoked/expired, the account is blocked or the IP is not allowed.

    Never retried: retrying a blocked account only prolongs the block.
    """


class KommoUnavailableError(KommoError):
    """Kommo kept failing (429, 5xx, dropped connections, timeouts, cut-off bodies) until retries ran out."""


class KommoResponseError(KommoError):
    """An unexpected status (other 4xx, redirects) or a response body the client cannot read."""


class KommoCancelled(KommoError):
    """The iteration that owns a request was closed, or the client was: the request gave up."""

    def __init__(
        self, message: str = "the Kommo request was abandoned: its iteration stopped or the client was closed"
    ) -> None:
        super().__init__(message)


class InvalidPayload(ValueError):
    """A Kommo entity has no usable id (or is not an object), so it cannot be staged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
