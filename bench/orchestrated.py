"""The orchestrated path measured: the real Dagster daemon and webserver, Kafka to Postgres.

Phases (each on a fresh topic, a fresh warehouse database and a fresh Dagster instance whose
storage is a Postgres database of its own):

- burst: N events (default 1,000,000) are produced first; then `orderflow catch-up --no-dbt`
  lands them in-process (the baseline, timed from its process start, imports included), and,
  into a second warehouse database, the daemon does (`dagster-daemon run` + `dagster-webserver`,
  the planning sensor launching one run per range), timed from the moment the landing sensor is
  switched on with every process up and idle, as when a burst reaches a running deployment.
  The ratio is baseline / daemon (target >= 0.5). Where each run's time went (queue, run worker
  start, step) is read from Dagster's event log.
- steady: events produced at a fixed rate (default 1,000 and 5,000 per second, 10 minutes each)
  while the daemon lands them and the dbt sensor builds the marts. Printed: the lag over time,
  p50/p95 freshness from produce to `raw` (the landing transaction's commit, per event) and to
  `order_status` (a sample of events, polled), runs and partitions created per hour.

    .venv/bin/python bench/orchestrated.py                        # both phases
    .venv/bin/python bench/orchestrated.py --phases burst --events 200000
    .venv/bin/python bench/orchestrated.py --phases steady --rates 1000 --steady-seconds 120

The history phase (a simulated year of ranges and partitions) is bench/history.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import landing as landing_bench  # bench/landing.py, beside this script
import psycopg
import yaml
from _common import log
from dagster import DagsterInstance
from psycopg import sql

from orderflow_dagster.ingest.generator import generate
from orderflow_dagster.ingest.producer import EventProducer
from orderflow_dagster.pools import apply_pool_limits
from orderflow_dagster.stack import manager

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BENCH_HOME = REPO / ".orderflow-bench-orchestrated"
KAFKA_PORT = 39492
POSTGRES_PORT = 35832
PARTITIONS = 4
DEFINITIONS_MODULE = "orderflow_dagster.definitions"
LANDING_SENSOR = "kafka_offset_ranges_sensor"
DBT_SENSOR = "dbt_after_landing_sensor"
SENSORS = (LANDING_SENSOR, DBT_SENSOR)


# -- services ---------------------------------------------------------------------------------


def start_services(args: argparse.Namespace) -> landing_bench.Services:
    return landing_bench.start_services(
        args, home=BENCH_HOME, kafka_port=KAFKA_PORT, postgres_port=POSTGRES_PORT
    )


def psycopg2_url(dsn: str) -> str:
    """The URL dagster-postgres needs: psycopg2 (its event watcher fails on psycopg 3)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    from urllib.parse import quote

    return (
        f"postgresql+psycopg2://{quote(str(info['user']))}:{quote(str(info.get('password', '')))}"
        f"@{info.get('host', '127.0.0.1')}:{info.get('port', 5432)}/{info['dbname']}"
    )


