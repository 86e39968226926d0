"""A single-node Kafka 4.x broker (KRaft, broker and controller in one JVM) for local work.

There is no Kafka distribution to download here, only Maven Central, so the broker's classpath is
the runtime dependencies of `kafka_2.13`, copied once by Maven from `pom.xml` next to this file
into a libs directory (see `ensure_libs`). The broker then runs as `java -cp "libs/*" kafka.Kafka`
with a generated `server.properties`; everything it writes lives under `$ORDERFLOW_HOME/kafka`:

    kafka/server.properties   regenerated on every start (ports may change between runs)
    kafka/cluster.id          KRaft cluster id, generated once
    kafka/data/               log.dirs, formatted once (meta.properties marks it)
    kafka/logs/server.log     broker log (log4j2, size-capped)
    kafka/kafka.out           JVM stdout/stderr (crashes before logging starts end up here)
    kafka/kafka.pid           PID of the running broker
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orderflow_dagster.stack._proc import (
    StackError,
    cmdline,
    kill,
    log,
    pid_alive,
    port_open,
    read_pid,
    require_free_port,
    tail,
    terminate,
)

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

KAFKA_POM = Path(__file__).with_name("pom.xml")
LOG4J_CONFIG = Path(__file__).with_name("log4j2.properties")
DEFAULT_HEAP = "512m"
START_TIMEOUT_SECONDS = 90.0
STOP_GRACE_SECONDS = 30.0
MAVEN_TIMEOUT_SECONDS = 900.0
# Written into the libs directory only after Maven succeeded; holds the pom's hash so that a
# changed pom (another Kafka version) fetches a fresh set instead of mixing jar versions.
LIBS_MARKER = ".orderflow-complete"

# librdkafka logs every refused connection while the broker boots; the readiness probe expects
# those, so its client logs go nowhere.
_quiet_client_logger = logging.getLogger("orderflow.stack.kafka.client")
_quiet_client_logger.addHandler(logging.NullHandler())
_quiet_client_logger.propagate = False


def admin_client(bootstrap_servers: str) -> AdminClient:
    """An AdminClient that does not spam stderr with librdkafka connection logs."""
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap_servers, "logger": _quiet_client_logger})


def ensure_libs(libs_dir: Path, pom: Path = KAFKA_POM) -> None:
    """Make sure `libs_dir` holds the broker's jars, fetching them with Maven if needed.

    Safe to call concurrently from several processes sharing one cache: a file lock serialises
    the fetch, and the jars are moved into place only once complete.
    """
    fingerprint = hashlib.sha256(pom.read_bytes()).hexdigest()
    if _libs_complete(libs_dir, fingerprint):
        return
    libs_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(libs_dir.parent / f".{libs_dir.name}.lock"):
        if _libs_complete(libs_dir, fingerprint):  # another process fetched them meanwhile
            return
        log(f"fetching Kafka jars from Maven Central into {libs_dir} (once; cached afterwards)")
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".{libs_dir.name}-", dir=libs_dir.parent))
        try:
            _maven_copy_dependencies(pom, staging)
            (staging / LIBS_MARKER).write_text(fingerprint)
            shutil.rmtree(libs_dir, ignore_errors=True)
            staging.rename(libs_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log(f"Kafka jars ready in {time.monotonic() - started:.1f}s")


def _libs_complete(libs_dir: Path, fingerprint: str) -> bool:
    marker = libs_dir / LIBS_MARKER
    return marker.is_file() and marker.read_text().strip() == fingerprint


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _maven_copy_dependencies(pom: Path, output_dir: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError("Maven (`mvn`) is needed once to fetch the Kafka jars; install it")
    command = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={output_dir}",
    ]
    result = subprocess.run(
        command,
        cwd=output_dir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=MAVEN_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise StackError(
            f"Maven could not fetch the Kafka jars (exit {result.returncode}):\n{output}"
        )


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (22 characters),
    never starting with "-": the storage tool would read it as an option (1 id in 64 did, and
    the stack could then never start). Kafka's own Uuid.randomUuid() skips those too."""
    while True:
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def render_server_properties(port: int, controller_port: int, data_dir: Path) -> str:
    """The broker configuration: one node that is both broker and KRaft controller, listening on
    loopback only, with replication factors of 1 since there is nobody to replicate to."""
    return f"""\
# Generated by `orderflow stack up` on every start; edits are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={data_dir}
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
# Topics are created explicitly (with their partition counts) by the stack manager; a typo in a
# topic name should fail, not silently create a new topic.
auto.create.topics.enable=false
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
"""


