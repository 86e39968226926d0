"""`make demo`: the whole platform on one machine, from nothing to the Dagster UI.

Starts the local stack, produces a demo stream (orders with duplicates, out-of-order events and
poison messages), catches up in-process, prints a summary, then runs `orderflow serve` (the
Dagster UI, the daemon and the planning sensor, on Dagster storage in the stack's Postgres) until
Ctrl-C, which stops every Dagster process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from orderflow_dagster import settings
from orderflow_dagster.serve import serve
from orderflow_dagster.serve.catch_up import EXIT_MARTS_OUT_OF_DATE

DEMO_ORDERS = int(os.environ.get("ORDERFLOW_DEMO_ORDERS", "3000"))
UI_PORT = int(os.environ.get("ORDERFLOW_UI_PORT", "3000"))


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def main() -> int:
    from orderflow_dagster.stack import manager

    _say("starting Kafka and PostgreSQL (first run downloads Kafka from Maven Central)")
    info = manager.start(manager.StackConfig.from_env())
    os.environ.update(info.env())
    # before the catch-up, so that its runs are in the instance the UI shows
    try:
        instance = serve.prepare_instance(os.environ)
    except Exception as exc:
        _say(f"could not prepare the Dagster instance: {settings.redact_dsn(str(exc))}")
        return 1
    os.environ.update(instance.env)
    bin_dir = Path(sys.executable).parent
    orderflow = str(bin_dir / "orderflow")

    _say(f"producing {DEMO_ORDERS} orders with duplicates, late events and poison messages")
    subprocess.run(
        [
            orderflow,
            "produce",
            "--orders",
            str(DEMO_ORDERS),
            "--duplicate-rate",
            "0.05",
            "--poison-rate",
            "0.01",
            "--out-of-order-rate",
            "0.1",
        ],
        check=True,
    )
    _say("catching up: planning offset ranges, landing them, building the dbt models")
    caught_up = subprocess.run([orderflow, "catch-up"])
    if caught_up.returncode == EXIT_MARTS_OUT_OF_DATE:
        # a demo stack left by an older version of the project: its marts are only demo data
        _say("the marts come from an older version of the project: rebuilding them (full refresh)")
        caught_up = subprocess.run([orderflow, "catch-up", "--full-refresh"])
    if caught_up.returncode != 0:
        _say("catch-up failed; see above")
        return caught_up.returncode

    _say("the sensor keeps landing whatever you produce next: `.venv/bin/orderflow produce`")
    _say("stop the services afterwards with `make stack-down`")
    return serve.serve(host="127.0.0.1", port=UI_PORT, instance=instance)


if __name__ == "__main__":
    sys.exit(main())
