"""Read-time metrics (:mod:`relu_doctor.metrics`) on hand-made sum matrices, against values
computed by hand; the metrics of real runs are checked against the brute-force reference in
``test_diagnosis.py``."""

from __future__ import annotations

import math

import torch

from relu_doctor.metrics import layer_metrics, site_metrics, stacked_metrics, unit_metrics
from relu_doctor.stats import FIELDS, ROW


def synthetic(units: int = 4) -> torch.Tensor:
    m = torch.zeros(len(FIELDS), units, dtype=torch.float64)
    m[ROW["elements"]] = 10
    m[ROW["active"]] = 5
    m[ROW["sum"]] = m[ROW["sum_abs"]] = 3
    m[ROW["sum_sq"]] = 2
    m[ROW["grad_elements"]] = m[ROW["grad_in_elements"]] = 10
    m[ROW["grad_sq"]] = 10
    return m


def test_unseen_units_are_nan_not_dead():
    m = synthetic()
    m[:, 2] = 0  # unit 2 never seen
    u = unit_metrics(m, m, 0.1)
    assert u["seen"].tolist() == [True, True, False, True]
    assert not bool(u["dead"][2]) and not bool(u["dormant"][2])
    assert math.isnan(float(u["activation_rate"][2])) and math.isnan(float(u["dormant_score"][2]))
    assert u["dormant_score"][[0, 1, 3]].tolist() == [1.0, 1.0, 1.0]


def test_a_score_equal_to_tau_is_dormant():
    """README, Definitions: dormant when score <= tau. mean|h| of (0.25, 1.25, 1.25, 1.25) averages
    exactly 1, so unit 0 scores exactly 0.25."""
    m = synthetic()
    m[ROW["sum_abs"]] = torch.tensor([0.25, 1.25, 1.25, 1.25], dtype=torch.float64) * 10
    u = unit_metrics(m, m, 0.25)
    assert u["dormant_score"].tolist() == [0.25, 1.25, 1.25, 1.25]
    assert u["dormant"].tolist() == [True, False, False, False]
    assert unit_metrics(m, m, 0.2499)["dormant"].tolist() == [False] * 4


def test_dormant_units_are_active_below_tau_are_dead_or_dormant_by_score():
    """README, Words: dead = no activation; dormant = active but ReDo score <= tau (dead units
    are not dormant); below tau = score <= tau, dead units included (what ReDo recycles). Per
    element mean |h| of (0, 3, 0.125, 1, 0.875) averages exactly 1, so the scores are those
    numbers: unit 0 is dead with |h| 0 (a ReLU), unit 1 dead with a large |h| (a leaky unit
    stuck negative), unit 2 active and quiet."""
    m = synthetic(5)
    m[ROW["elements"]] = 8
    m[ROW["active"]] = torch.tensor([0, 0, 4, 4, 4], dtype=torch.float64)
    m[ROW["sum_abs"]] = torch.tensor([0, 3, 0.125, 1, 0.875], dtype=torch.float64) * 8
    u = unit_metrics(m, m, 0.2)
    assert u["dormant_score"].tolist() == [0.0, 3.0, 0.125, 1.0, 0.875]
    assert u["dead"].tolist() == [True, True, False, False, False]
    assert u["dormant"].tolist() == [False, False, True, False, False]
    assert u["below_tau"].tolist() == [True, False, True, False, False]
    row = site_metrics(m, u)
    assert (row["dead"], row["dormant"], row["below_tau"]) == (2, 1, 2)
    assert (row["dormant_fraction"], row["below_tau_fraction"]) == (1 / 5, 2 / 5)
    units, rows = stacked_metrics([synthetic(), m], [synthetic(), m], 0.2)
    for name in ("dead", "dormant", "below_tau"):
        assert units[1][name].tolist() == u[name].tolist()
    assert {k: rows[1][k] for k in row} == row




def test_lifetime_dead_counts_units_never_active_since_monitoring_began():
    window = synthetic()
    window[ROW["active"], 1] = 0  # dead in this window ...
    lifetime = window.clone()
    lifetime[ROW["active"], 1] = 0  # ... and in every earlier one
    lifetime[ROW["active"], 3] = 0
    lifetime[ROW["elements"], 3] = 0  # unit 3 never seen: not lifetime dead
    u = unit_metrics(window, lifetime, 0.1)
    assert u["dead"].tolist() == [False, True, False, False]
    assert u["lifetime_dead"].tolist() == [False, True, False, False]
    row = site_metrics(window, u)
    assert (row["dead"], row["lifetime_dead"], row["units_seen"]) == (1, 1, 4)
    assert row["dead_fraction"] == 0.25 and row["lifetime_dead_fraction"] == 0.25
    assert row["sparsity"] == 1 - 15 / 40  # 3 units x 5 active of 40 elements


def test_a_site_that_saw_nothing_has_nan_rates_not_zeros():
    m = torch.zeros(len(FIELDS), 3, dtype=torch.float64)
    row = site_metrics(m, unit_metrics(m, m, 0.1))
    assert row["units_seen"] == 0 and row["dead"] == 0
    assert all(math.isnan(row[k]) for k in ("dead_fraction", "sparsity", "grad_rms", "mean_abs"))


def test_layer_norms_are_the_rms_over_steps_and_processes():
    sq = torch.tensor([9.0 * 4, 16.0 * 4], dtype=torch.float64)  # 2 steps x 2 processes
    rows, total = layer_metrics(["a", "b"], sq, steps=2, world=2, update_ratio=None)
    assert [r["grad_norm"] for r in rows] == [3.0, 4.0]
    assert total == 5.0 and all(math.isnan(r["update_ratio"]) for r in rows)
