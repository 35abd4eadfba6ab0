"""Activation swap (relu_doctor.remedies.swap): surgery checked element by element, the
policy on hand-made records, a pathology treated against the same seed untreated, and
module names that look like site names (``enc:act``, ``a#1``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relu_doctor
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.remedies import ActivationSwapper, restore_activation, swap_activation
from relu_doctor.sites import SiteKey
from tests.remedies.helpers import (
    classification,
    dead_fraction,
    events_of,
    half_dead,
    hidden,
    mlp,
    rec,
    site_row,
)
from tests.zoo import BasicBlock, odd_name_net

ODD_NAMES = ["enc:act", "a#1"]


def test_swap_keeps_positive_outputs_and_restores():
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(inplace=True), nn.Linear(16, 2))
    x = torch.randn(64, 4)
    with torch.no_grad():
        pre = net[0](x)
        before = net(x)
    rec_ = swap_activation(net, path="1", slope=0.2)
    assert isinstance(net[1], nn.LeakyReLU) and net[1].inplace and net[1].negative_slope == 0.2
    with torch.no_grad():
        act = net[1](pre.clone())
    assert torch.equal(act[pre > 0], pre[pre > 0])  # positive inputs: unchanged
    torch.testing.assert_close(act[pre <= 0], 0.2 * pre[pre <= 0])
    restore_activation(net, record=rec_)
    assert type(net[1]) is nn.ReLU
    with torch.no_grad():
        assert torch.equal(net(x), before)


def test_a_module_registered_under_two_names_is_said_shared_by_its_sites_only():
    """One ReLU held by two blocks is one module at two paths; its sites are named after the
    first path (``b1.act#0``, ``b1.act#1``): the swap says those, not the second path."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b1, self.b2 = nn.Sequential(nn.Linear(4, 6)), nn.Sequential(nn.Linear(6, 6))
            self.b1.act = self.b2.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b2.act(self.b2[0](self.b1.act(self.b1[0](x))))

    net = Net()
    with relu_doctor.watch(net, log_every_n_steps=1, overhead_budget=None) as doc:
        net(torch.randn(5, 4)).sum().backward()
        doc.step()
        names = [s.name for s in doc.sites]
        ev = ActivationSwapper(net).bind(doc).swap(names[1], step=1)
    assert names == ["b1.act#0", "b1.act#1"]
    assert ev.details["sites"] == names
    assert "shared by 2 sites (b1.act#0, b1.act#1)" in ev.what, ev.what
    assert isinstance(net.b1.act, nn.LeakyReLU) and net.b2.act is net.b1.act


def test_swap_shared_module_changes_every_site_and_probe_follows():
    torch.manual_seed(0)
    block = BasicBlock(4)
    x = torch.randn(8, 4, 6, 6)
    with relu_doctor.watch(block, log_every_n_steps=1, functional=True) as doc:
        seen = events_of(doc)
        block(x).sum().backward()
        doc.step()
        sw = ActivationSwapper(block).bind(doc)
        ev = sw.swap("relu#1", step=1)
        assert ev.details["shared"] and ev.details["sites"] == ["relu#0", "relu#1"]
        assert ev.site == "relu#1" and "shared by 2 sites" in ev.what
        # A swap called by hand is recorded too.
        assert [e["id"] for e in seen if e["type"] == "intervention"] == [ev.id]
        assert isinstance(block.relu, nn.LeakyReLU)
        block(x).sum().backward()
        record = doc.step()
        # The probe watches the new module: both sites still recorded, now leaky (and the
        # F.leaky_relu inside LeakyReLU.forward is not mistaken for a functional site).
        assert [r["site"] for r in record.site_rows] == ["relu#0", "relu#1"]
        assert [r["family"] for r in record.site_rows] == ["leaky_relu", "leaky_relu"]
        assert all(r["window_steps"] == 1 and r["elements"] > 0 for r in record.site_rows)
        # The follow-up event carries the metrics measured after the swap.
        result = [e for e in seen if e["type"] == "intervention_result"]
        assert (
            result and result[0]["ref"] == ev.id and result[0]["after"]["sparsity"] is not None
        )
        assert not sw.pending
        sw.restore()
        assert type(block.relu) is nn.ReLU
        block(x).sum().backward()
        record = doc.step()
        assert [r["family"] for r in record.site_rows] == ["relu", "relu"]


def test_swap_by_site_key_and_by_module_path_of_a_reused_module():
    block = BasicBlock(4)
    ev = ActivationSwapper(block).swap(SiteKey("relu", 1))
    assert isinstance(block.relu, nn.LeakyReLU) and ev.details["swap"]["paths"] == ["relu"]
    other = BasicBlock(4)
    sw = ActivationSwapper(other)
    sw.swap("relu")  # unbound: a module path
    assert list(sw.swaps) == ["relu"]
    sw.restore(SiteKey("relu", 1))
    assert type(other.relu) is nn.ReLU and not sw.swaps


def test_swap_replaces_a_module_registered_under_two_paths():
    act = nn.ReLU()
    net = nn.Sequential(nn.Linear(3, 3), act, nn.Linear(3, 3), act)
    rec_ = swap_activation(net, path="1")
    assert rec_.paths == ["1", "3"] and net[1] is net[3] and isinstance(net[3], nn.LeakyReLU)
    restore_activation(net, record=rec_)
    assert net[1] is act and net[3] is act


def test_prelu_swap_trains_its_slopes_and_undo_removes_them():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9**e)
    rec_ = swap_activation(
        net, path="1", kind="prelu", slope=0.25, num_parameters=6, optimizer=opt,
        schedulers=[sched],
    )
    slopes = net[1].weight
    assert isinstance(net[1], nn.PReLU) and slopes.shape == (6,)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"] == [slopes]
    assert opt.param_groups[1]["weight_decay"] == 0.0 and len(sched.base_lrs) == 2
    x = torch.randn(32, 4)
    w0 = slopes.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        sched.step()  # the extended scheduler steps both groups
    assert not torch.equal(slopes.detach(), w0)  # the slopes train
    assert opt.param_groups[1]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    restore_activation(net, record=rec_, schedulers=[sched])
    assert type(net[1]) is nn.ReLU and len(opt.param_groups) == 1 and slopes not in opt.state
    assert len(sched.base_lrs) == 1
    sched.step()


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (nn.LeakyReLU(), "already a leaky"),
        (nn.ReLU6(), "cap"),
        (nn.Linear(2, 2), "not a ReLU-family"),
    ],
)
def test_swap_refuses_what_it_cannot_swap(module, match):
    net = nn.Sequential(nn.Linear(2, 2), module)
    with pytest.raises(ReluDoctorError, match=match):
        swap_activation(net, path="1")


