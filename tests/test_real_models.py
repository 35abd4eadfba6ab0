"""Real model classes, built from tiny configs with random weights (no download), watched
with default arguments (issue 12): every site is found, its units are the features of the
layer that feeds it, and every statistic equals the brute-force reference taken along that
dim, through a change of sequence length, image size or audio length.

The reference (:class:`tests.reference.Recorder`) hooks the models' activation modules
(Hugging Face's GELU and SiLU classes, which relu_doctor knows by name and watches as
modules, whether they call ``F.gelu`` or compute a tanh or sigmoid formula of their own as
``gelu_new``, ``quick_gelu`` and ``gelu_python`` do; ``relu`` configs give an ``nn.ReLU``
module). The expected unit dim and count come from the config:
``intermediate_size`` on the last dim of a Linear's output, ``conv_dim`` on dim 1 of a Conv1d's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.errors import ReluDoctorWarning
from relu_doctor.stats import FIELDS
from tests import reference as ref

transformers = pytest.importorskip("transformers")


@dataclass(frozen=True)
class HFCase:
    """``make()`` builds the model; ``inputs`` are the batches (two sizes); ``act`` is the
    suffix of the activation modules' paths, ``producer`` that of the layer feeding each, and
    ``dim``/``units`` the units those layers make."""

    make: Callable[[], nn.Module]
    inputs: Callable[[], list[torch.Tensor]]
    act: str
    producer: str
    dim: int
    units: int


def _ids(*lengths: int) -> Callable[[], list[torch.Tensor]]:
    return lambda: [torch.randint(0, 40, (2, n)) for n in lengths]


def _bert(act: str) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, hidden_act=act, max_position_embeddings=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(cfg, add_pooling_layer=False)


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=20,
    )
    return transformers.ViTModel(cfg, add_pooling_layer=False)


def _convnext() -> nn.Module:
    cfg = transformers.ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[8, 12], depths=[1, 1], patch_size=2,
    )
    return transformers.ConvNextModel(cfg)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=28, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaModel(cfg)


def _wav2vec2_encoder() -> nn.Module:
    cfg = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        conv_dim=(10, 10), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, feat_extract_norm="group",
    )
    return transformers.Wav2Vec2Model(cfg).feature_extractor


def _opt() -> nn.Module:
    cfg = transformers.OPTConfig(
        vocab_size=40, hidden_size=16, ffn_dim=20, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0,
    )
    return transformers.OPTModel(cfg)


def _gpt2(act: str) -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_inner=24, n_positions=32,
        activation_function=act, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2Model(cfg)


CASES: dict[str, HFCase] = {
    "bert_gelu": HFCase(lambda: _bert("gelu"), _ids(7, 11), "intermediate.intermediate_act_fn",
                        "intermediate.dense", 2, 24),
    "bert_relu": HFCase(lambda: _bert("relu"), _ids(7, 11), "intermediate.intermediate_act_fn",
                        "intermediate.dense", 2, 24),
    # GELU formulas of Hugging Face's own, which call no functional op capture could see
    "bert_gelu_python": HFCase(lambda: _bert("gelu_python"), _ids(7, 11),
                               "intermediate.intermediate_act_fn", "intermediate.dense", 2, 24),
    "bert_quick_gelu": HFCase(lambda: _bert("quick_gelu"), _ids(7, 11),
                              "intermediate.intermediate_act_fn", "intermediate.dense", 2, 24),
    "bert_gelu_10": HFCase(lambda: _bert("gelu_10"), _ids(7, 11),
                           "intermediate.intermediate_act_fn", "intermediate.dense", 2, 24),
    "gpt2_gelu_new": HFCase(lambda: _gpt2("gelu_new"), _ids(7, 11), "mlp.act", "mlp.c_fc", 2, 24),
    "vit": HFCase(_vit, lambda: [torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16)],
                  "activation_fn", "fc1", 2, 20),
    "convnext": HFCase(_convnext, lambda: [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 24, 20)],
                       "act", "pwconv1", 3, -4),  # units: 4 x the stage's hidden size
    "llama_silu": HFCase(_llama, _ids(6, 9), "mlp.act_fn", "mlp.gate_proj", 2, 28),
    "wav2vec2_feature_encoder": HFCase(
        _wav2vec2_encoder, lambda: [torch.randn(2, 400), torch.randn(2, 530)], "activation",
        "conv", 1, 10,
    ),
    "opt": HFCase(_opt, _ids(7, 5), "activation_fn", "fc1", 1, 20),  # (N*L, F) rows
}


def _loss(out: Any) -> torch.Tensor:
    t = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    return t.float().square().mean()


def _total(site: Any) -> dict[str, np.ndarray]:
    m = (site.stats.window + site.stats.lifetime).to(torch.float64).numpy()
    return {name: m[i] for i, name in enumerate(FIELDS)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_real_models_units_and_counts(name: str) -> None:
    case = CASES[name]
    model = case.make().train()
    xs = case.inputs()
    acts = {p: m for p, m in model.named_modules() if p.endswith(case.act)}
    assert acts, f"no module ends with {case.act!r}"
    recorder = ref.Recorder(model, types=tuple({type(m) for m in acts.values()}))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ReluDoctorWarning)
            # every_n_steps=1: the default samples steps by measured cost; exact counts
            # need every step. Everything else is the default.
            with relu_doctor.watch(model, every_n_steps=1, log_every_n_steps=2) as doc:
                for x in xs:
                    _loss(model(x)).backward()
                    opt.step()
                    opt.zero_grad()
                    doc.step()
    finally:
        recorder.remove()
    sites = {(s.module_path, s.call_index): s for s in doc.sites}
    assert set(sites) == set(recorder.calls) == {(p, 0) for p in acts}
    for (path, idx), capture in recorder.calls.items():
        site = sites[(path, idx)]
        producer = path[: -len(case.act)] + case.producer
        units = case.units
        if units < 0:  # a multiple of the producer's input features (ConvNeXt's 4x MLP)
            units = -units * model.get_submodule(producer).in_features
        assert len(capture.outputs) == len(xs)
        assert {o.shape[case.dim] for o in capture.outputs} == {units}
        assert (site.unit_dim, site.units) == (case.dim, units), site.unit_rule
        assert f"`{producer}`" in site.unit_rule, site.unit_rule
        ref.assert_stats_match(_total(site), ref.expected_stats(capture, case.dim), site.name, rtol=1e-4)


def _wav2vec2_layer_norm() -> nn.Module:
    """The feature encoder of the large checkpoints (``feat_extract_norm="layer"``): conv,
    a LayerNorm over the transposed channels, then the activation."""
    cfg = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        conv_dim=(10, 10), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
    )
    return transformers.Wav2Vec2Model(cfg).feature_extractor


COMPILED = {**CASES, "wav2vec2_layer_norm": HFCase(
    _wav2vec2_layer_norm, lambda: [torch.randn(2, 400)], "activation", "conv", 1, 10)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext", "vit", "wav2vec2_feature_encoder", "wav2vec2_layer_norm"])
def test_real_models_compiled_from_the_first_call_count_the_units_eager_does(name: str) -> None:
    """Compiled before its first call, no pass is followed to the producer: the layer
    registered before each activation gives its units (the shape rule counted ConvNeXt's
    image rows and wav2vec2's time steps), with the counts of the test's own hooks."""
    case = COMPILED[name]
    model = case.make().train()
    xs = case.inputs()[:1]  # (one input shape: a second would recompile)
    acts = {p: m for p, m in model.named_modules() if p.endswith(case.act)}
    recorder = ref.Recorder(model, types=tuple({type(m) for m in acts.values()}))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReluDoctorWarning)  # (gradient statistics: eager only)
            with relu_doctor.watch(model, every_n_steps=1, log_every_n_steps=2) as doc:
                compiled = torch.compile(model, backend="aot_eager")
                for x in xs:
                    _loss(compiled(x)).backward()
                    opt.step()
                    opt.zero_grad()
                    doc.step()
    finally:
        recorder.remove()
        torch._dynamo.reset()
    sites = {(s.module_path, s.call_index): s for s in doc.sites}
    assert set(sites) == set(recorder.calls) == {(p, 0) for p in acts}
    for (path, _), capture in recorder.calls.items():
        site = sites[(path, 0)]
        producer = path[: -len(case.act)] + case.producer
        units = case.units if case.units > 0 else -case.units * model.get_submodule(producer).in_features
        assert (site.unit_dim, site.units) == (case.dim, units), site.unit_rule
        if case.dim != (1 if len(capture.outputs[0].shape) > 3 else capture.outputs[0].dim() - 1):
            assert f"-> dim {case.dim} (registered before it" in site.unit_rule  # (or its norm)
        fwd = {k: v for k, v in _total(site).items() if not k.startswith("grad")}
        want = {k: v for k, v in ref.expected_stats(capture, case.dim).items() if k in fwd}
        ref.assert_stats_match(fwd, want, site.name, rtol=1e-4)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm", "eager"])
def test_a_mixtures_experts_run_in_one_grouped_call_are_said_to_be_pooled(impl: str) -> None:
    """transformers' default experts (``grouped_mm``, and ``batched_mm``) run every expert's
    rows through one activation call: its unit j is unit j of each expert. A Hugging Face
    trial made one expert dead, routed tokens to it, and read "dead 0", the unit rule naming
    the embedding and recycling refused "from a sum". The site now names the experts it
    pools, one warning says how to watch them apart, and recycling's reason says why. Run
    one by one (``eager``), each expert's call is its own site, with nothing said."""
    from relu_doctor.interval import _unrecyclable

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        num_local_experts=4, num_experts_per_tok=2)
    cfg._experts_implementation = impl
    model = transformers.MixtralForCausalLM(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=1, every_n_steps=1) as doc:
            ids = torch.randint(0, 50, (2, 8))
            model(input_ids=ids, labels=ids).loss.backward()
            doc.step()
    said = [str(w.message) for w in caught if "grouped call" in str(w.message)]
    sites = list(doc.sites)
    experts = [s for s in sites if ".mlp.experts.act_fn" in s.name]
    if impl == "eager":
        assert not said and len(experts) >= 2 and not any(s.experts for s in sites)
        # (an MoE trial read a dead expert under another's #k, or recovered as the router
        # skipped one before it: said once)
        calls = [str(w.message) for w in caught if "got tokens" in str(w.message)]
        assert len(calls) == 1 and calls[0].startswith(
            "relu_doctor: 'model.layers.0.mlp.experts.act_fn' runs once for each expert that "
            "got tokens in a pass"), calls
        return
    assert [s.name for s in experts] == [f"model.layers.{i}.mlp.experts.act_fn" for i in (0, 1)]
    assert len(said) == 1 and "'model.layers.0.mlp.experts.act_fn' runs the 4 experts" in said[0]
    assert 'experts_implementation="eager"' in said[0]
    for i, s in enumerate(experts):
        assert (s.experts, s.producer) == (4, f"model.layers.{i}.mlp.experts")
        assert s.unit_rule == (f"MixtralExperts `model.layers.{i}.mlp.experts` -> last dim "
                               "(its 4 experts' units pooled)")
        assert _unrecyclable(sites)[s.name].startswith("each of its units is that unit of all 4")


