"""Derived metrics and findings: every rate, score and flag in ``doc.to_pandas()``,
``doc.units(site)`` and the logged records against values computed from the reference, and
each kind of finding raised exactly when the reference numbers say it should be."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.advice import REMEDY_NAMES, can_swap
from relu_doctor.diagnosis import MIN_SPIKE_STEPS, DiagnosisConfig, diagnose
from relu_doctor.errors import ReluDoctorError
from relu_doctor.families import family_of
from relu_doctor.metrics import site_metrics, unit_metrics
from relu_doctor.remedies import DormantRecycler
from relu_doctor.remedies._activation_surgery import _check_swappable
from relu_doctor.reports.findings import FindingView, finding_view, recommend
from relu_doctor.reports.interventions import InterventionView, intervention_view
from relu_doctor.stats import FIELDS, ROW
from tests import reference as ref
from tests import zoo

SITE_COLUMNS = {  # to_pandas() column -> reference key
    "activation_rate": "site_activation_rate",
    "sparsity": "sparsity",
    "mean_abs": "site_mean_abs",
    "rms": "site_rms",
    "saturated_fraction": "site_saturated_fraction",
    "grad_zero_fraction": "grad_zero_fraction",
    "grad_rms": "site_grad_rms",
}
UNIT_COLUMNS = ("activation_rate", "mean_abs", "dormant_score", "saturation_rate", "grad_rms",
                "grad_zero_rate")


def expected_metrics(run, key, steps, tau=0.1):
    capture = run.recorder.calls[key]
    unit_dim = ref.expected_unit_dim(capture.outputs[0].dim())
    cap = ref.expected_cap(run.model.get_submodule(key[0]))
    return ref.derived_metrics(ref.expected_stats(capture, unit_dim, cap=cap, steps=steps), tau)


def check_tables(sites, units, run, steps, tau, where):
    """``sites``: one row per site; ``units``: (site, unit) rows; both over ``steps``."""
    sites = sites.set_index("site")
    for key in run.recorder.calls:
        name = run.site_of(key).name
        want = expected_metrics(run, key, steps, tau)
        row = sites.loc[name]
        for column, ref_key in SITE_COLUMNS.items():
            assert row[column] == pytest.approx(want[ref_key], rel=1e-5, abs=1e-9), (where, name, column)
        assert row["dead"] == want["dead"].sum() and row["dormant"] == want["dormant"].sum()
        assert row["below_tau"] == want["below_tau"].sum()
        table = units[units["site"] == name].sort_values("unit")
        assert table["unit"].tolist() == list(range(len(want["dead"])))
        for column in UNIT_COLUMNS:
            np.testing.assert_allclose(table[column].to_numpy(dtype=float), want[column],
                                       rtol=1e-5, atol=1e-9, err_msg=f"{where} {name} {column}")
        np.testing.assert_array_equal(table["dead"].to_numpy(), want["dead"])
        np.testing.assert_array_equal(table["dormant"].to_numpy(), want["dormant"])
        np.testing.assert_array_equal(table["below_tau"].to_numpy(), want["below_tau"])


@pytest.mark.parametrize(
    "name", ["mlp", "small_cnn", "resnetish", "sequence", "inverted_residual", "family_relu6",
             "family_hardtanh", "family_gelu", "family_prelu"],
)
def test_derived_metrics_match_the_reference(run_watched, name):
    tau = 0.3  # high enough that some units are dormant
    run = run_watched(zoo.CASES[name], steps=5, log_every_n_steps=3, tau=tau)
    doc = run.doc
    # The logged window (steps 0-2), as recorded ...
    record = doc.records[0]
    check_tables(pd.DataFrame(record.site_rows), record.unit_table, run, [0, 1, 2], tau,
                 "logged")
    # ... the last, partial window (steps 3-4), logged when the with block ended ...
    final = doc.records[-1]
    assert [r.step for r in doc.records] == [3, 5]
    check_tables(pd.DataFrame(final.site_rows), final.unit_table, run, [3, 4], tau, "final")
    # ... and the same window as to_pandas() and units() read it now.
    units = pd.concat([doc.units(s.name) for s in doc.probe.sites()])
    check_tables(doc.to_pandas(), units, run, [3, 4], tau, "current")


# ---------------------------------------------------------------------- planted conditions


def findings_by(record):
    return {(f.kind, f.site): f for f in record.findings}


def planted_mlp(kill: list[int] | None = None, shrink: list[int] | None = None) -> nn.Module:
    """zoo.mlp with units of the first activation killed (bias -1e3) or shrunk to a thousandth
    of their activity (still active, but dormant)."""
    model = zoo.mlp()
    with torch.no_grad():
        if kill:
            model[0].bias[kill] = -1e3
        if shrink:
            model[0].weight[shrink] *= 1e-3
            model[0].bias[shrink] = 1e-3
    return model


def test_dormant_units_are_exactly_those_with_a_low_score(run_watched):
    shrink = [4, 11, 20]
    run = run_watched(zoo.ARCH_CASES["mlp"], model=planted_mlp(kill=[7], shrink=shrink),
                      batch_size=32, steps=2, log_every_n_steps=2)
    want = expected_metrics(run, ("1", 0), [0, 1])
    assert np.flatnonzero(want["dormant"]).tolist() == shrink  # the plant worked, nothing else
    assert np.flatnonzero(want["below_tau"]).tolist() == sorted([7, *shrink])  # dead too
    finding = findings_by(run.doc.records[-1])[("dormant", "1")]
    assert finding.evidence["dormant_units"] == shrink
    assert finding.evidence["tau"] == 0.1
    dead = findings_by(run.doc.records[-1])[("dead", "1")]
    assert dead.evidence["dead_units"] == [7]  # dead units are reported as dead, not dormant


@pytest.mark.parametrize("family", ["relu6", "hardtanh"])
def test_units_saturated_on_every_input_are_reported(run_watched, family):
    model = zoo.family_model(family)
    with torch.no_grad():
        model[0].bias[[1, 3]] = 1e3
    case = zoo.FAMILY_CASES[family]
    run = run_watched(case, model=model, steps=2, log_every_n_steps=2, batch_size=16)
    want = expected_metrics(run, ("1", 0), [0, 1])
    full = np.flatnonzero(want["saturation_rate"] == 1).tolist()
    assert full == [1, 3]
    finding = findings_by(run.doc.records[-1])[("saturated", "1")]
    assert finding.evidence["saturated_units"] == full
    assert finding.evidence["cap"] == ref.expected_cap(model[1])
    assert finding.severity == "warning"
    assert finding.evidence["saturated_fraction"] == pytest.approx(want["site_saturated_fraction"])


@pytest.mark.parametrize("n_dead", [1, 8, 20])
def test_dead_severity_follows_the_configured_fractions(run_watched, n_dead):
    config = DiagnosisConfig()
    run = run_watched(zoo.ARCH_CASES["mlp"], model=planted_mlp(kill=list(range(n_dead))),
                      batch_size=32, steps=2, log_every_n_steps=2)
    want = expected_metrics(run, ("1", 0), [0, 1])
    frac = want["dead"].sum() / want["dead"].size
    assert want["dead"].sum() == n_dead
    expected = ("critical" if frac >= config.dead_critical
                else "warning" if frac >= config.dead_warning else "info")
    finding = findings_by(run.doc.records[-1])[("dead", "1")]
    assert finding.severity == expected
    assert finding.evidence["dead_fraction"] == pytest.approx(frac)


@pytest.mark.parametrize("n_dead", [0, 31])
def test_too_sparse_exactly_when_sparsity_reaches_the_threshold(run_watched, n_dead):
    run = run_watched(zoo.ARCH_CASES["mlp"], model=planted_mlp(kill=list(range(n_dead))),
                      batch_size=32, steps=2, log_every_n_steps=2)
    found = findings_by(run.doc.records[-1])
    flagged = 0
    for key in run.recorder.calls:
        sparsity = expected_metrics(run, key, [0, 1])["sparsity"]
        site = run.site_of(key).name
        assert (("too_sparse", site) in found) == (sparsity >= DiagnosisConfig().sparsity_max)
        flagged += ("too_sparse", site) in found
    assert flagged == (n_dead > 0)


def test_leaky_units_stuck_negative_are_reported_with_their_family(run_watched):
    model = zoo.family_model("leaky_relu")
    with torch.no_grad():
        model[0].bias[[2, 9]] = -1e3
    run = run_watched(zoo.FAMILY_CASES["leaky_relu"], model=model, steps=2, log_every_n_steps=2)
    finding = findings_by(run.doc.records[-1])[("dead", "1")]
    assert finding.evidence["dead_units"] == [2, 9]
    assert finding.evidence["family"] == "leaky_relu" and finding.evidence["leaky"] is True
    assert "negative regime" in finding.message
    # Stuck negative is not "no gradient": the gradient still reaches those units.
    assert (run.doc.units("1").loc[[2, 9], "grad_rms"] > 0).all()


def test_a_finding_keeps_the_step_it_began(run_watched):
    run = run_watched(zoo.ARCH_CASES["mlp"], model=planted_mlp(kill=[5]), steps=3,
                      log_every_n_steps=1)
    began = [findings_by(r)[("dead", "1")].began for r in run.doc.records]
    assert began == [1, 1, 1]
    assert [r.step for r in run.doc.records] == [1, 2, 3]
    new = [[f for f in r.new_findings if (f.kind, f.site) == ("dead", "1")] for r in run.doc.records]
    assert [len(n) for n in new] == [1, 0, 0]


def test_vanishing_gradient_across_depth_on_a_real_model(run_watched):
    model = zoo.mlp()
    with torch.no_grad():
        model[2].weight *= 1e-4  # gradients reaching the first activation shrink 10^4-fold
    run = run_watched(zoo.ARCH_CASES["mlp"], model=model, steps=2, log_every_n_steps=2, lr=None)
    first = expected_metrics(run, ("1", 0), [0, 1])["site_grad_rms"]
    last = expected_metrics(run, ("3", 0), [0, 1])["site_grad_rms"]
    assert first / last < DiagnosisConfig().vanishing_ratio
    finding = findings_by(run.doc.records[-1])[("vanishing_gradient", "model")]
    assert finding.evidence["ratio"] == pytest.approx(first / last, rel=1e-5)
    assert (finding.evidence["input_side"], finding.evidence["output_side"]) == ("1", "3")


def test_no_gradient_at_any_site_is_a_critical_finding_and_the_report_draws_the_zeros(tmp_path):
    """An output saturated into a clipped loss (Keras' crossentropy clips probabilities)
    gives gradient 0 everywhere: its own finding, and the report's gradient flow draws the
    zeros, where it said no gradient statistic was recorded."""
    import relu_doctor
    from relu_doctor.reports.html import render_report

    torch.manual_seed(0)
    model = zoo.mlp()
    seen: list[float] = []  # the reference: dL/dh at each activation, from tensor hooks
    def tap(module, inputs, out):
        out.register_hook(lambda g: seen.append(float(g.abs().max())))

    for i in (1, 3):
        model[i].register_forward_hook(tap)
    with relu_doctor.watch(model, log_every_n_steps=2, overhead_budget=None,
                           run_dir=tmp_path / "run") as doc:
        for _ in range(2):
            p = torch.softmax(model(torch.randn(8, 10)) * 1e6, -1).clamp(1e-7, 1 - 1e-7)
            (-p[:, 0].log().mean()).backward()
            model.zero_grad()
            doc.step()
    assert len(seen) == 4 and max(seen) == 0.0
    rows = doc.records[-1].site_rows
    assert [r["grad_rms"] for r in rows] == [0.0, 0.0]
    [f] = [f for f in doc.records[-1].findings if f.kind == "vanishing_gradient"]
    assert f.severity == "critical" and f.message.startswith(
        "no gradient reached any activation over the window: gradient RMS is 0 at all 2 site")
    html = render_report(relu_doctor.load_run(tmp_path / "run"))
    section = html[html.index('<section id="rd-gradients">'):]
    section = section[:section.index("</section>")]
    assert "No gradient statistics were recorded" not in section and "<img" in section


# ---------------------------------------------------------------------- pure functions


def synthetic(grad_rms: float, units: int = 4) -> torch.Tensor:
    m = torch.zeros(len(FIELDS), units, dtype=torch.float64)
    m[ROW["elements"]] = 10
    m[ROW["active"]] = 5
    m[ROW["sum"]] = m[ROW["sum_abs"]] = 3
    m[ROW["sum_sq"]] = 2
    m[ROW["grad_elements"]] = m[ROW["grad_in_elements"]] = 10
    m[ROW["grad_sq"]] = 10 * grad_rms**2
    return m


def rows_for(grad_rms: list[float]):
    rows, units = [], {}
    for order, g in enumerate(grad_rms):
        m = synthetic(g)
        u = unit_metrics(m, m, 0.1)
        row = site_metrics(m, u)
        rows.append({"site": f"s{order}", "family": "relu", "leaky": False, "cap": None,
                     "order": order, **row})
        units[f"s{order}"] = u
    return rows, units


@pytest.mark.parametrize(("first", "kind"), [(1e-6, "vanishing_gradient"), (1e5, "exploding_gradient"),
                                             (0.5, None)])
def test_gradient_flow_findings_follow_the_ratio(first, kind):
    rows, units = rows_for([first, 1.0, 1.0])
    assert rows[0]["grad_rms"] == pytest.approx(first)
    found = {f.kind for f in diagnose(rows, units, DiagnosisConfig())}
    assert found & {"vanishing_gradient", "exploding_gradient"} == ({kind} if kind else set())


@pytest.mark.parametrize("first", [0.0, 1e-6])
def test_a_vanishing_gradient_states_the_ratio_or_that_none_arrives(first):
    """A gradient of exactly 0 at the input side is said to fall to zero, not by a made-up
    factor (1e+300x); a small one by its ratio to the output side's."""
    rows, units = rows_for([first, 1.0, 1.0])
    [f] = [f for f in diagnose(rows, units, DiagnosisConfig()) if f.kind == "vanishing_gradient"]
    if first == 0:
        assert f.message == "gradient RMS falls to zero from s2 to s0: no gradient reaches s0."
    else:
        want = 1.0 / rows[0]["grad_rms"]
        assert f.message == f"gradient RMS falls {want:.3g}x from s2 to s0."


@pytest.mark.parametrize(("input_side", "first", "kind"), [
    (4096, 1e-4, None), (4096, 1e-7, "vanishing_gradient"), (4096, 1e7, "exploding_gradient"),
    (1, 1e4, None), (1, 1e-7, "vanishing_gradient"), (1, 1e7, "exploding_gradient"),
], ids=["encoder-pooled", "encoder-falls", "encoder-grows", "generator-upsampled",
        "generator-falls", "generator-grows"])
def test_gradient_flow_findings_need_the_change_per_element_and_per_unit_and_sample(
        input_side, first, kind):
    """A site of 4096 positions a sample (a 64x64 map) against one of 1 (a Dense layer): a
    finding needs the change to pass per element and per unit and sample (the RMS times the
    root of the positions). A CNN's global average pooling divides each position's gradient
    by the positions (a fall of 1e4x per element, 156x per sample: no finding); a
    generator's reads the mirror image (the input side has 1 position a sample). A change
    of 1e7x is one either way, said with both ratios and the positions."""
    rows, units = rows_for([first, 1.0, 1.0])
    positions = {"s0": input_side, "s1": 16, "s2": 4097 - input_side}
    found = diagnose(rows, units, DiagnosisConfig(), positions=positions)
    flow = [f for f in found if f.kind in ("vanishing_gradient", "exploding_gradient")]
    assert [f.kind for f in flow] == ([kind] if kind else [])
    if not kind:
        return
    raw = rows[0]["grad_rms"] / rows[2]["grad_rms"]
    sample = raw * math.sqrt(input_side / (4097 - input_side))
    ev = flow[0].evidence
    assert (ev["element_ratio"], ev["sample_ratio"]) == (pytest.approx(raw), pytest.approx(sample))
    judged = max(raw, sample) if kind == "vanishing_gradient" else min(raw, sample)
    assert ev["ratio"] == pytest.approx(judged)
    assert ev["positions"] == {"s0": input_side, "s2": 4097 - input_side}
    assert ev["input_grad_rms"] == rows[0]["grad_rms"]  # (per element)
    verb = "falls" if kind == "vanishing_gradient" else "grows"

    def by(r: float) -> str:
        return f"{1 / r if r < 1 else r:.3g}x"

    assert flow[0].message == (
        f"gradient RMS {verb} {by(raw)} per element and {by(sample)} per unit and sample "
        f"from s2 to s0 (s0 has {input_side} positions a sample, s2 {4097 - input_side}).")


@pytest.mark.parametrize(("act", "severity"), [(torch.nn.ReLU, "critical"),
                                               (torch.nn.GELU, "warning"),
                                               (torch.nn.SiLU, "warning")])
def test_a_leaky_familys_units_stuck_negative_are_a_warning_at_most(act, severity):
    """Every unit of a layer held below 0: a ReLU's pass no gradient (critical); a GELU's or
    SiLU's stuck negative still pass one and can come back (a warning: two trials read a
    ConvNeXt's and a Wav2Vec2's stuck GELUs as critical, told to lower the rate)."""
    import relu_doctor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), act(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        model[0].bias.fill_(-20.0)
    with relu_doctor.watch(model, log_every_n_steps=1, overhead_budget=None) as doc:
        model(torch.randn(16, 4)).sum().backward()
        doc.step()
    found = {f.kind: f for f in doc.records[-1].findings if f.site == "1"}
    assert found["dead"].evidence["dead_fraction"] == 1.0
    assert (found["dead"].severity, found["lifetime_dead"].severity) == (severity, severity)


@pytest.mark.parametrize(("stuck", "bias"), [(6, -1.0), (6, -30.0), (12, -1.0)])
def test_a_leaky_units_stuck_negative_beside_units_that_fire_are_graded_on_their_score(
        stuck, bias):
    """A U-Net trial: a quarter of a healthy GELU feed-forward's units held at about GELU(-1)
    (outputs a sizable share of the layer's, a gradient passed) made a warning at every log.
    Those scoring above tau, beside units that fire, are said and left out of the grade; at
    GELU(-30) (outputs 0) they are what the warning is for; and where half or more of the
    units are stuck, the score's mean is mostly theirs (an HF trial's GPT-2 MLP, 127 of 128
    units at GELU(-1), scored 1.0 and read info): all count. Counted against this test's
    own hook: never > 0, and mean |h| over the layer's mean of those above tau."""
    import relu_doctor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        model[0].weight[:stuck] *= 0.01
        model[0].bias[:stuck] = bias
    outs = []
    model[1].register_forward_hook(lambda m, a, o: outs.append(o.detach().double()))
    with relu_doctor.watch(model, log_every_n_steps=1, overhead_budget=None) as doc:
        model(torch.randn(32, 4)).sum().backward()
        doc.step()
    h = outs[0]
    dead = (h > 0).sum(0) == 0
    score = h.abs().mean(0) / h.abs().mean(0).mean()
    above = int((dead & (score > doc.config.tau)).sum())
    found = {f.kind: f for f in doc.records[-1].findings if f.site == "1"}
    assert found["dead"].evidence["dead"] == int(dead.sum()) == stuck
    assert found["lifetime_dead"].evidence["lifetime_dead"] == stuck  # (the first log: all)
    excused = above if int(dead.sum()) < 0.5 * len(dead) else 0
    assert above == (stuck if bias == -1.0 else 0)
    grade = "info" if (stuck - excused) / 16 < doc.config.dead_warning else "warning"
    assert grade == ("info" if (stuck, bias) == (6, -1.0) else "warning")
    assert (found["dead"].severity, found["lifetime_dead"].severity) == (grade, grade)
    for kind in ("dead", "lifetime_dead"):  # (each says why it is graded so)
        assert (f"{excused} of them score above tau" in found[kind].message) == bool(excused)
    # ... and health, the pruning and early-stopping signal, counts them alive as the grade
    # does (it read 0.625 for the U-Net-like layer the findings called healthy); the
    # site's dead fraction stays the definition's
    rec = doc.records[-1]
    assert rec.site_row("1")["dead_above_tau"] == above
    assert rec.health["dead_fraction"] == stuck / 16
    assert rec.health["health"] == 1 - (stuck - excused) / 16


def test_a_healthy_cnn_with_global_pooling_reads_no_vanishing_gradient():
    """A Keras trial's healthy CNN (two convs, global average pooling, a Dense ReLU) read a
    vanishing gradient at 64x64 images and larger, 4x more at each doubling of the side: the
    pooling divides each position's gradient by the positions. Judged per unit and sample,
    here at 128x128 where per element the fall passes 1e3x: no finding."""
    import relu_doctor

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    for m in model:
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    with relu_doctor.watch(model, log_every_n_steps=1, overhead_budget=None) as doc:
        x = torch.randn(4, 3, 128, 128)
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
        doc.step()
    rows = {r["site"]: r for r in doc.records[-1].site_rows}
    per_element = rows["1"]["grad_rms"] / rows["7"]["grad_rms"]
    assert per_element < DiagnosisConfig().vanishing_ratio  # (what it was judged on)
    assert [s.positions for s in doc.sites] == [128 * 128, 128 * 128, 1]
    assert not [f for f in doc.records[-1].findings if f.kind == "vanishing_gradient"]


def test_a_vanishing_gradient_behind_a_dead_site_names_the_dead_units_first():
    """A ResNet whose last ReLU was all dead was told to add residual connections and
    BatchNorm, which it had: the gradient vanished at the dead units. Their site comes
    first in the remedy."""
    rows, units = rows_for([1e-6, 1.0, 1.0])
    [f] = [f for f in diagnose(rows, units, DiagnosisConfig()) if f.kind == "vanishing_gradient"]
    assert f.remedy.startswith("ReLU keeps a constant gradient")
    rows[2]["dead_fraction"] = 1.0
    [f] = [f for f in diagnose(rows, units, DiagnosisConfig()) if f.kind == "vanishing_gradient"]
    assert f.remedy.startswith("s2 has every unit dead, so no gradient flows back through its "
                               "units")
    rows[2]["dead_fraction"] = 0.6
    [f] = [f for f in diagnose(rows, units, DiagnosisConfig()) if f.kind == "vanishing_gradient"]
    assert f.remedy.startswith("s2 has 60% of its units dead, and no gradient flows back")
    rows[2]["leaky"] = True  # stuck negative, it still passes its slope's gradient back
    [f] = [f for f in diagnose(rows, units, DiagnosisConfig()) if f.kind == "vanishing_gradient"]
    assert f.remedy.startswith("ReLU keeps a constant gradient")


@pytest.mark.parametrize(("dead", "named"), [
    ({1: 1.0, 2: 0.6}, "s1"),  # the fully dead site stops it, not the last, partly dead one
    ({1: 0.8, 2: 0.6}, "s1"),  # the most dead
    # both fully dead: the one nearest the starved site, the likelier on its path where the
    # order holds parallel branches (a review: another tower's site was named)
    ({1: 1.0, 2: 1.0}, "s1"),
    ({0: 1.0}, None),  # the starved site's own dead units stop no gradient reaching it
    ({1: (1.0, "frozen"), 2: 0.9}, "s1 (frozen)"),  # frozen, it stops it too (a review)
])
def test_a_vanishing_gradient_names_the_dead_site_that_explains_it(dead, named):
    """The most dead site between the starved one and the output side (the one nearest the
    starved site where they tie) is named, not the one nearest the output of those >= 50%
    dead."""
    rows, units = rows_for([0.0, 1.0, 1.0])
    for order, frac in dead.items():
        if isinstance(frac, tuple):
            frac, rows[order]["frozen"] = frac[0], True
        rows[order]["dead_fraction"] = frac
    [f] = [f for f in diagnose(rows, units, DiagnosisConfig()) if f.kind == "vanishing_gradient"]
    assert f.remedy.startswith(f"{named} has " if named else "ReLU keeps a constant"), f.remedy


def _classify_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """One SGD step of ``model`` on a random 8-feature, 3-class batch."""
    loss = nn.functional.cross_entropy(model(torch.randn(32, 8)), torch.randint(0, 3, (32,)))
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_a_vanishing_gradient_names_the_site_its_gradient_stops_at():
    """A trial: Linear->ReLU '1' -> Linear(bias -50)->ReLU '3' (every unit dead) ->
    Linear->ReLU '5' (about half dead) -> Linear, no gradient at '1'. The finding blamed
    '5', which still passes gradient back; '3' stops it. Which site stops it is read from
    the test's own hooks: the ReLU whose output gets a gradient and whose input gets none."""
    import relu_doctor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[2].bias.fill_(-50.0)
        model[4].bias[:9] = -50.0
        model[4].bias[9:] = 1.0
    into: dict[str, list[float]] = {"1": [], "3": [], "5": []}  # |dL/d(output)| summed
    back: dict[str, list[float]] = {k: [] for k in into}  # |dL/d(input)| summed
    active: dict[str, list[torch.Tensor]] = {k: [] for k in into}

    def tap(name):
        def hook(module, inputs, out):
            active[name].append((out > 0).any(0))
            out.register_hook(lambda g: into[name].append(float(g.abs().sum())))
            inputs[0].register_hook(lambda g: back[name].append(float(g.abs().sum())))
        return hook

    for name in into:
        model.get_submodule(name).register_forward_hook(tap(name))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with relu_doctor.watch(model, log_every_n_steps=4, overhead_budget=None) as doc:
        for _ in range(4):
            _classify_step(model, opt)
            doc.step()
    stops = [n for n in into if sum(into[n]) > 0 and sum(back[n]) == 0]
    assert stops == ["3"]  # it gets a gradient and passes none back
    dead = {n: 1.0 - float(torch.stack(a).any(0).double().mean()) for n, a in active.items()}
    assert dead["5"] >= DiagnosisConfig().dead_critical  # (the site named before)
    assert sum(back["5"]) > 0  # yet it passes gradient back
    [f] = [f for f in doc.records[-1].findings if f.kind == "vanishing_gradient"]
    assert f.evidence["input_side"] == "1" and f.evidence["input_grad_rms"] == 0.0
    assert f.remedy.startswith(f"{stops[0]} has every unit dead, so no gradient flows back "
                               "through its units"), f.remedy


@pytest.mark.parametrize("steps, norms, severity", [
    (None, [1.0, 1.1, 0.9, 1.0, 15.0], "critical"),  # (unknown: as before)
    (MIN_SPIKE_STEPS, [1.0, 1.1, 0.9, 1.0, 15.0], "critical"),
    (1, [1.0, 1.1, 0.9, 1.0, 15.0], "warning"),
    (MIN_SPIKE_STEPS - 1, [1.0, 1.1, 0.9, 1.0, 15.0], "warning"),
    (1, [1.0, 1.1, 0.9, 1.0, 14.0, 15.0], "critical"),  # the window before read so too
    (1, [1.0, 1.1, 0.9, 1.0, 2.0, 15.0], "warning"),
])
def test_a_gradient_spike_read_on_few_steps_once_is_a_warning(steps, norms, severity):
    """A DQN's last window, 4 steps right after its target network's sync with 1 of them
    collected, read a critical exploding gradient (12.4x the median) where every step of the
    same window read 6.4x (an RL trial): one step's norm is a transient as often as not. A
    spike on fewer than MIN_SPIKE_STEPS collected steps is a warning that says so, critical
    where the window before spiked too."""
    rows, units = rows_for([1.0, 1.0])
    found = [f for f in diagnose(rows, units, DiagnosisConfig(), param_grad_norms=norms,
                                 grad_norm_steps=steps) if f.kind == "exploding_gradient"]
    assert [f.severity for f in found] == [severity]
    assert ("collected: one window's transient" in found[0].message) == (severity == "warning")
    assert found[0].evidence.get("steps") == steps


def test_a_parameter_gradient_spike_is_an_exploding_gradient():
    rows, units = rows_for([1.0, 1.0])
    config = DiagnosisConfig()
    calm = diagnose(rows, units, config, param_grad_norms=[1.0, 1.1, 0.9, 1.0])
    spike = diagnose(rows, units, config, param_grad_norms=[1.0, 1.1, 0.9, 1.0 * config.spike_factor * 1.5])
    assert "exploding_gradient" not in {f.kind for f in calm}
    assert "exploding_gradient" in {f.kind for f in spike}
    [found] = [f for f in spike if f.kind == "exploding_gradient"]
    assert "and clip the gradients (AutoClip)" in found.remedy
    # where the loop clips already (a trial was told to clip beside gradient_clip_val): said
    clipped = replace(config, loop="lightning", clipped_by="the Trainer's gradient_clip_val=50")
    [found] = [f for f in diagnose(rows, units, clipped, param_grad_norms=[
        1.0, 1.1, 0.9, 1.0 * config.spike_factor * 1.5]) if f.kind == "exploding_gradient"]
    assert "clip the gradients" not in found.remedy and "AdaptiveGradClip" not in found.remedy
    assert "(the gradients are clipped already: the Trainer's gradient_clip_val=50)" in (
        found.remedy)
    with pytest.raises(ReluDoctorError, match="clipped_by: expected a str or None"):
        DiagnosisConfig(clipped_by=50)  # type: ignore[arg-type]


def test_findings_are_sorted_most_severe_first(run_watched):
    run = run_watched(zoo.ARCH_CASES["mlp"], model=planted_mlp(kill=list(range(31))), steps=2,
                      log_every_n_steps=2)
    ranks = {"info": 0, "warning": 1, "critical": 2}
    severities = [ranks[f.severity] for f in run.doc.records[-1].findings]
    assert severities == sorted(severities, reverse=True) and len(set(severities)) > 1


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"tau": 1.0}, "tau"), ({"tau": 0}, "tau"), ({"dead_warning": 0.6}, "dead_warning"),
     ({"sparsity_max": 0.0}, "sparsity_max"), ({"vanishing_ratio": -1.0}, "vanishing_ratio"),
     ({"spike_factor": math.inf}, "spike_factor")],
)
def test_config_validation_names_the_field(kwargs, argument):
    with pytest.raises(ReluDoctorError, match=rf"^{argument}"):
        DiagnosisConfig(**kwargs)


