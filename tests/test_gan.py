"""GAN training under one watch of both models (a trial's findings): a gradient penalty's
backward, models stepped apart, a generator sampled in eval mode with gradients on. Each
statistic is checked against the test's own hooks."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.diagnosis import DiagnosisConfig, diagnose
from tests.test_diagnosis import rows_for


class _Pair(nn.Module):
    """Both models in one container, as the README's GAN watch: no forward of its own,
    each model called on its own."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.G = nn.Sequential(nn.Linear(4, 16), act(), nn.Linear(16, 16), act(),
                               nn.Linear(16, 2))
        self.D = nn.Sequential(nn.Linear(2, 16), act(), nn.Linear(16, 16), act(),
                               nn.Linear(16, 1))


class _GradRecorder:
    """The test's reference: each activation's output gradients, tagged by the phase set
    while they arrive (``phase``), from the passes made while ``on``."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.on, self.phase = True, ""
        self.grads: list[tuple[str, str, torch.Tensor]] = []
        for name, m in modules.items():
            m.register_forward_hook(self._tap(name))

    def _tap(self, name: str) -> Any:
        def fwd(m: nn.Module, args: Any, out: torch.Tensor) -> None:
            if self.on and out.requires_grad:
                out.register_hook(lambda g: self.grads.append((name, self.phase, g.detach())))
        return fwd

    def rms_and_zeros(self, name: str, phases: set[str]) -> tuple[float, float]:
        gs = torch.cat([g.flatten() for n, p, g in self.grads if n == name and p in phases])
        return math.sqrt(float(gs.double().square().mean())), float((gs == 0).double().mean())


@pytest.mark.parametrize("paused", [False, True], ids=["penalty-watched", "penalty-paused"])
def test_a_gradient_penalty_backward_is_left_out_of_the_gradient_statistics(paused: bool) -> None:
    """WGAN-GP's penalty, torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True),
    reached the critic's gradient taps: its dD/dh, 37x the loss's gradient, was pooled into
    grad_rms. A backward made with create_graph=True is left out now (one warning); under
    doc.paused() the penalty's pass is left out altogether (its outer-backward zeros too)."""
    pair = _Pair(nn.LeakyReLU)
    ref = _GradRecorder({"D.1": pair.D[1], "D.3": pair.D[3]})
    opt_d = torch.optim.Adam(pair.D.parameters(), 1e-3)
    with relu_doctor.watch(pair, every_n_steps=1, overhead_budget=None,
                           log_every_n_steps=3) as doc, \
            warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(3):
            real = torch.randn(32, 2)
            with torch.no_grad():
                fake = pair.G(torch.randn(32, 4))
            ref.phase = "loss"
            loss = pair.D(fake).mean() - pair.D(real).mean()
            eps = torch.rand(32, 1)
            x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
            with doc.paused() if paused else _nothing():
                ref.on = not paused
                out = pair.D(x_hat)
                ref.phase = "penalty"
                grad, = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
                ref.on = True
            ref.phase = "loss"
            loss = loss + 10 * ((grad.norm(2, dim=1) - 1) ** 2).mean()
            opt_d.zero_grad()
            loss.backward()
            opt_d.step()
            doc.step()
    frame = doc.to_pandas().set_index("site")
    for site, name in (("D.1", "D.1"), ("D.3", "D.3")):
        rms, zeros = ref.rms_and_zeros(name, {"loss"})
        assert frame.loc[site, "grad_rms"] == pytest.approx(rms, rel=1e-5)
        assert frame.loc[site, "grad_zero_fraction"] == pytest.approx(zeros, abs=1e-9)
        with_penalty, _ = ref.rms_and_zeros(name, {"loss", "penalty"}) if not paused else (0, 0)
        assert paused or with_penalty > 5 * rms  # (what was counted before)
    about = [w for w in said if "create_graph=True" in str(w.message)]
    assert len(about) == (0 if paused else 1)
    if not paused:  # the penalty pass's zeros from the loss's backward (LeakyReLU'' = 0)
        assert frame.loc["D.1", "grad_zero_fraction"] > 0.3


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _train_gan(pair: _Pair, steps: int, fake_no_grad: bool, sample_eval: bool = False,
               tiny_g_output: bool = False) -> relu_doctor.Doctor:
    torch.manual_seed(0)
    if tiny_g_output:
        with torch.no_grad():
            pair.G[4].weight.mul_(1e-6)  # the gradient reaching G is ~1e6 smaller than D's
    opt_g = torch.optim.SGD(pair.G.parameters(), 1e-9 if tiny_g_output else 1e-2)
    opt_d = torch.optim.SGD(pair.D.parameters(), 1e-2)
    bce = nn.BCEWithLogitsLoss()
    with relu_doctor.watch(pair, every_n_steps=1, overhead_budget=None,
                           log_every_n_steps=steps, optimizer=[opt_d, opt_g]) as doc:
        for _ in range(steps):
            if fake_no_grad:
                with torch.no_grad():
                    fake = pair.G(torch.randn(32, 4))
            else:
                fake = pair.G(torch.randn(32, 4)).detach()
            loss_d = bce(pair.D(torch.randn(32, 2)).squeeze(1), torch.ones(32)) + bce(
                pair.D(fake).squeeze(1), torch.zeros(32))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = bce(pair.D(pair.G(torch.randn(32, 4))).squeeze(1), torch.ones(32))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            doc.parts_seen = doc.probe.parts(doc.sites)  # (the window's: before it closes)
            if sample_eval:  # a sample for a figure, in eval mode, gradients left on (a slip)
                pair.G.eval()
                pair.G(torch.randn(500, 4, generator=torch.Generator().manual_seed(1)))
                pair.G.train()
            doc.step()
    return doc


