"""Units are the producing layer's features (issue 12), on the zoo's reproductions of
torchvision/timm traits and on Keras 3 models, with default arguments.

Each site's unit dim and count are declared from the architecture (the Linear's
``out_features``, the convolution's channels, wherever a permute put them) and every
statistic is checked against the brute-force reference taken along that dim, over steps of
two input sizes. The reference captures activations independently: module hooks
(:class:`tests.reference.Recorder`), patched functional ops on a twin model
(:mod:`tests.reference_functional`), or here a wrapper around ``torch.nn.functional.relu``
for Keras' torch-backend ``relu``, as Keras layers are not torch submodules.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relu_doctor
from relu_doctor.errors import ReluDoctorWarning
from relu_doctor.provenance import ProvenanceTracker
from relu_doctor.stats import FIELDS
from tests import reference as ref
from tests import zoo
from tests.reference_functional import reference_calls


def _train(model: nn.Module, batches: list[torch.Tensor], doc: Any = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x in batches:
        out = model(x)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        if doc is not None:
            doc.step()


def _total(site: Any) -> dict[str, np.ndarray]:
    m = (site.stats.window + site.stats.lifetime).to(torch.float64).numpy()
    return {name: m[i] for i, name in enumerate(FIELDS)}


def _watch_strictly(model: nn.Module, run: Callable[[Any], None], **kwargs: Any) -> Any:
    """Watch with default arguments but ``every_n_steps=1`` (the default samples steps by
    their measured cost: exact counts need every step); any relu_doctor warning fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReluDoctorWarning)
        with relu_doctor.watch(model, log_every_n_steps=3, every_n_steps=1, **kwargs) as doc:
            run(doc)
    return doc


@pytest.mark.parametrize("name", list(zoo.UNIT_CASES))
def test_units_are_the_producers_features_on_the_zoo(name: str) -> None:
    case = zoo.UNIT_CASES[name]
    model = case.model()
    batches = [make(4) for make in case.batches for _ in range(2)]  # two sizes, two steps each
    ops = sorted({op for (_p, _i, op) in case.sites if op is not None})
    twin = reference_calls(model, [(F, op, op) for op in ops], lambda m: _train(m, batches))
    recorder = ref.Recorder(model)
    try:
        doc = _watch_strictly(model, lambda doc: _train(model, batches, doc))
    finally:
        recorder.remove()
    sites = {(s.module_path, s.call_index, s.op): s for s in doc.sites}
    assert set(sites) == set(case.sites)
    for key, (dim, units, producer) in case.sites.items():
        site = sites[key]
        path, idx, op = key
        capture = recorder.calls[(path, idx)] if op is None else twin[(path, op, idx)]
        assert len(capture.outputs) == len(batches)
        assert {o.shape[dim] for o in capture.outputs} == {units}  # the declaration holds
        assert (site.unit_dim, site.units) == (dim, units), site.unit_rule
        assert producer in site.unit_rule, site.unit_rule
        ref.assert_stats_match(_total(site), ref.expected_stats(capture, dim), site.name)


def test_the_rule_is_in_to_pandas_meta_and_the_report(tmp_path: Any) -> None:
    case = zoo.UNIT_CASES["convnext_block"]
    model = case.model()
    with relu_doctor.watch(model, run_dir=tmp_path / "run", log_every_n_steps=1, every_n_steps=1) as doc:
        _train(model, [case.batches[0](2)], doc)
    frame = doc.to_pandas().set_index("site")
    assert frame.loc["0.act", "unit_dim"] == 3
    assert frame.loc["0.act", "unit_rule"] == "Linear `0.pwconv1` -> last dim"
    run = relu_doctor.load_run(tmp_path / "run")
    described = {s["name"]: s for s in run.site_info}
    assert (described["1.act"]["unit_dim"], described["1.act"]["unit_rule"]) == (
        3, "Linear `1.pwconv1` -> last dim"
    )
    from relu_doctor.reports.context import build_context

    rows = {r.site: r for r in build_context(run).sites}
    assert rows["0.act"].unit_rule == "Linear `0.pwconv1` -> last dim"


def test_unit_dims_still_overrides_the_producer() -> None:
    model = zoo.UnitsSwinMlp()
    doc = _watch_strictly(
        model, lambda doc: _train(model, [torch.randn(2, 4, 5, 8)], doc), unit_dims={"act": 1}
    )
    (site,) = doc.sites
    assert (site.unit_dim, site.units) == (1, 4) and "override" in site.unit_rule


def test_no_producer_falls_back_to_the_shape_rule() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 2, 1))  # the activation runs on the input
    doc = _watch_strictly(model, lambda doc: _train(model, [torch.randn(2, 3, 5, 5)], doc))
    (site,) = doc.sites
    assert (site.unit_dim, site.units) == (1, 3)
    assert site.unit_rule.startswith("shape rule") and "no producing layer" in site.unit_rule


class _Margins(nn.Module):
    """A classifier that computes its hinge loss in ``forward`` (as models that return their
    loss do): ``F.relu(1 - y * f)`` runs on one scalar per sample. ``unbatched`` also runs a
    Linear and a ReLU on one sample, an RL policy's way: that (F,) output has units."""

    def __init__(self, unbatched: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 1)
        self.clamp = nn.ReLU()
        self.unbatched = unbatched

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = self.head(self.fc(x)).squeeze(-1)
        loss = F.relu(1 - y * f).mean() + self.clamp(y - f).mean()
        if self.unbatched:
            loss = loss + F.relu(self.fc(x[0])).sum()
        return loss


def _run_recording_warnings(model: nn.Module, run: Callable[[Any], None], **kwargs: Any) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=3, every_n_steps=1, **kwargs) as doc:
            run(doc)
    return doc, [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]


