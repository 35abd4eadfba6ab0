"""The standalone API end to end: units made dead on purpose are reported exactly, ``scan``
agrees and leaves the model untouched, ``every_n_steps`` picks the right steps, checkpoints
resume counts exactly, NaN is counted rather than fatal, bad arguments get clear messages,
and the persistent state stays O(units) with no activation kept."""

from __future__ import annotations

import copy
import gc
import io
import types
import warnings
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relu_doctor
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.sites import SiteKey
from relu_doctor.stats import FIELDS, ROW
from tests import reference as ref
from tests import zoo


def raw(site, which: str = "total") -> dict[str, np.ndarray]:
    st = site.stats
    m = {"window": st.window, "lifetime": st.lifetime, "total": st.window + st.lifetime}[which]
    return {name: m[ROW[name]].numpy() for name in FIELDS}


# ---------------------------------------------------------------------- dead on purpose

# case -> {site: (the bias feeding it, units to kill)}. A bias of -1e3 keeps the
# pre-activation negative whatever the input; no gradient reaches it, so it stays dead.
PLANTS = {
    "mlp": {"1": ("0.bias", [3, 7, 19]), "3": ("2.bias", [0, 5])},
    "small_cnn": {"features.2": ("features.1.bias", [2, 5]),
                  "features.6": ("features.5.bias", [1, 10, 11])},
    "sequence": {"act": ("proj.bias", [4, 9])},
    "resnetish": {"stem.2": ("stem.1.bias", [0, 6]),
                  "layer1.0.relu#0": ("layer1.0.bn1.bias", [3]),
                  "layer1.1.relu#1": ("layer1.1.bn2.bias", [2])},
}


def plant_dead_units(model: nn.Module, name: str) -> dict[str, list[int]]:
    """Kill the planted units of ``PLANTS[name]``; returns the dead units every site should
    report (an empty list for sites with none)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for param, units in PLANTS[name].values():
            params[param][units] = -1e3
    return {site: units for site, (_, units) in PLANTS[name].items()}


def reference_dead(run) -> dict[str, list[int]]:
    """Dead units per site over the whole run, by the reference (never active)."""
    out = {}
    for key, capture in run.recorder.calls.items():
        stats = ref.expected_stats(capture, ref.expected_unit_dim(capture.outputs[0].dim()))
        out[ref.site_names(run.recorder)[key]] = np.flatnonzero(stats["active"] == 0).tolist()
    return out


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_units_made_dead_on_purpose_are_reported_exactly(run_watched, name):
    case = zoo.ARCH_CASES[name]
    model = case.model()
    planted = plant_dead_units(model, name)
    run = run_watched(case, model=model, steps=4, batch_size=32, log_every_n_steps=4)
    dead = reference_dead(run)
    assert {site: units for site, units in dead.items() if units} == planted

    record = run.doc.records[-1]
    findings = {(f.kind, f.site): f for f in record.findings}
    for site, units in dead.items():
        table = record.unit_table[record.unit_table["site"] == site]
        assert table.loc[table["dead"], "unit"].tolist() == units
        assert table.loc[table["lifetime_dead"], "unit"].tolist() == units
        assert run.doc.units(site).query("dead")["unit"].tolist() == units
        row = record.site_row(site)
        assert (row["dead"], row["lifetime_dead"]) == (len(units), len(units))
        if site in planted:
            assert findings[("dead", site)].evidence["dead_units"] == units
            assert findings[("lifetime_dead", site)].evidence["lifetime_dead"] == len(units)
        else:
            assert ("dead", site) not in findings and ("lifetime_dead", site) not in findings


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_scan_agrees_and_leaves_the_model_as_it_was(name):
    case = zoo.ARCH_CASES[name]
    model = case.model()
    planted = plant_dead_units(model, name)
    model.train()
    next(iter(model.children())).eval()  # mixed flags must come back as they were
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = copy.deepcopy(model)
    grads = [p.grad.clone() for p in model.parameters()]
    flags = {path: m.training for path, m in model.named_modules()}
    loader = [(case.batch(16), torch.zeros(16)) for _ in range(4)]

    result = relu_doctor.scan(model, loader)

    assert {path: m.training for path, m in model.named_modules()} == flags
    for (n, a), (_, b), g in zip(before.named_parameters(), model.named_parameters(), grads,
                                 strict=True):
        assert torch.equal(a, b) and torch.equal(b.grad, g) and b.requires_grad, n
    for (n, a), (_, b) in zip(before.named_buffers(), model.named_buffers(), strict=True):
        assert torch.equal(a, b), n  # BatchNorm running statistics untouched

    # The reference, on the same data in eval mode without gradients.
    recorder = ref.Recorder(before)
    before.eval()
    with torch.no_grad():
        for x, _ in loader:
            before(x)
    recorder.remove()
    names = ref.site_names(recorder)
    assert set(result.dead_units) == set(names.values())
    # Exactly the planted units, where eval mode changes nothing; with BatchNorm, eval mode
    # (running statistics of an untrained model) may silence more: still every planted one.
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for site, units in result.dead_units.items():
        want = set(planted.get(site, []))
        assert want <= set(units) if has_bn else want == set(units), site
    for key, capture in recorder.calls.items():
        site = names[key]
        stats = ref.expected_stats(capture, ref.expected_unit_dim(capture.outputs[0].dim()))
        assert result.dead_units[site] == np.flatnonzero(stats["active"] == 0).tolist()
        rates = result.units[result.units["site"] == site]["activation_rate"].to_numpy()
        np.testing.assert_allclose(rates, stats["active"] / stats["elements"], rtol=0, atol=1e-12)
        row = result.sites.set_index("site").loc[site]
        assert (row["batches"], row["samples"]) == (4, 64)


def test_scan_takes_tensors_dicts_and_stops_at_max_batches():
    model = zoo.mlp()
    res = relu_doctor.scan(model, [torch.randn(4, 10) for _ in range(5)], max_batches=2)
    assert set(res.sites["batches"]) == {2}
    res = relu_doctor.scan(
        model, [{"x": torch.randn(4, 10)}], forward=lambda m, batch: m(batch["x"])
    )
    assert set(res.sites["batches"]) == {1} and list(res.sites["site"]) == ["1", "3"]
    assert str(res).count("dead") == 2  # one printed line per site


# ---------------------------------------------------------------------- every_n_steps


@pytest.mark.parametrize(("every", "log_every", "steps"), [(3, 100, 7), (3, 4, 8), (2, 3, 7)])
def test_every_n_steps_collects_exactly_the_chosen_steps(run_watched, every, log_every, steps):
    run = run_watched(zoo.ARCH_CASES["resnetish"], steps=steps, every_n_steps=every,
                      log_every_n_steps=log_every, optimizer=True)
    collected = [s for s in range(steps) if s % every == 0]
    last_log = steps // log_every * log_every
    spans = {
        "lifetime": [s for s in collected if s < last_log],
        "window": [s for s in collected if s >= last_log],
    }
    for key, capture in run.recorder.calls.items():
        site = run.site_of(key)
        for which, chosen in spans.items():
            if not chosen:
                assert not getattr(site.stats, which).any(), f"{site.name} {which} is not empty"
                continue
            expected = ref.expected_stats(capture, 1, steps=chosen)
            ref.assert_stats_match(raw(site, which), expected, f"{site.name} {which} {chosen}")
    assert run.doc.window_steps == len(spans["window"])
    if spans["window"]:
        assert set(run.doc.to_pandas()["window_steps"]) == {len(spans["window"])}


# ---------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_continues_counts_exactly():
    case = zoo.ARCH_CASES["resnetish"]
    batches = [case.batch(6) for _ in range(7)]
    model = case.model()
    recorder = ref.Recorder(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    doc = relu_doctor.watch(model, log_every_n_steps=2, optimizer=opt)
    zoo.train(model, batches[:3], doc=doc, optimizer=opt)  # logged at 2; step 3 open

    buf = io.BytesIO()
    torch.save({"doctor": doc.state_dict(), "model": model.state_dict(),
                "opt": opt.state_dict()}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)  # what a Lightning checkpoint allows

    resumed = case.model()
    resumed.load_state_dict(checkpoint["model"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(checkpoint["opt"])
    doc2 = relu_doctor.watch(resumed, log_every_n_steps=2, optimizer=opt2)
    doc2.load_state_dict(checkpoint["doctor"])  # before any forward: made from the checkpoint
    assert [(s.name, s.unit_dim, s.unit_rule, s.order) for s in doc2.probe.sites()] == [
        (s.name, s.unit_dim, s.unit_rule, s.order) for s in doc.probe.sites()]
    assert not doc2.probe.pending_windows()

    zoo.train(model, batches[3:], doc=doc, optimizer=opt)
    zoo.train(resumed, batches[3:], doc=doc2, optimizer=opt2)
    doc.detach(), doc2.detach(), recorder.remove()

    assert doc2.global_step == doc.global_step == 7
    assert [r.step for r in doc2.records] == [r.step for r in doc.records if r.step > 3]
    assert {s.name for s in doc2.probe.sites()} == {s.name for s in doc.probe.sites()}
    for site in doc.probe.sites():
        other = doc2.probe.site(site.name)
        assert torch.equal(site.stats.window, other.stats.window), site.name
        assert torch.equal(site.stats.lifetime, other.stats.lifetime), site.name
    for key, capture in recorder.calls.items():  # and both equal the reference
        site = doc2.probe.site(ref.site_names(recorder)[key])
        ref.assert_stats_match(raw(site, "lifetime"), ref.expected_stats(capture, 1, steps=list(range(6))), site.name)
        ref.assert_stats_match(raw(site, "window"), ref.expected_stats(capture, 1, steps=[6]), site.name)
    last, last2 = doc.records[-1], doc2.records[-1]
    assert [(f.kind, f.site, f.began) for f in last.findings] == [
        (f.kind, f.site, f.began) for f in last2.findings
    ]


def test_state_of_a_site_seen_after_loading_is_restored_on_its_first_call():
    model = zoo.mlp()
    with relu_doctor.watch(model) as doc:
        model(torch.randn(4, 10))
    state = doc.state_dict()
    fresh = relu_doctor.watch(zoo.mlp(), include=["1"])  # site "3" is not watched here ...
    fresh.load_state_dict(state)
    assert SiteKey("3").token() in fresh.state_dict()["sites"]  # ... yet its state is carried on
    fresh.detach()


# ---------------------------------------------------------------------- NaN / Inf


class Scale(nn.Module):
    """Elementwise learnable scale: a NaN in one input feature stays in one unit."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.weight


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_activations_are_counted_and_reported(run_watched, bad):
    case = zoo.Case("scaled", lambda: nn.Sequential(Scale(6), nn.ReLU(), nn.Linear(6, 2)),
                    lambda n: torch.randn(n, 6))
    batches = [case.batch(5) for _ in range(4)]
    batches[1][0, 2] = bad  # unit 2 of step 1 only
    run = run_watched(case, batches=batches, lr=None, log_every_n_steps=100)
    site = run.doc.probe.site("1")
    got = raw(site, "window")
    capture = run.recorder.calls[("1", 0)]
    np.testing.assert_array_equal(got["nonfinite"], np.eye(6)[2])
    np.testing.assert_array_equal(got["grad_nonfinite"], np.ones(6))
    # Step 1 is left out of unit 2's forward sums only. Its loss is non-finite, so every
    # unit's gradient that step is, and step 1 is left out of all gradient sums.
    finite_steps = [0, 2, 3]
    every_step = ref.expected_stats(capture, 1, gradients=False)
    finite = ref.expected_stats(capture, 1, steps=finite_steps)
    unit2 = np.arange(6) == 2
    forward = {name: np.where(unit2, finite[name], every_step[name]) for name in every_step}
    ref.assert_stats_match(got, forward, "forward sums")
    grads = {name: finite[name] for name in finite if name.startswith("grad")}
    ref.assert_stats_match(got, grads, "gradient sums")

    finding = next(f for f in run.doc.findings() if f.kind == "nonfinite")
    assert finding.site == "1" and finding.severity == "critical"
    assert finding.evidence["units"] == [2]
    row = run.doc.to_pandas().set_index("site").loc["1"]
    assert (row["nonfinite"], row["grad_nonfinite"]) == (1, 6)


