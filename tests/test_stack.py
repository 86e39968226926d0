"""`orderflow stack up|down|status` end to end, through the installed console script.

The stack under test lives in its own home under `.orderflow-test/` on its own ports, so it never
touches the demo stack or the shared test stack of conftest.py. The Kafka jars come from the
cache the demo stack uses (`.orderflow/kafka/libs`), so Maven resolves them once per machine.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from orderflow_dagster.ingest.produce_cli import partition_count
from orderflow_dagster.stack import manager
from orderflow_dagster.stack._proc import pid_alive
from orderflow_dagster.stack.kafka import admin_client, new_cluster_id, render_server_properties
from orderflow_dagster.stack.postgres import MAX_SOCKET_PATH, PostgresServer

REPO = Path(__file__).resolve().parents[1]
ORDERFLOW = Path(sys.executable).parent / "orderflow"  # the venv's console script
KAFKA_LIBS = REPO / ".orderflow" / "kafka" / "libs"
# Clear of the demo stack (9092/15432) and of conftest's test stack (29092/25432).
PREFERRED_KAFKA_PORT = 29192
PREFERRED_POSTGRES_PORT = 25532
STARTUP_TIMEOUT = 600  # the first run on a machine also fetches the Kafka jars


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(preferred: int, *, with_next: bool = False) -> int:
    """`preferred` if it (and port+1, for Kafka's controller) is free, else a free one."""
    for _ in range(50):
        if _is_free(preferred) and (not with_next or _is_free(preferred + 1)):
            return preferred
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            preferred = sock.getsockname()[1]
    raise RuntimeError("no free port found")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def stack_env() -> Iterator[dict[str, str]]:
    (REPO / ".orderflow-test").mkdir(exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="stack-cli-", dir=REPO / ".orderflow-test"))
    kafka_port = _free_port(PREFERRED_KAFKA_PORT, with_next=True)
    env = {
        name: value
        for name, value in os.environ.items()
        # a stack exported into the calling shell must not leak into this one
        if not name.startswith("ORDERFLOW_")
    }
    env |= {
        "ORDERFLOW_HOME": str(home),
        "ORDERFLOW_KAFKA_PORT": str(kafka_port),
        "ORDERFLOW_KAFKA_CONTROLLER_PORT": str(kafka_port + 1),
        "ORDERFLOW_POSTGRES_PORT": str(_free_port(PREFERRED_POSTGRES_PORT)),
        "ORDERFLOW_KAFKA_LIBS": str(KAFKA_LIBS),
    }
    try:
        yield env
    finally:
        orderflow(env, "down")  # whatever the test got to, leave nothing running
        shutil.rmtree(home, ignore_errors=True)


def orderflow(env: dict[str, str], action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ORDERFLOW), "stack", action],
        env=env,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
        check=False,
    )