@pytest.mark.parametrize("unbatched", [False, True])
def test_a_1d_output_no_layer_made_is_no_site(unbatched: bool) -> None:
    """Per-sample scalars are no units: no site, one warning per such call that says how
    to watch it anyway (before, each sample was a "unit" and a batch of another size warned
    that the unit count changed). A 1-D output a Linear made (one sample) still is a site,
    units along its features."""
    torch.manual_seed(0)
    model = _Margins(unbatched)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    one_sample: list[torch.Tensor] = []  # the reference: fc's outputs on one sample
    model.fc.register_forward_hook(
        lambda m, a, out: one_sample.append(out.detach().clone()) if out.dim() == 1 else None
    )

    def run(doc: Any) -> None:
        for n in (8, 8, 5, 8):  # a short last batch
            y = torch.randint(0, 2, (n,)).float() * 2 - 1
            opt.zero_grad()
            model(torch.randn(n, 4), y).backward()
            opt.step()
            doc.step()

    doc, said = _run_recording_warnings(model, run)  # and no "ran no activation" error
    assert len(said) == 2, said
    assert "'(root):relu#0' runs on a 1-D tensor" in said[0] and "unit_dims=" in said[0]
    # (a GNN trial followed unit_dims for a score per edge: each batch's edge count another
    # unit count; a per-sample value is kept as one unit by a unit dim of 1)
    assert "x.unsqueeze(-1)" in said[0] and "as a batch's edges do" in said[0]
    assert "'clamp' runs on a 1-D tensor" in said[1]
    sites = {s.name: s for s in doc.sites}
    if not unbatched:
        assert sites == {}
        return
    (site,) = sites.values()
    assert site.op == "relu" and (site.unit_dim, site.units) == (0, 3)
    assert site.unit_rule == "Linear `fc` -> dim 0"
    total = site.stats.lifetime + site.stats.window  # every step: the counts are exact
    h = F.relu(torch.stack(one_sample))
    assert len(one_sample) == 4
    assert total[FIELDS.index("active")].tolist() == (h > 0).sum(0).double().tolist()
    assert total[FIELDS.index("elements")].tolist() == [4.0] * 3


class _Gated(nn.Module):
    """A learned scalar gate through a ReLU (a 0-D activation), beside a batched site."""

    def __init__(self, gate_only: bool) -> None:
        super().__init__()
        self.gate_only = gate_only
        self.p = nn.Parameter(torch.tensor(0.5))
        self.gate = nn.ReLU()
        self.fc = nn.Linear(4, 6)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.gate_only else self.act(self.fc(x))
        return h * self.gate(self.p)  # the 0-D call


