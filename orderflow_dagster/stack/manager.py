"""The local stack behind `orderflow stack up|down|status`: one Kafka broker and one Postgres.

`up` starts whatever is not running yet (idempotent), creates the topics, and prints on stdout
only shell `export` lines, so that

    eval "$(orderflow stack up)"

points the current shell at the stack; progress goes to stderr. `down` stops what `up` started;
`status` reports each service and exits 0 only if both run and answer (3 otherwise).

Both services run detached from the terminal and keep their state under `$ORDERFLOW_HOME`
(default `<repo>/.orderflow`), so data survives `down`/`up`. Configuration, all optional:

    ORDERFLOW_HOME                   state directory
    ORDERFLOW_KAFKA_PORT             broker port (9092)
    ORDERFLOW_KAFKA_CONTROLLER_PORT  KRaft controller port (Kafka port + 1)
    ORDERFLOW_KAFKA_HEAP             broker heap (512m)
    ORDERFLOW_KAFKA_LIBS             cache of the broker jars ($ORDERFLOW_HOME/kafka/libs)
    ORDERFLOW_POSTGRES_PORT          Postgres port (15432)
    ORDERFLOW_TOPIC, ORDERFLOW_DLQ_TOPIC, ORDERFLOW_TOPIC_PARTITIONS (4)

Python callers (tests, the demo) use `StackConfig`, `start`, `stop` and the `KafkaBroker` /
`PostgresServer` objects directly.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orderflow_dagster import settings
from orderflow_dagster.stack._proc import StackError, log
from orderflow_dagster.stack.kafka import DEFAULT_HEAP, KafkaBroker, admin_client
from orderflow_dagster.stack.postgres import PostgresServer

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

DEFAULT_TOPIC_PARTITIONS = 4
DLQ_PARTITIONS = 1  # dead letters are rare and read in order by a human
EXIT_NOT_RUNNING = 3


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and which loopback ports it uses."""

    home: Path
    kafka_port: int = settings.DEFAULT_KAFKA_PORT
    kafka_controller_port: int = 0  # 0: kafka_port + 1
    postgres_port: int = settings.DEFAULT_POSTGRES_PORT
    kafka_heap: str = DEFAULT_HEAP
    kafka_libs: Path | None = None  # None: home/kafka/libs
    topic: str = settings.DEFAULT_TOPIC
    dlq_topic: str = settings.DEFAULT_DLQ_TOPIC
    status_topic: str = settings.DEFAULT_STATUS_TOPIC
    topic_partitions: int = DEFAULT_TOPIC_PARTITIONS

    def __post_init__(self) -> None:
        if not self.kafka_controller_port:
            object.__setattr__(self, "kafka_controller_port", self.kafka_port + 1)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StackConfig:
        env = os.environ if env is None else env
        kafka_port = settings.env_int("ORDERFLOW_KAFKA_PORT", settings.DEFAULT_KAFKA_PORT, env)
        libs = env.get("ORDERFLOW_KAFKA_LIBS")
        return cls(
            home=settings.orderflow_home(env),
            kafka_port=kafka_port,
            kafka_controller_port=settings.env_int(
                "ORDERFLOW_KAFKA_CONTROLLER_PORT", kafka_port + 1, env
            ),
            postgres_port=settings.env_int(
                "ORDERFLOW_POSTGRES_PORT", settings.DEFAULT_POSTGRES_PORT, env
            ),
            kafka_heap=env.get("ORDERFLOW_KAFKA_HEAP") or DEFAULT_HEAP,
            kafka_libs=Path(libs).expanduser().resolve() if libs else None,
            topic=settings.topic(env),
            dlq_topic=settings.dlq_topic(env),
            status_topic=settings.status_topic(env),
            topic_partitions=settings.env_int(
                "ORDERFLOW_TOPIC_PARTITIONS", DEFAULT_TOPIC_PARTITIONS, env
            ),
        )

    def kafka_broker(self) -> KafkaBroker:
        return KafkaBroker(
            home=self.home,
            port=self.kafka_port,
            controller_port=self.kafka_controller_port,
            libs_dir=self.kafka_libs or self.home / "kafka" / "libs",
            heap=self.kafka_heap,
        )

    def postgres_server(self) -> PostgresServer:
        return PostgresServer(home=self.home, port=self.postgres_port)


@dataclass(frozen=True)
class StackInfo:
    """How to reach a running stack. `dsn` holds the password: do not log it unredacted."""

    bootstrap_servers: str
    dsn: str

    def env(self) -> dict[str, str]:
        return {
            "ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "ORDERFLOW_POSTGRES_DSN": self.dsn,
        }

    def export_lines(self) -> list[str]:
        return [f"export {name}={shlex.quote(value)}" for name, value in self.env().items()]


# -- Python API ----------------------------------------------------------------------------------


def start(cfg: StackConfig | None = None) -> StackInfo:
    """Start whatever part of the stack is not running, create the topics, and say how to
    reach it. Raises StackError with the reason (and a log excerpt) on failure."""
    cfg = cfg or StackConfig.from_env()
    cfg.home.mkdir(parents=True, exist_ok=True)
    kafka, postgres = cfg.kafka_broker(), cfg.postgres_server()

    # The JVM boots for several seconds; bring Postgres up meanwhile.
    started = time.monotonic()
    kafka_was_running = kafka.is_running()
    kafka.launch()
    pg_started = time.monotonic()
    pg_was_running = postgres.is_running()
    postgres.start()
    _report_ready("Postgres", pg_was_running, pg_started, postgres.pid())
    kafka.wait_ready()
    _report_ready("Kafka", kafka_was_running, started, kafka.pid())

    ensure_topics(
        kafka.bootstrap_servers,
        {
            cfg.topic: cfg.topic_partitions,
            cfg.dlq_topic: DLQ_PARTITIONS,
            # keyed by order like the source, so it gets as many partitions
            cfg.status_topic: cfg.topic_partitions,
        },
    )
    return StackInfo(bootstrap_servers=kafka.bootstrap_servers, dsn=postgres.dsn())