@pytest.mark.parametrize("every", [1, 2])
def test_a_dead_finding_says_how_many_steps_it_rests_on(run_watched, every):
    run = run_watched(zoo.ARCH_CASES["mlp"], model=planted_mlp(kill=[2]), batch_size=16,
                      steps=8, log_every_n_steps=4, every_n_steps=every)
    record = run.doc.records[-1]  # the second window
    (row,) = [r for r in record.site_rows if r["site"] == "1"]
    assert (row["steps_collected"], row["steps_run"]) == (4 // every, 4)
    dead = findings_by(record)[("dead", "1")]
    # a sampled window's silent units are judged each on its own rate (relu_doctor._silence)
    sampled = ("statistics from 2 of the window's 4 steps: a silent unit is dead where a live "
               "one with its past would be so long silent with a chance under 1%")
    assert (sampled in dead.message) == (every == 2), dead.message
    assert (dead.evidence["steps_collected"], dead.evidence["steps_run"]) == (4 // every, 4)
    # "never active since monitoring began" rests on the steps collected since then (both
    # windows), and says so
    lifetime = findings_by(record)[("lifetime_dead", "1")].message
    assert ("(on the steps collected, not every step: 4 of the 8 steps since monitoring "
            "began" in lifetime) == (every == 2), lifetime


def test_a_sampled_dormant_finding_says_its_count_can_read_low() -> None:
    """"A unit is more likely to look dormant on fewer batches" said the opposite of what a
    DQN trial measured: on one batch of 250, its layer read 56 below tau where every step
    read 84 (a rarely firing unit is silent, then inconclusive and not counted, or fires
    above its mean). The sampled dormant finding says its count can read low, and how many
    silent units it left out."""
    from relu_doctor.diagnosis import _sampled

    text = _sampled({"steps_collected": 1, "steps_run": 250, "inconclusive": 3},
                    what="dead or dormant")
    assert "statistics from 1 of the window's 250 steps" in text
    assert "the count can read low (3 silent units not counted)" in text
    assert "more likely" not in text
    assert _sampled({"steps_collected": 250, "steps_run": 250}, what="dead or dormant") == ""


def test_the_steps_since_monitoring_began_survive_a_resume() -> None:
    """The lifetime findings' count of steps collected and run is in the checkpoint: a run
    resumed from it says the steps of both processes, as one run would."""
    import relu_doctor

    model = planted_mlp(kill=[2])
    with relu_doctor.watch(model, log_every_n_steps=4, every_n_steps=2) as doc:
        zoo.train(model, [torch.randn(16, 10) for _ in range(8)], doc=doc)
        state = doc.state_dict()
    assert state["lifetime_steps"] == [4, 8]
    with relu_doctor.watch(model, log_every_n_steps=4, every_n_steps=2) as doc:
        doc.load_state_dict(state)
        zoo.train(model, [torch.randn(16, 10) for _ in range(4)], doc=doc)
    lifetime = findings_by(doc.records[-1])[("lifetime_dead", "1")].message
    assert "6 of the 12 steps since monitoring began" in lifetime, lifetime
    # a checkpoint from before they were saved: unknown, so the window's are said
    old = {k: v for k, v in state.items() if k != "lifetime_steps"}
    with relu_doctor.watch(model, log_every_n_steps=4, every_n_steps=2) as doc:
        doc.load_state_dict(old)
        zoo.train(model, [torch.randn(16, 10) for _ in range(4)], doc=doc)
    lifetime = findings_by(doc.records[-1])[("lifetime_dead", "1")].message
    assert "steps since monitoring began" not in lifetime and "2 of the window's 4" in lifetime


# ---------------------------------------------------------------------- remedy names per loop


def _sick_site(born: bool = True) -> tuple[list[dict], dict]:
    """One site with 2 dead units and 1 dormant unit of 8; the dead units never active
    since monitoring began (``born``), or active before this window."""
    m = synthetic(1.0, units=8)
    m[[ROW["active"], ROW["sum"], ROW["sum_abs"], ROW["sum_sq"]], :2] = 0
    m[ROW["sum_abs"], 2] = 1e-4
    life = m.clone()
    if not born:
        life += synthetic(1.0, units=8)  # (an earlier window where every unit fired)
    u = unit_metrics(m, life, 0.1)
    row = {"site": "s0", "family": "relu", "leaky": False, "cap": None, "order": 0,
           **site_metrics(m, u)}
    return [row], {"s0": u}


_SITE_CONTEXTS = [  # (what diagnose is told of the site beside its numbers)
    {}, {"declined": {"s0": ["dormant_reset"]}}, {"declined": {"s0": ["leaky_relu_swap"]}},
    {"recycling": {"s0": "dormant_reset"}},
    {"recycling": {"s0": "treatment_plan"}}, {"swapping": {"s0": "leaky_relu_swap"}},
    {"swapping": {"s0": "treatment_plan"}}, {"unrecyclable": {"s0": "its input is a sum"}},
    {"lifetime_restarted": True},
]


def _sites_for_texts(fam: str, born: bool, scored: int, tau: float, calls: bool, op: bool):
    """``_sick_site`` as site ``s0`` (or as two calls of module ``s0``, ``s0#0`` and
    ``s0#1``; or a functional call, ``op``) of family ``fam``, ``scored`` of its dead units
    scoring above tau (a leaky unit's negative outputs), diagnosed at ``tau``."""
    rows, units = [], {}
    for name in (["s0#0", "s0#1"] if calls else ["s0"]):
        m = synthetic(1.0, units=8)
        m[[ROW["active"], ROW["sum"], ROW["sum_abs"], ROW["sum_sq"]], :2] = 0
        m[ROW["sum_abs"], :scored] = 100.0  # (not active, yet far from zero)
        m[ROW["sum_abs"], 2] = 1e-4
        life = m.clone() + (0 if born else synthetic(1.0, units=8))
        u = unit_metrics(m, life, tau)
        rows.append({"site": name, "family": fam, "leaky": fam == "leaky_relu",
                     "cap": 6.0 if fam == "relu6" else None, "order": len(rows),
                     "op": "relu" if op else None, **site_metrics(m, u)})
        units[name] = u
    return rows, units


def test_a_sites_remedy_texts_follow_what_changed_log_to_log(monkeypatch):
    """The remedy texts of a site's unit findings are made once and taken again while
    nothing they depend on changes (advice.unit_remedies, cached). Diagnosed in turn, log
    after log, while what the texts depend on changes (the loop, tau, the family and its
    registration, how many dead units score above tau, whether they ever fired, a module's
    several calls, a functional call, what is bound or declined), each log's texts are
    those made with nothing cached. (A review checked the texts against the inline code
    they came from over 7,000 random cases.)"""
    from relu_doctor import advice, diagnosis
    from relu_doctor.families import FAMILIES, register_family

    cached, made = diagnosis.unit_remedies, advice.unit_remedies.__wrapped__
    monkeypatch.setitem(FAMILIES, "mine", FAMILIES["relu"])  # (restored after the test)

    def texts(rows, units, config, ctx, nonneg):
        register_family("mine", (), leaky=False, nonnegative=nonneg)
        return [(f.kind, f.site, f.remedy) for f in diagnose(rows, units, config, **ctx)]

    cases = [(born, loop, fam, ctx, scored, tau, shape)
             for born in (True, False) for loop in REMEDY_NAMES
             for fam, scored in (("relu", 0), ("leaky_relu", 1), ("leaky_relu", 2),
                                 ("relu6", 0), ("mine", 0), ("mine", 1))
             for ctx in _SITE_CONTEXTS for tau in (0.1, 0.025)
             for shape in ("one", "calls", "op")]
    seen = set()
    for i, (born, loop, fam, ctx, scored, tau, shape) in enumerate([*cases, *cases[::-1]]):
        rows, units = _sites_for_texts(fam, born, scored, tau, shape == "calls", shape == "op")
        ctx = {k: ({n: v["s0"] for n in units} if isinstance(v, dict) else
                   set(units) if isinstance(v, set) else v) for k, v in ctx.items()}
        config = DiagnosisConfig(loop=loop, tau=tau)
        nonneg = i % 3 != 0  # (the family 'mine' registered anew, its traits changed)
        got = texts(rows, units, config, ctx, nonneg)
        monkeypatch.setattr(diagnosis, "unit_remedies", made)
        assert got == texts(rows, units, config, ctx, nonneg)
        monkeypatch.setattr(diagnosis, "unit_remedies", cached)
        seen.add(tuple(r for *_, r in got))
    # (what changes changes the texts; tau does no more where the units score above it,
    # which no recycler is told to take now, nor does a score above tau at a family whose
    # dead units output 0, taken whatever their score: 'mine' registered never negative)
    assert len(seen) >= len(cases) // 9


def _names_in(text: str, names: set[str]) -> set[str]:
    return {n for n in names if re.search(rf"(?<![\w=]){re.escape(n)}(?![\w=])", text)}


@pytest.mark.parametrize("loop", list(REMEDY_NAMES))
def test_remedy_texts_name_the_remedies_of_the_users_loop(loop):
    rows, units = _sick_site()
    config = DiagnosisConfig(loop=loop)
    found = diagnose(rows, units, config, param_grad_norms=[1.0, 1.0, 1.0, 100.0])
    assert {"dead", "lifetime_dead", "dormant", "exploding_gradient"} <= {f.kind for f in found}
    text = " ".join(f.remedy for f in found)
    own = {n for k, n in REMEDY_NAMES[loop].items() if n and k != "plan"}  # (named when bound)
    others = {n for names in REMEDY_NAMES.values() for n in names.values() if n} - own - {
        REMEDY_NAMES[loop]["plan"]}
    assert _names_in(text, own) == own  # every remedy it has is named...
    assert not _names_in(text, others)  # ...and none of another loop's
    if REMEDY_NAMES[loop]["recycle"] is None:
        assert "not offered" in text


def test_each_loop_offers_the_remedies_its_texts_name():
    import inspect

    import relu_doctor.callbacks as callbacks
    import relu_doctor.remedies as remedies

    for key, name in REMEDY_NAMES["watch"].items():
        assert hasattr(remedies, str(name)), key
    for key, name in REMEDY_NAMES["lightning"].items():
        assert hasattr(callbacks, str(name)), key
        assert callbacks.ReluDoctor().config.loop == "lightning"
    for loop, module in (("keras", "keras"), ("hf", "hf")):
        pytest.importorskip("keras" if loop == "keras" else "transformers")
        cls = __import__(f"relu_doctor.integrations.{module}", fromlist=["x"]).ReluDoctorCallback
        params = inspect.signature(cls).parameters
        for key, name in REMEDY_NAMES[loop].items():
            if name is not None:
                assert name.removesuffix("=True") in params, (loop, key)
        assert cls().config.loop == loop
    with pytest.raises(ReluDoctorError, match="loop: expected one of"):
        DiagnosisConfig(loop="jax")


def test_a_findings_dict_is_asdicts_and_changing_it_changes_no_finding():
    """Finding.to_dict gives what dataclasses.asdict gives, and its evidence (lists and
    dicts included) is the dict's own."""
    import dataclasses

    from relu_doctor.diagnosis import Finding

    f = Finding("dead", "net.1", "warning", "3 of 8 units dead.",
                {"dead_units": [1, 4, 6], "nested": {"a": 1}, "frac": 0.375}, "Swap.", 7, 5)
    d = f.to_dict()
    assert d == dataclasses.asdict(f)
    d["evidence"]["dead_units"].append(99)
    d["evidence"]["nested"]["a"] = 2
    d["evidence"]["frac"] = 0.0
    assert f.evidence == {"dead_units": [1, 4, 6], "nested": {"a": 1}, "frac": 0.375}
    shared = f.to_dict(copy=False)  # to write out: the same dict, its evidence the finding's
    assert shared == dataclasses.asdict(f) and shared["evidence"] is f.evidence


def test_a_finding_since_a_step_is_dataclasses_replace():
    """Finding.since(b) is replace(f, began=b), field for field (every field set to a value
    of its own, so that one left out or swapped shows)."""
    import dataclasses

    from relu_doctor.diagnosis import Finding

    f = Finding("dead", "net.1", "warning", "3 of 8 units dead.", {"dead": 3}, "Swap.", 7, 5)
    assert len({repr(getattr(f, x.name)) for x in dataclasses.fields(f)}) == len(
        dataclasses.fields(f))
    g = f.since(2)
    assert g == dataclasses.replace(f, began=2) and g.began == 2 and f.began == 5


def test_findings_markdown_of_findings_is_that_of_their_dicts():
    """The TensorBoard findings table takes Finding objects as it takes their dicts."""
    from relu_doctor.diagnosis import Finding
    from relu_doctor.reports.tensorboard import findings_markdown

    fs = [Finding("dead", "net.1", "critical", "7 of 8 | dead.\nsee", {"dead": 7}, "Swap.", 3),
          Finding("dormant", "net.3", "info", "1 of 8 dormant.", {}, "", 3)]
    text = findings_markdown(fs)
    assert text == findings_markdown([f.to_dict() for f in fs])
    assert text.count("\n") == 3 and "7 of 8 \\| dead. see" in text


def test_json_text_is_the_cleaned_json_of_any_value():
    """history.json_text equals json.dumps(clean_json(...)) on JSON-safe values and on
    those the C encoder refuses (NaN, Inf, tensors, numpy scalars, other objects)."""
    import json

    from relu_doctor.history import clean_json, json_text

    for value in ({"a": [1, 2.5, None, True], "b": "x"}, {"a": float("nan")},
                  [float("inf"), torch.tensor(3.0), np.float32(0.5), np.int64(4)],
                  {"p": ReluDoctorError("e")}):
        assert json_text(value) == json.dumps(clean_json(value))
        json.loads(json_text(value), parse_constant=pytest.fail)  # strict JSON: no NaN


# ------------------------------------------------------------- the swap only where it acts

_FAMILY_MODULES = {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "hardtanh": nn.Hardtanh(),
                   "gelu": nn.GELU(), "leaky_relu": nn.LeakyReLU()}


@pytest.mark.parametrize("family", list(_FAMILY_MODULES))
def test_the_leaky_relu_swap_is_advised_only_where_the_swap_acts(family):
    """A dead, too sparse ReLU6 site was told to add ``leaky_relu_swap=True``, which then
    left that very site alone (a cap): the advice and the report follow the swap's own rule
    (checked against the swap's refusal of the module), and name the other remedies."""
    module = _FAMILY_MODULES[family]
    fam = family_of(module)
    assert fam is not None
    try:
        _check_swappable(module, "act")
        acts = True
    except ReluDoctorError:
        acts = False
    assert acts == (family == "relu")  # the swap's own rule
    rows, units = _sick_site()
    rows[0].update(family=family, leaky=fam.leaky, cap=fam.cap_of(module))
    assert can_swap(family, fam.leaky, fam.cap_of(module)) == acts
    found = diagnose(rows, units, DiagnosisConfig(loop="hf", sparsity_max=0.05))
    assert {"dead", "lifetime_dead", "too_sparse"} <= {f.kind for f in found}
    dead = next(f for f in found if f.kind == "dead")
    if acts:
        assert "leaky_relu_swap=True" in dead.remedy
    else:  # neither the swap nor LeakyReLU in other words; what does apply instead
        assert not [f for f in found if "leaky_relu_swap" in f.remedy
                    or "Use LeakyReLU" in f.remedy or "swap to LeakyReLU" in f.remedy]
        assert "learning rate" in dead.remedy and "recycle" in dead.remedy
    # The report's next step, after two learning-rate cuts at this site.
    view = FindingView(kind="dead", kind_label="dead", site="s0", severity="warning",
                       message=dead.message, remedy=dead.remedy, step=4, began=4,
                       unit_label="unit", units_named=[], units_text="", evidence=[])
    cut = InterventionView(step=2, after_step=4, site="s0", remedy="lr_rescue",
                           what="lr x0.5", changes=[])
    text = recommend(view, fam.leaky, [cut, replace(cut, step=3)], REMEDY_NAMES["hf"],
                     swappable=acts)
    assert ("leaky_relu_swap=True" in text) == acts
    assert "already lowered 2 times" in text


@pytest.mark.parametrize(("optimizer", "reset_adam_step"),
                         [("Adam", False), ("Adam", True), ("AdamW", False), ("SGD", False),
                          ("RAdam", False), ("NAdam", False)])
def test_recycling_that_did_not_help_under_adam_is_advised_the_step_restart(optimizer,
                                                                            reset_adam_step):
    """A recycling judged "did not help" was advised "stop recycling here". Under Adam
    without ``reset_adam_step`` the recycled units' first updates are about 3x the learning
    rate, which killed them again in an RL trial (the option kept them alive): the advice
    now names it there, and only there (not after SGD's recycling, nor after one that
    restarted the step). The events are a recycler's own, as its run records them."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = getattr(torch.optim, optimizer)(net.parameters(), lr=0.01)
    net(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()
    recycler = DormantRecycler(net, optimizers=opt, example_inputs=torch.randn(2, 4),
                               reset_adam_step=reset_adam_step)
    ev = recycler.recycle("1", units=[0, 3], step=5).to_dict()
    view = intervention_view({**ev, "verdict": "did not help", "target": "below_tau_fraction",
                              "after": {"below_tau_fraction": 0.5}})
    rows, units = _sick_site()
    dead = finding_view(next(f for f in diagnose(rows, units, DiagnosisConfig())
                             if f.kind == "dead"))
    text = recommend(dead, False, [view])
    assert "stop recycling here" in text
    said = "reset_adam_step=True" in text
    # (RAdam and NAdam keep the same moments, but reset_adam_step refuses them: a review)
    assert said == (optimizer in ("Adam", "AdamW") and not reset_adam_step), text


def test_a_site_fed_by_a_frozen_layer_is_told_so_as_information():
    """A frozen backbone's dead units were warned of (critical where most were dead) with
    advice no one can follow there: a lower learning rate, a swap, recycling. Its unit
    findings are information now, naming the frozen layer, with the one thing that changes
    them; the report's rewrite of a remedy (after interventions elsewhere) keeps it; the
    same site not frozen is diagnosed as before."""
    rows, units = _sick_site()
    plain = {f.kind: f for f in diagnose(rows, units, DiagnosisConfig())}
    rows[0]["frozen"] = "backbone.0"
    found = {f.kind: f for f in diagnose(rows, units, DiagnosisConfig())}
    assert set(found) == set(plain)
    assert {"dead", "lifetime_dead"} <= set(found)
    for kind in set(found) & {"dead", "lifetime_dead", "dormant", "too_sparse"}:
        f, p = found[kind], plain[kind]
        assert p.severity in ("warning", "critical") and f.severity == "info"
        assert f.message.startswith(p.message.rstrip("."))
        assert "'backbone.0', does not train" in f.message
        assert f.evidence["frozen_layer"] == "backbone.0"
        assert f.remedy.startswith("Nothing to do while it stays frozen")
        assert "learning rate" not in f.remedy.split(":")[0]
    view = finding_view(found["dead"])
    cut = InterventionView(step=2, after_step=4, site="model", remedy="lr_rescue",
                           what="lr x0.5", changes=[])
    assert recommend(view, False, [cut]) == found["dead"].remedy
    assert recommend(finding_view(plain["dead"]), False, [cut]) != plain["dead"].remedy


def test_within_a_severity_the_cause_and_the_largest_share_come_first():
    """Findings of one severity were ordered by kind name, then site name as text: site
    '3' (15 of 16 dead) came after '11' and '13', and a vanishing gradient (the cause)
    after the dead sites it explains. Now model-wide findings come first, then each kind
    by its share of units, largest first, then the site in natural order."""
    rows, units = [], {}
    dead_of = {"11": 11, "13": 10, "3": 15, "5": 10}  # '5' ties '13': natural order
    for order, (site, n_dead) in enumerate(dead_of.items()):
        m = synthetic(1e-7 if order == 0 else 1.0, units=16)
        m[[ROW["active"], ROW["sum"], ROW["sum_abs"], ROW["sum_sq"]], :n_dead] = 0
        u = unit_metrics(m, m, 0.1)
        rows.append({"site": site, "family": "relu", "leaky": False, "cap": None,
                     "order": order, **site_metrics(m, u)})
        units[site] = u
    found = diagnose(rows, units, DiagnosisConfig())
    critical = [(f.kind, f.site) for f in found if f.severity == "critical"]
    warnings_ = [(f.kind, f.site) for f in found if f.severity == "warning"]
    shares = {site: n / 16 for site, n in dead_of.items()}
    want_dead = sorted(dead_of, key=lambda s: (-shares[s], int(s)))
    assert want_dead == ["3", "11", "5", "13"]
    assert warnings_[0] == ("vanishing_gradient", "model")  # before the too-sparse sites
    assert [s for k, s in critical if k == "dead"] == want_dead
    kinds = [k for k, _ in critical]
    assert kinds.index("dead") < kinds.index("lifetime_dead")


@pytest.mark.parametrize(("update", "said"), [
    ({"cap": 3.0}, "No LeakyReLU swap here: relu capped at 3 cannot become a LeakyReLU "
                   "without changing its outputs."),
    # (the library case: a trial's nn.TransformerEncoderLayer, whose F.relu the user
    # cannot edit, and DistilBert's inline nn.ReLU()(x))
    ({"op": "relu"}, "No LeakyReLU swap here: this is a functional call, and the swap "
                     "replaces activation modules. In your own code, call F.leaky_relu there "
                     "or make it an nn.ReLU module; in a library's layer, pass a leaky "
                     "activation where the layer takes one (nn.TransformerEncoderLayer's "
                     "activation=, a Hugging Face config's hidden_act)."),
], ids=["capped", "functional"])
@pytest.mark.parametrize("born", [True, False], ids=["dead-since-start", "died"])
def test_a_capped_or_functional_relu_is_told_why_the_swap_is_not_advised(update, said, born):
    """A ReLU with a cap (Keras' ReLU(max_value=3)) read "relu cannot become a LeakyReLU",
    wrong as written; a functional F.relu was advised the swap, which replaces modules only.
    Why the swap is not advised is a sentence of its own: a GNN trial read it in brackets
    after "the layer that feeds it", as if it said something of that layer."""
    rows, units = _sick_site(born)
    rows[0].update(update)
    assert not can_swap("relu", False, rows[0]["cap"], rows[0].get("op"))
    [dead] = [f for f in diagnose(rows, units, DiagnosisConfig()) if f.kind == "dead"]
    assert dead.remedy.endswith(said) and "ActivationSwapper" not in dead.remedy
    sentences = re.split(r"(?<=[.)])\s+(?=[A-Z(])", dead.remedy)
    [feeding] = [s for s in sentences if "the layer that feeds it" in s]
    assert not re.search(r"swap|LeakyReLU|functional|cannot become", feeding), feeding
    assert any(s.startswith("No LeakyReLU swap here: ") for s in sentences)


@pytest.mark.parametrize("feed", ["bias", "groupnorm"])
def test_units_dead_since_the_start_are_sent_to_the_initialisation_not_the_learning_rate(
        tmp_path, feed):
    """A trial's layer dead from its initialisation (a bias of -50), at SGD's lr 1e-4, was
    told "Lower the learning rate" first, and the report's "What to do first" said it too:
    no learning rate revives units that never fired. Units dead since monitoring began
    (read from the test's own hooks, every step since the first) are sent to the layer
    that feeds them first, behind a GroupNorm's bias too; units that fired before and died
    in the window are still told to lower the learning rate first."""
    import relu_doctor
    from relu_doctor.reports.text import summary

    torch.manual_seed(0)
    norm = [nn.GroupNorm(4, 16)] if feed == "groupnorm" else []
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), *norm, nn.ReLU(),
                          nn.Linear(16, 3))
    born = str(len(model) - 2)  # the second ReLU
    with torch.no_grad():
        model[len(model) - 3].bias[:8] = -50.0  # half its units dead from initialisation
    fired: dict[str, list[torch.Tensor]] = {"1": [], born: []}  # per step, units active
    for name in fired:
        model.get_submodule(name).register_forward_hook(
            lambda m, i, out, name=name: fired[name].append((out > 0).any(0)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    with relu_doctor.watch(model, log_every_n_steps=3, overhead_budget=None, optimizer=opt,
                           run_dir=tmp_path / "run") as doc:
        for step in range(6):
            if step == 3:  # units of '1' that fired in the first window die in the second
                with torch.no_grad():
                    model[0].bias[:4] = -50.0
            _classify_step(model, opt)
            doc.step()
    found = findings_by(doc.records[-1])
    for name, steps in fired.items():
        dead = ~torch.stack(steps[3:]).any(0)  # the second window's dead units
        since_start = ~torch.stack(steps).any(0)
        assert dead.any()
        f = found[("dead", name)]
        assert f.evidence["dead_units"] == torch.nonzero(dead).flatten().tolist()
        from_start = bool(since_start[dead].all())
        assert from_start == (name == born)  # (the plants worked)
        assert f.remedy.startswith("Check the initialisation and bias of the layer that feeds "
                                   "it: these units have not fired since monitoring began"
                                   ) == from_start, f.remedy
        assert f.remedy.startswith("Lower the learning rate") != from_start, f.remedy
        if from_start:  # (what can revive them in this run, after it)
            assert "In this run, " in f.remedy and "ActivationSwapper" in f.remedy
            assert ("recycle them (ReDo: DormantRecycler)" in f.remedy) == (feed == "bias")
    worst = doc.records[-1].findings[0]  # (most severe first: what the summary says first)
    assert (worst.kind, worst.site, worst.severity) == ("dead", born, "critical")
    text = summary(relu_doctor.load_run(tmp_path / "run"))
    assert f"What to do first ({born}): Check the initialisation and bias of the layer" in text


@pytest.mark.parametrize("update", [{}, {"op": "relu"}, {"cap": 3.0},
                                    {"family": "leaky_relu", "leaky": True}],
                         ids=["relu", "functional", "capped", "leaky"])
@pytest.mark.parametrize("born", [True, False], ids=["dead-since-start", "died"])
def test_every_dead_finding_leads_with_the_feeding_layer_where_its_units_never_fired(
        update, born):
    """The same rule for every kind of site (the swap advised or not, a leaky family's
    units stuck negative): dead units none of which fired since monitoring began are sent
    to what feeds them first; dead units that fired before, to the learning rate."""
    rows, units = _sick_site(born)
    rows[0].update(update)
    assert (units["s0"]["dead"] & ~units["s0"]["lifetime_dead"]).any() != born
    [dead] = [f for f in diagnose(rows, units, DiagnosisConfig()) if f.kind == "dead"]
    assert dead.remedy.startswith("Lower the learning rate") != born, dead.remedy
    assert dead.remedy.startswith("Check the ") == born, dead.remedy
    assert ("recycle them (ReDo: DormantRecycler)" in dead.remedy) == born  # (revives them)


@pytest.mark.parametrize("declined", ["dormant_reset", "leaky_relu_swap"])
def test_a_remedy_that_left_a_site_alone_is_advised_there_no_more(declined):
    """Once a remedy declined a site (ReDo at a residual sum, the swap at a shared module),
    the findings there no longer advise it, and say that it left the site alone."""
    rows, units = _sick_site()
    found = diagnose(rows, units, DiagnosisConfig(), declined={"s0": {declined}})
    named = {"dormant_reset": "DormantRecycler", "leaky_relu_swap": "ActivationSwapper"}[declined]
    others = diagnose(rows, units, DiagnosisConfig())
    assert any(named in f.remedy for f in others)  # advised before it declined
    assert not [f for f in found if named in f.remedy]
    said = {"dormant_reset": "(dormant_reset left this site alone: see its warning.)",
            "leaky_relu_swap": "The LeakyReLU swap left this site alone."}[declined]
    assert any(said in f.remedy for f in found)


def test_a_site_whose_input_is_a_residual_sum_is_not_advised_recycling():
    """A trial's Hugging Face ResNet: every block's post-residual ReLU, where most dead units
    were, was advised ReDo recycling, which refuses such a site (its input a sum). Known from
    the forward pass, before any recycling is tried: not advised, the reason said, and held
    in the evidence for the report."""
    from relu_doctor.reports.findings import finding_view, recommend

    rows, units = _sick_site()
    why = "its input is a sum with another branch"
    found = diagnose(rows, units, DiagnosisConfig(), unrecyclable={"s0": why})
    others = diagnose(rows, units, DiagnosisConfig())
    assert any("DormantRecycler" in f.remedy for f in others)  # advised where it can act
    unit = [f for f in found if f.kind in ("dead", "lifetime_dead", "dormant")]
    assert {f.kind for f in unit} == {"dead", "lifetime_dead", "dormant"}
    before = {f.kind: f.remedy for f in others}
    for f in unit:
        assert "DormantRecycler" not in f.remedy and f.evidence["not_recyclable"] == why
        # where recycling was advised, the reason it is not now (a dead plain ReLU is
        # advised the swap, not recycling, either way)
        assert (f"Recycling cannot treat this site: {why}." in f.remedy) == (
            "DormantRecycler" in before[f.kind]), f.kind
    # the report's advice after a first remedy was tried there keeps it out too
    dead = finding_view(next(f for f in unit if f.kind == "dead"))
    text = recommend(dead, False, [], declined={"leaky_relu_swap": "shared"})
    assert "recycle the units" not in text and f"Recycling cannot treat this site: {why}." in text
    plain = finding_view(next(f for f in others if f.kind == "dead"))
    assert "recycle the units" in recommend(plain, False, [], declined={"leaky_relu_swap": "x"})
    # ReDo refused it too: its refusal says why, once, without the advice to its configurer
    # (a trial's report said it twice, the first ending "Exclude this site.")
    refusal = f"site 's0': {why}. Exclude this site."
    text = recommend(dead, False, [], declined={"dormant_reset": refusal})
    assert f"dormant_reset left this site alone: site 's0': {why}. " in text
    assert "Recycling cannot treat" not in text and "Exclude this site" not in text


def test_a_loop_without_recycling_is_advised_what_it_can_do_for_dormant_units():
    """A Keras trial's dormant finding advised only "Recycle dormant units (ReDo, ..., not
    offered for Keras layers)": nothing its user could do. Where the loop offers no
    recycling, its findings advise what it has, and say that ReDo is not offered."""
    rows, units = _sick_site()
    found = {f.kind: f.remedy for f in diagnose(rows, units, DiagnosisConfig(loop="keras"))}
    assert found["dormant"].startswith("Lower the learning rate, or check the normalisation")
    for kind in ("dormant", "lifetime_dead"):
        assert "Recycle" not in found[kind] and "recycle them" not in found[kind], kind
        assert found[kind].endswith("(ReDo recycling is not offered for Keras layers.)"), kind
    torch_loop = {f.kind: f.remedy for f in diagnose(rows, units, DiagnosisConfig())}
    assert torch_loop["dormant"].startswith("Recycle dormant units")


def test_a_site_a_bound_recycler_acts_at_is_not_advised_another():
    """With Continual Backprop bound and replacing units, the continual-learning trial's
    dormant findings still advised "Recycle dormant units (ReDo: DormantRecycler)". A site
    a bound recycler may act at is told so, and advised no other; the others as before."""
    import relu_doctor
    from relu_doctor.remedies import ContinualBackprop

    rows, units = _sick_site()
    found = {f.kind: f.remedy for f in diagnose(rows, units, DiagnosisConfig(),
                                                recycling={"s0": "continual_backprop"})}
    assert "DormantRecycler" not in found["dead"]  # (a ReLU's: the swap, then the rest)
    for kind in ("lifetime_dead", "dormant"):
        assert "DormantRecycler" not in found[kind], kind
        assert found[kind].endswith("(continual_backprop is bound to recycle this site's "
                                    "units: see its interventions.)"), kind
    # through a Doctor: the remedy bound, its include naming the sites it may act at
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # dead units at both sites (the second takes their zeros)
        model[2].bias[:4] = -100.0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with relu_doctor.watch(model, log_every_n_steps=2, overhead_budget=None) as doc:
        ContinualBackprop(model, optimizers=opt, include=["1"]).bind(doc)
        for _ in range(2):
            model(torch.randn(32, 4)).sum().backward()
            opt.step()
            doc.step()
    advice = {(f.kind, f.site): f.remedy for f in doc.findings()}
    assert "continual_backprop is bound" in advice["lifetime_dead", "1"]
    assert "DormantRecycler" not in advice["lifetime_dead", "1"]
    assert "DormantRecycler" in advice["lifetime_dead", "3"]


def test_the_swap_advised_at_a_module_called_several_times_says_it_changes_every_call():
    """A module run twice in a pass is two sites (act#0, act#1); the swap advised at one
    replaces the module, so it changes the other call too, which only the swap's own
    warning said. A module called once, or a functional call, is not told so."""
    rows, units = _sick_site()
    base = rows[0]
    rows = [{**base, "site": name} for name in ("act#0", "act#1", "act#2", "fc:relu#0", "b")]
    rows[3]["op"] = "relu"
    found = diagnose(rows, {r["site"]: units["s0"] for r in rows}, DiagnosisConfig())
    said = {(f.kind, f.site): f.remedy for f in found}
    assert said["dead", "act#1"].endswith(
        "A swap replaces the module 'act', so it changes its other calls too (act#0, act#2).")
    assert said["lifetime_dead", "act#0"].endswith("(act#1, act#2).")
    for site in ("fc:relu#0", "b"):
        assert "A swap replaces" not in said["dead", site], site


def test_a_later_call_run_on_fewer_passes_is_not_said_to_be_a_branch_only():
    """A site that ran in some passes only is a branch taken sometimes where it is its
    activation's first call; a later call (call_index > 0) is one a loop of varying length
    reaches only when it is long, and is said so."""
    rows, units = _sick_site()
    rows = [{**rows[0], "site": name} for name in ("act#0", "act#3")]
    found = diagnose(rows, {r["site"]: units["s0"] for r in rows}, DiagnosisConfig(),
                     site_passes={"act#0": (4, 10), "act#3": (4, 10)}, call_index={"act#3": 3})
    said = {(f.kind, f.site): f.message for f in found}
    for kind in ("dead", "dormant"):
        assert "passes through its module (a branch taken sometimes), " in said[kind, "act#0"]
        assert ("passes through its module (call #3 of an activation called a varying number "
                "of times per pass, as by a loop of varying length or a branch taken "
                "sometimes), ") in said[kind, "act#3"]


def test_units_of_a_leaky_family_never_active_are_not_called_wasted():
    """A GELU unit never positive still passes gradient: the HF text trial read "Units that
    never fired are wasted capacity" of units whose gradient RMS was like the live ones'."""
    rows, units = _sick_site()
    gelu = [{**rows[0], "family": "gelu", "leaky": True}]
    said = {f.kind: f.remedy for f in diagnose(gelu, units, DiagnosisConfig())}
    assert said["lifetime_dead"].startswith("Units stuck negative since monitoring began "
                                            "still pass a small gradient")
    relu = {f.kind: f.remedy for f in diagnose(rows, units, DiagnosisConfig())}
    assert relu["lifetime_dead"].startswith("Units that never fired are wasted capacity")


@pytest.mark.parametrize("family", ["elu", "leaky_relu", "elu_mixed"])
def test_a_leaky_familys_dead_units_are_recycled_and_advised_only_below_tau(family):
    """A unit of a leaky family stuck negative keeps a ReDo score of its negative outputs:
    ELU's, near -1, score above tau, and recycling them would take those outputs from the
    network (a GNN trial: outputs moved by 10-13), so no recycler takes them, with its own
    ``tau`` or without, and the advice says recycling for none of them; a LeakyReLU's, near
    -0.01, score below tau and are recycled and advised. Checked against what a bound
    recycler does with each setting."""
    import relu_doctor
    from relu_doctor.remedies import DormantRecycler
    from tests.remedies.helpers import events_of

    stuck = [2, 9]

    def run(tau=None, recycle=False, loop="watch"):
        torch.manual_seed(0)
        model = zoo.family_model(family.removesuffix("_mixed"))
        with torch.no_grad():  # constant inputs to the stuck units, never active: ELU's
            model[0].weight[stuck] = 0.0  # output -1, LeakyReLU's (slope 0.1) -0.01
            model[0].bias[stuck] = -50.0 if family == "elu" else -0.1
            if family == "elu_mixed":  # one of each: -1 (above tau) and -0.001 (below)
                model[0].bias[stuck] = torch.tensor([-50.0, -0.001])
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        x = torch.randn(64, 6)
        with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=8, overhead_budget=None,
                               config=DiagnosisConfig(loop=loop)) as doc:
            doc.seen = events_of(doc)
            if recycle:
                DormantRecycler(model, optimizers=opt, tau=tau).bind(doc)
            for _ in range(8):
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
                doc.step()
        return doc

    doc = run()
    dead = findings_by(doc.records[-1])[("dead", "1")]
    assert dead.evidence["dead_units"] == stuck
    below = {"elu": [], "leaky_relu": stuck, "elu_mixed": [9]}[family]  # (scoring under tau)
    for tau in (None, 0.1):
        bound = run(tau, recycle=True)
        said = findings_by(bound.records[-1])[("dead", "1")].remedy
        above = len(stuck) - len(below)
        assert (f"takes only the units scoring at most tau, and {above} of these score above "
                "it" in said) == bool(above)
        events = [e for e in bound.seen if e.get("remedy") == "dormant_reset"]
        recycled = {u for e in events if e["site"] == "1" for u in e["details"]["units"]}
        assert recycled & set(stuck) == set(below), tau
    assert ("recycle" in dead.remedy) == bool(below)
    assert ("(ReDo: DormantRecycler" in dead.remedy) == bool(below)
    assert ("scoring at most tau (ReDo: DormantRecycler): 1 of them score above it, and "
            "recycling those would take their negative outputs" in dead.remedy) == (
        family == "elu_mixed")


@pytest.mark.parametrize("scale", [1e-9, 1.0], ids=["collapsed", "default-init"])
def test_a_signal_gone_with_depth_is_said_first_and_sent_to_the_initialisation(scale):
    """A collapsed model (a collapsed EfficientNet: mean |h| from 5e-3 at the stem to 1e-20
    three blocks on) was reported as dead units first, advised a lower learning rate and
    recycling: the dead counts were the signs of values near 0. A site whose RMS fell
    collapse_factor (1e6) times below the shallowest site's is a critical finding of its own,
    ranked before them, that sends the user to the initialisation; its numbers are those of
    the test's own hooks. A default-initialised MLP has none."""
    import relu_doctor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    with torch.no_grad():
        model[2].weight.mul_(scale)
        model[2].bias.mul_(scale)
    outs: dict[str, list[torch.Tensor]] = {"1": [], "3": [], "5": []}
    for name in outs:
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: outs[name].append(o.detach().double()))
    x = torch.randn(64, 8)
    with relu_doctor.watch(model, log_every_n_steps=2, overhead_budget=None) as doc:
        for _ in range(4):
            model(x).square().mean().backward()
            doc.step()
    # at the first log too, where a one-log run (scan) reads it (a review: it waited for the
    # second, and the first log sent a collapsed model to the learning rate and recycling)
    first = [f for f in doc.records[0].findings if f.kind == "activation_collapse"]
    assert bool(first) == (scale != 1.0) and (not first or doc.records[0].findings[0] is first[0])
    found = doc.records[-1].findings
    collapse = [f for f in found if f.kind == "activation_collapse"]
    rms = {k: float(torch.cat(v[-2:]).square().mean().sqrt()) for k, v in outs.items()}  # (the last window's)
    if scale == 1.0:
        assert not collapse and max(rms.values()) / min(rms.values()) < 1e3
        return
    (f,) = collapse
    low = min(("3", "5"), key=rms.get)
    assert f.site == low and f.severity == "critical"
    assert math.isclose(f.evidence["rms"], rms[low], rel_tol=1e-4)
    assert math.isclose(f.evidence["shallow_rms"], rms["1"], rel_tol=1e-4)
    assert f.evidence["factor"] >= 1e6 and "check_init" in f.remedy
    assert found[0] is f  # before every dead finding of the collapsed sites
    assert any(g.kind == "dead" for g in found)


@pytest.mark.parametrize("case", ["all-dead", "trained-into", "from-the-start", "unknown",
                                  "revived"])
def test_activation_collapse_is_the_initialisations_only(case):
    """A CNN at a high learning rate whose site went 100% dead (RMS 0) was told "activation
    RMS falls infx" and to check its initialisation first (report trial): its first logs had
    it alive. The collapse finding is for a signal near 0, not 0 (the dead finding's), that
    the first logs showed too."""
    rows, units = _sick_site()
    deep = {**rows[0], "site": "s1", "order": 1}
    rms0 = float(rows[0]["rms"])
    deep["rms"] = 0.0 if case == "all-dead" else rms0 * 1e-9
    # (no first RMS known; or all dead at its first log (RMS 0), and a sliver revived since)
    first = ({} if case == "unknown" else
             {"s0": rms0, "s1": rms0 * {"from-the-start": 1e-9, "revived": 0.0}.get(case, 0.8)})
    found = diagnose([rows[0], deep], {**units, "s1": units["s0"]}, DiagnosisConfig(),
                     first_rms=first)
    collapse = [f for f in found if f.kind == "activation_collapse"]
    assert bool(collapse) == (case == "from-the-start")
    assert all(math.isfinite(f.evidence["factor"]) and "inf" not in f.message for f in collapse)


@pytest.mark.parametrize("bound", [None, "1", "3", "plan"],
                         ids=["unbound", "bound-here", "bound-elsewhere", "a-plans-step"])
def test_a_bound_swap_that_has_not_acted_is_said_not_advised(bound):
    """An ActivationSwapper bound to the run (threshold 0.5), at a site exactly 50% dead,
    never acted, and the finding advised the swap by its name (a report trial: "they forgot
    the swapper"). Where a bound swap acts, the text says it swaps past its threshold."""
    import relu_doctor
    from relu_doctor.remedies import ActivationSwapper

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # half of site "1" dead
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=4, overhead_budget=None) as doc:
        if bound == "plan":  # (its steps bound without listening: the plan decides)
            from relu_doctor.remedies import TreatmentPlan

            TreatmentPlan(model, optimizer=opt).bind(doc)
        elif bound is not None:
            ActivationSwapper(model, threshold=0.5, include=[bound], optimizer=opt).bind(doc)
        for _ in range(4):
            model(torch.randn(16, 6)).square().mean().backward()
            opt.step()
            doc.step()
    found = findings_by(doc.records[-1])
    dead, life = found[("dead", "1")].remedy, found[("lifetime_dead", "1")].remedy
    here = bound in ("1", "plan")
    assert ("the LeakyReLU swap bound here (ActivationSwapper) swaps this site" in dead) == (
        bound == "1")
    assert ("the treatment plan bound here (TreatmentPlan) swaps this site once its dead "
            "fraction passes its swap step's threshold" in dead) == (bound == "plan")
    assert ("swap ReLU for LeakyReLU" in dead) == (not here)
    assert ("bound here: it swaps past its threshold" in life) == (bound == "1")
    assert ("TreatmentPlan, bound here, swaps past its swap step's threshold" in life) == (
        bound == "plan")
    assert isinstance(model[1], nn.ReLU)  # it did not act (50% is not past 0.5)


def test_a_plans_continual_backprop_step_is_said_by_its_own_name():
    """A plan's continual_backprop step acts by its own rule, not past the recycle step's
    threshold: its sites were told the plan recycles "once its dead fraction stays past its
    recycle step's threshold" (a review)."""
    import relu_doctor
    from relu_doctor.remedies import PlanStep, TreatmentPlan

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        net[0].bias[:12] = -100.0  # 12 of 32 units dead at the first site
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with relu_doctor.watch(net, log_every_n_steps=5, optimizer=opt, overhead_budget=None) as doc:
        TreatmentPlan(net, optimizer=opt, steps=[PlanStep("continual_backprop")]).bind(doc)
        for _ in range(5):
            net(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
    texts = " ".join(f.remedy for f in doc.records[-1].findings if f.site == "1")
    assert "(continual_backprop is bound to recycle this site's units" in texts, texts
    assert "recycle step" not in texts and "treatment plan bound here" not in texts.lower()


@pytest.mark.parametrize("dead", [False, True], ids=["dormant-only", "dead"])
def test_a_plans_recycle_step_is_said_where_and_when_it_acts(dead):
    """A bound TreatmentPlan holds a recycler acting at every site, but only once a site's
    dead fraction passes its step's threshold: its dormant-only sites were told "dormant_reset
    is bound to recycle this site's units", which never happened (a review). The plan is
    named, with what sets it off."""
    import relu_doctor
    from relu_doctor.remedies import TreatmentPlan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        model[0].weight[:6] *= 1e-4  # 6 of 16 units dormant, alive
        model[0].bias[:6] = -100.0 if dead else 1e-4
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(64, 6)
    with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=4, overhead_budget=None) as doc:
        TreatmentPlan(model, optimizer=opt, steps=["recycle"]).bind(doc)
        for _ in range(4):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
    found = findings_by(doc.records[-1])
    assert ("dead", "1") in found or not dead
    text = found[("lifetime_dead" if dead else "dormant", "1")].remedy  # (dead: the swap's)
    assert "is bound to recycle" not in text
    assert ("The treatment plan bound here (TreatmentPlan) recycles this site's dead and "
            "dormant units once its dead fraction stays past" in text) == dead
    assert ("recycles a site's units once its dead fraction passes its recycle step's "
            "threshold, not for dormant units alone" in text) == (not dead)


@pytest.mark.parametrize("verdict", ["helped", "did not help", ""])
def test_a_recycling_that_helped_stays_among_the_next_steps(verdict):
    """A site recycled 3 times, each "helped", was advised "Already tried: dormant_reset.
    Next: lower the learning rate further..." with recycling left out (a report trial):
    the remedy that worked is named as one to go on with; one that did not help, to stop."""
    view = _recycling_view("SGD", verdict)
    text = recommend(_dormant_view(), False, [view])
    assert ("go on recycling where units go quiet again (dormant_reset helped here)"
            in text) == (verdict == "helped"), text  # (not one not judged yet: review)
    assert ("stop recycling here" in text) == (verdict == "did not help"), text


def _recycling_view(optimizer: str, verdict: str, remedy: str = "dormant_reset"):
    """The view of a recycling of 2 units (DormantRecycler's own event) under
    ``optimizer``, judged ``verdict`` and named ``remedy``."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = getattr(torch.optim, optimizer)(net.parameters(), lr=0.01)
    net(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()
    recycler = DormantRecycler(net, optimizers=opt, example_inputs=torch.randn(2, 4))
    ev = recycler.recycle("1", units=[0, 3], step=5).to_dict()
    return intervention_view({**ev, "remedy": remedy, "verdict": verdict,
                              "target": "below_tau_fraction",
                              "after": {"below_tau_fraction": 0.1}})


def _dormant_view():
    rows, units = _sick_site()
    return finding_view(next(f for f in diagnose(rows, units, DiagnosisConfig())
                             if f.kind == "dormant"))


@pytest.mark.parametrize("remedy", ["dormant_reset", "continual_backprop"])
@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
@pytest.mark.parametrize(("judged", "rose", "stop"), [
    ("h", "1", True), ("hh", "11", True), ("hhh", "110", True), ("hhh", "100", False),
    ("hhh-", "001", False), ("hn", "10", True), ("hh-", "00", False),
], ids=["one rose", "both rose", "2 of 3 rose", "1 of 3 rose", "1 of 3, one unjudged",
        "one rose, one did not help", "none rose"])
def test_recyclings_the_training_loss_rose_after_are_not_gone_on_with(judged, rose, stop,
                                                                      optimizer, remedy):
    """A trial's recyclings under Adam, each judged "helped" on its units, each raised the
    training loss 1.5-3x (LOSS_ROSE), and the report advised "go on recycling";
    reset_adam_step=True kept the loss down. Where the loss rose after at least half of
    the judged recyclings (or one did not help), the advice is to stop, saying after how
    many of the judged ones it rose ("the recycling" for the only one; an unjudged one, not
    compared, is not counted), and under Adam without reset_adam_step to restart the step,
    "jolt the loss" only where such a recycling raised it. Where it rose after fewer, the
    recycling that helped is gone on with, the rise said beside it."""
    views = []
    for verdict, up in zip(judged, [*rose, "0"], strict=False):
        v = _recycling_view(optimizer, {"h": "helped", "n": "did not help", "-": ""}[verdict],
                            remedy)
        v.loss_rose = 3.1 if up == "1" else 0.0
        views.append(v)
    text = recommend(_dormant_view(), False, views)
    n_judged, n_rose = sum(c != "-" for c in judged), rose.count("1")
    assert ("stop recycling here" in text) == stop, text
    assert (f"go on recycling where units go quiet again ({remedy} helped here"
            in text) == (not stop), text
    after = "the recycling" if n_judged == 1 else f"{n_rose} of the {n_judged} judged recyclings"
    assert (f"the training loss rose 1.5x or more after {after}" in text) == (n_rose > 0), text
    assert ("the recycled units went quiet again" in text) == ("n" in judged), text
    assert ("reset_adam_step=True" in text) == (stop and optimizer == "Adam"), text
    assert ("and jolt the loss" in text) == (stop and optimizer == "Adam" and n_rose > 0), text
    # another remedy's loss rise (a swap's, here) is not said as a recycling's
    swap = replace(views[0], remedy="leaky_relu_swap", loss_rose=3.1)
    text = recommend(_dormant_view(), False, [replace(v, loss_rose=0.0) for v in views] + [swap])
    assert "the training loss rose" not in text, text


@pytest.mark.parametrize("refused", [False, True], ids=["bound", "bound-but-refused"])
def test_a_bound_recycler_says_it_leaves_units_above_tau_only_where_it_acts(refused):
    """Where a recycler is bound and the dead units score above tau (stuck far negative),
    the text says it leaves them, their outputs being what recycling would take away;
    where it left the site alone (a gated input it cannot link), that is said instead
    (review: a reason given at a site it had refused)."""
    rows, units = _sick_site()
    rows = [{**rows[0], "family": "leaky_relu", "leaky": True}]
    u = {k: v.clone() for k, v in units["s0"].items()}
    u["below_tau"][:2] = False  # the two dead units score above tau (stuck far negative)
    found = diagnose(rows, {"s0": u}, DiagnosisConfig(loop="hf"),
                     recycling={"s0": "dormant_reset"},
                     declined={"s0": ["dormant_reset"]} if refused else None)
    dead = next(f for f in found if f.kind == "dead").remedy
    assert ("takes only the units scoring at most tau, and 2 of these score above it: "
            "recycling them would take their negative outputs from the network" in dead
            ) == (not refused), dead
    assert ("dormant_reset left this site alone" in dead) == refused, dead


@pytest.mark.parametrize("family", ["hardtanh", "relu"])
def test_a_bound_recycler_or_plan_is_said_to_take_what_it_takes(family):
    """A Hardtanh's dead units output -1 and score above tau: no recycler takes them. Its
    dead finding said "dormant_reset is bound to recycle this site's units", and a plan's
    "recycles this site's dead and dormant units" (a review), where its lifetime finding
    said the recycler leaves them. Both say what is taken now; a ReLU's, whose dead units
    output 0, are taken whatever their score, and none is said to score above tau."""
    rows, units = _sick_site()
    rows = [{**rows[0], "family": family, "leaky": False}]
    u = {k: v.clone() for k, v in units["s0"].items()}
    # the two dead units not below tau: a Hardtanh's stuck at -1; a ReLU's, as a sampled
    # window's silent units read (a review: told of negative outputs they do not have)
    u["below_tau"][:2] = False
    for recycling, said in (
            ("dormant_reset", "The recycler bound here takes only the units scoring at most "
                              "tau, and 2 of these score above it"),
            ("treatment_plan", "The treatment plan bound here recycles only the units scoring "
                               "at most tau, and 2 of these score above it")):
        found = diagnose(rows, {"s0": u}, DiagnosisConfig(), recycling={"s0": recycling})
        texts = {f.kind: f.remedy for f in found}
        for kind in ("dead", "lifetime_dead"):
            assert (said in texts[kind]) == (family == "hardtanh"), (kind, texts[kind])
    plan = diagnose(rows, units, DiagnosisConfig(), recycling={"s0": "treatment_plan"})
    dead = next(f for f in plan if f.kind == "dead").remedy
    assert ("recycles this site's dead and dormant units once" in dead) == (family == "relu")
    assert ("recycles this site's units scoring at most tau, dead or dormant, once" in dead
            ) == (family == "hardtanh")


def test_units_dead_in_counts_that_restarted_are_not_said_to_have_never_fired(tmp_path):
    """A run continued with resume=True and no checkpoint starts its lifetime counts again
    (meta's lifetime_since): units that fired, then died before it, read as dead since
    monitoring began, and were told they never fired and that no learning rate would
    revive them (a review). The advice leads with the learning rate there, as in the run
    that watched them die."""
    import relu_doctor

    torch.manual_seed(0)
    lin = nn.Linear(8, 16)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    fired = torch.zeros(16, dtype=torch.bool)

    def seen(m, a, out):
        fired.__ior__((out > 0).flatten(0, -2).any(0))

    model[1].register_forward_hook(seen)

    def train(doc, n, kill_at=None):
        for i in range(n):
            if i == kill_at:
                with torch.no_grad():
                    lin.bias[:8] = -50.0  # (as a too-high learning rate's step would)
            model(torch.randn(32, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relu_doctor.watch(model, log_every_n_steps=5, optimizer=opt,
                               run_dir=tmp_path / "run") as doc:
            train(doc, 15, kill_at=7)
        assert fired[:8].all()  # the test's own hooks: they fired before they died
        with relu_doctor.watch(model, log_every_n_steps=5, optimizer=opt,
                               run_dir=tmp_path / "run", resume=True) as doc:
            train(doc, 5)
    (dead,) = [f for f in doc.findings() if f.kind == "dead"]
    assert dead.evidence["never_fired"] is False
    assert dead.remedy.startswith("Lower the learning rate"), dead.remedy
    assert relu_doctor.load_run(tmp_path / "run").meta["lifetime_since"] == 16


@pytest.mark.parametrize("leaky", [False, True])
def test_the_reports_advice_for_units_that_never_fired_leads_with_the_feeding_layer(leaky):
    """The report rewrites a dead finding's advice for a leaky site, or where a remedy was
    tried: it led with "lower the learning rate" (after a cut, "lower it further") where
    the diagnosis said no learning rate revives units that never fired (a review). Its
    evidence's never_fired (the diagnosis's own reading of its unit rows) says so."""
    from relu_doctor.reports.findings import recommend

    rows, units = _sick_site()
    if leaky:
        rows[0].update(family="leaky_relu", leaky=True)
    for name in units:  # every dead unit dead since the start
        units[name]["lifetime_dead"] = units[name]["dead"].clone()
    found = diagnose(rows, units, DiagnosisConfig())
    dead = next(f for f in found if f.kind == "dead")
    assert dead.evidence["never_fired"] is True and "lifetime_dead" in {f.kind for f in found}
    view = finding_view(dead)
    if leaky:  # nothing tried: the diagnosis's words, which lead with the layer already
        assert recommend(view, True, []) == dead.remedy
    cut = InterventionView(step=2, after_step=4, site="s0", remedy="lr_rescue",
                           what="lr x0.5", changes=[])
    text = recommend(view, leaky, [cut])
    assert text.split("Next: ")[-1].startswith("check the initialisation and bias"), text
    assert "lower the learning rate" not in text


@pytest.mark.parametrize("leaky", [False, True])
def test_the_advice_for_dead_units_behind_a_batchnorm_names_its_shift_not_the_convs_bias(
        leaky: bool) -> None:
    """A U-Net's Conv-BN-ReLU units, dead from the BatchNorm's shift, were told to check the
    bias of a conv made with ``bias=False`` and, too sparse, to add the BatchNorm they had.
    Behind a norm the advice names the norm (its shift against its scale), in the diagnosis
    and in the report's rewrite after a remedy was tried; a conv feeding its activation
    directly keeps the layer's bias."""
    torch.manual_seed(0)
    act = (lambda: nn.LeakyReLU(0.01)) if leaky else nn.ReLU
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), act(),
                        nn.Conv2d(8, 8, 3), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 2))
    with torch.no_grad():
        net[1].bias[:7] = -20.0  # (the BatchNorm's shift: 7 of 8 channels never positive,
        net[1].bias[7] = -1.5  # the eighth seldom: too sparse)
        net[3].bias[:7] = -50.0
    x = torch.randn(16, 3, 10, 10)
    with relu_doctor.watch(net, log_every_n_steps=1, every_n_steps=1) as doc:
        net(x).sum().backward()
        doc.step()
    with torch.no_grad():  # the reference: which units never fired, from the model itself
        h1 = act()(net[1](net[0](x)))
        h2 = act()(net[3](h1))
    found = {(f.kind, f.site): f for f in doc.findings()}
    assert found[("dead", "2")].evidence["dead"] == int(((h1 > 0).sum((0, 2, 3)) == 0).sum()) == 7
    assert found[("dead", "4")].evidence["dead"] == int(((h2 > 0).sum((0, 2, 3)) == 0).sum())
    behind_bn, direct = found[("dead", "2")], found[("dead", "4")]
    assert behind_bn.evidence["norm"] == "BatchNorm2d `1`" and "norm" not in direct.evidence
    assert "shift (bias) and scale (weight) of the BatchNorm2d `1`" in behind_bn.remedy
    assert "bias of the layer that feeds" not in behind_bn.remedy
    assert "bias of the layer that feeds" in direct.remedy and "BatchNorm" not in direct.remedy
    assert found[("too_sparse", "2")].evidence["sparsity"] == pytest.approx(
        float((h1 <= 0).double().mean()))
    sparse = found[("too_sparse", "2")].remedy
    assert "add BatchNorm" not in sparse and "BatchNorm2d `1`" in sparse
    cut = InterventionView(step=1, after_step=1, site="2", remedy="lr_rescue",
                           what="lr x0.5", changes=[])
    text = recommend(finding_view(behind_bn), leaky, [cut])
    assert "BatchNorm2d `1`" in text and "bias of the layer" not in text
    assert "Next: first check the shift (bias) and scale (weight) of the BatchNorm2d `1` " \
           "before it, which decide whether a unit fires: these units have not fired" in text
    assert "where there is none" not in text
    assert "bias of the layer" in recommend(finding_view(direct), leaky, [cut])