@pytest.mark.parametrize("gate_only", [True, False])
def test_a_0d_activation_is_no_site_said_once_and_training_goes_on(gate_only: bool) -> None:
    """A scalar has no units: no site, one warning pointing at the user's forward, and no
    "ran no activation" error that would stop the loop (before, a model whose only
    activation was 0-D raised at its first step). The batched site beside it is counted
    exactly."""
    torch.manual_seed(0)
    model = _Gated(gate_only)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    outs: list[torch.Tensor] = []
    model.act.register_forward_hook(lambda m, a, out: outs.append(out.detach().clone()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=2, every_n_steps=1) as doc:
            for _ in range(4):
                opt.zero_grad()
                model(torch.randn(8, 4)).sum().backward()
                opt.step()
                doc.step()
    said = [w for w in caught if issubclass(w.category, ReluDoctorWarning)
            and "0-D" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert str(said[0].message).startswith("relu_doctor: 'gate' runs on a 0-D tensor")
    assert said[0].filename == __file__  # the user's forward, past torch's module call
    assert doc.global_step == 4
    assert [s.name for s in doc.sites] == ([] if gate_only else ["act"])
    if not gate_only:
        (site,) = doc.sites
        h = torch.cat(outs)
        total = site.stats.lifetime + site.stats.window
        assert total[FIELDS.index("active")].tolist() == (h > 0).sum(0).double().tolist()


class _Cell(nn.Module):
    """A recurrent step written as a matmul with a parameter, a layer the producer tracking
    does not follow, run on one sample first, then on batches."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x @ self.w.T)


def test_a_1d_call_skipped_leaves_the_same_call_on_batches_watched() -> None:
    """The 1-D rule skips a call while it runs on 1-D tensors only: once it runs on batches
    it is a site, counted like any other (the shape rule: the last dim)."""
    torch.manual_seed(0)
    model = _Cell()
    batches = [torch.randn(5), torch.randn(3, 5), torch.randn(4, 5), torch.randn(5)]

    def run(doc: Any) -> None:
        for x in batches:
            model(x).sum().backward()
            doc.step()

    doc, said = _run_recording_warnings(model, run)
    assert len(said) == 1 and "unit_dims={'(root)': -1}" in said[0], said
    (site,) = doc.sites
    assert (site.unit_dim, site.units) == (1, 6)
    with torch.no_grad():  # w unchanged: no step. Once a site, a 1-D call counts (dim_for)
        h = torch.cat([F.relu(x @ model.w.T).reshape(-1, 6) for x in batches[1:]])
    total = site.stats.lifetime + site.stats.window
    assert total[FIELDS.index("active")].tolist() == (h > 0).sum(0).double().tolist()


class _FeaturesFirst(nn.Module):
    """A GNN layer computed features-first: ``relu(W @ x.T)``, (16, N) for N nodes."""

    def __init__(self, mm: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.mm = mm
        if mm == "t()":  # stored (in, out), read through a view (a review: taken for none)
            self.w = nn.Parameter(self.w.detach().t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mm == "t()":
            return torch.relu(self.w.t() @ x.T)
        h = self.w @ x.T if self.mm == "matmul" else torch.mm(self.w, x.T)
        return torch.relu(h)


@pytest.mark.parametrize("mm", ["matmul", "mm", "t()"])
def test_a_weight_on_the_left_of_a_matmul_makes_its_rows_the_units(mm: str) -> None:
    """``relu(W @ x.T)`` of N nodes was read by the shape rule as N units, and every call
    with another N left out (a trial: 1 of 10 calls counted, the table saying 10 steps).
    A weight on the left makes the rows: 16 units, every call counted."""
    torch.manual_seed(0)
    model = _FeaturesFirst(mm)
    batches = [torch.randn(n, 8) for n in (9, 5, 23, 16)]
    doc, said = _run_recording_warnings(model, lambda doc: [
        (model(x).sum().backward(), doc.step()) for x in batches])
    assert not said, said
    (site,) = doc.sites
    assert (site.unit_dim, site.units) == (0, 16)
    w = model.w.t() if mm == "t()" else model.w
    with torch.no_grad():
        h = torch.cat([torch.relu(w @ x.T).T for x in batches])  # (sum N, 16)
    total = site.stats.lifetime + site.stats.window
    assert total[FIELDS.index("active")].tolist() == (h > 0).sum(0).double().tolist()


class _Mixing(nn.Module):
    """``relu(M @ lin(x))``: the nodes mixed by an adjacency buffer or a learned parameter,
    the features those of ``lin``, on the last dim."""

    def __init__(self, learned: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)
        m = torch.rand(10, 10)
        if learned:
            self.m = nn.Parameter(m)
        else:
            self.register_buffer("m", m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.m @ self.lin(x))


@pytest.mark.parametrize("learned", [False, True])
def test_a_weight_on_the_left_mixing_rows_of_features_keeps_their_units(learned: bool) -> None:
    """A GCN's A_hat @ (x @ W), or a learned mixing of the nodes: the features are x @ W's
    (4, the last dim), not the mixing's rows (a review of the rule above: the 10 nodes were
    read as units)."""
    torch.manual_seed(0)
    model = _Mixing(learned)
    batches = [torch.randn(10, 8) for _ in range(3)]
    doc, said = _run_recording_warnings(model, lambda doc: [
        (model(x).sum().backward(), doc.step()) for x in batches])
    (site,) = doc.sites
    assert (site.unit_dim, site.units) == (1, 4), said
    with torch.no_grad():
        h = torch.cat([model(x) for x in batches])
    total = site.stats.lifetime + site.stats.window
    assert total[FIELDS.index("active")].tolist() == (h > 0).sum(0).double().tolist()


@pytest.mark.parametrize("conv", [False, True])
def test_a_module_run_unbatched_and_batched_keeps_its_units(conv: bool) -> None:
    """A layer run on one sample and on batches (an RL policy, a ``(C, H, W)`` image) holds
    its units at the same place from the end. Before, the unit dim was the first call's
    from the front: a later call of another rank was left out, or, where a batch was as
    long as the features (here 6 samples of 6 features, and 4 channels of 4x4), counted
    along the batch with no warning."""
    torch.manual_seed(0)
    if conv:
        layer: nn.Module = nn.Conv2d(3, 4, 3, padding=1)
        batches = [torch.randn(3, 4, 4), torch.randn(4, 3, 4, 4), torch.randn(2, 3, 4, 4)]
    else:
        layer = nn.Linear(4, 6)
        batches = [torch.randn(4), torch.randn(6, 4), torch.randn(3, 4)]
    model = nn.Sequential(layer, nn.ReLU())
    seen: list[torch.Tensor] = []  # the reference, units moved last
    model[1].register_forward_hook(lambda m, a, out: seen.append(
        (out.movedim(-3, -1) if conv else out).detach().reshape(-1, 4 if conv else 6)))

    def run(doc: Any) -> None:
        for x in batches:
            model(x).sum().backward()
            doc.step()

    doc, said = _run_recording_warnings(model, run)
    assert said == []
    (site,) = doc.sites
    assert site.units == (4 if conv else 6) and site.unit_dim == 0
    h = torch.cat(seen)
    total = site.stats.lifetime + site.stats.window
    assert total[FIELDS.index("elements")].tolist() == [float(len(h))] * site.units
    assert total[FIELDS.index("active")].tolist() == (h > 0).sum(0).double().tolist()
    assert total[FIELDS.index("sum")].tolist() == pytest.approx(h.sum(0).double().tolist())


def test_unit_dims_from_the_warning_watches_a_1d_call_and_its_batches() -> None:
    """The 1-D warning's advice, ``unit_dims={path: -1}``, watches the call from its first
    1-D call, and its batched calls count the same units, the last dim. (It said ``0``
    before, which counted a batch of 6 samples as the 6 units, with no warning.)"""
    torch.manual_seed(0)
    model = _Cell()
    batches = [torch.randn(5), torch.randn(6, 5), torch.randn(5), torch.randn(2, 5)]

    def run(doc: Any) -> None:
        for x in batches:
            model(x).sum().backward()
            doc.step()

    doc, said = _run_recording_warnings(model, run, unit_dims={"(root)": -1})
    assert said == []
    (site,) = doc.sites
    assert site.units == 6 and "override" in site.unit_rule
    with torch.no_grad():
        h = torch.cat([F.relu(x @ model.w.T).reshape(-1, 6) for x in batches])
    total = site.stats.lifetime + site.stats.window
    assert total[FIELDS.index("elements")].tolist() == [float(len(h))] * 6
    assert total[FIELDS.index("active")].tolist() == (h > 0).sum(0).double().tolist()


def test_unit_dims_keeps_a_1d_site() -> None:
    model = _Margins()
    doc = _watch_strictly(
        model,
        lambda doc: (model(torch.randn(6, 4), torch.ones(6)).backward(), doc.step()),
        unit_dims={"*": 0},
    )
    assert sorted((s.name, s.units) for s in doc.sites) == [("(root):relu#0", 6), ("clamp", 6)]


# ---------------------------------------------------------------------- cost


def test_tracking_runs_in_the_first_pass_only(monkeypatch: pytest.MonkeyPatch) -> None:
    starts = []
    real = ProvenanceTracker.start
    monkeypatch.setattr(ProvenanceTracker, "start", lambda self: (starts.append(1), real(self)))
    model = zoo.UnitsConvNeXtBlock()
    tracking = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tracking.append(doc.probe._provenance.tracking)
            return x

    model.norm = nn.Sequential(Spy(), model.norm)
    with relu_doctor.watch(model) as doc:
        _train(model, [torch.randn(2, 8, 5, 5) for _ in range(4)], doc)
    assert len(starts) == 1
    assert tracking == [True, False, False, False]


class _LateBranch(nn.Module):
    """A Conv1d branch that runs from the third pass on (a site that appears late)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 10, 3)
        self.act = nn.ReLU()
        self.late = nn.ReLU()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, L, 6)
        self.calls += 1
        h = self.act(self.fc(x))
        if self.calls >= 3:
            return self.late(self.conv(h.transpose(1, 2))).mean() + h.mean()
        return h.mean()


