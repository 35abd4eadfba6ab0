"""Mixed precision: statistics accumulate in float32/float64 whatever the activation dtype,
agree with the float32 run, and fp16 overflow is counted (nonfinite), never a crash."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import relu_doctor
from tests import zoo
from tests.reference import Recorder, expected_stats, site_names
from tests.reference_functional import assert_matches, site_fields


def _steps(net: nn.Module, xs: list[torch.Tensor], dtype: torch.dtype | None) -> None:
    for x in xs:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = net(x)
        out.float().pow(2).mean().backward()


def _watched(net: nn.Module, xs: list[torch.Tensor], dtype: torch.dtype | None, **kw) -> relu_doctor.Doctor:
    with relu_doctor.watch(net, log_every_n_steps=100, **kw) as doc:
        _steps(net, xs, dtype)
    return doc


def test_bf16_autocast_accumulates_exactly() -> None:
    # Big enough that a bf16 sum would be visibly wrong (bf16 holds 8 significant bits: a
    # running sum stops growing past 256 ones); the site must equal a float64 count of the
    # very bf16 activations the model produced.
    torch.manual_seed(0)
    net = zoo.SmallCNN()
    xs = [torch.randn(32, 3, 8, 8) for _ in range(2)]
    twin = copy.deepcopy(net)
    rec = Recorder(twin)
    _steps(twin, xs, torch.bfloat16)
    rec.remove()
    assert rec.calls[("features.2", 0)].outputs[0].dtype == torch.bfloat16
    doc = _watched(net, xs, torch.bfloat16)
    for s in doc.sites:
        assert s.stats.window.dtype == torch.float64
    for (path, idx), name in site_names(rec).items():
        site = doc.probe.site(name)
        assert_matches(site, expected_stats(rec.calls[(path, idx)], site.unit_dim), rtol=1e-4)
        assert site_fields(site)["elements"][0] == 2 * 32 * (64 if path == "features.2" else 16)


@pytest.mark.parametrize("functional", [False, True], ids=["modules", "functional"])
def test_bf16_statistics_match_float32(functional) -> None:
    torch.manual_seed(0)
    net = zoo.MixedActivations() if functional else zoo.SmallCNN()
    shape = (64, 6) if functional else (16, 3, 8, 8)
    xs = [torch.randn(shape) for _ in range(2)]
    runs = {}
    for dtype in (None, torch.bfloat16):
        doc = _watched(copy.deepcopy(net), xs, dtype, functional=functional)
        runs[dtype] = {s.name: site_fields(s) for s in doc.sites}
    f32, bf16 = runs[None], runs[torch.bfloat16]
    assert f32.keys() == bf16.keys() and len(f32) >= 2
    for name in f32:
        a, b = f32[name], bf16[name]
        assert (a["elements"] == b["elements"]).all()
        assert (a["grad_elements"] == b["grad_elements"]).all()
        # Rounding moves a few values across 0 and the sums by ~2^-8 relative.
        np.testing.assert_allclose(b["active"], a["active"], rtol=0.05, atol=2, err_msg=name)
        for f in ("sum", "sum_abs", "sum_sq"):
            np.testing.assert_allclose(b[f], a[f], rtol=0.05, atol=0.05 * a[f].max(), err_msg=f"{name} {f}")
        np.testing.assert_allclose(b["grad_sq"], a["grad_sq"], rtol=0.1, atol=0.1 * a["grad_sq"].max(), err_msg=name)
        assert b["nonfinite"].sum() == 0 and b["grad_nonfinite"].sum() == 0


def test_fp16_overflow_is_counted_not_a_crash() -> None:
    torch.manual_seed(0)
    net = zoo.mlp(d_in=4, hidden=8)
    with torch.no_grad():
        net[0].weight[:4].mul_(1e4)  # units 0-3 overflow fp16 (max 65504) on large inputs
    x = torch.randn(16, 4) * 10
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        with torch.autocast("cpu", dtype=torch.float16):
            out = net(x)
        assert not torch.isfinite(out).all()
        out.float().sum().backward()  # gradients turn NaN through the overflowed units
        rec = doc.step()
    assert rec is not None
    first = rec.site_row("1")
    assert first["nonfinite"] >= 1
    units = rec.unit_table[rec.unit_table["site"] == "1"]
    per_unit = site_fields(doc.probe.site("1"), "lifetime")
    bad = per_unit["nonfinite"] > 0
    assert bad[:4].any() and not bad[4:].any()  # only the overflowed units are flagged
    # Their other statistics leave the step out; the finite units are counted as usual.
    assert (per_unit["elements"][bad] == 0).all() and (per_unit["elements"][~bad] == 16).all()
    assert np.isfinite(units["activation_rate"].to_numpy()[~bad]).all()
    assert any(f.kind == "nonfinite" for f in rec.findings)


def test_fp16_model_in_half_precision() -> None:
    # The whole model in float16 (no autocast): rows are reduced in float32, stored in float64.
    torch.manual_seed(0)
    net = zoo.mlp(d_in=4, hidden=8).half()
    xs = [torch.randn(300, 4).half() for _ in range(2)]
    twin = copy.deepcopy(net)
    rec = Recorder(twin)
    for x in xs:
        twin(x).float().pow(2).mean().backward()
    rec.remove()
    with relu_doctor.watch(net) as doc:
        for x in xs:
            net(x).float().pow(2).mean().backward()
    for (path, idx), name in site_names(rec).items():
        site = doc.probe.site(name)
        assert_matches(site, expected_stats(rec.calls[(path, idx)], site.unit_dim), rtol=1e-3)


def _runs_under_scales(net, xs, scales, loss_of, **watch):  # type: ignore[no-untyped-def]
    """One run of a copy of ``net`` per loss scale in ``scales`` (None: no scaler), each
    over the batches ``xs`` at a learning rate of 0; their (Doctor, scaler) pairs."""
    out = []
    for scale in scales:
        model = copy.deepcopy(net)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        with relu_doctor.watch(model, grad_scaler=scaler, **watch) as doc:
            for x in xs:
                loss = loss_of(model, x)
                (scaler.scale(loss) if scaler else loss).backward()
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                opt.zero_grad()
                doc.step()
        out.append((doc, scaler))
    return out


def test_grad_scaler_scale_is_divided_out() -> None:
    torch.manual_seed(0)
    net = zoo.mlp()
    xs = [torch.randn(32, 10) for _ in range(2)]

    def loss_of(model, x):  # type: ignore[no-untyped-def]
        with torch.autocast("cpu", dtype=torch.float16):
            return model(x).float().pow(2).mean()

    runs = _runs_under_scales(net, xs, (None, 2.0**12), loss_of, log_every_n_steps=100)
    results = [{s.name: site_fields(s)["grad_sq"] for s in doc.sites} for doc, _ in runs]
    for name in results[0]:
        np.testing.assert_allclose(results[1][name], results[0][name], rtol=1e-2, atol=1e-9)


def test_a_loss_scale_grown_past_float32s_squares_leaves_the_gradients_read_right() -> None:
    """A GradScaler left on in a float32 (or bfloat16) run doubles its scale every 2000 clean
    steps with no ceiling: at 2**70 the scaled gradients' squares overflowed float32, so a
    healthy run read "non-finite" gradients (two critical findings, a plan switching
    clipping on, then stopping training as hopeless) and a wrong gradient RMS. The scale is
    now divided out in part before squaring: the statistics equal an unscaled run's."""
    torch.manual_seed(0)
    net = zoo.mlp()
    xs = [torch.randn(64, 10) for _ in range(2)]
    runs = _runs_under_scales(
        net, xs, (None, 2.0**70),
        lambda model, x: model(x).pow(2).sum() * 10.0,  # (gradients of about 0.3 RMS)
        log_every_n_steps=len(xs), overhead_budget=None,
    )
    results = []
    for doc, scaler in runs:
        assert scaler is None or scaler.get_scale() == 2.0**70  # (no step skipped)
        assert not [f for f in doc.findings() if f.kind == "nonfinite"]
        results.append({s.name: site_fields(s) for s in doc.sites})
    for name, plain in results[0].items():
        assert results[1][name]["grad_nonfinite"].sum() == 0
        np.testing.assert_allclose(results[1][name]["grad_sq"], plain["grad_sq"], rtol=1e-5)


