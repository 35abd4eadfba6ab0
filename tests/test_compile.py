"""torch.compile: a model compiled after ``watch`` still trains and gives the forward statistics
of eager mode; gradient statistics are eager-only and the user is told so, once.

Most tests use the ``aot_eager`` backend (Dynamo + AOTAutograd, where hooks are traced and
graphs are cut; no code generation, so they stay fast); one runs the default inductor backend.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.errors import ReluDoctorWarning
from tests import reference as ref
from tests import zoo
from tests.reference_functional import site_fields

FORWARD = ("elements", "active", "sum", "sum_abs", "sum_sq", "saturated", "nonfinite")
GRAD = ("grad_elements", "grad_sq", "grad_in_elements", "grad_zero", "grad_nonfinite")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _train(model, forward, xs, *, steps_eager: int = 0, **watch):
    """SGD steps: the first ``steps_eager`` through ``model``, the rest through ``forward``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    with relu_doctor.watch(model, log_every_n_steps=1000, **watch) as doc:
        for i, x in enumerate(xs):
            opt.zero_grad()
            loss = (model if i < steps_eager else forward)(x).pow(2).mean()
            loss.backward()
            opt.step()
            doc.step()
            losses.append(loss.item())
    return doc, losses


def _assert_forward_equal(a: relu_doctor.Doctor, b: relu_doctor.Doctor, rtol: float = 1e-4) -> None:
    assert [s.name for s in a.sites] == [s.name for s in b.sites]
    for sa, sb in zip(a.sites, b.sites, strict=True):
        fa, fb = site_fields(sa), site_fields(sb)
        np.testing.assert_array_equal(fb["elements"], fa["elements"], err_msg=sa.name)
        np.testing.assert_allclose(fb["active"], fa["active"], atol=1, err_msg=sa.name)
        for f in ("sum", "sum_abs", "sum_sq"):
            np.testing.assert_allclose(fb[f], fa[f], rtol=rtol, atol=rtol * fa[f].max(), err_msg=f"{sa.name} {f}")


def _inputs(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 6, 6, generator=g) for _ in range(n)]


class _ScalarGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(0.5))
        self.gate = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.p)


def test_a_0d_activation_under_compile_is_said_as_in_eager() -> None:
    """Its only activation on a 0-D tensor, compiled: one warning that says so (compiled,
    it was silent, and the window's warning then blamed eval mode)."""
    net = _ScalarGate()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doc, _ = _train(net, torch.compile(net, backend="aot_eager"), [torch.randn(4, 3)] * 3)
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    assert sum("'gate' runs on a 0-D tensor" in m for m in said) == 1, said
    assert not any("eval" in m for m in said), said
    assert doc.sites == [] and doc.global_step == 3


def test_compiled_model_trains_with_eager_forward_statistics() -> None:
    torch.manual_seed(0)
    net = zoo.CheckpointedNet()  # stem ReLU, BasicBlock reusing an inplace ReLU, F.relu
    twin = copy.deepcopy(net)
    xs = _inputs()
    eager, eager_losses = _train(twin, twin, xs, functional=True)
    compiled = torch.compile(net, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doc, losses = _train(net, compiled, xs, functional=True)
    ours = [w for w in caught if "relu_doctor" in str(w.message)]
    assert len(ours) == 1 and "gradient statistics" in str(ours[0].message)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-4)
    _assert_forward_equal(eager, doc)
    assert [s.name for s in doc.sites] == ["stem.1", "block.relu#0", "block.relu#1", "dense:relu#0", "dense:relu#1"]
    for s in doc.sites:  # compiled passes carry no gradient tap (eager mode only)
        assert site_fields(s)["grad_elements"].sum() == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompilation
    assert torch._C._len_torch_function_stack() == 0