def test_a_site_that_appears_late_is_resolved_in_the_next_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    starts = []
    real = ProvenanceTracker.start
    monkeypatch.setattr(ProvenanceTracker, "start", lambda self: (starts.append(1), real(self)))
    model = _LateBranch()
    batches = [torch.randn(3, 7, 6) for _ in range(6)]
    recorder = ref.Recorder(model)
    try:
        with relu_doctor.watch(model, log_every_n_steps=2, every_n_steps=1) as doc:
            for x in batches:
                model(x).backward()
                doc.step()
    finally:
        recorder.remove()
    # Tracked until the watched module "late" first ran (pass 3), so LayerDrop-like models
    # lose no call: every one of its calls is counted, the first included.
    assert len(starts) == 3
    site = doc.probe.site("late")
    assert (site.unit_dim, site.units) == (1, 10) and "Conv1d `conv`" in site.unit_rule
    capture = recorder.calls[("late", 0)]
    expected = ref.expected_stats(capture, 1, steps=[0, 1, 2, 3])
    ref.assert_stats_match(_total(site), expected, "late")


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.act = nn.ReLU()
        self.spare = nn.GELU()  # defined, never called (as in many real models' heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x)).sum()


def test_waiting_for_a_module_that_never_runs_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    starts = []
    real = ProvenanceTracker.start
    monkeypatch.setattr(ProvenanceTracker, "start", lambda self: (starts.append(1), real(self)))
    model = _Unused()
    with relu_doctor.watch(model, log_every_n_steps=5, every_n_steps=1) as doc:
        for _ in range(20):
            model(torch.randn(3, 4)).backward()
            doc.step()
    assert len(starts) == 8  # then the producer tracking stops for good
    assert [s.name for s in doc.sites] == ["act"]


# ---------------------------------------------------------------------- Keras 3


class _KerasReluRecorder:
    """Wraps Keras' torch-backend ``relu`` (which calls ``F.relu``): the input and
    output of every call, dL/d(output) by ``register_hook``, dL/d(input) by replaying
    ``torch.relu`` on the stored input. Calls are keyed by their index within a pass."""

    def __init__(self) -> None:
        self.calls: dict[int, ref.Capture] = {}
        self.count = 0
        self._real: Callable[..., torch.Tensor] = F.relu

    def new_pass(self) -> None:
        self.count = 0

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        inp = x.detach().clone()
        out = self._real(x, *args, **kwargs)
        cap = self.calls.setdefault(self.count, ref.Capture())
        self.count += 1
        cap.inputs.append(inp)
        cap.outputs.append(out.detach().clone())
        if out.requires_grad:
            def on_grad(g: torch.Tensor, cap: ref.Capture = cap, inp: torch.Tensor = inp) -> None:
                cap.grads.append(g.detach().clone())
                xi = inp.clone().requires_grad_(True)
                with torch.enable_grad():
                    (gi,) = torch.autograd.grad(torch.relu(xi), xi, g)
                cap.grad_inputs.append(gi.detach().clone())

            out.register_hook(on_grad)
        return out


def _keras_dense() -> Any:
    import keras

    return keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(12, activation="relu"),
        keras.layers.Dense(3),
    ])


def _keras_convnet() -> Any:
    import keras

    return keras.Sequential([
        keras.Input((None, None, 2)),
        keras.layers.Conv2D(5, 3, activation="relu"),
        keras.layers.Conv2D(7, 3, activation="relu", padding="same"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3),
    ])


@pytest.mark.parametrize(
    ("make", "batches", "expected"),
    [
        (_keras_dense, [(4, 10), (4, 10), (6, 10)],
         [(1, 16, "matmul with weight `sequential/dense/kernel` -> last dim"),
          (1, 12, "matmul with weight `sequential/dense_1/kernel` -> last dim")]),
        (_keras_convnet, [(3, 8, 8, 2), (3, 8, 8, 2), (2, 10, 6, 2)],
         [(3, 5, "conv2d with weight `sequential/conv2d/kernel` -> channels moved to last dim"),
          (3, 7, "conv2d with weight `sequential/conv2d_1/kernel` -> channels moved to last dim")]),
    ],
    ids=["dense", "conv2d_channels_last"],
)
def test_keras_units_are_the_layers_features(make: Any, batches: Any, expected: Any) -> None:
    import keras

    keras.utils.clear_session()  # layer names (dense, dense_1 ...) from zero
    model = make()
    xs = [torch.randn(*shape) for shape in batches]
    rec = _KerasReluRecorder()

    def run(doc: Any) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x in xs:
            rec.new_pass()
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()

    from keras.src.backend.torch import nn as keras_nn

    rec._real = keras_nn.relu  # Keras' relu, which calls F.relu (captured as such)
    with mock.patch.object(keras_nn, "relu", rec):
        doc = _watch_strictly(model, run)
    assert len(doc.sites) == len(expected)
    for i, (site, (dim, units, rule)) in enumerate(zip(doc.sites, expected, strict=True)):
        assert (site.unit_dim, site.units, site.unit_rule) == (dim, units, rule)
        ref.assert_stats_match(_total(site), ref.expected_stats(rec.calls[i], dim), site.name)


