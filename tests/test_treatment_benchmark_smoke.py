"""Smoke test of the clinic (benchmarks/treatment.py): the harness runs every way of a
pathology, builds a healthy reference with the setting's sane counterpart, and computes the
gap closed by hand. Checks the harness, never the outcome numbers."""

from __future__ import annotations

import math

import pytest

from benchmarks import treatment

pytestmark = pytest.mark.benchmark


def test_clinic_harness_runs_and_formats() -> None:
    table = treatment.run_clinic(["neg_bias"], seeds=(0, 1), steps=40, width=16)
    assert list(table) == ["neg_bias", "healthy"]
    assert set(table["neg_bias"]) == {"untreated", "treated", "healthy"}
    assert set(table["healthy"]) == {"untreated", "treated"}
    for ways in table.values():
        for cell in ways.values():
            assert len(cell.outcomes) == 2
            for o in cell.outcomes:
                assert 0.0 <= o.accuracy <= 1.0 and math.isfinite(o.loss) and 0.0 <= o.dead <= 1.0
    # untreated runs only watch; a bias of -3 leaves every unit of the first layer dead
    assert all(o.interventions == 0 for o in table["neg_bias"]["untreated"].outcomes)
    assert all(o.dead > 0.3 for o in table["neg_bias"]["untreated"].outcomes)
    text = treatment.format_table(table)
    assert text.count("\n") == 1 + 3 + 2 and "| neg_bias | treated |" in text


def test_gap_closed_and_stats_by_hand() -> None:
    assert treatment.gap_closed(0.2, 0.6, 0.7) == pytest.approx(0.8)
    assert math.isnan(treatment.gap_closed(0.5, 0.6, 0.5))
    cell = treatment.Cell([treatment.Outcome(1.0, 0.5, 0.1, 0), treatment.Outcome(3.0, 0.7, 0.3, 2)])
    assert cell.stat("loss") == pytest.approx((2.0, math.sqrt(2.0)))
