"""ReDo on real architectures: every site of the zoo models and of Hugging Face classes (tiny
configs, random weights) is either recycled with the model's output unchanged at that moment
(dead units recycled, the output compared before/after on a fixed batch, in eval and in
training mode), or refused with the path that blocks it named."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from relu_doctor.errors import ReluDoctorError
from relu_doctor.families import family_of
from relu_doctor.remedies import find_unit_links, recycle_units
from relu_doctor.remedies.continual_backprop import outgoing_magnitude
from relu_doctor.remedies.dataflow import Dataflow, record_dataflow
from relu_doctor.remedies.unit_links import UnitLinks
from relu_doctor.sites import SiteKey
from tests import zoo

KILL = -30.0  # a pre-activation every family here maps to (about) zero


def sites_of(flow: Dataflow) -> list[SiteKey]:
    """Every activation call of the pass (module calls and functional calls), independently
    of the probe: from the recorded module calls and functional calls."""
    keys = [
        SiteKey(flow.paths[m], i)
        for m, calls in flow.module_calls.items()
        if family_of(m) is not None
        for i in range(len(calls))
    ]
    keys += [SiteKey(owner, i, op) for (owner, op), ns in flow.functional.items() for i in range(len(ns))]
    return keys


def _kill(links: UnitLinks, units: list[int]) -> None:
    """Make ``units`` dead: producer rows 0; the last per-channel norm (or the producer's
    bias) outputs KILL for them whatever the batch."""
    idx = torch.tensor(units)
    with torch.no_grad():
        w = getattr(links.producer, links.producer_param)
        w.index_fill_(links.producer_dim, idx, 0)  # its rows, or columns of an (in, out) weight
        b = getattr(links.producer, "bias", None)
        if links.norms:
            for nr in links.norms:
                ch = torch.nonzero(torch.isin(nr.channels, idx)).flatten()
                nr.module.weight[ch] = 0
                nr.module.bias[ch] = KILL if nr is links.norms[-1] else 0.0
            if b is not None:
                b[idx] = 0
        else:
            assert b is not None, links.producer_path
            b[idx] = KILL


def _output(model: nn.Module, x: object) -> torch.Tensor:
    torch.manual_seed(1)  # the same dropout masks before and after
    with torch.no_grad():
        out = model(*x) if isinstance(x, tuple) else model(x)
    if not isinstance(out, torch.Tensor):
        out = out.last_hidden_state
    return out


def check_invariant(model: nn.Module, x: object, key: SiteKey, flow: Dataflow) -> UnitLinks:
    """Recycle dead units of ``key`` on copies in eval and training mode: outputs unchanged,
    the producer's rows fresh, optimizer moments zeroed where parameters changed."""
    links = find_unit_links(model, site=key, dataflow=flow)
    units = [0, min(2, links.units - 1)]
    for train in (False, True):
        m = copy.deepcopy(model).train(train)
        ml = find_unit_links(m, site=key, dataflow=record_dataflow(m, x))
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        with torch.enable_grad():
            out = m(*x) if isinstance(x, tuple) else m(x)
            out = out if isinstance(out, torch.Tensor) else out.last_hidden_state
            out.float().pow(2).mean().backward()
        opt.step()
        _kill(ml, units)
        before_p = {n: p.detach().clone() for n, p in m.named_parameters()}
        before_s = {n: opt.state[p]["exp_avg"].clone() for n, p in m.named_parameters() if p in opt.state}
        y0 = _output(m, x)
        recycle_units(ml, units=units, optimizers=opt, generator=torch.Generator().manual_seed(5))
        y1 = _output(m, x)
        assert torch.allclose(y0, y1, atol=1e-5, rtol=1e-4), (key, train, (y0 - y1).abs().max())
        w = getattr(ml.producer, ml.producer_param).movedim(ml.producer_dim, 0)
        assert w[units].abs().sum() > 0, key  # fresh rows, not the zeros of the kill
        for n, p in m.named_parameters():
            if n not in before_s:
                continue
            changed = p.detach() != before_p[n]
            s = opt.state[p]["exp_avg"]
            assert bool((s[changed] == 0).all()), (key, n)  # moments reset where it changed
            same = s == before_s[n]
            assert bool((same | (s == 0)).all()), (key, n)  # elsewhere only zeroed, if at all
    return links