def test_swap_argument_errors_name_the_argument():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ReluDoctorError, match="kind: expected one of"):
        swap_activation(net, path="1", kind="elu")
    with pytest.raises(ReluDoctorError, match="slope"):
        swap_activation(net, path="1", slope=0.0)
    with pytest.raises(ReluDoctorError, match=r"path: the model has no module at 'nope'.*\['1'\]"):
        swap_activation(net, path="nope")
    with pytest.raises(ReluDoctorError, match="patience"):
        ActivationSwapper(net, patience=0)
    with pytest.raises(ReluDoctorError, match="functional call"):
        ActivationSwapper(net).swap(SiteKey("", 0, "relu"))
    with pytest.raises(ReluDoctorError, match="threshold"):
        ActivationSwapper(net, threshold=1.0)
    with pytest.raises(ReluDoctorError, match=r"model: expected a torch\.nn\.Module"):
        ActivationSwapper("net")  # type: ignore[arg-type]
    with pytest.raises(ReluDoctorError, match="path: expected a site name"):
        swap_activation(net, path=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        swap_activation(net, "1")  # type: ignore[misc]  # keyword-only after the model


def test_swapper_waits_for_patience_and_skips_leaky_sites():
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    sw = ActivationSwapper(net, threshold=0.5, patience=2, exclude="3")
    assert sw(rec(10, [site_row("1", 0.8), site_row("3", 0.9)])) == []
    assert sw(rec(20, [site_row("1", 0.2), site_row("3", 0.9)])) == []  # streak broken
    assert sw(rec(30, [site_row("1", 0.6), site_row("3", 0.9)])) == []
    events = sw(rec(40, [site_row("1", 0.7), site_row("3", 0.9)]))
    assert [e.site for e in events] == ["1"] and isinstance(net[1], nn.LeakyReLU)
    assert events[0].before["dead_fraction"] == 0.7 and events[0].step == 40
    assert events[0].details["reason"] == "dead_fraction > 0.5 for 2 consecutive readings"
    one = ActivationSwapper(nn.Sequential(nn.Linear(2, 4), nn.ReLU()), threshold=0.5, patience=1)
    (first,) = one(rec(10, [site_row("1", 0.8)]))
    assert first.details["reason"] == "dead_fraction > 0.5 for 1 consecutive reading"
    assert type(net[3]) is nn.ReLU  # excluded
    after = sw(rec(50, [site_row("1", 0.9, leaky=True), site_row("3", 0.9)]))
    assert [e.type for e in after] == ["intervention_result"]
    assert after[0].after["dead_fraction"] == 0.9


def test_swapper_leaves_a_functional_site_alone_with_a_warning():
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    sw = ActivationSwapper(net, threshold=0.5, patience=1)
    fn = SiteKey("", 0, "relu")
    rows = [site_row("(root):relu#0", 0.9)]
    with pytest.warns(UserWarning, match="leaving site '\\(root\\):relu#0' alone.*functional"):
        assert sw(rec(10, rows, keys={"(root):relu#0": fn})) == []
    assert sw(rec(20, rows, keys={"(root):relu#0": fn})) == []  # skipped from now on
    assert type(net[1]) is nn.ReLU


def test_swapper_state_round_trips_prelu_into_a_fresh_model():
    torch.manual_seed(0)
    net = mlp(4, 6, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sw = ActivationSwapper(net, kind="prelu", per_unit=False, optimizer=opt)
    sw.swap("3", step=5)
    net(torch.randn(8, 4)).sum().backward()
    opt.step()
    ckpt = {"swapper": sw.state_dict(), "model": net.state_dict(), "opt": opt.state_dict()}

    torch.manual_seed(1)
    fresh = mlp(4, 6, 1)
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    sw2 = ActivationSwapper(fresh, kind="prelu", optimizer=opt2)
    sw2.load_state_dict(ckpt["swapper"])  # first: the swaps make the model's keys match
    fresh.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert isinstance(fresh[3], nn.PReLU) and type(fresh[1]) is nn.ReLU
    assert list(sw2.swaps) == ["3"]
    assert sw2.pending == sw.pending and len(sw2.pending) == 1
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), net(x))


