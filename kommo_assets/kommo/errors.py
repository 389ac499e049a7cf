"""The errors the Kommo client raises, and the redaction every message goes through.

Each message says what happened, where (method, path, page) and what to do next; none carries the
access token, a header or a long query string.
"""

from __future__ import annotations

REDACTED = "<redacted>"


def redact(text: str, secret: str | None) -> str:
    """Returns ``text`` with every occurrence of ``secret`` replaced by ``<redacted>``."""
    if not secret:
        return text
    return text.replace(secret, REDACTED)


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
