"""The zoo: small models with one real architecture's trait each, checked site by site and
unit by unit against brute-force references (tests/reference.py for modules,
tests/reference_functional.py for functional calls), forward and gradient statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relu_doctor
from tests import zoo
from tests.reference import Recorder, expected_stats, site_names
from tests.reference_functional import assert_matches, reference_calls, site_fields


def _train(model: nn.Module, xs: list[torch.Tensor]) -> None:
    for x in xs:
        model(x).pow(2).mean().backward()


def _module_reference(model: nn.Module, xs: list[torch.Tensor]) -> tuple[Recorder, dict]:
    twin = copy.deepcopy(model)
    rec = Recorder(twin)
    try:
        _train(twin, xs)
    finally:
        rec.remove()
    return rec, site_names(rec)


def _check_modules(model: nn.Module, xs: list[torch.Tensor], expect_names: list[str], **watch) -> relu_doctor.Doctor:
    rec, names = _module_reference(model, xs)
    with relu_doctor.watch(model, log_every_n_steps=100, **watch) as doc:
        _train(model, xs)
    assert [s.name for s in doc.sites if s.kind == "module"] == expect_names
    assert sorted(names.values()) == sorted(expect_names)
    for (path, idx), name in names.items():
        site = doc.probe.site(name)
        cap = site.family.cap_of(model.get_submodule(path))
        assert_matches(site, expected_stats(rec.calls[(path, idx)], site.unit_dim, cap=cap))
    return doc


def _inputs(shape: tuple[int, ...], n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# ---------------------------------------------------------------------- module sites


def test_basic_block_reused_inplace_relu() -> None:
    torch.manual_seed(0)
    doc = _check_modules(zoo.BasicBlock(), _inputs((4, 8, 6, 6)), ["relu#0", "relu#1"])
    assert all(s.reused for s in doc.sites)


def test_bottleneck_three_calls_on_different_widths() -> None:
    torch.manual_seed(0)
    doc = _check_modules(zoo.Bottleneck(), _inputs((4, 16, 5, 5)), ["relu#0", "relu#1", "relu#2"])
    assert [s.units for s in doc.sites] == [4, 8, 16]


def test_resnet_stem_and_blocks() -> None:
    torch.manual_seed(0)
    _check_modules(
        zoo.ResNetish(),
        _inputs((2, 3, 8, 8)),
        ["stem.2", "layer1.0.relu#0", "layer1.0.relu#1", "layer1.1.relu#0", "layer1.1.relu#1"],
    )


def test_inverted_residual_relu6_saturates() -> None:
    torch.manual_seed(0)
    net = zoo.InvertedResidual()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(4.0)  # BN outputs ~N(0, 16): some pass the cap of 6
    doc = _check_modules(net, _inputs((4, 8, 5, 5)), ["block.2", "block.5"])
    for s in doc.sites:
        assert (s.family.name, s.cap) == ("relu6", 6.0)
        assert site_fields(s)["saturated"].sum() > 0


def test_gelu_mlp() -> None:
    torch.manual_seed(0)
    doc = _check_modules(zoo.gelu_mlp(), _inputs((16, 10)), ["1", "3"])
    assert all(s.family.name == "gelu" for s in doc.sites)


def test_sequence_outputs_use_the_last_dim() -> None:
    torch.manual_seed(0)
    doc = _check_modules(zoo.SequenceModel(), _inputs((3, 5, 12)), ["act"])
    assert (doc.sites[0].unit_dim, doc.sites[0].units) == (2, 24)


# ---------------------------------------------------------------------- functional sites


def test_dense_block_functional_relu() -> None:
    torch.manual_seed(0)
    net = zoo.DenseBlock()
    xs = _inputs((2, 8, 5, 5))
    ref = reference_calls(net, [(F, "relu", "relu")], lambda m: _train(m, xs))
    with relu_doctor.watch(net, functional=True) as doc:
        _train(net, xs)
    assert [s.name for s in doc.sites] == ["0:relu#0", "0:relu#1", "1:relu#0", "1:relu#1"]
    assert [s.units for s in doc.sites] == [8, 16, 12, 16]
    for (path, op, idx), cap in ref.items():
        assert_matches(doc.probe.site(f"{path}:{op}#{idx}"), expected_stats(cap, 1))


def test_transformer_encoder_layer_default_activation() -> None:
    torch.manual_seed(0)
    net = zoo.transformer_layer()
    net.train()
    xs = _inputs((3, 5, 16))
    ref = reference_calls(net, [(net, "activation", "relu")], lambda m: _train(m, xs))
    with relu_doctor.watch(net, functional=True) as doc:
        _train(net, xs)
    assert [s.name for s in doc.sites] == ["(root):relu#0"]
    site = doc.sites[0]
    assert (site.unit_dim, site.units, site.kind) == (2, 32, "functional")
    assert_matches(site, expected_stats(ref[("", "relu", 0)], 2))


def test_transformer_in_an_encoder_eval_mode() -> None:
    # Eval + no_grad would take PyTorch's fused fast path, where no F.relu is visible; with
    # functional capture on, the layer sees a TorchFunctionMode and takes the regular path
    # (same outputs), so the activation is still recorded.
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(zoo.transformer_layer(), num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        plain = enc(x)
        with relu_doctor.watch(enc, eval_stream=True, gradients=False) as doc:
            watched = enc(x)
    torch.testing.assert_close(watched, plain, rtol=1e-5, atol=1e-5)
    # An eval pass: out of the training stream, in the evaluation stream.
    assert doc.sites == []
    assert [s.name for s in doc.eval.sites] == ["layers.0:relu#0", "layers.1:relu#0"]


# ---------------------------------------------------------------------- reuse and inplace


@pytest.mark.parametrize("make", [zoo.BasicBlock, zoo.Bottleneck], ids=["basic", "bottleneck"])
def test_inplace_relu_equals_out_of_place(make) -> None:
    torch.manual_seed(0)
    inplace = make()
    outplace = copy.deepcopy(inplace)
    outplace.relu = nn.ReLU(inplace=False)
    x_shape = (4, 8, 5, 5) if make is zoo.BasicBlock else (4, 16, 5, 5)
    xs = _inputs(x_shape)
    fields = []
    for net in (inplace, outplace):
        with relu_doctor.watch(net) as doc:
            _train(net, xs)
        fields.append({s.name: site_fields(s) for s in doc.sites})
    assert fields[0].keys() == fields[1].keys()
    for name in fields[0]:
        for f, v in fields[0][name].items():
            assert (v == fields[1][name][f]).all(), (name, f)


class _PartGate(nn.Module):
    """A ReLU on a part of a layer's output, the loss taken on the whole of it: inplace on a
    view of it, or out of place with the parts put back together (the twin)."""

    def __init__(self, inplace: bool, part: str) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 12)
        self.act = nn.ReLU(inplace=inplace)
        self.inplace, self.part = inplace, part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.part == "columns":
            if self.inplace:
                self.act(h[:, 4:8])
                return h
            return torch.cat([h[:, :4], self.act(h[:, 4:8]), h[:, 8:]], 1)
        v = h.view(-1, 3, 4)  # a view of a view
        if self.inplace:
            self.act(v[:, 1])
            return h
        return torch.stack([v[:, 0], self.act(v[:, 1]), v[:, 2]], 1).view(-1, 12)


@pytest.mark.parametrize("part", ["columns", "view of a view"])
def test_inplace_relu_on_a_view_equals_out_of_place_gradients_included(part) -> None:
    """The view's own backward node runs only when the loss goes through the view: with
    the loss on the base, its gradient statistics were not recorded (NaN). They are now
    read from the base's gradients, cut to the view, and equal the twin's."""
    torch.manual_seed(0)
    inplace = _PartGate(True, part)
    outplace = _PartGate(False, part)
    outplace.load_state_dict(inplace.state_dict())
    xs = _inputs((5, 6), n=3)
    fields = []
    for net in (inplace, outplace):
        with relu_doctor.watch(net, every_n_steps=1) as doc:
            _train(net, xs)
        fields.append({s.name: site_fields(s) for s in doc.sites})
    assert list(fields[0]) == ["act"] and fields[0].keys() == fields[1].keys()
    assert fields[0]["act"]["grad_elements"].tolist() == [15.0] * 4
    for f, v in fields[0]["act"].items():
        assert (v == fields[1]["act"][f]).all(), f


def test_reused_module_sites_never_mix() -> None:
    # One ReLU module on three widths; each site only ever sees its own width, step after step.
    torch.manual_seed(0)
    net = zoo.Bottleneck()
    with relu_doctor.watch(net) as doc:
        _train(net, _inputs((2, 16, 4, 4), n=3))
    for s, width in zip(doc.sites, [4, 8, 16], strict=True):
        f = site_fields(s)
        assert f["elements"].tolist() == [3 * 2 * 16.0] * width
        assert f["grad_elements"].tolist() == [3 * 2 * 16.0] * width
