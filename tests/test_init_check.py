"""check_init against a brute-force forward pass: second moments per depth, He et al.'s
prediction from the weights, born-dead units, and the recommendations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.errors import ReluDoctorError


def _mlp(depth: int, width: int, *, he: bool, bias: float | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    d = 16
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if he:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        if bias is not None:
            nn.init.constant_(lin.bias, bias)
        layers += [lin, nn.ReLU()]
        d = width
    return nn.Sequential(*layers)


def test_second_moments_match_a_brute_force_forward() -> None:
    net = _mlp(4, 32, he=False)
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(1))
    report = relu_doctor.check_init(net, x)
    h = x
    moments, dead = [], []
    for i in range(4):
        h = torch.relu(net[2 * i](h)).detach()
        moments.append(float(h.double().pow(2).mean()))
        dead.append(int((h <= 0).all(0).sum()))
    assert [s["site"] for s in report.sites] == ["1", "3", "5", "7"]
    assert [s["second_moment"] for s in report.sites] == pytest.approx(moments, rel=1e-6)
    assert [s["born_dead"] for s in report.sites] == dead
    assert [s["he_ratio"] for s in report.sites] == pytest.approx([m / moments[0] for m in moments])
    # He et al.'s recursion with the actual weight variances (fan_in * Var(w) / 2 per layer)
    pred = 1.0
    for i, s in enumerate(report.sites):
        if i:
            w = net[2 * i].weight.detach().double()
            pred *= w.shape[1] * float(w.var(unbiased=False)) / 2
        assert s["predicted_ratio"] == pytest.approx(pred)


def test_default_init_of_a_deep_mlp_shrinks_and_he_init_holds() -> None:
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(2))
    deep = relu_doctor.check_init(_mlp(20, 256, he=False), x)
    kinds = {f.kind for f in deep.findings}
    assert "init_shrinks" in kinds and not deep.ok
    assert "He initialisation" in next(f.remedy for f in deep.findings if f.kind == "init_shrinks")
    he = relu_doctor.check_init(_mlp(20, 256, he=True), x)
    assert "init_shrinks" not in {f.kind for f in he.findings}
    last = he.sites[-1]
    # He-initialised layers keep E[h^2] constant in expectation (finite width adds a random
    # walk of about e^+-1 over 20 layers of 256), as He et al.'s recursion predicts
    assert 0.1 < last["he_ratio"] < 10 and math.isclose(last["predicted_ratio"], 1.0, rel_tol=0.3)


def test_a_last_site_that_is_all_zero_is_a_finding_not_a_crash() -> None:
    """Its second moment is 0, so the shrink ratio is too: the message divided by it
    (ZeroDivisionError, which killed a Lightning run through the treatment's check)."""
    net = _mlp(2, 8, he=False)
    with torch.no_grad():
        net[2].bias.fill_(-100.0)
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    report = relu_doctor.check_init(net, x)
    assert float(torch.relu(net[2](torch.relu(net[0](x)))).abs().max()) == 0.0  # (own check)
    assert report.sites[-1]["second_moment"] == 0.0 and report.sites[-1]["he_ratio"] == 0.0
    shrink = next(f for f in report.findings if f.kind == "init_shrinks")
    assert shrink.site == "3" and "falls to zero from 1 to this site" in shrink.message


def test_negative_bias_is_born_dead_with_the_tutorials_remedies() -> None:
    report = relu_doctor.check_init(_mlp(2, 8, he=False, bias=-5.0), torch.randn(64, 16))
    f = next(f for f in report.findings if f.kind == "born_dead" and f.site == "1")
    assert f.evidence["born_dead"] == 8 and f.severity == "warning"
    assert "LeakyReLU" in f.remedy and "bias" in f.remedy and "BatchNorm" in f.remedy
    assert "born dead" in str(report)


def test_a_frozen_pretrained_part_is_told_no_initialisation_advice() -> None:
    """A fine-tuning trial's frozen backbone: its dead units were "born dead" with advice to
    use He initialisation, and its depth "shrinks 15.7x ... use He initialisation". A layer
    none of whose weights trains is said as information, and no depth finding goes
    through it; once it trains, the advice is back."""
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(2))
    net = _mlp(20, 256, he=False)  # (it shrinks: see above)
    with torch.no_grad():
        net[0].bias[:8] = -50.0  # 8 units born dead at the first site
    trains = relu_doctor.check_init(net, x)
    assert {"born_dead", "init_shrinks"} <= {f.kind for f in trains.findings}
    net.requires_grad_(False)
    frozen = relu_doctor.check_init(net, x)
    born = [f for f in frozen.findings if f.kind == "born_dead"]
    assert born and all(f.severity == "info" and "does not train" in f.message
                        and "He" not in f.remedy for f in born)
    assert [f.site for f in born] == [f.site for f in trains.findings if f.kind == "born_dead"]
    assert "init_shrinks" not in {f.kind for f in frozen.findings} and frozen.ok
    assert all(r["frozen"] for r in frozen.sites) and not any(r["frozen"] for r in trains.sites)