def test_relation_weights_gathered_per_edge_then_summed_are_no_pooled_experts() -> None:
    """An R-GCN gathers a relation's weight per edge (``W[edge_type]``, as transformers'
    ``batched_mm`` gathers an expert's per token) and then sums the edges into their nodes:
    a unit after the sum is one neuron, not experts pooled (a review: it was said to be)."""

    class RGCN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 8, 16) * 0.3)
            self.head = nn.Linear(16, 2)

        def forward(self, x, src, dst, kind):
            msg = torch.bmm(x[src].unsqueeze(1), self.w[kind]).squeeze(1)
            return self.head(torch.relu(torch.zeros(x.shape[0], 16).index_add(0, dst, msg)))

    torch.manual_seed(0)
    model = RGCN()  # (and no "got tokens" warning: no module holds num_experts)
    edges = torch.randint(0, 6, (3, 20)) % torch.tensor([[6], [6], [3]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=1) as doc:
            model(torch.randn(6, 8), *edges).sum().backward()
            doc.step()
    [site] = doc.sites
    assert (site.experts, site.units) == (0, 16)
    assert not [w for w in caught if "grouped call" in str(w.message)]


def test_a_module_holding_num_experts_that_calls_an_activation_twice_is_no_mixture() -> None:
    """The eager experts' warning ("#k is the k-th expert that got tokens") was given to
    any model holding ``num_experts`` that called a ReLU twice, or F.relu in a child (a
    review): it needs an ``act_fn`` of a module holding the experts' stacked weights."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_experts = 4
            self.fc, self.act_fn = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.act_fn(self.fc(self.act_fn(x))) + torch.relu(self.fc(x))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(Twice(), log_every_n_steps=1) as doc:
            doc.model(torch.randn(3, 4)).sum().backward()
            doc.step()
    assert len(doc.sites) == 3
    assert not [w for w in caught if "got tokens" in str(w.message)]
