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
def test_models_stepped_apart_are_one_flow_in_the_order_they_feed_each_other(
        fake_no_grad: bool) -> None:
    """A trial's generator and discriminator under one watch were one chain of sites in the
    order they first ran: with the fake made under torch.no_grad(), the discriminator's
    sites came first, and a generator whose output layer starts small read as a gradient
    growing 1e6x from the generator to the discriminator, a critical finding on which a
    bound LRRescuer cut the discriminator's learning rate. The generator feeds the
    discriminator (D(G(z)) in its step): they are one flow, the generator's sites first,
    whichever ran first; the same run reads the same either way: the gradient falls from
    the discriminator's last site to the generator's first."""
    doc = _train_gan(_Pair(), 4, fake_no_grad, tiny_g_output=True)
    frame = doc.to_pandas().set_index("site")
    g_rms, d_rms = frame.loc["G.1", "grad_rms"], frame.loc["D.3", "grad_rms"]
    assert 0 < g_rms < 1e-4 * d_rms
    assert doc.parts_seen == {"G.1": ("G", 0), "G.3": ("G", 0), "D.1": ("G", 1),
                              "D.3": ("G", 1)}
    found = [f for f in doc.findings() if f.site == "model"
             and f.kind in ("vanishing_gradient", "exploding_gradient")]
    assert [(f.kind, f.evidence["input_side"], f.evidence["output_side"]) for f in found] == [
        ("vanishing_gradient", "G.1", "D.3")]
    assert found[0].evidence["ratio"] == pytest.approx(g_rms / d_rms)


class _Chain(nn.Module):
    """An encoder and a decoder whose gradient grows 1e4x towards the input (orthogonal
    weights scaled 30x, slope 0.9), which a loop may call whole, part by part or layer by
    layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)

        def lin(scale: float) -> nn.Linear:
            layer = nn.Linear(16, 16)
            with torch.no_grad():
                layer.weight.copy_(torch.linalg.qr(torch.randn(16, 16))[0] * scale)
                layer.bias.zero_()
            return layer

        self.encoder = nn.Sequential(lin(1), nn.LeakyReLU(0.9), lin(30), nn.LeakyReLU(0.9))
        self.decoder = nn.Sequential(lin(30), nn.LeakyReLU(0.9), lin(30), nn.LeakyReLU(0.9),
                                     lin(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@pytest.mark.parametrize("how", ["whole", "parts", "layers"])
def test_one_chain_called_part_by_part_is_judged_whole(how: str) -> None:
    """A review: a loop calling encoder then decoder (a LightningModule's training_step),
    or the layers one by one, split into parts judged apart lost the exploding gradient
    the model called whole shows. Each part's passes are made from the one before's
    output: one flow, the same finding, of the same sites, whichever way it is called."""
    m = _Chain()
    with relu_doctor.watch(m, every_n_steps=1, overhead_budget=None,
                           log_every_n_steps=2) as doc:
        for _ in range(2):
            x = torch.randn(8, 16) * 1e-3
            if how == "whole":
                y = m(x)
            elif how == "parts":
                y = m.decoder(m.encoder(x).flatten(1))  # (an op between them, too)
            else:
                y = x
                for layer in [*m.encoder, *m.decoder]:
                    y = layer(y)
            y.sum().backward()
            doc.step()
    rms = doc.to_pandas().set_index("site")["grad_rms"]
    found = [f for f in doc.findings() if f.kind == "exploding_gradient"]
    assert [(f.evidence["input_side"], f.evidence["output_side"]) for f in found] == [
        ("encoder.1", "decoder.3")]
    assert found[0].evidence["ratio"] == pytest.approx(rms["encoder.1"] / rms["decoder.3"])
    assert found[0].evidence["ratio"] > 1e4


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
def test_the_gradient_is_judged_within_each_flow(g_in, g_out, kind, chained) -> None:
    """The diagnosis given two models trained apart (two flows): the discriminator's sites
    first (order 0, 1), the generator's after, 1e6x smaller: no comparison across them; a
    fall within the generator, or a generator no gradient reaches, is said of the
    generator. Given one flow of the two, the generator ranked first: the generator's
    first site is its input side, whichever ran first."""
    rows, by_order = rows_for([1.0, 1.0, g_in, g_out])
    names = ["D.1", "D.3", "G.1", "G.3"]
    for r, name in zip(rows, names, strict=True):
        r["site"] = name
    units = {name: by_order[f"s{i}"] for i, name in enumerate(names)}

    def said(parts: dict[str, tuple[str, int]] | None) -> list[Any]:
        return [f for f in diagnose(rows, units, DiagnosisConfig(), parts=parts)
                if f.kind in ("vanishing_gradient", "exploding_gradient")]

    found = said({"D.1": ("D", 0), "D.3": ("D", 0), "G.1": ("G", 0), "G.3": ("G", 0)})
    assert [f.kind for f in found] == ([kind] if kind else [])
    if kind:
        assert found[0].evidence["part"] == "G"
        assert found[0].evidence["input_side"] == "G.1"
        assert found[0].severity == ("critical" if g_out == 0 else "warning")
    # One chain in the order the sites first ran reads from D's first site to G's last.
    assert [f.kind for f in said(None)] == ([chained] if chained else [])
    # One flow, the generator feeding the discriminator: from G's first site to D's last.
    joined = said({"G.1": ("G", 0), "G.3": ("G", 0), "D.1": ("G", 1), "D.3": ("G", 1)})
    if g_in > 0:
        assert [(f.kind, f.evidence["input_side"], f.evidence["output_side"], "part" in
                 f.evidence) for f in joined] == [("vanishing_gradient", "G.1", "D.3", False)]


def test_a_part_sampled_in_eval_mode_is_not_training() -> None:
    """Under a watch of both models, a generator sampled in eval mode with gradients left
    on was counted as training (the container, whose mode decided, stayed in training
    mode): its statistics moved with the samples. The mode of the module a pass begins at
    decides now, as a watch of the generator alone did: the counts equal a run without
    the samples, and the pass left out is said once."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        plain = _train_gan(_Pair(), 3, True).to_pandas().set_index("site")
        assert not [w for w in said if "eval mode" in str(w.message)]
        sampled = _train_gan(_Pair(), 3, True, sample_eval=True).to_pandas().set_index("site")
    # said once: a part trained in eval mode, called on its own, is left out as well
    assert len([w for w in said if "begun at 'G', in eval mode" in str(w.message)]) == 1
    assert plain.loc["G.1", "elements"] == 3 * 32 * 16  # the generator's step's pass alone
    for col in ("elements", "dead", "sparsity", "mean_abs", "grad_rms"):
        assert sampled[col].to_dict() == plain[col].to_dict(), col


def _mlp(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, 8), nn.ReLU(), nn.Linear(8, n_out))