# ======================================================================= names that look like sites


@pytest.mark.parametrize("name", ODD_NAMES)
def test_swap_and_restore_a_module_whose_name_looks_like_a_site(name):
    net = odd_name_net(name)
    rec_ = swap_activation(net, path=name)
    assert isinstance(net.get_submodule(name), nn.LeakyReLU) and rec_.paths == [name]
    restore_activation(net, record=rec_)
    sw = ActivationSwapper(net)
    assert sw.swap(name).site == name  # unbound: the module path, as written
    sw.restore(name)
    assert type(net.get_submodule(name)) is nn.ReLU


@pytest.mark.parametrize("name", ODD_NAMES)
def test_swapper_treats_a_dead_site_whose_name_looks_like_a_site(name):
    torch.manual_seed(0)
    net = half_dead(odd_name_net(name))
    x = torch.randn(32, 4)
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        seen = events_of(doc)
        sw = ActivationSwapper(net, threshold=0.3, patience=1, include=name).bind(doc)
        net(x).sum().backward()
        doc.step()
        assert list(sw.swaps) == [name] and isinstance(net.get_submodule(name), nn.LeakyReLU)
        ivs = [e for e in seen if e["type"] == "intervention"]
        assert [(e["site"], e["details"]["sites"]) for e in ivs] == [(name, [name])]
        assert ivs[0]["before"]["dead_fraction"] == 0.5
        net(x).sum().backward()
        doc.step()
        assert [e["site"] for e in seen if e["type"] == "intervention_result"] == [name]
        (ev,) = sw.restore(name, step=2)  # bound: the site's name
        assert ev.site == name and ev.details["undo"] is True
    assert type(net.get_submodule(name)) is nn.ReLU