def test_fullgraph_after_an_eager_step() -> None:
    torch.manual_seed(0)
    net = zoo.CheckpointedNet()
    twin = copy.deepcopy(net)
    xs = _inputs()
    eager, _ = _train(twin, twin, xs, functional=True)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)  # a graph break would raise
    with pytest.warns(UserWarning, match="gradient statistics"):
        doc, _ = _train(net, compiled, xs, steps_eager=1, functional=True)
    _assert_forward_equal(eager, doc)
    # Gradients: the eager step only, exactly as the eager run's first step.
    for s, e in zip(doc.sites, eager.sites, strict=True):
        assert site_fields(s)["grad_elements"].tolist() == (site_fields(e)["grad_elements"] / 3).tolist()


def _graphs(net: nn.Module, xs: list[torch.Tensor], dynamic: bool | None, watch: bool) -> int:
    """The graphs Dynamo makes training ``net`` compiled with ``fullgraph=True`` on ``xs``,
    watched or not; a graph break would raise."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    if watch:
        with pytest.warns(UserWarning, match="gradient statistics"):
            _train(net, compiled, xs, functional=True)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for x in xs:
            compiled(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert not torch._dynamo.utils.counters["graph_break"]
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic=True"])
def test_batch_sizes_that_vary_under_fullgraph_make_no_graph_break(dynamic) -> None:
    """A batch size that changes makes Dynamo trace it as a symbol (automatic dynamic shapes,
    or ``dynamic=True`` from the start). The output's shape, passed to the trace-time site
    lookup, then failed: a graph break at every activation (24 graphs where unwatched made
    2), and under ``fullgraph=True`` an exception into the user's forward at the second
    batch size. Now no break, no graph more for the varying sizes than unwatched training
    makes, and the forward statistics of eager mode, units counted on their fixed dims."""
    torch.manual_seed(0)
    net = zoo.CheckpointedNet()  # stem ReLU, BasicBlock reusing an inplace ReLU, F.relu
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 3, 6, 6, generator=g) for n in (4, 7, 5, 9, 6)]
    fixed = [x[:4] for x in xs]
    twin = copy.deepcopy(net)
    eager, _ = _train(twin, twin, xs, functional=True)
    more = {watch: _graphs(copy.deepcopy(net), xs, dynamic, watch)
            - _graphs(copy.deepcopy(net), fixed, dynamic, watch) for watch in (False, True)}
    assert more[True] == more[False]
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    with pytest.warns(UserWarning, match="gradient statistics"):
        doc, _ = _train(net, compiled, xs, functional=True)
    _assert_forward_equal(eager, doc)
    assert [s.units for s in doc.sites] == [s.units for s in eager.sites]


def test_a_units_dim_whose_size_varies_under_dynamic_shapes_counts_its_width_only() -> None:
    """``unit_dims`` on a sequence dim whose length varies, compiled with ``dynamic=True``:
    the graph that left out a length of another unit count held no guard on it, so later
    calls of the site's own length ran that graph and were left out too. Each graph now
    holds the units' dim fixed: the calls of the site's length are counted, the others left
    out, said once, as in eager mode (the same inputs and reference as there)."""
    model = zoo.SequenceModel()
    xs = [torch.randn(2, 5, 12), torch.randn(3, 6, 12), torch.randn(2, 7, 12),
          torch.randn(4, 5, 12)]
    twin = copy.deepcopy(model)  # (no step: the same weights throughout; eager reference)
    rec = ref.Recorder(twin)
    for x in xs:
        twin(x)
    rec.remove()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, unit_dims={"act": 1}, every_n_steps=1) as doc:
            for x in xs:
                compiled(x).sum().backward()
                doc.step()
    said = [str(w.message) for w in caught if "now runs on shape" in str(w.message)]
    assert len(said) == 1 and "site 'act' had 5 units along dim 1" in said[0]
    total = site_fields(doc.probe.site("act"))
    expected = ref.expected_stats(rec.calls[("act", 0)], 1, steps=[0, 3])
    for name in set(FORWARD) & set(expected):
        np.testing.assert_allclose(total[name], expected[name], rtol=1e-5, err_msg=name)
    assert total["elements"].tolist() == [(2 + 4) * 24] * 5  # (steps 0 and 3 only)


class _DyingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)
        with torch.no_grad():
            self.fc1.bias.fill_(-1.5)  # (most units dead: something to treat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("remedy", ["recycle", "swap", "plan"])
def test_remedies_given_the_compiled_wrapper_treat_the_model_it_compiles(remedy) -> None:
    """``watch(torch.compile(model))`` watches the model the wrapper compiles; a remedy given
    the same wrapper hooked the wrapper itself, and ReDo's input tap, traced by Dynamo,
    raised inside the user's first forward (and every later one); the swap named its sites
    ``_orig_mod.*``. A remedy takes the wrapper for the model it compiles too: it treats
    it, under the sites' own names, and the compiled model computes what the eager one
    does afterwards."""
    from relu_doctor.remedies import ActivationSwapper, DormantRecycler, TreatmentPlan

    torch.manual_seed(0)
    net = _DyingNet()
    cm = torch.compile(net, backend="aot_eager")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (compiled: no gradient statistics)
        with relu_doctor.watch(cm, optimizer=opt, every_n_steps=1, log_every_n_steps=4) as doc:
            fix = (DormantRecycler(cm, optimizers=opt) if remedy == "recycle"
                   else ActivationSwapper(cm, threshold=0.3, patience=1) if remedy == "swap"
                   else TreatmentPlan(cm, optimizer=opt, steps=["recycle"], patience=1))
            fix.bind(doc)
            for _ in range(12):
                (cm(torch.randn(16, 8, generator=g)) - 1).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                doc.step()
    acted = doc.to_run().interventions()
    assert acted and {str(e["site"]) for e in acted} == {"act"}
    assert all("_orig_mod" not in str(e) for e in acted)
    x = torch.randn(16, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), net(x))


def test_fullgraph_first_call_compiled_modules_only() -> None:
    torch.manual_seed(0)
    net = zoo.BasicBlock()
    twin = copy.deepcopy(net)
    xs = [torch.randn(2, 8, 5, 5) for _ in range(2)]
    eager, _ = _train(twin, twin, xs)
    with pytest.warns(UserWarning, match="gradient statistics"):
        doc, _ = _train(net, torch.compile(net, backend="aot_eager", fullgraph=True), xs)
    _assert_forward_equal(eager, doc)


def test_every_n_steps_under_compile() -> None:
    torch.manual_seed(0)
    net = zoo.mlp()
    xs = [torch.randn(8, 10) for _ in range(4)]
    with pytest.warns(UserWarning):
        doc, _ = _train(net, torch.compile(net, backend="aot_eager"), xs, every_n_steps=2)
    # Steps 0 and 2 collect; the collecting flag is guarded, so 1 and 3 run a graph without stats.
    assert [site_fields(s)["elements"][0] for s in doc.sites] == [16.0, 16.0]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_detach_stops_compiled_collection() -> None:
    torch.manual_seed(0)
    net = zoo.mlp()
    compiled = torch.compile(net, backend="aot_eager")
    x = torch.randn(4, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        doc = relu_doctor.watch(net)
        compiled(x)
    before = [site_fields(s)["elements"].copy() for s in doc.sites]
    doc.detach()
    compiled(x)  # hooks are guarded: Dynamo recompiles without them
    assert [site_fields(s)["elements"].tolist() for s in doc.sites] == [b.tolist() for b in before]


@pytest.mark.slow
def test_inductor_backend() -> None:
    torch.manual_seed(0)
    net = zoo.MixedActivations()
    twin = copy.deepcopy(net)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 6, generator=g) for _ in range(3)]
    eager, eager_losses = _train(twin, twin, xs, functional=True)
    with pytest.warns(UserWarning, match="gradient statistics"):
        doc, losses = _train(net, torch.compile(net), xs, functional=True)
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-4)
    _assert_forward_equal(eager, doc)
    assert [s.name for s in doc.sites] == ["act", "(root):relu#0", "(root):relu#1", "block:relu#0"]


def test_compiled_inference_scan() -> None:
    # scan() in eval mode, no gradients: nothing to warn about, same numbers as eager.
    torch.manual_seed(0)
    net = nn.Sequential(zoo.DenseLayer(), nn.Flatten())
    data = [torch.randn(4, 8, 4, 4) for _ in range(2)]
    eager = relu_doctor.scan(copy.deepcopy(net), data, functional=True)
    compiled = torch.compile(net, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = relu_doctor.scan(net, data, functional=True, forward=lambda m, b: compiled(b))
    assert list(res.sites["site"]) == list(eager.sites["site"]) == ["0:relu#0", "0:relu#1"]
    np.testing.assert_allclose(res.units["activation_rate"], eager.units["activation_rate"], atol=1e-6)


@pytest.mark.parametrize("cap", [1.1, 0.7], ids=["cap rounds up", "cap rounds down"])
def test_saturation_of_a_low_precision_cap_is_counted_in_a_compiled_graph(cap) -> None:
    # bfloat16 holds 1.1 as 1.1016 and 0.7 as 0.6992; inside the compiled graph the
    # statistics may read the clamp's float32 value (1.1) before it is rounded. Both must
    # count as saturated, as in eager mode.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Hardtanh(0.0, cap)).to(torch.bfloat16)
    x = torch.randn(64, 8, dtype=torch.bfloat16) * 3
    at_cap = (model(x) == torch.tensor(cap, dtype=torch.bfloat16)).float().mean().item()
    assert at_cap > 0.1
    with relu_doctor.watch(model, overhead_budget=None, gradients=False, log_every_n_steps=1) as doc:
        torch.compile(model, fullgraph=True)(x)
        doc.step()
    assert doc.records[-1].site_rows[0]["saturated_fraction"] == at_cap


def test_a_compiled_module_run_unbatched_first_counts_its_later_unbatched_calls() -> None:
    """A Linear run on one sample first, then on batches, then on one sample again (an RL
    policy), compiled. Tracing hides the Linear, so the first 1-D call is left out, with a
    warning that says torch.compile is why; the graph traced on it used to bake in "no
    site", so 1-D calls after the batches made the site were never counted. Now Dynamo
    guards on the missing site, retraces once it exists, and every call from the first
    batch on is counted, its units the Linear's features (the reference's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    compiled = torch.compile(model, backend="aot_eager")
    xs = [torch.randn(4), torch.randn(3, 4), torch.randn(5, 4), torch.randn(4), torch.randn(4)]
    with torch.no_grad():  # the reference: each call's activations (no optimizer step)
        seen = [model(x).reshape(-1, 6) for x in xs]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=1000, every_n_steps=1,
                               overhead_budget=None) as doc:
            for x in xs:
                compiled(x).sum().backward()
                doc.step()
    one_d = [str(w.message) for w in said if "1-D tensor" in str(w.message)]
    assert len(one_d) == 1 and "under torch.compile" in one_d[0], one_d
    (site,) = doc.sites
    assert site.units == 6
    h = torch.cat(seen[1:])
    f = site_fields(site)
    np.testing.assert_array_equal(f["elements"], np.full(6, float(len(h))))
    np.testing.assert_array_equal(f["active"], (h > 0).sum(0).double().numpy())
    np.testing.assert_allclose(f["sum"], h.sum(0).double().numpy(), rtol=1e-5)


