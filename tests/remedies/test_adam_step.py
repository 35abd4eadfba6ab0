"""``reset_adam_step``: recycled slices take Adam steps as if their step count restarted at 0.

Checked against an independent Adam written here with plain tensor maths and a step count
per element (the convention of Dohare et al.'s ``AdamGnT``, with torch's placement of eps),
following its own parameters and gradients (``torch.func.functional_call``) while the
model's units are recycled mid-training; and, with the option off, against the same Adam
with one step per tensor (torch's behaviour, which the option changes).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies import (
    ContinualBackprop,
    DormantRecycler,
    PlanStep,
    TreatmentPlan,
    find_unit_links,
    recycle_units,
)
from relu_doctor.remedies import adam_step as adam_step_module
from relu_doctor.remedies.adam_step import NEGLIGIBLE, tracked_slices
from tests.callbacks.remedy_models import FILTERS

LR = 1e-2
NAMES = ("0.weight", "0.bias", "2.weight", "2.bias")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return x, torch.sin(x[:, :3]) * 2.0


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).mean()


def _masks(units: list[int]) -> dict[str, torch.Tensor]:
    """The slices a recycling of hidden ``units`` restarts, written out by hand: the rows and
    biases of the producer, the columns of the consumer."""
    out = {n: torch.zeros(s, dtype=torch.bool) for n, s in
           (("0.weight", (8, 4)), ("0.bias", (8,)), ("2.weight", (3, 8)), ("2.bias", (3,)))}
    out["0.weight"][units] = True
    out["0.bias"][units] = True
    out["2.weight"][:, units] = True
    return out


class RefAdam:
    """Adam / AdamW over named tensors with a step count per element."""

    def __init__(self, params: dict[str, torch.Tensor], *, betas: tuple[float, float],
                 eps: float, weight_decay: float, decoupled: bool, maximize: bool,
                 amsgrad: bool, restart_step: bool) -> None:
        self.p = {k: v.detach().clone() for k, v in params.items()}
        self.m = {k: torch.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.p.items()}
        self.vmax = {k: torch.zeros_like(v) for k, v in self.p.items()}
        self.s = {k: torch.zeros_like(v) for k, v in self.p.items()}
        self.b1, self.b2 = betas
        self.eps, self.wd, self.decoupled = eps, weight_decay, decoupled
        self.maximize, self.amsgrad, self.restart_step = maximize, amsgrad, restart_step

    def grads(self, net: nn.Module, i: int) -> dict[str, torch.Tensor]:
        x, y = _batch(i)
        ps = {k: v.clone().requires_grad_(True) for k, v in self.p.items()}
        loss = _loss(functional_call(net, ps, (x,)), y)
        return dict(zip(ps, torch.autograd.grad(loss, list(ps.values())), strict=True))

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        for k, g in grads.items():
            p = self.p[k]
            g = -g if self.maximize else g
            self.s[k] += 1
            if self.wd and self.decoupled:
                p = p * (1 - LR * self.wd)
            elif self.wd:
                g = g + self.wd * p
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            self.vmax[k] = torch.maximum(self.vmax[k], self.v[k])
            v = self.vmax[k] if self.amsgrad else self.v[k]
            s = self.s[k]
            denom = v.sqrt() / (1 - self.b2**s).sqrt() + self.eps
            self.p[k] = p - LR / (1 - self.b1**s) * self.m[k] / denom

    def recycled(self, net: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        """The model's surgery: outside the masks nothing changed; inside, take its new
        values, zero the moments and (with ``restart_step``) the step."""
        now = dict(net.named_parameters())
        for k, mask in masks.items():
            new = now[k].detach()
            torch.testing.assert_close(new[~mask], self.p[k][~mask], rtol=1e-9, atol=1e-12)
            self.p[k][mask] = new[mask]
            for state in (self.m, self.v, self.vmax):
                state[k][mask] = 0.0
            if self.restart_step:
                self.s[k][mask] = 0.0


def _optimizer(net: nn.Module, kind: str, impl: str, **kw: Any) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if kind == "AdamW" else torch.optim.Adam
    flags = {"for-loop": {"foreach": False}, "foreach": {"foreach": True},
             "fused": {"fused": True}}[impl]
    return cls(net.parameters(), lr=LR, **flags, **kw)


def _train(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    ref: RefAdam,
    rec: DormantRecycler,
    steps: range,
    recycle_at: dict[int, list[int]],
    check: Callable[[int], None] | None = None,
) -> None:
    for i in steps:
        if i in recycle_at:
            _assert_equal(net, ref)
            rec.recycle("1", units=recycle_at[i], step=i)
            ref.recycled(net, _masks(recycle_at[i]))
        opt.zero_grad()
        x, y = _batch(i)
        _loss(net(x), y).backward()
        opt.step()
        ref.step(ref.grads(net, i))
        if check is not None:
            check(i)


def _assert_equal(net: nn.Module, ref: RefAdam, atol: float = 1e-12) -> None:
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), ref.p[k], rtol=1e-9, atol=atol,
                                   msg=lambda m, k=k: f"{k}: {m}")


def _setup(kind: str, impl: str, *, weight_decay: float = 0.0, maximize: bool = False,
           amsgrad: bool = False, betas: tuple[float, float] = (0.9, 0.999),
           reset: bool = True) -> tuple[nn.Module, torch.optim.Optimizer, RefAdam, DormantRecycler]:
    net = _net()
    opt = _optimizer(net, kind, impl, weight_decay=weight_decay, maximize=maximize,
                     amsgrad=amsgrad, betas=betas)
    ref = RefAdam(dict(net.named_parameters()), betas=betas, eps=1e-8,
                  weight_decay=weight_decay, decoupled=kind == "AdamW", maximize=maximize,
                  amsgrad=amsgrad, restart_step=reset)
    rec = DormantRecycler(net, optimizers=opt, example_inputs=_batch(0)[0],
                          reset_adam_step=reset)
    return net, opt, ref, rec


#: two recyclings, the second overlapping the first (unit 5 restarts again)
RECYCLE = {8: [1, 5], 20: [2, 5]}


@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_recycled_slices_follow_per_element_step_adam(kind: str, weight_decay: float,
                                                      impl: str) -> None:
    net, opt, ref, rec = _setup(kind, impl, weight_decay=weight_decay)
    _train(net, opt, ref, rec, range(40), RECYCLE)
    _assert_equal(net, ref)
    assert tracked_slices(opt)  # still in warm-up: b2 = 0.999


@pytest.mark.parametrize("variant", [{"maximize": True}, {"amsgrad": True}])
def test_maximize_and_amsgrad(variant: dict[str, bool]) -> None:
    net, opt, ref, rec = _setup("AdamW", "foreach", weight_decay=0.1, **variant)
    _train(net, opt, ref, rec, range(30), RECYCLE)
    _assert_equal(net, ref)


def test_without_the_option_the_slice_keeps_the_tensors_step() -> None:
    net, opt, ref, rec = _setup("Adam", "foreach", reset=False)
    _train(net, opt, ref, rec, range(20), {8: [1, 5]})
    _assert_equal(net, ref)  # torch's one step per tensor: the reference without restarts
    assert not tracked_slices(opt) and not opt._optimizer_step_post_hooks
    # one step after the same recycling, with and without the option: only the recycled
    # slices moved differently (the producer rows get no gradient yet: their outgoing
    # weights are zero; the consumer columns do)
    runs = []
    for reset in (False, True):
        net, opt, ref, rec = _setup("Adam", "foreach", reset=reset)
        _train(net, opt, ref, rec, range(9), {8: [1, 5]})
        runs.append(net)
    off, on = (n[2].weight.detach() for n in runs)
    assert (off[:, [1, 5]] - on[:, [1, 5]]).abs().max() > 1e-3
    keep = [0, 2, 3, 4, 6, 7]
    assert torch.equal(off[:, keep], on[:, keep])
    assert torch.equal(runs[0][0].weight, runs[1][0].weight)


def test_first_update_after_recycling_is_lr_sized() -> None:
    """The symptom: with zero moments and a large step t, torch's first update is about
    (1 - b1) / sqrt(1 - b2) = 3.2 lr; restarted, it is lr (for |g| >> eps)."""
    moves = {}
    t = 3000
    for reset in (False, True):
        net, opt, _, rec = _setup("Adam", "for-loop", reset=reset)
        for i in range(6):
            if i == 5:  # a long run: the tensors' step is large
                for st in opt.state.values():
                    st["step"].fill_(t - 1)
                rec.recycle("1", units=[1, 5], step=i)
            before = net[2].weight.detach()[:, [1, 5]].clone()
            opt.zero_grad()
            x, y = _batch(i)
            _loss(net(x), y).backward()
            opt.step()
        moves[reset] = (net[2].weight.detach()[:, [1, 5]] - before).abs().flatten()
    moved = moves[True] > 0  # a column whose unit saw no input gets no gradient
    assert int(moved.sum()) >= 3 and torch.equal(moved, moves[False] > 0)
    torch.testing.assert_close(moves[True][moved], torch.full((int(moved.sum()),), LR,
                               dtype=torch.float64), rtol=1e-4, atol=0.0)
    ratio = (1 - 0.9) / (1 - 0.999) ** 0.5 * (1 - 0.999**t) ** 0.5 / (1 - 0.9**t)
    assert ratio > 3.0
    torch.testing.assert_close(moves[False][moved], moves[True][moved] * ratio,
                               rtol=1e-4, atol=0.0)


def test_slices_are_forgotten_after_the_warm_up() -> None:
    betas = (0.5, 0.6)
    horizon = 33  # smallest s with 0.6**s <= 2**-24
    assert 0.6**horizon <= NEGLIGIBLE < 0.6 ** (horizon - 1)
    net, opt, ref, rec = _setup("Adam", "foreach", betas=betas)
    seen: dict[int, int] = {}
    after: list[int] = []  # a user's post hook, registered after the tracker's below

    def count(i: int) -> None:
        seen[i] = sum(tracked_slices(opt).values())
        if i == 5:
            opt.register_step_post_hook(lambda *_: after.append(i))

    _train(net, opt, ref, rec, range(60), {5: [1, 5]}, check=count)
    # forgetting a slice leaves an error of at most NEGLIGIBLE x its update per step
    _assert_equal(net, ref, atol=60 * LR * NEGLIGIBLE * 10)
    elements = 2 * 4 + 2 + 3 * 2  # two rows, two biases, two columns
    # the step at i = 5 is the slices' first (s = 1), so s = i - 4 after step i
    assert seen[5] == seen[4 + horizon - 1] == elements
    assert seen[4 + horizon] == 0
    # The tracker's hook was not removed while torch iterated over the hooks (the next
    # one's step raised "OrderedDict mutated during iteration"): it stays, with nothing to
    # do, and the user's hook after it ran at every step to the end.
    assert len(after) == 60 - 6 and len(opt._optimizer_step_post_hooks) == 2


def test_device_side_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused/capturable optimizer keeps ``step`` on the device: the correction is then
    computed from tensors, never read on the host (forced here on the CPU)."""
    monkeypatch.setattr(adam_step_module, "_on_host", lambda step: False)
    net, opt, ref, rec = _setup("AdamW", "fused", weight_decay=0.1)
    _train(net, opt, ref, rec, range(30), RECYCLE)
    _assert_equal(net, ref)
    state = rec.state_dict()["adam_step"]
    assert {e["param"] for e in state} == set(NAMES) - {"2.bias"}


