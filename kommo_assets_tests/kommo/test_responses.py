"""Tests of reading Kommo's answers without a server: Retry-After values."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kommo_assets.kommo.responses import retry_after_seconds

# --- small pure helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("", None), ("3", 3.0), (" 2.5 ", 2.5), ("-4", 0.0), ("soon", None)],
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert retry_after_seconds(header) == expected


def test_retry_after_http_date() -> None:
    from email.utils import format_datetime

    when = datetime.now(UTC).replace(microsecond=0)
    in_ten_seconds = when.fromtimestamp(when.timestamp() + 10, UTC)
    seconds = retry_after_seconds(format_datetime(in_ten_seconds, usegmt=True))
    assert seconds is not None and 8 <= seconds <= 10.5