def dagster_home(path: Path, storage_dsn: str, source: Path) -> Path:
    """The instance config (deploy/dagster.yaml unless --dagster-yaml), with Postgres storage in
    its own database and telemetry off."""
    config = yaml.safe_load(source.read_text()) or {}
    config["storage"] = {"postgres": {"postgres_url": psycopg2_url(storage_dsn)}}
    config["telemetry"] = {"enabled": False}
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Daemon:
    """dagster-daemon and dagster-webserver on the orderflow code location, each in a process
    group of its own, stopped as a whole."""

    env: dict[str, str]
    log_dir: Path
    ui_port: int
    storage_dsn: str  # the instance's storage database, to read runs and events from
    procs: list[subprocess.Popen] = field(default_factory=list)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("wb") as out:
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=REPO,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def start_webserver(self) -> None:
        self._spawn(
            "dagster-webserver",
            [
                str(BIN / "dagster-webserver"),
                *("-m", DEFINITIONS_MODULE, "-h", "127.0.0.1", "-p", str(self.ui_port)),
            ],
        )
        self.wait(self.ui_ready, "the webserver", 180)

    def start_daemon(self) -> None:
        self._spawn(
            "dagster-daemon", [str(BIN / "dagster-daemon"), "run", "-m", DEFINITIONS_MODULE]
        )
        self.wait(self.daemons_healthy, "the daemon's heartbeats", 180)

    def wait(self, probe, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not probe():
            self.check()
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}; see {self.log_dir}")
            time.sleep(0.5)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ui_port}/graphql",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["data"]

    def daemons_healthy(self) -> bool:
        data = self.graphql(
            "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"
        )
        statuses = data["instance"]["daemonHealth"]["allDaemonStatuses"]
        return all(d["healthy"] for d in statuses if d["required"])

    def _selector(self, sensor: str) -> dict:
        return {
            "repositoryLocationName": DEFINITIONS_MODULE,
            "repositoryName": "__repository__",
            "sensorName": sensor,
        }

    def set_sensor(self, sensor: str, *, running: bool) -> None:
        if running:
            query = (
                "mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) {"
                " __typename ... on PythonError { message } } }"
            )
            result = self.graphql(query, {"s": self._selector(sensor)})["startSensor"]
        else:
            state = self.graphql(
                "query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {"
                " ... on Sensor { sensorState { id selectorId } } } }",
                {"s": self._selector(sensor)},
            )["sensorOrError"]["sensorState"]
            result = self.graphql(
                "mutation($o: String!, $i: String!) { stopSensor(jobOriginId: $o,"
                " jobSelectorId: $i) { __typename ... on PythonError { message } } }",
                {"o": state["id"], "i": state["selectorId"]},
            )["stopSensor"]
        if result["__typename"] == "PythonError":
            raise SystemExit(f"could not {'start' if running else 'stop'} {sensor}: {result}")

    def check(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args[0]} exited ({proc.returncode}); see {self.log_dir}")

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def ui_ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ui_port}/server_info", timeout=2
            ) as r:
                return r.status == 200
        except OSError:
            return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def orchestrated(
    services: landing_bench.Services, args: argparse.Namespace, *, topic: str, dsn: str
) -> Iterator[Daemon]:
    """The Dagster processes on a fresh instance (its storage a database of its own, dropped
    afterwards), every sensor off and the daemon healthy."""
    name = f"dagster_{uuid.uuid4().hex[:8]}"
    storage = services.database(name)
    tmp = Path(tempfile.mkdtemp(prefix="orchestrated-"))
    home = dagster_home(tmp / "dagster_home", storage, args.dagster_yaml)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORDERFLOW_", "DAGSTER_"))} | {
        "DAGSTER_HOME": str(home),
        "ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS": services.bootstrap,
        "ORDERFLOW_POSTGRES_DSN": dsn,
        "ORDERFLOW_TOPIC": topic,
        "ORDERFLOW_CONSUMER_GROUP": f"bench-daemon-{topic}",
        "PYTHONUNBUFFERED": "1",
        **args.daemon_env,
    }
    daemon = Daemon(env, tmp / "logs", free_port(), storage)
    try:
        # the webserver first, to stop the sensors before the daemon could tick them: the
        # measurement starts when the landing sensor is switched on, everything already running
        daemon.start_webserver()
        # the pools' limits live in the instance's storage; `orderflow serve` sets them the same way
        instance = DagsterInstance.from_config(str(home))
        apply_pool_limits(instance, env)
        instance.dispose()
        for sensor in SENSORS:
            daemon.set_sensor(sensor, running=False)
        daemon.start_daemon()
        yield daemon
    finally:
        daemon.stop()
        with contextlib.suppress(psycopg.Error):
            services.drop(name)
        shutil.rmtree(tmp, ignore_errors=True)


def cli_env(services: landing_bench.Services, topic: str, dsn: str, group: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("ORDERFLOW_", "DAGSTER_"))} | {
        "ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS": services.bootstrap,
        "ORDERFLOW_POSTGRES_DSN": dsn,
        "ORDERFLOW_TOPIC": topic,
        "ORDERFLOW_CONSUMER_GROUP": group,
    }


# -- what landed ------------------------------------------------------------------------------


def ledger_covered(conn: psycopg.Connection, topic: str) -> int:
    row = conn.execute(
        "select coalesce(sum(end_offset - start_offset), 0) from raw.ingest_ledger"
        " where topic = %s",
        (topic,),
    ).fetchone()
    return int(row[0])


def wait_landed(
    conn: psycopg.Connection,
    topic: str,
    target: int,
    *,
    daemon: Daemon | None = None,
    timeout_s: float = 3600,
) -> float:
    """Seconds (monotonic) at which the ledger covered `target` offsets of `topic`."""
    deadline = time.monotonic() + timeout_s
    last_log = 0.0
    while True:
        if daemon is not None:
            daemon.check()
        try:
            covered = ledger_covered(conn, topic)
        except psycopg.errors.UndefinedTable:
            covered = 0
        now = time.monotonic()
        if covered >= target:
            return now
        if now - last_log > 15:
            log(f"  {covered:,} of {target:,} offsets landed")
            last_log = now
        if now > deadline:
            raise SystemExit(f"timed out: {covered:,} of {target:,} offsets landed")
        time.sleep(0.2)


