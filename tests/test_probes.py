"""Hooks: which sites are watched and how they are named, unit dims, and that attaching and
detaching leave the model exactly as it was (no hook left, same numbers bit for bit)."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim.optimizer as optim_module
from torch.nn.modules import module as module_module
from torch.utils.checkpoint import checkpoint

import relu_doctor
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.stats import FIELDS
from tests import reference as ref
from tests import zoo

MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
OPTIMIZER_HOOKS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)
GLOBAL_HOOKS = (
    (module_module, "_global_forward_hooks"),
    (module_module, "_global_forward_pre_hooks"),
    (module_module, "_global_backward_hooks"),
    (module_module, "_global_backward_pre_hooks"),
    (module_module, "_global_forward_hooks_always_called"),
    (optim_module, "_global_optimizer_pre_hooks"),
    (optim_module, "_global_optimizer_post_hooks"),
)


def hook_state(model: nn.Module, optimizers=()) -> dict:
    """Everything a watcher could leave behind: every hook dict of every module, optimizer
    and global registry, every module's attributes and class, the torch function and
    dispatch mode stacks."""
    state = {}
    for path, m in model.named_modules():
        for attr in MODULE_HOOKS:
            state[(path, attr)] = list(getattr(m, attr, {}).items())
        state[(path, "__dict__")] = sorted(m.__dict__)
        state[(path, "class")] = type(m)
    for i, opt in enumerate(optimizers):
        for attr in OPTIMIZER_HOOKS:
            state[(f"optimizer{i}", attr)] = list(getattr(opt, attr, {}).items())
    for mod, attr in GLOBAL_HOOKS:
        state[("global", attr)] = list(getattr(mod, attr, {}).items())
    state["function modes"] = torch._C._len_torch_function_stack()
    state["dispatch modes"] = torch._C._len_torch_dispatch_stack()
    return state


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {path: m.training for path, m in model.named_modules()}


def train_and_record(model, batches, optimizer, doc=None):
    """Outputs, parameter gradients (before the step), and final parameters and buffers."""
    outs, grads = [], []
    for x in batches:
        out = model(x)
        out.float().square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad()
        if doc is not None:
            doc.step()
        outs.append(out.detach())
    return outs, grads, [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def assert_bitwise_equal(a: list, b: list, what: str) -> None:
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if isinstance(x, list):
            assert_bitwise_equal(x, y, f"{what}[{i}]")
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), f"{what}[{i}] differs"


DETACH_CASES = ["mlp", "small_cnn", "resnetish", "bottleneck", "sequence", "inverted_residual",
                "family_prelu", "family_rrelu"]
WATCH_OPTIONS = {
    "defaults": {},
    "optimizer+every_n": {"optimizer": True, "every_n_steps": 2, "log_every_n_steps": 2},
    "no_gradients": {"gradients": False, "log_every_n_steps": 1},
    "functional": {"functional": True, "log_every_n_steps": 2},
}


@pytest.mark.parametrize("options", WATCH_OPTIONS.values(), ids=WATCH_OPTIONS.keys())
@pytest.mark.parametrize("name", DETACH_CASES)
def test_watching_changes_no_number_and_detaching_leaves_no_trace(name, options):
    case = zoo.CASES[name]
    watched = case.model()
    watched.train()
    next(iter(watched.children())).eval()  # a mixed pattern of training flags
    control = copy.deepcopy(watched)
    batches = [case.batch(4) for _ in range(4)]
    opt_w = torch.optim.SGD(watched.parameters(), lr=0.05, momentum=0.9)
    opt_c = torch.optim.SGD(control.parameters(), lr=0.05, momentum=0.9)
    before, flags = hook_state(watched, [opt_w]), training_flags(watched)
    kwargs = {**options, "optimizer": opt_w} if options.get("optimizer") else options

    torch.manual_seed(1)  # RReLU draws its slopes from the global RNG
    with relu_doctor.watch(watched, **kwargs) as doc:
        assert hook_state(watched, [opt_w]) != before  # the check below can fail
        got = train_and_record(watched, batches, opt_w, doc)
    torch.manual_seed(1)
    want = train_and_record(control, batches, opt_c)

    assert doc.probe.sites(), "nothing was watched"
    for what, a, b in zip(("outputs", "gradients", "parameters and buffers"), got, want, strict=True):
        assert_bitwise_equal(a, b, what)
    assert hook_state(watched, [opt_w]) == before
    assert training_flags(watched) == flags
    x = case.batch(4)
    torch.manual_seed(2)
    after = watched(x)
    torch.manual_seed(2)
    assert torch.equal(after, control(x))


def test_an_exception_inside_the_with_block_still_detaches():
    model = zoo.SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before, flags = hook_state(model, [opt]), training_flags(model)
    with pytest.raises(RuntimeError, match="boom"), relu_doctor.watch(model, optimizer=opt) as doc:
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        raise RuntimeError("boom")
    assert not doc.probe.attached
    assert hook_state(model, [opt]) == before
    assert training_flags(model) == flags


def test_a_failed_watch_leaves_no_hook():
    model = zoo.mlp()
    before = hook_state(model)
    with pytest.raises(ReluDoctorError):
        relu_doctor.watch(model, include=["no.such.module"])
    assert hook_state(model) == before


def test_detach_is_idempotent_and_stops_collection():
    model = zoo.mlp()
    doc = relu_doctor.watch(model)
    model(torch.randn(4, 10))
    doc.detach()
    doc.detach()
    counts = [s.stats.window.clone() for s in doc.probe.sites()]
    model(torch.randn(4, 10))
    assert all(torch.equal(c, s.stats.window) for c, s in zip(counts, doc.probe.sites(), strict=True))


def test_an_exception_mid_forward_does_not_shift_call_indices(run_watched):
    """A forward that dies half-way must not leave the call counters or the nesting depth
    behind: the next forward gives the same sites with the same statistics."""
    model = zoo.ResNetish()
    conv = model.layer1[1].conv2
    original = conv.forward
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("flaky")
        return original(x)

    conv.forward = flaky
    case = zoo.ARCH_CASES["resnetish"]
    with relu_doctor.watch(model) as doc, pytest.raises(RuntimeError, match="flaky"):
        model(case.batch(4))
    assert len(doc.probe.sites()) == 4  # stem, block 0 twice, block 1 once: then it died
    # A fresh doctor on the same model (still flaky-patched, now passing) to compare with
    # the reference over clean steps only.
    run = run_watched(case, model=model, steps=2)
    assert {s.name for s in run.doc.probe.sites()} == set(ref.site_names(run.recorder).values())
    # The first doctor, re-attached after the failure, also names the next forward right.
    with doc:
        model(case.batch(4))
    assert {s.name for s in doc.probe.sites()} == set(ref.site_names(run.recorder).values())


# ---------------------------------------------------------------------- selection


def activation_paths(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, tuple(zoo_types()))]


def zoo_types():
    return {type(m) for m in zoo.FAMILY_MODULES.values()}


@pytest.mark.parametrize(
    ("include", "exclude"),
    [(["layer1.*"], None), (None, ["layer1.1.*"]), (["stem.*", "layer1.1.*"], ["stem.*"]),
     ("layer1.0.relu", None)],
)
def test_include_and_exclude_select_sites_by_module_path(run_watched, include, exclude):
    run = run_watched(zoo.ARCH_CASES["resnetish"], steps=1, include=include, exclude=exclude)
    inc = [include] if isinstance(include, str) else include

    def selected(path: str) -> bool:
        ok = inc is None or any(fnmatch.fnmatchcase(path, p) for p in inc)
        return ok and not any(fnmatch.fnmatchcase(path, p) for p in exclude or [])

    want = {name for (path, _), name in ref.site_names(run.recorder).items() if selected(path)}
    assert want, "the selection should keep something"
    assert {s.name for s in run.doc.probe.sites()} == want


# ---------------------------------------------------------------------- unit dims


@pytest.mark.parametrize(
    ("case", "unit_dims", "dim"),
    [("sequence", {"act": 1}, 1), ("small_cnn", {"features.*": -1}, 3), ("mlp", {"1": 0}, 0)],
)
def test_unit_dim_override_is_used_and_recorded(run_watched, case, unit_dims, dim):
    run = run_watched(zoo.ARCH_CASES[case], steps=2, unit_dims=unit_dims)
    overridden = [k for k in run.recorder.calls if fnmatch.fnmatchcase(k[0], next(iter(unit_dims)))]
    assert overridden
    for key in overridden:
        site = run.site_of(key)
        assert site.unit_dim == dim and "override" in site.unit_rule
        assert site.describe()["unit_dim"] == dim
        total = (site.stats.window + site.stats.lifetime).numpy()
        got = {name: total[i] for i, name in enumerate(FIELDS)}
        ref.assert_stats_match(got, ref.expected_stats(run.recorder.calls[key], dim), site.name)
        units = run.doc.units(site.name)
        assert units.attrs["unit_dim"] == dim and "override" in units.attrs["unit_rule"]
        assert len(units) == run.recorder.calls[key].outputs[0].shape[dim]


def test_default_unit_rule_is_recorded_with_the_results(run_watched):
    run = run_watched(zoo.ARCH_CASES["sequence"], steps=1)
    units = run.doc.units("act")
    assert units.attrs["unit_dim"] == 2 and "last dim" in units.attrs["unit_rule"]


def test_a_unit_dim_whose_size_changes_warns_once_and_training_goes_on():
    """unit_dims pointing at the sequence dim: a second length is another unit count. Never
    an exception in the forward: one warning, those calls left out, the others counted."""
    model = zoo.SequenceModel()
    xs = [torch.randn(2, 5, 12), torch.randn(2, 6, 12), torch.randn(2, 6, 12), torch.randn(2, 5, 12)]
    rec = ref.Recorder(model)
    with (
        pytest.warns(ReluDoctorWarning, match=r"site 'act' had 5 units along dim 1.*\(2, 6, 24\)") as got,
        relu_doctor.watch(model, unit_dims={"act": 1}, every_n_steps=1) as doc,
    ):
        zoo.train(model, xs, doc=doc)
    rec.remove()
    assert sum(issubclass(w.category, ReluDoctorWarning) for w in got) == 1
    site = doc.probe.site("act")
    total = (site.stats.window + site.stats.lifetime).numpy()
    ref.assert_stats_match(
        {name: total[i] for i, name in enumerate(FIELDS)},
        ref.expected_stats(rec.calls[("act", 0)], 1, steps=[0, 3]),
        "act",
    )


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = self.make(12)

    @staticmethod
    def make(width: int) -> nn.Sequential:
        head = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 3))
        with torch.no_grad():
            head[0].bias[: width // 3] = -50.0  # (a third dead: counts worth checking)
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_a_layer_replaced_by_one_of_another_width_is_watched_anew():
    """A head replaced mid-run by one of another width (a new number of hidden units) was
    never counted again: one warning advised unit_dims, which cannot help, and the report
    called the site healthy on the old width. The site is made anew at the new width, said
    once; its counts (window and lifetime) are the new layer's alone, checked against hooks
    of ours on it, and the run records the new width. Its findings end and begin anew at
    the next log (the trial's report said the new layer's dead units were dead "since step
    10", before it existed)."""
    torch.manual_seed(0)
    model = _Head()
    seen: dict[str, torch.Tensor] = {}

    def count(module: nn.Module, args: object, out: torch.Tensor) -> None:
        seen["elements"] = seen.get("elements", 0) + out.shape[0]
        seen["active"] = seen.get("active", torch.zeros(out.shape[1])) + (out > 0).sum(0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=4, every_n_steps=1) as doc:
            for step in range(12):
                if step == 6:  # (mid-window: what it had of the old head is dropped)
                    model.head = _Head.make(20)
                    model.head[1].register_forward_hook(count)
                model(torch.randn(4, 8)).pow(2).mean().backward()
                doc.step()
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    assert len(said) == 1
    assert "site 'head.1' now runs on 20 units (it had 12): 'head.0' was replaced" in said[0]
    site = doc.probe.site("head.1")
    assert site.units == 20 and doc.probe.site("body.1").units == 16
    total = (site.stats.window + site.stats.lifetime).numpy()
    assert total[FIELDS.index("elements")].tolist() == [float(seen["elements"])] * 20
    assert total[FIELDS.index("active")].tolist() == seen["active"].tolist()
    rows = doc.to_pandas().set_index("site")
    assert rows.loc["head.1", "units"] == 20
    assert rows.loc["head.1", "lifetime_dead"] == int((seen["active"] == 0).sum()) == 6
    described = {d["name"]: d["units"] for d in doc.to_run().meta["sites"]}
    assert described["head.1"] == 20
    dead = [(e["status"], e["step"], e["began"]) for e in doc.to_run().events
            if e["type"] == "finding" and e["kind"] == "dead" and e["site"] == "head.1"]
    assert dead == [("began", 4, 4), ("ended", 8, 4), ("began", 8, 8)]
    assert next(f for f in doc.findings() if f.kind == "dead" and f.site == "head.1").began == 8


def test_a_resumed_doctor_knows_each_sites_producer_its_frozen_feed_and_a_replaced_layer():
    """A Doctor resumed from a checkpoint makes its sites from their description, which did
    not hold the producing layer: frozen sites read as trainable again (their findings
    critical, remedies free to act), and a layer replaced later was left out, not made
    anew. The description holds the producer now."""
    def make(width: int = 12) -> nn.Module:
        torch.manual_seed(0)
        m = _Head()
        m.head = _Head.make(width)
        m.body.requires_grad_(False)
        with torch.no_grad():
            m.body[0].bias[:8] = -50.0
        return m

    def train(doc: relu_doctor.Doctor, model: nn.Module, steps: int, *, at: int = -1) -> None:
        for step in range(steps):
            if step == at:
                model.head = _Head.make(20)
            model(torch.randn(4, 8)).pow(2).mean().backward()
            doc.step()

    model = make()
    with relu_doctor.watch(model, log_every_n_steps=4, every_n_steps=1) as doc:
        train(doc, model, 4)
        state = doc.state_dict()
    again = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(again, log_every_n_steps=4, every_n_steps=1) as resumed:
            resumed.load_state_dict(state)
            assert {s.name: s.producer for s in resumed.sites} == {
                s.name: s.producer for s in doc.sites} == {"body.1": "body.0", "head.1": "head.0"}
            train(resumed, again, 8, at=6)
    rows = resumed.to_pandas().set_index("site")
    assert rows.loc["body.1", "frozen"] == "body.0"
    assert all(f.severity == "info" for f in resumed.findings() if f.site == "body.1")
    assert resumed.probe.site("head.1").units == 20
    assert any("now runs on 20 units (it had 12)" in str(w.message) for w in caught)


@pytest.mark.parametrize("written", ["now", "before chained was kept"])
def test_a_chains_second_site_is_told_from_a_second_consumer_and_a_checkpoint_keeps_it(
        written: str) -> None:
    """fc feeds F.relu, whose output a LeakyReLU takes (a chain), and a GELU of its own (a
    second consumer). Only the sites that take the layer's output first group as its
    consumers (the recycling advice: Site.chained); a checkpoint keeps which, and one of
    before it was kept reads unknown (None)."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.leaky, self.gelu = nn.Linear(4, 6), nn.LeakyReLU(), nn.GELU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.leaky(F.relu(h)) + self.gelu(h)

    def sites(doc: relu_doctor.Doctor) -> dict[str, tuple[str | None, bool | None]]:
        return {s.name: (s.producer, s.chained) for s in doc.sites}

    torch.manual_seed(0)
    net = Net()
    with relu_doctor.watch(net, log_every_n_steps=2, every_n_steps=1) as doc:
        for _ in range(2):
            net(torch.randn(3, 4)).sum().backward()
            doc.step()
        state = doc.state_dict()
    assert sites(doc) == {"(root):relu#0": ("fc", False), "leaky": ("fc", True),
                          "gelu": ("fc", False)}
    if written != "now":
        for entry in state["sites"].values():
            del entry["site"]["chained"]
    with relu_doctor.watch(net, log_every_n_steps=2, every_n_steps=1) as resumed:
        resumed.load_state_dict(state)
        want = {n: (p, c if written == "now" else None) for n, (p, c) in sites(doc).items()}
        assert sites(resumed) == want


def test_a_layer_made_anew_before_a_checkpoint_begins_its_findings_anew_after_the_resume():
    """A checkpoint between a layer's replacement and the next log lost the restart of its
    findings: the resumed run said the new layer's units were dead since a step before it
    existed (review). The pending restart is checkpointed."""
    torch.manual_seed(0)
    model = _Head()
    with relu_doctor.watch(model, log_every_n_steps=4, every_n_steps=1) as doc:
        for step in range(7):
            if step == 6:
                model.head = _Head.make(20)
            model(torch.randn(4, 8)).pow(2).mean().backward()
            doc.step()
        state = doc.state_dict()  # (step 7: the replacement at 6 not yet logged)
    again = _Head()
    again.head = _Head.make(20)
    again.load_state_dict(model.state_dict())
    with relu_doctor.watch(again, log_every_n_steps=4, every_n_steps=1) as resumed:
        resumed.load_state_dict(state)
        again(torch.randn(4, 8)).pow(2).mean().backward()
        resumed.step()
    assert {f.kind: f.began for f in resumed.findings() if f.site == "head.1"} == {
        "dead": 8, "lifetime_dead": 8}


def test_frozen_feeds_agree_with_the_rule_and_walk_each_block_once_a_log(monkeypatch):
    """The frozen layer of each site, for all sites at a log: the same answers as
    :func:`frozen_feed` one by one (a frozen block, a trainable one, a frozen layer in a
    block that trains, a layer held by the model itself, none), and a frozen block of many
    layers is walked once, not once per site (review: 142 ms a log for 256 sites)."""
    from relu_doctor.sites import FrozenFeeds, frozen_feed

    model = nn.Module()
    model.frozen = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)]).requires_grad_(False)
    model.trains = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model.mixed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model.mixed[0].requires_grad_(False)
    model.top = nn.Linear(4, 4).requires_grad_(False)
    producers = [*(f"frozen.{i}" for i in range(6)), "trains.0", "mixed.0", "mixed.1", "top",
                 None, "gone.0"]
    walks: list[nn.Module] = []
    real = nn.Module.parameters

    def counted(self: nn.Module, recurse: bool = True):  # type: ignore[no-untyped-def]
        if recurse:
            walks.append(self)
        return real(self, recurse)

    expected = [p if frozen_feed(model, p) else None for p in producers]
    assert expected == [*(f"frozen.{i}" for i in range(6)), None, None, None, None, None, None]
    monkeypatch.setattr(nn.Module, "parameters", counted)
    assert FrozenFeeds().layers(model, producers, 0) == expected
    assert walks.count(model.frozen) == 1
    # A model nothing of which trains (a frozen teacher watched on its own): its root's
    # layers are frozen feeds too, the root's own parameters counted.
    teacher = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).requires_grad_(False)
    assert [frozen_feed(teacher, p) for p in ("0", "2", "", "1")] == [True, True, False, False]
    walks.clear()
    assert FrozenFeeds().layers(teacher, ["0", "2", "0"], 0) == ["0", "2", "0"]
    assert walks.count(teacher) == 1
    teacher[2].weight.requires_grad_(True)  # one weight trains: none is a frozen feed
    assert FrozenFeeds().layers(teacher, ["0", "2"], 0) == [None, None]


def test_an_image_size_change_is_normal():
    model = zoo.ResNetish()  # global pooling before the head: any image size
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReluDoctorWarning)
        with relu_doctor.watch(model, every_n_steps=1, log_every_n_steps=100) as doc:
            for size in (8, 12, 8):
                model(torch.randn(2, 3, size, size)).sum().backward()
                doc.step()
    assert [s.units for s in doc.sites] == [8] * 5
    for site in doc.sites:
        assert site.stats.window[0].tolist() == [2.0 * (64 + 144 + 64)] * 8


# ---------------------------------------------------------------------- never raise


def _failing(monkeypatch, name):
    """Make ``SiteStats.<name>`` (what a hook calls to add its statistics) raise for the site
    of 8 units only."""
    from relu_doctor.stats import SiteStats

    real = getattr(SiteStats, name)

    def flaky(self, *args, **kwargs):
        if self.units == 8:
            raise RuntimeError("injected failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SiteStats, name, flaky)


@pytest.mark.parametrize("where", ["record_forward", "record_grad"])
def test_a_failing_hook_warns_once_and_training_goes_on(monkeypatch, where):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 1))
    plain = copy.deepcopy(model)
    _failing(monkeypatch, where)
    xs = [torch.randn(3, 4) for _ in range(3)]
    rec = ref.Recorder(model)
    with (
        pytest.warns(ReluDoctorWarning, match=r"stopped monitoring site '1'.*injected failure") as got,
        relu_doctor.watch(model, every_n_steps=1) as doc,
    ):
        outs = zoo.train(model, xs, doc=doc, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    rec.remove()
    assert sum(issubclass(w.category, ReluDoctorWarning) for w in got) == 1
    # Training went on, unchanged: the same outputs as an unwatched copy.
    ref_outs = zoo.train(plain, xs, optimizer=torch.optim.SGD(plain.parameters(), lr=0.1))
    for a, b in zip(outs, ref_outs, strict=True):
        assert torch.equal(a, b)
    # The other site is still monitored, exactly.
    site = doc.probe.site("3")
    total = (site.stats.window + site.stats.lifetime).numpy()
    ref.assert_stats_match(
        {name: total[i] for i, name in enumerate(FIELDS)},
        ref.expected_stats(rec.calls[("3", 0)], 1),
        "3",
    )


def test_a_failing_functional_hook_warns_once(monkeypatch):
    from tests.zoo import _FunctionalReLUBlock

    model = nn.Sequential(_FunctionalReLUBlock(8), nn.Linear(8, 1))
    _failing(monkeypatch, "record_forward")
    with (
        pytest.warns(ReluDoctorWarning, match=r"stopped monitoring site '0:relu#0'") as got,
        relu_doctor.watch(model, every_n_steps=1) as doc,
    ):
        zoo.train(model, [torch.randn(3, 8) for _ in range(3)], doc=doc)
    assert sum(issubclass(w.category, ReluDoctorWarning) for w in got) == 1


def test_meta_and_fake_tensors_are_ignored_and_accumulators_follow_the_real_device():
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = zoo.mlp()
    with relu_doctor.watch(model, every_n_steps=1) as doc:
        model.to("meta")  # Keras builds on the meta device first
        model(torch.randn(2, 10, device="meta"))
        assert doc.sites == []
        model.load_state_dict(zoo.mlp().state_dict(), assign=True)  # back to real weights
        with FakeTensorMode(allow_non_fake_inputs=True):
            model(torch.randn(2, 10))
        assert doc.sites == []
        zoo.train(model, [torch.randn(2, 10)], doc=doc)
    assert [s.stats.window.device.type for s in doc.sites] == ["cpu", "cpu"]
    assert doc.sites[0].stats.window[0].tolist() == [2.0] * 32


def test_torch_export_while_watched_records_nothing():
    model = zoo.mlp()
    with relu_doctor.watch(model, every_n_steps=1) as doc:
        torch.export.export(model, (torch.randn(2, 10),))
        assert doc.sites == []
        zoo.train(model, [torch.randn(2, 10)], doc=doc)
    assert doc.sites[0].stats.window[0].tolist() == [2.0] * 32


class _CallsRelu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.relu(x)


@pytest.mark.parametrize("functional", [False, True])
def test_torch_func_transformed_passes_are_ignored_and_the_site_goes_on(functional):
    """Per-sample gradients (``vmap(grad(functional_call(...)))``) inside a watch: the
    transformed pass has no storage to read. The forward hook failed on it, and the site
    was dropped for the run: the ordinary passes after it went uncounted. Now those
    passes are what the watch holds, as in a run without the per-sample gradients. Nor
    are the transformed passes counted among the window's: a site then read "ran in 4 of
    the window's 8 recorded passes (a branch taken sometimes)" (a trial)."""
    from torch.func import functional_call, grad, vmap

    def run(per_sample: bool) -> tuple[list[float], int, list[warnings.WarningMessage]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        if functional:
            model[1] = _CallsRelu()  # an F.relu call: a functional site
        params = dict(model.named_parameters())
        per = vmap(grad(lambda p, xi: functional_call(model, p, (xi[None],)).pow(2).mean()),
                   in_dims=(None, 0))
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            with relu_doctor.watch(model, every_n_steps=1, log_every_n_steps=4,
                                   functional=functional) as doc:
                for _ in range(4):
                    x = torch.randn(16, 8)
                    model(x).pow(2).mean().backward()
                    if per_sample:
                        per({k: v.detach() for k, v in params.items()}, x)
                    doc.step()
        [site] = doc.sites
        return (site.stats.lifetime + site.stats.window)[0].tolist(), doc.probe.passes, list(got)

    want, want_passes, _ = run(False)
    got, passes, caught = run(True)
    assert got == want and sum(want) > 0
    assert passes == want_passes == 4
    assert not [w for w in caught if issubclass(w.category, ReluDoctorWarning)]


# ---------------------------------------------------------------------- checkpointing


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.block = zoo.BasicBlock(8)
        self.reentrant = reentrant
        self.use_checkpoint = True

    def forward(self, x):
        x = self.stem(x)
        if self.use_checkpoint:
            return checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.block(x)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpoint_recomputation_is_not_counted_twice(run_watched, reentrant):
    """The recomputed forward runs the ReLU hooks again during backward; relu_doctor must
    count each call once. Compared with the reference on an unchanged copy run plainly."""
    model = Checkpointed(reentrant)
    plain = copy.deepcopy(model)
    plain.use_checkpoint = False
    case = zoo.Case("checkpointed", lambda: model, lambda n: torch.randn(n, 3, 6, 6))
    torch.manual_seed(3)
    watched = run_watched(case, steps=3)
    torch.manual_seed(3)
    reference = run_watched(zoo.Case("plain", lambda: plain, case.batch), steps=3)
    names = ref.site_names(reference.recorder)
    assert {s.name for s in watched.doc.probe.sites()} == set(names.values())
    for key, capture in reference.recorder.calls.items():
        site = watched.doc.probe.site(names[key])
        total = (site.stats.window + site.stats.lifetime).numpy()
        got = {name: total[i] for i, name in enumerate(FIELDS)}
        ref.assert_stats_match(got, ref.expected_stats(capture, 1), f"checkpointed {site.name}")
    assert np.isfinite(watched.doc.to_pandas()["grad_rms"]).all()


class _WithGuest(nn.Module):
    """A net whose forward also runs a guest model that is not one of its submodules (an
    EMA teacher or a target network kept in a list), inside the watched model's pass."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
        self.guest: list[nn.Module] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.relu(self.net(x))
        for g in self.guest:
            y = y + g(x)
        return y


def test_a_deep_copy_of_a_watched_model_is_not_watched() -> None:
    """copy.deepcopy of a watched model copies its modules' hook dicts: before, the copy's
    activations were recorded into the original's sites (run inside its pass) and the copy
    carried a copy of the probe; then its hooks kept calling the original probe (which left
    its modules alone), keeping the run alive as long as the copy lived. Now the copy's
    hooks are placeholders holding nothing of the run, which take themselves out at their
    first call: the original's counts equal a reference taken on its own activations,
    whatever the copy does."""
    torch.manual_seed(0)
    model = _WithGuest()
    seen: list[torch.Tensor] = []  # the reference: the original's activations
    relu = model.net[1]
    relu.register_forward_hook(  # (copied into the copies too: they are left out here)
        lambda m, a, out: seen.append(out.detach().clone()) if m is relu else None
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with relu_doctor.watch(model, every_n_steps=1, overhead_budget=None, log_every_n_steps=100) as doc:
        model(torch.randn(5, 4)).sum().backward()
        doc.step()
        twin = copy.deepcopy(model)
        guest = copy.deepcopy(model.net)
        def owners(m: nn.Module) -> set[int]:  # the owners of the objects that hook m
            hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
            return {id(h.__self__.owner) for h in hooks if hasattr(h, "__self__")}

        assert id(doc.probe) in owners(model) and id(doc.probe) not in owners(twin)
        model.guest.append(guest)  # runs inside the watched model's pass
        for _ in range(3):
            x = torch.randn(5, 4)
            opt.zero_grad()
            model(x).sum().backward()
            twin(x).sum().backward()  # a copy trained on its own, in train mode with grad
            opt.step()
            doc.step()
        # The guest is any module the forward calls from outside the model: its F.relu
        # (inside its nn.ReLU) is a site of its own, named after its class (see README).
        names = sorted(s.name for s in doc.sites)
        assert names == ["(root):relu#0", "Sequential#0:relu#0", "net.1"]
        site = next(s for s in doc.sites if s.name == "net.1")
        total = site.stats.lifetime + site.stats.window
        assert len(seen) == 4
        h = torch.cat(seen)
        assert total[FIELDS.index("elements")].tolist() == [float(len(h))] * 8
        assert total[FIELDS.index("active")].tolist() == (h > 0).sum(0).double().tolist()
        # The copy's placeholders took themselves out: only the user's hook is left.
        assert not twin._forward_pre_hooks and not twin.net[0]._forward_hooks
        users = [h for h in relu._forward_hooks.values() if not hasattr(h, "__self__")]
        assert len(users) == 1 and list(twin.net[1]._forward_hooks.values()) == users
    twin(torch.randn(2, 4)).sum().backward()  # after detach: the copy runs as before


class _Distilled(_WithGuest):
    """A student whose forward runs a frozen teacher held outside its modules (the guest)
    and, for a consistency target, its own net on a second view, both under
    ``torch.no_grad()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.net(x.flip(0)) + sum(g(x) for g in self.guest)
        return (torch.nn.functional.relu(self.net(x)) - target).pow(2)


def _dead_units(outputs: list[torch.Tensor]) -> int:
    """The reference: units (last dim) that never fired in ``outputs``."""
    return int((torch.cat(outputs).flatten(0, -2) > 0).sum(0).eq(0).sum())


def test_a_site_no_gradient_reaches_is_told_so_and_left_alone(tmp_path) -> None:
    """A trial's frozen teacher, held outside the model and called under torch.no_grad() in
    its forward, was a site like any other: its dead units a critical finding advising
    recycling and F.leaky_relu. No gradient reaches it, so no remedy of training can change
    it: its row is frozen (NO_GRADIENT), its unit findings information saying so, and
    recycling leaves it out. The model's own trainable net called under no_grad too (a
    consistency target) is no such site: its units train through its other call."""
    from relu_doctor.remedies import DormantRecycler
    from relu_doctor.sites import NO_GRADIENT

    torch.manual_seed(0)
    model = _Distilled()
    teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6)).requires_grad_(False)
    with torch.no_grad():
        teacher[0].bias.fill_(-50.0)  # every unit dead: the reference below says so too
    model.guest.append(teacher)
    seen: list[torch.Tensor] = []
    teacher[1].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with relu_doctor.watch(model, optimizer=opt, every_n_steps=1, overhead_budget=None,
                           log_every_n_steps=4, run_dir=tmp_path) as doc, \
            warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        events: list[dict[str, Any]] = []
        doc.add_event_listener(events.append)
        DormantRecycler(model, optimizers=opt).bind(doc)
        for _ in range(8):
            opt.zero_grad()
            model(torch.randn(16, 4)).sum().backward()
            opt.step()
            doc.step()
    frame = doc.to_pandas().set_index("site")
    assert sorted(frame.index) == ["(root):relu#0", "Sequential#0:relu#0", "net.1#0", "net.1#1"]
    assert frame.loc["Sequential#0:relu#0", "frozen"] == NO_GRADIENT
    assert frame.loc["Sequential#0:relu#0", "dead"] == _dead_units(seen) == 8
    assert frame.drop("Sequential#0:relu#0")["frozen"].isna().all()
    about = [f for f in doc.findings() if f.site == "Sequential#0:relu#0"]
    assert {f.kind for f in about} >= {"dead", "lifetime_dead"}
    for f in about:
        assert f.severity == "info" and f.evidence["no_gradient"] is True, f
        assert "no gradient reached it" in f.message and "recycl" not in f.remedy.split(
            "(")[0], f
    assert not [e for e in events if "Sequential#0" in str(e)]  # (nor tried, nor declined)
    assert not [w for w in said if "Sequential#0" in str(w.message)]
    from relu_doctor.history import load_run
    from relu_doctor.reports import build_context, summary
    from relu_doctor.reports.html import render_context

    ctx = build_context(load_run(tmp_path))
    assert "frozen: no gradient reached it" in render_context(ctx)
    assert "reached by no gradient; no remedy acts there): Sequential#0:relu#0" in summary(ctx)


