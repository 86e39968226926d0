"""Which planned ranges need a run now. Pure, so the sensor's retry rules are unit-tested."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


def dbt_build_decision(
    ledger_ranges: int, ledger_marker: str, cursor: str | None, dbt_in_progress: bool
) -> str | None:
    """None: request a dbt build now; otherwise why not.

    One build covers every range landed since the previous one, so a burst of ranges costs one
    build, not one per range; none starts while one runs (incremental models must not race).
    """
    if ledger_ranges == 0:
        return "nothing landed yet"
    if ledger_marker == (cursor or ""):
        return "no range landed since the last dbt build"
    if dbt_in_progress:
        return "a dbt build is in progress; new ranges will be modelled by the next one"
    return None
