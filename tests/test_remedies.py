"""Framework-free remedies (relu_doctor.remedies): surgery checked element by element, policies
checked on hand-made records, and each remedy on a model driven into its pathology on
purpose, against the same seed untreated."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import relu_doctor
from relu_doctor.diagnosis import Finding
from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies import (
    AGC,
    ActivationSwapper,
    AutoClip,
    DormantRecycler,
    LRRescuer,
    find_unit_links,
    merge_interventions,
    recycle_units,
    restore_activation,
    scale_lr,
    swap_activation,
)
from tests.zoo import BasicBlock, InvertedResidual, SmallCNN

# ======================================================================= helpers


def mlp(d_in: int = 8, hidden: int = 64, d_out: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, d_out),
    )


def classification(seed: int, n: int = 1024, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes from an XOR-like rule: needs the hidden units."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long() * 2 + (x[:, 2] + x[:, 3] > 0).long()
    return x, y


def regression(seed: int, n: int = 1024, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]


def hidden(net: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the two activation sites on ``x``."""
    with torch.no_grad():
        h1 = net[1](net[0](x))
        return [h1, net[3](net[2](h1))]


def dead_fraction(h: torch.Tensor) -> float:
    """Units never active (output > 0) on any held-out sample (DESIGN.md's "dead")."""
    return float(((h > 0).sum(0) == 0).float().mean())


def dormant_fraction(h: torch.Tensor, tau: float = 0.1) -> float:
    """ReDo: score_i = mean|h_i| / mean_k mean|h_k| <= tau."""
    m = h.abs().mean(0)
    return float((m / m.mean() <= tau).float().mean())


@dataclass
class Rec:
    """A hand-made stand-in for relu_doctor.LogRecord."""

    step: int
    sites: list[dict[str, Any]]
    units: pd.DataFrame = field(default_factory=pd.DataFrame)
    layers: pd.DataFrame = field(default_factory=pd.DataFrame)
    findings: list[Finding] = field(default_factory=list)


def site_row(
    site: str, dead_fraction: float, units: int = 10, leaky: bool = False
) -> dict[str, Any]:
    return {
        "site": site,
        "dead_fraction": dead_fraction,
        "units": units,
        "units_seen": units,
        "dead": round(dead_fraction * units),
        "dormant": 0,
        "leaky": leaky,
        "sparsity": 0.5,
        "activation_rate": 0.5,
        "mean_abs": 1.0,
        "grad_rms": 0.1,
    }


EXPLODING = Finding(
    "exploding_gradient", "model", "critical", "grad norm 100x its median", {"factor": 100.0}
)