def test_a_nan_output_whose_gradient_is_finite_is_left_out_of_the_forward_sums_only():
    """Each statistic leaves out its own non-finite values (README, Definitions): unit 2's
    NaN output of step 1 is dropped downstream (nan_to_num), so its gradient that step is
    finite and counts, while its forward sums leave the step out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    outs: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []

    def grab(module: nn.Module, args: object, out: torch.Tensor) -> None:
        outs.append(out.detach().clone())
        out.register_hook(lambda g: grads.append(g.detach().clone()))

    model[1].register_forward_hook(grab)
    with relu_doctor.watch(model, log_every_n_steps=2, overhead_budget=None) as doc:
        for step in range(2):
            with torch.no_grad():
                model[0].bias[2] = float("nan") if step == 1 else 0.0
            model(torch.randn(8, 5)).nan_to_num(0.0).square().sum().backward()
            model.zero_grad()
            doc.step()
    assert torch.isnan(outs[1][:, 2]).all() and torch.isfinite(grads[1]).all()
    row = doc.to_pandas().set_index("site").loc["1"]
    assert (row["nonfinite"], row["grad_nonfinite"]) == (1, 0)
    table = doc.unit_table("1").set_index("unit")
    g = torch.cat(grads).double()  # both steps: no gradient was non-finite
    assert table["grad_rms"].tolist() == pytest.approx(g.square().mean(0).sqrt().tolist())
    counted = torch.tensor([8.0, 8.0, 0.0, 8.0]) + 8  # unit 2: step 0 only
    assert table["mean_abs"].tolist() == pytest.approx(
        (torch.cat(outs).double().nan_to_num(0.0).abs().sum(0) / counted).tolist())


def test_a_site_that_is_nan_on_every_step_is_still_reported():
    """Every output NaN: no finite element was seen at all, and this must still be a
    finding (and a row), not an empty report."""
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=2) as doc:
        for _ in range(2):
            x = torch.randn(4, 10)
            x[0, 0] = float("nan")
            model(x).sum().backward()
            current = doc.findings()
            record = doc.step()
    for findings in (current, record.findings):
        assert {f.site for f in findings if f.kind == "nonfinite"} == {"1", "3"}
    assert set(doc.to_pandas()["site"]) == {"1", "3"}


# ---------------------------------------------------------------------- bad arguments


def test_a_model_without_relu_family_layers_is_a_clear_error_at_the_first_step():
    # Not at attach and not inside the forward: once a forward pass showed it, at step().
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with relu_doctor.watch(model) as doc:
        model(torch.randn(2, 3))  # the user's forward runs untouched
        with pytest.raises(ReluDoctorError, match=r"model: a forward pass of Sequential ran "
                           r"no ReLU-family activation") as info:
            doc.step()
    assert "register_family" in str(info.value)
    with pytest.raises(ReluDoctorError, match=r"model: a forward pass of Sequential ran no"):
        relu_doctor.scan(model, [torch.randn(2, 3)])
    # Before any forward pass there is nothing to say; eval passes say nothing either.
    with relu_doctor.watch(model) as doc:
        doc.step()
        with torch.no_grad():
            model(torch.randn(2, 3))
        doc.step()
    # functional=False on a model without activation modules: nothing could ever be seen.
    with (relu_doctor.watch(model, functional=False) as doc,
          pytest.raises(ReluDoctorError, match="functional=False leaves functional calls")):
        doc.step()


class _DroppedBlock(nn.Module):
    """A block run only on the passes given (stochastic depth), with its activation as a
    module or as a functional call."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.skip, self.a, self.b = nn.Linear(8, 2), nn.Linear(8, 16), nn.Linear(16, 2)
        self.act = nn.Identity() if functional else nn.ReLU()
        self.functional = functional
        self.run_block = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.skip(x)
        if self.run_block:
            h = self.a(x)
            out = out + self.b(F.relu(h) if self.functional else self.act(h))
        return out


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
@pytest.mark.parametrize("runs", [(1, 3, 5), ()], ids=["from_step_1", "never"])
def test_a_first_pass_that_skips_the_models_activations_stops_nothing(
    functional: bool, runs: tuple[int, ...]
) -> None:
    """The model holds an activation its first pass skipped: no error (training goes on),
    the site made when it runs, counted from then; one warning at a log with no site yet."""
    torch.manual_seed(0)
    model = _DroppedBlock(functional)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        warnings.catch_warnings(record=True) as rec,
        relu_doctor.watch(model, log_every_n_steps=3, overhead_budget=None) as doc,
    ):
        warnings.simplefilter("always")
        for step in range(6):
            model.run_block = step in runs
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
    said = [str(w.message) for w in rec if "no watched activation ran" in str(w.message)]
    if runs:
        assert said == [] and len(doc.sites) == 1
        row = doc.to_pandas().iloc[0]  # the last window: steps 3-5, the block ran at 3 and 5
        assert row["elements"] == 2 * 4 * 16
    else:
        assert len(said) == 1 and "up to step 3" in said[0] and doc.sites == []
        assert doc.global_step == 6