class _SlicedLayers(nn.Module):
    """Runs the first layers of a ModuleList through a slice, as HF Llama, Mistral and Qwen2
    do (``for layer in self.layers[: n]``): the slice is a new ModuleList made inside the
    compiled forward, registering its modules as it is built."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:2]:
            x = layer(x)
        return x


def test_a_modulelist_sliced_in_a_compiled_forward_makes_no_graph_break() -> None:
    # torch's process-wide module registration hook (how a watched model's new modules are
    # found) ran the Probe's weak reference, which Dynamo cannot trace: a graph break at
    # each slice, and a watched compiled run no longer bit-identical to an unwatched one.
    xs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    weights = []
    for watched in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(0)
        net = _SlicedLayers()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        compiled = torch.compile(net, backend="aot_eager", fullgraph=True)  # a break raises
        doc = relu_doctor.watch(net, every_n_steps=1, overhead_budget=None) if watched else None
        for x in xs:
            compiled(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if doc is not None:
                doc.step()
        assert not torch._dynamo.utils.counters["graph_break"]
        if doc is not None:
            assert [s.name for s in doc.sites] == ["layers.0.1", "layers.1.1"]
            assert all(site_fields(s)["elements"].tolist() == [12.0] * 8 for s in doc.sites)
            doc.detach()
        weights.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_a_compiled_wrapper_passed_to_watch_is_watched_as_the_model_it_compiles() -> None:
    """``watch(torch.compile(net))`` raised inside the first forward (Dynamo: "already
    tracked for mutation"); it watches ``net``, under its own site names, with the
    forward statistics of an eager run."""
    torch.manual_seed(0)
    net = zoo.CheckpointedNet()
    twin = copy.deepcopy(net)
    xs = _inputs()
    eager, eager_losses = _train(twin, twin, xs, functional=True)
    compiled = torch.compile(net, backend="aot_eager")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the compiled passes' gradient note
        with relu_doctor.watch(compiled, log_every_n_steps=1000, functional=True) as doc:
            for x in xs:
                opt.zero_grad()
                loss = compiled(x).pow(2).mean()
                loss.backward()
                opt.step()
                doc.step()
                losses.append(loss.item())
    assert doc.model is net
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-4)
    _assert_forward_equal(eager, doc)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


def test_sites_first_seen_after_a_graph_break_past_the_recompile_limit_are_made() -> None:
    """A user's own hook on each activation that breaks the graph (``.item()``): Dynamo
    compiles our hooks as frames of their own, one per module, up to its recompile limit,
    then runs them eagerly; those sites, first seen eagerly in a pass that began in the
    graph (so no producer tracking), were put off to a next pass that never tracked: they
    were never made, silently. They take the shape rule, as sites first seen compiling do."""
    torch.manual_seed(0)
    net = nn.Sequential(*[_Residual() for _ in range(5)])
    twin = copy.deepcopy(net)
    def count_active(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        (out > 0).sum().item()  # a host read: a graph break

    for m in net.modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(count_active)
    xs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    eager, _ = _train(twin, twin, xs)
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        doc, _ = _train(net, torch.compile(net, backend="aot_eager"), xs)
    assert [s.name for s in doc.sites] == [f"{i}.act" for i in range(5)]
    _assert_forward_equal(eager, doc)


class _Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(10, 10), nn.ReLU()
        self.conv, self.conv_act = nn.Conv1d(4, 8, 3, padding=1), nn.ReLU()

    def forward(self, x: torch.Tensor, conv: bool = False) -> torch.Tensor:
        h = self.act(self.fc(x))  # (N, 4, 10)
        return self.conv_act(self.conv(h)).mean(1) if conv else h.mean(1)


def test_a_site_first_seen_in_a_later_eager_pass_of_a_compiled_model_follows_its_producer() -> None:
    """Only a pass begun in the graph lacks producer tracking: a site first seen in an
    eager pass after compiled ones (a branch the compiled calls never take) finds its
    units from its producer, a Conv1d's 8 channels, not the shape rule's last dim (10)."""
    torch.manual_seed(0)
    net = _Branches()
    compiled = torch.compile(net, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relu_doctor.watch(net, log_every_n_steps=100, overhead_budget=None) as doc:
            # eager (its sites resolved, the tracker's passes spent), compiled, the branch
            for fn in (*[net] * 10, compiled, compiled, lambda x: net(x, conv=True),
                       lambda x: net(x, conv=True)):
                fn(torch.randn(2, 4, 10)).sum().backward()
                doc.step()
    site = doc.probe.site("conv_act")
    assert (site.units, site.unit_dim) == (8, 1), site.unit_rule


class _LeNet(nn.Module):
    """LeNet-5 with one ReLU module called at every layer, declared last, after the
    Linear(84, 10): the layer registered before it made none of its conv calls' input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(self.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


@pytest.mark.parametrize("case", ["convnext", "swin_mlp", "conv1d", "cnn", "lenet_shared_relu"])
def test_sites_first_seen_while_compiling_take_the_units_of_the_layer_registered_before_them(case):
    """Compiled from the first call, no pass can be followed to the layer that made an
    activation's input, and the shape rule took dim 1 of ConvNeXt's (N, H, W, 4C) GELU
    input (the image rows: 8 "units" where eager counts 32 channels; a trial's dead 25%
    read 0%) and the last dim of a Conv1d's (N, C, L). The layer registered just before
    the activation, by its width, gives eager's units: the same dims and statistics."""
    torch.manual_seed(0)
    net, shape = {
        "convnext": (lambda: nn.Sequential(zoo.UnitsConvNeXtBlock(8), zoo.UnitsConvNeXtBlock(8)),
                     (4, 8, 6, 6)),
        "swin_mlp": (lambda: zoo.UnitsSwinMlp(8), (4, 5, 5, 8)),
        "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 5, 3), nn.Dropout(0.0), nn.ReLU(),
                                         nn.Conv1d(5, 4, 3), nn.BatchNorm1d(4), nn.ReLU()),
                   (4, 3, 11)),
        "cnn": (zoo.SmallCNN, (4, 3, 8, 8)),
        "lenet_shared_relu": (_LeNet, (8, 3, 32, 32)),  # conv2's output: (8, 16, 10, 10)
    }[case]
    model = net()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(*shape, generator=g) for _ in range(2)]
    eager, _ = _train(twin, twin, xs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReluDoctorWarning)  # (the gradient statistics' word)
        doc, _ = _train(model, torch.compile(model, backend="aot_eager"), xs)
    assert [(s.unit_dim, s.units) for s in doc.sites] == [(s.unit_dim, s.units) for s in eager.sites]
    _assert_forward_equal(eager, doc)
    if case not in ("cnn", "lenet_shared_relu"):  # the ones the shape rule got wrong: said how
        assert all("registered before it" in s.unit_rule for s in doc.sites), [s.unit_rule for s in doc.sites]