class _Byol(nn.Module):
    """An online net and its target, an EMA copy left with requires_grad=True (as
    ``torch.optim.swa_utils.AveragedModel`` leaves it), run under no_grad() in one forward."""

    def __init__(self, averaged: bool) -> None:
        super().__init__()
        self.online = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        if averaged:
            self.target: nn.Module = torch.optim.swa_utils.AveragedModel(self.online)
        else:
            self.target = copy.deepcopy(self.online)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.target(x.flip(0))
        return (self.online(x) - target).pow(2).mean()


@pytest.mark.parametrize("averaged", [False, True], ids=["deepcopy", "AveragedModel"])
def test_an_ema_target_left_with_requires_grad_is_told_no_gradient_and_left_alone(
        averaged: bool) -> None:
    """A trial's BYOL target, an EMA copy with requires_grad=True that no optimizer holds,
    run under no_grad() beside the online net, had its dead units advised recycling and a
    swap, and a bound DormantRecycler and ActivationSwapper acted on it (the online net
    kept ReLU). Its producing layers got no gradient from the optimizer in the window:
    '(no gradient)', information only, left alone. Without an optimizer that is not known,
    and the site is judged as before. The dead counts are the reference hook's."""
    from relu_doctor.remedies import ActivationSwapper, DormantRecycler
    from relu_doctor.sites import NO_GRADIENT

    torch.manual_seed(0)
    model = _Byol(averaged)
    first = model.target.module[0] if averaged else model.target[0]
    act = model.target.module[1] if averaged else model.target[1]
    with torch.no_grad():
        first.bias[:10] = -50.0  # (10 of 16 target units dead)
    name = "target.module.1" if averaged else "target.1"
    seen: list[torch.Tensor] = []
    act.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    weights = {k: v.clone() for k, v in model.target.state_dict().items()}
    opt = torch.optim.SGD(model.online.parameters(), lr=1e-3)
    for with_optimizer in (True, False):
        seen.clear()
        events: list[dict[str, Any]] = []
        with relu_doctor.watch(model, optimizer=opt if with_optimizer else None,
                               every_n_steps=1, overhead_budget=None,
                               log_every_n_steps=2) as doc:
            doc.add_event_listener(events.append)
            if with_optimizer:
                DormantRecycler(model, optimizers=opt).bind(doc)
                ActivationSwapper(model, threshold=0.3, patience=1).bind(doc)
            for _ in range(4):
                opt.zero_grad()
                model(torch.randn(16, 4)).backward()
                opt.step()
                doc.step()
        frame = doc.to_pandas().set_index("site")
        assert frame.loc[name, "dead"] == _dead_units(seen[-8:]) == 10  # (the last window's)
        assert frame.loc["online.1", "frozen"] is None
        dead = next(f for f in doc.findings() if f.kind == "dead" and f.site == name)
        if with_optimizer:
            assert frame.loc[name, "frozen"] == NO_GRADIENT
            assert dead.severity == "info" and dead.evidence["no_gradient"] is True
            assert not [e for e in events if name in str(e)]  # (nor tried, nor declined)
            assert isinstance(act, nn.ReLU) and (model.target.module if averaged
                                                  else model.target)[1] is act
            assert all(torch.equal(v, weights[k]) for k, v in model.target.state_dict().items()
                       if k != "n_averaged")
        else:
            assert frame.loc[name, "frozen"] is None and dead.severity != "info"


