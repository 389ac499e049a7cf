"""The import run record (``kommo_import_runs``): start, guard, swap and close, each one SQL call.

The logic lives in ``kommo_assets/sql/functions``; :class:`ImportRuns` only calls it on a connection it is given, and keeps
the error text safe. The module functions taking a database URL open a connection per call, for scripts and
tests; the assets and sensors go through the Postgres resource.
"""

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from kommo_assets.db import APPLICATION_NAME, connect
from kommo_assets.db.windows import window_params
from kommo_assets.kommo.errors import redact
from kommo_assets.scope import Window

DEFAULT_MAX_DROP_RATIO = 0.30
ERROR_MAX_CHARS = 4000


def safe_error(exc: BaseException | str, secrets: str | Iterable[str | None] | None = None) -> str:
    """The text stored in ``kommo_import_runs.error``: type and message, secrets redacted, bounded."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return redact(text, secrets)[:ERROR_MAX_CHARS]


# Settings of the owner's session, each applied where the server knows it. The session sits idle for the whole
# run: a server-wide idle_session_timeout must not end it (and so the lock) mid-run; and a host lost without
# closing its connection is noticed by the server's TCP keepalives within about a minute, not the OS's hours.
_OWNER_SESSION_SQL = """
SELECT set_config(name, v.value, false)
  FROM (VALUES ('idle_session_timeout', '0'), ('tcp_keepalives_idle', '30'), ('tcp_keepalives_interval', '10'),
               ('tcp_keepalives_count', '3')) AS v(name, value)
  JOIN pg_settings USING (name)
"""


class ImportRuns:
    """The import run record on one connection: each call is part of the caller's transaction (in autocommit
    mode, each commits as it returns; the swap is always a transaction of its own)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def heartbeat(self, run_id: str) -> None:
        """Tells the next start that the run's owner is alive (see ``start_kommo_import_run``)."""
        self.conn.execute("UPDATE kommo_import_runs SET heartbeat_at = now() WHERE id = %s", (run_id,))

    def start(self, *, run_id: str, dagster_run_id: str | None, job_name: str | None, triggered_by: str | None,
              dry_run: bool = False, window: Window | None = None, max_drop_ratio: float = DEFAULT_MAX_DROP_RATIO,
              kind: str | None = None) -> dict[str, Any]:
        """Opens the import run; the caller holds its owner lock (:class:`OwnerLock`) from before this call
        until the run ends, or the next start may close it as abandoned. ``kind``: 'full_refresh',
        'dry_run' or 'increment' (None: from ``dry_run``); an increment has no window."""
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT * FROM start_kommo_import_run(%s::uuid, %s::text, %s::text, %s::text, %s, %s, %s,"
                " %s::numeric, %s::text)",
                (run_id, dagster_run_id, job_name, triggered_by, dry_run,
                 window and window.created_from, window and window.created_to, max_drop_ratio, kind),
            )
            return cur.fetchone()

    def set_kommo_clock(self, run_id: str, ts: datetime) -> None:
        """Records Kommo's clock (the ``Date`` header of the run's first Kommo answer); the first one stays."""
        self.conn.execute("UPDATE kommo_import_runs SET kommo_clock_at = coalesce(kommo_clock_at, %s) WHERE id = %s",
                          (ts, run_id))

    def increment_preview(self, run_id: str, sample: int = 10) -> dict[str, Any]:
        """What the increment would change now (``kommo_increment_preview``), stored on the run."""
        with self.conn.transaction():
            result = self.conn.execute("SELECT kommo_increment_preview(%s::uuid, %s)",
                                       (run_id, sample)).fetchone()[0]
            self.conn.execute("UPDATE kommo_import_runs SET change_preview = %s WHERE id = %s",
                              (Jsonb(result), run_id))
        return result

    def apply_increment(self, run_id: str, cursor: datetime, max_deactivations: int,
                        windows: Sequence[Window]) -> dict[str, Any]:
        """Runs ``run_kommo_increment`` in one transaction: the changes, the coverage of ``windows`` (up to
        ``cursor``) and the run's record commit together. Its ``status`` is 'succeeded' or 'needs_review'
        (nothing applied, coverage kept)."""
        with self.conn.transaction():
            return self.conn.execute(
                "SELECT run_kommo_increment(%(r)s::uuid, %(cursor)s, %(max)s, %(froms)s::timestamptz[],"
                " %(tos)s::timestamptz[])",
                {"r": run_id, "cursor": cursor, "max": max_deactivations, **window_params(windows)},
            ).fetchone()[0]

    def warnings(self, run_id: str) -> dict[str, int] | None:
        """The warning checks' counts the change preview stored on the run as it staged
        (``kommo_staging_warnings``, computed now if it stored none); None for an unknown run."""
        found = self.conn.execute(
            "SELECT coalesce(change_preview -> 'warnings', kommo_staging_warnings(id,"
            " coalesce((change_preview -> 'vehicles' ->> 'create')::int, 0))) FROM kommo_import_runs WHERE id = %s",
            (run_id,)).fetchone()
        return None if found is None else found[0]

    def mark_staged(self, run_id: str, stats: dict[str, Any]) -> None:
        with self.conn.transaction():
            self.conn.execute("UPDATE kommo_import_runs SET staged_at = now(), stats = stats || %s WHERE id = %s",
                              (Jsonb(stats), run_id))
            self.heartbeat(run_id)

    def drop_guard(self, run_id: str) -> dict[str, Any]:
        return self.conn.execute("SELECT kommo_drop_guard(%s::uuid)", (run_id,)).fetchone()[0]

    def preview(self, run_id: str, sample: int = 10) -> dict[str, Any]:
        """Computes what the swap would change now (``kommo_change_preview``) and stores it on the run."""
        with self.conn.transaction():
            result = self.conn.execute("SELECT kommo_change_preview(%s::uuid, %s)", (run_id, sample)).fetchone()[0]
            self.conn.execute("UPDATE kommo_import_runs SET change_preview = %s WHERE id = %s",
                              (Jsonb(result), run_id))
        return result

    def swap(self, run_id: str) -> dict[str, Any]:
        """Runs ``run_kommo_full_refresh`` in one transaction; it marks the run succeeded as it commits.

        Explicitly so, also on an autocommit connection: a statement of its own would commit as it ends
        even if this process had been killed while it waited on a lock."""
        with self.conn.transaction():
            return self.conn.execute("SELECT run_kommo_full_refresh(%s::uuid)", (run_id,)).fetchone()[0]

    def prune_staging(self, succeeded_days: float, failed_days: float) -> dict[str, Any]:
        return self.conn.execute(
            "SELECT prune_kommo_staging(make_interval(secs => %s), make_interval(secs => %s))",
            (succeeded_days * 86400, failed_days * 86400),
        ).fetchone()[0]

    def prune_runs(self, noop_increment_days: float, closed_days: float) -> dict[str, Any]:
        """Deletes old run records (``prune_kommo_import_runs``): succeeded increments that changed nothing after
        ``noop_increment_days``, every other closed run after ``closed_days`` but the ones later runs read."""
        return self.conn.execute(
            "SELECT prune_kommo_import_runs(make_interval(secs => %s), make_interval(secs => %s))",
            (noop_increment_days * 86400, closed_days * 86400),
        ).fetchone()[0]

    def close(self, run_id: str, status: str, error: str | None) -> bool:
        """Closes a running import with an already safe ``error``; False when it was already closed."""
        return self.conn.execute("SELECT finish_kommo_import_run(%s::uuid, %s::text, %s::text)",
                                 (run_id, status, error)).fetchone()[0]

    def get(self, run_id: str) -> dict[str, Any] | None:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT * FROM kommo_import_runs WHERE id = %s", (run_id,))
            return cur.fetchone()


