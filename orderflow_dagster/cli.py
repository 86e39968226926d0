"""The `orderflow` command line.

Each command lives beside the code it drives and registers itself here, so this file only wires
them up: `stack` (local services), `produce` (demo and benchmark streams), `catch-up` (plan, land
and model until the lag is zero), `dlq` (dead letters), `verify` (the invariants), `ack-loss`
(record offsets retention deleted before they landed), `backfill` (add retired ranges of a
window of offsets or time to Dagster again) and `serve` (the Dagster webserver and daemon,
headless).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from orderflow_dagster.ingest.kafka_config import UnsafeKafkaConfigError

# module -> it defines `register(subparsers)`; each registered parser sets `func(args) -> int`.
COMMAND_MODULES = (
    "orderflow_dagster.stack.manager",
    "orderflow_dagster.ingest.produce_cli",
    "orderflow_dagster.serve.catch_up",
    "orderflow_dagster.serve.dlq",
    "orderflow_dagster.serve.verify",
    "orderflow_dagster.serve.ack_loss",
    "orderflow_dagster.serve.backfill",
    "orderflow_dagster.serve.serve",
)

# exit status when the Kafka configuration in the environment would weaken exactly-once
EXIT_UNSAFE_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orderflow", description="Kafka order events to an exactly-once order_status table."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UnsafeKafkaConfigError as exc:
        print(f"orderflow {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNSAFE_CONFIG


if __name__ == "__main__":
    sys.exit(main())
