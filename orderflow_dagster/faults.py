"""Named crash points for fault-injection tests.

`ORDERFLOW_CRASH_AT=after_db_commit_before_kafka_commit` makes the process SIGKILL itself the first
time it reaches that point, the harshest way a process can die (no finally blocks, no atexit).
`ORDERFLOW_PAUSE_AT=mid_copy:/tmp/flag` instead creates the file /tmp/flag there and waits until
it is deleted, so a test can stop Kafka or Postgres at exactly that moment.
Off by default and free when off: the environment is read once, at import.

A point reached while a child process does the work (`in_dbt`: dbt runs as a subprocess) names
the child too, so the crash takes the child with it instead of leaving it to finish alone.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

# the status publisher's (orderflow_dagster/publish/producer.py)
PUBLISH_CRASH_POINTS = ("publish_before_send", "publish_mid_transaction", "publish_after_commit")
CRASH_POINTS = (
    "before_copy",
    "mid_copy",
    "after_copy_before_commit",
    "after_db_commit_before_kafka_commit",
    "in_kafka_commit",
    "after_kafka_commit",
    "in_dbt",
    *PUBLISH_CRASH_POINTS,
)

_ACTIVE = frozenset(filter(None, os.environ.get("ORDERFLOW_CRASH_AT", "").split(",")))
_unknown = _ACTIVE - set(CRASH_POINTS)
if _unknown:
    raise RuntimeError(f"ORDERFLOW_CRASH_AT names unknown crash points: {sorted(_unknown)}")


_PAUSE_POINT, _, _PAUSE_FLAG = os.environ.get("ORDERFLOW_PAUSE_AT", "").partition(":")


def armed(name: str) -> bool:
    """Whether `name` would crash or pause: lets a caller skip the work of finding the moment."""
    return name in _ACTIVE or (bool(_PAUSE_POINT) and name == _PAUSE_POINT)


def crash_point(name: str, *, children: Iterable[int] = ()) -> None:
    if _ACTIVE and name in _ACTIVE:
        for pid in children:
            with suppress(ProcessLookupError):  # it may have exited on its own
                os.kill(pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if _PAUSE_POINT and name == _PAUSE_POINT:
        _pause(Path(_PAUSE_FLAG))


def _pause(flag: Path) -> None:
    global _PAUSE_POINT
    _PAUSE_POINT = ""  # once per process
    flag.touch()
    while flag.exists():
        time.sleep(0.05)