def test_keras_fit_with_validation_trains_watched_from_the_start() -> None:
    """Keras builds on the meta device first (symbolic shapes) and then fits: the meta pass
    is ignored, the accumulators are made on the real tensors' device, and the validation
    rows are not in the training window."""
    import keras

    keras.utils.clear_session()
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(6, activation="relu"),
        keras.layers.Dense(2),
    ])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).standard_normal((64, 8, 8, 1)).astype("float32")
    y = np.random.default_rng(1).standard_normal((64, 2)).astype("float32")
    with relu_doctor.watch(model, every_n_steps=1, log_every_n_steps=100) as doc:
        model.fit(x, y, batch_size=16, epochs=1, validation_data=(x[:16], y[:16]), verbose=0)
    conv, dense = doc.sites
    assert (conv.unit_dim, conv.units, dense.unit_dim, dense.units) == (3, 4, 1, 6)
    assert conv.stats.window.device.type == dense.stats.window.device.type == "cpu"
    assert _total(conv)["elements"].tolist() == [64.0 * 6 * 6] * 4  # training rows only
    assert _total(dense)["elements"].tolist() == [64.0] * 6


# ---------------------------------------------------------------------- provenance rules


class _Ops(nn.Module):
    """A Linear (8 -> 6 features) or a Conv2d (3 -> 6 channels), then ``ops``."""

    def __init__(self, ops: Callable[[torch.Tensor], torch.Tensor], conv: bool) -> None:
        super().__init__()
        self.layer = nn.Conv2d(3, 6, 1) if conv else nn.Linear(8, 6)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(self.layer(x))


@pytest.mark.parametrize(
    ("conv", "ops", "dim"),
    [
        (False, lambda h: h.permute(0, 3, 1, 2), 1),  # (N, H, W, F) -> (N, F, H, W)
        (False, lambda h: h.transpose(1, 3).contiguous(), 1),
        (False, lambda h: torch.movedim(h, -1, 1), 1),
        (False, lambda h: h.flatten(1, 2), 2),  # (N, H*W, F): the feature axis stays whole
        (False, lambda h: h.reshape(2, 20, 6)[:, 3:], 2),  # slicing keeps it too
        (False, lambda h: h.reshape(2, 4, 5, 2, 3), None),  # the features split: lost
        (False, lambda h: F.dropout(h * 2.0 + 1.0, 0.1), 3),
        (False, lambda h: torch.einsum("nhwf->nfhw", h), None),  # einsum: not followed
        (False, lambda h: h.chunk(2, dim=-1)[0], 3),
        (True, lambda h: h.permute(0, 2, 3, 1), 3),  # channels-last, as Keras' Conv2D
        (True, lambda h: F.max_pool2d(F.batch_norm(h, None, None, training=True), 2), 1),
        (True, lambda h: torch.cat([h, h], 2), 1),  # along H: channels unchanged
        (True, lambda h: h.unsqueeze(1).squeeze(1), 1),
    ],
)
def test_provenance_follows_layout_ops(conv: bool, ops: Any, dim: int | None) -> None:
    model = _Ops(ops, conv)
    x = torch.randn(2, 3, 4, 5) if conv else torch.randn(2, 4, 5, 8)
    tracker = ProvenanceTracker(model)
    tracker.start()
    try:
        out = model(x)
        origin = tracker.origin(out)
    finally:
        tracker.stop()
    assert torch._C._len_torch_function_stack() == 0
    if dim is None:
        assert origin is None
        return
    assert origin is not None and origin.dim == dim
    assert out.shape[dim] == 6 or out.shape[dim] == 3  # all features, or a chunk of them
    assert origin.producer == ("Conv2d `layer`" if conv else "Linear `layer`")


def test_detaching_mid_pass_leaves_no_mode_behind() -> None:
    model = zoo.UnitsSwinMlp()
    doc = relu_doctor.watch(model)

    def stop(module: nn.Module, args: Any) -> None:
        doc.detach()

    handle = model.fc2.register_forward_pre_hook(stop)
    model(torch.randn(2, 3, 3, 8))
    handle.remove()
    assert torch._C._len_torch_function_stack() == 0


class _SharedAct(nn.Module):
    """One ReLU module shared by three blocks; block 0 is skipped on odd passes (LayerDrop)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.n = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if not (i == 0 and self.n % 2 == 1):
                x = x + self.act(block(x))
        self.n += 1
        return x.sum()


def test_a_shared_activation_called_a_varying_number_of_times_is_said_once() -> None:
    model = _SharedAct()
    with (
        pytest.warns(ReluDoctorWarning, match=r"'act' ran 3 times .* and 2 in another") as rec,
        relu_doctor.watch(model, log_every_n_steps=2, every_n_steps=1) as doc,
    ):
        for _ in range(4):
            model(torch.randn(2, 4)).backward()
            doc.step()
    assert sum("in one recorded pass" in str(w.message) for w in rec) == 1
    # a shared module called the same number of times in every pass says nothing
    model.n = 0
    model.forward = lambda x: sum(model.act(b(x)).sum() for b in model.blocks)  # type: ignore[method-assign]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReluDoctorWarning)
        with relu_doctor.watch(model, log_every_n_steps=2, every_n_steps=1) as doc:
            for _ in range(4):
                model(torch.randn(2, 4)).backward()
                doc.step()


class _LoopAct(nn.Module):
    """One ReLU module run ``k`` times a pass on the same Linear's outputs, ``k`` set per step
    (a loop of varying length: a recurrence unrolled over a varying number of steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 5)
        self.act = nn.ReLU()
        self.k = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return sum(self.act(h + 0.5 * i).square().sum() for i in range(self.k))


