"""Which planned ranges need a run now. Pure, so the sensor's retry rules are unit-tested."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

IN_PROGRESS = frozenset({"QUEUED", "NOT_STARTED", "MANAGED", "STARTING", "STARTED", "CANCELING"})


@dataclass(frozen=True)
class RunInfo:
    status: str  # a DagsterRunStatus name
    ended_at: float | None  # unix seconds; None while running


@dataclass(frozen=True)
class Launch:
    partition_key: str
    run_key: str


def launches(
    unlanded_keys: Sequence[str],
    runs_by_key: Mapping[str, Sequence[RunInfo]],
    *,
    now: float,
    retry_grace_seconds: float,
) -> list[Launch]:
    """A run for each unlanded range with no run at all; a fresh attempt for each whose runs all
    ended without landing it, once Dagster's own retries have had `retry_grace_seconds`.

    Run keys never expire, so a retry needs a new one: `<range key>|attempt-<n>`.
    """
    out = []
    for key in unlanded_keys:
        runs = runs_by_key.get(key, ())
        if not runs:
            out.append(Launch(key, key))
            continue
        if any(r.status in IN_PROGRESS for r in runs):
            continue
        last_end = max((r.ended_at or 0.0) for r in runs)
        if now - last_end >= retry_grace_seconds:
            out.append(Launch(key, f"{key}|attempt-{len(runs) + 1}"))
    return out


def raw_marker(
    ranges: int,
    last_landed_at: datetime | None,
    replays: int,
    last_replayed_at: datetime | None,
) -> str:
    """What has written raw so far, as the dbt sensor's cursor: the ledger's ranges and the
    replays that landed rows (raw.replay_log), each as a count and the latest time. Changes
    whenever either does. Without replays it is the ledger's part alone, so a deployment that
    never replayed keeps its cursor across an upgrade (no needless build)."""
    marker = f"{ranges}:{last_landed_at.isoformat() if last_landed_at else '-'}"
    if replays:
        marker += f"|replays:{replays}:{last_replayed_at.isoformat() if last_replayed_at else '-'}"
    return marker


def dbt_build_decision(
    ledger_ranges: int, ledger_marker: str, cursor: str | None, dbt_in_progress: bool
) -> str | None:
    """None: request a dbt build now; otherwise why not.

    `ledger_ranges` counts the ledger's ranges and the replays that landed rows, `ledger_marker`
    is their `raw_marker`. One build covers everything landed since the previous one, so a
    burst of ranges costs one build, not one per range; none starts while one runs (incremental
    models must not race).
    """
    if ledger_ranges == 0:
        return "nothing landed yet"
    if ledger_marker == (cursor or ""):
        return "nothing landed or replayed since the last dbt build"
    if dbt_in_progress:
        return "a dbt build is in progress; new ranges will be modelled by the next one"
    return None


def heartbeat_due(
    last_build_started_at: float | None, now: float, heartbeat_seconds: float
) -> bool:
    """Whether the dbt sensor should build although nothing landed: the last build started
    `heartbeat_seconds` ago or more (0 turns heartbeats off). A no-op incremental build keeps
    order_status's freshness policy true of an idle stream, so only a stalled pipeline fails it."""
    if heartbeat_seconds <= 0 or last_build_started_at is None:
        return False
    return now - last_build_started_at >= heartbeat_seconds