def test_a_layer_that_trained_in_the_window_is_no_frozen_feed() -> None:
    """A review: a GAN's critic, watched on its own, its requires_grad turned off for the
    generator's step (the usual loop) and so at every log, read as a model nothing of which
    trains: its dead units information, no remedy. Whether a layer trained is what the
    optimizer read a gradient for in the window; the dead count is the reference's."""
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
    critic = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        critic[0].bias[:10] = -100.0
    seen: list[torch.Tensor] = []
    critic[1].register_forward_hook(
        lambda m, a, out: seen.append(out.detach().clone()) if torch.is_grad_enabled() else None)
    opt_c, opt_g = (torch.optim.SGD(m.parameters(), lr=1e-3) for m in (critic, gen))
    with relu_doctor.watch(critic, optimizer=opt_c, every_n_steps=1, overhead_budget=None,
                           log_every_n_steps=2) as doc:
        for _ in range(2):
            critic.requires_grad_(True)
            opt_c.zero_grad()
            (critic(gen(torch.randn(16, 4)).detach()).mean()
             - critic(torch.randn(16, 8)).mean()).backward()
            opt_c.step()
            critic.requires_grad_(False)  # frozen for the generator's step
            opt_g.zero_grad()
            (-critic(gen(torch.randn(16, 4))).mean()).backward()
            opt_g.step()
            doc.step()
    row = doc.to_pandas().set_index("site").loc["1"]
    assert row["frozen"] is None and row["dead"] == _dead_units(seen) >= 10
    assert {f.severity for f in doc.findings() if f.kind == "dead"} == {"warning"}


