"""The incremental sync's run-time settings as a Dagster resource: its deactivation guard and freshness."""

import math

import dagster as dg
from pydantic import Field, field_validator

from kommo_assets.resources.fields import positive, unresolved
from kommo_assets.settings import ConfigError

DEFAULT_MAX_DEACTIVATIONS = 50
DEFAULT_FRESHNESS_MINUTES = 10.0


class KommoSyncResource(dg.ConfigurableResource):
    """``KOMMO_SYNC_MAX_DEACTIVATIONS`` and ``KOMMO_FRESHNESS_MINUTES``."""

    max_deactivations: int = Field(
        default=DEFAULT_MAX_DEACTIVATIONS,
        description="KOMMO_SYNC_MAX_DEACTIVATIONS: an increment that would deactivate more bookings than this "
        "stops as needs_review, production untouched (default 50).",
    )
    freshness_minutes: float = Field(
        default=DEFAULT_FRESHNESS_MINUTES,
        description="KOMMO_FRESHNESS_MINUTES: the bookings freshness check fails when no successful sync or "
        "refresh has covered this many minutes (default 10).",
    )

    @field_validator("max_deactivations", mode="before")
    @classmethod
    def _max_deactivations(cls, value):
        if unresolved(value):
            return value
        raw = value.strip() if isinstance(value, str) else value
        try:
            number = int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"KOMMO_SYNC_MAX_DEACTIVATIONS must be a whole number, 0 or more, got {raw!r}") from None
        if number < 0 or (isinstance(raw, float) and not math.isclose(raw, number)):
            raise ConfigError(f"KOMMO_SYNC_MAX_DEACTIVATIONS must be a whole number, 0 or more, got {raw!r}")
        return number

    @field_validator("freshness_minutes", mode="before")
    @classmethod
    def _freshness(cls, value):
        return positive("KOMMO_FRESHNESS_MINUTES", value)