class OwnerLock:
    """The run's owner lock: a session advisory lock on a connection of its own, held while the run lives.

    A process that dies (SIGKILL, lost host) drops the connection and so the lock: that is how the next start
    knows an import marked ``running`` is dead and closes it at once (see ``start_kommo_import_run``).
    """

    def __init__(self, database_url: str, run_id: str) -> None:
        self.database_url = database_url
        self.run_id = run_id
        self._conn: psycopg.Connection | None = None

    def acquire(self) -> None:
        """Waits for the lock if another session holds it: only a process working on the same run can."""
        conn = connect(self.database_url, autocommit=True, application_name=f"{APPLICATION_NAME} owner")
        try:
            conn.execute(_OWNER_SESSION_SQL)
            conn.execute("SELECT pg_advisory_lock(kommo_lock_key('import_owner'), hashtext(%s))", (self.run_id,))
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def ensure(self) -> None:
        """Takes the lock again on a new connection if the database dropped the old one (a restart between
        two steps). If another start closed the run meanwhile, the run's next statement refuses it."""
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                pass
        self.release()
        self.acquire()

    def release(self) -> None:
        """Closing the connection releases the lock."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@contextmanager
def owning(database_url: str, run_id: str) -> Iterator[None]:
    """Holds the run's owner lock for the block (scripts and tests; a Dagster run holds it for the whole run
    through the Postgres resource)."""
    lock = OwnerLock(database_url, run_id)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def close_run(database_url: str, run_id: str, status: str, error: BaseException | str | None,
              secrets: str | Iterable[str | None] | None = None, *, attempts: int = 1,
              pause: float = 1.0) -> bool:
    """Closes a running import; returns False when it was already closed. ``attempts`` > 1 rides out a
    database that is restarting (the error that is being recorded may be that very restart)."""
    text = None if error is None else safe_error(error, secrets)
    for attempt in range(attempts):
        try:
            with connect(database_url) as conn:
                return ImportRuns(conn).close(run_id, status, text)
        except psycopg.OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(pause)
    return False


# One connection per call, for scripts and tests.

def start_run(database_url: str, **kwargs: Any) -> dict[str, Any]:
    with connect(database_url) as conn:
        return ImportRuns(conn).start(**kwargs)


def mark_staged(database_url: str, run_id: str, stats: dict[str, Any]) -> None:
    with connect(database_url) as conn:
        ImportRuns(conn).mark_staged(run_id, stats)


def drop_guard(database_url: str, run_id: str) -> dict[str, Any]:
    with connect(database_url) as conn:
        return ImportRuns(conn).drop_guard(run_id)


def preview(database_url: str, run_id: str, sample: int = 10) -> dict[str, Any]:
    with connect(database_url) as conn:
        return ImportRuns(conn).preview(run_id, sample)


def swap(database_url: str, run_id: str) -> dict[str, Any]:
    with connect(database_url) as conn:
        return ImportRuns(conn).swap(run_id)


def prune_staging(database_url: str, succeeded_days: float, failed_days: float) -> dict[str, Any]:
    with connect(database_url) as conn:
        return ImportRuns(conn).prune_staging(succeeded_days, failed_days)


def prune_runs(database_url: str, noop_increment_days: float, closed_days: float) -> dict[str, Any]:
    with connect(database_url) as conn:
        return ImportRuns(conn).prune_runs(noop_increment_days, closed_days)


def get_run(database_url: str, run_id: str) -> dict[str, Any] | None:
    with connect(database_url) as conn:
        return ImportRuns(conn).get(run_id)