def survey(model: nn.Module, x: object) -> tuple[dict[str, UnitLinks], dict[str, str]]:
    """Every site: recycled with the invariant checked, or refused (the message)."""
    flow = record_dataflow(model, x)
    done: dict[str, UnitLinks] = {}
    refused: dict[str, str] = {}
    for key in sites_of(flow):
        name = key.name(True)
        try:
            links = find_unit_links(model, site=key, dataflow=flow)
        except ReluDoctorError as e:
            refused[name] = str(e)
            continue
        done[name] = check_invariant(model, x, key, flow)
        assert links.describe() == done[name].describe()
    return done, refused


def test_resnet_blocks_recycle_the_inner_relu_and_refuse_the_sums():
    torch.manual_seed(0)
    done, refused = survey(zoo.ResNetish(), torch.randn(3, 3, 6, 6))
    assert sorted(done) == ["layer1.0.relu#0", "layer1.1.relu#0"]
    assert done["layer1.0.relu#0"].describe()["consumers"] == [{"path": "layer1.0.conv2", "span": 1}]
    # The stem's units also go straight into the first block's identity shortcut.
    assert "its units also reach add in layer1.0.forward, a sum with another branch" in refused[
        "stem.2#0"
    ]
    assert "path: relu -> add" in refused["stem.2#0"]
    assert "its input comes from a sum (add in layer1.0.forward)" in refused["layer1.0.relu#1"]
    done, refused = survey(zoo.Bottleneck(), torch.randn(2, 16, 4, 4))
    assert sorted(done) == ["relu#0", "relu#1"] and sorted(refused) == ["relu#2"]


def test_densenet_concatenation_maps_units_to_slices_of_every_reader():
    torch.manual_seed(0)
    done, refused = survey(zoo.DenseNetish(), torch.randn(3, 3, 8, 8))
    assert sorted(done) == ["block.0.relu2#0", "block.1.relu2#0", "relu0#0", "relu5#0"]
    # relu0 -> pool0 -> concatenated at offset 0 into every dense layer and the transition,
    # each through its BatchNorm: those channels' scale is cut.
    assert done["relu0#0"].describe()["consumers"] == [
        {"path": "block.0.norm1", "span": 1, "kind": "norm"},
        {"path": "block.1.norm1", "span": 1, "kind": "norm"},
        {"path": "transition.norm", "span": 1, "kind": "norm"},
    ]
    # a dense layer's new features sit after the earlier ones: an offset into each reader.
    second = find_unit_links(zoo.DenseNetish(), site="block.1.relu2", example_inputs=torch.randn(2, 3, 8, 8))
    assert second.consumers[0].path == "block.1.conv2"
    for name in ("block.1.relu1#0", "transition.relu#0"):
        assert "its input comes from cat in " in refused[name]
    # the first dense layer concatenates one tensor: its input is relu0's output.
    assert "its input comes from relu in relu0.forward" in refused["block.0.relu1#0"]
    # conv -> avg pool -> BN -> ReLU: pooling keeps the producer's channels apart.
    assert done["relu5#0"].producer_path == "transition.conv"


def test_concat_offsets_in_the_consumers():
    torch.manual_seed(0)
    net = zoo.DenseNetish()
    links = find_unit_links(net, site="block.0.relu2", example_inputs=torch.randn(2, 3, 8, 8))
    # block.0.conv2's 4 output channels are produced units of another site; here: relu2 of
    # block 0 feeds conv2 directly.
    assert [c.path for c in links.consumers] == ["block.0.conv2"]
    flow = record_dataflow(net, torch.randn(2, 3, 8, 8))
    (c0, c1, ct) = find_unit_links(net, site="relu0", dataflow=flow).consumers
    assert (c0.offset, c1.offset, ct.offset) == (0, 0, 0)
    assert c1.inputs is not None and c1.inputs.tolist()[:8] == list(range(8))
    assert c1.inputs.tolist()[8:] == [-1] * 4  # block 0's new features: not this site's


