"""`orderflow catch-up`: plan, land (and model) in-process until the lag is zero.

The same planning and landing code as the sensor path, driven by a loop instead of the daemon,
for CI, scripts and operators. Every step is idempotent, so it is safe to kill at any moment and
run again. Uses the Dagster instance in $DAGSTER_HOME when set (so the runs show in the UI), an
ephemeral one otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

from dagster import DagsterInstance, materialize
from psycopg import sql

from orderflow_dagster import settings


@dataclass
class CatchUpReport:
    ranges_landed: int = 0
    failed: int = 0
    lag: int = 0
    produced: int = 0
    landed_rows: int = 0
    dead_letters: int = 0
    seconds: float = 0.0
    modelled: bool = False
    orders: int | None = None

    def lines(self, topic: str) -> list[str]:
        return [
            f"topic:        {topic}",
            f"produced:     {self.produced} offsets in the log",
            f"landed:       {self.landed_rows} rows in raw.order_events",
            f"dead letters: {self.dead_letters} in raw.dead_letters",
            f"lag:          {self.lag}",
            f"ranges:       {self.ranges_landed} landed this run, {self.failed} failed",
            f"dbt models:   {'built' if self.modelled else 'not run'}",
            f"orders:       {'-' if self.orders is None else self.orders} in order_status",
            f"took:         {self.seconds:.1f}s",
        ]


def _instance() -> DagsterInstance:
    return DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else DagsterInstance.ephemeral()


def catch_up(
    *, run_dbt: bool = True, full_refresh: bool = False, max_rounds: int = 1000
) -> CatchUpReport:
    # imported here: loading Dagster definitions is slow, and `--help` should not pay for it
    from orderflow_dagster.defs.assets import offset_ranges, raw_order_events
    from orderflow_dagster.defs.resources import resources_from_env
    from orderflow_dagster.land import kafka_source
    from orderflow_dagster.land.landing import repair_kafka_commits
    from orderflow_dagster.land.planner import plan_ranges

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
            )
        if not plan.unlanded:
            break
        known = set(instance.get_dynamic_partitions(offset_ranges.name))
        new_keys = [r.key for r in plan.unlanded if r.key not in known]
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

    with postgres.connect() as conn, kafka.consumer() as consumer:
        committed = repair_kafka_commits(conn, consumer, kafka.topic)
        parts = sorted(committed)
        marks = kafka_source.watermarks(consumer, kafka.topic, parts)
        report.produced = sum(high - low for low, high in marks.values())
        report.lag = sum(marks[p][1] - (committed[p] or marks[p][0]) for p in parts)
        report.landed_rows, report.dead_letters = conn.execute(
            "select (select count(*) from raw.order_events where topic = %s),"
            " (select count(*) from raw.dead_letters where topic = %s)",
            (kafka.topic, kafka.topic),
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


def _run(args: argparse.Namespace) -> int:
    from orderflow_dagster.transform.dbt import MartsOutOfDateError

    try:
        report = catch_up(run_dbt=not args.no_dbt, full_refresh=args.full_refresh)
    except MartsOutOfDateError as exc:
        print(f"catch-up FAILED: {exc}", file=sys.stderr)
        return EXIT_MARTS_OUT_OF_DATE
    for line in report.lines(settings.topic()):
        print(line)
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
    parser.set_defaults(func=_run)