def test_runs_before_other_step_post_hooks() -> None:
    net, opt, ref, rec = _setup("Adam", "for-loop")
    seen: list[torch.Tensor] = []
    opt.register_step_post_hook(lambda o, a, k: seen.append(net[0].weight.detach().clone()))
    _train(net, opt, ref, rec, range(12), {8: [1, 5]})
    assert torch.equal(seen[-1], net[0].weight.detach())


def test_checkpoint_resumes_the_warm_up() -> None:
    net, opt, ref, rec = _setup("Adam", "foreach")
    _train(net, opt, ref, rec, range(12), {8: [1, 5]})
    buf = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "rec": rec.state_dict()}, buf)
    _train(net, opt, ref, rec, range(12, 30), {})
    _assert_equal(net, ref)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    for restore in (True, False):
        net2 = _net()
        net2.load_state_dict(ck["net"])
        opt2 = _optimizer(net2, "Adam", "foreach")
        opt2.load_state_dict(ck["opt"])
        rec2 = DormantRecycler(net2, optimizers=opt2, example_inputs=_batch(0)[0],
                               reset_adam_step=True)
        if restore:
            rec2.load_state_dict(ck["rec"])
        for i in range(12, 30):
            opt2.zero_grad()
            x, y = _batch(i)
            _loss(net2(x), y).backward()
            opt2.step()
        w, w2 = net[0].weight.detach(), net2[0].weight.detach()
        if restore:
            torch.testing.assert_close(w2, w, rtol=1e-12, atol=1e-14)
        else:  # without the remedy's state the slices fall back to the tensor's step
            assert (w2 - w).abs().max() > 1e-6


