"""The target database as a Dagster resource: connections, the import-run record, a step's hold on it (the
owner lock; the run closed as failed when the step fails), staging retention."""

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit

import dagster as dg
import psycopg
from pydantic import Field, PrivateAttr, ValidationInfo, field_validator

from kommo_assets.db import connect, runs
from kommo_assets.kommo.errors import redact
from kommo_assets.resources.fields import HIDE_INPUTS, positive, unresolved
from kommo_assets.settings import ConfigError

log = logging.getLogger(__name__)


def _userinfo(url: str) -> str:
    """What precedes the host in a URL (``user:password``), everything up to the last ``@``."""
    if "://" not in url:
        return ""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        netloc = url.partition("://")[2].partition("/")[0]
    return netloc.rpartition("@")[0]


def database_password(url: str) -> str | None:
    """The password of a database URL or conninfo string, as written and (if different) decoded."""
    try:
        password = psycopg.conninfo.conninfo_to_dict(url).get("password")
    except psycopg.Error:
        password = None  # not parseable (a bare % in the password): read it off the URL below
    if password is None and "://" in url:
        password = _userinfo(url).partition(":")[2] or None
    return str(password) if password else None


def database_secrets(url: str) -> list[str]:
    """Everything of a database URL that must never appear in a message: the password as psycopg reads it,
    and the whole password part of the URL as written, decoded and, split at each ``@`` (an unencoded ``@``
    makes psycopg read the rest as the host), piece by piece."""
    found: list[str] = []
    password = database_password(url)
    written = _userinfo(url).partition(":")[2]
    for secret in (password, written, *written.split("@")):
        if secret:
            found += [secret, unquote(secret)]
    return list(dict.fromkeys(found))


def validate_database_url(value: str) -> str:
    """``KOMMO_DATABASE_URL`` as the code location and the CLI accept it; a ConfigError that never quotes it
    otherwise (psycopg's own message would quote the password)."""
    value = str(value).strip()
    if not value:
        raise ConfigError(
            "KOMMO_DATABASE_URL is not set: point it at the target PostgreSQL database "
            "(postgresql://user@host:port/dbname), or use `make run`, which starts a local one."
        )
    host = ""
    try:
        host = str(psycopg.conninfo.conninfo_to_dict(value).get("host") or "")
        readable = True
    except psycopg.Error:
        readable = False  # raised outside this handler, without the password
    if not readable:
        raise ConfigError("KOMMO_DATABASE_URL is not a PostgreSQL URL psycopg can read: percent-encode "
                          "special characters of the user and password (% as %25, @ as %40, : as %3A)")
    if "@" in _userinfo(value) or "@" in host:
        raise ConfigError("KOMMO_DATABASE_URL has an unencoded @ in its user or password (psycopg would take "
                          "what follows it for the host): percent-encode it as %40")
    return value


# The variable each retention field is read from, for the message that names it.
_RETENTION_VARIABLES = {
    "staging_retention_days": "KOMMO_STAGING_RETENTION_DAYS",
    "failed_staging_retention_days": "KOMMO_FAILED_STAGING_RETENTION_DAYS",
    "run_retention_days": "KOMMO_RUN_RETENTION_DAYS",
    "noop_increment_retention_days": "KOMMO_NOOP_INCREMENT_RETENTION_DAYS",
}


def import_run_id(run: dg.DagsterRun) -> str:
    """The import run id is the Dagster run id of the run that staged it. A re-execution of a failed run
    reuses its root's staging, so it points at the root run (whose record then says it is closed)."""
    return run.root_run_id or run.run_id


