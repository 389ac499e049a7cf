"""Applies ``sql/`` to a database: numbered migrations once each, in order, then every function file, then the
privileges of what the project created (``kommo_assets/sql/privileges.sql``).

Safe to run twice or from two processes at once: a session advisory lock serializes runners, each
migration runs in its own transaction with its ledger row, and an edited migration is refused.

The project acts only on objects it created. Which ones those are is recorded as they are created, in
``kommo_schema_objects``: after each migration, the relations and functions that did not exist before it and
that its transaction wrote; after the function files, every relation and function their transaction wrote
(each function file re-declares its objects on every migrate). Migration 0010 registered what earlier
migrations had created. ``kommo_assets/sql/privileges.sql`` then shuts what is registered, in the same transaction, so
nothing the project creates is ever committed with the privileges a platform grants by default.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import psycopg

from kommo_assets.db import connect
from kommo_assets.settings import ConfigError

MIGRATE_LOCK_KEY = 90_900  # pg_advisory_lock key reserved for schema changes
APP_ROLES_ENV = "KOMMO_APP_ROLES"


# The SQL ships inside the package (package data), so an installed wheel migrates from anywhere.
PACKAGE_SQL = Path(__file__).resolve().parents[1] / "sql"


def sql_dir() -> Path:
    """``KOMMO_SQL_DIR`` or the package's ``sql/`` folder."""
    explicit = os.environ.get("KOMMO_SQL_DIR")
    return Path(explicit) if explicit else PACKAGE_SQL


class MigrationError(RuntimeError):
    pass


@dataclass
class MigrateResult:
    applied: list[str]
    functions: list[str]


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def app_roles(value: str | None = None) -> list[str]:
    """``KOMMO_APP_ROLES``: the roles that may execute the two entry points, comma-separated. Empty or unset:
    ``authenticated`` where that role exists (Supabase), else ``kommo_app``."""
    value = os.environ.get(APP_ROLES_ENV, "") if value is None else value
    roles = [part.strip() for part in value.split(",") if part.strip()]
    for role in roles:
        if role.lower() in ("anon", "public"):
            raise ConfigError(f"{APP_ROLES_ENV} may not name {role}: the entry points are for signed-in users only")
    return roles


# The schema's own bookkeeping, created before any migration (like the ledger) and registered as the project's.
_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS kommo_schema_objects (
    classid         regclass NOT NULL,
    objid           oid NOT NULL,
    identity        text NOT NULL,
    registered_xact xid8 NOT NULL DEFAULT pg_current_xact_id(),
    registered_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (classid, objid));
COMMENT ON TABLE kommo_schema_objects IS
    'The relations and functions kommo-assets created (kommo_assets/db/migrate.py); migrate acts on these only';
INSERT INTO kommo_schema_objects (classid, objid, identity)
SELECT 'pg_class'::regclass, t.oid, (pg_identify_object('pg_class'::regclass, t.oid, 0)).identity
  FROM (VALUES (to_regclass('schema_migrations')), (to_regclass('kommo_schema_objects'))) AS t(oid)
ON CONFLICT (classid, objid) DO NOTHING;
"""

# What exists now, to tell a migration's new objects from the ones it altered.
_EXISTING = """
SELECT coalesce(array_agg(oid), '{}') FROM (SELECT oid FROM pg_class UNION ALL SELECT oid FROM pg_proc) o
"""

# Relations (tables, partitioned tables, views, materialized views, sequences, foreign tables) and functions
# whose catalog row this transaction wrote, outside the system and temporary schemas, not in %(before)s.
_RECORD = """
WITH written AS (
    SELECT 'pg_class'::regclass AS classid, c.oid AS objid
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.xmin = pg_current_xact_id()::xid AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
    UNION ALL
    SELECT 'pg_proc'::regclass, p.oid
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE p.xmin = pg_current_xact_id()::xid
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
)
INSERT INTO kommo_schema_objects (classid, objid, identity)
SELECT w.classid, w.objid, (pg_identify_object(w.classid, w.objid, 0)).identity
  FROM written w
 WHERE NOT (w.objid = ANY (%(before)s::oid[]))
ON CONFLICT (classid, objid) DO UPDATE SET identity = EXCLUDED.identity
"""


def _privileges_sql(root: Path) -> str:
    path = root / "privileges.sql"
    if not path.exists():  # a partial tree (tests, KOMMO_SQL_DIR): the project's own rules still apply
        path = PACKAGE_SQL / "privileges.sql"
    return path.read_text()


def _seal(conn: psycopg.Connection, privileges: str, roles: list[str]) -> None:
    """Shuts what the project created (kommo_assets/sql/privileges.sql), inside the caller's transaction."""
    conn.execute("SELECT set_config('kommo.app_roles', %s, true)", (",".join(roles),))
    conn.execute(privileges)


def migrate(database_url: str, root: Path | None = None, roles: list[str] | None = None) -> MigrateResult:
    root = root or sql_dir()
    roles = app_roles() if roles is None else roles
    migrations = sorted((root / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql"))
    functions = sorted((root / "functions").glob("*.sql"))
    privileges = _privileges_sql(root)
    if not migrations:
        raise MigrationError(f"no migrations found under {root / 'migrations'}")
    applied: list[str] = []
    with connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK_KEY,))
        try:
            with conn.transaction():
                conn.execute(_BOOTSTRAP)
                _seal(conn, privileges, roles)
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
                    before = conn.execute(_EXISTING).fetchone()[0]
                    conn.execute(text)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                        (version, _checksum(text)),
                    )
                    conn.execute(_RECORD, {"before": before})
                    _seal(conn, privileges, roles)
                applied.append(path.name)
            with conn.transaction():
                for path in functions:
                    conn.execute(path.read_text())
                conn.execute(_RECORD, {"before": []})
                _seal(conn, privileges, roles)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK_KEY,))
    return MigrateResult(applied=applied, functions=[p.name for p in functions])