def test_world_size_without_all_reduce_and_a_nul_in_run_dir_are_clear_errors(tmp_path) -> None:
    model = zoo.mlp()
    with pytest.raises(ReluDoctorError, match=r"world_size: got 2 without all_reduce"):
        relu_doctor.watch(model, world_size=2)
    with pytest.raises(ReluDoctorError, match=r"run_dir: got a path with a NUL character"):
        relu_doctor.watch(model, run_dir=str(tmp_path / "a\0b"))
    assert not any(m._forward_hooks for m in model.modules())


def test_a_rate_rarer_than_the_logs_collects_one_step_a_window_and_says_so() -> None:
    """every_n_steps=100 with logs every 10: nine windows in ten collected nothing, and the
    run's settings said 100."""
    model = zoo.mlp()
    with (pytest.warns(ReluDoctorWarning, match=r"every_n_steps=100 is more than "
                       r"log_every_n_steps=10.*each collects one step"),
          relu_doctor.watch(model, every_n_steps=100, log_every_n_steps=10) as doc):
        zoo.train(model, [torch.randn(4, 10) for _ in range(30)], doc=doc)
    assert doc.every_n_steps == 10
    assert doc.to_run().tables["windows"]["steps_collected"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_unknown_site_patterns_name_the_argument_and_the_choices(arg):
    with pytest.raises(ReluDoctorError, match=rf"{arg}: pattern 'layer9\*' matches no module") as info:
        relu_doctor.watch(zoo.mlp(), **{arg: ["layer9*"]})
    assert "['1', '3']" in str(info.value)  # the activation modules to choose from
    assert "without its '#k' or ':op#k' suffix" in str(info.value)  # how a site name maps


@pytest.mark.parametrize("arg", ["every_n_steps", "log_every_n_steps"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True, "2", None])
def test_step_intervals_must_be_positive_integers(arg, value):
    with pytest.raises(ReluDoctorError, match=rf"^{arg}: expected a positive integer") as info:
        relu_doctor.watch(zoo.mlp(), **{arg: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, True, float("nan"), "0.1"])
def test_tau_must_lie_strictly_between_0_and_1(value):
    with pytest.raises(ReluDoctorError, match=r"^tau: expected a number in \(0, 1\)") as info:
        relu_doctor.watch(zoo.mlp(), tau=value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"optimizer": "adam"}, r"optimizer: expected torch.optim.Optimizer"),
        ({"unit_dims": {"1": "last"}}, r"unit_dims: expected \{pattern: int dim\}"),
        ({"grad_scaler": 1.0}, r"grad_scaler: expected a torch.amp.GradScaler"),
        ({"gradients": "no"}, r"gradients: expected True or False, got 'no'"),
        ({"functional": "no"}, r"functional: expected True or False, got 'no'"),
        ({"is_writer": "no"}, r"is_writer: expected True or False, got 'no'"),
        ({"tensorboard": "no"}, r"tensorboard: expected True or False, got 'no'"),
        ({"resume": "yes"}, r"resume: expected True or False, got 'yes'"),
        ({"optimizer_pre_hook": None}, r"optimizer_pre_hook: expected True or False, got None"),
        ({"all_reduce": 5}, r"all_reduce: expected a function or None, got 5"),
        ({"run_dir": ""}, r"run_dir: got an empty path ''; name a directory"),
        ({"include": 5}, r"include: expected a glob pattern or a list of them .* int 5"),
        ({"exclude": 5}, r"exclude: expected a glob pattern or a list of them .* int 5"),
    ],
)
def test_other_bad_arguments_name_themselves(kwargs, pattern):
    model = zoo.mlp()
    with pytest.raises(ReluDoctorError, match=pattern), relu_doctor.watch(model, **kwargs):
        model(torch.randn(2, 10))


@pytest.mark.parametrize("value", [[1], "x", 1, [("1", 1)]])
def test_unit_dims_that_is_not_a_mapping_names_itself(value):
    """Not a raw TypeError/ValueError from ``dict(value)``: the argument, its form, what came."""
    with pytest.raises(ReluDoctorError, match=r"^unit_dims: expected \{pattern: int dim\}") as info:
        relu_doctor.watch(zoo.mlp(), unit_dims=value)
    assert "{'encoder.*': 1}" in str(info.value) and repr(value) in str(info.value)


def test_a_unit_dim_out_of_range_warns_in_the_forward_and_training_goes_on():
    model = zoo.mlp()
    with (
        pytest.warns(ReluDoctorWarning, match=r"site '1'.*unit_dims for '1'.*out of range"),
        relu_doctor.watch(model, unit_dims={"1": 5}) as doc,
    ):
        model(torch.randn(2, 10)).sum().backward()
    assert [s.name for s in doc.sites] == ["3"]


def test_when_every_site_failed_the_steps_go_on_without_a_false_nothing_to_watch():
    model = zoo.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        # dim 5 is out of range for both ReLUs' (2, 20) outputs: both hooks fail
        with relu_doctor.watch(model, unit_dims={"*": 5}, every_n_steps=1,
                               log_every_n_steps=2) as doc:
            for _ in range(4):  # steps and logs, with no site left
                model(torch.randn(2, 10)).sum().backward()
                opt.step()
                opt.zero_grad()
                doc.step()
    failed = [str(w.message) for w in seen if "stopped monitoring site" in str(w.message)]
    assert len(failed) == 2 and all("out of range" in m for m in failed), failed
    assert doc.sites == [] and doc.global_step == 4


@pytest.mark.parametrize("eval_stream", [False, True])
def test_a_unit_dims_pattern_that_matches_no_module_warns_at_watch(eval_stream):
    model = zoo.mlp()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, unit_dims={"1#0": 1, "3": 1}, every_n_steps=1,
                               eval_stream=eval_stream) as doc:
            model(torch.randn(2, 10)).sum().backward()
            doc.step()
    said = [w for w in seen if "unit_dims: pattern" in str(w.message)]
    assert len(said) == 1 and "pattern '1#0' matches no module" in str(said[0].message)  # once
    assert said[0].filename == __file__  # it points at the user's watch()
    assert [s.unit_dim for s in doc.sites] == [1, 1]