@pytest.mark.parametrize("ks", [(1, 2), (2, 3), (1, 3, 2, 1), (1, 2, 3, 3)])
def test_a_module_run_more_times_than_before_counts_each_new_call_from_its_first_run(
    ks: tuple[int, ...],
) -> None:
    """Call #i of a pass counts into site #i from the first pass that makes it, whichever
    passes ran fewer calls; checked against each call's outputs collected by a hook."""
    torch.manual_seed(0)
    model = _LoopAct()
    seen: dict[int, list[torch.Tensor]] = {}
    calls = [0]

    def grab(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        seen.setdefault(calls[0], []).append(out.detach().clone())
        calls[0] += 1

    handle = model.act.register_forward_hook(grab)
    with (
        warnings.catch_warnings(record=True) as rec,
        relu_doctor.watch(model, log_every_n_steps=len(ks), overhead_budget=None) as doc,
    ):
        warnings.simplefilter("always")
        for k in ks:
            model.k, calls[0] = k, 0
            model(torch.randn(4, 3)).backward()
            doc.step()
    handle.remove()
    said = [str(w.message) for w in rec if "in one recorded pass" in str(w.message)]
    assert len(said) == 1 and f"'act' ran {'once' if ks[0] == 1 else f'{ks[0]} times'}" in said[0]
    names = {"act" if max(ks) == 1 else f"act#{i}": i for i in range(max(ks))}
    assert sorted(s.name for s in doc.sites) == sorted(names)
    for name, i in names.items():
        ref = torch.cat(seen[i])  # every output of call #i, over the passes that ran it
        table = doc.unit_table(name)
        assert doc.to_pandas().set_index("site").loc[name, "elements"] == ref.numel()
        assert table["activation_rate"].tolist() == pytest.approx(
            (ref > 0).double().mean(0).tolist())
        assert table["mean_abs"].tolist() == pytest.approx(ref.abs().double().mean(0).tolist())
        # a call first made after the first pass (untracked) says whose layout it took,
        # once, and claims no layer (a trial's rule had nested "as call #3 ...: as call #2
        # ...: Linear `cell` -> last dim (no producing layer found) (no producing ...)")
        rule = next(s.unit_rule for s in doc.sites if s.name == name)
        if i >= ks[0]:
            assert rule == (f"last dim, as call #{i - 1} of the same activation, whose output "
                            "was laid out alike (this call's own layer was not traced)"), rule
        else:
            assert rule == "Linear `fc` -> last dim", rule


class _BranchedFunctional(nn.Module):
    """F.relu on a Linear's (N, L, F), and from the second pass on a branch, on a Conv1d's
    (N, C, L) with L equal to F: the same op, another layer's units."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.conv = nn.Linear(3, 6), nn.Conv1d(3, 4, 1)
        self.branch = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.fc(x)).sum()
        if self.branch:
            y = y + F.relu(self.conv(x.transpose(1, 2))).sum()
        return y


def test_a_functional_call_first_made_on_a_branch_takes_its_own_layers_units() -> None:
    """A module's further calls take the units of its earlier call; a functional op's do not:
    its second call here is another layer's (the Conv1d's 4 channels, not the Linear's last
    dim, which the shape would allow)."""
    torch.manual_seed(0)
    model = _BranchedFunctional()
    with relu_doctor.watch(model, log_every_n_steps=4, overhead_budget=None) as doc:
        for step in range(4):
            model.branch = step >= 1
            model(torch.randn(2, 6, 3)).backward()
            doc.step()
    sites = {s.name: s for s in doc.sites}
    assert (sites["(root):relu#0"].units, sites["(root):relu#0"].unit_dim) == (6, 2)
    assert (sites["(root):relu#1"].units, sites["(root):relu#1"].unit_dim) == (4, 1)
    assert sites["(root):relu#1"].producer == "conv"
    # its first run (untracked) was counted by the shape rule, on the wrong dim (the last,
    # as a Linear's): dropped when the next run's producer said otherwise, so its counts
    # are those of the runs after (steps 2 and 3), not a mix of two kinds of unit
    assert doc.to_pandas().set_index("site").loc["(root):relu#1", "elements"] == 2 * 2 * 4 * 6
    assert sites["(root):relu#1"].unit_rule == "Conv1d `conv` -> dim 1"


class _Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


class _SometimesBranch(nn.Module):
    """Branch ``b`` (an ``F.relu`` in its forward) runs only on the steps in ``taken``."""

    def __init__(self, taken: tuple[int, ...]) -> None:
        super().__init__()
        self.a, self.b = _Branch(), _Branch()
        self.taken, self.step = taken, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x).sum()
        if self.step in self.taken:
            y = y + self.b(x).sum()
        return y


@pytest.mark.parametrize("taken", [(3, 4, 9), (3,), (3, 11)])
def test_a_functional_call_first_made_on_a_branch_is_counted_from_its_first_run(
    taken: tuple[int, ...],
) -> None:
    """A trial's branch ran at steps 3, 4, 9 and 17 and was counted on three of its four
    runs; one run only, and it was never seen. Its first run, in a pass that traces no
    layers, is counted by the shape rule, which its next run's producer confirms (or
    replaces: above); checked against the branch's outputs, collected by a hook."""
    torch.manual_seed(0)
    model = _SometimesBranch(taken)
    outs: list[torch.Tensor] = []
    model.b.register_forward_hook(lambda m, a, out: outs.append(out.detach().clone()))
    with relu_doctor.watch(model, log_every_n_steps=12, overhead_budget=None) as doc:
        for step in range(12):
            model.step = step
            model(torch.randn(4, 3)).backward()
            doc.step()
    ref = torch.cat(outs)
    assert doc.to_pandas().set_index("site").loc["b:relu#0", "elements"] == ref.numel()
    table = doc.unit_table("b:relu#0")
    assert table["activation_rate"].tolist() == pytest.approx((ref > 0).double().mean(0).tolist())
    assert table["mean_abs"].tolist() == pytest.approx(ref.abs().double().mean(0).tolist())
    rule = next(s.unit_rule for s in doc.sites if s.name == "b:relu#0")
    assert rule == ("Linear `b.fc` -> last dim" if taken == (3, 4, 9) else
                    "shape rule (N, F) -> dim 1 (its layer was not traced: it ran only in "
                    "passes that were not)")


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("functional", [True, False])
def test_a_site_run_on_some_passes_only_says_on_how_many_its_findings_rest(
    functional: bool, every: int,
) -> None:
    """A trial's branch ran on 2 of a window's 30 steps and its dead finding gave only the
    window's 30 steps as evidence, "On fewer batches more units look dead" unsaid. Counted
    against the passes that ran it (a hook), at the steps a sampled window collected; the
    prepared call (its run after the first) counts too; a site of every pass says nothing."""
    torch.manual_seed(0)
    model = _SometimesBranch((3, 4, 7, 15, 16))
    if not functional:
        model.b = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    fc = model.b.fc if functional else model.b[0]
    with torch.no_grad():
        fc.bias[:3] = -50.0  # three dead units
    ran: list[int] = []  # the collected steps that ran the branch
    collected: list[int] = []
    model.b.register_forward_hook(
        lambda m, a, out: ran.append(model.step) if doc.probe.collecting else None)
    name = "b:relu#0" if functional else "b.1"
    with relu_doctor.watch(model, log_every_n_steps=10, every_n_steps=every,
                           overhead_budget=None) as doc:
        for step in range(20):
            model.step = step
            if doc.probe.collecting:
                collected.append(step)
            # (32 rows: three dead units silent on one or two collected passes of 4 rows
            # are too briefly silent to call dead beside live ones: see _silence)
            model(torch.randn(32, 3)).backward()
            record = doc.step()
            if record is None:
                continue
            n = sum(step - 9 <= s <= step for s in ran)
            total = sum(step - 9 <= s <= step for s in collected)
            assert record.steps_collected == total and 0 < n < total
            [dead] = [f for f in record.findings if f.kind == "dead" and f.site == name]
            assert (dead.evidence["site_passes"], dead.evidence["passes"]) == (n, total)
            assert f"this site ran in {n} of the window's {total} recorded passes through its " \
                "module (a branch taken sometimes)" in (
                dead.message)
            assert not any("site_passes" in f.evidence for f in record.findings
                           if f.site != name)


