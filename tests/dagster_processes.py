"""Dagster processes for the end-to-end tests: a temporary DAGSTER_HOME, the daemon or the
webserver started in their own session, readiness waits, and teardown of the whole tree.

Every process is started with `start_new_session=True`, so it and everything it spawns (the code
server, one run worker per run) share one process group that teardown signals as a unit. Output
goes to a log file whose tail is printed when the block using the process fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil
import psycopg
import yaml
from confluent_kafka import Consumer
from dagster import DagsterInstance

from orderflow_dagster.land import kafka_source
from orderflow_dagster.pools import apply_pool_limits
from tests.support import produce_orders

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFINITIONS_MODULE = "orderflow_dagster.definitions"
DEPLOY_CONFIG = REPO / "deploy" / "dagster.yaml"

T = TypeVar("T")


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_dagster_home(path: Path) -> Path:
    """A DAGSTER_HOME configured like the demo's, from `deploy/dagster.yaml` (queued runs, pools,
    run retries, run monitoring), with SQLite storage inside `path`. The run queue polls every
    second; settings the shipped file lacks get the defaults below."""
    config = yaml.safe_load(DEPLOY_CONFIG.read_text()) if DEPLOY_CONFIG.exists() else {}
    config = config or {}
    config["storage"] = {"sqlite": {"base_dir": str(path / "storage")}}
    coordinator = config.setdefault(
        "run_coordinator",
        {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {"max_concurrent_runs": 2},
        },
    )
    if coordinator.get("class") == "QueuedRunCoordinator":
        coordinator.setdefault("config", {})["dequeue_interval_seconds"] = 1
    config.setdefault("run_retries", {"enabled": True, "max_retries": 2})
    config.setdefault("run_monitoring", {"enabled": True})
    config["telemetry"] = {"enabled": False}
    config["nux"] = {"enabled": False}  # no welcome dialog over the UI in screenshots
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def clean_environ() -> dict[str, str]:
    """This process's environment without its ORDERFLOW_* and DAGSTER_* variables, so a
    developer's shell cannot redirect a test's processes."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ORDERFLOW_", "DAGSTER_")) or k.startswith("ORDERFLOW_TEST_")
    }


