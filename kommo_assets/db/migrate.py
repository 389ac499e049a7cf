"""Applies ``sql/`` to a database: numbered migrations once each, in order, then every function file.

Safe to run twice or from two processes at once: a session advisory lock serializes runners, each
migration runs in its own transaction with its ledger row, and an edited migration is refused.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from kommo_assets.db import connect

MIGRATE_LOCK_KEY = 90_900  # pg_advisory_lock key reserved for schema changes


def sql_dir() -> Path:
    """``KOMMO_SQL_DIR`` or the repository's ``sql/`` folder."""
    explicit = os.environ.get("KOMMO_SQL_DIR")
    return Path(explicit) if explicit else Path(__file__).resolve().parents[2] / "sql"


class MigrationError(RuntimeError):
    pass


@dataclass
class MigrateResult:
    applied: list[str]
    functions: list[str]


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def migrate(database_url: str, root: Path | None = None) -> MigrateResult:
    root = root or sql_dir()
    migrations = sorted((root / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql"))
    functions = sorted((root / "functions").glob("*.sql"))
    if not migrations:
        raise MigrationError(f"no migrations found under {root / 'migrations'}")
    applied: list[str] = []
    with connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            known = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
            for path in migrations:
                text = path.read_text()
                version = path.stem
                if version in known:
                    if known[version] != _checksum(text):
                        raise MigrationError(
                            f"migration {path.name} was edited after it was applied; "
                            "add a new migration instead of changing an applied one"
                        )
                    continue
                with conn.transaction():
                    conn.execute(text)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                        (version, _checksum(text)),
                    )
                applied.append(path.name)
            with conn.transaction():
                for path in functions:
                    conn.execute(path.read_text())
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK_KEY,))
    return MigrateResult(applied=applied, functions=[p.name for p in functions])
