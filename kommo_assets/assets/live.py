"""The live flag as the assets see it: a step started while ``KOMMO_ENABLE_LIVE`` is off (or unreadable) fails
at once with the reason, never retried."""

import dagster as dg

from kommo_assets.settings import ConfigError, require_live


def ensure_live() -> None:
    try:
        require_live()
    except ConfigError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