RUN_PHASES = (
    ("queued", "PIPELINE_ENQUEUED", "PIPELINE_STARTING"),
    ("worker start", "PIPELINE_STARTING", "PIPELINE_START"),
    ("to step start", "PIPELINE_START", "STEP_START"),
    ("step", "STEP_START", "STEP_SUCCESS"),
    ("to run end", "STEP_SUCCESS", "PIPELINE_SUCCESS"),
)


def run_phases(storage_dsn: str) -> dict[str, tuple[float, float]]:
    """Per phase of a run, the median and the max over the runs, in seconds."""
    with psycopg.connect(storage_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "select run_id, dagster_event_type, min(extract(epoch from timestamp))"
            " from event_logs where dagster_event_type is not null group by 1, 2"
        ).fetchall()
    runs: dict[str, dict[str, float]] = {}
    for run_id, kind, at in rows:
        runs.setdefault(run_id, {})[kind] = float(at)
    out = {}
    for name, first, last in RUN_PHASES:
        spans = [r[last] - r[first] for r in runs.values() if first in r and last in r]
        if spans:
            out[name] = (statistics.median(spans), max(spans))
    return out


def dagster_counts(storage_dsn: str) -> dict[str, int]:
    """Runs by status and dynamic partitions, read from the Dagster storage database."""
    with psycopg.connect(storage_dsn, autocommit=True) as conn:
        runs = dict(conn.execute("select status, count(*) from runs group by status").fetchall())
        partitions = conn.execute("select count(*) from dynamic_partitions").fetchone()[0]
    return {**{str(k): int(v) for k, v in runs.items()}, "partitions": int(partitions)}


# -- burst ------------------------------------------------------------------------------------