class PostgresResource(dg.ConfigurableResource):
    """The PostgreSQL database the refresh writes to (``KOMMO_DATABASE_URL``) and how long it keeps staging."""

    model_config = HIDE_INPUTS

    database_url: str = Field(
        repr=False, description="KOMMO_DATABASE_URL: postgresql://user:password@host:port/dbname (secret)."
    )
    staging_retention_days: float = Field(
        default=7, description="KOMMO_STAGING_RETENTION_DAYS: days the staging of succeeded runs is kept."
    )
    failed_staging_retention_days: float = Field(
        default=30,
        description="KOMMO_FAILED_STAGING_RETENTION_DAYS: days the staging of failed and needs_review runs is kept.",
    )
    run_retention_days: float = Field(
        default=365,
        description="KOMMO_RUN_RETENTION_DAYS: days the records of closed runs are kept (the last succeeded "
                    "refresh of each window always stays).",
    )
    noop_increment_retention_days: float = Field(
        default=2,
        description="KOMMO_NOOP_INCREMENT_RETENTION_DAYS: days the records of succeeded increments that changed "
                    "nothing are kept.",
    )
    # The owner lock of the run this resource was set up for (None outside a run: sensors, schedules).
    _owner: runs.OwnerLock | None = PrivateAttr(default=None)

    @field_validator("database_url", mode="before")
    @classmethod
    def _url(cls, value):
        if unresolved(value):
            return value
        return validate_database_url(value)

    @field_validator("staging_retention_days", "failed_staging_retention_days", "run_retention_days",
                     "noop_increment_retention_days", mode="before")
    @classmethod
    def _days(cls, value, info: ValidationInfo):
        return positive(_RETENTION_VARIABLES[info.field_name], value)

    def secrets(self) -> list[str]:
        """What must never appear in a message: the database password."""
        return database_secrets(self.database_url)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """In a run, takes the import run's owner lock once, held until the run ends.

        With the in-process executor (the code location's default) that is the whole run, every step and the
        moments between them, so an import marked running whose owner lock is free is dead, and the next start
        closes it at once. (A step-per-process executor would hold it per step only.)"""
        if context.dagster_run is None:
            return
        owner = runs.OwnerLock(self.database_url, import_run_id(context.dagster_run))
        try:
            owner.acquire()
        except psycopg.Error as exc:
            # Dagster stores a failed resource's error in the event log: without the password.
            raise ConnectionError(f"could not take the import run's owner lock: "
                                  f"{runs.safe_error(exc, self.secrets())}") from None
        self._owner = owner

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._owner is not None:
            self._owner.release()
            self._owner = None

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection:
        return connect(self.database_url, autocommit=autocommit)

    @contextmanager
    def import_runs(self) -> Iterator[runs.ImportRuns]:
        """The import-run record on a connection of its own: one transaction, committed when the block ends
        (a process killed before then leaves nothing behind, the swap included)."""
        with self.connect() as conn:
            yield runs.ImportRuns(conn)

    @contextmanager
    def owning(self, run_id: str) -> Iterator[None]:
        """The run's owner lock for the block: the one held for the whole run when this resource was set up for
        it (taken again if the database dropped it), else one for the block alone."""
        if self._owner is not None and self._owner.run_id == run_id:
            self._owner.ensure()
            yield
            return
        with runs.owning(self.database_url, run_id):
            yield

    @contextmanager
    def working_on_run(self, run_id: str, secrets: Iterable[str] = ()) -> Iterator[None]:
        """A step's hold on the import run: its owner lock (the run's own, held since the run began), and on
        any exception the run closed as failed (its error without ``secrets`` or the database password)
        before the exception propagates."""
        secrets = [*self.secrets(), *secrets]
        try:
            with self.owning(run_id):
                yield
        except BaseException as exc:
            try:
                self.close_run(run_id, "failed", exc, secrets, attempts=10)
            except Exception as close_error:  # the database is gone for good; the next start closes the dead run
                log.error("could not close Kommo import run %s: %s", run_id, runs.safe_error(close_error, secrets))
            if isinstance(exc, Exception) and _quotes_a_secret(exc, secrets):
                # Dagster would store the text (and its causes) in the event log and the failure sensor would
                # quote it: the step fails with the redacted text instead, without the original chained.
                raise dg.Failure(description=runs.safe_error(exc, secrets)) from None
            raise

    def close_run(self, run_id: str, status: str, error: BaseException | str | None,
                  secrets: list[str] | None = None, *, attempts: int = 1, pause: float = 1.0) -> bool:
        """Closes a running import (False when it was already closed). ``attempts`` > 1 rides out a database
        that is restarting: the error being recorded may be that very restart."""
        return runs.close_run(self.database_url, run_id, status, error, secrets, attempts=attempts, pause=pause)

    def prune_staging(self) -> dict:
        """Staging retention, then run record retention; the staging counts plus ``records`` (what
        ``prune_kommo_import_runs`` deleted)."""
        with self.import_runs() as import_runs:
            pruned = import_runs.prune_staging(self.staging_retention_days, self.failed_staging_retention_days)
            records = import_runs.prune_runs(self.noop_increment_retention_days, self.run_retention_days)
        return {**pruned, "records": records}


def _quotes_a_secret(exc: BaseException, secrets: list[str]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        text = f"{seen!s} {seen!r}"
        if redact(text, secrets) != text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