class _Shuffle(nn.Module):
    """conv -> pixel_shuffle -> ReLU (no producer found through the shuffle): an
    activation module, or F.relu in its own forward."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.conv, self.functional = nn.Conv2d(3, 16, 3, padding=1), functional
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.pixel_shuffle(self.conv(x), 2)
        return torch.nn.functional.relu(h) if self.functional else self.act(h)


class _Consistent(nn.Module):
    """The block called on a second view under no_grad() for a consistency target, then
    with gradients: two calls of the same units in one pass."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.block = _Shuffle(functional)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.block(x.flip(0))
        return (self.block(x) - target).pow(2).mean()


@pytest.mark.parametrize(("functional", "names"), [
    (False, ["block.act#0", "block.act#1"]), (True, ["block:relu#0", "block:relu#1"])],
    ids=["module", "functional"])
def test_a_call_another_call_of_which_got_a_gradient_is_not_frozen(
        functional: bool, names: list[str]) -> None:
    """Reviews: a consistency target computed under no_grad() by the model's own layers,
    whose producer is not found (a pixel shuffle between), was frozen '(no gradient)',
    though the same units train through the other call (so a second reentrant checkpoint
    segment, whose gradient is pooled into the first's): an activation module's calls are
    pooled, and a module's functional calls of one op (two different F.relu calls in one
    forward, one of a frozen target's, are then not told apart either: a site said frozen
    that trains would hide it)."""
    torch.manual_seed(0)
    model = _Consistent(functional)
    with torch.no_grad():
        model.block.conv.bias[:4] = -100.0
    with relu_doctor.watch(model, every_n_steps=1, overhead_budget=None,
                           log_every_n_steps=2) as doc:
        for _ in range(2):
            model(torch.randn(2, 3, 4, 4)).backward()
            doc.step()
    frame = doc.to_pandas().set_index("site")
    assert sorted(frame.index) == names
    assert frame["frozen"].isna().all()
    assert all(f.severity != "info" for f in doc.findings() if f.kind == "dead")