class _Part(nn.Module):
    """Conv-ReLU, then a functional relu of a Linear: module and functional sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 8)
        with torch.no_grad():
            self.conv.bias[:2] = -50.0  # two channels dead
            self.fc.bias[:3] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.act(self.conv(x)).flatten(1)))


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.part, self.head = _Part(), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.part(x))


@pytest.mark.parametrize("when", ["before watch", "after a step"])
def test_a_part_compiled_apart_inside_an_eager_model_trains_and_is_counted(when: str) -> None:
    """`model.part = torch.compile(model.part)` in a watched eager model raised into the
    first compiled step (a trial): Dynamo, tracing the part's hooks, met the part twice in
    the probe's module set (its wrapper standing for it), and with relu_doctor's
    torch-function modes on the stack failed to make its guards. The part now runs with
    the modes off and no wrapper among the modules hooks look up: it trains, its sites
    (named under its wrapper, `part._orig_mod`) count what eager mode counts, with no
    gradient statistics, as a model compiled after watch."""
    torch.manual_seed(0)
    model = _Holder()
    xs = _inputs(4)
    plain = copy.deepcopy(model)
    with torch.no_grad():  # the reference: each site's output, the eager way
        outs = [(plain.part.act(plain.part.conv(x)),
                 torch.relu(plain.part.fc(plain.part.act(plain.part.conv(x)).flatten(1))))
                for x in xs]
    if when == "before watch":
        model.part = torch.compile(model.part, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relu_doctor.watch(model, log_every_n_steps=100, every_n_steps=1,
                               overhead_budget=None) as doc:
            for i, x in enumerate(xs):
                if i == 1 and when == "after a step":
                    model.part = torch.compile(model.part, backend="aot_eager")
                model(x).pow(2).mean().backward()  # (no optimizer: the weights stay)
                doc.step()
    rows = doc.to_pandas().set_index("site")
    counted = xs if when == "before watch" else xs[1:]
    first = 0 if when == "before watch" else 1
    conv = torch.cat([o[0] for o in outs[first:]])
    fc = torch.cat([o[1] for o in outs[first:]])
    act, fn = rows.loc["part._orig_mod.act"], rows.loc["part._orig_mod:relu#0"]
    assert act["elements"] == conv.numel() and fn["elements"] == fc.numel() == 32 * len(counted)
    assert act["dead"] == int((conv <= 0).all(dim=(0, 2, 3)).sum()) >= 2
    assert fn["dead"] == int((fc <= 0).all(dim=0).sum()) >= 3
    assert np.isnan(act["grad_rms"]) and np.isnan(fn["grad_rms"])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _After(nn.Module):
    """A part, then a functional relu of a Conv1d whose units are on dim 1 (the shape rule
    would take the last dim), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.part = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
        self.conv = nn.Conv1d(6, 5, 1)
        self.head = nn.Conv1d(5, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(self.part(x).transpose(1, 2))))