# ======================================================================= pathology, treated vs not


def test_leaky_swap_revives_units_an_lr_burst_killed():
    """SGD at lr 6 for five steps kills most units of the second layer; with LeakyReluSwap
    the dead site gets gradient again and its units come back."""
    x, y = classification(1)
    xt, yt = classification(2)

    def run(treat: bool) -> tuple[float, float, list[str]]:
        torch.manual_seed(0)
        net = mlp()
        opt = torch.optim.SGD(net.parameters(), lr=6.0)
        with relu_doctor.watch(net, log_every_n_steps=10) as doc:
            sw = (
                ActivationSwapper(net, threshold=0.3, patience=2, slope=0.3).bind(doc)
                if treat
                else None
            )
            for step in range(250):
                if step == 5:
                    opt.param_groups[0]["lr"] = 0.3
                i = torch.randint(0, len(x), (64,))
                opt.zero_grad()
                F.cross_entropy(net(x[i]), y[i]).backward()
                opt.step()
                doc.step()
        with torch.no_grad():
            loss = float(F.cross_entropy(net(xt), yt))
        return dead_fraction(hidden(net, xt)[1]), loss, list(sw.swaps) if sw else []

    dead_u, loss_u, _ = run(False)
    dead_t, loss_t, swapped = run(True)
    print(f"dead fraction {dead_u:.3f} -> {dead_t:.3f}, loss {loss_u:.3f} -> {loss_t:.3f}")
    assert swapped and "3" in swapped
    assert dead_u > 0.4  # the pathology, untreated
    assert dead_t < dead_u - 0.3, (dead_u, dead_t)
    assert loss_t < loss_u, (loss_u, loss_t)


def test_restore_names_the_swaps_sites_at_the_doctors_step():
    """Regression: restore() recorded step 0 and site ``relu`` where the swap of the shared
    module was recorded as ``relu#0`` (and ``relu#1``) at the doctor's step."""
    block = BasicBlock(4)
    x = torch.randn(2, 4, 5, 5)
    with relu_doctor.watch(block, log_every_n_steps=1) as doc:
        seen = events_of(doc)
        sw = ActivationSwapper(block).bind(doc)
        for _ in range(3):
            block(x).sum().backward()
            doc.step()
        swap = sw.swap("relu#0", step=doc.global_step)
        block(x).sum().backward()
        doc.step()
        (undo,) = sw.restore("relu#0")
    assert (swap.site, swap.details["sites"]) == ("relu#0", ["relu#0", "relu#1"])
    assert (undo.site, undo.details["sites"], undo.step) == ("relu#0", ["relu#0", "relu#1"], 4)
    assert undo.step == doc.global_step != 0
    recorded = [e for e in seen if e["type"] == "intervention"]
    assert [(e["site"], e["step"]) for e in recorded] == [("relu#0", 3), ("relu#0", 4)]
    # round trip: a swap restored after a checkpoint still names its sites
    sw2 = ActivationSwapper(BasicBlock(4))
    sw2.swap("relu")
    state = sw2.state_dict()
    sw3 = ActivationSwapper(BasicBlock(4))
    sw3.load_state_dict(state)
    assert [e.site for e in sw3.restore(step=7)] == ["relu"]