def test_the_reports_advice_for_dead_gelu_units_scoring_above_tau_recycles_none_of_them(
) -> None:
    """A trial's dead GELU units (stuck negative: their outputs count in the ReDo score)
    were advised ``dormant_reset=True`` by the report, which recycled 3 dormant units and
    left the 52 dead ones. The dead finding's evidence carries how many of its units score
    above tau (checked against the test's own hook's scores); recycling them would take
    their outputs from the network (a GNN trial), so the report advises recycling only for
    those below tau, and none where all score above it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))
    outs: list[torch.Tensor] = []
    net[1].register_forward_hook(lambda m, a, out: outs.append(out.detach().clone()))
    with relu_doctor.watch(net, log_every_n_steps=2, every_n_steps=1) as doc:
        for step in range(4):
            if step == 2:  # six units die mid-run, stuck near GELU(-1)
                with torch.no_grad():
                    net[0].weight[:6].mul_(0.01)
                    net[0].bias[:6] = -1.0
            net(torch.randn(32, 8)).sum().backward()
            doc.step()
    h = torch.cat(outs[2:])  # the reference: the last window's outputs
    dead = (h > 0).sum(0) == 0
    score = h.abs().mean(0) / h.abs().mean()
    above = int((dead & (score > DiagnosisConfig().tau)).sum())
    f = next(f for f in doc.findings() if f.kind == "dead")
    assert int(dead.sum()) == 6 and above > 0 and not f.evidence["never_fired"]
    assert f.evidence["above_tau"] == [above, 6]
    view = finding_view(f)
    assert view.above_tau == (above, 6) and "above tau" not in dict(view.evidence)
    for loop in ("hf", "watch"):
        text = recommend(view, True, [], REMEDY_NAMES[loop])
        recycler = str(REMEDY_NAMES[loop]["recycle"])
        if above == 6:
            assert "recycle" not in text and recycler not in text, text
        else:
            assert (f"recycle those of the units scoring at most tau (ReDo: {recycler}): "
                    f"{above} of them score above it") in text, text
    plain = replace(view, above_tau=(0, 0))
    assert "recycle the units (dormant_reset=True)" in recommend(plain, True, [],
                                                                 REMEDY_NAMES["hf"])


def test_health_counts_every_site_frozen_ones_included():
    """A fine-tuning trial: counted over the sites that train, health fell when a backbone
    was unfrozen (its dead units joining), with no unit changed, and EarlyStopping and
    ModelCheckpoint on it kept the frozen phase's model. It counts every site, so the
    number compares across the unfreezing."""
    from relu_doctor.diagnosis import Finding, run_health

    def rows(frozen: bool) -> list[dict]:
        return [{"site": "backbone.1", "units": 8, "units_seen": 8, "dead": 2, "dormant": 0,
                 "lifetime_dead": 2, "frozen": "backbone.0" if frozen else None},
                {"site": "head.1", "units": 4, "units_seen": 4, "dead": 1, "dormant": 0,
                 "lifetime_dead": 0, "frozen": None}]

    assert run_health(rows(True), [])["health"] == run_health(rows(False), [])["health"] == 0.75
    nan = Finding("nonfinite", "backbone.1", "critical", "NaN", {}, "", 10)
    assert run_health(rows(True), [nan])["health"] == 0.0