def test_timm_norm_act_and_regnet_group_conv():
    torch.manual_seed(0)
    done, refused = survey(zoo.RegNetish(), torch.randn(3, 3, 8, 8))
    assert sorted(done) == [
        "s1.0.conv1.bn.act#0", "s1.0.conv2.bn.act#0", "s1.1.conv1.bn.act#0", "s1.1.conv2.bn.act#0",
        "stem.bn.act#0",
    ]  # fmt: skip
    links = done["s1.0.conv1.bn.act#0"]
    assert (links.producer_path, links.norm_path) == ("s1.0.conv1.0", "s1.0.conv1.bn")
    assert [c.path for c in links.consumers] == ["s1.0.conv2.0", "s1.0.downsample.0"] or [
        c.path for c in links.consumers
    ] == ["s1.0.conv2.0"]
    assert sorted(refused) == ["s1.0.act3#0", "s1.1.act3#0"]
    assert "sum" in refused["s1.1.act3#0"]


def test_convnext_block_permute_linear_and_layer_scale():
    torch.manual_seed(0)
    done, refused = survey(zoo.ConvNeXtBlock(), torch.randn(2, 8, 5, 5))
    assert sorted(done) == ["act#0"] and not refused
    assert done["act#0"].describe()["consumers"] == [{"path": "pwconv2", "span": 1}]
    assert done["act#0"].units == 32


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, F.silu], ids=["relu", "gelu", "F.silu"])
def test_transformer_mlp(act):
    torch.manual_seed(0)
    done, refused = survey(zoo.TransformerMLP(act=act), torch.randn(2, 5, 8))
    assert len(done) == 1 and not refused
    (links,) = done.values()
    assert (links.producer_path, [c.path for c in links.consumers]) == ("fc1", ["fc2"])


def test_refusals_name_the_blocking_path():
    torch.manual_seed(0)
    done, refused = survey(zoo.NormAfterAct(), torch.randn(4, 6))
    assert not done
    assert ("its units pass a LayerNorm (layer_norm in ln.forward), which normalises the "
            "units together") in refused["act1#0"]  # (read as a sentence: a trial)
    assert "the output of linear of Linear 'fc3' also goes to" in refused["act3#0"]
    assert "the output of linear of Linear 'fc2' also goes to linear of Linear 'fc3'" in refused[
        "act2#0"
    ]


# ---------------------------------------------------------------------- Hugging Face classes


@pytest.mark.slow
@pytest.mark.parametrize("hidden_act", ["relu", "gelu"])
def test_bert_mlp_sites_are_all_recycled(hidden_act):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16, hidden_act=hidden_act,
    )  # fmt: skip
    model = transformers.BertModel(cfg)
    ids = torch.randint(0, 50, (2, 7))
    done, refused = survey(model, ids)
    assert len(done) == 2 and not refused, refused
    for i in range(2):
        (links,) = [v for k, v in done.items() if k.startswith(f"encoder.layer.{i}.")]
        assert links.producer_path == f"encoder.layer.{i}.intermediate.dense"
        assert [c.path for c in links.consumers] == [f"encoder.layer.{i}.output.dense"]
        assert links.units == 24


def _opt(t):  # OPT: nn.Linear fc1 -> act -> fc2
    return t.OPTModel(t.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=24,
                                  num_attention_heads=2, max_position_embeddings=16,
                                  word_embed_proj_dim=16)), "decoder.layers.{}.", "fc1", "fc2"


def _gpt2(act):  # GPT-2: HF's Conv1D (torch.addmm, weight stored (in, out)) c_fc -> act -> c_proj
    def make(t):
        cfg = t.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                           activation_function=act)
        return t.GPT2Model(cfg), "h.{}.", "mlp.c_fc", "mlp.c_proj"
    return make


@pytest.mark.slow
@pytest.mark.parametrize("make", [_opt, _gpt2("relu"), _gpt2("gelu_new")],
                         ids=["opt", "gpt2-relu", "gpt2-gelu_new"])