def test_metrics_take_numpy_numbers_and_a_refused_value_leaves_the_log_whole():
    model = zoo.mlp()
    vals = [np.float32(0.25), np.int64(2), np.array(0.5), np.array([1.5]), 3, torch.tensor([4.0])]
    with relu_doctor.watch(model, every_n_steps=1, log_every_n_steps=len(vals)) as doc:
        for i, v in enumerate(vals):
            model(torch.randn(2, 10)).sum().backward()
            for bad in (True, np.array([1.0, 2.0]), "0.5", None, torch.ones(2)):
                with pytest.raises(ReluDoctorError, match="must be a number or a one-element"):
                    doc.log_metrics({f"bad{i}": bad})
            doc.step(loss=v)
    metrics = doc.records[-1].metrics
    assert metrics["loss"] == pytest.approx(float(np.mean([0.25, 2, 0.5, 1.5, 3, 4.0])))
    assert not any(k.startswith("bad") for k in metrics)


def test_a_loss_that_is_not_finite_warns_once_and_leaves_a_gap():
    model = zoo.mlp()
    losses = [1.0, float("inf"), 2.0, 4.0, float("nan"), 3.0, 5.0, 7.0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, every_n_steps=1, log_every_n_steps=2) as doc:
            for loss in losses:
                model(torch.randn(2, 10)).sum().backward()
                doc.step(loss=torch.tensor(loss))
    said = [str(w.message) for w in seen if "left out of that window's metrics" in str(w.message)]
    assert len(said) == 1 and "'loss' over the window ending at step 2 is inf" in said[0], said
    got = [r.metrics.get("loss") for r in doc.records]
    assert got == [None, 3.0, None, 6.0]  # the windows' means, the non-finite ones left out


def test_bad_scan_arguments_and_empty_data():
    model = zoo.mlp()
    with pytest.raises(ReluDoctorError, match=r"max_batches: expected a positive integer"):
        relu_doctor.scan(model, [torch.randn(2, 10)], max_batches=0)
    with pytest.raises(ReluDoctorError, match=r"allowed: \['exclude', 'functional', 'include', 'unit_dims'\]"):
        relu_doctor.scan(model, [torch.randn(2, 10)], tau=0.2)
    with pytest.raises(ReluDoctorError, match=r"dataloader: yielded no batch"):
        relu_doctor.scan(model, [])


def test_unknown_site_name_lists_the_known_sites(run_watched):
    run = run_watched(zoo.ARCH_CASES["mlp"], steps=1)
    with pytest.raises(ReluDoctorError, match=r"no site named 'relu'; known sites: \['1', '3'\]"):
        run.doc.units("relu")


def test_library_errors_share_one_base_class():
    assert issubclass(relu_doctor.RunDirError, ReluDoctorError)
    assert issubclass(ReluDoctorError, Exception)
    with pytest.raises(ReluDoctorError, match=r"model: expected a torch.nn.Module, got function"):
        relu_doctor.watch(lambda x: x)


@pytest.mark.parametrize("make", [torch.jit.script,
                                  lambda m: torch.jit.trace(m, torch.randn(2, 10))])
