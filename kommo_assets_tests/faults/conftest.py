"""Fixtures of the fault, corpus and security tests.

``baseline`` runs one fault-free refresh of the standard simulator (600 leads, seed 11) into a database
once per module; ``fault_env`` then gives each test a fresh copy of it (or of the empty schema), a fresh
simulator with the same data and its own token, and the code location's environment pointed at both.
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig
from kommo_assets_tests.faults.support import (
    LEADS,
    SEED,
    normalized_production,
    run,
    set_code_location_env,
)
from kommo_assets_tests.helpers import create_database, database_name, drop_database, production_checksum
from kommo_assets_tests.test_full_refresh import expected_snapshot


@dataclasses.dataclass
class Baseline:
    name: str
    url: str
    checksum: str
    normalized: dict
    expected: dict


@pytest.fixture(scope="module")
def baseline(pg_admin_url, template_url):
    """A database after one fault-free full refresh of the standard simulator (a template for copies)."""
    name, url = create_database(pg_admin_url, database_name(template_url), prefix="kommo_fault_base")
    sim = KommoSimulator(SimulatorConfig(leads=LEADS, seed=SEED, token=f"baseline-{uuid.uuid4().hex}"))
    with sim, pytest.MonkeyPatch.context() as mp:
        set_code_location_env(mp, url, sim)
        result = run()
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        expected = expected_snapshot(sim)
    yield Baseline(name, url, production_checksum(url), normalized_production(url), expected)
    drop_database(pg_admin_url, name)


@dataclasses.dataclass
class FaultEnv:
    sim: KommoSimulator
    url: str
    before: str  # production checksum before the test's run

    @property
    def token(self) -> str:
        return self.sim.config.token


@pytest.fixture
def fault_env(request, monkeypatch, pg_admin_url, template_url, make_simulator):
    """Factory: ``fault_env(start="baseline" | "empty", leads=600, seed=11, **simulator config)``."""
    created: list[str] = []

    def factory(start: str = "baseline", leads: int = LEADS, seed: int = SEED, **config) -> FaultEnv:
        template = request.getfixturevalue("baseline").name if start == "baseline" else database_name(template_url)
        name, url = create_database(pg_admin_url, template, prefix="kommo_fault")
        created.append(name)
        sim = make_simulator(leads=leads, seed=seed, **config)
        set_code_location_env(monkeypatch, url, sim)
        return FaultEnv(sim, url, production_checksum(url))

    yield factory
    for name in created:
        drop_database(pg_admin_url, name)
