"""``kommo-assets dev``: the Dagster UI and daemon on the embedded default (local Postgres + Kommo simulator).

The simulator is a thread of this process, so this process stays up as the parent of ``dagster dev``: it
forwards Ctrl-C / SIGTERM to it, waits for every Dagster process to exit, then stops what it started.
``launch()`` starts the whole thing as a subprocess for tests and scripts.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kommo_assets.dev.environment import LocalEnvironment, start_local_environment
from kommo_assets.dev.local_postgres import LocalPostgres, free_port
from kommo_assets.settings import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGSTER_DATABASE = "dagster"
# Written beside the instance while `dagster dev` runs: its process group id, for cleanup by whoever
# started us (the file is removed on a clean exit).
PGID_FILE = "dagster-dev.pgid"
STOP_GRACE_SECONDS = 30.0
_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _repo_file(name: str) -> Path:
    path = REPO_ROOT / name
    if not path.exists():
        raise ConfigError(
            f"{path} not found: `kommo-assets dev` runs from a checkout of the repository "
            "(pip install -e .), where dagster.yaml and workspace.yaml live."
        )
    return path


def psycopg2_url(url: str) -> str:
    """Dagster's storage goes through SQLAlchemy; name the driver so a bare postgresql:// never means
    psycopg 3 (SQLAlchemy 2.1), which dagster-postgres' event store cannot use."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def _local_postgres(home: Path) -> tuple[LocalPostgres, bool]:
    """The server ``start_local_environment`` uses in ``home``, and whether it is running already."""
    server = LocalPostgres(home / "pg")
    port_file = home / "pg.port"
    if port_file.exists():
        server.port = int(port_file.read_text().strip())
    return server, server.is_running()


def prepare_dagster_home(home: Path) -> Path:
    """``<home>/dagster_home`` with the repository's dagster.yaml, refreshed on every start."""
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_repo_file("dagster.yaml"), dagster_home / "dagster.yaml")
    return dagster_home


@dataclass
class LocalInstance:
    """The Dagster instance of the embedded default, shared by ``kommo-assets run`` and ``kommo-assets dev``:
    a run made by one is in the UI of the other."""

    home: Path  # DAGSTER_HOME, with the repository's dagster.yaml
    environ: dict[str, str]  # DAGSTER_HOME and DAGSTER_POSTGRES_URL, for the processes that use it
    note: str
    started: list[LocalPostgres]  # servers started for it (the caller stops them when it started them)


def prepare_instance(home: Path, env: LocalEnvironment) -> LocalInstance:
    """Storage in ``DAGSTER_POSTGRES_URL`` when set, else in a ``dagster`` database of the local server."""
    started: list[LocalPostgres] = []
    storage_url = os.environ.get("DAGSTER_POSTGRES_URL", "").strip()
    if storage_url:
        note = "Dagster storage: DAGSTER_POSTGRES_URL"
    else:
        server = env.postgres
        if server is None:  # KOMMO_DATABASE_URL points elsewhere: keep Dagster's own data local
            server, running = _local_postgres(home)
            server.start()
            if not running:
                started.append(server)
        storage_url = server.ensure_database(DAGSTER_DATABASE)
        note = f"Dagster storage: database {DAGSTER_DATABASE!r} at {storage_url}"
    dagster_home = prepare_dagster_home(home)
    environ = {"DAGSTER_HOME": str(dagster_home), "DAGSTER_POSTGRES_URL": psycopg2_url(storage_url)}
    return LocalInstance(dagster_home, environ, note, started)


def server_info_url(host: str, port: int) -> str:
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    return f"http://{probe_host}:{port}/server_info"


def is_serving(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(server_info_url(host, port), timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def ensure_port_free(host: str, port: int) -> None:
    """The webserver logs a failed bind and keeps running without serving anything: refuse up front."""
    bind_host = "0.0.0.0" if host == "" else host
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind_host, port))
        except OSError as exc:
            raise ConfigError(f"cannot serve on {host}:{port} ({exc.strerror}): stop what is using it "
                              "or pass another --port") from None


def dagster_dev_command(host: str, port: int) -> list[str]:
    command = [sys.executable, "-m", "dagster", "dev", "-w", str(_repo_file("workspace.yaml")),
               "-h", host, "-p", str(port)]
    # If this process dies without a chance to clean up (SIGKILL), `dagster dev` gets SIGTERM instead of
    # running on without the simulator it was pointed at.
    setpriv = shutil.which("setpriv")
    if setpriv and sys.platform.startswith("linux"):
        command = [setpriv, "--pdeathsig", "TERM", "--", *command]
    return command


