"""Functional capture: F.relu and friends called inside a module's forward.

Every statistic is checked against tests/reference_functional.py, which patches the op with a
recording wrapper (no TorchFunctionMode, no module hooks) and counts in float64 numpy.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relu_doctor
from relu_doctor.errors import ReluDoctorError
from relu_doctor.functional import FunctionalCapture, functional_ops
from relu_doctor.probes import Probe
from tests import zoo
from tests.reference import expected_stats
from tests.reference_functional import assert_matches, reference_calls, site_fields


def _train(model: nn.Module, xs: list[torch.Tensor], doc: relu_doctor.Doctor | None = None) -> None:
    for x in xs:
        model(x).float().pow(2).mean().backward()
        if doc is not None:
            doc.step()


def _names(doc: relu_doctor.Doctor) -> list[str]:
    return [s.name for s in doc.sites]


# ---------------------------------------------------------------------- one net per op


OWNERS = {"F": F, "torch": torch, "Tensor": torch.Tensor}


class FnNet(nn.Module):
    """Linear -> <op looked up on ``owner`` at call time> -> Linear."""

    def __init__(self, owner: object, name: str, kwargs: dict | None = None) -> None:
        super().__init__()
        self.owner_name = next(k for k, v in OWNERS.items() if v is owner)
        self.name, self.kwargs = name, kwargs or {}
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 2)
        if name == "prelu":
            self.slope = nn.Parameter(torch.full((12,), 0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        fn = getattr(OWNERS[self.owner_name], self.name)
        h = fn(h, self.slope) if self.name == "prelu" else fn(h, **self.kwargs)
        return self.fc2(h)


OPS = [
    # (owner, name, kwargs, family, op, cap)
    (F, "relu", {}, "relu", "relu", None),
    (F, "relu", {"inplace": True}, "relu", "relu", None),
    (F, "relu_", {}, "relu", "relu", None),
    (torch, "relu", {}, "relu", "relu", None),
    (torch, "relu_", {}, "relu", "relu", None),
    (torch.Tensor, "relu", {}, "relu", "relu", None),
    (torch.Tensor, "relu_", {}, "relu", "relu", None),
    (F, "leaky_relu", {"negative_slope": 0.1}, "leaky_relu", "leaky_relu", None),
    (F, "gelu", {}, "gelu", "gelu", None),
    (F, "silu", {}, "silu", "silu", None),
    (F, "elu", {}, "elu", "elu", None),
    (F, "celu", {}, "celu", "celu", None),
    (F, "selu", {}, "selu", "selu", None),
    (F, "relu6", {}, "relu6", "relu6", 6.0),
    (F, "hardtanh", {"min_val": -0.5, "max_val": 0.5}, "hardtanh", "hardtanh", 0.5),
    (F, "rrelu", {"training": False}, "rrelu", "rrelu", None),
    (F, "prelu", {}, "prelu", "prelu", None),
]


@pytest.mark.parametrize(
    ("owner", "name", "kwargs", "family", "op", "cap"),
    OPS,
    ids=[f"{getattr(o, '__name__', 'F')}.{n}{'-inplace' if k.get('inplace') else ''}" for o, n, k, *_ in OPS],
)
def test_each_op_matches_reference(owner, name, kwargs, family, op, cap) -> None:
    torch.manual_seed(0)
    net = FnNet(owner, name, kwargs)
    with torch.no_grad():
        net.fc1.weight.mul_(8.0)  # reach the relu6 and hardtanh caps
    xs = [torch.randn(16, 6) for _ in range(2)]
    ref = reference_calls(net, [(owner, name, op)], lambda m: _train(m, xs))
    with relu_doctor.watch(net, functional=True, log_every_n_steps=100) as doc:
        _train(net, xs)
    assert _names(doc) == [f"(root):{op}#0"]
    site = doc.sites[0]
    assert (site.kind, site.op, site.family.name, site.cap) == ("functional", op, family, cap)
    assert_matches(site, expected_stats(ref[("", op, 0)], 1, cap=cap))
    if cap is not None:
        assert site_fields(site)["saturated"].sum() > 0


def test_every_family_functional_is_captured() -> None:
    ops = functional_ops()
    from relu_doctor.families import FAMILIES

    for fam in FAMILIES.values():
        for fn in fam.functionals:
            assert ops[fn][0] is fam
    assert ops[torch.Tensor.relu][1] == "relu" and ops[torch.Tensor.relu_][1] == "relu"


# ---------------------------------------------------------------------- zoo: DenseNet


def test_dense_layer_sites_match_reference() -> None:
    torch.manual_seed(0)
    net = zoo.DenseLayer()
    xs = [torch.randn(4, 8, 6, 6) for _ in range(3)]
    ref = reference_calls(net, [(F, "relu", "relu")], lambda m: _train(m, xs))
    with relu_doctor.watch(net, functional=True, log_every_n_steps=100) as doc:
        _train(net, xs)
    assert _names(doc) == ["(root):relu#0", "(root):relu#1"]
    units = [doc.probe.site(n).units for n in _names(doc)]
    assert units == [8, 16]
    for i, name in enumerate(_names(doc)):
        assert_matches(doc.probe.site(name), expected_stats(ref[("", "relu", i)], 1))


def test_nested_paths_name_the_innermost_module() -> None:
    torch.manual_seed(0)
    net = zoo.DenseBlock()
    xs = [torch.randn(2, 8, 5, 5) for _ in range(2)]
    ref = reference_calls(net, [(F, "relu", "relu")], lambda m: _train(m, xs))
    with relu_doctor.watch(net, functional=True) as doc:
        _train(net, xs)
    assert _names(doc) == ["0:relu#0", "0:relu#1", "1:relu#0", "1:relu#1"]
    for (path, op, idx), cap in ref.items():
        assert_matches(doc.probe.site(f"{path}:{op}#{idx}"), expected_stats(cap, 1))


# ---------------------------------------------------------------------- no double counting


def test_module_activation_is_not_counted_twice() -> None:
    torch.manual_seed(0)
    net = zoo.MixedActivations()
    xs = [torch.randn(8, 6) for _ in range(2)]
    ref = reference_calls(
        net, [(F, "relu", "relu"), (torch.Tensor, "relu", "relu")], lambda m: _train(m, xs), skip=(nn.ReLU,)
    )
    with relu_doctor.watch(net, functional=True) as doc:
        _train(net, xs)
    # nn.ReLU.forward calls F.relu: recorded once, as the module site "act".
    assert _names(doc) == ["act", "(root):relu#0", "(root):relu#1", "block:relu#0"]
    assert site_fields(doc.probe.site("act"))["elements"].tolist() == [16.0] * 12
    for (path, op, idx), cap in ref.items():
        assert_matches(doc.probe.site(f"{path or '(root)'}:{op}#{idx}"), expected_stats(cap, 1))


def test_functional_capture_is_on_by_default() -> None:
    torch.manual_seed(0)
    net = zoo.MixedActivations()
    with relu_doctor.watch(net) as doc:
        _train(net, [torch.randn(4, 6)])
    assert _names(doc) == ["act", "(root):relu#0", "(root):relu#1", "block:relu#0"]
    with relu_doctor.watch(net, functional=False) as doc:
        _train(net, [torch.randn(4, 6)])
    assert _names(doc) == ["act"]


def test_inplace_and_out_of_place_functional_give_the_same_numbers() -> None:
    xs = [torch.randn(16, 6) for _ in range(2)]
    got = []
    for kwargs in ({}, {"inplace": True}):
        torch.manual_seed(0)
        net = FnNet(F, "relu", kwargs)
        with relu_doctor.watch(net, functional=True) as doc:
            _train(net, xs)
        got.append(site_fields(doc.sites[0]))
    for name in got[0]:
        torch.testing.assert_close(torch.from_numpy(got[0][name]), torch.from_numpy(got[1][name]))


# ---------------------------------------------------------------------- selection and errors


def test_include_exclude_apply_to_functional_sites() -> None:
    net = zoo.DenseBlock()
    with relu_doctor.watch(net, functional=True, include=["1"]) as doc:
        _train(net, [torch.randn(2, 8, 5, 5)])
    assert _names(doc) == ["1:relu#0", "1:relu#1"]
    with relu_doctor.watch(net, functional=True, exclude=["1"]) as doc:
        _train(net, [torch.randn(2, 8, 5, 5)])
    assert _names(doc) == ["0:relu#0", "0:relu#1"]


def test_functional_only_model_is_watched_by_default() -> None:
    # No flag: a model whose activations are all functional is watched like any other;
    # functional=True is the same as the default, functional=False opts out.
    net = zoo.DenseLayer()
    for kwargs in ({}, {"functional": True}):
        with relu_doctor.watch(net, **kwargs) as doc:
            _train(net, [torch.randn(2, 8, 4, 4)], doc)
        assert _names(doc) == ["(root):relu#0", "(root):relu#1"]
    with relu_doctor.watch(net, functional=False) as doc:  # attach is fine ...
        net(torch.randn(2, 8, 4, 4))
        with pytest.raises(ReluDoctorError, match="functional=False leaves functional calls"):
            doc.step()  # ... the first step says why nothing is watched


def test_model_without_any_activation_is_an_error_at_the_first_step_only() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with relu_doctor.watch(net) as doc:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing inside the forward, not even a warning
            net(torch.randn(2, 3))
        with pytest.raises(ReluDoctorError, match="ran no ReLU-family activation"):
            doc.step()
    assert doc.sites == []


def test_a_model_without_activations_whose_forward_is_never_called_is_told_so() -> None:
    """Its child runs on its own (a LightningModule's training_step calling ``self.net``):
    the child starts the pass, so the first step says there is nothing to watch."""

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))

    holder = Holder()
    with relu_doctor.watch(holder) as doc:
        holder.net(torch.randn(2, 3))
        with pytest.raises(ReluDoctorError, match="a forward pass of Holder ran no ReLU-family"):
            doc.step()


def test_calls_outside_the_model_are_not_captured() -> None:
    net = zoo.DenseLayer()
    with relu_doctor.watch(net, functional=True) as doc:
        y = F.relu(net(torch.randn(2, 8, 4, 4)))  # after the model returned
        F.relu(y)
    assert _names(doc) == ["(root):relu#0", "(root):relu#1"]


def test_hardtanh_cap_comes_from_the_call() -> None:
    class Net(nn.Module):
        def forward(self, x):
            return F.hardtanh(x, -2.0, 2.0) + F.hardtanh(x)

    with relu_doctor.watch(Net(), functional=True) as doc:
        doc.model(torch.linspace(-3, 3, 24).reshape(4, 6))
    assert [(s.name, s.cap) for s in doc.sites] == [("(root):hardtanh#0", 2.0), ("(root):hardtanh#1", 1.0)]


# ---------------------------------------------------------------------- lifecycle


def test_detach_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    net = zoo.MixedActivations()
    x = torch.randn(4, 6)
    before = net(x)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())
    doc = relu_doctor.watch(net, functional=True)
    assert torch._C._len_torch_function_stack() == 0  # the mode is entered per forward only
    net(x)
    doc.detach()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()) == hooks
    assert torch.equal(net(x), before)
    assert torch._C._len_torch_function_stack() == 0


def test_exception_in_forward_leaves_no_mode_behind() -> None:
    class Boom(nn.Module):
        def forward(self, x):
            F.relu(x)
            raise RuntimeError("boom")

    net = nn.Sequential(nn.Linear(3, 3), Boom())
    with relu_doctor.watch(net, functional=True) as doc:
        with pytest.raises(RuntimeError, match="boom"):
            net(torch.randn(2, 3))
        assert torch._C._len_torch_function_stack() == 0
        with pytest.raises(RuntimeError, match="boom"):
            net(torch.randn(2, 3))
    assert _names(doc) == ["1:relu#0"]  # a new pass restarted the call count
    assert site_fields(doc.sites[0])["elements"].tolist() == [4.0] * 3


def test_non_collecting_steps_do_not_enter_the_mode() -> None:
    net = zoo.DenseLayer()
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(torch._C._len_torch_function_stack())
            return x

    net.spy = Spy()
    orig = net.forward
    net.forward = lambda x: orig(net.spy(x))
    with relu_doctor.watch(net, functional=True, every_n_steps=2) as doc:
        _train(net, [torch.randn(2, 8, 4, 4) for _ in range(4)], doc)
    # The first pass also runs the provenance tracker's mode (units from the producing
    # layer, issue 12); later collecting passes run functional capture's alone.
    assert seen == [2, 0, 1, 0]
    assert site_fields(doc.sites[0])["elements"].tolist() == [2 * 2 * 16.0] * 8


def test_swapped_module_after_refresh_is_not_counted_as_functional() -> None:
    torch.manual_seed(0)
    net = zoo.MixedActivations()
    with relu_doctor.watch(net, functional=True) as doc:
        _train(net, [torch.randn(4, 6)])
        net.act = nn.LeakyReLU(0.01)
        doc.probe.refresh()
        _train(net, [torch.randn(4, 6)])
    assert "act" in _names(doc) and not any(n.startswith("act:") or n == "(root):leaky_relu#0" for n in _names(doc))
    assert doc.probe.site("act").family.name == "leaky_relu"


def test_scan_with_functional_capture() -> None:
    net = zoo.DenseLayer()
    res = relu_doctor.scan(net, [torch.randn(4, 8, 4, 4) for _ in range(2)], functional=True)
    assert list(res.sites["site"]) == ["(root):relu#0", "(root):relu#1"]


def test_probe_and_capture_used_directly() -> None:
    net = zoo.DenseLayer()
    probe = Probe(net, require_modules=False).attach()
    with FunctionalCapture(probe) as cap:
        assert cap.attached
        net(torch.randn(2, 8, 4, 4))
    assert not cap.attached
    probe.detach()
    assert [s.name for s in probe.sites()] == ["(root):relu#0", "(root):relu#1"]


def test_mode_is_off_inside_builtin_modules(monkeypatch) -> None:
    # The cost of the mode is one Python round trip per torch call made while it is on: it
    # must be off inside nn.Sequential / nn.Conv2d / nn.ReLU, on only for the root's own code.
    from relu_doctor import functional as fmod

    seen: list[str] = []
    orig = fmod.FunctionalCapture._observe

    def spy(self, func, args, kwargs, out):  # every torch call the capture's mode sees
        seen.append(getattr(func, "__name__", str(func)))
        return orig(self, func, args, kwargs, out)

    monkeypatch.setattr(fmod.FunctionalCapture, "_observe", spy)
    net = zoo.SmallCNN()  # root forward: self.features (Sequential), torch.flatten, self.head
    with relu_doctor.watch(net) as doc:
        net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert sorted(seen) == ["flatten", "linear"]  # head is not hooked: its F.linear is the root's
    assert _names(doc) == ["features.2", "features.6"]


class _ResidualBlock(nn.Module):
    """torchvision's BasicBlock shape: F.relu in the block's own forward (the mode is on
    there), BatchNorm and a downsample Sequential(conv, bn) run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.downsample = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.downsample(x)
        return self.pool(F.relu(out))


def test_mode_is_off_inside_costly_builtins_run_by_a_user_block(monkeypatch) -> None:
    # Inside a user's block the mode is on (its forward may call F.relu); a BatchNorm there
    # sends F.batch_norm through Python's handle_torch_function (about 16 us a call). Such
    # built-ins are hooked as boundaries where the mode goes off: batch_norm, the pooling and
    # everything in the downsample Sequential never reach it; the block's own F.relu calls
    # are captured and match the reference; a one-call Conv2d leaf is left unhooked.
    from relu_doctor import functional as fmod

    seen: list[str] = []
    orig = fmod.FunctionalCapture._observe

    def spy(self, func, args, kwargs, out):
        seen.append(getattr(func, "__name__", str(func)))
        return orig(self, func, args, kwargs, out)

    monkeypatch.setattr(fmod.FunctionalCapture, "_observe", spy)
    torch.manual_seed(0)
    net = _ResidualBlock()
    xs = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    ref = reference_calls(net, [(F, "relu", "relu")], lambda m: _train(m, xs))
    with relu_doctor.watch(net, log_every_n_steps=100) as doc:
        _train(net, xs, doc)
        hooked = {name for name, m in net.named_modules() if m._forward_pre_hooks}
    assert not {"batch_norm", "adaptive_avg_pool2d"} & set(seen), sorted(set(seen))
    assert {"relu", "conv2d"} <= set(seen)
    assert hooked == {"", "bn1", "bn2", "downsample", "pool"}
    assert _names(doc) == ["(root):relu#0", "(root):relu#1"]
    for i, name in enumerate(_names(doc)):
        assert_matches(doc.probe.site(name), expected_stats(ref[("", "relu", i)], 1))


class _TextNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 8)  # a boundary: it runs inside the root, a user class
        self.fc = nn.Linear(8, 6)

    def forward(self, ids):
        return F.relu(self.fc(self.emb(ids).mean(1)))