def test_hf_transformer_mlp_sites_are_all_recycled(make):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, layer, fc_in, fc_out = make(transformers)
    done, refused = survey(model, torch.randint(0, 50, (2, 7)))
    assert len(done) == 2 and not refused, refused
    for i in range(2):
        (links,) = [v for k, v in done.items() if k.startswith(layer.format(i))]
        prefix = layer.format(i)
        assert (links.producer_path, [c.path for c in links.consumers]) == (
            prefix + fc_in, [prefix + fc_out])
        # Continual Backprop's utility reads each unit's outgoing weights (c_proj's rows)
        w = model.get_submodule(prefix + fc_out).weight.detach().abs().double()
        want = w.sum(links.consumers[0].in_dim ^ 1)
        assert (links.producer_dim, links.consumers[0].in_dim) == (
            (1, 0) if "c_fc" in fc_in else (0, 1))
        assert torch.allclose(outgoing_magnitude(links), want)


class _MBConvSE(nn.Module):
    """EfficientNet's MBConv: expand 1x1 -> BN -> SiLU -> depthwise -> BN -> SiLU ->
    squeeze-excite (mean -> conv -> SiLU -> conv -> sigmoid gate) -> project 1x1 -> BN."""

    def __init__(self, c: int = 4, e: int = 8, s: int = 2) -> None:
        super().__init__()
        self.conv_pw = nn.Conv2d(c, e, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(e)
        self.act1 = nn.SiLU()
        self.conv_dw = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False)
        self.bn2 = nn.BatchNorm2d(e)
        self.act2 = nn.SiLU()
        self.conv_reduce = nn.Conv2d(e, s, 1)
        self.act_se = nn.SiLU()
        self.conv_expand = nn.Conv2d(s, e, 1)
        self.conv_pwl = nn.Conv2d(e, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.bn2(self.conv_dw(self.act1(self.bn1(self.conv_pw(x))))))
        gate = self.conv_expand(self.act_se(self.conv_reduce(h.mean((2, 3), keepdim=True))))
        return x + self.bn3(self.conv_pwl(h * gate.sigmoid()))


class _Tied(nn.Module):
    """One Linear applied twice: zeroing its columns for one input changes the other."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.shared = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.act(self.fc1(x))) + self.shared(x)


def test_mbconv_with_squeeze_excite_and_weight_tying():
    torch.manual_seed(0)
    done, refused = survey(_MBConvSE(), torch.randn(3, 4, 5, 5))
    assert sorted(done) == ["act1#0", "act2#0", "act_se#0"] and not refused
    # act2 is read by the squeeze (a spatial mean -> conv_reduce) and by the gated product.
    assert [c.path for c in done["act2#0"].consumers] == ["conv_reduce", "conv_pwl"]
    assert [c.path for c in done["act1#0"].consumers] == ["conv_dw"]
    done, refused = survey(_Tied(), torch.randn(2, 4))
    assert not done and "Linear 'shared' is also called on other inputs" in refused["act#0"]
    # A producer whose weight is tied to a later use (a decoder reading it transposed): not
    # "called twice" (it is called once), its weight used twice.
    done, refused = survey(_TiedProducer(), torch.randn(2, 4))
    assert "the weight of Linear 'enc' is used 2 times per pass" in refused["act#0"], refused


class _TiedProducer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.act, self.out = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.out(self.act(self.enc(x))), self.enc.weight.t())


def test_the_unit_zoo_of_issue_12():
    """The reproductions the unit-dim work added: Swin MLP, DenseNet (functional F.relu on a
    concatenation), timm RegNet block (functional ReLU after the sum), Conv1d + GroupNorm."""
    torch.manual_seed(0)
    done, refused = survey(zoo.UnitsSwinMlp(), torch.randn(2, 3, 3, 8))
    assert sorted(done) == ["act#0"] and not refused
    done, refused = survey(zoo.UnitsDenseNet(), torch.randn(2, 3, 6, 6))
    assert sorted(done) == ["block.0:relu#1", "block.1:relu#1"]
    assert "the output of conv2d of Conv2d 'stem' also goes to cat" in refused["block.0:relu#0"]
    assert "its input comes from cat in block.0.forward" in refused["block.1:relu#0"]
    done, refused = survey(zoo.UnitsRegNetBlock(), torch.randn(2, 8, 5, 5))
    assert sorted(done) == ["bn1.act#0", "bn2.act#0"]
    assert "its input comes from a sum (add in (root).forward)" in refused["(root):relu#0"]
    done, refused = survey(zoo.UnitsConv1dNet(), torch.randn(2, 40))
    assert sorted(done) == ["act0#0"] and done["act0#0"].norm_path == "norm0"
    assert "its units reach the model's output through relu without" in refused["act1#0"]


class _PaddedTo(nn.Module):
    """TensorFlow-style "same" padding before a stride-2 conv (Hugging Face's MobileNetV2 and
    EfficientNet): the activation's map is padded with zeros by ``F.pad``, then convolved."""

    def __init__(self, value: float = 0.0, then: str = "") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 1)
        self.act = nn.ReLU6()
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2)
        self.gamma = nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)  # a layer scale
        self.value, self.then = value, then

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pad(self.act(self.conv1(x)), (0, 1, 0, 1), value=self.value)
        if self.then == "scale":
            h = h * self.gamma
        elif self.then == "avgpool":
            h = F.avg_pool2d(h, 3, stride=1, padding=1)
        return self.conv2(h)


