"""A throwaway PostgreSQL server the project starts itself, for development, tests and the benchmark.

It runs the machine's PostgreSQL binaries (``apt-get install postgresql``); as root they run as the
unprivileged ``postgres`` user, since ``initdb`` and ``pg_ctl`` refuse to run as root.
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

import psycopg
from psycopg import sql

DEFAULT_DATABASE = "kommo"


class LocalPostgresError(RuntimeError):
    pass


def find_bindir() -> Path:
    """``KOMMO_PG_BINDIR``, else the newest ``/usr/lib/postgresql/*/bin``, else ``pg_ctl`` on PATH."""
    explicit = os.environ.get("KOMMO_PG_BINDIR")
    candidates = [Path(explicit)] if explicit else []
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    candidates += [Path(p) for p in versions]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    raise LocalPostgresError(
        "No PostgreSQL server binaries found: install them (apt-get install postgresql) "
        "or set KOMMO_PG_BINDIR, or point KOMMO_DATABASE_URL at an existing server."
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """One server in ``data_dir`` on 127.0.0.1; ``start()`` reuses a server already running there.

    Durable by default, as a production server is (the dev environment and the benchmark run on it);
    ``durable=False`` turns off fsync, synchronous commit and full-page writes, for a throwaway server
    whose data may be lost or corrupted by an OS crash (the test suite's)."""

    def __init__(self, data_dir: Path, *, port: int | None = None, durable: bool = True):
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.durable = durable
        self.bindir = find_bindir()
        self._as_postgres = os.geteuid() == 0

    @property
    def _port_file(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.port"

    def url(self, database: str = DEFAULT_DATABASE) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise LocalPostgresError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        return result

    def _prepare_dir(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            pg = pwd.getpwnam("postgres")
            # The postgres user must be able to reach the data directory through every parent.
            for parent in reversed(self.data_dir.parents):
                if not os.access(parent, os.X_OK):
                    raise LocalPostgresError(f"{parent} is not traversable by other users")
                if parent == self.data_dir.parent:
                    break
            os.chown(self.data_dir.parent, pg.pw_uid, pg.pw_gid)

    def is_running(self) -> bool:
        if self.port is None and self._port_file.exists():
            self.port = int(self._port_file.read_text().strip())
        if self.port is None or not (self.data_dir / "postmaster.pid").exists():
            return False
        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def start(self) -> str:
        """Starts (or reuses) the server and makes sure the default database exists; returns its URL."""
        if self.is_running():
            self.ensure_database(DEFAULT_DATABASE)
            return self.url()
        self._prepare_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--locale=C.UTF-8")
        if self.port is None:
            self.port = free_port()
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", str(self.data_dir / "server.log"),
                  "-w", "-t", "60", "start")
        self._port_file.write_text(str(self.port))
        self.ensure_database(DEFAULT_DATABASE)
        return self.url()

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Restarts the server in place (used by fault tests)."""
        # -l again: a restarted server that kept our stdout pipe would hang this call.
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-l", str(self.data_dir / "server.log"),
                  "-w", "-t", "60", "restart")

    def ensure_database(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
                if template:
                    query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
                conn.execute(query)
        return self.url(name)