def orderflow_env(
    *,
    dagster_home: Path,
    bootstrap_servers: str,
    dsn: str,
    topic: str,
    consumer_group: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a Dagster process pointed at the test stack (see `clean_environ`)."""
    env = clean_environ()
    env.update(
        {
            "DAGSTER_HOME": str(dagster_home),
            "ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
            "ORDERFLOW_POSTGRES_DSN": dsn,
            "ORDERFLOW_TOPIC": topic,
            "ORDERFLOW_CONSUMER_GROUP": consumer_group,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    _seen: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<no log: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if not self.alive():
            raise AssertionError(
                f"{self.name} exited with code {self.popen.returncode}; log tail:\n{self.tail()}"
            )

    def track_descendants(self) -> None:
        """Remember the process tree, so a child that left the group is still found at stop."""
        with suppress(psutil.Error):
            for child in psutil.Process(self.pid).children(recursive=True):
                self._seen.setdefault(child.pid, child)

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this tree still running (same pid and start time as when seen)."""
        out = []
        for proc in self._seen.values():
            with suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
        return out

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever of the tree is left after `grace_s`."""
        self.track_descendants()
        with suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None and not self.leftovers():
                break
            time.sleep(0.2)
        with suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        for proc in self.leftovers():
            with suppress(psutil.Error):
                proc.kill()
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        psutil.wait_procs(self.leftovers(), timeout=5)
        if self.leftovers() or self.popen.poll() is None:
            raise RuntimeError(f"{self.name}: processes survived teardown: {self.leftovers()}")


@contextmanager
def running(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_dir: Path,
    cwd: Path = REPO,
) -> Iterator[ManagedProcess]:
    """Run `argv` in a new session for the duration of the block; always tear the group down.
    If the block raises, the tail of the process's log is printed (pytest shows it on failure)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc = ManagedProcess(name, popen, log_path)
    try:
        yield proc
    except BaseException:
        print(f"----- {name} (pid {proc.pid}) log tail: {log_path} -----\n{proc.tail()}")
        raise
    finally:
        proc.stop()


def dagster_daemon(env: Mapping[str, str], log_dir: Path):
    """`dagster-daemon run` on the orderflow code location: sensors, run queue, retries, monitor."""
    argv = [str(BIN / "dagster-daemon"), "run", "-m", DEFINITIONS_MODULE]
    return running("dagster-daemon", argv, env=env, log_dir=log_dir)


def dagster_webserver(env: Mapping[str, str], log_dir: Path, port: int):
    argv = [
        str(BIN / "dagster-webserver"),
        "-m",
        DEFINITIONS_MODULE,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    return running("dagster-webserver", argv, env=env, log_dir=log_dir)


def orderflow_serve(
    env: Mapping[str, str], log_dir: Path, port: int, name: str = "orderflow-serve"
):
    """`orderflow serve` (code server, daemon, webserver) with the UI on `port`. Teardown sends
    SIGTERM to serve alone (its children run in sessions of their own) and checks that nothing
    of the tree it saw survives."""
    argv = [sys.executable, "-m", "orderflow_dagster.cli", "serve", "--port", str(port)]
    return running(name, argv, env=env, log_dir=log_dir)


# what each process of `orderflow serve`'s tree is, from its command line
SERVE_ROLES = {
    "code server": "api grpc",
    "daemon": "dagster-daemon",
    "webserver": "dagster-webserver",
    # the code server starts each run in a multiprocessing child
    "run worker": "multiprocessing.spawn",
}


def serve_tree(proc: ManagedProcess) -> dict[str, list[psutil.Process]]:
    """The live descendants of `orderflow serve`, by role (see SERVE_ROLES)."""
    out: dict[str, list[psutil.Process]] = {role: [] for role in SERVE_ROLES}
    with suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with suppress(psutil.Error):
                command = " ".join(child.cmdline())
                for role, marker in SERVE_ROLES.items():
                    if marker in command:
                        out[role].append(child)
                        break
    return out


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 1.0,
    watch: Sequence[ManagedProcess] = (),
    describe: Callable[[], str] | None = None,
) -> T:
    """Call `probe` until it returns something truthy; fail early if a watched process dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        for proc in watch:
            proc.check_alive()
            proc.track_descendants()
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            state = f"; last state: {describe()}" if describe else ""
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{state}")
        time.sleep(interval_s)


def run_to_completion(
    argv: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a short-lived command (a headless browser) in its own session; on timeout, or if the
    test is interrupted, kill its whole group so no helper process outlives it."""
    popen = subprocess.Popen(
        list(argv),
        env=None if env is None else dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = popen.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stdout, stderr = "", f"<killed after {timeout_s:.0f}s>"
    finally:
        with suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
    return subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)


def http_get(url: str, timeout_s: float = 5.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.read().decode("utf-8", "replace") if resp.status == 200 else None
    except (urllib.error.URLError, OSError):
        return None


def wait_for_http(url: str, proc: ManagedProcess, timeout_s: float = 120.0) -> str:
    return wait_until(lambda: http_get(url), timeout_s=timeout_s, what=url, watch=[proc])


@dataclass
class Testbed:
    """A produced stream and what a test against Dagster processes needs around it: the
    DAGSTER_HOME, the processes' environment, and a connection, consumer and instance to watch."""

    outgoing: list
    home: Path
    group: str
    env: dict[str, str]
    conn: psycopg.Connection
    consumer: Consumer
    instance: DagsterInstance

    def close(self) -> None:
        self.instance.dispose()
        self.consumer.close()
        self.conn.close()


def open_testbed(
    tmp_path: Path,
    *,
    bootstrap_servers: str,
    dsn: str,
    topic: str,
    orders: int,
    group_prefix: str,
    extra: Mapping[str, str],
) -> Testbed:
    outgoing = produce_orders(
        bootstrap_servers, topic, orders, duplicate_rate=0.1, poison_rate=0.05
    )
    home = make_dagster_home(tmp_path / "dagster_home")
    group = f"{group_prefix}-{uuid.uuid4().hex[:8]}"
    env = orderflow_env(
        dagster_home=home,
        bootstrap_servers=bootstrap_servers,
        dsn=dsn,
        topic=topic,
        consumer_group=group,
        extra=extra,
    )
    conn = psycopg.connect(dsn, autocommit=True)
    consumer = kafka_source.open_consumer(bootstrap_servers, group)
    # opened (and its SQLite storage created) before any Dagster process starts, so they never
    # race to initialise it
    instance = DagsterInstance.from_config(str(home))
    # the pools' limits `orderflow serve` sets (dagster.yaml gives an unset pool one slot)
    apply_pool_limits(instance, env)
    return Testbed(outgoing, home, group, env, conn, consumer, instance)
