"""The Kommo API as a Dagster resource: settings in, a paced and retrying client out."""

import dagster as dg

from kommo_assets import settings
from kommo_assets.kommo.client import KommoClient


class KommoResource(dg.ConfigurableResource):
    """Kommo API v4 for one account. The token comes from ``KOMMO_ACCESS_TOKEN`` and is never shown; the
    pace, unless given here, from ``KOMMO_MAX_RPS`` when a run starts (default 6.9 requests/s)."""

    base_url: str
    access_token: str
    max_rps: float | None = None
    max_in_flight: int = 6
    timeout_seconds: float = 30.0
    max_retries: int = 6
    backoff_base_seconds: float = 1.0

    def client(self) -> KommoClient:
        return KommoClient(
            self.base_url,
            self.access_token,
            max_rps=self.max_rps if self.max_rps is not None else settings.kommo_max_rps(),
            max_in_flight=self.max_in_flight,
            timeout=self.timeout_seconds,
            max_retries=self.max_retries,
            backoff_base=self.backoff_base_seconds,
        )