def test_after_a_frozen_stem_the_depth_is_measured_and_an_adapter_unfreezes() -> None:
    """A review: one frozen stem hid the shrink of the trainable layers after it (the depth
    finding is of the sites after the last frozen one now); and a frozen base layer beside
    a trainable adapter (LoRA) was called frozen, though the adapter moves its units (the
    Doctor's rule, sites.frozen_feed, says it is not)."""
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Linear(16, 256), nn.ReLU()).requires_grad_(False)  # a block
    net = nn.Sequential(stem, *[m for _ in range(19) for m in (nn.Linear(256, 256), nn.ReLU())])
    report = relu_doctor.check_init(net, x)
    shrink = next(f for f in report.findings if f.kind == "init_shrinks")
    second = report.sites[1]
    assert report.sites[0]["frozen"] and not second["frozen"]
    assert f"from {second['site']} to this site" in shrink.message
    assert shrink.evidence["he_ratio"] == pytest.approx(
        report.sites[-1]["second_moment"] / second["second_moment"])

    class Adapted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base_layer = nn.Linear(16, 8).requires_grad_(False)
            self.lora_A, self.lora_B = nn.Linear(16, 2, bias=False), nn.Linear(2, 8, bias=False)
            with torch.no_grad():
                self.base_layer.bias[:4] = -50.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base_layer(x) + self.lora_B(self.lora_A(x))

    lora = nn.Sequential(Adapted(), nn.ReLU())
    born = next(f for f in relu_doctor.check_init(lora, x).findings if f.kind == "born_dead")
    assert "does not train" not in born.message and born.evidence["born_dead"] == 4


def test_a_layer_with_he_initialisation_is_not_told_to_use_it() -> None:
    """Born-dead units behind a He-initialised layer were told "use He initialisation";
    it says the layer has it, and what is left to check."""
    torch.manual_seed(0)
    he = relu_doctor.check_init(_mlp(2, 8, he=True, bias=-5.0), torch.randn(64, 16))
    f = next(f for f in he.findings if f.kind == "born_dead" and f.site == "1")
    assert "already have He initialisation" in f.remedy and "use He initialisation" not in f.remedy
    default = relu_doctor.check_init(_mlp(2, 8, he=False, bias=-5.0), torch.randn(64, 16))
    f = next(f for f in default.findings if f.kind == "born_dead" and f.site == "1")
    assert "use He initialisation" in f.remedy


def test_training_mode_is_kept_and_hooks_removed() -> None:
    net = _mlp(2, 8, he=True)
    net.train()
    relu_doctor.check_init(net, (torch.randn(4, 16),))
    assert net.training
    assert all(not m._forward_hooks for m in net.modules())