def test_a_layer_whose_requires_grad_was_off_at_its_step_but_trained_is_no_frozen_feed(
) -> None:
    """A review: a loop turning the critic's requires_grad off for the generator's
    backward and stepping both optimizers at the end trains the critic (its weights move),
    but its gradient was read while it did not require grad: it read as frozen. A layer
    with a gradient above 0 in the window trained in it."""
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    critic = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    opt_c, opt_g = (torch.optim.SGD(m.parameters(), lr=1e-2) for m in (critic, gen))
    with relu_doctor.watch(critic, optimizer=opt_c, every_n_steps=1, overhead_budget=None,
                           log_every_n_steps=2) as doc:
        for _ in range(2):
            opt_c.zero_grad()
            opt_g.zero_grad()
            critic.requires_grad_(True)
            critic(gen(torch.randn(8, 4)).detach()).mean().backward()
            critic.requires_grad_(False)
            (-critic(gen(torch.randn(8, 4))).mean()).backward()
            before = critic[0].weight.detach().clone()
            opt_c.step()  # (its requires_grad off now; it trains all the same)
            opt_g.step()
            assert not torch.equal(before, critic[0].weight)
            doc.step()
    assert doc.to_pandas().set_index("site").loc["1", "frozen"] is None


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_layer_frozen_mid_training_is_frozen_whatever_its_stale_gradient(
        set_to_none: bool) -> None:
    """A review: a backbone frozen after two steps, its gradients zeroed with
    set_to_none=False, kept a zero .grad the optimizer read at every step, which counted
    as having trained. Only a gradient read while the layer required grad counts."""
    torch.manual_seed(0)
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    model.head = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with relu_doctor.watch(model, optimizer=opt, every_n_steps=1, overhead_budget=None,
                           log_every_n_steps=2) as doc:
        for step in range(4):
            if step == 2:
                model.backbone.requires_grad_(False)
            opt.zero_grad(set_to_none=set_to_none)
            model.head(model.backbone(torch.randn(8, 4))).pow(2).mean().backward()
            opt.step()
            doc.step()
    assert doc.to_pandas().set_index("site").loc["backbone.1", "frozen"] == "backbone.0"


