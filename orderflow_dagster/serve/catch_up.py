"""`orderflow catch-up`: plan, land (and model) in-process until the lag is zero.

The same planning and landing code as the sensor path, driven by a loop instead of the daemon,
for CI, scripts and operators. Every step is idempotent, so it is safe to kill at any moment and
run again. Uses the Dagster instance in $DAGSTER_HOME when set (so the runs show in the UI), an
ephemeral one otherwise.

It exits non-zero, saying what to do, while the topic's log cannot continue the ledger (it ends
below it) or while offsets a re-created topic took with it are not acknowledged.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

from dagster import DagsterInstance, materialize
from psycopg import sql

from orderflow_dagster import settings


@dataclass
class CatchUpReport:
    stream: str | None = None  # the topic's current stream, when not the topic itself
    lost: list = field(default_factory=list)  # offsets of retired streams never landed
    ranges_landed: int = 0
    failed: int = 0
    lag: int = 0
    produced: int = 0
    landed_rows: int = 0
    dead_letters: int = 0
    seconds: float = 0.0
    modelled: bool = False
    published: int | None = None  # messages published to the status topic
    orders: int | None = None

    def lines(self, topic: str) -> list[str]:
        return [
            f"topic:        {topic}"
            + (f" (landed as stream {self.stream})" if self.stream not in (None, topic) else ""),
            f"produced:     {self.produced} offsets in the log",
            f"landed:       {self.landed_rows} rows in raw.order_events",
            f"dead letters: {self.dead_letters} in raw.dead_letters",
            f"lag:          {self.lag}",
            f"ranges:       {self.ranges_landed} landed this run, {self.failed} failed",
            f"dbt models:   {'built' if self.modelled else 'not run'}",
            f"orders:       {'-' if self.orders is None else self.orders} in order_status",
            f"published:    {'-' if self.published is None else self.published} status changes",
            f"took:         {self.seconds:.1f}s",
        ]


def _instance() -> DagsterInstance:
    return DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else DagsterInstance.ephemeral()


def catch_up(
    *,
    run_dbt: bool = True,
    full_refresh: bool = False,
    max_rounds: int = 1000,
    new_stream: bool = False,
) -> CatchUpReport:
    # imported here: loading Dagster definitions is slow, and `--help` should not pay for it
    from orderflow_dagster.defs.assets import offset_ranges, raw_order_events
    from orderflow_dagster.defs.resources import resources_from_env
    from orderflow_dagster.defs.sensors import missing_partitions
    from orderflow_dagster.land import kafka_source
    from orderflow_dagster.land.incarnations import Behind, LogBehindLedgerError
    from orderflow_dagster.land.landing import repair_kafka_commits
    from orderflow_dagster.land.planner import lost_to_recreation, plan_ranges

    started = time.monotonic()
    resources = resources_from_env(resolved=True)
    kafka, postgres, landing = resources["kafka"], resources["postgres"], resources["landing"]
    instance = _instance()
    report = CatchUpReport()
    for _ in range(max_rounds):
        with postgres.connect() as conn, kafka.consumer() as consumer:
            plan = plan_ranges(
                conn,
                consumer,
                kafka.topic,
                max_events_per_batch=landing.max_events_per_batch,
                max_inflight=landing.max_inflight,
                # an operator's decision, taken once: the next rounds plan the new stream
                new_stream=new_stream and report.stream is None,
            )
        report.stream = plan.topic
        if not plan.unlanded:
            break
        new_keys = missing_partitions(instance, offset_ranges.name, [r.key for r in plan.unlanded])
        if new_keys:
            instance.add_dynamic_partitions(offset_ranges.name, new_keys)
        for rng in plan.unlanded:
            result = materialize(
                [raw_order_events],
                partition_key=rng.key,
                instance=instance,
                resources=resources,
                raise_on_error=False,
                tags={"orderflow/source": "catch-up"},
                run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
            )
            if not result.success:
                report.failed += 1
                break
            report.ranges_landed += 1
        if report.failed:
            break

    if not report.failed and run_dbt:
        from orderflow_dagster.transform.dbt import run_dbt_build

        run_dbt_build(postgres.dsn, full_refresh=full_refresh)
        report.modelled = True
        from orderflow_dagster.publish.run import publish_status_changes

        report.published = publish_status_changes(
            postgres.dsn, kafka.bootstrap_servers
        ).published.messages

    with postgres.connect() as conn, kafka.consumer() as consumer:
        topic_id = kafka_source.topic_id(consumer, kafka.topic)
        parts = kafka_source.partitions(consumer, kafka.topic)
        marks = kafka_source.watermarks(consumer, kafka.topic, parts)
        committed = repair_kafka_commits(
            conn, consumer, kafka.topic, parts, topic_id=topic_id, marks=marks
        )
        report.produced = sum(high - low for low, high in marks.values())
        lags = {
            p: high - (low if committed[p] is None else committed[p])
            for p, (low, high) in marks.items()
        }
        above = [Behind(p, marks[p][1], committed[p]) for p, n in sorted(lags.items()) if n < 0]
        if above:
            # the repair leaves no committed offset past the log end; something else did
            raise LogBehindLedgerError(report.stream or kafka.topic, topic_id, above)
        report.lag = sum(lags.values())
        report.lost = lost_to_recreation(conn, kafka.topic, report.stream)
        stream = report.stream or kafka.topic
        report.landed_rows, report.dead_letters = conn.execute(
            "select (select count(*) from raw.order_events where topic = %s),"
            " (select count(*) from raw.dead_letters where topic = %s)",
            (stream, stream),
        ).fetchone()
        schema = os.environ.get("ORDERFLOW_ANALYTICS_SCHEMA") or "analytics"
        if report.modelled:
            report.orders = conn.execute(
                sql.SQL("select count(*) from {}.order_status").format(sql.Identifier(schema))
            ).fetchone()[0]
    report.seconds = time.monotonic() - started
    return report


# exit status of `orderflow catch-up` when the marts need `--full-refresh` (after an upgrade)
EXIT_MARTS_OUT_OF_DATE = 3
# exit status when Kafka's log of the topic cannot continue the ledger, or when offsets a
# re-created topic took with it are not acknowledged: the message says what to do
EXIT_TOPIC_INCARNATION = 4


def _run(args: argparse.Namespace) -> int:
    from orderflow_dagster.land.incarnations import IncarnationError
    from orderflow_dagster.land.planner import lost_message
    from orderflow_dagster.transform.dbt import MartsOutOfDateError

    try:
        report = catch_up(
            run_dbt=not args.no_dbt, full_refresh=args.full_refresh, new_stream=args.new_stream
        )
    except MartsOutOfDateError as exc:
        print(f"catch-up FAILED: {exc}", file=sys.stderr)
        return EXIT_MARTS_OUT_OF_DATE
    except IncarnationError as exc:
        print(f"catch-up FAILED: {exc}", file=sys.stderr)
        return EXIT_TOPIC_INCARNATION
    for line in report.lines(settings.topic()):
        print(line)
    if report.lost:
        print(f"catch-up FAILED: {lost_message(report.lost)}", file=sys.stderr)
        return EXIT_TOPIC_INCARNATION
    if report.failed:
        print("catch-up FAILED: a range did not land; see the run's logs above", file=sys.stderr)
        return 1
    if report.lag:
        print(f"catch-up stopped with lag={report.lag}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "catch-up", help="plan, land and model in-process until the lag is zero, then exit"
    )
    parser.add_argument("--no-dbt", action="store_true", help="land only; skip the dbt build")
    parser.add_argument(
        "--full-refresh",
        action="store_true",
        help="rebuild the dbt marts from raw (needed once after an upgrade changed them;"
        f" catch-up exits {EXIT_MARTS_OUT_OF_DATE} when it is)",
    )
    parser.add_argument(
        "--new-stream",
        action="store_true",
        help="land Kafka's log of the topic as a new stream from its first offset; only when it"
        " ends below the ledger (a truncated log, a restored cluster, a topic re-created before"
        f" its id was recorded: catch-up exits {EXIT_TOPIC_INCARNATION} and says so)",
    )
    parser.set_defaults(func=_run)