def test_errors_name_the_argument() -> None:
    with pytest.raises(ReluDoctorError, match="model"):
        relu_doctor.check_init("net", torch.randn(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ReluDoctorError, match="batch"):
        relu_doctor.check_init(_mlp(1, 4, he=True), None)


class _Functional(nn.Module):
    """A module used twice and a functional ReLU whose producer has units born dead."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 16)
        with torch.no_grad():
            self.fc.bias[:5] = -100.0  # five units never active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.act(self.conv(x)))
        return torch.nn.functional.relu(self.fc(h.mean((2, 3))))


def test_functional_calls_and_a_reused_module_are_checked_under_the_doctors_names() -> None:
    """The sites of watch(): a functional ReLU was skipped ("init check: ok" on a layer with
    five units born dead), and a module called twice was one site."""
    net = _Functional()
    x = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    report = relu_doctor.check_init(net, x)
    with torch.no_grad():  # the test's own forward
        a = torch.relu(net.conv(x))
        b = torch.relu(a)
        c = torch.relu(net.fc(b.mean((2, 3))))
    expected = {"act#0": (a, 1), "act#1": (b, 1), "(root):relu#0": (c, 1)}
    assert [s["site"] for s in report.sites] == list(expected)
    for s in report.sites:
        h, dim = expected[s["site"]]
        never = (h.movedim(dim, 0).reshape(h.shape[dim], -1) <= 0).all(1)
        assert s["units"] == h.shape[dim]
        assert s["born_dead"] == int(never.sum())
        assert s["born_dead_units"] == [int(i) for i in torch.nonzero(never).flatten()]
        assert s["second_moment"] == pytest.approx(float(h.double().pow(2).mean()), rel=1e-6)
    assert report.sites[2]["born_dead"] >= 5 and not report.ok
    f = next(f for f in report.findings if f.kind == "born_dead" and f.site == "(root):relu#0")
    assert f.evidence["born_dead"] == report.sites[2]["born_dead"]
    # the Doctor's own names for the same sites
    with relu_doctor.watch(net, every_n_steps=1, overhead_budget=None) as doc:
        net(x).sum().backward()
        doc.step()
        assert [r["site"] for r in doc.current().site_rows] == list(expected)


@pytest.mark.parametrize("reader", ["check_init", "scan"])
def test_its_pass_changes_no_state_and_no_watch_records_it(reader: str) -> None:
    """In train mode with BatchNorm and dropout, inside a watch of both streams: the running
    statistics, the batch counter and the RNG's stream are as they were, and the watch's
    windows hold only the user's own pass."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
                        nn.Linear(16, 2))
    x = torch.randn(32, 8)
    with relu_doctor.watch(net, eval_stream=True, overhead_budget=None) as doc:
        net(x).sum().backward()  # the user's one training pass
        buffers = {k: v.clone() for k, v in net.state_dict().items()}
        rng = torch.random.get_rng_state()
        if reader == "check_init":
            assert relu_doctor.check_init(net, x).sites
        else:
            assert not relu_doctor.scan(net, [x, x]).sites.empty
        assert all(torch.equal(buffers[k], v) for k, v in net.state_dict().items())
        assert torch.equal(rng, torch.random.get_rng_state())
        rec = doc.current()
        assert rec is not None and rec.site_rows[0]["elements"] == 32 * 16  # one pass
        assert doc.eval is not None and doc.eval.probe.passes == 0