def evaluate_exports(stdout: str) -> dict[str, str]:
    """What a shell sees after `eval "$(orderflow stack up)"`."""
    script = (
        'eval "$EXPORTS"; '
        'printf "%s\\n%s\\n" "$ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS" "$ORDERFLOW_POSTGRES_DSN"'
    )
    result = subprocess.run(
        ["bash", "-c", script],
        env={"EXPORTS": stdout, "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    )
    bootstrap, dsn = result.stdout.splitlines()
    return {"ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "ORDERFLOW_POSTGRES_DSN": dsn}


def round_trip(bootstrap: str, topic: str) -> bytes:
    """Produce one message to partition 0 of `topic` and read it back."""
    value = uuid.uuid4().hex.encode()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    producer.produce(topic, value=value, key=b"k", partition=0)
    assert producer.flush(30) == 0, "message not delivered"
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}"})
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        for _ in range(60):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None and msg.value() == value:
                return msg.value()
    finally:
        consumer.close()
    raise AssertionError(f"produced message not consumed from {topic}")


def test_up_status_down_through_the_cli(stack_env: dict[str, str]) -> None:
    cfg = manager.StackConfig.from_env(stack_env)
    kafka, postgres = cfg.kafka_broker(), cfg.postgres_server()
    # an unformatted home holding a cluster id the storage tool would read as an option
    kafka.cluster_id_file.parent.mkdir(parents=True, exist_ok=True)
    kafka.cluster_id_file.write_text("-" + "A" * 21 + "\n")

    up = orderflow(stack_env, "up")
    assert up.returncode == 0, up.stderr
    lines = up.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("export ORDERFLOW_") for line in lines), lines
    exported = evaluate_exports(up.stdout)
    bootstrap = exported["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"]
    dsn = exported["ORDERFLOW_POSTGRES_DSN"]
    assert bootstrap == f"127.0.0.1:{cfg.kafka_port}"
    assert dsn.startswith("postgresql://orderflow:")
    assert dsn.endswith(f"@127.0.0.1:{cfg.postgres_port}/orderflow")
    assert postgres.password() not in up.stderr, "password leaked to stderr"

    # Topics are served once created: `orderflow produce` right after finds them (a fresh
    # broker acknowledges CreateTopics before its metadata has them).
    assert partition_count(bootstrap, cfg.topic) == 4
    manager.ensure_topics(bootstrap, {"orders.events.fresh": 3})
    assert partition_count(bootstrap, "orders.events.fresh") == 3

    # Both services answer, with the topics created as configured.
    assert round_trip(bootstrap, cfg.topic)
    topics = admin_client(bootstrap).list_topics(timeout=10).topics
    assert len(topics[cfg.topic].partitions) == 4
    assert len(topics[cfg.dlq_topic].partitions) == 1
    assert len(topics[cfg.status_topic].partitions) == 4
    with psycopg.connect(dsn) as conn:
        row = conn.execute("select 1, current_database(), current_user").fetchone()
        # the database `orderflow serve` keeps Dagster's storage in, beside the pipeline's
        databases = conn.execute(
            "select datname, pg_get_userbyid(datdba) from pg_database"
            " where datname in ('orderflow', 'dagster') order by 1"
        ).fetchall()
    assert row == (1, "orderflow", "orderflow")
    assert databases == [("dagster", "orderflow"), ("orderflow", "orderflow")]

    # `up` again leaves the running services alone and prints the same exports.
    pids = (kafka.pid(), postgres.pid())
    assert None not in pids
    again = orderflow(stack_env, "up")
    assert again.returncode == 0, again.stderr
    assert again.stdout == up.stdout
    assert (kafka.pid(), postgres.pid()) == pids

    status = orderflow(stack_env, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count(" running ") == 2, status.stdout
    assert postgres.password() not in status.stdout + status.stderr

    down = orderflow(stack_env, "down")
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(pid) for pid in pids if pid is not None)
    assert not _port_open(cfg.kafka_port)
    assert not _port_open(cfg.postgres_port)
    assert not kafka.pid_file.exists()
    assert not postgres.pid_file.exists()

    stopped = orderflow(stack_env, "status")
    assert stopped.returncode == manager.EXIT_NOT_RUNNING, stopped.stdout
    assert stopped.stdout.count(" stopped ") == 2, stopped.stdout
    assert orderflow(stack_env, "down").returncode == 0  # nothing to stop is fine too


# -- pieces that need no running service --------------------------------------------------------


def test_config_from_env_defaults_and_overrides(tmp_path: Path) -> None:
    default = manager.StackConfig.from_env({"ORDERFLOW_HOME": str(tmp_path)})
    assert (default.kafka_port, default.kafka_controller_port) == (9092, 9093)
    assert default.postgres_port == 15432
    assert default.kafka_broker().libs_dir == tmp_path / "kafka" / "libs"

    custom = manager.StackConfig.from_env(
        {
            "ORDERFLOW_HOME": str(tmp_path),
            "ORDERFLOW_KAFKA_PORT": "19092",
            "ORDERFLOW_POSTGRES_PORT": "16432",
            "ORDERFLOW_KAFKA_LIBS": str(tmp_path / "cache"),
            "ORDERFLOW_TOPIC_PARTITIONS": "8",
        }
    )
    assert (custom.kafka_port, custom.kafka_controller_port) == (19092, 19093)
    assert custom.postgres_port == 16432
    assert custom.kafka_broker().libs_dir == tmp_path / "cache"
    assert custom.topic_partitions == 8


def test_exports_survive_shell_quoting() -> None:
    info = manager.StackInfo("127.0.0.1:1", "postgresql://orderflow:a'b $c@127.0.0.1:2/orderflow")
    evaluated = evaluate_exports("\n".join(info.export_lines()))
    assert evaluated == info.env()
    assert all(shlex.split(line)[0] == "export" for line in info.export_lines())


def test_socket_dir_falls_back_to_a_short_path_for_deep_homes(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    socket_dir = PostgresServer(home=deep, port=15432, bin_dir=tmp_path).socket_dir
    assert len(f"{socket_dir}/.s.PGSQL.15432") <= MAX_SOCKET_PATH
    assert PostgresServer(home=tmp_path, port=1, bin_dir=tmp_path).socket_dir.is_relative_to(
        tmp_path
    )


def test_server_properties_and_cluster_id(tmp_path: Path) -> None:
    props = render_server_properties(19092, 19093, tmp_path / "data")
    assert "listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093" in props
    assert f"log.dirs={tmp_path / 'data'}" in props
    assert "auto.create.topics.enable=false" in props
    ids = [new_cluster_id() for _ in range(2000)]
    assert all(len(i) == 22 and "=" not in i and not i.startswith("-") for i in ids)
