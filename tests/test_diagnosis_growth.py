"""ReLU's missing upper bound: the activation_growth finding over time and across depth (on a
real watched model, RMS read back from the Doctor's rows and checked by hand), and the
run-level numbers published for early stopping."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.diagnosis import DiagnosisConfig, Finding, run_health


def _watch(net: nn.Module, xs: list[torch.Tensor], *, growth: float = 100.0) -> list:
    records = []
    with relu_doctor.watch(net, log_every_n_steps=1, every_n_steps=1,
                           config=DiagnosisConfig(growth_factor=growth)) as doc:
        doc.add_listener(records.append)
        for x in xs:
            net(x).sum().backward()
            doc.step()
    return records


def test_growth_over_time_on_a_real_model() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(32, 4)
    with torch.no_grad():
        first = float(torch.relu(net[0](x)).pow(2).mean().sqrt())
    records = _watch(net, [x, 1000 * x])
    grown = [f for f in records[1].findings if f.kind == "activation_growth"]
    assert not [f for f in records[0].findings if f.kind == "activation_growth"]
    assert len(grown) == 1 and grown[0].site == "1" and grown[0].evidence["over"] == "time"
    assert grown[0].evidence["first_rms"] == pytest.approx(first, rel=1e-5)
    assert grown[0].evidence["factor"] == pytest.approx(records[1].site_row("1")["rms"] / first)
    assert "ReLU6" in grown[0].remedy and "normalise" in grown[0].remedy


def test_growth_across_depth_and_none_below_the_factor() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[2].weight.mul_(1000.0)
        net[2].bias.abs_()
    x = torch.randn(32, 4)
    recs = _watch(net, [x])
    rms = {r["site"]: r["rms"] for r in recs[0].site_rows}
    depth = [f for f in recs[0].findings if f.kind == "activation_growth"]
    assert rms["3"] / rms["1"] >= 100
    assert len(depth) == 1 and depth[0].site == "3" and depth[0].evidence["over"] == "depth"
    assert depth[0].evidence["factor"] == pytest.approx(rms["3"] / rms["1"])
    # a factor above the growth: no finding
    high = _watch(net, [x], growth=10 * rms["3"] / rms["1"])
    assert not [f for f in high[0].findings if f.kind == "activation_growth"]


def test_run_health_counts_units_by_hand() -> None:
    rows = [{"units": 10, "units_seen": 10, "dead": 3, "dormant": 5, "lifetime_dead": 1},
            {"units": 30, "units_seen": 30, "dead": 1, "dormant": 2, "lifetime_dead": 2}]
    h = run_health(rows, [])
    assert h == {"dead_fraction": 4 / 40, "dormant_fraction": 7 / 40,
                 "lifetime_dead_fraction": 3 / 40, "health": 1 - 4 / 40}
    bad = run_health(rows, [Finding("nonfinite", "1", "critical", "NaN")])
    assert bad["health"] == 0.0
    assert math.isnan(run_health([], [])["health"])


def test_a_resumed_doctor_judges_growth_against_the_first_runs_baseline_and_says_no_change_twice(
) -> None:
    """Each site's first RMS and the remedy changes already said go into the checkpoint: a
    Doctor resumed from it (a new process) took its own first reading as the baseline, so
    the growth it should report was never found, and said a remedy's first change again."""
    from relu_doctor.errors import ReluDoctorWarning
    from relu_doctor.events import Intervention

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(32, 4)
    change = Intervention("lr_rescue", "model", 1, "scaled the learning rate by 0.5")
    with relu_doctor.watch(net, log_every_n_steps=1, every_n_steps=1) as first:
        net(x).sum().backward()
        first.step()
        with pytest.warns(ReluDoctorWarning, match="lr_rescue changed the training"):
            first.record_event(change)
        state = first.state_dict()
    records = []
    with relu_doctor.watch(net, log_every_n_steps=1, every_n_steps=1) as resumed:
        resumed.load_state_dict(state)
        resumed.add_listener(records.append)
        net(1000 * x).sum().backward()
        resumed.step()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            resumed.record_event(change)
    assert not [w for w in seen if "changed the training" in str(w.message)]
    grown = [f for f in records[-1].findings if f.kind == "activation_growth"]
    assert len(grown) == 1 and grown[0].evidence["first_rms"] == state["first_rms"]["1"]