def test_a_torchscript_module_is_refused_with_what_to_watch_instead(make):
    """Its forward runs outside Python: torch's own error named a hook method."""
    scripted = make(zoo.mlp())
    with pytest.raises(ReluDoctorError, match=r"^model: \w+ is a TorchScript module .* Watch "
                       r"the eager model you scripted"):
        relu_doctor.watch(scripted)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_watched_model_with_functional_calls_traces_and_its_trace_is_not_counted(mode):
    """torch.jit.trace of a watched model whose forward calls F.relu failed its trace check
    in train mode ("Graphs differed across invocations"): functional capture's mode and
    the producer tracker ran inside the trace. A traced pass is no recorded pass."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.relu(self.a(x)))

    torch.manual_seed(0)
    net, x = Net(), torch.randn(4, 6)
    with relu_doctor.watch(net, log_every_n_steps=10, overhead_budget=None) as doc:
        net(x).sum().backward()
        doc.step()
        getattr(net, mode)()
        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)
            traced = torch.jit.trace(net, (x,))
        net.train()
        assert torch.equal(traced(x), net(x))  # (an untraced pass: not stepped, not logged)
        assert int(doc.to_pandas().set_index("site").loc["(root):relu#0", "elements"]) == 2 * 4 * 8


def test_a_torchscript_submodule_is_left_out_with_one_warning_and_the_rest_watched():
    """torch refuses hooks on a scripted submodule: watch() raised torch's error (and
    stopped a Lightning fit). It is now left out, said once; the eager rest is watched."""
    torch.manual_seed(0)
    model = nn.Sequential(torch.jit.script(nn.Sequential(nn.Linear(10, 8), nn.ReLU())),
                          nn.Linear(8, 6), nn.ReLU())
    outs: list[torch.Tensor] = []
    model[2].register_forward_hook(lambda m, a, out: outs.append(out.detach().clone()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=2, every_n_steps=1) as doc:
            for _ in range(2):
                model(torch.randn(4, 10)).sum().backward()
                doc.step()
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    assert said == ["relu_doctor: '0' is a TorchScript module inside the model: its forward "
                    "runs outside Python, so its activations are not watched. The rest of the "
                    "model is."]
    assert [s.name for s in doc.sites] == ["2"]
    row = doc.to_pandas().iloc[0]
    assert row["dead"] == int(((torch.cat(outs) > 0).sum(0) == 0).sum())
    assert row["elements"] == 8 * 6


@pytest.mark.parametrize("cell", [False, True])
def test_a_recurrent_layer_with_relu_is_said_to_be_unseen_and_the_rest_watched(cell, tmp_path):
    """nn.RNN(nonlinearity='relu') runs its ReLU in torch's kernel: relu_doctor had said
    nothing (and with no other activation, that the model 'ran no ReLU-family activation').
    Said once per model (a plan's init check watching it again said it twice), and kept in
    the run: the report said nothing of it, and read "sites 1" as the whole model (a
    trial)."""
    torch.manual_seed(0)
    rnn = nn.RNNCell(4, 8, nonlinearity="relu") if cell else nn.RNN(4, 8, nonlinearity="relu")
    model = nn.ModuleDict({"rnn": rnn, "tanh": nn.RNN(4, 8), "head": nn.Sequential(
        nn.Linear(8, 6), nn.ReLU())})
    outs: list[torch.Tensor] = []
    model["head"][1].register_forward_hook(lambda m, a, out: outs.append(out.detach().clone()))

    def forward(x):
        h = model["rnn"](x[0]) if cell else model["rnn"](x)[0][-1]
        return model["head"](h)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=2, every_n_steps=1,
                               run_dir=tmp_path / "run") as doc:
            relu_doctor.watch(model).detach()  # watched again: not said again
            for _ in range(2):
                forward(torch.randn(5, 3, 4)).sum().backward()
                doc.step()
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)
            and "already watched" not in str(w.message)]  # (the second watch: said apart)
    kind = "RNNCell" if cell else "RNN"
    text = (f"'rnn' is an {kind} with nonlinearity='relu': its ReLU runs inside torch's "
            "recurrent kernel, where no hook sees it, so it is not watched. The rest of the "
            "model is.")
    assert said == [f"relu_doctor: {text}"]  # the tanh one: nothing to say
    from relu_doctor.reports import render_report, summary

    run = relu_doctor.load_run(tmp_path / "run")
    assert run.meta["unwatched"] == [text]
    assert f"Not watched:</strong> {text}".replace("'", "&#39;") in render_report(run)
    assert f"Not watched: {text}" in summary(run)
    assert [s.name for s in doc.sites] == ["head.1"]
    assert doc.to_pandas().iloc[0]["dead"] == int(((torch.cat(outs) > 0).sum(0) == 0).sum())


def test_a_model_whose_only_relu_is_recurrent_is_told_why_nothing_is_watched():
    """A trial's model had an nn.RNN(nonlinearity='relu') and no other activation: the error
    said its pass 'ran no ReLU-family activation', which it had, in torch's kernel."""
    rnn = nn.RNN(4, 8, nonlinearity="relu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReluDoctorWarning)  # (said at watch: tested above)
        doc = relu_doctor.watch(rnn, log_every_n_steps=2)
    rnn(torch.randn(5, 3, 4))[0].sum().backward()
    with pytest.raises(ReluDoctorError) as e:
        doc.step()
    doc.detach()
    assert "ran no ReLU-family activation a hook can see" in str(e.value)
    assert ("'(root)' is an RNN with nonlinearity='relu': its ReLU runs inside torch's "
            "recurrent kernel, where no hook sees it. Besides, it watches nn.ReLU") in str(e.value)


# ---------------------------------------------------------------------- memory


def reachable_tensors(root: object) -> dict[int, torch.Tensor]:
    """Tensors reachable from ``root`` without passing through a module, an optimizer or a
    Python module, the model's parameters left out (what the watcher itself holds, not the
    model it watches: the optimizer tap keeps a list of the parameters it reads, and a
    copy of one would still count)."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Parameter):
            continue
        if isinstance(obj, torch.Tensor):
            found[id(obj)] = obj
        elif isinstance(obj, (nn.Module, torch.optim.Optimizer, types.ModuleType, type)):
            continue
        elif isinstance(obj, types.FunctionType):
            stack.extend(c.cell_contents for c in obj.__closure__ or () if c.cell_contents is not None)
        else:
            stack.extend(gc.get_referents(obj))
    return found


def watched_state(batch_size: int):
    case = zoo.ARCH_CASES["small_cnn"]
    model = case.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with relu_doctor.watch(model, log_every_n_steps=2, optimizer=opt) as doc:
        zoo.train(model, [case.batch(batch_size) for _ in range(3)], doc=doc, optimizer=opt)
        gc.collect()
        tensors = reachable_tensors(doc)
    return doc, tensors


def test_persistent_state_is_o_units_whatever_the_batch_size():
    small_doc, small = watched_state(2)
    big_doc, big = watched_state(64)
    for doc, tensors in ((small_doc, small), (big_doc, big)):
        ids = set(tensors)
        for s in doc.probe.sites():  # the traversal does find the accumulators
            assert id(s.stats.window) in ids and id(s.stats.lifetime) in ids
    units = sum(s.units for s in big_doc.probe.sites())

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors.values())

    assert nbytes(small) == nbytes(big)
    per_unit = 2 * len(FIELDS) * 8  # window + lifetime, float64
    accumulators = per_unit * units
    assert accumulators <= nbytes(big) <= accumulators + 64 * 8 * len(big_doc.tap.layers)
    assert not any(64 in t.shape for t in big.values()), "a batch-sized tensor was kept"


@pytest.mark.parametrize("name", ["small_cnn", "resnetish", "mlp"])
def test_no_activation_or_gradient_outlives_its_step(name):
    case = zoo.ARCH_CASES[name]
    model = case.model()
    refs: list[weakref.ref] = []

    def grab(module, args, out):
        refs.append(weakref.ref(out))
        out.register_hook(lambda g: refs.append(weakref.ref(g)))

    acts = [m for m in model.modules() if relu_doctor.family_of(m) is not None]
    with relu_doctor.watch(model, log_every_n_steps=2) as doc:
        handles = [m.register_forward_hook(grab) for m in acts]
        for _ in range(2):
            out = model(case.batch(4))
            out.square().mean().backward()
            doc.step()
            del out
        for h in handles:
            h.remove()
        gc.collect()
        assert len(refs) == 2 * 2 * len(doc.probe.sites())  # outputs and gradients
        assert all(r() is None for r in refs), "an activation or gradient was kept alive"


@pytest.mark.parametrize("every", [1, 3])
def test_steps_leave_no_reference_cycles_for_the_garbage_collector(every):
    # garbage the collector must find costs the user's run a full collection now and then
    # (150 ms on a process that imported torch); relu_doctor's steps, collecting or parked,
    # must free everything they make by reference counting alone
    case = zoo.ARCH_CASES["resnetish"]
    model = case.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def train(doc, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(case.batch(4)).square().mean().backward()
            opt.step()
            doc.step()

    with relu_doctor.watch(model, optimizer=opt, every_n_steps=every, log_every_n_steps=4) as doc:
        train(doc, 5)  # sites made, first log written
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            train(doc, 8)
            gc.collect()
            garbage = [type(o).__name__ for o in gc.garbage]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert doc.tap.layers, "the optimizer tap took part"
    assert garbage == []


@pytest.mark.parametrize("seen", [True, False], ids=["site seen", "site not run yet"])
def test_a_checkpoint_from_another_width_is_a_clear_error(seen):
    source = zoo.mlp(hidden=32)
    with relu_doctor.watch(source) as doc:
        source(torch.randn(2, 10))
    target = zoo.mlp(hidden=16)
    with relu_doctor.watch(target) as doc2:
        if seen:
            target(torch.randn(2, 10))
            with pytest.raises(ReluDoctorError, match=r"site '1'.*32 units.*16"):
                doc2.load_state_dict(doc.state_dict())
        else:  # found in the forward: never raised there (issue 12), the site steps aside
            doc2.load_state_dict(doc.state_dict())
            with pytest.warns(ReluDoctorWarning, match=r"site '1'.*checkpoint has 32 units.*16"):
                target(torch.randn(2, 10))
            assert {k.module_path for k in doc2.probe.failed_sites()} == {s.name for s in doc2.sites}


# ---------------------------------------------------------------------- regressions (issue 11)


def test_tau_from_a_config_is_used_not_replaced_by_the_default(run_watched):
    """watch(config=DiagnosisConfig(tau=0.25)) once silently used tau 0.1."""
    config = relu_doctor.DiagnosisConfig(tau=0.25)
    run = run_watched(zoo.CASES["mlp"], steps=3, log_every_n_steps=3, config=config)
    assert run.doc.config.tau == 0.25
    units = run.doc.records[-1].unit_table
    # below tau is exactly score <= 0.25, dormant those not dead (and some unit lies between
    # 0.1 and 0.25 here, so the old default would have given another answer)
    np.testing.assert_array_equal(units["below_tau"], units["dormant_score"] <= 0.25)
    np.testing.assert_array_equal(units["dormant"], units["below_tau"] & ~units["dead"])
    assert ((units["dormant_score"] > 0.1) & (units["dormant_score"] <= 0.25)).any()


def test_tau_is_set_in_one_place():
    model = zoo.mlp()
    assert relu_doctor.watch(model, tau=0.3).detach() is None
    doc = relu_doctor.Doctor(model, tau=0.3)
    assert doc.config.tau == 0.3
    same = relu_doctor.Doctor(model, tau=0.3, config=relu_doctor.DiagnosisConfig(tau=0.3))
    assert same.config.tau == 0.3
    with pytest.raises(ReluDoctorError, match=r"tau: 0.2 conflicts with config.tau = 0.3"):
        relu_doctor.Doctor(model, tau=0.2, config=relu_doctor.DiagnosisConfig(tau=0.3))
    with pytest.raises(ReluDoctorError, match=r"config: expected a relu_doctor.DiagnosisConfig"):
        relu_doctor.Doctor(model, config={"tau": 0.3})  # type: ignore[arg-type]


def test_unit_table_before_any_statistics_is_a_library_error():
    """Doctor.units() once failed with a bare AssertionError."""
    model = zoo.mlp()
    with relu_doctor.watch(model) as doc:
        model(torch.randn(4, 10))
        doc.step()
        for s in doc.sites:
            s.stats.window.zero_()  # a site known, its window empty, nothing logged yet
        with pytest.raises(ReluDoctorError, match=r"site: '1' has no statistics yet"):
            doc.unit_table("1")
        with pytest.raises(ReluDoctorError, match=r"no site named 'nope'"):
            doc.units("nope")


@pytest.mark.parametrize("name", ["enc:act", "a#1", "(root)", "x:relu#0"])
def test_module_names_that_look_like_site_names_are_ordinary(name):
    """Site identity is a SiteKey, never a parsed name: a module called 'enc:act' is a
    module site with that path, and its key round-trips through checkpoints."""
    net = torch.nn.Sequential()
    net.add_module("fc", torch.nn.Linear(4, 6))
    net.add_module(name, torch.nn.ReLU())
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        net(torch.randn(8, 4)).sum().backward()
        record = doc.step()
    assert record is not None and [r["site"] for r in record.site_rows] == [name]
    key = record.key(name)
    assert key == SiteKey(name, 0, None) == doc.site_key(name) and not key.functional
    assert doc.probe.site_by_key(key) is doc.probe.site(name)
    state = doc.state_dict()
    fresh = relu_doctor.watch(net)
    fresh.load_state_dict(state)
    net(torch.randn(8, 4))
    assert fresh.probe.site_by_key(key).stats.lifetime.equal(doc.probe.site(name).stats.lifetime)
    fresh.detach()


def test_state_dict_reduce_sums_open_windows_once_and_windows_false_starts_them_empty():
    """The one cross-process sum: reduce=True sums every site's open window through
    all_reduce (here two identical processes: x2); loading with windows=False keeps the
    lifetime and counters but starts the window at zero."""
    model = zoo.mlp()
    calls = []

    def all_reduce(t):
        calls.append(t.numel())
        return t * 2

    with relu_doctor.watch(model, all_reduce=all_reduce, log_every_n_steps=100) as doc:
        model(torch.randn(4, 10))
        doc.step()
        plain = doc.state_dict()
        summed = doc.state_dict(reduce=True)
        # One collective for every site's window, after the fixed-size one that checks the
        # processes hold the same sites; then the window loss's sum and count.
        assert len(calls) == 3
        assert calls[1] == sum(st["window"].numel() for st in plain["sites"].values())
        assert calls[2] == 2
    for token, site in plain["sites"].items():
        assert torch.equal(summed["sites"][token]["window"], site["window"] * 2)
        assert torch.equal(summed["sites"][token]["lifetime"], site["lifetime"])
    other = relu_doctor.watch(zoo.mlp())
    other.load_state_dict(summed, windows=False)
    restored = other.state_dict()["sites"]  # sites not yet seen: carried as loaded
    for token in plain["sites"]:
        assert not restored[token]["window"].any()
        assert torch.equal(restored[token]["lifetime"], plain["sites"][token]["lifetime"])
    assert other.global_step == doc.global_step
    other.detach()


def test_current_on_a_process_whose_window_is_empty_still_makes_the_collective_call():
    """``current()`` decides from the window summed across processes: a process whose own
    window saw nothing (its model left in eval mode for this window) makes the same
    collective call as the others (deciding from its own window, it skipped the call the
    others made, and DDP would hang) and gets their statistics. Here the other process is
    a second Doctor whose window, as it enters the collective, is added in."""
    torch.manual_seed(0)
    x = torch.randn(8, 10)

    def trained(all_reduce, *, train):
        model = zoo.mlp()
        doc = relu_doctor.watch(model, all_reduce=all_reduce, world_size=2,
                                log_every_n_steps=2, overhead_budget=None)
        model(torch.randn(8, 10)).sum().backward()
        doc.step()
        doc.step()  # logged: every later window starts empty
        model.train(train)
        model(x).sum().backward()
        doc.step()
        return doc

    other: list[torch.Tensor] = []  # the busy process's side of its collectives
    busy = trained(lambda t: other.append(t.clone()) or t, train=True)
    other.clear()
    want = busy.current()
    calls: list[int] = []
    armed = False

    def summed(t):  # the busy process's side added in; earlier, two identical processes
        calls.append(t.numel())
        return t + other[len(calls) - 1] if armed else t * 2

    idle = trained(summed, train=False)
    calls.clear()
    armed = True
    got = idle.current()
    assert other and calls == [t.numel() for t in other]
    assert got is not None and got.judged and got.step == 3
    for g, w in zip(got.site_rows, want.site_rows, strict=True):
        assert g["elements"] == w["elements"] > 0
        assert g["sparsity"] == w["sparsity"]
    busy.detach()
    idle.detach()


def test_after_a_log_or_the_end_of_training_current_makes_no_collective_call():
    """Right after a log, or once the ``with`` block ended, ``current()`` is the last
    judged record, read with no cross-process call, so one process alone may call it (a
    ``findings()`` under ``if rank == 0`` waited for the others until its timeout)."""
    model = zoo.mlp()
    calls: list[int] = []

    def all_reduce(t):
        calls.append(t.numel())
        return t * 2

    with relu_doctor.watch(model, all_reduce=all_reduce, world_size=2, log_every_n_steps=2,
                           overhead_budget=None) as doc:
        for _ in range(2):
            model(torch.randn(8, 10)).sum().backward()
            doc.step()
        calls.clear()
        assert doc.current() is doc.records[-1] and calls == []  # just logged
        model(torch.randn(8, 10)).sum().backward()
        doc.step()
        mid = doc.current()  # mid-window: summed across processes
        assert calls and mid is not None and mid.step == 3 and mid.judged
    calls.clear()
    after = doc.current()
    assert calls == [] and after is doc.records[-1] and (after.step, after.final) == (3, True)
    assert doc.to_pandas()["step"].tolist() == [3] * len(doc.sites) and calls == []


def test_a_pass_after_the_last_step_is_not_read_as_a_window_after_training():
    """A training pass after the last ``step()`` (a last look at one sample) belongs to no
    step: once the block ended, ``to_pandas``/``findings``/``unit_table`` read the last
    logged window, as ``findings.json`` does. They read that one pass as a window of its
    own (42% of the units 'dead' on one sample) where the logged record had none."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with relu_doctor.watch(model, log_every_n_steps=5, overhead_budget=None) as doc:
        for _ in range(10):
            model(torch.randn(256, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
        model(torch.randn(1, 8)).pow(2).mean().backward()  # after the last step
        inside = doc.to_pandas()  # inside the block: the open window, that pass
    last = doc.records[-1]
    assert last.step == 10 and int(inside["elements"].iloc[0]) == 64
    assert doc.current() is last and int(last.site_rows[0]["elements"]) == 5 * 256 * 64
    assert doc.to_pandas().to_dict("records") == pd.DataFrame(last.site_rows).to_dict("records")
    assert [f.message for f in doc.findings()] == [f.message for f in last.findings]
    assert doc.unit_table("1")["dead"].tolist() == last.unit_table["dead"].tolist()
    # Passes with no step() at all (a block of forward passes only): nothing was logged,
    # so after the block they are what there is to read (not an empty frame).
    with relu_doctor.watch(model, stream="all", overhead_budget=None) as only, torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 8))
    assert int(only.to_pandas()["elements"].iloc[0]) == 3 * 16 * 64


def test_a_pass_after_the_last_step_in_a_window_still_open_is_said_to_be_counted_there():
    """Where the last window is still open at the block's exit, a training pass after the
    last ``step()`` is in it (it was said not to be counted, and was, silently): one
    warning says so, and how to keep it out; a pass in eval mode is not recorded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def run(steps: int, after: str) -> tuple[list[str], relu_doctor.Doctor]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with relu_doctor.watch(model, log_every_n_steps=5, overhead_budget=None) as doc:
                for _ in range(steps):
                    model(torch.randn(32, 8)).pow(2).mean().backward()
                    doc.step()
                if after == "eval":
                    model.eval()
                if after:
                    model(torch.randn(32, 8)).pow(2).mean().backward()
                model.train()
        said = [str(w.message) for w in seen if issubclass(w.category, ReluDoctorWarning)
                and "after the last step()" in str(w.message)]
        return said, doc

    said, doc = run(7, "train")
    assert len(said) == 1 and "1 training pass ran after the last step() (step 7)" in said[0]
    assert "(steps 6-7)" in said[0], said
    assert int(doc.records[-1].site_rows[0]["elements"]) == 3 * 32 * 16  # what it says
    for steps, after in ((7, "eval"), (7, ""), (10, "train")):  # not recorded; none; closed
        said, doc = run(steps, after)
        assert said == [], (steps, after, said)
    assert int(doc.records[-1].site_rows[0]["elements"]) == 5 * 32 * 16


def test_findings_read_the_last_judged_window_however_many_windows_saw_nothing_since():
    """``keep_records`` bounds ``doc.records``; the last judged record is kept beside them,
    so windows that saw nothing (a model left in eval mode) do not push it out: findings()
    and to_pandas() went empty after ``keep_records`` such windows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].bias[:3] = -50.0  # three dead units
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReluDoctorWarning)
        with relu_doctor.watch(model, log_every_n_steps=2, keep_records=2,
                               overhead_budget=None) as doc:
            for step in range(12):
                if step == 2:
                    model.eval()
                model(torch.randn(16, 4)).sum().backward()
                doc.step()
    assert [r.judged for r in doc.records] == [False, False]
    assert {f.kind for f in doc.findings()} >= {"dead"}
    assert doc.to_pandas()["step"].tolist() == [2] and int(doc.to_pandas()["dead"][0]) == 3


