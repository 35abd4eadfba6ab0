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