def test_a_frozen_network_in_eval_mode_computing_a_loss_is_not_warned_of() -> None:
    """A review: a frozen feature network in eval mode, called with gradients on to
    compute a perceptual loss (the generator needs them), was told to run under no_grad().
    A part with nothing that trains is left out without a warning; one that trains in eval
    mode is said once."""
    model = nn.Module()
    model.G = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model.F = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, every_n_steps=1, overhead_budget=None) as doc:
            for frozen in (True, False):
                model.F.requires_grad_(not frozen).eval()
                model.F(model.G(torch.randn(2, 4))).sum().backward()
                doc.step()
                told = [w for w in said if "in eval mode" in str(w.message)]
                assert len(told) == (0 if frozen else 1)
    assert [s.name for s in doc.sites] == ["G.1"]


@pytest.mark.parametrize("stream", ["all", "eval"])
def test_a_model_nothing_of_which_trains_is_frozen_throughout(stream: str) -> None:
    """A trial watched a model of which nothing trains (a frozen teacher, on its own) with
    stream="all": its dead units were critical findings advising recycling. Its layers are
    the whole model's, and the whole model does not train: every site is a frozen feed
    (stream="all" and "eval" alike: the rule reads the weights, not the passes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    model.requires_grad_(False)
    with torch.no_grad():
        model[0].bias[:3] = -50.0
    if stream == "eval":
        model.eval()
    seen: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    with relu_doctor.watch(model, stream=stream, every_n_steps=1, overhead_budget=None,
                           log_every_n_steps=4) as doc:
        for _ in range(4):
            with torch.no_grad() if stream == "eval" else contextlib.nullcontext():
                model(torch.randn(16, 4))
            doc.step()
    frame = doc.to_pandas().set_index("site")
    assert frame["frozen"].to_dict() == {"1": "0", "3": "2"}
    assert frame.loc["1", "dead"] == _dead_units(seen) == 3
    dead = [f for f in doc.findings() if f.kind == "dead"]
    assert dead and all(f.severity == "info" and f.evidence["frozen_layer"] == "0"
                        for f in dead)


@pytest.mark.parametrize("grad", [True, False])
def test_a_deep_copy_with_keyword_hooks_runs_an_ema_as_the_original(grad: bool) -> None:
    """The hooks that take the forward's keyword arguments (ReDo's input tap, the padding
    mask's reader) became, in a deep copy, their class's methods bound to a placeholder; the
    first placeholder called took every flag out, so torch called the next without its
    kwargs: an EMA copy (timm's ModelEmaV2) raised TypeError in its first forward (a
    trial). The copy runs as the original would, and its placeholders take themselves out."""
    from relu_doctor.remedies import DormantRecycler

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with relu_doctor.watch(model, optimizer=opt, padding_mask=lambda a, k: None) as doc:
        DormantRecycler(model, optimizers=opt).bind(doc)
        for _ in range(2):  # copied before the first step, and after it
            ema = copy.deepcopy(model).eval()
            x = torch.randn(2, 3, 8, 8)
            with torch.set_grad_enabled(grad):
                assert torch.equal(ema(x), model.eval()(x))
                ema(x)  # its placeholders are gone: torch's fast path
            assert not any(m._forward_pre_hooks or m._forward_hooks for m in ema.modules())
            model.train()
            opt.zero_grad()
            model(torch.randn(2, 3, 8, 8)).sum().backward()
            opt.step()
            doc.step()


_SAVE_WATCHED = """
import sys, torch, torch.nn as nn, relu_doctor
from relu_doctor.remedies import DormantRecycler
path, when = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
every = 1 if when == 'collecting' else 3
with relu_doctor.watch(model, every_n_steps=every, overhead_budget=None, optimizer=opt) as doc:
    if when == 'collecting':
        DormantRecycler(model, optimizers=opt, every=1000).bind(doc)  # a with_kwargs pre-hook
    for _ in range(2 if when == 'collecting' else 1):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        doc.step()
    assert doc.probe.hooks.parked == (when == 'parked')
    torch.save(model, path)  # collecting: our hooks in the dicts; parked: their flags only
"""

_RESAVE_UNCALLED = """
import sys, torch
torch.save(torch.load(sys.argv[1], weights_only=False), sys.argv[1])
"""

_LOAD_IN_A_NEW_PROCESS = """
import sys, torch
loaded = torch.load(sys.argv[1], weights_only=False)
mods = list(loaded.modules())
pickled = {k for m in mods for d in (m._forward_pre_hooks, m._forward_hooks) for k in d}
flagged = {k for m in mods for d in (m._forward_pre_hooks_with_kwargs,
           m._forward_hooks_always_called) for k in d}
assert flagged, 'nothing to check'
seen = []
plain = [m.register_forward_pre_hook(lambda m, a: seen.append('pre')) for m in mods]
kw = loaded.register_forward_pre_hook(lambda m, a, k: seen.append('kw'), with_kwargs=True)
post = [m.register_forward_hook(lambda m, a, o: seen.append('post')) for m in mods]
always = loaded.register_forward_hook(lambda m, a, o: seen.append('always'), always_call=True)
ids = [h.id for h in [*plain, kw, *post, always]]
assert min(ids) > max(pickled | flagged), (ids, pickled, flagged)  # none takes our flags
try:
    loaded(torch.randn(3, 5))  # raises in the first Linear: only always-called hooks run
except RuntimeError:
    pass
assert seen.count('post') == 0 and seen.count('always') == 1, seen
seen.clear()
loaded(torch.randn(3, 4))
assert seen.count('pre') == seen.count('post') == len(mods) and seen.count('kw') == 1, seen
def applying(flags):  # the flags torch reads: those of a hook in the dict beside them
    return {k for m in mods for d, f in flags(m) for k in f if k in d}
assert applying(lambda m: [(m._forward_pre_hooks, m._forward_pre_hooks_with_kwargs)]) == {kw.id}
assert applying(lambda m: [(m._forward_hooks, m._forward_hooks_always_called)]) == {always.id}
assert not any(k in pickled for m in mods for d in (m._forward_pre_hooks, m._forward_hooks)
               for k in d)
