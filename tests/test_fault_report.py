"""The fault suite's summary table: aggregation per scenario and splicing into the docs."""

from __future__ import annotations

from tests.fault_report import END_MARKER, START_MARKER, FaultReport, splice
from tests.support import Invariants


def invariants_with(produced: int, raw: int, dead: int, distinct: int) -> Invariants:
    return Invariants(produced, raw, dead, 0, True, {}, {}, distinct)


def test_invariants_count_lost_and_duplicated_records_from_coordinates():
    inv = invariants_with(produced=100, raw=90, dead=12, distinct=97)
    assert inv.lost == 3
    assert inv.duplicated == 5


def test_trials_of_one_scenario_are_summed_and_ordered_by_scenario_number():
    report = FaultReport()
    report.record("10. offsets lost", messages=5, lost=0, duplicated=0, recovery_s=1.0)
    report.record("2. catch-up killed", messages=100, lost=0, duplicated=0, recovery_s=3.0)
    report.record("2. catch-up killed", messages=50, lost=1, duplicated=2, recovery_s=5.0)
    assert report.rows() == [
        ("2. catch-up killed", 2, 150, 1, 2, "4.0, 5.0"),
        ("10. offsets lost", 1, 5, 0, 0, "1.0, 1.0"),
    ]
    assert "| 2. catch-up killed | 2 | 150 | 1 | 2 | 4.0, 5.0 |" in report.markdown()
    assert report.text().splitlines()[1].startswith("2. catch-up killed")


def test_a_mart_duplicate_counts_as_duplicated():
    report = FaultReport()
    trial = report.record_invariants(
        "9. replays", invariants_with(10, 10, 0, 10), recovery_s=0.5, mart_duplicates=1
    )
    assert (trial.lost, trial.duplicated) == (0, 1)


def test_splice_replaces_only_the_table_between_the_markers(tmp_path):
    doc = tmp_path / "reliability.md"
    doc.write_text(f"# intro\n{START_MARKER}\nold table\n{END_MARKER}\n## after\n")
    splice(doc, "| new |\n", "caption")
    text = doc.read_text()
    assert "old table" not in text
    assert text.startswith("# intro\n")
    assert text.endswith(f"caption\n\n| new |\n{END_MARKER}\n## after\n")