def test_around_a_part_compiled_apart_producers_links_and_direct_calls_hold() -> None:
    """A review of the fix above: the part called on its own (a GAN's G) still raised (its
    wrapper was among the hooks' boundary modules); a functional site after the part lost
    its producer and took the shape rule's units (the modes put back in the wrong order);
    and no site of the model could be linked for recycling (the dataflow pass ran the part
    compiled, under its mode)."""
    from relu_doctor.remedies import find_unit_links

    torch.manual_seed(0)
    model = _After()
    model.part = torch.compile(model.part, backend="aot_eager")
    g = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relu_doctor.watch(model, log_every_n_steps=100, every_n_steps=1,
                               overhead_budget=None) as doc:
            for _ in range(2):
                model(torch.randn(4, 7, 6, generator=g)).pow(2).mean().backward()
                model.part(torch.randn(4, 7, 6, generator=g)).sum().backward()  # on its own
                doc.step()
            site = doc.probe.site("(root):relu#0")
            links = find_unit_links(model, site=doc.site_key("(root):relu#0"),
                                    example_inputs=torch.randn(4, 7, 6, generator=g))
    assert (site.producer, site.unit_dim, site.units) == ("conv", 1, 5)
    assert links.producer_path == "conv" and [c.path for c in links.consumers] == ["head"]
    part = doc.to_pandas().set_index("site").loc["part._orig_mod.1"]
    assert part["elements"] == 2 * 2 * 4 * 7 * 6  # both calls of each step, as eager counts


def test_a_recycler_bound_to_a_model_with_a_part_compiled_apart_treats_it() -> None:
    """A review: a DormantRecycler bound with no example_inputs hooks every module to keep
    the inputs of a pass (InputTap), and with the part's wrapper among them Dynamo raised
    into the first step, as in the probe's module set. The part's dead units are recycled,
    through its compiled wrapper, and its output is the eager module's."""
    from relu_doctor.remedies import DormantRecycler

    torch.manual_seed(0)
    model = _Holder()
    model.part = torch.compile(model.part, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    xs = _inputs(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=2, every_n_steps=1,
                               overhead_budget=None) as doc:
            recycler = DormantRecycler(model, optimizers=opt).bind(doc)
            for x in xs:
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                opt.step()
                doc.step()
    assert recycler.recycled.get("part._orig_mod.act", 0) >= 2
    with torch.no_grad():
        assert torch.allclose(model.part(xs[0]), model.part._orig_mod(xs[0]))
