"""Shared fixtures: one real PostgreSQL server per session, a fresh migrated database per test, the
Kommo simulator over HTTP, and the environment the Dagster code location reads."""

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from kommo_assets.db.migrate import migrate
from kommo_assets.dev.local_postgres import LocalPostgres
from kommo_assets_tests.helpers import create_database, drop_database, url_for_database

# One per pytest-xdist worker: workers sharing a server (KOMMO_TEST_ADMIN_URL) keep their templates apart.
TEMPLATE_DB = f"kommo_test_template_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"

# The longest files first, longest at the top (seconds each took on one of `make test`'s four workers).
# `--dist loadfile --no-loadscope-reorder` hands whole files to workers in collection order: started
# first, the long ones run beside the many short ones instead of one of them starting last and keeping
# the run going on one worker while the others sit idle.
LONGEST_FIRST = (
    "test_ui.py",  # ~100 s: the Dagster UI in Chromium
    "test_incremental_property.py",  # ~150 s: 300 Hypothesis examples
    "faults/test_kommo_faults.py",  # ~75 s
    "dev/test_benchmark.py",  # ~60 s: the benchmark command end to end, daemon included
    "test_kill.py",  # ~60 s: kill -9 of real runs
    "test_increment_faults.py",  # ~45 s
    "automation/test_sync_sensor.py",  # ~40 s
    "automation/test_run_status_sensors.py",  # ~40 s
    "faults/test_security.py",  # ~25 s
    "test_full_refresh.py",  # ~25 s
    "kommo/test_pacing.py",  # ~20 s
    "test_change_preview.py",  # ~15 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(f"/{name}")), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: each file's tests stay together and in their order


@pytest.fixture(scope="session")
def pg_server():
    """A throwaway server (``KOMMO_TEST_ADMIN_URL`` points at an existing one instead)."""
    if os.environ.get("KOMMO_TEST_ADMIN_URL"):
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="kommo-test-pg-"))
    server = LocalPostgres(root / "data", durable=False)  # throwaway: no fsync
    server.start()
    yield server
    server.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_url(pg_server) -> str:
    return os.environ.get("KOMMO_TEST_ADMIN_URL") or pg_server.url("postgres")


@pytest.fixture(scope="session")
def template_url(pg_admin_url) -> str:
    drop_database(pg_admin_url, TEMPLATE_DB)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    url = url_for_database(pg_admin_url, TEMPLATE_DB)
    migrate(url)
    yield url
    drop_database(pg_admin_url, TEMPLATE_DB)


@pytest.fixture
def database_url(pg_admin_url, template_url) -> str:
    """A fresh database with the whole schema, for this test only."""
    name, url = create_database(pg_admin_url, TEMPLATE_DB)
    yield url
    drop_database(pg_admin_url, name)


@pytest.fixture
def empty_database_url(pg_admin_url) -> str:
    """A fresh database without the schema (for migration tests)."""
    name, url = create_database(pg_admin_url)
    yield url
    drop_database(pg_admin_url, name)


@pytest.fixture
def make_simulator():
    """Starts Kommo simulators over real HTTP; all are stopped at the end of the test."""
    from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig

    started = []

    def factory(**config):
        config.setdefault("token", f"test-token-{uuid.uuid4().hex}")
        sim = KommoSimulator(SimulatorConfig(**config))
        sim.start()
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.stop()


@pytest.fixture
def kommo_env(monkeypatch, database_url, make_simulator):
    """The environment of a code location pointed at a fresh database and a 600-lead simulator."""
    sim = make_simulator(leads=600, seed=11)
    monkeypatch.setenv("KOMMO_DATABASE_URL", database_url)
    monkeypatch.setenv("KOMMO_BASE_URL", sim.base_url)
    monkeypatch.setenv("KOMMO_ACCESS_TOKEN", sim.config.token)
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "1")
    monkeypatch.delenv("KOMMO_ENABLE_SLACK_ALERTS", raising=False)
    return sim