@pytest.mark.parametrize("copy", ["same", "deepcopy", "torch.load"])
def test_a_swap_made_before_a_swapper_is_its_own_from_the_start(copy, tmp_path):
    """A swapper built on a model swapped before (a later run's callback, an EMA copy, a
    model saved whole and loaded) holds those swaps from the start: its checkpoints keep
    them, and loading one leaves them (a review: its state listed none, so loading its own
    checkpoint undid a LeakyReLU the weights had trained with). A state saved before a swap
    still undoes it."""
    import copy as copying

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    before = ActivationSwapper(net).state_dict()  # saved before the swap
    ActivationSwapper(net).swap("1")
    if copy == "deepcopy":
        net = copying.deepcopy(net)
    elif copy == "torch.load":
        torch.save(net, tmp_path / "net.pt")
        net = torch.load(tmp_path / "net.pt", weights_only=False)
    later = ActivationSwapper(net)
    saved = later.state_dict()
    assert [d["path"] for d in saved["swaps"]] == ["1"]
    ActivationSwapper(net).load_state_dict(saved)
    assert isinstance(net[1], nn.LeakyReLU)
    with pytest.warns(ReluDoctorWarning, match="saved before the LeakyReLU swap of '1'"):
        ActivationSwapper(net).load_state_dict(before)
    assert isinstance(net[1], nn.ReLU)


def test_a_swapper_takes_only_the_swaps_of_its_kind_at_its_sites():
    """Two swappers on one model (LeakyReLU at '1', PReLU at '3'): a later run's pair took
    every marked swap, each its own, and loading each one's own checkpoint undid the other's
    (a review). A swapper takes the swaps of its kind at its sites; an adopted PReLU's
    slopes get their param group in its optimizer, and leave with the swap."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    ActivationSwapper(net, include="1").swap("1")
    ActivationSwapper(net, kind="prelu", include="3").swap("3")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    leaky = ActivationSwapper(net, include="1")
    prelu = ActivationSwapper(net, kind="prelu", include="3", optimizer=opt)
    assert (list(leaky.swaps), list(prelu.swaps)) == (["1"], ["3"])
    assert ActivationSwapper(net, include="3").swaps == {}  # another kind there
    slopes = {id(p) for p in net[3].parameters()}
    assert sum(id(p) in slopes for g in opt.param_groups for p in g["params"]) == 1
    for sw in (leaky, prelu):
        sw.load_state_dict(sw.state_dict())
    assert isinstance(net[1], nn.LeakyReLU) and isinstance(net[3], nn.PReLU)
    prelu.restore()
    assert isinstance(net[3], nn.ReLU) and isinstance(net[1], nn.LeakyReLU)
    assert not any(id(p) in slopes for g in opt.param_groups for p in g["params"])


def test_a_swap_whose_module_was_replaced_since_is_dropped_not_raised():
    """The user replaced a swapped module (by a GELU): loading the swapper's own state raised
    half-way through (a review). The swap is dropped, said once."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    sw = ActivationSwapper(net)
    sw.swap("1")
    state = sw.state_dict()
    net[1] = nn.GELU()
    with pytest.warns(ReluDoctorWarning, match="the swap at '1' is dropped: its module was "
                      "replaced since by a GELU"):
        sw.load_state_dict(state)
    assert sw.swaps == {} and isinstance(net[1], nn.GELU)


def test_restore_keeps_the_paths_named_not_their_substrings():
    """``keep="13"`` (one path, as a str) kept the swap at ``"1"`` too: ``"1" in "13"`` (a
    review). A str is one path; the others are undone, each recorded."""
    net = nn.Sequential(*[m for _ in range(7) for m in (nn.Linear(4, 4), nn.ReLU())])
    sw = ActivationSwapper(net)
    sw.swap("1")
    sw.swap("13")
    assert [e.site for e in sw.restore(keep="13")] == ["1"]
    assert list(sw.swaps) == ["13"] and isinstance(net[1], nn.ReLU)
    assert isinstance(net[13], nn.LeakyReLU)


# ======================================================================= PReLU, one slope per unit