@pytest.mark.parametrize("between", ["direct", "affine", "cat"])
def test_how_parts_feed_each_other_decides_their_flows(between: str) -> None:
    """A review: parts were joined by the latest output of each, kept weakly, so an op
    between them that did not keep it (G(z) * 0.5 + 0.5) lost the link; a part feeding two
    (one generator, two discriminators) made one flow whose output side was whichever ran
    last, and a cycle (CycleGAN's two generators) ranks that grew without end. Outputs
    are tagged on their autograd nodes now; parts are joined along simple chains only,
    each part of a fork or a cycle judged on its own."""
    torch.manual_seed(0)
    pair = nn.Module()
    pair.G, pair.D, pair.E = _mlp(4, 2), _mlp(2, 1), _mlp(2, 1)
    pair.A, pair.B = _mlp(2, 2), _mlp(2, 2)

    def feed(g: torch.Tensor) -> torch.Tensor:
        return {"direct": g, "affine": g * 0.5 + 0.5,
                "cat": torch.cat([torch.randn(4, 2), g])}[between]

    with relu_doctor.watch(pair, every_n_steps=1, overhead_budget=None) as doc:
        pair.D(feed(pair.G(torch.randn(4, 4)))).sum().backward()  # a chain: G -> D
        chain = doc.probe.parts(doc.sites)
        pair.E(feed(pair.G(torch.randn(4, 4)))).sum().backward()  # a fork: G -> D, G -> E
        fork = doc.probe.parts(doc.sites)
        a2b = pair.B(feed(pair.A(torch.randn(4, 2))))  # a cycle: A -> B -> A
        pair.A(a2b).sum().backward()
        everything = doc.probe.parts(doc.sites)
        doc.step()
    assert chain == {"G.1": ("G", 0), "D.1": ("G", 1)}
    assert fork == {"G.1": ("G", 0), "D.1": ("D", 0), "E.1": ("E", 0)}
    assert {k: v for k, v in everything.items() if k in ("A.1", "B.1")} == {
        "A.1": ("A", 0), "B.1": ("B", 0)}