@pytest.mark.parametrize("then", ["", "scale", "avgpool"])
def test_zero_padding_before_the_consumer_is_followed_and_other_pads_refused(then):
    torch.manual_seed(0)
    done, refused = survey(_PaddedTo(then=then), torch.randn(2, 3, 6, 6))
    assert not refused and [c.path for c in done["act#0"].consumers] == ["conv2"]
    # a pad of ones would put a value a cut unit's weights multiplied: refused, named
    done, refused = survey(_PaddedTo(value=1.0), torch.randn(2, 3, 6, 6))
    assert not done and "pads with a constant other than 0" in refused["act#0"]


def test_hf_mobilenet_v2_with_tf_padding_recycles_its_expansions():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.25,
                                         min_depth=4, tf_padding=True)
    model = transformers.MobileNetV2Model(cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    flow = record_dataflow(model, x)
    refused = {}
    for key in sites_of(flow):
        try:
            find_unit_links(model, site=key, dataflow=flow)
        except ReluDoctorError as e:
            refused[key.name(True)] = str(e)
    # what stays refused is refused for a sum or the output, never for the padding
    assert len(refused) < len(sites_of(flow)) // 2, refused
    assert not [r for r in refused.values() if "mixed with other values" in r], refused
    for path in ("conv_stem.first_conv.activation", "layer.0.expand_1x1.activation"):
        links = check_invariant(model, x, SiteKey(path), flow)  # padded before its consumer
        assert links.consumers[0].path.endswith("conv_3x3.convolution")


def _refusals(model: nn.Module, x: torch.Tensor, sites: list) -> dict[str, str | None]:
    """By site, why the link finder refuses it (None: it links), on one recorded pass."""
    flow = record_dataflow(model, x)
    out: dict[str, str | None] = {}
    for s in sites:
        try:
            find_unit_links(model, site=s.key, dataflow=flow)
            out[s.name] = None
        except ReluDoctorError as e:
            out[s.name] = str(e)
    return out


def _hf_resnet():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="bottleneck", num_labels=3)
    return transformers.ResNetForImageClassification(cfg), torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize(("make", "marked"), [
    (lambda: (zoo.ResNetish(), torch.randn(3, 3, 6, 6)), 2),
    (lambda: (zoo.Bottleneck(), torch.randn(2, 16, 4, 4)), 1),
    (lambda: (zoo.InvertedResidual(), torch.randn(2, 8, 4, 4)), 0),
    (lambda: (zoo.ConvNeXtBlock(), torch.randn(2, 8, 5, 5)), 0),
    (lambda: (zoo.TransformerMLP(), torch.randn(2, 5, 8)), 0),
    (_hf_resnet, 2),
], ids=["resnetish", "bottleneck", "inverted_residual", "convnext", "transformer_mlp",
        "hf_resnet"])
def test_sites_read_as_fed_by_a_sum_are_those_recycling_refuses_for_it(make, marked):
    """The probe's reading of the forward pass (provenance: Site.summed), which keeps the
    advice from sending a user to ReDo where it cannot act, agrees with the link finder's
    own check: every site it marks is refused, and every site refused for its input coming
    from a sum is marked (a trial's Hugging Face ResNet: each block's last ReLU)."""
    import relu_doctor

    torch.manual_seed(0)
    model, x = make()
    with relu_doctor.watch(model, log_every_n_steps=1, overhead_budget=None) as doc:
        out = model(x)
        (out.logits if hasattr(out, "logits") else out).sum().backward()
        doc.step()
        sites = list(doc.sites)
    refused = _refusals(model, x, sites)
    for s in sites:
        why = refused[s.name]
        assert not s.summed or why is not None, s.name
        assert s.summed == (why is not None and "its input comes from a sum" in why), (s.name, why)
    assert sum(s.summed for s in sites) == marked