@pytest.mark.filterwarnings("ignore:relu_doctor. 'act' ran 2 times in one recorded pass")
@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_a_later_call_of_a_loop_of_varying_length_is_not_called_a_branch(
    functional: bool,
) -> None:
    """A trial's RNN stepped one nn.ReLU over sequences of 2 to 8 steps: its sites act#2 to
    act#7 ran on the longer sequences only, and their findings said "(a branch taken
    sometimes)". A later call of an activation called a varying number of times per pass
    says so; how many passes reached each call is counted by the test's own hook."""

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.act = nn.Linear(4, 8), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, 4)
            h = torch.zeros(())
            for t in range(x.shape[1]):
                z = self.proj(x[:, t])
                h = h + (F.relu(z) if functional else self.act(z)).sum()
            return h

    torch.manual_seed(0)
    model = Loop()
    with torch.no_grad():
        model.proj.bias[:3] = -50.0  # three dead units at every call
    lengths = [2, 4, 3, 2, 4, 2]
    calls: list[int] = []  # per pass, how many time steps it ran (the test's own count)
    model.register_forward_pre_hook(lambda m, a: calls.append(0))
    model.proj.register_forward_hook(lambda m, a, out: calls.__setitem__(-1, calls[-1] + 1))
    with relu_doctor.watch(model, log_every_n_steps=len(lengths), overhead_budget=None) as doc:
        for t in lengths:
            model(torch.randn(5, t, 4)).backward()
            record = doc.step()
    assert record is not None and calls == lengths
    dead = {f.site: f for f in record.findings if f.kind == "dead"}
    names = {s.call_index: s.name for s in doc.sites}
    assert sorted(names) == list(range(max(lengths)))
    for k, name in names.items():
        reached = sum(n > k for n in calls)
        said = dead[name].message
        if reached == len(calls):  # every pass: nothing said
            assert "recorded passes" not in said, said
            continue
        assert (dead[name].evidence["site_passes"], dead[name].evidence["passes"]) == (
            reached, len(calls))
        assert (f"this site ran in {reached} of the window's {len(calls)} recorded passes "
                f"through its module (call #{k} of an activation called a varying number of "
                "times per pass, as by a loop of varying length or a branch taken sometimes)"
                ) in said, said


def test_networks_called_apart_are_each_measured_against_their_own_passes() -> None:
    """A GAN's generator and discriminator, called on their own (a LightningModule's manual
    optimisation): the generator's site ran in every pass of the generator, and its findings
    said "ran in 4 of the window's 12 recorded passes (a branch taken sometimes)" (a
    trial), counting the discriminator's. A branch inside the discriminator is still told."""

    class Disc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 6), nn.ReLU())
            self.branch = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            h = self.body(x)
            return self.branch(h).sum() if self.calls % 2 else h.sum()

    class GAN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.G = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 3))
            self.D = Disc()

    torch.manual_seed(0)
    gan = GAN()
    with torch.no_grad():
        gan.G[0].bias[:3] = -50.0  # three dead units in the generator
        gan.D.branch[0].bias[:2] = -50.0  # two in the discriminator's branch
    with relu_doctor.watch(gan, log_every_n_steps=4, overhead_budget=None) as doc:
        for _ in range(4):
            fake = gan.G(torch.randn(8, 2))
            (gan.D(torch.randn(8, 3)) + gan.D(fake.detach()) + gan.D(fake)).backward()
            record = doc.step()
    assert record is not None
    dead = {f.site: f for f in record.findings if f.kind == "dead"}
    assert "site_passes" not in dead["G.1"].evidence  # 4 of the generator's 4 passes
    assert (dead["D.branch.1"].evidence["site_passes"],
            dead["D.branch.1"].evidence["passes"]) == (6, 12)
    assert "ran in 6 of the window's 12 recorded passes through its module" in (
        dead["D.branch.1"].message)