@dataclass(frozen=True)
class KafkaBroker:
    """The local broker kept under `home/kafka`; cheap to construct, state lives on disk."""

    home: Path
    port: int
    controller_port: int
    libs_dir: Path
    heap: str = DEFAULT_HEAP

    @property
    def dir(self) -> Path:
        return self.home / "kafka"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def server_log(self) -> Path:
        return self.log_dir / "server.log"

    @property
    def stdout_log(self) -> Path:
        return self.dir / "kafka.out"

    @property
    def pid_file(self) -> Path:
        return self.dir / "kafka.pid"

    @property
    def server_properties(self) -> Path:
        return self.dir / "server.properties"

    @property
    def cluster_id_file(self) -> Path:
        return self.dir / "cluster.id"

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- state -------------------------------------------------------------------------------

    def pid(self) -> int | None:
        """PID of this home's running broker, or None. A PID file whose process is gone or is
        something else (the PID was recycled) does not count."""
        pid = read_pid(self.pid_file)
        if pid is None or not pid_alive(pid):
            return None
        command = cmdline(pid)
        if "kafka.Kafka" not in command or str(self.server_properties) not in command:
            return None
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def answers(self, timeout: float = 3.0) -> bool:
        """Whether the broker serves metadata requests (not merely has its port open)."""
        if not port_open(self.port):
            return False
        from confluent_kafka import KafkaException

        try:
            admin_client(self.bootstrap_servers).list_topics(timeout=timeout)
        except KafkaException:
            return False
        return True

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start the broker unless it already runs, and wait until it answers."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the broker process without waiting for it (so Postgres can start meanwhile)."""
        if self.is_running():
            return
        self.pid_file.unlink(missing_ok=True)  # stale: its process is gone
        require_free_port(self.port, "Kafka", "ORDERFLOW_KAFKA_PORT")
        require_free_port(
            self.controller_port, "the Kafka controller", "ORDERFLOW_KAFKA_CONTROLLER_PORT"
        )
        ensure_libs(self.libs_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.server_properties.write_text(
            render_server_properties(self.port, self.controller_port, self.data_dir)
        )
        self._format_storage_once()
        log(f"starting Kafka on {self.bootstrap_servers} (log: {self.server_log})")
        with self.stdout_log.open("ab") as out:
            process = subprocess.Popen(
                self._java_command("kafka.Kafka", str(self.server_properties), heap=self.heap),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own session: the broker outlives `orderflow stack up` and does not get the
                # terminal's Ctrl-C.
                start_new_session=True,
            )
        self.pid_file.write_text(f"{process.pid}\n")

    def wait_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Wait until the broker answers; on failure, raise with the tail of its log."""
        deadline = time.monotonic() + timeout
        while not self.answers():
            # Whether the PID file's process lives, not is_running(): just after the fork its
            # command line can still read empty (the exec is under way), which is_running()
            # would take for a recycled PID and report as an exit.
            pid = read_pid(self.pid_file)
            if pid is None or not pid_alive(pid):
                raise StackError(f"Kafka exited during startup. {self._log_excerpt()}")
            if time.monotonic() >= deadline:
                raise StackError(
                    f"Kafka did not answer on {self.bootstrap_servers} within {timeout:.0f}s. "
                    f"{self._log_excerpt()}"
                )
            time.sleep(0.5)

    def stop(self, grace_seconds: float = STOP_GRACE_SECONDS) -> bool:
        """Stop the broker (SIGTERM, then SIGKILL after the grace period). Returns whether it
        was running."""
        pid = self.pid()
        if pid is not None:
            log(f"stopping Kafka (pid {pid})")
            terminate(pid, grace_seconds)
        self.pid_file.unlink(missing_ok=True)
        return pid is not None

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would; the PID file stays behind like after a crash."""
        pid = self.pid()
        if pid is not None:
            kill(pid)

    # -- helpers -----------------------------------------------------------------------------

    def _format_storage_once(self) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        # storage is not formatted yet, so no broker knows the id: a missing one, or one left by
        # a version that could write a leading "-", can still be replaced
        if not self.cluster_id_file.exists() or self.cluster_id_file.read_text().startswith("-"):
            self.cluster_id_file.write_text(new_cluster_id() + "\n")
        cluster_id = self.cluster_id_file.read_text().strip()
        log("formatting Kafka storage (first start)")
        result = subprocess.run(
            self._java_command(
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(self.server_properties),
                heap="256m",
            ),
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(
                f"formatting Kafka storage failed (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )

    def _java_command(self, main_class: str, *args: str, heap: str) -> list[str]:
        return [
            _java(),
            f"-Xmx{heap}",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            f"-Dkafka.logs.dir={self.log_dir}",
            "-cp",
            # The JVM expands "dir/*" to every jar in dir itself; no shell involved.
            f"{self.libs_dir}/*",
            main_class,
            *args,
        ]

    def _log_excerpt(self) -> str:
        # JVM-level failures (bad options, no memory) only reach the stdout log: show it first.
        return (
            f"Last lines of {self.stdout_log}:\n{tail(self.stdout_log, 10)}\n"
            f"Last lines of {self.server_log}:\n{tail(self.server_log)}"
        )


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise StackError("Java 17+ is needed to run Kafka; install it or set JAVA_HOME")
    return java