def burst(services: landing_bench.Services, args: argparse.Namespace) -> dict:
    topic = f"bench.burst-{uuid.uuid4().hex[:8]}"
    manager.ensure_topics(services.bootstrap, {topic: PARTITIONS})
    log(f"burst: producing {args.events:,} events to {topic} ({PARTITIONS} partitions)")
    produced = landing_bench.produce(services.bootstrap, topic, args.events, PARTITIONS)
    out: dict = {"events": args.events, "produce_s": produced["seconds"]}
    try:
        # baseline: orderflow catch-up --no-dbt, in-process, in a process of its own
        dsn = services.database(f"bench_catchup_{uuid.uuid4().hex[:8]}")
        with tempfile.TemporaryDirectory() as home:
            env = cli_env(services, topic, dsn, f"bench-catchup-{topic}") | {"DAGSTER_HOME": home}
            services.checkpoint()
            started = time.monotonic()
            subprocess.run(
                [str(BIN / "orderflow"), "catch-up", "--no-dbt"],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            out["catch_up_s"] = time.monotonic() - started
        with psycopg.connect(dsn, autocommit=True) as conn:
            if ledger_covered(conn, topic) != args.events:
                raise SystemExit("catch-up did not land the whole burst")
        log(f"  catch-up --no-dbt: {out['catch_up_s']:.1f} s")

        # the daemon, every process up and idle, until the landing sensor is switched on; the
        # dbt sensor stays off, so the figure is landing through Dagster alone
        dsn = services.database(f"bench_daemon_{uuid.uuid4().hex[:8]}")
        with orchestrated(services, args, topic=topic, dsn=dsn) as daemon:
            services.checkpoint()
            started = time.monotonic()
            daemon.set_sensor(LANDING_SENSOR, running=True)
            with psycopg.connect(dsn, autocommit=True) as conn:
                done = wait_landed(conn, topic, args.events, daemon=daemon)
                out["daemon_s"] = done - started
                first = conn.execute(
                    "select extract(epoch from max(landed_at) - min(landed_at)),"
                    " count(*), max(end_offset - start_offset)"
                    " from raw.ingest_ledger where topic = %s",
                    (topic,),
                ).fetchone()
            out["daemon_first_to_last_landing_s"] = float(first[0])
            out["ranges"] = int(first[1])
            out["largest_range"] = int(first[2])
            out["dagster"] = dagster_counts(daemon.storage_dsn)
            out["run_phases"] = run_phases(daemon.storage_dsn)
        out["ratio"] = out["catch_up_s"] / out["daemon_s"]
        log(f"  daemon: {out['daemon_s']:.1f} s ({out['ranges']} ranges); ratio {out['ratio']:.2f}")
    finally:
        landing_bench.delete_topic(services.bootstrap, topic)
    return out


# -- steady -----------------------------------------------------------------------------------


@dataclass
class Sample:
    order_id: str
    event_ms: int  # the envelope's event time: order_status.last_event_at reaches it
    produced_at: float  # wall clock, seconds


class SteadyProducer(threading.Thread):
    """Produces at `rate` events/s for `seconds`, keeping 1 event in `sample_every` to follow."""

    def __init__(self, bootstrap: str, topic: str, rate: int, seconds: float, sample_every: int):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.rate = bootstrap, topic, rate
        self.seconds, self.sample_every = seconds, sample_every
        self.samples: list[Sample] = []
        self.produced = 0
        self.error: BaseException | None = None
        self.ended_at: float | None = None  # monotonic

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def _run(self) -> None:
        stream = generate(
            int(self.rate * self.seconds / 3) + 100,  # ~5 messages per order: more than enough
            seed=7,
            num_partitions=PARTITIONS,
            start_ms=int(time.time() * 1000),
            # in order per order, so order_status.last_event_at reaching a sample means it is in
            out_of_order_rate=0.0,
        )
        started = time.monotonic()
        with EventProducer(self.bootstrap, topic=self.topic) as producer:
            for msg in stream:
                elapsed = time.monotonic() - started
                if elapsed >= self.seconds:
                    break
                due = self.produced / self.rate
                if due > elapsed:
                    time.sleep(due - elapsed)
                producer.produce_raw(msg.value, msg.key, msg.partition)
                self.produced += 1
                if msg.event is not None and self.produced % self.sample_every == 0:
                    self.samples.append(
                        Sample(msg.event["aggregate_id"], msg.event["timestamp"], time.time())
                    )
                if self.produced % 1000 == 0:
                    producer.poll(0)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def steady(services: landing_bench.Services, args: argparse.Namespace, rate: int) -> dict:
    topic = f"bench.steady-{rate}-{uuid.uuid4().hex[:8]}"
    manager.ensure_topics(services.bootstrap, {topic: PARTITIONS})
    dsn = services.database(f"bench_steady_{uuid.uuid4().hex[:8]}")
    out: dict = {"rate": rate, "seconds": args.steady_seconds}
    try:
        with orchestrated(services, args, topic=topic, dsn=dsn) as daemon:
            for sensor in SENSORS:
                daemon.set_sensor(sensor, running=True)
            log(f"steady: {rate} events/s for {args.steady_seconds} s into {topic}")
            producer = SteadyProducer(
                services.bootstrap, topic, rate, args.steady_seconds, args.sample_every
            )
            producer.start()
            seen: dict[int, float] = {}  # sample index -> wall time it showed in order_status
            lags: list[int] = []
            with psycopg.connect(dsn, autocommit=True) as conn:
                schema = "analytics"
                last_log = 0.0
                while producer.is_alive() or len(seen) < len(producer.samples):
                    daemon.check()
                    if producer.error:
                        raise producer.error
                    pending = [
                        (i, s) for i, s in enumerate(list(producer.samples)) if i not in seen
                    ]
                    if pending:
                        with contextlib.suppress(psycopg.errors.UndefinedTable):
                            rows = dict(
                                conn.execute(
                                    sql.SQL(
                                        "select order_id::text,"
                                        " (extract(epoch from last_event_at) * 1000)::bigint"
                                        " from {}.order_status where order_id::text = any(%s)"
                                    ).format(sql.Identifier(schema)),
                                    ([s.order_id for _, s in pending],),
                                ).fetchall()
                            )
                            now = time.time()
                            for i, s in pending:
                                if rows.get(s.order_id, -1) >= s.event_ms:
                                    seen[i] = now
                    with contextlib.suppress(psycopg.errors.UndefinedTable):
                        lags.append(producer.produced - ledger_covered(conn, topic))
                    if time.monotonic() - last_log > 30:
                        log(
                            f"  produced {producer.produced:,}, lag {lags[-1] if lags else '?'}, "
                            f"{len(seen)}/{len(producer.samples)} samples in order_status"
                        )
                        last_log = time.monotonic()
                    if producer.ended_at and time.monotonic() > producer.ended_at + 300:
                        break  # a sample that never shows is counted missing, not waited for
                    time.sleep(0.5)
                raw_latency = conn.execute(
                    "select extract(epoch from l.landed_at) - e.kafka_ts_ms / 1000.0"
                    " from raw.order_events e join raw.ingest_ledger l"
                    " on l.topic = e.topic and l.kafka_partition = e.kafka_partition"
                    " and e.kafka_offset >= l.start_offset and e.kafka_offset < l.end_offset"
                    " where e.topic = %s",
                    (topic,),
                ).fetchall()
            to_raw = [float(r[0]) for r in raw_latency]
            to_status = [
                seen[i] - s.produced_at for i, s in enumerate(producer.samples) if i in seen
            ]
            counts = dagster_counts(daemon.storage_dsn)
        hours = args.steady_seconds / 3600
        out |= {
            "produced": producer.produced,
            "raw_p50_s": percentile(to_raw, 0.5),
            "raw_p95_s": percentile(to_raw, 0.95),
            "status_p50_s": percentile(to_status, 0.5),
            "status_p95_s": percentile(to_status, 0.95),
            "status_samples": f"{len(to_status)}/{len(producer.samples)}",
            "max_lag": max(lags) if lags else None,
            "final_lag": lags[-1] if lags else None,
            "runs_per_hour": sum(v for k, v in counts.items() if k != "partitions") / hours,
            "partitions_per_hour": counts["partitions"] / hours,
            "runs": counts,
        }
    finally:
        landing_bench.delete_topic(services.bootstrap, topic)
    return out


# -- report -----------------------------------------------------------------------------------


def print_report(facts: dict[str, str], results: dict) -> None:
    print("\n== machine")
    for k, v in facts.items():
        print(f"  {k:<24} {v}")
    if "burst" in results:
        b = results["burst"]
        print(f"\n== burst of {b['events']:,} events")
        for label, seconds in (
            ("catch-up --no-dbt", b["catch_up_s"]),
            ("through the daemon", b["daemon_s"]),
        ):
            print(f"  {label:<24} {seconds:8.1f} s  {b['events'] / seconds:>9,.0f} ev/s")
        print(f"  first to last landing    {b['daemon_first_to_last_landing_s']:8.1f} s")
        print(f"  ranges, largest          {b['ranges']} ranges, {b['largest_range']:,} offsets")
        print(f"  dagster                  {b['dagster']}")
        for phase, (median, longest) in b["run_phases"].items():
            print(f"  run: {phase:<19} {median:6.1f} s median, {longest:6.1f} s max")
        print(f"  ratio (target >= 0.5)    {b['ratio']:8.2f}")
    for s in results.get("steady", []):
        print(f"\n== steady {s['rate']:,} events/s for {s['seconds']} s")
        print(f"  produced                 {s['produced']:,}")
        print(f"  to raw      p50 / p95    {s['raw_p50_s']:6.1f} s / {s['raw_p95_s']:6.1f} s")
        print(
            f"  to order_status p50/p95  {s['status_p50_s']:6.1f} s / {s['status_p95_s']:6.1f} s"
            f"  ({s['status_samples']} samples)"
        )
        print(f"  lag max / at the end     {s['max_lag']:,} / {s['final_lag']:,}")
        print(
            f"  per hour                 {s['runs_per_hour']:,.0f} runs, "
            f"{s['partitions_per_hour']:,.0f} partitions"
        )
        print(f"  dagster                  {s['runs']}")
    print("\n" + json.dumps(results, default=str))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default="burst,steady")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rates", default="1000,5000")
    parser.add_argument("--steady-seconds", type=int, default=600)
    parser.add_argument("--sample-every", type=int, default=200)
    parser.add_argument(
        "--dagster-yaml",
        type=Path,
        default=REPO / "deploy" / "dagster.yaml",
        help="instance config to run with (storage is replaced by a Postgres database)",
    )
    parser.add_argument("--use-env", action="store_true")
    parser.add_argument("--keep-stack", action="store_true")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the Dagster processes (e.g. ORDERFLOW_MAX_EVENTS_PER_BATCH)",
    )
    args = parser.parse_args(argv)
    args.daemon_env = dict(item.split("=", 1) for item in args.env)
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so the Dagster processes and databases are cleaned up
    signal.signal(signal.SIGTERM, _interrupt)
    args = parse_args(argv)
    services = start_services(args)
    results: dict = {}
    try:
        facts = landing_bench.machine_facts(services.dsn)
        phases = args.phases.split(",")
        if "burst" in phases:
            results["burst"] = burst(services, args)
        if "steady" in phases:
            results["steady"] = [steady(services, args, int(r)) for r in args.rates.split(",")]
        print_report(facts, results)
    finally:
        for name in list(services.databases):
            with contextlib.suppress(psycopg.Error):
                services.drop(name)
        if services.cfg is not None and not args.keep_stack:
            manager.stop(services.cfg)
            shutil.rmtree(BENCH_HOME / "kafka" / "data", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