class _Tokens(nn.Module):
    """A token MLP: (N, L, F) activations, units on the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


def _watched_on(model: nn.Module, shapes: list[tuple[int, ...]]):
    """A Doctor watching ``model`` after one training pass on a batch of each shape."""
    torch.manual_seed(0)
    doc = relu_doctor.watch(model, every_n_steps=1, overhead_budget=None).attach()
    for shape in shapes:
        model(torch.randn(*shape)).sum().backward()
        doc.step()
    return doc


@pytest.mark.parametrize(
    "net, inputs, units",
    [
        (lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU()), [(8, 4)], 6),
        (lambda: nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU()), [(2, 3, 6, 6)], 5),
    ],
    ids=["mlp", "cnn"],
)
def test_per_unit_prelu_gets_one_slope_per_unit_of_its_site(net, inputs, units):
    torch.manual_seed(0)
    model = net()
    with _watched_on(model, inputs) as doc:
        sw = ActivationSwapper(model, kind="prelu", per_unit=True, slope=0.1).bind(doc)
        sw.swap("1")
    prelu = model[1]
    assert isinstance(prelu, nn.PReLU) and prelu.num_parameters == units
    for shape in inputs:  # it runs on every input the site saw, as a leaky ReLU of slope 0.1
        x = torch.randn(*shape)
        pre = model[0](x)
        assert torch.allclose(model(x), torch.where(pre > 0, pre, 0.1 * pre))


@pytest.mark.parametrize(
    "shapes, said",
    [
        ([(2, 5, 4)], r"holds its units on dim 2 of its 3-D calls"),  # tokens: units last
        ([(8, 4), (2, 5, 4)], r"holds its units on dim 2 of its 3-D calls"),
        # one sample at a time (an RL policy), before or after batches: torch's PReLU takes
        # one slope on a 1-D input, and per-unit slopes would raise in the user's forward
        ([(4,), (8, 4)], r"runs on one sample at a time"),
        ([(8, 4), (4,)], r"runs on one sample at a time"),
    ],
    ids=["tokens", "then-tokens", "unbatched-first", "unbatched-later"],
)
def test_per_unit_prelu_is_refused_where_its_slopes_would_not_fit(shapes, said):
    torch.manual_seed(0)
    model = _Tokens()
    with _watched_on(model, shapes) as doc:
        sw = ActivationSwapper(model, kind="prelu", per_unit=True).bind(doc)
        with pytest.raises(ReluDoctorError, match=r"per_unit: site 'act' " + said):
            sw.swap("act")
    assert type(model.act) is nn.ReLU
    for shape in shapes:
        model(torch.randn(*shape))  # the model still runs on all of them


class _FunctionalAndModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(self.act(self.fc1(x))))


def test_the_swapper_acts_at_module_sites_in_its_patterns_only():
    """What a finding's "LeakyReluSwap is on" rests on: a functional call has no module to
    swap (it was said to act there), and include/exclude narrow the module sites."""
    torch.manual_seed(0)
    net = _FunctionalAndModule()
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        net(torch.randn(8, 4)).sum().backward()
        doc.step()
        names = [s.name for s in doc.sites]
        assert names == ["act", "(root):relu#0"]
        every = ActivationSwapper(net).bind(doc)
        assert [every.acts_at(n) for n in names] == [True, False]
        none = ActivationSwapper(net, exclude="act").bind(doc)
        assert [none.acts_at(n) for n in names] == [False, False]


def test_a_dead_functional_site_is_left_alone_with_a_warning_and_recorded_when_bound():
    """Bound to a Doctor, the swapper passed over a dead functional call in silence (the
    README says a site it cannot treat is left alone with one warning); it now says so
    once, when the site meets its trigger, and records it as declined."""
    torch.manual_seed(0)
    net = _FunctionalAndModule()
    with torch.no_grad():
        net.fc2.bias.fill_(-100.0)  # every unit of the functional call dead
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with relu_doctor.watch(net, log_every_n_steps=1, overhead_budget=None) as doc:
            ActivationSwapper(net, patience=2).bind(doc)
            for _ in range(4):
                net(torch.randn(8, 4)).sum().backward()
                doc.step()
    said = [str(w.message) for w in seen if "leaving site '(root):relu#0' alone" in str(w.message)]
    assert len(said) == 1 and "is a functional call (relu)" in said[0], said
    events = [e for e in doc.to_run().events if e.get("type") == "declined"]
    assert [(e["site"], e["step"]) for e in events] == [("(root):relu#0", 2)], events
    assert "functional call" in doc.to_run().declined()["(root):relu#0"]["leaky_relu_swap"]
    assert type(net.act) is nn.ReLU  # the module site, alive, untouched


def test_a_swap_that_revives_no_unit_did_not_help():
    # Units held far below zero stay dead under LeakyReLU too: the site's dead fraction does
    # not move, and the swap is judged "did not help" (it read "helped": no worse).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        net[0].bias[:10] = -100.0
    x = torch.randn(64, 16)
    with relu_doctor.watch(net, log_every_n_steps=2, overhead_budget=None) as doc:
        seen = events_of(doc)
        ActivationSwapper(net, threshold=0.2, patience=1).bind(doc)
        for _ in range(4):
            net(x).sum().backward()
            doc.step()
    (made,) = [e for e in seen if e["type"] == "intervention"]
    (result,) = [e for e in seen if e["type"] == "intervention_result"]
    assert result["ref"] == made["id"] and result["target"] == "dead_fraction"
    assert made["before"]["dead_fraction"] == result["after"]["dead_fraction"] == 10 / 32
    assert result["verdict"] == "did not help"


@pytest.mark.parametrize(("after", "verdict"), [(0.73, "did not help"), (0.55, "helped")])
def test_a_swap_bound_on_its_own_is_judged_with_the_plans_bar(after, verdict):
    """A trial's stand-alone swap took a site from 75% dead to 73.4% and was judged
    "helped" (any fall), beside the same site critical later: judged as the plan's default
    swap step is, it helps where the dead fraction falls by a quarter."""
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    sw = ActivationSwapper(net, threshold=0.5, patience=1)
    (event,) = sw(rec(10, [site_row("1", 0.75)]))
    (result,) = sw(rec(20, [site_row("1", after, leaky=True)]))
    assert result.ref == event.id and result.target == "dead_fraction"
    assert result.verdict == verdict


@pytest.mark.parametrize("kind", ["leaky_relu", "prelu"])
def test_a_swap_tells_of_copies_made_before_it_and_how_to_swap_them_too(kind):
    """A DQN's target network, deep-copied before a swap, kept ReLU: each sync by
    load_state_dict left it another function than the online network (a trial: greedy
    actions differed on 9 of 2000 states), and after a PReLU swap the sync raised on the
    slopes' keys. The swap's announcement now says so, and the way it gives makes the copy
    the same function again."""
    import copy

    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    target = copy.deepcopy(online)
    opt = torch.optim.SGD(online.parameters(), lr=0.1)
    with pytest.warns(relu_doctor.ReluDoctorWarning) as caught, relu_doctor.watch(
            online, optimizer=opt) as doc:
        online(torch.randn(8, 4)).sum().backward()
        swapper = ActivationSwapper(online, kind=kind, optimizer=opt).bind(doc)
        swapper.swap("1", step=1)
        doc.step()
    (said,) = [str(w.message) for w in caught if "changed the training at 1" in str(w.message)]
    assert "A copy of the model made before it" in said
    assert "ActivationSwapper(copy).load_state_dict(state), with state the swapping " \
        "remedy's state_dict()" in said
    x = torch.randn(64, 4) - 1.0  # negative inputs too: where the two functions differ
    if kind == "prelu":
        with pytest.raises(RuntimeError, match="Unexpected key"):
            target.load_state_dict(online.state_dict())
    else:
        target.load_state_dict(online.state_dict())
        assert not torch.equal(target(x), online(x))
    ActivationSwapper(target).load_state_dict(swapper.state_dict())  # as said
    target.load_state_dict(online.state_dict())
    torch.testing.assert_close(target(x), online(x), rtol=0, atol=0)