@pytest.mark.parametrize("fake_no_grad", [False, True], ids=["detach", "no_grad"])
def test_models_stepped_apart_have_their_gradients_compared_within_each(
        fake_no_grad: bool) -> None:
    """A trial's generator and discriminator under one watch were one chain of sites in the
    order they first ran: with the fake made under torch.no_grad(), the discriminator's
    sites came first, and a generator whose output layer starts small read as a gradient
    growing 1e5x from the generator to the discriminator, a critical finding on which a
    bound LRRescuer cut the discriminator's learning rate. The gradient's fall or growth
    is measured within each model now: the same run reads the same either way."""
    doc = _train_gan(_Pair(), 4, fake_no_grad, tiny_g_output=True)
    frame = doc.to_pandas().set_index("site")
    g_rms, d_rms = frame.loc["G.3", "grad_rms"], frame.loc["D.1", "grad_rms"]
    assert 0 < g_rms < 1e-4 * d_rms  # what a single chain compared
    assert doc.parts_seen == {"G.1": "G", "G.3": "G", "D.1": "D", "D.3": "D"}
    kinds = {f.kind for f in doc.findings() if f.site == "model"}
    assert not kinds & {"vanishing_gradient", "exploding_gradient"}, doc.findings()


def test_a_model_watched_whole_is_one_part() -> None:
    """A model called as a whole (its own forward) is one part, whatever submodule it
    calls: Probe.parts is empty, and the diagnosis compares all its sites."""
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    with relu_doctor.watch(model, every_n_steps=1, overhead_budget=None) as doc:
        model(torch.randn(4, 2)).sum().backward()
        model[:2](torch.randn(4, 2)).sum().backward()  # a part called alone, too
        doc.step()
        assert doc.probe.parts(doc.sites) == {}


@pytest.mark.parametrize(("g_in", "g_out", "kind", "chained"), [
    # falls within the generator: said, of it
    (1e-12, 1e-6, "vanishing_gradient", "exploding_gradient"),
    # none reaches the generator at all: critical (a single chain said nothing)
    (0.0, 0.0, "vanishing_gradient", None),
    # flat within each: nothing, however far apart
    (1e-6, 1e-6, None, "exploding_gradient"),
])
def test_the_gradient_is_judged_within_each_part(g_in, g_out, kind, chained) -> None:
    """The diagnosis given parts: the discriminator's sites first (order 0, 1), the
    generator's after, 1e6x smaller: no model-wide comparison across them; a fall within
    the generator, or a generator no gradient reaches, is said of the generator."""
    rows, by_order = rows_for([1.0, 1.0, g_in, g_out])
    names = ["D.1", "D.3", "G.1", "G.3"]
    for r, name in zip(rows, names, strict=True):
        r["site"] = name
    units = {name: by_order[f"s{i}"] for i, name in enumerate(names)}
    parts = {"D.1": "D", "D.3": "D", "G.1": "G", "G.3": "G"}
    found = [f for f in diagnose(rows, units, DiagnosisConfig(), parts=parts)
             if f.kind in ("vanishing_gradient", "exploding_gradient")]
    assert [f.kind for f in found] == ([kind] if kind else [])
    if kind:
        assert found[0].evidence["part"] == "G"
        assert found[0].evidence["input_side"] == "G.1"
        assert found[0].severity == ("critical" if g_out == 0 else "warning")
    # One chain (no parts) reads the same rows from D's first site to G's last, as before.
    assert [f.kind for f in diagnose(rows, units, DiagnosisConfig())
            if f.kind in ("vanishing_gradient", "exploding_gradient")] == (
        [chained] if chained else [])


def test_a_part_sampled_in_eval_mode_is_not_training() -> None:
    """Under a watch of both models, a generator sampled in eval mode with gradients left
    on was counted as training (the container, whose mode decided, stayed in training
    mode): its statistics moved with the samples. The mode of the module a pass begins at
    decides now, as a watch of the generator alone did: the counts equal a run without
    the samples."""
    plain = _train_gan(_Pair(), 3, True).to_pandas().set_index("site")
    sampled = _train_gan(_Pair(), 3, True, sample_eval=True).to_pandas().set_index("site")
    assert plain.loc["G.1", "elements"] == 3 * 32 * 16  # the generator's step's pass alone
    for col in ("elements", "dead", "sparsity", "mean_abs", "grad_rms"):
        assert sampled[col].to_dict() == plain[col].to_dict(), col
