"""Prepared kernel calls (``relu_doctor._kernels.Prepared``): a site's calls laid out as its
previous one go straight to the kernel with the arguments worked out then.

They must add exactly what the checked path (``forward_into``/``grad_into``) adds, decline
every tensor laid out otherwise (dtype, shape, strides, subclass, no memory, another device,
inside ``disabled()``), and, in a watched model whose activations change layout between
steps, give the eager reference's counts at every step.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor import _kernels
from relu_doctor._kernels import cpu
from relu_doctor.errors import ReluDoctorWarning
from relu_doctor.stats import FIELDS, ROW, SiteStats

pytestmark = pytest.mark.skipif(not _kernels.available(), reason="no C compiler: eager path only")

G0 = len(FIELDS) - 5  # the first gradient row
# a site row's fields that are counts (or ratios of counts): equal on both paths
EXACT = {"elements", "dead", "dead_fraction", "lifetime_dead", "lifetime_dead_fraction",
         "units_seen", "sparsity", "activation_rate", "grad_zero_fraction", "nonfinite",
         "grad_nonfinite"}


def _data(shape, dtype, layout=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    x[x < -0.5] = 0.0  # zeros: some units inactive
    g = torch.randn(shape, generator=gen)
    gi = torch.where(x > 0, g, torch.zeros(()))
    out = [t.to(dtype) for t in (x, g, gi)]
    return [layout(t) for t in out] if layout is not None else out


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


CASES = [
    ((37, 50), torch.float32, None),
    ((6, 10, 9, 9), torch.float32, None),
    ((6, 10, 9, 9), torch.float32, _channels_last),
    ((5, 12, 7, 7), torch.bfloat16, None),
    ((4, 3, 33), torch.float16, None),
    ((300, 70), torch.float64, None),
]


@pytest.mark.parametrize("cap", [None, 0.7])
@pytest.mark.parametrize(("shape", "dtype", "layout"), CASES,
                         ids=[f"{s}-{d}-{'cl' if lay else 'c'}" for s, d, lay in CASES])
def test_a_prepared_call_adds_what_the_checked_call_adds(shape, dtype, layout, cap):
    unit_dim = 1 if len(shape) > 2 else len(shape) - 1
    units = shape[unit_dim]
    first = _data(shape, dtype, layout, seed=0)
    prepared_stats, checked = SiteStats(units, "cpu"), SiteStats(units, "cpu")
    fwd = cpu.prepare_forward(prepared_stats.window, first[0], unit_dim, cap=cap,
                              nonnegative=cap is None)
    grad = cpu.prepare_grad(prepared_stats.window, first[1], first[2], unit_dim, G0)
    grad_alone = cpu.prepare_grad(prepared_stats.window, first[1], None, unit_dim, G0)
    assert fwd is not None and grad is not None and grad_alone is not None
    for seed in (1, 2):  # later calls: other values, same layout
        x, g, gi = _data(shape, dtype, layout, seed=seed)
        # a loss scale as a number (DDP's world size): 1 / scale, squared into grad_sq
        assert fwd(x) and grad(g, gi) and grad_alone(g) and grad_alone(g, None, 0.25)
        assert cpu.forward_into(checked.window, x, unit_dim, cap=cap, nonnegative=cap is None)
        assert cpu.grad_into(checked.window, g, gi, unit_dim, None, G0)
        assert cpu.grad_into(checked.window, g, None, unit_dim, None, G0)
        assert cpu.grad_into(checked.window, g, None, unit_dim, 0.25, G0)
    assert torch.equal(prepared_stats.window, checked.window)  # the same kernel, same arguments
    assert checked.window[ROW["elements"]].sum() == 2 * first[0].numel()
    assert checked.window[ROW["grad_elements"]].sum() == 6 * first[0].numel()


def test_a_prepared_call_declines_every_other_layout():
    shape = (6, 10, 9, 9)
    x, g, gi = _data(shape, torch.float32)
    st = SiteStats(10, "cpu")
    fwd = cpu.prepare_forward(st.window, x, 1, cap=None, nonnegative=True)
    with_gi = cpu.prepare_grad(st.window, g, gi, 1, G0)
    alone = cpu.prepare_grad(st.window, g, None, 1, G0)
    assert fwd is not None and with_gi is not None and alone is not None

    others = {
        "float64": x.double(),
        "bfloat16": x.bfloat16(),
        "another batch": torch.cat([x, x[:1]]),
        "channels-last, same shape": _channels_last(x),
        "strided view, same shape": torch.randn(6, 10, 9, 18)[..., ::2],
        "a subclass": nn.Parameter(x.clone()),
        "no memory (ZeroTensor)": torch._efficientzerotensor(shape),
        "on the meta device": x.to("meta"),
    }
    for what, other in others.items():
        assert other.shape == x.shape or what == "another batch"
        assert not fwd(other), what
        assert not with_gi(other, gi), what
        assert not alone(other), what
    assert not with_gi(g, None), "prepared with dL/d(input), called without"
    assert not alone(g, gi), "prepared without dL/d(input), called with"
    assert not with_gi(g, _channels_last(gi)), "dL/d(input) laid out otherwise"
    with _kernels.disabled():  # the eager reference path, for tests and golden runs
        assert not fwd(x) and not with_gi(g, gi) and not alone(g)
    assert torch.count_nonzero(st.window) == 0  # nothing was added by any of them


def test_prepare_declines_what_the_kernel_does_not_read_in_place():
    x, g, gi = _data((6, 10, 9, 9), torch.float32)
    st = SiteStats(10, "cpu")
    moved = x.transpose(0, 1)  # units first, then a batch: read through a copy
    assert cpu.prepare_forward(st.window, moved, 0, cap=None) is None
    assert cpu.prepare_forward(st.window, torch.zeros(0, 10), 1, cap=None) is None
    assert cpu.prepare_forward(st.window, torch._efficientzerotensor(4, 10), 1, cap=None) is None
    assert cpu.prepare_grad(st.window, g, _channels_last(gi), 1, G0) is None
    assert cpu.prepare_grad(st.window, g, gi.double(), 1, G0) is None
    with _kernels.disabled():
        assert cpu.prepare_forward(st.window, x, 1, cap=None) is None
        assert cpu.prepare_grad(st.window, g, gi, 1, G0) is None
    # what the probes call: the CPU kernel only (a CUDA tensor takes the checked path)
    assert _kernels.prepare_forward(st.window, x.to("meta"), 1, cap=None) is None


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Conv2d(8, 2, 1)  # dL/d(output) then has the output's layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)))


# (batch, channels-last, bfloat16 autocast): repeats, then layouts of the same shape
STEPS = [(4, False, False), (4, False, False), (4, False, False), (4, True, False),
         (4, True, False), (4, False, False), (5, False, False), (4, False, True),
         (4, False, True), (4, False, False)]


def _run(*, eager: bool):
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen: list[tuple[torch.dtype, tuple[int, ...]]] = []
    model.act.register_forward_hook(lambda m, a, out: seen.append((out.dtype, out.stride())))
    general = {"forward": 0, "grad": 0}
    spies = {"forward": cpu.forward_into, "grad": cpu.grad_into}

    def spy(name):
        def call(*args, **kwargs):
            general[name] += 1
            return spies[name](*args, **kwargs)
        return call

    per_step = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "forward_into", spy("forward"))
        mp.setattr(cpu, "grad_into", spy("grad"))
        if eager:
            mp.setattr(cpu, "_off", 1)
        doc = relu_doctor.watch(model, log_every_n_steps=1, overhead_budget=None)
        gen = torch.Generator().manual_seed(1)
        for batch, cl, bf16 in STEPS:
            x = torch.randn(batch, 3, 6, 6, generator=gen)
            if cl:
                x = _channels_last(x)
            before = dict(general)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
            per_step.append({k: general[k] - before[k] for k in general})
        doc.detach()
    rows = [r.site_rows for r in doc.records]
    return rows, per_step, seen


def test_a_site_whose_layout_changes_between_steps_counts_as_the_eager_path():
    fused, calls, seen = _run(eager=False)
    eager, _, seen_eager = _run(eager=True)
    assert seen == seen_eager
    # the run does change the activation's dtype and strides at one shape
    assert len({s for s in seen if s[1][0] == 8 * 36}) >= 3
    assert len(fused) == len(STEPS)
    _assert_rows_match(fused, eager)
    # the first step may only find the site's producer
    assert sum(len(rows) for rows in fused) >= len(STEPS) - 1
    # The checked path runs on a layout's first call only: each step that repeats the step
    # before's layout goes through the prepared calls alone.
    repeats = [i for i in range(2, len(STEPS)) if STEPS[i] == STEPS[i - 1]]
    changes = [i for i in range(2, len(STEPS)) if STEPS[i] != STEPS[i - 1]]
    assert repeats and changes
    for i in repeats:
        assert calls[i] == {"forward": 0, "grad": 0}, i
    for i in changes:
        assert calls[i]["forward"] >= 1 and calls[i]["grad"] >= 1, i


def test_a_prepared_call_that_fails_stops_its_site_with_one_warning_and_training_goes_on():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 1))
    doc = relu_doctor.watch(model, log_every_n_steps=100, overhead_budget=None)

    class Broken:
        def forward(self, *args):
            raise RuntimeError("kernel exploded")

        grad = forward

    def step():
        model(torch.randn(8, 5)).sum().backward()
        doc.step()

    for _ in range(3):  # the site is made and its calls prepared
        step()
    assert doc.probe._prepared
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "_front", Broken())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                step()
    stopped = [w for w in caught if issubclass(w.category, ReluDoctorWarning)
               and "stopped monitoring site" in str(w.message)]
    assert len(stopped) == 1 and "kernel exploded" in str(stopped[0].message)
    assert not doc.probe._prepared  # the failed site's prepared call is dropped
    step()  # the real kernel again: the site stays out, nothing raises
    doc.detach()


def _count_prepared_grads(mp: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the prepared gradient calls that ran (Prepared.__call__ of a gradient call)."""
    ran = {"grad": 0}
    run = cpu.Prepared.__call__

    def counting(self_, *args):
        done = run(self_, *args)
        if done and self_.grad:
            ran["grad"] += 1
        return done

    mp.setattr(cpu.Prepared, "__call__", counting)
    return ran


