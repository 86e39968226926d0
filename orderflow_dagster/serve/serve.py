"""`orderflow serve`: Dagster's webserver and daemon on the orderflow code location, headless,
against the environment's Kafka and Postgres, until Ctrl-C or SIGTERM.

    orderflow serve [--host 127.0.0.1] [--port 3000]

Three processes, each in a session of its own, so that a terminal's Ctrl-C reaches `serve` alone
and `serve` decides how they stop:

- the code server, `dagster api grpc -m orderflow_dagster.definitions`: sensors are evaluated in
  it and it starts each run in a child process;
- `dagster-daemon run`: the sensors' ticks, the run queue and its pools, run retries, run
  monitoring, tick retention;
- `dagster-webserver`: the UI on --host and --port.

The daemon and the webserver reach the code server through a workspace file with one
`grpc_server` entry, the shape of a deployment whose code server runs apart (deploy/values.yaml).

**Stopping.** SIGINT, SIGTERM or SIGHUP: SIGTERM to every process group `serve` started (a run in
flight is interrupted and fails; run retries and the planning sensor take it up again), up to
`STOP_GRACE_SECONDS` for them to exit, then SIGKILL for whatever is left, run workers and the
orphans of a code server killed earlier included. A second signal skips the wait. A process that
exits on its own is started again (after the code server answers, if it was the code server); one
that keeps exiting stops `serve` with status 1. On Linux the children also get SIGTERM if `serve`
itself is killed outright.

**The instance.** `DAGSTER_HOME`, or `$ORDERFLOW_HOME/dagster` when unset. The latter always gets
the current `deploy/dagster.yaml`; a DAGSTER_HOME of your own gets it only when it has no
dagster.yaml yet. Storage is Postgres: `ORDERFLOW_DAGSTER_PG_URL` when set, otherwise the
`dagster` database of ORDERFLOW_POSTGRES_DSN's server (created if missing). The URL reaches the
Dagster processes in their environment, never in a file. The pools' limits are set at each start
(orderflow_dagster/pools.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from orderflow_dagster import settings
from orderflow_dagster.stack._proc import port_open

DEFINITIONS_MODULE = "orderflow_dagster.definitions"
LOCATION_NAME = "orderflow"
STORAGE_URL_ENV = "ORDERFLOW_DAGSTER_PG_URL"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3000
# shipped in the package (deploy/dagster.yaml links to it), so an installed orderflow has it too
DEPLOY_CONFIG = Path(__file__).with_name("dagster.yaml")
MANAGED_HEADER = (
    "# Written by `orderflow serve` from deploy/dagster.yaml at each start: edits here are lost.\n"
    "# Point DAGSTER_HOME at a directory of your own to keep a dagster.yaml of your own.\n"
)
# how long the processes get between SIGTERM and SIGKILL: a run worker interrupted mid-range
# records its failure in that time
STOP_GRACE_SECONDS = 20.0
# importing the code location parses the dbt manifest when it is stale: slow on a busy machine
CODE_SERVER_START_TIMEOUT_SECONDS = 300.0
POLL_SECONDS = 0.5
# a process that exits this often within the window is not started again
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 300.0
EXIT_FAILED = 1


class ServeError(RuntimeError):
    """`orderflow serve` cannot start; the message says why and what to do."""


def _log(message: str) -> None:
    print(f"[serve] {message}", file=sys.stderr, flush=True)


# -- the instance -------------------------------------------------------------------------------


def psycopg2_url(url: str) -> str:
    """`url` naming the psycopg2 driver when it names none: dagster-postgres sends NOTIFY with a
    bound parameter, which psycopg 3 (SQLAlchemy's pick for some setups) sends to the server as
    `$1`, where NOTIFY accepts none."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in ("postgres", "postgresql"):
        return f"postgresql+psycopg2://{rest}"
    return url


def dagster_storage_url(dsn: str, database: str = settings.DEFAULT_DAGSTER_DATABASE) -> str:
    """The SQLAlchemy URL of database `database` on the server of the libpq DSN `dsn` (a URL or
    key=value), with the same user, password and connection parameters (sslmode, ...).

    Holds the password: never log it."""
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy.engine import URL

    try:
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except Exception as exc:  # psycopg raises ProgrammingError for a malformed DSN
        raise ValueError(f"not a valid Postgres DSN: {settings.redact_dsn(str(exc))}") from None
    host = params.pop("host", None)
    port = params.pop("port", None)
    if (host and "," in host) or (port and "," in port):
        raise ValueError(f"a multi-host Postgres DSN: set {STORAGE_URL_ENV} for Dagster's storage")
    user = params.pop("user", None)
    password = params.pop("password", None)
    params.pop("dbname", None)
    if host and host.startswith("/"):  # a unix socket directory goes in the query, as libpq's
        params["host"] = host
        host = None
    return URL.create(
        "postgresql+psycopg2",
        username=user,
        password=password,
        host=host,
        port=int(port) if port else None,
        database=database,
        query=params,
    ).render_as_string(hide_password=False)


def ensure_database(dsn: str, database: str) -> None:
    """Create database `database` on the server of `dsn` unless it exists."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        if conn.execute("select 1 from pg_database where datname = %s", (database,)).fetchone():
            return
        _log(f"creating database {database} for Dagster's storage")
        # a concurrent start may have created it in between; that is fine
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(database)))


@dataclass(frozen=True)
class Instance:
    """A prepared DAGSTER_HOME and the environment its Dagster processes run with."""

    home: Path
    env: dict[str, str] = field(repr=False)  # holds secrets


def default_dagster_home(env: Mapping[str, str]) -> Path:
    return settings.orderflow_home(env) / "dagster"


def prepare_instance(env: Mapping[str, str] | None = None) -> Instance:
    """Ready DAGSTER_HOME (its dagster.yaml), Dagster's database and the pools' limits; return
    the home and the environment (DAGSTER_HOME, ORDERFLOW_DAGSTER_PG_URL set) to run with."""
    from dagster import DagsterInstance

    from orderflow_dagster.pools import apply_pool_limits

    env = dict(os.environ if env is None else env)
    dsn = settings.require("ORDERFLOW_POSTGRES_DSN", env)
    settings.require("ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS", env)
    managed = not env.get("DAGSTER_HOME")
    home = Path(env["DAGSTER_HOME"]).expanduser() if not managed else default_dagster_home(env)
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    shipped = managed or not config.exists()
    if shipped:
        config.write_text(MANAGED_HEADER + DEPLOY_CONFIG.read_text())

    if env.get(STORAGE_URL_ENV):
        env[STORAGE_URL_ENV] = psycopg2_url(env[STORAGE_URL_ENV])
        where = STORAGE_URL_ENV
    else:
        database = settings.DEFAULT_DAGSTER_DATABASE
        try:
            ensure_database(dsn, database)
        except Exception as exc:
            raise ServeError(
                f"could not create the database {database!r} for Dagster's storage on the server "
                f"of ORDERFLOW_POSTGRES_DSN ({settings.redact_dsn(str(exc)).strip()}): create it, "
                f"or set {STORAGE_URL_ENV} to a postgresql+psycopg2:// URL of another"
            ) from None
        env[STORAGE_URL_ENV] = dagster_storage_url(dsn, database)
        where = f"database {database!r} of ORDERFLOW_POSTGRES_DSN's server"
    env["DAGSTER_HOME"] = str(home)

    # Opening the instance here creates or migrates its tables once, before three processes
    # would race to; the pools' limits are then in place before the daemon dequeues anything.
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        instance = DagsterInstance.from_config(str(home))
        try:
            limits = apply_pool_limits(instance, env)
        finally:
            instance.dispose()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    origin = "the shipped dagster.yaml" if shipped else "its own dagster.yaml"
    _log(f"Dagster instance in {home} ({origin}); Postgres storage URL: {where}")
    _log("pools: " + ", ".join(f"{pool} {limit}" for pool, limit in limits.items()))
    return Instance(home=home, env=env)


# -- the processes ------------------------------------------------------------------------------


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# looked up before any fork: the child only calls it
_PRCTL = _libc_prctl()
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """Runs in each child between fork and exec: a session of its own (the terminal's Ctrl-C
    goes to `serve` only) and, on Linux, SIGTERM when `serve` dies, however it dies."""
    os.setsid()
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


@dataclass
class Child:
    name: str
    argv: list[str]
    popen: subprocess.Popen | None = None
    starts: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_RESTARTS + 1))

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class Supervisor:
    """Starts the code server, the daemon and the webserver, restarts what exits, stops all."""

    def __init__(self, instance: Instance, *, host: str, port: int) -> None:
        import psutil

        self._psutil = psutil
        self.instance, self.host, self.port = instance, host, port
        self.code_port = free_port()
        self.cwd = settings.repo_root() or Path.cwd()
        bin_dir = Path(sys.executable).parent
        workspace = instance.home / "workspace.yaml"
        workspace.write_text(
            yaml.safe_dump(
                {
                    "load_from": [
                        {
                            "grpc_server": {
                                "host": DEFAULT_HOST,
                                "port": self.code_port,
                                "location_name": LOCATION_NAME,
                            }
                        }
                    ]
                },
                sort_keys=False,
            )
        )
        self.code_server = Child(
            "code server",
            [
                _tool(bin_dir, "dagster"),
                "api",
                "grpc",
                "-m",
                DEFINITIONS_MODULE,
                "--location-name",
                LOCATION_NAME,
                "-h",
                DEFAULT_HOST,
                "-p",
                str(self.code_port),
                "--use-python-environment-entry-point",
            ],
        )
        self.daemon = Child(
            "dagster-daemon", [_tool(bin_dir, "dagster-daemon"), "run", "-w", str(workspace)]
        )
        self.webserver = Child(
            "dagster-webserver",
            [
                _tool(bin_dir, "dagster-webserver"),
                "-w",
                str(workspace),
                "-h",
                host,
                "-p",
                str(port),
            ],
        )
        self.children = [self.code_server, self.daemon, self.webserver]
        self.stopping = threading.Event()
        self.kill_now = threading.Event()
        # every process seen in the tree, so one orphaned by a killed parent is still stopped
        self._seen: dict[int, object] = {}
        self._announced = False
        self.signal_name: str | None = None

    # -- signals --

    def on_signal(self, signum: int, _frame: object) -> None:
        # no printing here: the handler may interrupt a print to the same stream
        if self.stopping.is_set():
            self.kill_now.set()
        self.signal_name = signal.Signals(signum).name
        self.stopping.set()

    # -- lifecycle --

    def run(self) -> int:
        if port_open(self.port, self.host):
            raise ServeError(
                f"port {self.port} on {self.host} is in use: stop what listens there or choose "
                "another with --port"
            )
        try:
            if not self._start_code_server():
                return 0 if self.stopping.is_set() else EXIT_FAILED
            self._start(self.daemon)
            self._start(self.webserver)
            return self._supervise()
        finally:
            self.stop()

    def _supervise(self) -> int:
        while not self.stopping.wait(POLL_SECONDS):
            self._track()
            self._announce()
            for child in self.children:
                if child.running:
                    continue
                code = child.popen.returncode if child.popen else None
                if len(child.starts) > MAX_RESTARTS and (
                    time.monotonic() - child.starts[0] < RESTART_WINDOW_SECONDS
                ):
                    _log(f"{child.name} keeps exiting (status {code}); stopping")
                    return EXIT_FAILED
                _log(f"{child.name} exited (status {code}); starting it again")
                if child is self.code_server:
                    if not self._start_code_server():
                        return 0 if self.stopping.is_set() else EXIT_FAILED
                else:
                    self._start(child)
        return 0

    def _start(self, child: Child) -> None:
        # the old process group's members (a killed code server's run workers) stay tracked
        child.popen = subprocess.Popen(
            child.argv,
            cwd=self.cwd,
            env=self.instance.env,
            stdin=subprocess.DEVNULL,
            # preexec_fn is unsafe with threads; `serve` runs none
            preexec_fn=_child_setup,
        )
        child.starts.append(time.monotonic())
        self._seen[child.popen.pid] = self._psutil.Process(child.popen.pid)
        _log(f"started {child.name} (pid {child.popen.pid})")

    def _start_code_server(self) -> bool:
        """Start the code server and wait until it answers; False if stopped meanwhile."""
        from dagster._grpc.client import DagsterGrpcClient

        self._start(self.code_server)
        client = DagsterGrpcClient(port=self.code_port, host=DEFAULT_HOST)
        deadline = time.monotonic() + CODE_SERVER_START_TIMEOUT_SECONDS
        while not self.stopping.is_set():
            if not self.code_server.running:
                _log(f"code server exited (status {self.code_server.popen.returncode})")
                return False
            if port_open(self.code_port):
                try:
                    client.ping("orderflow")
                    return True
                except Exception:  # not serving yet
                    pass
            if time.monotonic() > deadline:
                _log(f"code server did not answer within {CODE_SERVER_START_TIMEOUT_SECONDS:.0f}s")
                return False
            self.stopping.wait(POLL_SECONDS)
        return False

    def _announce(self) -> None:
        if not self._announced and self.webserver.running and port_open(self.port, self.host):
            self._announced = True
            _log(f"Dagster UI on http://{self.host}:{self.port} (Ctrl-C to stop)")

    def _track(self) -> None:
        for child in self.children:
            if not child.running:
                continue
            with contextlib.suppress(self._psutil.Error):
                for proc in self._psutil.Process(child.popen.pid).children(recursive=True):
                    self._seen.setdefault(proc.pid, proc)

    def _alive(self) -> list:
        out = []
        for proc in self._seen.values():
            with contextlib.suppress(self._psutil.Error):
                if proc.is_running() and proc.status() != self._psutil.STATUS_ZOMBIE:
                    out.append(proc)
        return out

    def stop(self) -> None:
        """SIGTERM everything, wait up to STOP_GRACE_SECONDS, SIGKILL what is left."""
        if self.signal_name:
            _log(f"{self.signal_name}: stopping (a second signal stops at once)")
        self._track()
        # the daemon and the webserver first: nothing launches a run while the code server stops
        self._signal_all(signal.SIGTERM, [self.daemon, self.webserver, self.code_server])
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and not self.kill_now.is_set():
            if not any(c.running for c in self.children) and not self._alive():
                break
            time.sleep(0.2)
        leftovers = [c.name for c in self.children if c.running]
        if leftovers or self._alive():
            _log(f"SIGKILL for what is still running ({', '.join(leftovers) or 'run workers'})")
            self._signal_all(signal.SIGKILL, self.children)
        for child in self.children:
            if child.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.popen.wait(timeout=10)
        self._psutil.wait_procs(self._alive(), timeout=10)

    def _signal_all(self, sig: signal.Signals, order: list[Child]) -> None:
        groups = set()
        for child in order:
            # a group is signalled only while its leader is ours and unreaped, so its id cannot
            # belong to anyone else; members of a group whose leader is gone (the run workers of
            # a code server killed earlier) are signalled one by one below
            if child.running:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.popen.pid, sig)
                    groups.add(child.popen.pid)
        for proc in self._alive():
            with contextlib.suppress(self._psutil.Error, OSError):
                # once is enough: a second SIGTERM would interrupt a run worker's own shutdown
                if os.getpgid(proc.pid) not in groups:
                    proc.send_signal(sig)


def _tool(bin_dir: Path, name: str) -> str:
    beside_python = bin_dir / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise ServeError(f"{name} is not installed: no {beside_python} and none on PATH")
    return found


# -- entry points ---------------------------------------------------------------------------------


def serve(
    *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, instance: Instance | None = None
) -> int:
    """Run the code server, the daemon and the webserver until a signal stops them (0) or one
    keeps failing (1). `instance` from `prepare_instance`, or prepared here."""
    try:
        instance = instance or prepare_instance()
        supervisor = Supervisor(instance, host=host, port=port)
    except Exception as exc:  # a readable message and exit 1, not a traceback
        _log(f"error: {settings.redact_dsn(str(exc))}")
        return EXIT_FAILED
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, supervisor.on_signal) for sig in handled}
    try:
        return supervisor.run()
    except ServeError as exc:
        _log(f"error: {exc}")
        return EXIT_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _log("stopped")


def _run(args: argparse.Namespace) -> int:
    try:
        port = args.port or settings.env_int("ORDERFLOW_UI_PORT", DEFAULT_PORT)
    except ValueError as exc:
        _log(f"error: {exc}")
        return EXIT_FAILED
    return serve(host=args.host, port=port)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the Dagster webserver and daemon on this code location until Ctrl-C or SIGTERM",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"UI address ({DEFAULT_HOST})")
    parser.add_argument(
        "--port", type=int, help=f"UI port (default: ORDERFLOW_UI_PORT, else {DEFAULT_PORT})"
    )
    parser.set_defaults(func=_run)