print('ok')
"""


@pytest.mark.parametrize("when", ["collecting", "parked", "collecting, saved again"])
def test_a_model_saved_while_watched_loads_in_a_new_process_without_stale_flags(
    tmp_path, when: str
) -> None:
    """A module pickles its hook dicts' flags (``with_kwargs``, ``always_call``) by handle
    id, and ids restart from 0 in a new process: a hook registered there on the loaded model
    could take a placeholder's id and its flags (a plain pre-hook called with kwargs raises
    TypeError; a plain forward hook runs when the forward raises). Saved in one new process
    (on a collecting step, on a step whose hooks are parked, or loaded and saved again
    uncalled in a second process) and loaded in another, each with its ids from 0: every
    hook the loading process registers gets an id past the pickled ones, each hook is
    called as registered, and after the first call only the user's flags apply."""
    import subprocess
    import sys

    path = str(tmp_path / "model.pt")
    steps = [(_SAVE_WATCHED, when.split(",")[0])]
    if "again" in when:
        steps.append((_RESAVE_UNCALLED, ""))
    for code, arg in [*steps, (_LOAD_IN_A_NEW_PROCESS, "")]:
        done = subprocess.run(
            [sys.executable, "-c", code, path, arg], capture_output=True, text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_a_doctor_refuses_pickle_and_copies_as_itself() -> None:
    """Only the model's hook dicts pickle harmlessly. Pickling a Doctor (or its probe,
    functional capture or ReDo's input tap) gave a Doctor that watched nothing, silently;
    now it is a TypeError that says what works instead. ``copy.copy``/``copy.deepcopy`` give
    the object itself, so a deep copy of a Trainer or callback holding one still works (as
    it did before), sharing the monitor rather than cloning half of it."""
    import pickle

    from relu_doctor.remedies import DormantRecycler

    model = _WithGuest()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with relu_doctor.watch(model, every_n_steps=1, overhead_budget=None, optimizer=opt) as doc:
        recycler = DormantRecycler(model, optimizers=opt, every=1000).bind(doc)
        model(torch.randn(5, 4)).sum().backward()
        doc.step()
        owners = [doc, doc.probe, doc._capture, recycler._finder._tap]
        for obj in owners:
            with pytest.raises(TypeError, match=r"can't be pickled\. torch\.save\(model\)"):
                pickle.dumps(obj)
            assert copy.copy(obj) is obj and copy.deepcopy(obj) is obj
        holder = copy.deepcopy({"doctor": doc, "recycler": recycler})
        assert holder["doctor"] is doc and holder["recycler"].doctor is doc
        copy.deepcopy(model)  # the model itself still copies and pickles
        pickle.dumps(model)


def test_a_watched_model_pickles_mid_run() -> None:
    """``torch.save(model)`` inside ``watch``, on a collecting step, raised: the hook dicts
    held closures and bound methods of the probe. Now the model saves with every hook of
    relu_doctor (module, functional, ReDo's input tap) as an inert placeholder; the loaded
    model computes what the original does and sheds the placeholders at its first call; and
    saving changes nothing in the run: the original trains as an unwatched twin does, and
    its counts equal a reference taken on its own activations."""
    import io

    from relu_doctor._hooks import Inert
    from relu_doctor.remedies import DormantRecycler

    torch.manual_seed(0)
    model = _WithGuest()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.05)
    seen: list[torch.Tensor] = []
    with relu_doctor.watch(model, every_n_steps=1, optimizer=opt, log_every_n_steps=2) as doc:
        DormantRecycler(model, optimizers=opt, every=1000).bind(doc)  # (its tap only)
        for _ in range(4):
            x = torch.randn(5, 4)
            with torch.no_grad():
                seen.append(twin.net[1](twin.net[0](x)))  # the site's activations
            for m, o in ((model, opt), (twin, opt_twin)):
                o.zero_grad()
                m(x).sum().backward()
                o.step()
            doc.step()
            buf = io.BytesIO()
            torch.save(model, buf)  # on a collecting step: our hooks are in the dicts
            buf.seek(0)
            loaded = torch.load(buf, weights_only=False)
            ours = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
            hooked = [m for m in loaded.modules() if m._forward_pre_hooks or m._forward_hooks]
            assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in hooked) == ours
            assert ours >= 9 and all(  # probe 3, functional capture 2, ReDo's tap 2 or more
                {type(getattr(h, "__self__", None)) for h in
                 [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]} == {Inert}
                for m in hooked
            )
            y = torch.randn(3, 4)
            with torch.no_grad():  # (no training pass: not counted)
                assert torch.equal(loaded(y), model(y))
            assert not any(m._forward_pre_hooks or m._forward_hooks for m in loaded.modules())
            # (the placeholders' flags stay, read by torch for no hook: none is in the dicts)
        site = next(s for s in doc.sites if s.name == "net.1")
        total = site.stats.lifetime + site.stats.window
        h = torch.cat(seen)
        assert total[FIELDS.index("elements")].tolist() == [float(len(h))] * 8
        assert total[FIELDS.index("active")].tolist() == (h > 0).sum(0).double().tolist()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)



class _FunctionalNorm(nn.Module):
    """A batch norm of running statistics held by no module (``F.batch_norm``, no weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.stats = (torch.zeros(8), torch.ones(8))  # (plain attributes: no buffer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(F.batch_norm(self.fc(x), *self.stats, training=False))


@pytest.mark.filterwarnings("ignore:.*ended without a call to doc.step")
@pytest.mark.parametrize("case", ["conv-bn-relu", "bn-dropout-relu", "bn-then-conv",
                                  "norms-of-units-together", "groupnorm-of-one-channel-a-group",
                                  "functional"])
def test_a_site_knows_the_norm_its_input_passed_last(case: str) -> None:
    """Site.norm: the norm of each unit on its own (which takes its mean away) between a
    site and the layer that makes its units, named as the model holds it (its dead units'
    advice names it, not that layer's bias: a U-Net's Conv-BN-ReLU was told to check a bias
    its conv did not have). Not a norm of the units together (the layer's bias still counts
    there), nor one a layer or such a norm came after. Checked against the models' own
    structure."""
    torch.manual_seed(0)
    shape: tuple[int, ...] = (2, 3, 6, 6)
    if case == "conv-bn-relu":
        model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        want = {"2": "BatchNorm2d `1`"}
    elif case == "bn-dropout-relu":
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.1), nn.ReLU())
        want = {"3": "BatchNorm2d `1`"}
    elif case == "bn-then-conv":
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                              nn.ReLU())
        want = {"2": "BatchNorm2d `1`", "4": ""}
    elif case == "norms-of-units-together":  # (the layer's bias still counts: not named)
        model, shape = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(),
                                     nn.Unflatten(1, (8, 1)), nn.GroupNorm(2, 8), nn.ReLU(),
                                     nn.Flatten(), nn.BatchNorm1d(8), nn.GroupNorm(2, 8),
                                     nn.ReLU()), (2, 4)
        want = {"2": "", "5": "", "9": ""}
    elif case == "groupnorm-of-one-channel-a-group":
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(4, 4), nn.GELU(),
                              nn.InstanceNorm2d(4, affine=True), nn.ReLU())
        want = {"2": "GroupNorm `1`", "4": "InstanceNorm2d `3`"}
    else:
        model, shape, want = _FunctionalNorm(), (2, 4), {"(root):relu#0": "F.batch_norm"}
    with relu_doctor.watch(model, log_every_n_steps=1, every_n_steps=1) as doc:
        model(torch.randn(*shape)).sum().backward()
        doc.step()
        state = doc.state_dict()
        assert {s.name: s.norm for s in doc.sites} == want
    with relu_doctor.watch(model, log_every_n_steps=1, every_n_steps=1) as resumed:
        resumed.load_state_dict(state)  # (part of the checkpoint's site description)
        assert {s.name: s.norm for s in resumed.sites} == want


@pytest.mark.parametrize("what", ["summed", "mixed"])
def test_a_resumed_doctor_knows_which_sites_take_a_residual_sum(what: str):
    """Site.summed (its input a residual sum: no recycling advised there) and Site.mixed (its
    input a norm of its units together: nor there) are part of the checkpoint's site
    description, as the producer is: a resumed Doctor, whose sites are made from it, would
    advise ReDo there again."""
    torch.manual_seed(0)
    if what == "summed":
        model, shape = zoo.ResNetish(), (2, 3, 6, 6)
    else:
        model, shape = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8),
                                     nn.ReLU()), (2, 4)
    with relu_doctor.watch(model, log_every_n_steps=2, every_n_steps=1) as doc:
        for _ in range(2):
            model(torch.randn(*shape)).sum().backward()
            doc.step()
        state = doc.state_dict()
        marked = {s.name: getattr(s, what) for s in doc.sites}
    assert sum(map(bool, marked.values())) == (2 if what == "summed" else 1)
    with relu_doctor.watch(model, log_every_n_steps=2, every_n_steps=1) as resumed:
        resumed.load_state_dict(state)
        assert {s.name: getattr(s, what) for s in resumed.sites} == marked


@pytest.mark.parametrize("when", ["before watch", "after watch"])
def test_a_hook_of_yours_that_replaces_the_output_changes_nothing_counted(when: str) -> None:
    """A forward hook that returns a new output (steering, patching), registered on the
    activation before ``watch``, ran before ours: the site read its output, not the ReLU's,
    and the gradient tap sat on its node, so every unit's dL/d(input) zero fraction read 0.
    Ours now run first however the two were registered: the ReLU's own output and dL/d(its
    input) are counted, as a reference on a plain graph computes them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    xs = [torch.randn(32, 6) for _ in range(3)]

    def steer(m: nn.Module, a: Any, out: torch.Tensor) -> torch.Tensor:
        return out * 2.0 - 0.1  # (changes which outputs are > 0 too)

    if when == "before watch":
        model[1].register_forward_hook(steer)
    with relu_doctor.watch(model, log_every_n_steps=len(xs), overhead_budget=None) as doc:
        if when == "after watch":
            model[1].register_forward_hook(steer)
        for x in xs:
            model(x).pow(2).sum().backward()
            doc.step()
    table = doc.unit_table("1")
    active, absum, zero_grad = torch.zeros(16), torch.zeros(16), torch.zeros(16)
    for x in xs:  # the reference: the same graph written out, the ReLU's input a leaf
        pre = model[0](x).detach().requires_grad_(True)
        raw = torch.relu(pre)
        model[2](raw * 2.0 - 0.1).pow(2).sum().backward()
        active += (raw > 0).sum(0)
        absum += raw.detach().abs().sum(0)
        zero_grad += (pre.grad == 0).sum(0)
    n = 32 * len(xs)
    assert table["activation_rate"].tolist() == pytest.approx((active / n).tolist())
    assert table["mean_abs"].tolist() == pytest.approx((absum / n).tolist(), rel=1e-5)
    assert table["grad_zero_rate"].tolist() == pytest.approx((zero_grad / n).tolist())
    assert 0 < float((zero_grad / n).mean()) < 1