def _sites_rows(doc) -> list[list[dict]]:
    return [r.site_rows for r in doc.records]


def _assert_rows_match(got, want):
    """Each record's site rows equal: counts exactly, sums to float rounding (the two paths
    add in different orders)."""
    assert len(got) == len(want)
    for step, (g_rows, w_rows) in enumerate(zip(got, want, strict=True)):
        assert [r["site"] for r in g_rows] == [r["site"] for r in w_rows]
        for g, w in zip(g_rows, w_rows, strict=True):
            assert g.keys() == w.keys()
            for name, value in w.items():
                if name in EXACT or not isinstance(value, float):
                    assert g[name] == value, (step, name)
                else:
                    assert g[name] == pytest.approx(value, rel=1e-4, abs=1e-7), (step, name)


@pytest.mark.parametrize("enabled", [False, True], ids=["scaler off", "scaler on"])
def test_a_grad_scaler_s_tensor_scale_takes_the_checked_path_and_none_the_prepared(enabled):
    """With a GradScaler the gradient hook reads the scale at each call: an enabled scaler's
    scale is a tensor (the checked path divides it out), a disabled one's is None (the
    prepared call runs). Both count as the eager path."""
    def run(eager: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", enabled=enabled, init_scale=1024.0)
        with pytest.MonkeyPatch.context() as mp:
            ran = _count_prepared_grads(mp)
            if eager:
                mp.setattr(cpu, "_off", 1)
            doc = relu_doctor.watch(model, log_every_n_steps=1, overhead_budget=None,
                                    grad_scaler=scaler)
            gen = torch.Generator().manual_seed(1)
            for _ in range(4):
                scaler.scale(model(torch.randn(6, 5, generator=gen)).square().mean()).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
                doc.step()
            doc.detach()
        return _sites_rows(doc), ran["grad"]

    fused, prepared_grads = run(eager=False)
    eager, _ = run(eager=True)
    _assert_rows_match(fused, eager)
    assert fused[-1][0]["grad_rms"] > 0
    if enabled:
        assert prepared_grads == 0
    else:
        assert prepared_grads >= 2


def test_compiled_autograd_takes_the_checked_path_in_the_gradient_hook():
    """Compiled autograd traces the gradient hooks: they take the checked path (which puts
    the eager statistics into the compiled backward), not the prepared kernel call, which
    would break the graph and run the kernel in the middle of it."""
    from torch._dynamo import compiled_autograd

    def run(compiled: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
        doc = relu_doctor.watch(model, log_every_n_steps=1, overhead_budget=None)
        gen = torch.Generator().manual_seed(1)
        with pytest.MonkeyPatch.context() as mp:
            ran = _count_prepared_grads(mp)
            for step in range(4):
                loss = model(torch.randn(4, 6, generator=gen)).square().sum()
                if compiled and step >= 2:  # after two eager steps prepared the calls
                    before = ran["grad"]
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        with compiled_autograd._enable(torch.compile(backend="eager")):
                            loss.backward()
                    assert ran["grad"] == before, "a prepared call ran inside compiled autograd"
                else:
                    loss.backward()
                doc.step()
        doc.detach()
        return _sites_rows(doc), ran["grad"]

    torch._dynamo.reset()
    try:
        compiled, ran = run(compiled=True)
    finally:
        torch._dynamo.reset()
    plain, _ = run(compiled=False)
    assert ran >= 1  # the eager steps did use the prepared call
    _assert_rows_match(compiled, plain)


def test_a_loss_scale_given_as_a_number_past_float32s_squares_is_tamed_on_every_call():
    """A scale read as a number (a Probe's grad_scale) takes the prepared call from the
    second backward on, which squared the scaled gradient before the scale came out: its
    first call was right and the later ones read non-finite gradients. It is tamed on
    every call: the window equals a float64 reference over all three passes."""
    from relu_doctor.probes import Probe

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    scale = 2.0**70
    probe = Probe(net, grad_scale=lambda: scale).attach()
    grads: list[torch.Tensor] = []
    net[1].register_full_backward_hook(lambda m, gi, go: grads.append(go[0].double() / scale))
    try:
        for _ in range(3):
            ((net(torch.randn(32, 8)) ** 2).mean() * 10.0 * scale).backward()
        window = probe.sites()[0].stats.window
    finally:
        probe.detach()
    assert not window[ROW["grad_nonfinite"]].any()
    want = sum(g.pow(2).sum(0) for g in grads)
    torch.testing.assert_close(window[ROW["grad_sq"]], want, rtol=1e-5, atol=0)