class _TwoWays(nn.Module):
    """A ReLU module and a functional F.gelu call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.a1, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.fc2(self.a1(self.fc1(x))))


@pytest.mark.parametrize("options", [{"exclude": "a1"}, {"functional": False}, {}])
def test_a_checkpoint_makes_only_the_sites_this_doctor_watches(options):
    """The sites a checkpoint describes are made at its load only where this Doctor would
    watch them (include/exclude, functional=False): a resumed run has the sites of a fresh
    one with the same options (it listed an excluded site, or functional calls, with the
    checkpoint's counts and none after)."""
    model = _TwoWays()
    with relu_doctor.watch(model, log_every_n_steps=100) as doc:
        model(torch.randn(8, 4)).sum().backward()
        doc.step()
        state = doc.state_dict()
    assert len(state["sites"]) == 2
    fresh = _TwoWays()
    with relu_doctor.watch(fresh, log_every_n_steps=100, **options) as other:
        fresh(torch.randn(8, 4)).sum().backward()
        other.step()
        want = sorted(s.name for s in other.sites)
    resumed = relu_doctor.watch(_TwoWays(), log_every_n_steps=100, **options)
    resumed.load_state_dict(state)
    assert sorted(s.name for s in resumed.sites) == want
    resumed.detach()


def test_a_second_checkpoint_loaded_replaces_the_sites_the_first_made():
    """Sites made by loading one checkpoint and not run since go when a later load's state
    lacks them: the result is that of the later checkpoint alone."""
    model = _TwoWays()
    with relu_doctor.watch(model, log_every_n_steps=100) as doc:
        model(torch.randn(8, 4)).sum().backward()
        doc.step()
        both = doc.state_dict()
    only_a1 = {**both, "sites": {t: st for t, st in both["sites"].items() if "a1" in t}}
    resumed = relu_doctor.watch(_TwoWays(), log_every_n_steps=100)
    resumed.load_state_dict(both)
    assert len(resumed.sites) == 2
    resumed.load_state_dict(only_a1)
    assert [s.name for s in resumed.sites] == ["a1"]
    resumed.detach()


def test_a_checkpoint_loaded_without_windows_restores_no_training_metric_sums():
    """Under DDP the process that carries the summed windows (windows=True) restores the
    open window's training-metric sums; the others (windows=False) start theirs empty, not
    with that process's."""
    model = _TwoWays()
    with relu_doctor.watch(model, log_every_n_steps=100) as doc:
        doc.step(loss=2.0)
        state = doc.state_dict()
    for windows, want in ((True, 3.0), (False, 4.0)):  # the mean of (2, 4), or of (4) alone
        resumed = relu_doctor.watch(_TwoWays(), log_every_n_steps=100)
        resumed.load_state_dict(state, windows=windows)
        resumed.log_metrics({"loss": 4.0})
        assert resumed._training.read([])["loss"] == want
        resumed.detach()


@pytest.mark.parametrize("total", [2.0, torch.tensor(2.0)], ids=["number", "tensor"])
def test_a_checkpoint_carries_an_integrations_open_window_loss(total):
    """The loss an integration adds for the remedies' guard (Lightning's, Keras', the HF
    Trainer's) is in the checkpoint: a window resumed mid-way reads its batches before the
    checkpoint too, where it read those after it alone. windows=False starts it empty."""
    model = _TwoWays()
    with relu_doctor.watch(model, log_every_n_steps=100) as doc:
        doc.window_loss.add(total)
        state = doc.state_dict()
    assert doc.window_loss.take() == (total, 1)  # (saving leaves the window as it was)
    for windows, want in ((True, 3.0), (False, 4.0)):  # the mean of (2, 4), or of (4) alone
        resumed = relu_doctor.watch(_TwoWays(), log_every_n_steps=100)
        resumed.load_state_dict(state, windows=windows)
        resumed.window_loss.add(torch.tensor(4.0))
        assert resumed._window_loss() == want
        resumed.detach()


def test_relu_like_activations_of_no_family_are_said_not_watched_once_per_model():
    """A MobileNetV3's hard swishes beside its ReLUs were watched nowhere and said nowhere
    (a Keras trial; torch's ``nn.Hardswish`` alike): said once per model, at its first
    watch; Sigmoid (no ReLU-like activation) not named; a model without them says nothing."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                torch.nn.Hardswish(), torch.nn.Mish(), torch.nn.Hardswish(),
                                torch.nn.Linear(8, 1), torch.nn.Sigmoid())
    for m, want in ((model, 1), (model, 0), (zoo.mlp(), 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with relu_doctor.watch(m, log_every_n_steps=1) as doc:
                m(torch.randn(2, 4 if m is model else 10)).sum().backward()
                doc.step()
        said = [str(w.message) for w in caught if "ReLU-like" in str(w.message)]
        assert len(said) == want
        if want:
            assert said[0].startswith("relu_doctor: the model also runs nn.Hardswish x2, "
                                      "nn.Mish x1: ReLU-like, but of no activation family")
            assert [s.name for s in doc.sites] == ["1"]


def test_two_sites_never_share_a_display_name():
    """A module registered as 'x:relu#0' beside the first F.relu call of module 'x': two
    sites, two names, each unit table its own."""

    class X(torch.nn.Module):
        def forward(self, h):
            return torch.nn.functional.relu(h)

    net = torch.nn.Module()
    net.x = X()
    net.add_module("x:relu#0", torch.nn.ReLU())
    net.forward = lambda inp: getattr(net, "x:relu#0")(net.x(inp)[:, :4])  # type: ignore[method-assign]
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        net(torch.randn(5, 8))
        record = doc.step()
    names = [r["site"] for r in record.site_rows]
    assert names == ["x:relu#0", "x:relu#0~2"]
    assert record.key("x:relu#0") == SiteKey("x", 0, "relu")
    assert record.key("x:relu#0~2") == SiteKey("x:relu#0", 0, None)
    assert len(doc.unit_table("x:relu#0")) == 8 and len(doc.unit_table("x:relu#0~2")) == 4


@pytest.mark.parametrize("sched_first", [False, True])
def test_the_learning_rate_recorded_is_the_one_the_logged_step_used(sched_first):
    """A scheduler steps after the optimizer (or, wrongly, before it): either way the rate
    recorded at a log is the one that log's optimizer step used, read at that step."""
    torch.manual_seed(0)
    model = zoo.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    used: dict[int, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: scheduler stepped before optimizer
        with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=2) as doc:
            for step in range(1, 8):  # the block's end logs step 7's partial window
                model(torch.randn(8, 10)).square().mean().backward()
                if sched_first:
                    sched.step()
                used[step] = opt.param_groups[0]["lr"]
                opt.step()
                if not sched_first:
                    sched.step()
                opt.zero_grad()
                doc.step()
    assert {r.step: r.metrics["lr"] for r in doc.records} == {s: used[s] for s in (2, 4, 6, 7)}
    assert len({used[s] for s in (2, 4, 6, 7)}) == 4


def test_the_rates_of_several_optimizers_are_named_by_optimizer_and_group():
    """A DLRM's sparse embedding under SparseAdam and its MLP under Adam (two param groups):
    each rate is recorded as lr/<optimizer>.<group>, the optimizers numbered in the order
    optimizer=[...] lists them (the README's names, which a trial could not find)."""
    torch.manual_seed(0)
    emb, mlp = nn.Embedding(50, 8, sparse=True), zoo.mlp(d_in=8)
    sparse = torch.optim.SparseAdam(emb.parameters(), lr=0.01)
    dense = torch.optim.Adam([{"params": list(mlp.parameters())[:2], "lr": 0.002},
                              {"params": list(mlp.parameters())[2:]}], lr=0.003)
    model = nn.ModuleDict({"emb": emb, "mlp": mlp})
    with relu_doctor.watch(model, optimizer=[sparse, dense], log_every_n_steps=2) as doc:
        for _ in range(2):
            mlp(emb(torch.randint(0, 50, (8,)))).square().mean().backward()
            sparse.step(), dense.step()
            sparse.zero_grad(), dense.zero_grad()
            doc.step()
    rates = {k: v for k, v in doc.records[-1].metrics.items() if k.startswith("lr")}
    assert rates == {"lr/0.0": 0.01, "lr/1.0": 0.002, "lr/1.1": 0.003}


class _OtherActivations(nn.Module):
    """Activations of no ReLU family only (LeViT's Hardswish, Mish), and a forward that may
    call torch.relu (the branch it never takes here): nothing is ever watched."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.acts = nn.Sequential(nn.Hardswish(), nn.Hardswish(), nn.Mish())
        self.softmax = nn.Softmax(-1)  # no elementwise activation: not named

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.acts(self.fc(x))
        if x.shape[0] > 1000:
            h = torch.relu(h)
        return self.softmax(h)


class _OnlyOtherActivations(_OtherActivations):
    """... and a forward that calls no ReLU-family function: nothing could ever be watched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.acts(self.fc(x)))