def _said_over_steps(
    model: nn.Module, steps: int, step: Any
) -> tuple[list[str], relu_doctor.Doctor]:
    """``step(doc, i)`` for each step under ``watch`` (every step collected): the
    ReluDoctorWarnings said, and the Doctor."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=100, overhead_budget=None) as doc:
            for i in range(steps):
                step(doc, i)
    return [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)], doc


@pytest.mark.parametrize("steps_it", [True, False], ids=["step_called", "step_skipped"])
def test_a_forward_that_raises_between_calls_of_a_shared_module_is_no_layerdrop(
    steps_it: bool,
) -> None:
    """A forward that raised between two calls of a shared activation (caught by the loop,
    which goes on) ended its pass with one call: the warning that followed blamed LayerDrop
    or a branch and advised a module per layer. A pass an exception cut short is not
    compared."""
    torch.manual_seed(0)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(6, 8), nn.Linear(8, 8), nn.ReLU()
            self.boom = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.fc1(x))
            if self.boom:
                raise RuntimeError("a bug in the user's forward")
            return self.act(self.fc2(h))

    model = Shared()

    def step(doc: relu_doctor.Doctor, i: int) -> None:
        model.boom = i == 2
        try:
            model(torch.randn(4, 6)).sum().backward()
        except RuntimeError:
            if not steps_it:
                return
        doc.step()

    said, doc = _said_over_steps(model, 6, step)
    assert not [m for m in said if "in one recorded pass" in m], said
    assert sorted(s.name for s in doc.sites) == ["act#0", "act#1"]


def test_a_forward_returning_none_while_the_user_handles_an_exception_is_compared() -> None:
    """The check above leaves out a pass an exception cut short, not a pass that ran whole
    while the user's code handled an earlier exception (a forward called in an except
    block, returning None): its varying calls are still said (the review's case)."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.ReLU()
            self.skip = False

        def forward(self, x: torch.Tensor) -> None:
            h = self.act(self.fc(x))
            if not self.skip:
                h = self.act(self.fc(h))
            h.sum().backward()

    model = M()

    def step(doc: relu_doctor.Doctor, i: int) -> None:
        model.skip = i == 2
        try:
            raise ValueError("the user's retry logic")
        except ValueError:
            model(torch.randn(3, 4))
        doc.step()

    said, _ = _said_over_steps(model, 4, step)
    assert [m for m in said if "ran 2 times in one recorded pass and 1 in another" in m], said


class _Blocks(nn.Module):
    def __init__(self, n: int = 2, d: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.ReLU()) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x) + x
        return x


def _dead_by_path(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """(dead units, units) of every ReLU module on ``x``, by its path now: the reference."""
    out: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(
        lambda m, a, y, p=p: out.__setitem__(p, (int((y <= 0).all(0).sum()), y.shape[1])))
        for p, m in model.named_modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("change", ["insert", "delete"])
def test_modules_renumbered_without_setattr_are_watched_under_their_paths_now(change: str) -> None:
    """``ModuleList.insert`` and ``del`` on a ``Sequential`` renumber modules without torch's
    registration hook: an inserted block went unwatched and the sites after it kept their
    old names, reporting another module's numbers under them (a growing-model trial). Each
    log's dead units per site are checked against forward hooks on the modules at their
    paths then; the sites named anew are said, and their lifetime counts are the new
    module's."""
    torch.manual_seed(0)
    model = _Blocks(3)
    x = torch.randn(32, 8)
    with torch.no_grad():
        model.blocks[2][0].bias.fill_(-0.3)  # some dead units, unlike the others
    got: list[dict[str, tuple[int, int]]] = []
    want: list[dict[str, tuple[int, int]]] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=1, overhead_budget=None) as doc:
            for step in range(6):
                if step == 3:
                    if change == "insert":
                        dead = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
                        with torch.no_grad():
                            dead[0].weight.zero_()
                            dead[0].bias.fill_(-1.0)
                        model.blocks.insert(1, dead)
                    else:
                        del model.blocks[0]
                want.append(_dead_by_path(model, x))
                model(x).sum().backward()
                doc.step()
                rows = doc.records[-1].site_rows
                got.append({r["site"]: (int(r["dead"]), int(r["units_seen"]))
                            for r in rows if r["units_seen"]})
    assert got == want
    said = [str(w.message) for w in seen if "moved to other paths" in str(w.message)]
    assert len(said) == 1
    if change == "insert":  # blocks.1 is the new one; blocks.1.1 and blocks.2.1 named anew
        assert "'blocks.1.1'" in said[0] and "'blocks.2.1'" in said[0]
        life = {r["site"]: r["lifetime_dead"] for r in doc.records[-1].site_rows}
        assert life["blocks.1.1"] == 8  # never active since it came: all its units
    else:
        assert "'blocks.0.1'" in said[0] and "'blocks.1.1'" in said[0]


def test_a_module_wrapped_where_it_is_has_not_moved() -> None:
    """apply_activation_checkpointing after watch puts ``_checkpoint_wrapped_module`` into
    each wrapped block's paths: read as a renumbering, its sites' windows were dropped and
    a warning blamed an insert (a review). A wrapper's parts are no move."""
    wrapper = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    torch.manual_seed(0)
    model = _Blocks(2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=10, overhead_budget=None) as doc:
            for step in range(4):
                if step == 2:
                    wrapper.apply_activation_checkpointing(
                        model, check_fn=lambda m: isinstance(m, nn.Sequential))
                model(torch.randn(4, 8)).sum().backward()
                doc.step()
            kept = {s.name: int(s.stats.window[0].sum()) for s in doc.probe.sites()}
    assert not [w for w in seen if "moved to other paths" in str(w.message)]
    assert kept["blocks.0.1"] == kept["blocks.1.1"] == 2 * 4 * 8  # (its two steps' elements)