def test_a_boundary_module_called_on_its_own_is_not_a_pass() -> None:
    # An embedding regulariser calls model.emb(...) in the loop, outside the model's
    # forward, and HF code calls get_input_embeddings()(ids) before model(inputs_embeds=..):
    # the boundary hooks must not start (or end) a pass there, in training or evaluation
    torch.manual_seed(0)
    net = _TextNet()
    with relu_doctor.watch(net, eval_stream=True, log_every_n_steps=4) as doc:
        for _ in range(4):
            ids = torch.randint(0, 40, (5, 3))
            loss = net(ids).sum() + 1e-3 * net.emb(torch.arange(40)).square().mean()
            loss.backward()
            with torch.no_grad():
                net.emb(ids)  # outside any pass
                net(ids)  # one evaluation pass
            doc.step()
        assert doc.probe.passes == 4
    rec = doc.eval.records[-1]
    assert rec.site_rows[0]["window_steps"] == 4
    assert rec.site_rows[0]["elements"] == 4 * 5 * 6


# ---------------------------------------------------------------------- real models, no flag


class MnistNet(nn.Module):
    """The PyTorch examples' MNIST ``Net`` (F.relu only, no activation module), smaller."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 1)
        self.conv2 = nn.Conv2d(4, 8, 3, 1)
        self.dropout1 = nn.Dropout(0.0)  # off: the reference runs on a copy, same outputs
        self.fc1 = nn.Linear(8 * 5 * 5, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


@pytest.mark.parametrize(
    ("make", "x", "patch"),
    [
        (MnistNet, torch.randn(3, 1, 14, 14), (F, "relu", "relu")),
        ("lightning_demo", torch.randn(3, 32), (torch, "relu", "relu")),
    ],
    ids=["mnist_net", "lightning_demo_model"],
)
def test_functional_only_examples_are_watched_by_default(make, x, patch) -> None:
    if make == "lightning_demo":
        from lightning.pytorch.demos.boring_classes import DemoModel

        make = DemoModel
    torch.manual_seed(0)
    net = make()
    xs = [x, x + 1]
    ref = reference_calls(net, [patch], lambda m: _train(m, xs))
    with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=100) as doc:  # no flag
        _train(net, xs, doc)
        assert len(doc.sites) == len(ref)
        for (path, op, idx), capture in ref.items():
            site = doc.probe.site_by_key(relu_doctor.SiteKey(path, idx, op))
            assert site is not None
            assert_matches(site, expected_stats(capture, site.unit_dim))


def test_transformer_and_bert_are_watched_by_default() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tr = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                        dim_feedforward=12, dropout=0.0, batch_first=True)
    src, tgt = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    with relu_doctor.watch(tr, every_n_steps=1) as doc:
        tr(src, tgt).sum().backward()
        doc.step()
        rows = {s.name: site_fields(s)["elements"].sum() for s in doc.sites}
    assert rows == {"encoder.layers.0:relu#0": 2 * 5 * 12, "decoder.layers.0:relu#0": 2 * 3 * 12}

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=12, hidden_act="gelu")
    bert = transformers.BertModel(cfg)
    ids = torch.randint(0, 50, (2, 6))
    with relu_doctor.watch(bert, every_n_steps=1) as doc:
        bert(input_ids=ids).last_hidden_state.sum().backward()
        doc.step()
        rows = {s.name: site_fields(s)["elements"].sum() for s in doc.sites}
    # Hugging Face's GELUActivation is known by name: a module site, not its F.gelu call
    assert rows == {f"encoder.layer.{i}.intermediate.intermediate_act_fn": 2 * 6 * 12
                    for i in range(2)}


def test_an_activation_a_forward_hook_of_yours_calls_under_paused_is_no_site() -> None:
    """A sequence trial: a forward hook of its own on an encoder's linear1, computing
    F.relu of its output as a reference, was recorded as a second site of the layer
    (``relu#1``, the same numbers), with no way to leave it out: ``paused()`` held only
    at a pass's start. Inside it now, the hook's call is no site, and the layer's own
    counts are the test's."""
    from relu_doctor.stats import FIELDS

    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1,
        enable_nested_tensor=False)
    seen: list[torch.Tensor] = []
    x = torch.randn(4, 5, 8)
    with relu_doctor.watch(enc, every_n_steps=1, overhead_budget=None) as doc:
        def hook(m: torch.nn.Module, a: object, o: torch.Tensor) -> None:
            with doc.paused():
                seen.append(F.relu(o.detach()))
        handle = enc.layers[0].linear1.register_forward_hook(hook)
        enc(x).sum().backward()
        doc.step()
        handle.remove()
    assert [s.name for s in doc.sites] == ["layers.0:relu#0"]
    window = doc.sites[0].stats.window + doc.sites[0].stats.lifetime
    assert window[FIELDS.index("active")].tolist() == (seen[0] > 0).sum((0, 1)).tolist()
    assert window[FIELDS.index("elements")].tolist() == [20.0] * 16