def test_functional_networks_called_apart_are_each_measured_against_their_own_passes() -> None:
    """The same with F.relu in the networks' forwards (no activation module): a pass that
    functional capture begins counts for the module it began at (a review: both read "ran
    in 4 of the window's 12 recorded passes")."""

    class Net(nn.Module):
        def __init__(self, d_in: int) -> None:
            super().__init__()
            self.fc = nn.Linear(d_in, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.fc(x))

    class GAN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.G, self.D = Net(2), Net(5)

    torch.manual_seed(0)
    gan = GAN()
    with torch.no_grad():
        gan.G.fc.bias[:3] = -50.0
        gan.D.fc.bias[:2] = -50.0
    with relu_doctor.watch(gan, log_every_n_steps=4, overhead_budget=None) as doc:
        for _ in range(4):
            fake = gan.G(torch.randn(8, 2))
            (gan.D(fake.detach()).sum() + gan.D(fake).sum()).backward()
            record = doc.step()
    assert record is not None
    dead = [f for f in record.findings if f.kind == "dead"]
    assert {f.site for f in dead} == {"G:relu#0", "D:relu#0"}
    assert not any("site_passes" in f.evidence for f in dead)


def test_a_window_resumed_mid_way_does_not_say_on_how_many_passes_a_site_ran() -> None:
    """The passes before a checkpoint are in the resumed window's counts but not in the
    pass counts (not saved): that window says nothing of them, the next one does."""
    torch.manual_seed(0)
    model = _SometimesBranch((3, 7, 12))
    with torch.no_grad():
        model.b.fc.bias[:3] = -50.0
    kw: dict[str, Any] = {"log_every_n_steps": 10, "overhead_budget": None}
    doc = relu_doctor.watch(model, **kw)
    for step in range(5):
        model.step = step
        model(torch.randn(4, 3)).backward()
        doc.step()
    state = doc.state_dict()
    doc.detach()
    resumed = relu_doctor.watch(model, **kw)
    resumed.load_state_dict(state)
    said = []
    for step in range(5, 20):
        model.step = step
        model(torch.randn(4, 3)).backward()
        record = resumed.step()
        if record is not None:
            said.append([f.evidence.get("site_passes") for f in record.findings
                         if f.kind == "dead" and f.site == "b:relu#0"])
    resumed.detach()
    assert said == [[None], [1]]


class _BranchedGrads(_BranchedFunctional):
    """:class:`_BranchedFunctional` keeping the gradient reaching its branch's F.relu."""

    def __init__(self) -> None:
        super().__init__()
        self.grads: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.fc(x)).sum()
        if self.branch:
            r = F.relu(self.conv(x.transpose(1, 2)))
            r.register_hook(lambda g: self.grads.append(g.detach().clone()))
            y = y + (r * torch.linspace(0.5, 1.5, r.shape[-1])).sum()
        return y


def test_a_site_made_anew_on_its_producers_units_counts_its_gradients_there() -> None:
    """A review: the gradient hook kept the kernel call prepared for the site's first
    (provisional) accumulators, which fit the same shape, so every later gradient went
    there and the site's gradient RMS read NaN for good. Checked against the gradients
    reaching the call, per channel, over the last window."""
    torch.manual_seed(0)
    model = _BranchedGrads()
    with relu_doctor.watch(model, log_every_n_steps=4, overhead_budget=None) as doc:
        for step in range(12):
            model.branch = step >= 1
            if step == 8:
                model.grads.clear()
            model(torch.randn(2, 6, 3)).backward()
            doc.step()
    g = torch.cat(model.grads).double()  # (N, C, L): the last window's 4 steps
    want = g.square().mean((0, 2)).sqrt()
    got = doc.unit_table("(root):relu#1")["grad_rms"].to_numpy()
    assert got == pytest.approx(want.numpy(), rel=1e-5)


def test_a_site_still_provisional_at_a_checkpoint_is_settled_after_the_resume() -> None:
    """A review: a checkpoint taken while a site counted by the shape rule awaited its
    producer kept it on the shape rule's units for good ("for now" in its rule)."""
    torch.manual_seed(0)
    model = _BranchedFunctional()
    kw: dict[str, Any] = {"log_every_n_steps": 4, "overhead_budget": None}
    doc = relu_doctor.watch(model, **kw)
    for step in range(2):
        model.branch = step == 1  # first run in an untracked pass
        model(torch.randn(2, 6, 3)).backward()
        doc.step()
    state = doc.state_dict()
    doc.detach()
    resumed = relu_doctor.watch(model, **kw)
    resumed.load_state_dict(state)
    for _ in range(4):
        model(torch.randn(2, 6, 3)).backward()
        resumed.step()
    site = next(s for s in resumed.sites if s.name == "(root):relu#1")
    resumed.detach()
    assert (site.units, site.unit_dim, site.unit_rule) == (4, 1, "Conv1d `conv` -> dim 1")


def test_a_with_block_entered_again_starts_its_window_passes_anew() -> None:
    """A review: a block's last window, kept at its exit and folded when the block was
    entered again, left its passes in the count, so the next window's branch site said it
    ran in 2 of 4 passes where that window had 2."""
    torch.manual_seed(0)
    model = _SometimesBranch((1, 2, 3, 4, 6, 7))
    with torch.no_grad():
        model.b.fc.bias[:3] = -50.0
    doc = relu_doctor.watch(model, log_every_n_steps=4, overhead_budget=None)
    for first, last in ((0, 6), (6, 8)):
        with doc:
            for step in range(first, last):
                model.step = step
                model(torch.randn(4, 3)).backward()
                record = doc.step()
    assert record is not None and record.steps_collected == 2
    [dead] = [f for f in record.findings if f.kind == "dead" and f.site == "b:relu#0"]
    assert "site_passes" not in dead.evidence  # it ran in both of the window's passes
