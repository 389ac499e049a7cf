"""The Kommo API as a Dagster resource: settings in, a paced and retrying client out."""

import dagster as dg

from kommo_assets.kommo.client import DEFAULT_MAX_RPS, KommoClient


class KommoResource(dg.ConfigurableResource):
    """Kommo API v4 for one account. The token comes from ``KOMMO_ACCESS_TOKEN`` and is never shown."""

    base_url: str
    access_token: str
    max_rps: float = DEFAULT_MAX_RPS
    max_in_flight: int = 6
    timeout_seconds: float = 30.0
    max_retries: int = 6
    backoff_base_seconds: float = 1.0

    def client(self) -> KommoClient:
        return KommoClient(
            self.base_url,
            self.access_token,
            max_rps=self.max_rps,
            max_in_flight=self.max_in_flight,
            timeout=self.timeout_seconds,
            max_retries=self.max_retries,
            backoff_base=self.backoff_base_seconds,
        )
