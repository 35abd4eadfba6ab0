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


@pytest.mark.parametrize("norm", ["BatchNorm1d", "LayerNorm"])
def test_growth_across_depth_is_not_read_up_to_a_site_behind_a_norm(norm: str) -> None:
    """An HF trial: a SegFormer's MixFFN GELUs, initialised small, read 228x below its decode
    head's BatchNorm -> ReLU at initialisation, a warning whose remedy ("normalise before the
    activation") was taken already. A norm sets the scale of the site after it: the deepest
    site behind none is compared with the shallowest (RMS by hand here), and grows no finding
    where it did not grow; the same stack without the norm still finds it."""
    def net(with_norm: bool) -> nn.Sequential:
        torch.manual_seed(0)
        layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                               nn.Linear(8, 8), getattr(nn, norm)(8) if with_norm
                               else nn.Identity(), nn.ReLU(), nn.Linear(8, 2))
        with torch.no_grad():
            layers[0].weight.mul_(1e-3)  # (the shallowest site small, as a residual branch's)
            layers[0].bias.zero_()
            layers[2].bias.zero_()
            layers[4].weight.mul_(1e3)
        return layers

    x = torch.randn(32, 4)
    for with_norm in (True, False):
        model = net(with_norm)
        with torch.no_grad():
            h1 = torch.relu(model[0](x))
            h3 = torch.relu(model[2](h1))
            h6 = torch.relu(model[5](model[4](h3)))
        by_hand = {"1": h1, "3": h3, "6": h6}
        recs = _watch(model, [x])
        rms = {r["site"]: r["rms"] for r in recs[0].site_rows}
        for site, h in by_hand.items():
            assert rms[site] == pytest.approx(float(h.pow(2).mean().sqrt()), rel=1e-5)
        depth = [f for f in recs[0].findings
                 if f.kind == "activation_growth" and f.evidence["over"] == "depth"]
        assert rms["6"] / rms["1"] >= 100  # (the norm's output: about 1, the first site's not)
        if with_norm:
            assert rms["3"] / rms["1"] < 100 and not depth
        else:
            assert [f.site for f in depth] == ["6"]


def test_run_health_counts_units_by_hand() -> None:
    rows = [{"units": 10, "units_seen": 10, "dead": 3, "dormant": 5, "lifetime_dead": 1},
            {"units": 30, "units_seen": 30, "dead": 1, "dormant": 2, "lifetime_dead": 2}]
    h = run_health(rows, [])
    assert h == {"dead_fraction": 4 / 40, "dormant_fraction": 7 / 40,
                 "lifetime_dead_fraction": 3 / 40, "health": 1 - 4 / 40}
    bad = run_health(rows, [Finding("nonfinite", "1", "critical", "NaN")])
    assert bad["health"] == 0.0
    assert math.isnan(run_health([], [])["health"])
    # a leaky site's stuck units scoring above tau work (diagnosis.stuck_working): alive in
    # health, where fewer than half its units are stuck; dead in dead_fraction always
    gelu = {"units": 10, "units_seen": 10, "dead": 4, "dormant": 0, "lifetime_dead": 0,
            "leaky": True, "dead_above_tau": 3}
    assert run_health([gelu], []) == {"dead_fraction": 0.4, "dormant_fraction": 0.0,
                                      "lifetime_dead_fraction": 0.0, "health": 1 - 1 / 10}
    assert run_health([{**gelu, "dead": 5}], [])["health"] == 0.5  # (half stuck: all count)
    assert run_health([{**gelu, "leaky": False}], [])["health"] == 0.6  # (a Hardtanh's)


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
    assert state["growth_base"] == state["first_rms"]  # (a site alive at its first log)


def test_growth_is_measured_from_the_first_log_with_most_units_alive() -> None:
    """A site nearly dead at its first log (a U-Net's, RMS 0.007) has an RMS made of its few
    live units: its revival read as a growth of 100x and more, and was advised BatchNorm it
    already had. Growth is measured from its first log with most units alive; a site alive
    at its first log keeps that one (the first test)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(64, 4)
    alive = {k: v.clone() for k, v in net[0].state_dict().items()}
    records: list = []
    with relu_doctor.watch(net, log_every_n_steps=1, every_n_steps=1) as doc:
        doc.add_listener(records.append)
        for i, scale in enumerate((1.0, 1.0, 1000.0)):
            with torch.no_grad():
                if i == 0:  # six of eight units dead, the other two barely firing
                    net[0].weight.mul_(1e-3)
                    net[0].bias.copy_(torch.tensor([-9.0] * 6 + [1e-3] * 2))
                else:
                    net[0].load_state_dict(alive)
            net(scale * x).sum().backward()
            net.zero_grad()
            doc.step()
        state = doc.state_dict()
    with torch.no_grad():
        revived, grown_to = (float(torch.relu(net[0](s * x)).pow(2).mean().sqrt())
                             for s in (1.0, 1000.0))
    row0 = records[0].site_row("1")
    assert row0["dead_fraction"] >= 0.5 and records[1].site_row("1")["dead_fraction"] < 0.5
    # the revival alone would have read as growth from the first log: none is found
    assert records[1].site_row("1")["rms"] >= 100 * row0["rms"] > 0
    assert not [f for r in records[:2] for f in r.findings if f.kind == "activation_growth"]
    assert state["first_rms"]["1"] == pytest.approx(row0["rms"])  # (the collapse's baseline)
    assert state["growth_base"]["1"] == pytest.approx(revived, rel=1e-5)
    grown = [f for f in records[2].findings if f.kind == "activation_growth"]
    assert len(grown) == 1 and grown[0].evidence["first_rms"] == pytest.approx(revived, rel=1e-5)
    assert grown[0].evidence["factor"] == pytest.approx(grown_to / revived, rel=1e-4)
    assert "with most of its units alive" in grown[0].message


def test_a_checkpoint_without_a_growth_base_measures_from_the_first_rms() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(32, 4)
    with relu_doctor.watch(net, log_every_n_steps=1, every_n_steps=1) as first:
        net(x).sum().backward()
        first.step()
        state = first.state_dict()
    old = {k: v for k, v in state.items() if k != "growth_base"}
    records: list = []
    with relu_doctor.watch(net, log_every_n_steps=1, every_n_steps=1) as resumed:
        resumed.load_state_dict(old)
        resumed.add_listener(records.append)
        net(1000 * x).sum().backward()
        resumed.step()
    grown = [f for f in records[-1].findings if f.kind == "activation_growth"]
    assert len(grown) == 1 and grown[0].evidence["first_rms"] == state["first_rms"]["1"]
    assert state["growth_base"] == state["first_rms"]  # (a site alive at its first log)
    assert "alive" not in grown[0].message
