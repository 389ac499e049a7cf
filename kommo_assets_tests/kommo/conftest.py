"""The Kommo simulator the client tests run against."""

from collections.abc import Iterator

import pytest

from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig
from kommo_assets_tests.kommo.support import TOKEN


@pytest.fixture
def sim() -> Iterator[KommoSimulator]:
    """2000 leads, ~1600 of them created in 2025; no rate limiter (pacing has its own tests)."""
    with KommoSimulator(SimulatorConfig(leads=2000, seed=1, token=TOKEN, rate_limit_rps=None)) as simulator:
        yield simulator