class _TwiceChecked(nn.Module):
    """One ReLU module called twice in a reentrant checkpoint segment."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.act = nn.ReLU()

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.b(self.act(self.a(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.utils.checkpoint.checkpoint(self.segment, x, use_reentrant=True))


def test_a_watched_module_a_hook_of_yours_calls_under_paused_is_left_out_recomputed_too(
) -> None:
    """A review: a forward hook of yours calling the watched ReLU module itself under
    paused() was left out of the forward, but its recomputation in a reentrant checkpoint's
    backward took a recomputed call index: act#0's gradients went to act#1, act#0 had
    none. With the hook, every site reads as without it."""
    def run(hooked: bool) -> dict[str, list[float]]:
        torch.manual_seed(0)
        net = _TwiceChecked()
        x = torch.randn(16, 8, requires_grad=True)  # (reentrant: else no recomputation)
        with relu_doctor.watch(net, every_n_steps=1, overhead_budget=None) as doc:
            if hooked:
                def hook(m: nn.Module, a: object, o: torch.Tensor) -> None:
                    with doc.paused():
                        net.act(o * 3.0)  # (a reference of yours, through the module)
                net.a.register_forward_hook(hook)
            net(x).sum().backward()
            doc.step()
        return {s.name: (s.stats.window + s.stats.lifetime).flatten().tolist()
                for s in doc.sites}

    plain = run(False)
    assert sorted(plain) == ["act#0", "act#1"]
    assert run(True) == plain
    # a backward run inside a pause keeps the gradients its forward recorded, recomputed
    # ones too (a review: the checkpointed sites lost theirs, the others kept them)
    torch.manual_seed(0)
    net = _TwiceChecked()
    x = torch.randn(16, 8, requires_grad=True)
    with relu_doctor.watch(net, every_n_steps=1, overhead_budget=None) as doc:
        loss = net(x).sum()
        with doc.paused():
            loss.backward()
        doc.step()
    assert {s.name: (s.stats.window + s.stats.lifetime).flatten().tolist()
            for s in doc.sites} == plain
