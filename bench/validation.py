"""Schema-validation cost on the landing hot path: the per-event work of landing (parse,
validate, format the COPY line) with the schema registry's validators, and with them replaced by
a no-op, on the same generated events in the same run. Prints events/s and the ratio.

    .venv/bin/python bench/validation.py [--events 300000]

The landing issue's rule: validation must not halve throughput (ratio >= 0.5).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import orjson

from orderflow_dagster.contract import registry
from orderflow_dagster.ingest.generator import generate
from orderflow_dagster.land import parse
from orderflow_dagster.land.landing import _Batch
from orderflow_dagster.land.ranges import OffsetRange


class Msg:
    """The accessors of a confluent_kafka.Message that landing reads."""

    __slots__ = ("_key", "_offset", "_value")

    def __init__(self, key: bytes | None, value: bytes, offset: int) -> None:
        self._key, self._value, self._offset = key, value, offset

    def key(self):
        return self._key

    def value(self):
        return self._value

    def headers(self):
        return None

    def offset(self):
        return self._offset

    def timestamp(self):
        return (1, 1_735_689_600_000)


def landing_work(messages: list[Msg]) -> float:
    """Seconds to parse, validate and format every message, in chunks as landing does."""
    batch = _Batch(OffsetRange("bench", 0, 0, len(messages) + 1), "bench-run", 1 << 20)
    started = time.perf_counter()
    for i in range(0, len(messages), 2000):
        for msg in messages[i : i + 2000]:
            batch.add(msg)
        batch.take_events()
        batch.dead.clear()
    return time.perf_counter() - started


def best_of(runs: int, messages: list[Msg]) -> float:
    return min(landing_work(messages) for _ in range(runs))


def measure(events: int = 200_000, repeat: int = 3) -> dict[str, float]:
    """events/s of the per-event landing work with and without schema validation."""
    outgoing = generate(events // 3 + 1, seed=42, poison_rate=0.001, duplicate_rate=0.01)
    messages = [Msg(o.key, o.value, i) for i, o in zip(range(events), outgoing, strict=False)]
    with_validation = best_of(repeat, messages)
    # the baseline: every payload passes unread, on the fast path and on the thorough one
    real_check, real_decoders = registry.payload_violation, dict(parse._RAW_DECODERS)
    registry.payload_violation = lambda event_type, version, payload: None
    parse._RAW_DECODERS.update(dict.fromkeys(real_decoders, lambda raw: True))
    try:
        without = best_of(repeat, messages)
    finally:
        registry.payload_violation = real_check
        parse._RAW_DECODERS.update(real_decoders)
    n = len(messages)
    return {"events": n, "with": n / with_validation, "without": n / without}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    v = measure(args.events, args.repeat)
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
            platform.processor(),
        )
    print(
        f"machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, "
        f"orjson {orjson.__version__}"
    )
    print(f"events: {v['events']:,}")
    print(
        f"landing work without schema validation: {v['without']:,.0f} events/s "
        f"({1e6 / v['without']:.2f} us/event)"
    )
    print(
        f"landing work with schema validation:    {v['with']:,.0f} events/s "
        f"({1e6 / v['with']:.2f} us/event)"
    )
    print(
        f"ratio with / without: {v['with'] / v['without']:.2f} "
        "(rule: >= 0.5, validation must not halve it)"
    )


if __name__ == "__main__":
    main()