class _NormedBlocks(nn.Module):
    """A diffusion UNet's block (Conv -> GroupNorm of 4 channels a group -> SiLU), the same
    with one channel a group (per-channel: recyclable), a Linear -> LayerNorm -> ReLU, an
    F.group_norm call, and a transformer MLP whose LayerNorm comes before its producer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.gn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU()
        self.conv2, self.gn2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(8, 8), nn.ReLU()
        self.conv3, self.act3 = nn.Conv2d(8, 8, 1), nn.ReLU()
        self.fc1, self.ln1, self.act4 = nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU()
        self.ln2, self.fc2, self.act5 = nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU()
        self.fc3 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.gn2(self.conv2(self.act1(self.gn1(self.conv1(x))))))
        h = self.act3(F.group_norm(self.conv3(h), 4)).mean((2, 3))
        h = self.act4(self.ln1(self.fc1(h)))
        return self.fc3(self.act5(self.fc2(self.ln2(h))))


def test_sites_read_as_fed_by_a_norm_of_units_together_are_those_recycling_refuses_for_it():
    """A diffusion UNet's GroupNorm-fed SiLU sites were advised ReDo recycling, which refuses
    them (a trial): the probe's reading of the forward pass (Site.mixed) agrees with the link
    finder's own check, site by site, and their findings say recycling cannot treat them."""
    import relu_doctor

    torch.manual_seed(0)
    model, x = _NormedBlocks(), torch.randn(4, 3, 6, 6)
    with relu_doctor.watch(model, log_every_n_steps=1, overhead_budget=None,
                           functional=True) as doc:
        model(x).sum().backward()
        doc.step()
        sites = list(doc.sites)
        texts: dict[str, list[str]] = {}
        for f in doc.records[-1].findings:
            texts.setdefault(f.site, []).append(f.remedy)
    refused = _refusals(model, x, sites)
    mixed = {}
    for s in sites:
        why = refused[s.name]
        assert bool(s.mixed) == (why is not None and "normalises the units together" in why), (
            s.name, s.mixed, why)
        mixed[s.name] = s.mixed
        if s.mixed:  # (none advises ReDo; those that would have say why not)
            assert not any("ReDo" in t for t in texts.get(s.name, [])), texts[s.name]
    said = f"Recycling cannot treat this site: its input passes a {mixed['act3']}"
    assert any(said in t for t in texts["act3"]), texts["act3"]  # (its dormant units')
    assert {k for k, v in mixed.items() if v} == {"act1", "act3", "act4"}, mixed
    assert not mixed["act2"] and not mixed["act5"], mixed


class _MessagePassing(nn.Module):
    """A graph network's layer as PyG and DGL write it by hand: ``h = relu(lin1(x))``, its
    messages aggregated over the edges (``kind``), then ``lin2`` and a head. Every
    aggregation keeps a unit's messages in its own feature column."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin1, self.lin2, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, edges: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin1(x))
        src, dst = edges
        per_edge = dst.unsqueeze(1).expand(-1, h.shape[1])
        agg = {
            "index_add": lambda: torch.zeros_like(h).index_add_(0, dst, h[src]),
            "scatter_mean": lambda: h.new_zeros(h.shape).scatter_reduce_(
                0, per_edge, h[src], "mean", include_self=False),
            "scatter_amax": lambda: torch.zeros(h.shape).scatter_reduce(
                0, per_edge, h[src], "amax"),
            "scatter_add": lambda: torch.zeros_like(h).scatter_add(0, per_edge, h[src]),
            "sparse_mm": lambda: torch.sparse.mm(adj, h),
            "dense_mm": lambda: adj.to_dense() @ h,
            # GIN: (1 + eps) * x + sum of the neighbours' x, each column one unit
            "gin": lambda: 1.5 * h + torch.index_add(torch.zeros_like(h), 0, dst, h[src]),
            # attention pooling over the nodes (a 1-D weight), then back to every node
            "pooled": lambda: (torch.softmax(x[:, 0], 0) @ h).expand_as(h),
            "written": lambda: _written(h),
        }[self.kind]()
        return self.head(torch.relu(self.lin2(agg)))


def _written(h: torch.Tensor) -> torch.Tensor:
    """The units written into a buffer, columns permuted, then a padded node's row zeroed."""
    buf = torch.zeros(h.shape)
    buf[:, [1, 0, *range(2, h.shape[1])]] = h
    buf[4] = 0.0
    return buf


