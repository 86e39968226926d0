"""The fault suite's summary table, in the style of Kafka's EOS smoke test: per scenario, how many
trials ran, how many messages they produced, how many were lost or stored twice, and how long the
recovery took.

Fault tests add one trial each through the `fault_report` fixture, computed from the same
invariants they assert (so a broken guarantee shows up in the table as well as in the failure).
The table is printed at the end of the session and written to `<test home>/fault-report.md`;
`make fault-report` also splices it into docs/reliability.md between the markers below.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

START_MARKER = "<!-- fault-table:start -->"
END_MARKER = "<!-- fault-table:end -->"


@dataclass(frozen=True)
class Trial:
    scenario: str  # "<number>. <short name>", e.g. "1. SIGKILL at mid_copy"
    messages: int  # records produced to the topic in this trial
    lost: int  # produced records stored neither as a row nor as a dead letter
    duplicated: int  # stored rows beyond one per record, plus event_ids twice in the marts
    recovery_s: float  # from the start of recovery (restart, rerun) until the invariants held


@dataclass
class FaultReport:
    trials: list[Trial] = field(default_factory=list)

    def record(
        self, scenario: str, *, messages: int, lost: int, duplicated: int, recovery_s: float
    ) -> Trial:
        trial = Trial(scenario, messages, lost, duplicated, round(recovery_s, 2))
        self.trials.append(trial)
        return trial

    def record_invariants(
        self, scenario: str, inv, *, recovery_s: float, mart_duplicates: int = 0
    ) -> Trial:
        """A trial from `tests.support.Invariants`: lost and duplicated from the coordinates."""
        return self.record(
            scenario,
            messages=inv.produced,
            lost=inv.lost,
            duplicated=inv.duplicated + mart_duplicates,
            recovery_s=recovery_s,
        )

    def rows(self) -> list[tuple[str, int, int, int, int, str]]:
        by_scenario: dict[str, list[Trial]] = {}
        for trial in self.trials:
            by_scenario.setdefault(trial.scenario, []).append(trial)
        return [
            (
                name,
                len(ts),
                sum(t.messages for t in ts),
                sum(t.lost for t in ts),
                sum(t.duplicated for t in ts),
                _seconds([t.recovery_s for t in ts]),
            )
            for name, ts in sorted(by_scenario.items(), key=lambda kv: _order(kv[0]))
        ]

    def markdown(self) -> str:
        header = (
            "| scenario | trials | messages | lost | duplicated | recovery s (median, max) |\n"
            "| --- | ---: | ---: | ---: | ---: | --- |\n"
        )
        body = "".join(
            f"| {name} | {n} | {msgs:,} | {lost} | {dup} | {rec} |\n"
            for name, n, msgs, lost, dup, rec in self.rows()
        )
        return header + body

    def text(self) -> str:
        rows = [("scenario", "trials", "messages", "lost", "duplicated", "recovery s")]
        rows += [(r[0], str(r[1]), f"{r[2]:,}", str(r[3]), str(r[4]), r[5]) for r in self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        return "\n".join(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        )


def _seconds(values: Iterable[float]) -> str:
    values = list(values)
    return f"{statistics.median(values):.1f}, {max(values):.1f}"


def _order(scenario: str) -> tuple[int, str]:
    match = re.match(r"(\d+)", scenario)
    return (int(match.group(1)) if match else 99, scenario)


def machine() -> str:
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


def splice(doc: Path, table: str, caption: str) -> None:
    """Replace the table between the markers of `doc` (which must already hold both)."""
    text = doc.read_text()
    start, end = text.index(START_MARKER), text.index(END_MARKER)
    doc.write_text(text[: start + len(START_MARKER)] + f"\n{caption}\n\n{table}" + text[end:])


REPORT = FaultReport()