def test_a_parametrized_weight_read_for_the_prediction_changes_no_state() -> None:
    """Reading a spectral-normed layer's weight for the He prediction, after the pass, ran
    its power iteration in training mode: its u and v buffers moved, and the model's
    outputs with them (a trial). Read with the state kept, as the pass is."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    net = nn.Sequential(spectral_norm(nn.Linear(6, 8)), nn.ReLU(),
                        spectral_norm(nn.Linear(8, 8)), nn.ReLU()).train()
    x = torch.randn(16, 6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    relu_doctor.check_init(net, x)
    after = net.state_dict()
    assert [k for k, v in before.items() if not torch.equal(v, after[k])] == []
    assert net.training
    # only the sites' producers are read: a lazy head the batch never reaches stays unread
    # (reading every module's weight raised on it: a review)

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            self.head_b = nn.LazyLinear(3)  # task b's, not run here

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    assert [r["site"] for r in relu_doctor.check_init(TwoHeads(), torch.randn(8, 4)).sites] == [
        "body.1"]


def test_a_buffer_the_module_replaces_is_put_back_too() -> None:
    """A running average written ``self.ema = 0.9 * self.ema + ...`` replaces its buffer
    instead of changing it: after check_init the module holds its own tensor, unchanged."""

    class Ema(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("ema", torch.zeros(16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.ema = 0.9 * self.ema + 0.1 * x.detach().mean(0)
            return x

    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Ema(), nn.Linear(16, 2))
    net(torch.randn(4, 8))
    before = net[2].ema
    saved = before.clone()
    relu_doctor.check_init(net, torch.randn(32, 8))
    assert net[2].ema is before and torch.equal(net[2].ema, saved)


@pytest.mark.parametrize("reader", ["check_init", "scan"])
def test_a_qat_models_observers_resized_in_the_pass_are_put_back(reader: str) -> None:
    """A trial's model just prepared for quantization-aware training: its per-channel
    observers' min/max buffers start empty and are resized by the first pass, so putting
    them back raised (size 16 against 0) and left the pass's observer updates in the model
    (44 of 95 entries changed 50 steps later). Every buffer is put back, shape and value:
    the state and the next training steps are as without the call."""
    import torch.ao.quantization as tq

    def prepared() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 4)).train()
        m = tq.fuse_modules_qat(m, [["0", "1", "2"]])
        m.qconfig = tq.get_default_qat_qconfig("x86")
        return tq.prepare_qat(m)

    def train(m: nn.Module) -> dict[str, torch.Tensor]:
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        for _ in range(3):
            m(torch.randn(4, 3, 8, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return m.state_dict()

    x = torch.randn(4, 3, 8, 8)
    model = prepared()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(v.numel() == 0 for v in before.values())  # (the empty observers)
    if reader == "check_init":
        assert relu_doctor.check_init(model, x).sites
    else:
        assert not relu_doctor.scan(model, [x]).sites.empty
    after = model.state_dict()
    assert [k for k, v in before.items() if v.shape != after[k].shape
            or not torch.equal(v, after[k])] == []
    trained, plain = train(model), train(prepared())
    assert [k for k, v in plain.items() if not torch.equal(v, trained[k])] == []


class _DeclaredApart(nn.Module):
    """Layers declared in another order than the forward runs them (all Linears, then all
    ReLUs), one activation module reused twice and a functional call: the layer feeding each
    site is the one the pass runs, not the last Linear declared before the activation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(32, 32) for _ in range(4))
        self.a1, self.act = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc2(self.a1(self.fc1(x))))
        x = self.act(self.fc3(x))
        return torch.relu(self.fc4(x))


def test_the_prediction_follows_the_layer_that_feeds_each_site() -> None:
    torch.manual_seed(0)
    net = _DeclaredApart()
    layers = [net.fc1, net.fc2, net.fc3, net.fc4]
    with torch.no_grad():
        for i, fc in enumerate(layers):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            fc.weight.mul_(0.5 ** i)  # each layer its own gain: 1, 1/4, 1/16, 1/64
            fc.bias.zero_()
    gains = [fc.weight[0].numel() * fc.weight.double().var(unbiased=False).item() / 2 for fc in layers]
    report = relu_doctor.check_init(net, torch.randn(512, 32))
    got = {s["site"]: s["predicted_ratio"] for s in report.sites}
    assert list(got) == ["a1", "act#0", "act#1", "(root):relu#0"]
    want = [1.0, gains[1], gains[1] * gains[2], gains[1] * gains[2] * gains[3]]
    assert list(got.values()) == pytest.approx(want)