def _graph() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    edges = torch.tensor([[0, 1, 2, 3, 4, 0, 2], [1, 2, 3, 4, 0, 2, 2]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's note on sparse invariant checks)
        adj = torch.sparse_coo_tensor(edges, torch.rand(edges.shape[1]), (5, 5)).coalesce()
    return torch.randn(5, 4), edges, adj


@pytest.mark.parametrize("kind", ["index_add", "scatter_mean", "scatter_amax", "scatter_add",
                                  "sparse_mm", "dense_mm", "gin", "pooled", "written"])
def test_graph_aggregations_recycle_their_units(kind):
    """A unit's messages gathered into a tensor of zeros (``index_add_``, ``scatter_reduce``,
    ``scatter_add``), through an adjacency product (``torch.sparse.mm``, ``adj @ h``), or
    summed with themselves (GIN) reach ``lin2``'s column of that unit alone: both sites are
    recycled, the output unchanged (a GNN trial: they were refused as "its units reach
    index_add")."""
    done, refused = survey(_MessagePassing(kind), _graph())
    assert not refused, refused
    first = done["(root):relu#0"].describe()
    assert (first["producer"], [c["path"] for c in first["consumers"]]) == ("lin1", ["lin2"])


class _Gathered(nn.Module):
    """Aggregations that do mix a unit with other values: into a target that holds the
    layer's input (a residual), two units into one column, the units as the weights of a
    product (``h @ w``, contracting them)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin1, self.lin2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, edges: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin1(x))
        src, dst = edges
        agg = {
            "residual": lambda: self.lin1(x).index_add(0, dst, h[src]),
            "two_units": lambda: torch.zeros_like(h).index_add_(1, torch.tensor([0, 0, 2, 3, 4, 5, 6, 7]), h),
            "contracted": lambda: h.t() @ torch.ones(5, 8),
            "other_sum": lambda: h + x.repeat(1, 2),
            "int_sum": lambda: h + torch.arange(1, 9),  # (its values are no unit's labels)
            "written_first": lambda: _written_first(h, x, dst, src),
            "viewed_first": lambda: _viewed_first(h, dst, src),
        }[self.kind]()
        return self.lin2(agg)


def _written_first(h: torch.Tensor, x: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A root node's own features written into the zeros before the messages (a review)."""
    agg = torch.zeros_like(h)
    agg[:, :4] = x
    return agg.index_add_(0, dst, h[src])


def _viewed_first(h: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """The zeros changed through a view of them before the messages (a review)."""
    agg = torch.zeros_like(h)
    agg.view(-1).add_(1.0)
    return agg.index_add_(0, dst, h[src])


@pytest.mark.parametrize(("kind", "blocked"), [
    ("residual", "index_add in (root).forward adds the units to each other or to values from"),
    ("two_units", "index_add in (root).forward adds the units to each other"),
    ("contracted", "matmul in (root).forward, a product with another tensor that sums them"),
    ("other_sum", "a sum with another branch"),
    ("int_sum", "a sum with another branch"),
    ("written_first", "index_add in (root).forward adds the units to each other or to values"),
    ("viewed_first", "index_add in (root).forward adds the units to each other or to values"),
])
def test_aggregations_that_mix_a_unit_with_other_values_are_refused(kind, blocked):
    """A recycled unit's new value would reach the output unweighted through these: refused,
    the op named."""
    done, refused = survey(_Gathered(kind), _graph())
    assert list(refused) == ["(root):relu#0"] and not done
    assert blocked in refused["(root):relu#0"], refused