def stop(cfg: StackConfig | None = None) -> None:
    """Stop both services if they run; a no-op otherwise."""
    cfg = cfg or StackConfig.from_env()
    stopped = [cfg.kafka_broker().stop(), cfg.postgres_server().stop()]
    if not any(stopped):
        log("nothing was running")


def kafka_running(cfg: StackConfig | None = None) -> bool:
    """Whether this home's broker process runs and answers."""
    kafka = (cfg or StackConfig.from_env()).kafka_broker()
    return kafka.is_running() and kafka.answers()


def postgres_running(cfg: StackConfig | None = None) -> bool:
    """Whether this home's Postgres process runs and accepts logins."""
    postgres = (cfg or StackConfig.from_env()).postgres_server()
    return postgres.is_running() and postgres.answers()


def ensure_topics(bootstrap_servers: str, partitions_by_topic: Mapping[str, int]) -> None:
    """Create the topics that do not exist yet (replication factor 1: a single broker)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    admin = admin_client(bootstrap_servers)
    requests = [
        NewTopic(name, num_partitions=count, replication_factor=1)
        for name, count in partitions_by_topic.items()
    ]
    for name, future in admin.create_topics(requests, request_timeout=30).items():
        try:
            future.result()
            log(f"created topic {name} ({partitions_by_topic[name]} partitions)")
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise StackError(f"could not create topic {name}: {exc.args[0].str()}") from exc
    _wait_until_served(admin, list(partitions_by_topic))
    _warn_on_partition_mismatch(admin, partitions_by_topic)


def _wait_until_served(admin: AdminClient, topics: list[str], timeout: float = 30.0) -> None:
    # A fresh broker acknowledges CreateTopics before its metadata serves the topic: a client
    # asking at once (`orderflow produce` right after `stack up`) is told it does not exist.
    deadline = time.monotonic() + timeout
    while True:
        metadata = admin.list_topics(timeout=10)
        pending = [
            name
            for name in topics
            if (topic := metadata.topics.get(name)) is None
            or topic.error is not None
            or not topic.partitions
            or any(p.leader < 0 for p in topic.partitions.values())
        ]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"topic(s) {', '.join(pending)} created but not served after {timeout:.0f} s"
            )
        time.sleep(0.2)


def _warn_on_partition_mismatch(admin: AdminClient, partitions_by_topic: Mapping[str, int]) -> None:
    # An existing topic keeps its partition count; say so rather than silently differ from
    # ORDERFLOW_TOPIC_PARTITIONS.
    metadata = admin.list_topics(timeout=10)
    for name, wanted in partitions_by_topic.items():
        topic = metadata.topics.get(name)
        if topic is not None and len(topic.partitions) != wanted:
            log(f"note: topic {name} exists with {len(topic.partitions)} partitions, not {wanted}")


def _report_ready(name: str, was_running: bool, since: float, pid: int | None) -> None:
    if was_running:
        log(f"{name} already running (pid {pid})")
    else:
        log(f"{name} ready in {time.monotonic() - since:.1f}s (pid {pid})")


# -- CLI -----------------------------------------------------------------------------------------


def up() -> int:
    """`orderflow stack up`: start the stack, print `export` lines for `eval`."""
    try:
        info = start(StackConfig.from_env())
    except Exception as exc:  # any failure becomes a readable message and exit 1, not a traceback
        log(f"error: {settings.redact_dsn(str(exc))}")
        log("`orderflow stack down` stops whatever part did start")
        return 1
    for line in info.export_lines():
        print(line)
    log(f"Kafka at {info.bootstrap_servers}, Postgres at {settings.redact_dsn(info.dsn)}")
    return 0


def down() -> int:
    """`orderflow stack down`: stop the stack; success also when nothing ran."""
    try:
        stop(StackConfig.from_env())
    except Exception as exc:
        log(f"error: {settings.redact_dsn(str(exc))}")
        return 1
    return 0


def status() -> int:
    """`orderflow stack status`: one line per service; exit 0 if both run and answer, else 3."""
    cfg = StackConfig.from_env()
    kafka, postgres = cfg.kafka_broker(), cfg.postgres_server()
    rows = [
        ("kafka", kafka.bootstrap_servers, kafka.pid(), kafka.answers),
        ("postgres", f"127.0.0.1:{cfg.postgres_port}", postgres.pid(), postgres.answers),
    ]
    healthy = True
    for name, address, pid, answers in rows:
        if pid is None:
            state, healthy = "stopped", False
        elif answers():
            state = "running"
        else:
            state, healthy = "running (not answering)", False
        pid_text = f"pid {pid}" if pid is not None else ""
        print(f"{name:<9} {state:<24} {address:<16} {pid_text}".rstrip())
    print(f"home      {cfg.home}")
    return 0 if healthy else EXIT_NOT_RUNNING


ACTIONS = {"up": up, "down": down, "status": status}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `orderflow stack up|down|status` to the `orderflow` command line."""
    parser = subparsers.add_parser(
        "stack", help="start, stop or inspect the local Kafka + Postgres stack"
    )
    parser.add_argument("action", choices=list(ACTIONS))
    parser.set_defaults(func=lambda args: ACTIONS[args.action]())