class SyncCounter(TorchDispatchMode):
    """Counts host synchronisations (``.item()``, ``bool(t)``, ``float(t)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


# ======================================================================= swap activation


def test_swap_keeps_positive_outputs_and_restores():
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(inplace=True), nn.Linear(16, 2))
    x = torch.randn(64, 4)
    with torch.no_grad():
        pre = net[0](x)
        before = net(x)
    rec = swap_activation(net, "1", slope=0.2)
    assert isinstance(net[1], nn.LeakyReLU) and net[1].inplace and net[1].negative_slope == 0.2
    with torch.no_grad():
        act = net[1](pre.clone())
    assert torch.equal(act[pre > 0], pre[pre > 0])  # positive inputs: unchanged
    torch.testing.assert_close(act[pre <= 0], 0.2 * pre[pre <= 0])
    restore_activation(net, rec)
    assert type(net[1]) is nn.ReLU
    with torch.no_grad():
        assert torch.equal(net(x), before)


def test_swap_shared_module_changes_every_site_and_probe_follows():
    torch.manual_seed(0)
    block = BasicBlock(4)
    x = torch.randn(8, 4, 6, 6)
    with relu_doctor.watch(block, log_every_n_steps=1, functional=True) as doc:
        block(x).sum().backward()
        doc.step()
        sw = ActivationSwapper(block).bind(doc)
        ev = sw.swap("relu#1", step=1)
        assert ev["shared"] and ev["sites"] == ["relu#0", "relu#1"]
        assert "shared by 2 sites" in ev["what"]
        # A swap called by hand is recorded too.
        assert [e["id"] for e in doc._events if e.get("type") == "intervention"] == [ev["id"]]
        assert isinstance(block.relu, nn.LeakyReLU)
        block(x).sum().backward()
        rec = doc.step()
        # The probe watches the new module: both sites still recorded, now leaky (and the
        # F.leaky_relu inside LeakyReLU.forward is not mistaken for a functional site).
        assert [r["site"] for r in rec.sites] == ["relu#0", "relu#1"]
        assert [r["family"] for r in rec.sites] == ["leaky_relu", "leaky_relu"]
        assert all(r["window_steps"] == 1 and r["elements"] > 0 for r in rec.sites)
        # The follow-up event carries the metrics measured after the swap.
        result = [e for e in doc._events if e.get("type") == "intervention_result"]
        assert (
            result and result[0]["ref"] == ev["id"] and result[0]["after"]["sparsity"] is not None
        )
        sw.restore()
        assert type(block.relu) is nn.ReLU
        block(x).sum().backward()
        rec = doc.step()
        assert [r["family"] for r in rec.sites] == ["relu", "relu"]


def test_swap_replaces_a_module_registered_under_two_paths():
    act = nn.ReLU()
    net = nn.Sequential(nn.Linear(3, 3), act, nn.Linear(3, 3), act)
    rec = swap_activation(net, "1")
    assert rec.paths == ["1", "3"] and net[1] is net[3] and isinstance(net[3], nn.LeakyReLU)
    restore_activation(net, rec)
    assert net[1] is act and net[3] is act


def test_prelu_swap_trains_its_slopes_and_undo_removes_them():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9**e)
    rec = swap_activation(
        net, "1", kind="prelu", slope=0.25, num_parameters=6, optimizer=opt, schedulers=[sched]
    )
    slopes = net[1].weight
    assert isinstance(net[1], nn.PReLU) and slopes.shape == (6,)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"] == [slopes]
    assert opt.param_groups[1]["weight_decay"] == 0.0 and len(sched.base_lrs) == 2
    x = torch.randn(32, 4)
    w0 = slopes.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        sched.step()  # the extended scheduler steps both groups
    assert not torch.equal(slopes.detach(), w0)  # the slopes train
    assert opt.param_groups[1]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    restore_activation(net, rec, schedulers=[sched])
    assert type(net[1]) is nn.ReLU and len(opt.param_groups) == 1 and slopes not in opt.state
    assert len(sched.base_lrs) == 1
    sched.step()


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (nn.LeakyReLU(), "already a leaky"),
        (nn.ReLU6(), "cap"),
        (nn.Linear(2, 2), "not a ReLU-family"),
    ],
)
def test_swap_refuses_what_it_cannot_swap(module, match):
    net = nn.Sequential(nn.Linear(2, 2), module)
    with pytest.raises(ReluDoctorError, match=match):
        swap_activation(net, "1")


def test_swap_argument_errors_name_the_argument():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ReluDoctorError, match="kind: expected one of"):
        swap_activation(net, "1", kind="elu")
    with pytest.raises(ReluDoctorError, match="slope"):
        swap_activation(net, "1", slope=0.0)
    with pytest.raises(ReluDoctorError, match=r"path: the model has no module at 'nope'.*\['1'\]"):
        swap_activation(net, "nope")
    with pytest.raises(ReluDoctorError, match="patience"):
        ActivationSwapper(net, patience=0)
    with pytest.raises(ReluDoctorError, match="functional call"):
        ActivationSwapper(net).swap("(root):relu#0")


def test_swapper_waits_for_patience_and_skips_leaky_sites():
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    sw = ActivationSwapper(net, threshold=0.5, patience=2, exclude="3")
    assert sw(Rec(10, [site_row("1", 0.8), site_row("3", 0.9)])) == []
    assert sw(Rec(20, [site_row("1", 0.2), site_row("3", 0.9)])) == []  # streak broken
    assert sw(Rec(30, [site_row("1", 0.6), site_row("3", 0.9)])) == []
    events = sw(Rec(40, [site_row("1", 0.7), site_row("3", 0.9)]))
    assert [e["site"] for e in events] == ["1"] and isinstance(net[1], nn.LeakyReLU)
    assert events[0]["before"]["dead_fraction"] == 0.7 and events[0]["step"] == 40
    assert type(net[3]) is nn.ReLU  # excluded
    after = sw(Rec(50, [site_row("1", 0.9, leaky=True), site_row("3", 0.9)]))
    assert [e["type"] for e in after] == ["intervention_result"]
    assert after[0]["after"]["dead_fraction"] == 0.9


def test_swapper_state_round_trips_prelu_into_a_fresh_model():
    torch.manual_seed(0)
    net = mlp(4, 6, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sw = ActivationSwapper(net, kind="prelu", per_unit=False, optimizer=opt)
    sw.swap("3", step=5)
    net(torch.randn(8, 4)).sum().backward()
    opt.step()
    ckpt = {"swapper": sw.state_dict(), "model": net.state_dict(), "opt": opt.state_dict()}

    torch.manual_seed(1)
    fresh = mlp(4, 6, 1)
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    sw2 = ActivationSwapper(fresh, kind="prelu", optimizer=opt2)
    sw2.load_state_dict(ckpt["swapper"])  # first: the swaps make the model's keys match
    fresh.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert isinstance(fresh[3], nn.PReLU) and type(fresh[1]) is nn.ReLU
    assert list(sw2.swaps) == ["3"]
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), net(x))


# ======================================================================= gradient clipping


def test_autoclip_matches_a_numpy_reference():
    torch.manual_seed(0)
    params = [torch.zeros(5, 3, requires_grad=True), torch.zeros(4, requires_grad=True)]
    clip = AutoClip(percentile=25, history=5)
    norms: list[float] = []
    clipped = 0
    for step in range(12):
        scale = 10.0 if step in (6, 9) else 1.0
        grads = [torch.randn(p.shape) * scale for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        total = float(np.float32(math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))))
        norms.append(total)
        thr = float(np.quantile(np.array(norms[-5:], dtype=np.float32), 0.25))
        coef = thr / (total + 1e-6) if total > thr else 1.0
        clipped += total > thr
        clip.clip_(params)
        for p, g in zip(params, grads, strict=True):
            torch.testing.assert_close(p.grad, g * coef, rtol=1e-5, atol=1e-6)
    stats = clip.read()
    assert stats["clipped"] == clipped and stats["steps"] == 12
    assert stats["threshold"] == pytest.approx(
        float(np.quantile(np.float32(norms[-5:]), 0.25)), rel=1e-5
    )
    assert clip.read()["clipped"] == 0  # a new window
    torch.testing.assert_close(clip.norm_history, torch.tensor(norms[-5:], dtype=torch.float32))


def test_agc_matches_a_reference():
    torch.manual_seed(0)
    w = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    gw, gb = torch.randn(6, 4), torch.randn(6) * 10
    gw[0] *= 100
    w.grad, b.grad = gw.clone(), gb.clone()
    agc = AGC(clipping=0.1, eps=1e-3)
    agc.clip_([w, b])
    wn = w.detach().norm(dim=1, keepdim=True).clamp(min=1e-3) * 0.1
    gn = gw.norm(dim=1, keepdim=True)
    expected = torch.where(gn > wn, gw * wn / gn, gw)
    torch.testing.assert_close(w.grad, expected)
    bn = b.detach().norm().clamp(min=1e-3) * 0.1
    torch.testing.assert_close(b.grad, gb * bn / gb.norm() if gb.norm() > bn else gb)
    stats = agc.read()
    assert stats["clipped"] == int((gn > wn).sum()) + int(gb.norm() > bn)
    assert stats["total"] == 7


def test_clippers_never_sync_with_the_host_per_step():
    net = mlp(8, 16, 2)
    x = torch.randn(16, 8)
    clips = [AutoClip(10, history=8), AGC(0.05)]
    for _ in range(2):  # warm up lazily created buffers
        net(x).sum().backward()
        for c in clips:
            c.clip_(net.parameters())
    with SyncCounter() as counter:
        for _ in range(5):
            net.zero_grad()
            net(x).sum().backward()
            for c in clips:
                c.clip_(net.parameters())
    assert counter.n == 0


def test_autoclip_as_optimizer_hook_sees_unscaled_gradients():
    torch.manual_seed(0)
    net = mlp(8, 16, 2)
    x = torch.randn(16, 8)
    ref = mlp(8, 16, 2)
    ref.load_state_dict(net.state_dict())
    ref(x).pow(2).mean().backward()
    true_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    clip = AutoClip(50).attach(opt)
    scaler.scale(net(x).pow(2).mean()).backward()
    scaler.step(opt)  # unscales, then steps: the hook runs in between
    scaler.update()
    clip.detach()
    torch.testing.assert_close(clip.norm_history[-1], true_norm.float(), rtol=1e-5, atol=0)


def test_autoclip_state_round_trip_keeps_history():
    clip = AutoClip(10, history=4)
    p = torch.zeros(3, requires_grad=True)
    for k in range(6):
        p.grad = torch.full((3,), float(k + 1))
        clip.clip_([p])
    state = clip.state_dict()
    other = AutoClip(10, history=4)
    other.load_state_dict(state)
    torch.testing.assert_close(other.norm_history, clip.norm_history)
    p.grad = torch.full((3,), 100.0)
    clip.clip_([p])
    g1 = p.grad.clone()
    p.grad = torch.full((3,), 100.0)
    other.clip_([p])
    assert torch.equal(p.grad, g1)


def test_clipping_arguments_are_validated():
    with pytest.raises(ReluDoctorError, match="percentile"):
        AutoClip(0)
    with pytest.raises(ReluDoctorError, match="history"):
        AutoClip(10, history=0)
    with pytest.raises(ReluDoctorError, match="clipping"):
        AGC(-1.0)


# ======================================================================= learning-rate rescue

SCHEDULERS = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [4, 7], gamma=0.3),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "CosineWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=4),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=1.0, total_steps=20, cycle_momentum=False
    ),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(
        o, base_lr=0.01, max_lr=0.1, step_size_up=3, cycle_momentum=False
    ),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=5),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [
            torch.optim.lr_scheduler.LinearLR(o, 0.5, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.8),
        ],
        milestones=[3],
    ),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=2),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
        ]
    ),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scale_lr_survives_the_scheduler(name):
    """After a rescue at step 4, every later lr is factor x the unrescued schedule."""
    runs = []
    for rescue in (False, True):
        w = nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD(
            [{"params": [w]}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.3}],
            lr=0.1,
            momentum=0.9,
        )
        sched = SCHEDULERS[name](opt)
        lrs = []
        for step in range(12):
            if rescue and step == 4:
                changes = scale_lr(opt, 0.25, schedulers=[sched])
                assert [c["factor"] for c in changes] == [0.25, 0.25]
            opt.step()
            if name == "ReduceLROnPlateau":
                sched.step(1.0)
            else:
                sched.step()
            lrs.append([g["lr"] for g in opt.param_groups])
        runs.append(np.array(lrs))
    plain, rescued = runs
    np.testing.assert_allclose(rescued[:4], plain[:4])
    np.testing.assert_allclose(rescued[4:], 0.25 * plain[4:], rtol=1e-9)


def test_scale_lr_floor_and_errors():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    changes = scale_lr(opt, 0.1, min_lr=5e-4, schedulers=[sched])
    assert changes[0]["lr_after"] == 5e-4 and changes[0]["factor"] == 0.5
    assert sched.base_lrs == [5e-4]
    assert scale_lr(opt, 0.1, min_lr=5e-4)[0]["factor"] == 1.0  # at the floor: unchanged
    with pytest.raises(ReluDoctorError, match="factor"):
        scale_lr(opt, 1.5)
    with pytest.raises(ReluDoctorError, match="optimizer"):
        scale_lr("sgd", 0.5)  # type: ignore[arg-type]


def test_rescuer_triggers_cooldown_and_state():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.8)
    r = LRRescuer(opt, factor=0.5, cooldown=2, min_lr=0.09)
    quiet = [site_row("a", 0.0)]
    assert r(Rec(10, quiet)) == []
    ev = r(Rec(20, quiet, findings=[EXPLODING]))
    assert len(ev) == 1 and ev[0]["trigger"] == "exploding_gradient"
    assert opt.param_groups[0]["lr"] == 0.4 and "0.8 -> 0.4" in ev[0]["what"]
    assert ev[0]["before"]["exploding_gradient"] is True
    # Two intervals of cooldown: the explosion persists, nothing happens.
    out = r(Rec(30, quiet, findings=[EXPLODING]))
    assert [e["type"] for e in out] == ["intervention_result"] and out[0]["ref"] == ev[0]["id"]
    state = r.state_dict()
    r2 = LRRescuer(opt, factor=0.5, cooldown=2, min_lr=0.09)
    r2.load_state_dict(state)
    for rr in (r, r2):
        assert rr(Rec(40, quiet, findings=[EXPLODING])) == []
    assert opt.param_groups[0]["lr"] == 0.4
    # A surge of dead units (0 -> 0.5) fires after the cooldown.
    ev = r(Rec(50, [site_row("a", 0.5)]))
    assert ev[0]["trigger"] == "dead_surge" and ev[0]["evidence"]["site"] == "a"
    assert opt.param_groups[0]["lr"] == 0.2
    r(Rec(60, quiet)), r(Rec(70, quiet))
    ev = r(Rec(80, quiet, findings=[EXPLODING]))
    assert opt.param_groups[0]["lr"] == 0.1 and len(ev) == 1
    r(Rec(90, quiet)), r(Rec(100, quiet))
    ev = r(Rec(110, quiet, findings=[EXPLODING]))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.09) and "floor" in ev[0]["what"]
    r(Rec(120, quiet)), r(Rec(130, quiet))
    assert r(Rec(140, quiet, findings=[EXPLODING])) == []  # at the floor: no event


def test_merge_interventions_fills_after():
    events = [
        {"type": "finding", "kind": "dead"},
        {"type": "intervention", "id": "x", "after": None, "step": 5},
        {"type": "intervention_result", "ref": "x", "after": {"dead_fraction": 0.0}, "step": 10},
    ]
    merged = merge_interventions(events)
    assert merged == [
        {
            "type": "intervention",
            "id": "x",
            "after": {"dead_fraction": 0.0},
            "step": 5,
            "after_step": 10,
        }
    ]


# ======================================================================= finding producers/consumers


class FxNet(nn.Module):
    """Not a Sequential: conv + BN + module ReLU, pooling, a view-flatten, a functional ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act(self.bn(self.conv(x))))
        h = h.view(h.size(0), -1)
        return self.out(F.dropout(F.relu(self.fc(h)), 0.0, self.training))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if h.sum() > 0:  # data-dependent control flow
            h = h * 2
        return self.fc2(h)