def test_state_waits_for_the_optimizers() -> None:
    """A Lightning restore gives the state before the optimizers: kept, applied at bind."""
    net, opt, ref, rec = _setup("Adam", "foreach")
    _train(net, opt, ref, rec, range(10), {8: [1, 5]})
    state = rec.state_dict()
    net2 = copy.deepcopy(net)
    opt2 = _optimizer(net2, "Adam", "foreach")
    opt2.load_state_dict(opt.state_dict())
    rec2 = DormantRecycler(net2, reset_adam_step=True)
    off = DormantRecycler(net2, optimizers=opt2)  # the option off: a checkpoint's slices ignored
    off.load_state_dict(state)
    assert not tracked_slices(opt2)
    rec2.load_state_dict(state)
    assert not tracked_slices(opt2)
    rec2.optimizers = [opt2]
    rec2._on_bind(None)  # what bind(doctor) runs
    assert {p: n for p, n in tracked_slices(opt2).items()} == {
        p2: tracked_slices(opt)[p] for p, p2 in zip(net.parameters(), net2.parameters(),
                                                    strict=True) if p in tracked_slices(opt)
    }


def test_other_optimizers_are_refused_before_anything_changes() -> None:
    net = _net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = _batch(0)[0]
    with pytest.raises(ReluDoctorError, match=r"reset_adam_step: .*Adam or AdamW.*SGD"):
        DormantRecycler(net, optimizers=sgd, reset_adam_step=True)
    with pytest.raises(ReluDoctorError, match="reset_adam_step"):
        ContinualBackprop(net, optimizers=sgd, reset_adam_step=True)
    with pytest.raises(ReluDoctorError, match="reset_adam_step"):
        TreatmentPlan(net, optimizer=sgd,
                      steps=(PlanStep("recycle", options={"reset_adam_step": True}),))
    with pytest.raises(ReluDoctorError, match="reset_adam_step: expected True or False"):
        DormantRecycler(net, reset_adam_step=1)
    amsgrad_ok = torch.optim.Adam(net.parameters(), amsgrad=True)
    assert DormantRecycler(net, optimizers=amsgrad_ok, reset_adam_step=True).adam_step.enabled
    before = [p.detach().clone() for p in net.parameters()]
    links = find_unit_links(net, site="1", example_inputs=x)
    with pytest.raises(ReluDoctorError, match="reset_adam_step"):
        recycle_units(links, units=[1], optimizers=sgd, reset_adam_step=True)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    # without the option, SGD's momentum slices are reset as before
    assert DormantRecycler(net, optimizers=sgd, example_inputs=x).recycle("1", units=[1]).details["units"] == [1]