def _scaled_steps(doc, net, opt, scaler, steps, overflow, micro=1):  # type: ignore[no-untyped-def]
    """Train ``steps`` steps of ``micro`` micro-batches each, the loss overflowing at the
    steps in ``overflow``; with ``scaler`` None the same steps are skipped by hand."""
    rec = None
    for step in steps:
        for _ in range(micro):
            loss = net(torch.randn(8, 4)).pow(2).mean() * (1e38 if step in overflow else 1.0)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        elif step not in overflow:  # nothing tells the Doctor why
            opt.step()
        opt.zero_grad()
        rec = doc.step()
    return rec


@pytest.mark.parametrize(
    ("scaled", "overflow", "micro", "every"),
    [(True, {1, 3}, 1, 1), (False, {1, 3}, 1, 1), (True, {0}, 1, 1), (True, {2}, 2, 1),
     (True, {0}, 1, 4), (True, {0, 1, 2}, 1, 1)],
    ids=["scaler", "no_scaler", "first_step", "accumulated", "sampled", "most_skipped"],
)
def test_gradients_that_overflow_on_steps_the_loss_scaler_skips_are_no_critical_finding(
    scaled: bool, overflow: set[int], micro: int, every: int
) -> None:
    """fp16 loss scaling overflows now and then while it calibrates its scale (most at the
    first steps); the scaler skips those steps' updates. Their non-finite activation
    gradients were a critical 'NaN/Inf seen' finding on most fp16 runs. Steps whose scale the
    scaler lowered are counted (on the device; the first step against the scale it starts
    from), and where it skipped some collected steps, not most, one model-wide info finding
    says so instead, which no remedy acts on and which leaves health alone; without a
    scaler, the same gradients stay critical."""
    torch.manual_seed(0)
    net = zoo.mlp(d_in=4, hidden=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
    with relu_doctor.watch(net, log_every_n_steps=4, every_n_steps=every,
                           grad_scaler=scaler) as doc:
        rec = _scaled_steps(doc, net, opt, scaler, range(4), overflow, micro)
    assert rec is not None
    row = rec.site_row("1")
    assert row["nonfinite"] == 0 and row["grad_nonfinite"] > 0
    critical = [f for f in rec.findings if f.kind == "nonfinite"]
    said = [f for f in rec.findings if f.kind == "loss_scale_overflow"]
    from relu_doctor.integrations._common import health_scalars
    from relu_doctor.remedies import LRRescuer

    acted = LRRescuer(torch.optim.SGD(net.parameters(), lr=0.01), triggers=("nonfinite",),
                      cooldown=0).decide(rec)
    assert bool(acted) is (not scaled or len(overflow) > 2)
    if not scaled or len(overflow) > 2:  # (a scaler skipping most steps: not calibration)
        assert critical and not said and health_scalars(rec)["relu_doctor/health"] == 0.0
        return
    assert not critical and len(said) == 1 and said[0].severity == "info"
    assert said[0].evidence["scaler_skipped"] == len(overflow)
    assert f"skipped {len(overflow)} of the 4 steps run" in said[0].message
    assert health_scalars(rec)["relu_doctor/health"] > 0
    assert scaler is not None and scaler.get_scale() == 2.0**10 / 2 ** len(overflow)


@pytest.mark.parametrize("when", ["inside_the_block", "after_its_final_log"])
def test_the_loss_scalers_skips_of_an_open_window_survive_a_resume(when: str) -> None:
    """A checkpoint taken inside a window (or after the block's final log, whose windows go
    on) carries its skipped steps with its sums: a resumed run's log reads the window whole,
    its overflow still the scaler's. The resumed scaler is restored after the Doctor
    attached (as Lightning restores it): its first step is compared with the scale it
    starts from then, not with its constructor's."""
    torch.manual_seed(0)
    net = zoo.mlp(d_in=4, hidden=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    kw = {"log_every_n_steps": 4, "overhead_budget": None}
    with relu_doctor.watch(net, grad_scaler=scaler, **kw) as doc:
        _scaled_steps(doc, net, opt, scaler, range(2), {1})
        if when == "inside_the_block":
            state = doc.state_dict()
    if when == "after_its_final_log":
        state = doc.state_dict()
    scaler_state = scaler.state_dict()
    scaler = torch.amp.GradScaler("cpu")  # (2**16 until its state is loaded)
    doc = relu_doctor.Doctor(net, grad_scaler=scaler, **kw)
    doc.load_state_dict(state)
    with doc:
        scaler.load_state_dict(scaler_state)
        rec = _scaled_steps(doc, net, opt, scaler, range(2, 4), set())
    assert rec is not None and rec.step == 4
    said = [f for f in rec.findings if "nonfinite" in f.kind or "overflow" in f.kind]
    assert [f.kind for f in said] == ["loss_scale_overflow"]
    assert said[0].evidence["scaler_skipped"] == 1  # (the resumed first step: no skip)


def test_a_non_finite_output_keeps_the_gradients_it_spoils_critical_under_a_scaler() -> None:
    """Loss scaling changes no forward value: where an output was non-finite, the scaler's
    skip had another cause, and the sites whose gradients it spoiled stay critical too (they
    were said to be the scaler's calibration, nothing to do)."""
    torch.manual_seed(0)
    net = zoo.mlp(d_in=4, hidden=8, depth=2) if "depth" in zoo.mlp.__code__.co_varnames \
        else nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                           nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    boost = {"on": False}
    net[2].register_forward_hook(lambda m, a, out: out * 1e39 if boost["on"] else None)
    with relu_doctor.watch(net, log_every_n_steps=4, overhead_budget=None,
                           grad_scaler=scaler) as doc:
        for step in range(4):
            boost["on"] = step == 1  # the second site's outputs are inf at step 1
            scaler.scale(net(torch.randn(8, 4)).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            rec = doc.step()
    assert rec is not None and rec.site_row("3")["nonfinite"] > 0
    assert rec.site_row("1")["nonfinite"] == 0 and rec.site_row("1")["grad_nonfinite"] > 0
    kinds = {(f.kind, f.site, f.severity) for f in rec.findings
             if f.kind in ("nonfinite", "loss_scale_overflow")}
    assert kinds == {("nonfinite", "1", "critical"), ("nonfinite", "3", "critical")}


def test_steps_a_loss_scaler_skips_are_no_sign_of_step_called_too_often() -> None:
    """doc.step() is said to be called more often than the optimizer steps where it stepped
    at half the collecting steps or fewer (a loop calling it at every micro-batch); steps
    the scaler given as grad_scaler= skipped count as steps: fp16 calibrating its scale
    over most of the first 16 steps is no such loop."""
    torch.manual_seed(0)
    net = zoo.mlp(d_in=4, hidden=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with relu_doctor.watch(net, optimizer=opt, log_every_n_steps=4, grad_scaler=scaler,
                               overhead_budget=None) as doc:
            _scaled_steps(doc, net, opt, scaler, range(20), set(range(11)))
    assert scaler.get_scale() <= 2.0**10 / 2**11  # (11 skipped at least)
    assert not [w for w in seen if "doc.step() was called" in str(w.message)]