def test_links_in_sequential_nested_and_fx_models():
    cnn = SmallCNN(8)
    assert find_unit_links(cnn, "features.2").describe() == {
        "site": "features.2",
        "units": 8,
        "producer": "features.0",
        "norm": "features.1",
        "consumers": [{"path": "features.4", "span": 1}],
    }
    # conv-to-linear flatten in the parent's forward: each channel owns 4x4 head inputs.
    links = find_unit_links(cnn, "features.6")
    assert (links.producer_path, links.norm_path) == ("features.4", "features.5")
    assert [(c.path, c.span) for c in links.consumers] == [("head", 16)]
    fx = FxNet()
    links = find_unit_links(fx, "act")
    assert (links.producer_path, links.norm_path) == ("conv", "bn")
    assert [(c.path, c.span) for c in links.consumers] == [("fc", 4)]
    with relu_doctor.watch(fx, functional=True, log_every_n_steps=1) as doc:
        fx(torch.randn(2, 3, 4, 4))
        names = [s.name for s in doc.sites]
    assert names == ["act", "(root):relu#0"]
    links = find_unit_links(fx, "(root):relu#0")
    assert (links.producer_path, links.norm_path, links.consumers[0].path) == ("fc", None, "out")


def test_links_errors_name_the_site():
    block = BasicBlock(4)
    assert find_unit_links(block, "relu#0").producer_path == "conv1"
    with pytest.raises(
        ReluDoctorError, match=r"site 'relu#1': its input comes from function i?add"
    ):
        find_unit_links(block, "relu#1")
    with pytest.raises(ReluDoctorError, match=r"site 'act': cannot find.*torch\.fx"):
        find_unit_links(Untraceable(), "act")
    with pytest.raises(ReluDoctorError, match="site: the model has no module at 'x'"):
        find_unit_links(mlp(), "x")