def test_the_option_reaches_continual_backprop_and_the_plan() -> None:
    import relu_doctor

    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    plan = TreatmentPlan(net, optimizer=opt, steps=(
        PlanStep("recycle", options={"reset_adam_step": True}),
        PlanStep("continual_backprop", options={"reset_adam_step": True}),
    ))
    assert all(plan.remedy(n).adam_step.enabled  # type: ignore[attr-defined]
               for n in ("recycle", "continual_backprop"))
    x, y = _batch(0)
    with relu_doctor.watch(net, log_every_n_steps=1, every_n_steps=1) as doc:
        ContinualBackprop(net, optimizers=opt, replacement_rate=0.25, maturity=0, decay=0.0,
                          reset_adam_step=True).bind(doc)
        _loss(net(x), y).backward()
        opt.step()
        doc.step()
        events = doc.to_run().interventions()
    assert len(events) == 1 and "step" in events[0]["details"]["optimizer_state"]
    units = events[0]["details"]["units"]
    assert tracked_slices(opt)[net[0].weight] == len(units) * 4


def test_a_step_skipped_by_the_grad_scaler_leaves_the_slices_alone() -> None:
    """Fused Adam under a GradScaler: an inf gradient skips the step inside the kernel (the
    post-hook still runs); the slice's own step count must not move either."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.Adam(net.parameters(), lr=LR, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    rec = DormantRecycler(net, optimizers=opt, example_inputs=torch.randn(3, 4),
                          reset_adam_step=True)
    x = _batch(0)[0].float()

    def step(poison: bool = False) -> None:
        opt.zero_grad()
        scaler.scale(net(x).pow(2).sum()).backward()
        if poison:
            net[2].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    for _ in range(6):
        step()
    rec.recycle("1", units=[1, 5], step=6)
    before = [p.detach().clone() for p in net.parameters()]
    step(poison=True)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    step()  # the slices' first step: about lr * sign(g)
    moved = (net[2].weight.detach()[:, [1, 5]] - before[2][:, [1, 5]]).abs().flatten()
    moved = moved[moved > 0]
    assert len(moved) >= 3
    torch.testing.assert_close(moved, torch.full_like(moved, LR), rtol=1e-3, atol=0.0)


@pytest.mark.filterwarnings(*FILTERS)
def test_dormant_reset_callback_passes_the_option(tmp_path: Path) -> None:
    from relu_doctor.callbacks import DormantReset, ReluDoctor
    from tests.callbacks.remedy_models import interventions, loader, make, trainer

    mon = ReluDoctor(log_every_n_steps=4)
    cb = DormantReset(tau=0.5, include="net.1", reset_adam_step=True)
    tr = trainer(tmp_path, [mon, cb], max_steps=8)
    tr.fit(make(opt="adam", lr=1e-2, dead=6), loader())
    done = interventions(mon, "dormant_reset")
    assert done and all("step" in e["details"]["optimizer_state"] for e in done)
    assert tracked_slices(tr.optimizers[0])
    assert cb.state_dict()["adam_step"]
    with pytest.raises(ReluDoctorError, match=r"reset_adam_step: .*SGD"):
        trainer(tmp_path / "sgd", [ReluDoctor(log_every_n_steps=4),
                           DormantReset(reset_adam_step=True)], max_steps=2).fit(
            make(opt="sgd"), loader())


def test_an_optimizer_step_gone_back_warns_once_and_forgets_the_slices() -> None:
    from relu_doctor.errors import ReluDoctorWarning

    net, opt, ref, rec = _setup("Adam", "for-loop")
    _train(net, opt, ref, rec, range(10), {8: [1, 5]})
    for st in opt.state.values():  # as if an earlier optimizer state had been loaded
        st["step"].fill_(3.0)
    before = net[2].weight.detach().clone()
    with pytest.warns(ReluDoctorWarning, match="behind") as caught:
        opt.zero_grad()
        _loss(net(_batch(10)[0]), _batch(10)[1]).backward()
        opt.step()
    assert len([w for w in caught if "behind" in str(w.message)]) == 1
    assert not tracked_slices(opt) and not torch.equal(before, net[2].weight)
