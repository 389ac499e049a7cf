"""The embedded default: a local Postgres and the Kommo simulator, started when nothing else is configured.

``KOMMO_DATABASE_URL`` set means "use that database"; ``KOMMO_BASE_URL`` set means "use that Kommo".
"""

import os
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kommo_assets.db.migrate import migrate
from kommo_assets.dev.local_postgres import LocalPostgres

DEFAULT_HOME = Path(".kommo-dev")


@dataclass
class LocalEnvironment:
    database_url: str
    kommo_base_url: str
    postgres: LocalPostgres | None = None
    simulator: object | None = None
    notes: list[str] = field(default_factory=list)

    def close(self, *, stop_postgres: bool = False) -> None:
        if self.simulator is not None:
            self.simulator.stop()
        if stop_postgres and self.postgres is not None:
            self.postgres.stop()


def start_local_environment(home: Path = DEFAULT_HOME, *, leads: int = 3000, seed: int = 1,
                            latency_ms: float = 0.0) -> LocalEnvironment:
    """Fills in ``KOMMO_DATABASE_URL``, ``KOMMO_BASE_URL`` and ``KOMMO_ACCESS_TOKEN`` in ``os.environ`` for
    whatever is unset, starting the local services that stand in for them, and migrates the database."""
    notes = []
    postgres = None
    database_url = os.environ.get("KOMMO_DATABASE_URL", "").strip()
    if not database_url:
        postgres = LocalPostgres(home / "pg")
        database_url = postgres.start()
        os.environ["KOMMO_DATABASE_URL"] = database_url
        notes.append(f"local PostgreSQL at {database_url} (data in {postgres.data_dir})")
    applied = migrate(database_url).applied
    notes.append(f"schema migrated ({len(applied)} new migrations applied)")

    simulator = None
    base_url = os.environ.get("KOMMO_BASE_URL", "").strip()
    if not base_url:
        from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig

        token = secrets.token_urlsafe(24)
        # An account whose history runs up to today, most of it this year: what a first deployment sees. Cut
        # at midnight (UTC), so `make run` and a later `make dev` of the same day serve the same leads.
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        simulator = KommoSimulator(SimulatorConfig(leads=leads, seed=seed, token=token, latency_ms=latency_ms,
                                                   year=today.year, until=int(today.timestamp())))
        simulator.start()
        base_url = simulator.base_url
        os.environ["KOMMO_BASE_URL"] = base_url
        os.environ["KOMMO_ACCESS_TOKEN"] = token
        # The simulator is not a live account: the refresh may run against it unless told otherwise.
        os.environ.setdefault("KOMMO_ENABLE_LIVE", "1")
        notes.append(f"Kommo simulator at {base_url} with {leads} generated leads up to today, most of them "
                     f"created this year (KOMMO_BASE_URL unset)")
    return LocalEnvironment(database_url, base_url, postgres, simulator, notes)