# ======================================================================= recycling, element by element


def _snapshot(net: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in net.named_buffers()}
    by_id = {id(p): n for n, p in net.named_parameters()}
    state = {
        by_id[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for p, s in opt.state.items()
    }
    return params, buffers, state


def _train(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()


def _expected_rows(
    gen_seed: int, n: int, weight: torch.Tensor, bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(gen_seed)
    rows = torch.empty((n, *weight.shape[1:]))
    nn.init.kaiming_uniform_(rows, a=math.sqrt(5), generator=g)
    if not bias:
        return rows, None
    bound = 1 / math.sqrt(weight[0].numel())
    return rows, torch.empty(n).uniform_(-bound, bound, generator=g)


def _check_slices(
    name: str,
    new: torch.Tensor,
    old: torch.Tensor,
    dim: int,
    cols: list[int],
    value: torch.Tensor | float | None,
) -> None:
    """Along ``dim``: entries in ``cols`` equal ``value`` (None: just changed), every other
    entry bit-identical."""
    keep = [i for i in range(new.shape[dim]) if i not in cols]
    assert torch.equal(
        new.index_select(dim, torch.tensor(keep)), old.index_select(dim, torch.tensor(keep))
    ), name
    got = new.index_select(dim, torch.tensor(cols))
    if value is None:
        assert not torch.equal(got, old.index_select(dim, torch.tensor(cols))), name
    elif isinstance(value, torch.Tensor):
        assert torch.equal(got, value), name
    else:
        assert torch.equal(got, torch.full_like(got, value)), name


def test_recycle_mlp_with_adam_slices_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, amsgrad=True)
    _train(net, opt, torch.randn(16, 6))
    p0, _, s0 = _snapshot(net, opt)
    units = [1, 5]
    what = recycle_units(
        find_unit_links(net, "3"), units, optimizers=opt, generator=torch.Generator().manual_seed(7)
    )
    assert what["optimizer_state"] == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    p1, _, s1 = _snapshot(net, opt)
    rows, bias = _expected_rows(7, 2, p0["2.weight"], bias=True)
    _check_slices("2.weight", p1["2.weight"], p0["2.weight"], 0, units, rows)
    _check_slices("2.bias", p1["2.bias"], p0["2.bias"], 0, units, bias)
    _check_slices("4.weight", p1["4.weight"], p0["4.weight"], 1, units, 0.0)
    for n in ("0.weight", "0.bias", "4.bias"):
        assert torch.equal(p1[n], p0[n]), n
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        _check_slices("2.weight " + key, s1["2.weight"][key], s0["2.weight"][key], 0, units, 0.0)
        _check_slices("2.bias " + key, s1["2.bias"][key], s0["2.bias"][key], 0, units, 0.0)
        _check_slices("4.weight " + key, s1["4.weight"][key], s0["4.weight"][key], 1, units, 0.0)
        for n in ("0.weight", "0.bias", "4.bias"):
            assert torch.equal(s1[n][key], s0[n][key]), n
    assert all(torch.equal(s1[n]["step"], s0[n]["step"]) for n in s0)  # steps untouched


def test_recycle_cnn_through_batchnorm_and_flatten_with_sgd_momentum():
    torch.manual_seed(0)
    net = SmallCNN(4)  # features.6 has 8 channels of 4x4 -> head reads 128 features
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    _train(net, opt, torch.randn(4, 3, 8, 8))
    p0, b0, s0 = _snapshot(net, opt)
    units = [0, 5]
    recycle_units(
        find_unit_links(net, "features.6"),
        units,
        optimizers=opt,
        generator=torch.Generator().manual_seed(3),
    )
    p1, b1, s1 = _snapshot(net, opt)
    rows, bias = _expected_rows(3, 2, p0["features.4.weight"], bias=True)
    _check_slices("conv w", p1["features.4.weight"], p0["features.4.weight"], 0, units, rows)
    _check_slices("conv b", p1["features.4.bias"], p0["features.4.bias"], 0, units, bias)
    _check_slices("bn w", p1["features.5.weight"], p0["features.5.weight"], 0, units, 1.0)
    _check_slices("bn b", p1["features.5.bias"], p0["features.5.bias"], 0, units, 0.0)
    _check_slices(
        "bn mean", b1["features.5.running_mean"], b0["features.5.running_mean"], 0, units, 0.0
    )
    _check_slices(
        "bn var", b1["features.5.running_var"], b0["features.5.running_var"], 0, units, 1.0
    )
    cols = [c * 16 + j for c in units for j in range(16)]
    _check_slices("head w", p1["head.weight"], p0["head.weight"], 1, cols, 0.0)
    assert torch.equal(b1["features.5.num_batches_tracked"], b0["features.5.num_batches_tracked"])
    for n in ("features.0.weight", "features.0.bias", "features.1.weight", "head.bias"):
        assert torch.equal(p1[n], p0[n]), n
    m = "momentum_buffer"
    _check_slices(
        "conv w mom", s1["features.4.weight"][m], s0["features.4.weight"][m], 0, units, 0.0
    )
    _check_slices("bn w mom", s1["features.5.weight"][m], s0["features.5.weight"][m], 0, units, 0.0)
    _check_slices("head mom", s1["head.weight"][m], s0["head.weight"][m], 1, cols, 0.0)
    for n in ("features.0.weight", "features.1.bias", "head.bias"):
        assert torch.equal(s1[n][m], s0[n][m]), n


def test_recycle_into_a_depthwise_conv():
    torch.manual_seed(0)
    net = InvertedResidual(4, expand=2)  # block.2 (8 channels) feeds depthwise block.3
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    _train(net, opt, torch.randn(2, 4, 5, 5))
    p0, _, s0 = _snapshot(net, opt)
    recycle_units(find_unit_links(net, "block.2"), [3], optimizers=opt)
    p1, _, s1 = _snapshot(net, opt)
    _check_slices("dw", p1["block.3.weight"], p0["block.3.weight"], 0, [3], 0.0)
    _check_slices(
        "dw m", s1["block.3.weight"]["exp_avg"], s0["block.3.weight"]["exp_avg"], 0, [3], 0.0
    )
    _check_slices("expand", p1["block.0.weight"], p0["block.0.weight"], 0, [3], None)


def test_recycle_rejects_bad_units():
    links = find_unit_links(mlp(), "1")
    with pytest.raises(ReluDoctorError, match=r"units: indices must be in \[0, 64\)"):
        recycle_units(links, [64])


# ======================================================================= pathologies, treated vs not


def test_leaky_swap_revives_units_an_lr_burst_killed():
    """SGD at lr 6 for five steps kills most units of the second layer; with LeakyReluSwap
    the dead site gets gradient again and its units come back."""
    x, y = classification(1)
    xt, yt = classification(2)

    def run(treat: bool) -> tuple[float, float, list[str]]:
        torch.manual_seed(0)
        net = mlp()
        opt = torch.optim.SGD(net.parameters(), lr=6.0)
        with relu_doctor.watch(net, log_every_n_steps=10) as doc:
            sw = (
                ActivationSwapper(net, threshold=0.3, patience=2, slope=0.3).bind(doc)
                if treat
                else None
            )
            for step in range(250):
                if step == 5:
                    opt.param_groups[0]["lr"] = 0.3
                i = torch.randint(0, len(x), (64,))
                opt.zero_grad()
                F.cross_entropy(net(x[i]), y[i]).backward()
                opt.step()
                doc.step()
        with torch.no_grad():
            loss = float(F.cross_entropy(net(xt), yt))
        return dead_fraction(hidden(net, xt)[1]), loss, list(sw.swaps) if sw else []

    dead_u, loss_u, _ = run(False)
    dead_t, loss_t, swapped = run(True)
    print(f"dead fraction {dead_u:.3f} -> {dead_t:.3f}, loss {loss_u:.3f} -> {loss_t:.3f}")
    assert swapped and "3" in swapped
    assert dead_u > 0.4  # the pathology, untreated
    assert dead_t < dead_u - 0.3, (dead_u, dead_t)
    assert loss_t < loss_u, (loss_u, loss_t)


@pytest.mark.parametrize("clipper", ["autoclip", "agc"])
def test_clipping_contains_gradient_explosions(clipper):
    """Every 30th batch has targets x30: the spikes blow the untreated net up."""
    x, y = regression(1)
    xt, yt = regression(2)

    def run(treat: bool) -> tuple[float, float, int]:
        torch.manual_seed(0)
        net = mlp(d_out=1)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        clip = (AutoClip(10) if clipper == "autoclip" else AGC(0.05)) if treat else None
        with relu_doctor.watch(net, log_every_n_steps=10) as doc:
            if clip is not None:
                clip.bind(doc)
            for step in range(300):
                i = torch.randint(0, len(x), (32,))
                target = y[i] * (30.0 if step % 30 == 29 else 1.0)
                opt.zero_grad()
                F.mse_loss(net(x[i]), target).backward()
                if clip is not None:
                    clip.clip_(net.parameters())
                opt.step()
                doc.step()
        clipped = sum(
            e["clip"]["clipped"]
            for e in doc._events
            if e.get("remedy") == "adaptive_grad_clip" and e["type"] == "intervention"
        )
        with torch.no_grad():
            loss = float(F.mse_loss(net(xt), yt))
        return dead_fraction(hidden(net, xt)[1]), loss, clipped

    dead_u, loss_u, _ = run(False)
    dead_t, loss_t, clipped = run(True)
    print(
        f"{clipper}: dead fraction {dead_u:.3f} -> {dead_t:.3f}, loss {loss_u:.3f} -> {loss_t:.3f}"
    )
    assert clipped > 0
    assert dead_u > 0.5 and dead_t < 0.1, (dead_u, dead_t)
    assert loss_t < 0.5 and not loss_u < 1.0, (loss_u, loss_t)  # NaN counts as not < 1


def test_lr_rescue_stops_an_lr_that_kills_units():
    """lr 0.2 with momentum (after a warmup) kills most units; the rescue cuts it on the first
    surge of dead units and the warmup schedule keeps the cut."""
    x, y = regression(1)
    xt, yt = regression(2)

    def run(treat: bool) -> tuple[float, float, float, list[dict]]:
        torch.manual_seed(0)
        net = mlp(d_out=1)
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: min(1.0, (e + 1) / 50))
        with relu_doctor.watch(net, log_every_n_steps=10, optimizer=opt) as doc:
            if treat:
                LRRescuer(opt, schedulers=[sched], factor=0.3, cooldown=1).bind(doc)
            for _ in range(300):
                i = torch.randint(0, len(x), (32,))
                opt.zero_grad()
                F.mse_loss(net(x[i]), y[i]).backward()
                opt.step()
                sched.step()
                doc.step()
        with torch.no_grad():
            loss = float(F.mse_loss(net(xt), yt))
        evs = [e for e in doc._events if e.get("type") == "intervention"]
        return dead_fraction(hidden(net, xt)[1]), loss, opt.param_groups[0]["lr"], evs

    dead_u, loss_u, lr_u, _ = run(False)
    dead_t, loss_t, lr_t, events = run(True)
    print(f"dead fraction {dead_u:.3f} -> {dead_t:.3f}, loss {loss_u:.3f} -> {loss_t:.3f}")
    assert events and events[0]["trigger"] == "dead_surge"
    assert lr_u == pytest.approx(0.2) and lr_t == pytest.approx(0.2 * 0.3 ** len(events))
    assert dead_u > 0.8 and dead_t < dead_u - 0.2, (dead_u, dead_t)
    assert loss_t < loss_u / 2, (loss_u, loss_t)


def test_dormant_reset_recycles_dormant_units():
    """An Adam lr burst leaves most second-layer units dormant; ReDo recycles them."""
    x, y = classification(1)
    xt, yt = classification(2)

    def run(treat: bool) -> tuple[float, float, int]:
        torch.manual_seed(0)
        net = mlp()
        opt = torch.optim.Adam(net.parameters(), lr=0.2)
        with relu_doctor.watch(net, log_every_n_steps=10) as doc:
            if treat:
                DormantRecycler(net, optimizers=opt).bind(doc)
            for step in range(300):
                if step == 5:
                    opt.param_groups[0]["lr"] = 0.01
                i = torch.randint(0, len(x), (64,))
                opt.zero_grad()
                F.cross_entropy(net(x[i]), y[i]).backward()
                opt.step()
                doc.step()
        n = sum(len(e["units"]) for e in doc._events if e.get("type") == "intervention")
        with torch.no_grad():
            loss = float(F.cross_entropy(net(xt), yt))
        return dormant_fraction(hidden(net, xt)[1]), loss, n

    dorm_u, loss_u, _ = run(False)
    dorm_t, loss_t, recycled = run(True)
    print(f"dormant fraction {dorm_u:.3f} -> {dorm_t:.3f}, loss {loss_u:.3f} -> {loss_t:.3f}")
    assert recycled > 0
    assert dorm_u > 0.5 and dorm_t < 0.1, (dorm_u, dorm_t)
    assert loss_t < loss_u, (loss_u, loss_t)