def serve(args) -> int:
    """Runs ``dagster dev`` on the local environment until it exits or this process is told to stop."""
    home = Path(args.home).resolve()
    host, port = args.host, int(args.port)
    ensure_port_free(host, port)

    stop_requests: list[int] = []
    child: subprocess.Popen | None = None

    def on_signal(signum, _frame):
        stop_requests.append(signum)
        if child is None:
            raise KeyboardInterrupt
        # Only `dagster dev` itself hears it, and stops the webserver, the daemon and the code server in
        # order (runs in progress are interrupted). Signalling its whole group instead, as a terminal's
        # Ctrl-C does, races its shutdown: a code server that exits first is restarted and left behind.
        try:
            os.kill(child.pid, signal.SIGINT if signum == signal.SIGHUP else signum)
        except ProcessLookupError:
            pass

    # Installed before the child starts: a caught signal reverts to its default in the exec'd child, so
    # `dagster dev` reacts to SIGINT/SIGTERM even when this process was started with them ignored
    # (a background job of a non-interactive shell), which otherwise leaves it hanging on shutdown.
    previous = {signum: signal.signal(signum, on_signal) for signum in _FORWARDED_SIGNALS}

    env: LocalEnvironment | None = None
    stop_postgres: list[LocalPostgres] = []
    pgid_file = home / "dagster_home" / PGID_FILE
    try:
        local_db = not os.environ.get("KOMMO_DATABASE_URL", "").strip()
        running = False
        if local_db:
            _, running = _local_postgres(home)
        env = start_local_environment(home, leads=args.leads)
        if local_db and not running:
            stop_postgres.append(env.postgres)
        for note in env.notes:
            print(f"* {note}", flush=True)

        instance = prepare_instance(home, env)
        stop_postgres.extend(instance.started)
        print(f"* {instance.note}", flush=True)
        dagster_home = instance.home
        child_env = dict(os.environ, **instance.environ)
        # cwd is the instance folder: `dagster dev` warns about any other dagster.yaml in its cwd.
        child = subprocess.Popen(dagster_dev_command(host, port), cwd=dagster_home, env=child_env,
                                 start_new_session=True)
        pgid_file.write_text(str(child.pid))
        print(f"* starting Dagster (instance in {dagster_home}) ...", flush=True)
        return _supervise(child, host, port, stop_requests)
    except KeyboardInterrupt:
        return 130
    finally:
        if child is not None:
            _stop_child(child, already_signalled=bool(stop_requests))
            pgid_file.unlink(missing_ok=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if env is not None:
            env.close()
        for server in stop_postgres:
            server.stop()


def _supervise(child: subprocess.Popen, host: str, port: int, stop_requests: list[int]) -> int:
    started = time.monotonic()
    announced = False
    while child.poll() is None:
        if stop_requests:
            break
        if not announced and is_serving(host, port, timeout=1.0):
            announced = True
            shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
            print(f"* Dagster UI ready after {time.monotonic() - started:.1f}s: http://{shown}:{port} "
                  "(Ctrl-C stops it)", flush=True)
        time.sleep(0.5)
    if stop_requests:
        return 0
    print(f"* dagster dev exited with code {child.returncode}", flush=True)
    return child.returncode or 1


def _stop_child(child: subprocess.Popen, *, already_signalled: bool) -> None:
    """Every process of the ``dagster dev`` group is gone when this returns."""
    pgid = child.pid
    # A second interrupt would cut `dagster dev`'s own orderly shutdown short: signal only if nobody has.
    if not already_signalled and child.poll() is None:
        _signal_group(pgid, signal.SIGTERM)
    try:
        child.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        print(f"* dagster dev did not stop within {STOP_GRACE_SECONDS:.0f}s; killing it", flush=True)
    # Stragglers (a run worker finishing its interruption) get a few seconds, then SIGKILL.
    if not _wait_group_gone(pgid, 5.0):
        print("* Dagster processes left after shutdown; killing them", flush=True)
        _signal_group(pgid, signal.SIGKILL)
        _wait_group_gone(pgid, 5.0)
    if child.poll() is None:
        child.wait(timeout=5)
    print("* Dagster stopped", flush=True)


@dataclass
class DevServer:
    """A ``kommo-assets dev`` started by ``launch()``."""

    process: subprocess.Popen
    home: Path
    host: str
    port: int
    log_path: Path
    forced: bool = False  # stop() had to SIGKILL something

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def dagster_pgid(self) -> int | None:
        path = self.home / "dagster_home" / PGID_FILE
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_GRACE_SECONDS + 20) -> int | None:
        """SIGTERM, as an operator would; then makes sure no process of it survives. Returns its exit code."""
        dagster_pgid = self.dagster_pgid()
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.forced = True
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if dagster_pgid is not None and _group_alive(dagster_pgid):
            self.forced = True
            _signal_group(dagster_pgid, signal.SIGKILL)
            _wait_group_gone(dagster_pgid, 10.0)
        return self.process.returncode


def launch(home: Path, *, port: int | None = None, host: str = "127.0.0.1", leads: int = 800,
           env: dict[str, str] | None = None, timeout: float = 150.0) -> DevServer:
    """Starts ``kommo-assets dev`` in its own session and returns once ``/server_info`` answers.

    Output goes to ``<home>/dev.log``. On a failed start the process is stopped and the log tail raised.
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = home / "dev.log"
    command = [sys.executable, "-m", "kommo_assets.cli", "dev", "--home", str(home), "--host", host,
               "--port", str(port), "--leads", str(leads)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = DevServer(process, home, host, port, log_path)
    deadline = time.monotonic() + timeout
    while not is_serving(host, port, timeout=1.0):
        if process.poll() is not None or time.monotonic() > deadline:
            reason = (f"exited with code {process.returncode}" if process.poll() is not None
                      else f"did not answer /server_info within {timeout:.0f}s")
            server.stop()
            raise RuntimeError(f"kommo-assets dev {reason}; log tail:\n{server.log_tail()}")
        time.sleep(0.5)
    return server
