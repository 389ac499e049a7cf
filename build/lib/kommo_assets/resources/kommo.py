"""The Kommo API as a Dagster resource: settings in, a paced and retrying client out."""

import math
from contextlib import ExitStack

import dagster as dg
from pydantic import Field, PrivateAttr, field_validator

from kommo_assets.kommo.changes import PROBE_TIMEOUT_S
from kommo_assets.kommo.client import DEFAULT_MAX_RPS, KommoClient
from kommo_assets.kommo.pacing import prompt_threads
from kommo_assets.resources.fields import HIDE_INPUTS, no_control_characters, positive, unresolved
from kommo_assets.settings import ConfigError

# Below this, a refresh of 100,000 leads would take hours: surely a mistake.
MIN_KOMMO_RPS = 0.1


class KommoResource(dg.ConfigurableResource):
    """Kommo API v4 for one account (``KOMMO_BASE_URL``, ``KOMMO_ACCESS_TOKEN``, ``KOMMO_MAX_RPS``)."""

    model_config = HIDE_INPUTS

    base_url: str = Field(description="KOMMO_BASE_URL: https://<subdomain>.kommo.com")
    access_token: str = Field(repr=False, description="KOMMO_ACCESS_TOKEN: a long-lived Kommo token (secret).")
    max_rps: float = Field(
        default=DEFAULT_MAX_RPS,
        description="KOMMO_MAX_RPS: the client's pace, requests per second for all its threads together, "
        f"under Kommo's 7 (default {DEFAULT_MAX_RPS}). Lower it for a wider margin against the network.",
    )
    max_in_flight: int = Field(default=6, ge=1, description="Requests in flight at once (each waits its slot).")
    timeout_seconds: float = Field(default=30.0, gt=0, description="Timeout of each Kommo request.")
    max_retries: int = Field(default=6, ge=0, description="Retries of a 429, 5xx or dropped connection.")
    backoff_base_seconds: float = Field(default=1.0, ge=0, description="First backoff between retries.")

    # The run's interpreter settings for the pacer's threads, undone when the run ends.
    _runtime: ExitStack | None = PrivateAttr(default=None)

    @field_validator("access_token", mode="before")
    @classmethod
    def _token(cls, value):
        if not unresolved(value) and not str(value).strip():
            raise ConfigError("KOMMO_ACCESS_TOKEN is empty: set it to a long-lived Kommo token")
        return no_control_characters("KOMMO_ACCESS_TOKEN", value)

    @field_validator("max_rps", mode="before")
    @classmethod
    def _pace(cls, value):
        value = positive("KOMMO_MAX_RPS", value)
        if not math.isfinite(value) or value < MIN_KOMMO_RPS:
            raise ConfigError(f"KOMMO_MAX_RPS must be a number of requests per second from {MIN_KOMMO_RPS}, "
                              f"got {value!r}")
        return value

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """In a run (once per run with the in-process executor), the process settings the pacer needs
        (:func:`~kommo_assets.kommo.pacing.prompt_threads`); sensors and schedules leave the process as it is."""
        if context.dagster_run is not None:
            runtime = ExitStack()
            runtime.enter_context(prompt_threads())
            self._runtime = runtime

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None

    def secrets(self) -> list[str]:
        """What must never appear in a message: the token."""
        return [self.access_token]

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

    def probe_client(self) -> KommoClient:
        """The sensor's client: its own small budget inside Dagster's sensor time limit. Each request gives up
        after ``PROBE_TIMEOUT_S`` (or the run's timeout, if shorter) and is never retried, so no
        ``Retry-After`` is waited out: a 429, a 5xx or a timeout ends the probe, and the tick is skipped."""
        return KommoClient(self.base_url, self.access_token, max_rps=self.max_rps, max_in_flight=1,
                           timeout=min(self.timeout_seconds, PROBE_TIMEOUT_S), max_retries=0)