@pytest.mark.parametrize("functional", [False, True], ids=["raised", "warned"])
def test_a_model_whose_activations_are_of_no_family_is_told_which_it_holds(functional) -> None:
    """A model that runs only activations outside the ReLU family was told to check
    model.train() and include/exclude; it is now told the activations it holds instead."""
    model = _OtherActivations() if functional else _OnlyOtherActivations()
    said: list[str] = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            with relu_doctor.watch(model, log_every_n_steps=2, overhead_budget=None) as doc:
                for _ in range(4):
                    model(torch.randn(3, 4)).sum().backward()
                    doc.step()
        except ReluDoctorError as e:
            said.append(str(e))
    said += [str(w.message) for w in rec if "no watched activation ran" in str(w.message)]
    assert len(said) == 1
    assert "(it holds nn.Hardswish x2, nn.Mish x1: of no ReLU family)" in said[0]
    assert "Softmax" not in said[0]
    assert ("nothing has been collected yet" in said[0]) is functional
    # (an MoE trial's GPT-OSS computes its SwiGLU inline: nothing called, nothing watched)
    assert ("an activation computed inline" in said[0]) is functional


def test_a_doctor_that_read_no_window_gives_a_site_frame_with_the_usual_columns() -> None:
    """A frozen teacher watched beside its student, run under no_grad only, reads no window:
    its to_pandas() had the columns step, site and family only, so code selecting the usual
    ones (steps_collected, grad_rms) raised KeyError. It has every column of a site row now,
    and no row."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReluDoctorWarning)  # (the teacher's: no training pass)
        with relu_doctor.watch(teacher, log_every_n_steps=2, overhead_budget=None) as dt, \
                relu_doctor.watch(student, log_every_n_steps=2, overhead_budget=None) as ds:
            for _ in range(4):
                x = torch.randn(3, 4)
                with torch.no_grad():
                    teacher(x)
                student(x).sum().backward()
                dt.step()
                ds.step()
    empty, full = dt.to_pandas(), ds.to_pandas()
    assert empty.empty and len(full) == 1
    assert list(empty.columns) == list(full.columns)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def test_close_ends_a_watch_made_without_with_as_leaving_the_block_does(tmp_path) -> None:
    """A notebook trial ended a watch made without ``with`` by ``doc.close()``: every hook
    stayed on the model and went on counting, and the last, partial window never reached the
    run directory. close() ends it as the block's exit does; a second close() changes
    nothing. The last window's count is the steps' own (5 steps of 32 samples, 16 units)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    doc = relu_doctor.watch(model, log_every_n_steps=10, optimizer=opt, run_dir=tmp_path / "r",
                            overhead_budget=None)
    assert _hook_count(model) > 0
    for _ in range(25):
        model(torch.randn(32, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        doc.step()
    doc.close()
    assert _hook_count(model) == 0
    assert sorted(relu_doctor.load_run(tmp_path / "r").history["step"].unique()) == [10, 20, 25]
    passes = doc.probe.passes
    model(torch.randn(32, 8)).sum().backward()  # (after the end: not counted)
    doc.close()
    assert doc.probe.passes == passes and _hook_count(model) == 0
    assert doc.to_pandas()["elements"].tolist() == [5 * 32 * 16]


def test_a_second_watch_of_a_model_still_watched_is_warned_of() -> None:
    """A notebook cell run again stacked Doctors on one model (three, each counting every
    pass at its own cost), silently. Said; not once the first is closed, nor for another
    model."""
    model, other = (nn.Sequential(nn.Linear(4, 8), nn.ReLU()) for _ in range(2))
    first = relu_doctor.watch(model)
    with pytest.warns(ReluDoctorWarning, match=r"Sequential is already watched by another "
                      r"Doctor, still attached \(no run_dir\).*close\(\)"):
        second = relu_doctor.watch(model)
    second.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (each ends without a step: said so)
        warnings.filterwarnings("error", message=".*already watched")
        relu_doctor.watch(other).close()
        first.close()
        relu_doctor.watch(model).close()
    assert _hook_count(model) == 0


def test_close_in_an_except_says_the_error_and_inside_a_block_closes_the_directory_only(
        tmp_path) -> None:
    """Reviews of close() ending a watch: after a crash (``except: doc.close()``) the run
    read as finished and was told it had no step; inside a ``with`` block (to release the
    run directory) it ended monitoring and the next step() raised into training; attach()
    after close() left step() raising; with several processes it ran collectives (one
    rank closing alone would wait for the others for ever)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def train(doc: relu_doctor.Doctor, steps: int) -> None:
        for _ in range(steps):
            model(torch.randn(8, 4)).sum().backward()
            doc.step()

    doc = relu_doctor.watch(model, log_every_n_steps=2, run_dir=tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            train(doc, 3)
            raise RuntimeError("boom")
        except RuntimeError:
            doc.close()
    assert doc.ended_by == "RuntimeError: boom" and _hook_count(model) == 0
    assert relu_doctor.load_run(tmp_path / "a").meta["ended_by"] == "RuntimeError: boom"
    assert not [w for w in caught if "without a call" in str(w.message)]
    doc.attach()  # watching again: its steps count
    train(doc, 2)
    assert doc.global_step == 5
    doc.close()
    with relu_doctor.watch(model, log_every_n_steps=2) as inner:
        train(inner, 1)
        inner.close()  # (inside the block: the run directory only)
        train(inner, 1)
        assert _hook_count(model) > 0 and inner.global_step == 2
    calls: list[int] = []

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return t

    many = relu_doctor.watch(model, log_every_n_steps=100, all_reduce=all_reduce,
                             world_size=2, every_n_steps=1)
    train(many, 1)
    before = len(calls)
    many.close()  # (this process's own window: no collective)
    assert len(calls) == before and _hook_count(model) == 0
