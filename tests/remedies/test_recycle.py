"""Recycling dormant units (relu_doctor.remedies.recycle): surgery checked element by
element (weights, BatchNorm, optimizer moments of exactly the recycled slices), the policy
with a real Doctor, module names that look like site names, and ReDo against the same seed
untreated."""

from __future__ import annotations

import contextlib
import math
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relu_doctor
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.remedies import DormantRecycler, find_unit_links, recycle_units
from relu_doctor.sites import SiteKey
from tests.remedies.helpers import (
    classification,
    dormant_fraction,
    events_of,
    half_dead,
    hidden,
    mlp,
    rec,
    site_row,
)
from tests.zoo import InvertedResidual, SmallCNN, odd_name_net


def _snapshot(net: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in net.named_buffers()}
    by_id = {id(p): n for n, p in net.named_parameters()}
    state = {
        by_id[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for p, s in opt.state.items()
    }
    return params, buffers, state


def _train(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()


def _expected_rows(
    gen_seed: int, n: int, weight: torch.Tensor, bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(gen_seed)
    rows = torch.empty((n, *weight.shape[1:]))
    nn.init.kaiming_uniform_(rows, a=math.sqrt(5), generator=g)
    if not bias:
        return rows, None
    bound = 1 / math.sqrt(weight[0].numel())
    return rows, torch.empty(n).uniform_(-bound, bound, generator=g)


def _check_slices(
    name: str,
    new: torch.Tensor,
    old: torch.Tensor,
    dim: int,
    cols: list[int],
    value: torch.Tensor | float | None,
) -> None:
    """Along ``dim``: entries in ``cols`` equal ``value`` (None: just changed), every other
    entry bit-identical."""
    keep = [i for i in range(new.shape[dim]) if i not in cols]
    assert torch.equal(
        new.index_select(dim, torch.tensor(keep)), old.index_select(dim, torch.tensor(keep))
    ), name
    got = new.index_select(dim, torch.tensor(cols))
    if value is None:
        assert not torch.equal(got, old.index_select(dim, torch.tensor(cols))), name
    elif isinstance(value, torch.Tensor):
        assert torch.equal(got, value), name
    else:
        assert torch.equal(got, torch.full_like(got, value)), name


def test_recycle_mlp_with_adam_slices_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, amsgrad=True)
    _train(net, opt, torch.randn(16, 6))
    p0, _, s0 = _snapshot(net, opt)
    units = [1, 5]
    what = recycle_units(
        find_unit_links(net, site="3", example_inputs=torch.randn(2, 6)),
        units=units,
        optimizers=opt,
        generator=torch.Generator().manual_seed(7),
    )
    assert what["optimizer_state"] == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    p1, _, s1 = _snapshot(net, opt)
    rows, bias = _expected_rows(7, 2, p0["2.weight"], bias=True)
    _check_slices("2.weight", p1["2.weight"], p0["2.weight"], 0, units, rows)
    _check_slices("2.bias", p1["2.bias"], p0["2.bias"], 0, units, bias)
    _check_slices("4.weight", p1["4.weight"], p0["4.weight"], 1, units, 0.0)
    for n in ("0.weight", "0.bias", "4.bias"):
        assert torch.equal(p1[n], p0[n]), n
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        _check_slices("2.weight " + key, s1["2.weight"][key], s0["2.weight"][key], 0, units, 0.0)
        _check_slices("2.bias " + key, s1["2.bias"][key], s0["2.bias"][key], 0, units, 0.0)
        _check_slices("4.weight " + key, s1["4.weight"][key], s0["4.weight"][key], 1, units, 0.0)
        for n in ("0.weight", "0.bias", "4.bias"):
            assert torch.equal(s1[n][key], s0[n][key]), n
    assert all(torch.equal(s1[n]["step"], s0[n]["step"]) for n in s0)  # steps untouched


def test_recycle_cnn_through_batchnorm_and_flatten_with_sgd_momentum():
    torch.manual_seed(0)
    net = SmallCNN(4)  # features.6 has 8 channels of 4x4 -> head reads 128 features
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    _train(net, opt, torch.randn(4, 3, 8, 8))
    p0, b0, s0 = _snapshot(net, opt)
    units = [0, 5]
    recycle_units(
        find_unit_links(net, site="features.6", example_inputs=torch.randn(2, 3, 8, 8)),
        units=units,
        optimizers=opt,
        generator=torch.Generator().manual_seed(3),
    )
    p1, b1, s1 = _snapshot(net, opt)
    rows, bias = _expected_rows(3, 2, p0["features.4.weight"], bias=True)
    _check_slices("conv w", p1["features.4.weight"], p0["features.4.weight"], 0, units, rows)
    _check_slices("conv b", p1["features.4.bias"], p0["features.4.bias"], 0, units, bias)
    _check_slices("bn w", p1["features.5.weight"], p0["features.5.weight"], 0, units, 1.0)
    _check_slices("bn b", p1["features.5.bias"], p0["features.5.bias"], 0, units, 0.0)
    _check_slices(
        "bn mean", b1["features.5.running_mean"], b0["features.5.running_mean"], 0, units, 0.0
    )
    _check_slices(
        "bn var", b1["features.5.running_var"], b0["features.5.running_var"], 0, units, 1.0
    )
    cols = [c * 16 + j for c in units for j in range(16)]
    _check_slices("head w", p1["head.weight"], p0["head.weight"], 1, cols, 0.0)
    assert torch.equal(b1["features.5.num_batches_tracked"], b0["features.5.num_batches_tracked"])
    for n in ("features.0.weight", "features.0.bias", "features.1.weight", "head.bias"):
        assert torch.equal(p1[n], p0[n]), n
    m = "momentum_buffer"
    _check_slices(
        "conv w mom", s1["features.4.weight"][m], s0["features.4.weight"][m], 0, units, 0.0
    )
    _check_slices("bn w mom", s1["features.5.weight"][m], s0["features.5.weight"][m], 0, units, 0.0)
    _check_slices("head mom", s1["head.weight"][m], s0["head.weight"][m], 1, cols, 0.0)
    for n in ("features.0.weight", "features.1.bias", "head.bias"):
        assert torch.equal(s1[n][m], s0[n][m]), n


def test_recycle_into_a_depthwise_conv():
    torch.manual_seed(0)
    net = InvertedResidual(4, expand=2)  # block.2 (8 channels) feeds depthwise block.3
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    _train(net, opt, torch.randn(2, 4, 5, 5))
    p0, _, s0 = _snapshot(net, opt)
    links = find_unit_links(net, site="block.2", example_inputs=torch.randn(2, 4, 5, 5))
    recycle_units(links, units=[3], optimizers=opt)
    p1, _, s1 = _snapshot(net, opt)
    _check_slices("dw", p1["block.3.weight"], p0["block.3.weight"], 0, [3], 0.0)
    _check_slices(
        "dw m", s1["block.3.weight"]["exp_avg"], s0["block.3.weight"]["exp_avg"], 0, [3], 0.0
    )
    _check_slices("expand", p1["block.0.weight"], p0["block.0.weight"], 0, [3], None)


class _Generator(nn.Module):
    """A DCGAN generator: transposed convolutions, BatchNorm, ReLU."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(64, 8, 4, 1, 0, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.ConvTranspose2d(8, 4, 4, 2, 1, groups=groups), nn.ReLU(),
            nn.ConvTranspose2d(4, 1, 4, 2, 1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(len(z), -1, 1, 1))


def test_recycle_a_transposed_convolutions_units():
    """A trial's DCGAN generator: every site fed by a ConvTranspose2d was refused ("not
    from a Linear or Conv layer") while the findings advised recycling there. Its units are
    the weight's dim 1 now: those columns re-initialised as PyTorch initialises the layer
    (its fan-in read from the weight as stored: its dim 1 and kernel), the BatchNorm reset, the next transposed convolution's input rows (its
    weight's dim 0) zeroed, Adam's moments of exactly those slices reset; the output in
    eval mode is what it was (they were dead), and the site fed through a grouped one is
    refused."""
    torch.manual_seed(0)
    net = _Generator()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    _train(net, opt, torch.randn(4, 64))
    units = [1, 6]
    with torch.no_grad():
        net.net[1].bias[units] = -100.0  # dead: what they passed on was nothing
    p0, b0, s0 = _snapshot(net, opt)
    net.eval()
    z = torch.randn(3, 64)
    before = net(z)
    recycle_units(find_unit_links(net, site="net.2", example_inputs=torch.randn(2, 64)),
                  units=units, optimizers=opt, generator=torch.Generator().manual_seed(5))
    p1, b1, s1 = _snapshot(net, opt)
    w0 = p0["net.0.weight"]  # (in 64, out 8, 4, 4)
    _check_slices("convT w", p1["net.0.weight"], w0, 1, units, None)
    # PyTorch's own reading of the layer's fan-in (8 * 4 * 4, not the 64 * 4 * 4 inputs)
    bound = 1 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(net.net[0].weight)[0])
    fresh = p1["net.0.weight"][:, units]
    assert fresh.abs().max() <= bound and fresh.abs().max() > 0.9 * bound
    assert fresh.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    _check_slices("bn w", p1["net.1.weight"], p0["net.1.weight"], 0, units, 1.0)
    _check_slices("bn mean", b1["net.1.running_mean"], b0["net.1.running_mean"], 0, units, 0.0)
    _check_slices("next w", p1["net.3.weight"], p0["net.3.weight"], 0, units, 0.0)
    for key in ("exp_avg", "exp_avg_sq"):
        _check_slices("convT " + key, s1["net.0.weight"][key], s0["net.0.weight"][key], 1,
                      units, 0.0)
        _check_slices("next " + key, s1["net.3.weight"][key], s0["net.3.weight"][key], 0,
                      units, 0.0)
    for n in ("net.3.bias", "net.5.weight", "net.5.bias"):
        assert torch.equal(p1[n], p0[n]), n
    torch.testing.assert_close(net(z), before, rtol=0, atol=1e-6)
    # the second transposed convolution's own units: its dim 1 (4 of them), a bias too
    links = find_unit_links(net, site="net.4", example_inputs=torch.randn(2, 64))
    assert links.units == 4 and links.producer_dim == 1
    with pytest.raises(ReluDoctorError, match="grouped transposed convolution"):
        find_unit_links(_Generator(groups=2), site="net.4", example_inputs=torch.randn(2, 64))


class _Upsampling(nn.Module):
    """A segmentation decoder's end: Conv-BN-ReLU, bilinear upsampling, a 1x1 head; and a
    deep-supervision head on the same units, run in training only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.head, self.aux = nn.Conv2d(8, 1, 1), nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.act(self.bn(self.conv(x)))
        y = self.head(self.up(h))
        return (y, self.aux(h)) if self.training else y


def test_recycling_follows_upsampling_and_decides_on_a_training_pass_in_eval_mode():
    """A U-Net trial: a site read by nn.Upsample(bilinear) then a conv was refused ("not a
    Linear, Conv or per-channel norm"), though interpolation is linear per channel and keeps
    zeros, as pooling, which recycling follows. And a recycler deciding after a validation
    pass, the model left in eval mode, recorded its pass in eval mode: the
    deep-supervision head, run in training only, was no consumer, its weights from the
    recycled units kept, and the training loss's aux output changed. The pass is recorded
    in training mode now (every module's mode restored after): both heads' weights from
    the dead units are zeroed, and the training-mode outputs are what they were."""
    torch.manual_seed(0)
    net = _Upsampling()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    dead = [2, 5]
    with torch.no_grad():
        net.bn.bias[dead] = -100.0
    x, val = torch.randn(4, 3, 6, 6), torch.randn(2, 3, 6, 6)
    with relu_doctor.watch(net, optimizer=opt, every_n_steps=1, overhead_budget=None,
                           log_every_n_steps=2) as doc, warnings.catch_warnings():
        warnings.simplefilter("ignore", ReluDoctorWarning)
        recycler = DormantRecycler(net, max_fraction=1.0).bind(doc)
        for step in range(2):
            net.train()
            y, aux = net(x)
            opt.zero_grad()
            (y.pow(2).mean() + aux.pow(2).mean()).backward()
            opt.step()
            net.eval()  # validation, then the log: the recycler decides in eval mode
            with torch.no_grad():
                net(val)
            if step == 1:
                before = [t.detach().clone() for t in net.train()(x)]
                head0, aux0 = net.head.weight.detach().clone(), net.aux.weight.detach().clone()
                net.eval()
            doc.step()
    assert recycler.recycled == {"act": 2}
    assert not net.training  # (its mode as the user left it)
    _check_slices("head", net.head.weight, head0, 1, dead, 0.0)
    _check_slices("aux", net.aux.weight, aux0, 1, dead, 0.0)
    after = net.train()(x)
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_link_pass_that_fails_in_training_mode_waits_for_one_that_does_not():
    """A review: the link pass, recorded in training mode where the model is not in it
    (deciding after a validation pass), failed on a BatchNorm given the validation's one
    sample, and the failure was kept: recycling was off for the rest of the run. Made in
    the model's own mode instead, it missed what only training runs (a deep-supervision
    head: the training output changed). The site is skipped for now, said once, and
    recycled at a later decision whose latest call the pass runs on."""
    torch.manual_seed(0)
    net = _Upsampling()
    with torch.no_grad():
        net.bn.bias[:2] = -100.0
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x = torch.randn(4, 3, 6, 6)
    with relu_doctor.watch(net, optimizer=opt, every_n_steps=1, overhead_budget=None,
                           log_every_n_steps=1) as doc, \
            warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        recycler = DormantRecycler(net, max_fraction=1.0).bind(doc)
        for step in range(3):
            net.train()
            y, aux = net(x)
            opt.zero_grad()
            (y.pow(2).mean() + aux.pow(2).mean()).backward()
            opt.step()
            if step < 2:
                net.eval()
                with torch.no_grad():
                    net(torch.randn(1, 3, 1, 1))  # a one-pixel validation: BN fails in training
                assert recycler.recycled == {}
            else:  # the latest call is training's now
                before = [t.detach().clone() for t in net(x)]
            doc.step()
    assert recycler.recycled == {"act": 2}
    assert len([w for w in said if "skipping site 'act' for now" in str(w.message)]) == 1
    assert torch.equal(net.aux.weight[:, :2], torch.zeros(1, 2, 1, 1))
    for b, a in zip(before, net.train()(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_recycle_rejects_bad_units():
    links = find_unit_links(mlp(), site="1", example_inputs=torch.randn(2, 8))
    with pytest.raises(ReluDoctorError, match=r"units: indices must be in \[0, 64\)"):
        recycle_units(links, units=[64])


def test_recycle_nothing_changes_nothing():
    net = mlp()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    what = recycle_units(find_unit_links(net, site="1", example_inputs=torch.randn(2, 8)), units=[])
    assert what == {
        "units": [],
        "producer": "0",
        "norm": None,
        "consumers": ["2"],
        "optimizer_state": [], "optimizers": [],
        "init": "",  # nothing drawn
    }
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_recycler_arguments_are_validated():
    net = mlp()
    with pytest.raises(ReluDoctorError, match="tau"):
        DormantRecycler(net, tau=1.0)
    with pytest.raises(ReluDoctorError, match="every"):
        DormantRecycler(net, every=0)
    with pytest.raises(ReluDoctorError, match="max_fraction"):
        DormantRecycler(net, max_fraction=0.0)
    with pytest.raises(ReluDoctorError, match="on_unlinkable"):
        DormantRecycler(net, on_unlinkable="ignore")
    with pytest.raises(ReluDoctorError, match="seed"):
        DormantRecycler(net, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ReluDoctorError, match="optimizers"):
        DormantRecycler(net, optimizers=["adam"])  # type: ignore[list-item]
    with pytest.raises(ReluDoctorError, match="include"):
        DormantRecycler(net, include=[""])


def _units(site: str, scores: list[float], dead: list[bool], tau: float = 0.1) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "site": site,
            "unit": range(len(scores)),
            "dormant_score": scores,
            "dead": dead,
            "dormant": [s <= tau and not d for s, d in zip(scores, dead, strict=True)],
            "below_tau": [s <= tau for s in scores],
        }
    )


def test_recycler_picks_the_most_dormant_units_up_to_max_fraction_every_n_intervals():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    r = DormantRecycler(net, every=2, max_fraction=0.5, seed=3)
    net(torch.randn(5, 3))  # a forward pass shows the producer and consumers
    units = _units("1", [0.05, 1.0, 0.0, 0.09, 2.0, 0.01], [False, False, True, False, False, False])
    rows = [site_row("1", 1 / 6, units=6)]
    assert r(rec(10, rows, units=units)) == []  # interval 1 of every 2
    w0 = net[0].weight.detach().clone()
    (ev,) = r(rec(20, rows, units=units))
    # Dormant: 0 (0.05), 2 (dead), 3 (0.09), 5 (0.01); at most 3 of 6, most dormant first.
    assert ev.details["units"] == [0, 2, 5] and ev.site == "1" and ev.step == 20
    assert ev.before["dead_fraction"] == pytest.approx(1 / 6)
    # Seeded by (seed, step, site): the rows are the generator's draws.
    g = torch.Generator().manual_seed((3 * 1_000_003 + zlib.crc32(b"1@20")) % 2**63)
    rows_ = torch.empty(3, 3)
    nn.init.kaiming_uniform_(rows_, a=math.sqrt(5), generator=g)
    assert torch.equal(net[0].weight[[0, 2, 5]], rows_)
    assert torch.equal(net[0].weight[[1, 3, 4]], w0[[1, 3, 4]])
    assert r.recycled == {"1": 3}
    # Own tau: score <= tau, or dead.
    net2 = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    mine = DormantRecycler(net2, tau=0.06, example_inputs=torch.randn(2, 3))
    (ev,) = mine(rec(10, rows, units=units))
    assert ev.details["units"] == [0, 2, 5]


@pytest.mark.parametrize(("family", "act"), [("leaky_relu", nn.LeakyReLU), ("relu", nn.ReLU)])
def test_a_dead_unit_with_a_large_score_is_recycled_only_where_dead_units_output_zero(
        family, act):
    """ReDo's criterion is the score (the record's ``below_tau``): a leaky site's unit stuck
    negative is dead but can have a large mean |h|, which recycling it takes from the
    network (a GNN trial: outputs moved by 10-13). The record's flag leaves it alone, and so
    does an own ``tau`` there; where dead units output 0 (ReLU), an own ``tau`` takes the
    dead units too."""
    units = _units("1", [3.0, 0.05, 1.0, 1.0, 1.0, 1.0], [True] + [False] * 5)
    assert units["below_tau"].tolist() == [False, True, False, False, False, False]
    assert not units["dormant"][0] and units["dormant"][1]
    rows = [{**site_row("1", 1 / 6, units=6, leaky=family != "relu"), "family": family}]
    for tau, want in ((None, [1]), (0.1, [1] if family != "relu" else [0, 1])):
        net = nn.Sequential(nn.Linear(3, 6), act(), nn.Linear(6, 2))
        (ev,) = DormantRecycler(net, tau=tau, example_inputs=torch.randn(2, 3))(
            rec(10, rows, units=units))
        assert ev.details["units"] == want, tau


def test_a_recycling_by_its_own_tau_is_judged_from_its_units_share_quiet_when_chosen():
    """A recycler with its own tau changes units the Doctor's tau does not call quiet: it
    was judged against "all of them dead or below tau before" (a made-up 100%), so a
    recycling that left the same share quiet read "helped". Its before is now read from the
    record it decided on."""
    from relu_doctor.remedies.judging import verdict

    torch.manual_seed(0)
    rows = [site_row("1", 1 / 6, units=6)]
    scores, dead = [0.05, 1.0, 0.0, 0.09, 2.0, 0.01], [False, False, True, False, False, False]
    chosen_by = _units("1", scores, dead, tau=0.1)  # the recycler's own tau: 0, 2, 3, 5
    doctors = _units("1", scores, dead, tau=0.02)  # the Doctor's tau: 2 (dead) and 5 quiet
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    r = DormantRecycler(net, tau=0.1, max_fraction=1.0, example_inputs=torch.randn(2, 3))
    (ev,) = r(rec(10, rows, units=doctors))
    units = ev.details["units"]
    assert units == sorted(chosen_by.loc[chosen_by["dormant"] | chosen_by["dead"], "unit"])
    own = doctors[doctors["unit"].isin(units)]
    quiet_before = float((own["dead"] | own["below_tau"]).mean())
    assert 0 < quiet_before < 1 and ev.before["changed_units_quiet"] == quiet_before
    # one interval later, as many of them quiet as before: not helped
    later = _units("1", [0.5, 1.0, 0.0, 0.5, 2.0, 0.01], dead, tau=0.02)
    (res,) = [e for e in r(rec(20, rows, units=later)) if getattr(e, "ref", None) == ev.id]
    after = later[later["unit"].isin(units)]
    quiet_after = float((after["dead"] | after["below_tau"]).mean())
    assert res.target == "changed_units_quiet" and res.before == {res.target: quiet_before}
    assert res.verdict == verdict(quiet_before, quiet_after, min_gain=0.25) == "did not help"


def test_a_direct_recycle_call_is_judged_from_the_doctors_last_record():
    """``recycle(site, units=...)`` called directly (before=None) was judged no more after
    the rule above, while the report read 100% before (a review). The share is read from
    the bound Doctor's last record, with the site's metrics there."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].bias[:4] = -50.0  # units 0-3 dead
        net[0].bias[4:] = 50.0  # the others always active
    x = torch.randn(32, 4)
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        r = DormantRecycler(net, every=1000).bind(doc)
        net(x).sum().backward()
        doc.step()
        last = doc.records[-1].unit_table
        ev = r.recycle("1", units=[0, 1, 2, 3, 4], step=1)
        net(x).sum().backward()
        doc.step()
        events = doc.to_run().events
    chosen = last[(last["site"] == "1") & last["unit"].isin([0, 1, 2, 3, 4])]
    share = float((chosen["dead"].astype(bool) | chosen["below_tau"].astype(bool)).mean())
    assert share == 0.8 and ev.before["changed_units_quiet"] == share
    assert ev.before["dead_fraction"] == 0.5  # the site's metrics, from that record
    (res,) = [e for e in events if e["type"] == "intervention_result"]
    assert res["before"] == {"changed_units_quiet": share} and res["verdict"] is not None


def test_units_a_window_did_not_see_are_neither_quiet_nor_not():
    """A direct recycle() of a branch that did not run in the last window read its units
    as 0% quiet (unseen: neither dead nor below tau), so the change was not judged (a
    review). Unseen units count for neither: the share falls back to all of them, and a
    window after that does not run them puts the judgement off to one that does."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            self.b = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
            self.out = nn.Linear(8, 1)
            with torch.no_grad():
                self.b[0].bias[:4] = -50.0

        def forward(self, x, branch):
            h = self.a(x)
            return self.out(self.b(h) if branch else h)

    torch.manual_seed(0)
    net, x = Net(), torch.randn(32, 4)
    with relu_doctor.watch(net, log_every_n_steps=1, overhead_budget=None) as doc:
        r = DormantRecycler(net, every=1000).bind(doc)
        for branch in (True, False):  # b runs in the first window, not in the second
            net(x, branch).sum().backward()
            doc.step()
        last = doc.records[-1].unit_table
        assert last.loc[last["site"] == "b.1", "activation_rate"].isna().all()  # unseen
        with torch.no_grad():
            net(x, True)  # (a pass that runs b: its links are read from one)
        ev = r.recycle("b.1", units=[0, 1, 2, 3], step=2)
        for branch in (False, True):  # not run in the window after: judged at the next
            net(x, branch).sum().backward()
            doc.step()
        res = [e for e in doc.to_run().events if e["type"] == "intervention_result"]
    assert ev.before["changed_units_quiet"] == 1.0
    (judged,) = res  # (a review: it was "unknown" for good at the window that did not run)
    assert judged["step"] == 4 and judged["verdict"] in ("helped", "did not help")
    assert judged["efficacy"]["units"] == 4


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_a_parametrized_producer_is_refused_for_what_it_is(norm):
    """A weight-normed TCN's conv was refused as "not from a Linear or Conv layer" (a
    trial): its weight is computed in the forward, whose rows recycling cannot write. It
    says so, and nothing changes."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    conv = getattr(parametrizations, norm)(nn.Conv1d(3, 8, 3, padding=1))
    net = nn.Sequential(conv, nn.ReLU(), nn.Conv1d(8, 2, 1))
    x = torch.randn(4, 3, 10)
    r = DormantRecycler(net, example_inputs=x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ReluDoctorError, match=r"its input comes from conv1d in 0\.forward, whose "
                       r"weight is not a parameter but made from one in the forward \(.* a "
                       r"parametrization: weight_norm, spectral_norm\)"):
        r.recycle("1", units=[0, 1])
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_a_recycling_of_units_none_of_which_was_quiet_is_not_judged_on_that_share():
    """Continual backprop replaces the units of least utility, quiet or not: where none of
    them was dead or below tau, their share so after cannot show whether it helped."""
    from relu_doctor.remedies import ContinualBackprop

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].bias.fill_(1.0)  # every unit active on every sample: none quiet
    x = torch.randn(32, 4)
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        ContinualBackprop(net, replacement_rate=0.25, maturity=0, decay=0.0).bind(doc)
        for _ in range(2):
            net(x).sum().backward()
            doc.step()
        tables = {r.step: r.unit_table for r in doc.records}
        events = doc.to_run().events
    ivs = [e for e in events if e["type"] == "intervention" and e["step"] == 1]
    assert ivs, events
    iv = ivs[0]
    chosen = tables[1][(tables[1]["site"] == "1") & tables[1]["unit"].isin(iv["details"]["units"])]
    assert not (chosen["dead"].astype(bool) | chosen["below_tau"].astype(bool)).any()
    assert iv["before"]["changed_units_quiet"] == 0.0
    (res,) = [e for e in events if e["type"] == "intervention_result" and e["ref"] == iv["id"]]
    assert res.get("verdict") is None and res.get("target") is None
    assert res["efficacy"]["units"] == len(iv["details"]["units"])


@pytest.mark.parametrize("remedy", ["redo", "cbp"])
def test_a_recycler_given_no_optimizer_resets_the_state_of_the_one_the_doctor_watches(remedy):
    """``DormantRecycler(model).bind(doc)`` with ``watch(optimizer=adam)`` left Adam's
    moments of the recycled units in place, silently: it takes the Doctor's optimizers."""
    from relu_doctor.remedies import ContinualBackprop

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].bias[:3] = -50.0  # three dead units: recycled
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with relu_doctor.watch(net, log_every_n_steps=2, overhead_budget=None, optimizer=opt) as doc:
        r = (DormantRecycler(net) if remedy == "redo" else
             ContinualBackprop(net, replacement_rate=3 / 8, maturity=0)).bind(doc)
        for _ in range(2):
            net(torch.randn(16, 4)).pow(2).mean().backward()
            opt.step()
            doc.step()  # (zero_grad after: the recycled rows' gradients stay to compare)
            if not doc.to_run().interventions():
                opt.zero_grad()
    assert r.optimizers == [opt]
    (ev,) = doc.to_run().interventions()
    units = ev["details"]["units"]
    state = opt.state[net[0].weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.count_nonzero(state[key][units]) == 0, key  # reset
        others = [u for u in range(8) if u not in units]
        assert torch.count_nonzero(state[key][others]) > 0, key  # kept
    assert torch.count_nonzero(opt.state[net[2].weight]["exp_avg"][:, units]) == 0


def test_adopted_optimizers_are_checked_and_follow_the_doctor_bound_to():
    """``reset_adam_step=True`` refuses an SGD it is given at construction: one it takes
    from the Doctor is refused at bind alike (it was taken unchecked, and the recycler then
    left every site alone); bound to a later Doctor, it takes that one's optimizers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    sgd = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    with pytest.raises(ReluDoctorError, match="reset_adam_step") as given:
        DormantRecycler(net, optimizers=sgd, reset_adam_step=True)
    with (relu_doctor.watch(net, optimizer=sgd) as doc,
          pytest.raises(ReluDoctorError, match="reset_adam_step") as taken):
        DormantRecycler(net, reset_adam_step=True).bind(doc)
    assert str(taken.value) == str(given.value)
    r = DormantRecycler(net)
    adams = [torch.optim.Adam(net.parameters()) for _ in range(2)]
    for adam in adams:
        with relu_doctor.watch(net, optimizer=adam) as doc:
            r.bind(doc)
            assert r.optimizers == [adam]
    mine = DormantRecycler(net, optimizers=sgd)
    with relu_doctor.watch(net, optimizer=adams[0]) as doc:
        assert mine.bind(doc).optimizers == [sgd]  # its own stay
    # Refused at bind, it is not bound (listening, unchecked at a second bind)
    refused = DormantRecycler(net, reset_adam_step=True)
    with relu_doctor.watch(net, optimizer=sgd) as doc:
        with pytest.raises(ReluDoctorError, match="reset_adam_step"):
            refused.bind(doc)
        assert refused.doctor is None
        with pytest.raises(ReluDoctorError, match="reset_adam_step"):
            refused.bind(doc)


def test_recycler_state_round_trips():
    net = mlp()
    r = DormantRecycler(net, every=2, example_inputs=torch.randn(2, 8))
    units = _units("1", [0.0] + [1.0] * 63, [True] + [False] * 63)
    rows = [site_row("1", 1 / 64, units=64)]
    r(rec(10, rows, units=units))
    r(rec(20, rows, units=units))
    r2 = DormantRecycler(net, every=2)
    r2.load_state_dict(r.state_dict())
    assert (r2.intervals, r2.recycled, r2.pending) == (2, {"1": 1}, r.pending)
    assert r2(rec(30, rows, units=units))[0].ref == r.pending[0].id


def test_unlinkable_sites_are_skipped_with_one_warning_or_raise():
    from tests.zoo import BasicBlock

    block = BasicBlock(4)
    units = _units("relu#1", [0.0, 1.0, 1.0, 1.0], [True, False, False, False])
    rows = [site_row("relu#1", 0.25, units=4)]
    keys = {"relu#1": SiteKey("relu", 1)}
    r = DormantRecycler(block)
    block(torch.randn(2, 4, 5, 5))
    with pytest.warns(ReluDoctorWarning, match="leaving site 'relu#1' alone.*input comes from a sum") as said:
        assert r(rec(10, rows, units=units, keys=keys)) == []
    assert said[0].filename == __file__  # at the caller's line, not inside relu_doctor
    # how to keep it out, in the remedy's own argument
    assert str(said[0].message).endswith(
        "It stays alone (exclude=['relu#1'] keeps it out from the start).")
    assert r(rec(20, rows, units=units, keys=keys)) == []  # no second warning, no event
    # made from the Hugging Face callback's dormant_reset={...}: in that option's form
    r3 = DormantRecycler(block)
    r3.options_name = "dormant_reset"
    block(torch.randn(2, 4, 5, 5))
    with pytest.warns(ReluDoctorWarning, match="leaving site 'relu#1' alone") as said:
        r3(rec(10, rows, units=units, keys=keys))
    assert str(said[0].message).endswith(
        "It stays alone (dormant_reset={'exclude': ['relu#1']} keeps it out from the start).")
    with pytest.raises(ReluDoctorError, match="site 'relu#1'"):
        DormantRecycler(block, on_unlinkable="raise", example_inputs=torch.randn(2, 4, 5, 5))(
            rec(10, rows, units=units, keys=keys)
        )


class _SumThenRelu(nn.Module):
    """An activation whose input is the sum of two layers (a residual add): ReDo cannot
    tell which layer's units to re-initialise, so it leaves the site alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 1)
        with torch.no_grad():
            self.a.bias[:3] = -50.0  # three units dead from the start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.a(x) + self.b(x)))


def _treat_the_sum(tmp_path, make, steps: int, said: str):
    """``steps`` steps of :class:`_SumThenRelu` watched with ``make(net, opt)`` bound, which
    must say ``said``: the Doctor and the run read back."""
    torch.manual_seed(0)
    net = _SumThenRelu()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    treatment = make(net, opt)
    with pytest.warns(ReluDoctorWarning, match=said), \
            relu_doctor.watch(net, log_every_n_steps=2, every_n_steps=1, optimizer=opt,
                              run_dir=tmp_path / "run") as doc:
        treatment.bind(doc)
        for _ in range(steps):
            net(torch.randn(16, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
    return doc, relu_doctor.load_run(tmp_path / "run")


def test_a_site_left_alone_is_recorded_and_the_report_advises_recycling_there_no_more(
    tmp_path,
):
    """A dead site ReDo refuses (its input is a sum) was still told 'recycle the units' by
    the report after ReDo said it would not: the refusal is now an event of the run, and the
    report's advice leaves that remedy out and says why."""
    from relu_doctor.reports.context import build_context

    doc, run = _treat_the_sum(tmp_path, lambda net, opt: DormantRecycler(net, optimizers=opt),
                              4, "leaving site 'act' alone.*sum")
    [declined] = [e for e in run.events if e.get("type") == "declined"]
    assert (declined["remedy"], declined["site"], declined["step"]) == ("dormant_reset", "act", 2)
    assert "sum" in declined["reason"] and run.declined() == {"act": {"dormant_reset": declined["reason"]}}
    # The diagnoses after it (step 4, findings.json) advise recycling there no more either;
    # the one before it (step 2) did not either, read from the forward pass (its input a
    # sum), and said why.
    first = [f for f in doc.records[0].findings if f.site == "act"]
    assert doc.records[0].step == 2 and not any("DormantRecycler" in f.remedy for f in first)
    assert any("Recycling cannot treat this site: its units come from a sum" in f.remedy
               for f in first)
    for found in (doc.findings(), run.findings()):
        dead = [f for f in found if f.site == "act" and f.kind in ("dead", "lifetime_dead")]
        assert dead and not [f for f in dead if "DormantRecycler" in f.remedy]
        assert any("(dormant_reset left this site alone: see its warning.)" in f.remedy
                   for f in dead)
    assert doc.state_dict()["declined"] == {"act": ["dormant_reset"]}  # (a resume keeps it)
    advice = [f.remedy for f in build_context(run).findings if f.site == "act"]
    assert advice and not [a for a in advice if "DormantRecycler" in a]
    assert any("dormant_reset left this site alone: " in a and "sum" in a for a in advice)


def test_a_site_the_plans_recycling_cannot_treat_is_declined_too(tmp_path):
    """The treatment plan's recycling step refused the site with a warning only: the report
    went on advising recycling there."""
    from relu_doctor.remedies import PlanStep, TreatmentPlan
    from relu_doctor.reports.context import build_context

    _, run = _treat_the_sum(
        tmp_path, lambda net, opt: TreatmentPlan(net, optimizer=opt, patience=1, steps=[
            PlanStep("recycle", options={"threshold": 0.3, "max_fraction": 0.5})]),
        8, "dormant_reset \\(its step 'recycle'\\) cannot treat site 'act'.*sum")
    assert list(run.declined()) == ["act"] and list(run.declined()["act"]) == ["dormant_reset"]
    advice = [f.remedy for f in build_context(run).findings if f.site == "act"]
    assert advice and not [a for a in advice if "recycle the units" in a]


@pytest.mark.parametrize("name", ["enc:act", "a#1"])
def test_recycle_a_site_whose_name_looks_like_a_site(name):
    torch.manual_seed(0)
    net = half_dead(odd_name_net(name))
    out_w = net.get_submodule(f"{name}_blk.fc").weight
    # Unbound: the str is the module path.
    ev = DormantRecycler(net, example_inputs=torch.randn(2, 4)).recycle(name, units=[1])
    assert ev.site == name and ev.details["links"]["producer"] == "fc"
    assert torch.equal(out_w[:, 1], torch.zeros(8))
    # Bound: from the record's key, the dead units 0-3 (re-killed here) are recycled.
    half_dead(net)
    x = torch.randn(32, 4)
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        seen = events_of(doc)
        r = DormantRecycler(net, include=[name], seed=1).bind(doc)
        net(x).sum().backward()
        doc.step()
        ivs = [e for e in seen if e["type"] == "intervention"]
        assert [(e["site"], e["details"]["units"]) for e in ivs] == [(name, [0, 1, 2, 3])]
        assert torch.equal(out_w[:, :4], torch.zeros(8, 4))
        assert net.fc.bias[:4].abs().max() < 1  # fresh, no longer -100
        assert r.links(name).site == name
        net(x).sum().backward()
        doc.step()
        (res,) = [e for e in seen if e["type"] == "intervention_result"]
        assert res["site"] == name and res["after"]["dead_fraction"] < 0.5
        # The functional site inside "<name>_blk", by its name.
        blk = r.recycle(f"{name}_blk:relu#0", units=[0], step=2)
        assert blk.details["links"]["consumers"] == [{"path": "out", "span": 1}]


# ======================================================================= pathology, treated vs not


def test_dormant_reset_recycles_dormant_units():
    """An Adam lr burst leaves most second-layer units dormant; ReDo recycles them."""
    x, y = classification(1)
    xt, yt = classification(2)

    def run(treat: bool) -> tuple[float, float, int]:
        torch.manual_seed(0)
        net = mlp()
        opt = torch.optim.Adam(net.parameters(), lr=0.2)
        with relu_doctor.watch(net, log_every_n_steps=10) as doc:
            seen = events_of(doc)
            if treat:
                DormantRecycler(net, optimizers=opt).bind(doc)
            for step in range(300):
                if step == 5:
                    opt.param_groups[0]["lr"] = 0.01
                i = torch.randint(0, len(x), (64,))
                opt.zero_grad()
                F.cross_entropy(net(x[i]), y[i]).backward()
                opt.step()
                doc.step()
        n = sum(len(e["details"]["units"]) for e in seen if e.get("type") == "intervention")
        with torch.no_grad():
            loss = float(F.cross_entropy(net(xt), yt))
        return dormant_fraction(hidden(net, xt)[1]), loss, n

    dorm_u, loss_u, _ = run(False)
    dorm_t, loss_t, recycled = run(True)
    print(f"dormant fraction {dorm_u:.3f} -> {dorm_t:.3f}, loss {loss_u:.3f} -> {loss_t:.3f}")
    assert recycled > 0
    assert dorm_u > 0.5 and dorm_t < 0.1, (dorm_u, dorm_t)
    assert loss_t < loss_u, (loss_u, loss_t)


def test_a_failing_link_pass_warns_once_and_training_goes_on(monkeypatch):
    """Do no harm: the extra pass that finds producers and consumers fails (here: forced)."""
    import relu_doctor.remedies._link_cache as link_cache

    def boom(*a, **k):
        raise RuntimeError("forced")

    monkeypatch.setattr(link_cache, "record_dataflow", boom)
    torch.manual_seed(0)
    net = half_dead(odd_name_net("act"))
    x = torch.randn(16, 4)
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        r = DormantRecycler(net, include=["act"]).bind(doc)
        with pytest.warns(UserWarning, match=r"leaving site 'act' alone.*RuntimeError: forced"):
            for _ in range(3):
                net(x).sum().backward()
                doc.step()
    assert r.recycled == {} and doc.global_step == 3


class _NoForward(nn.Module):
    """A LightningModule's shape: no forward of its own; training calls ``self.net``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())


@pytest.mark.filterwarnings("ignore:ReDo recycling")
def test_a_first_call_that_raises_changes_neither_the_error_nor_the_sites() -> None:
    """A review's Lightning run: ReluDoctorTreatment's init check called the LightningModule,
    which has no forward. The recycler's input tap removed hooks from inside an always-called
    hook while torch's error path iterated them: the user's NotImplementedError became
    'OrderedDict mutated during iteration', the probe's end-of-pass hook never ran, and every
    later step's call got a new site (net.1#0, net.1#2, ... net.1#20)."""
    model = _NoForward()
    recycler = DormantRecycler(model)  # its input tap hooked before the probe, as there
    with relu_doctor.watch(model, log_every_n_steps=2, every_n_steps=1) as doc:
        recycler.bind(doc)
        with pytest.raises(NotImplementedError):
            model(torch.randn(2, 4))
        for _ in range(6):
            model.net(torch.randn(2, 4)).sum().backward()
            doc.step()
    assert [s.name for s in doc.sites] == ["net.1", "net.3"]
    assert recycler.doctor is doc


def _tiny_bert(transformers):  # type: ignore[no-untyped-def]
    config = transformers.BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=512,
                                     initializer_range=0.02)
    model = transformers.BertForSequenceClassification(config)
    return model, model.bert.encoder.layer[0].intermediate.dense, \
        "bert.encoder.layer.0.intermediate.intermediate_act_fn", 0.02, "BertModel"


def _tiny_t5(transformers):  # type: ignore[no-untyped-def]
    config = transformers.T5Config(vocab_size=50, d_model=256, d_ff=512, num_layers=1,
                                   num_heads=2, d_kv=32, feed_forward_proj="relu")
    model = transformers.T5EncoderModel(config)
    return model, model.encoder.block[0].layer[1].DenseReluDense.wi, \
        "encoder.block.0.layer.1.DenseReluDense.act", 256 ** -0.5, "T5Stack"


@pytest.mark.parametrize("make", [_tiny_bert, _tiny_t5], ids=["bert", "t5"])
def test_a_hugging_face_models_recycled_units_are_drawn_by_its_own_initialisation(
    make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ReDo draws recycled units' weights from the network's initial distribution. A
    Hugging Face model's is its _init_weights, as the model runs it over the block holding
    the layer (BERT: normal, std initializer_range 0.02; T5: its feed-forward block's branch
    sets wi with std d_model ** -0.5, where the generic branch of a bare Linear gave std 1):
    PyTorch's default drew them several times larger or smaller. The model's other weights are
    untouched, the global random state left as it was (no GPU's reseeded); a plain torch
    model keeps PyTorch's default."""
    transformers = pytest.importorskip("transformers")
    from relu_doctor.remedies._fresh import model_init

    torch.manual_seed(0)
    model, dense, site, std, owner = make(transformers)
    wrapper = nn.ModuleDict({"hf": model})  # (a LightningModule holding it, say)
    found = model_init(wrapper, dense)
    assert found is not None and found.name == owner  # the innermost model holding it
    assert model_init(mlp(), mlp()[0]) is None
    links = find_unit_links(model, site=site, example_inputs=torch.randint(0, 50, (2, 5)))
    assert links.producer is dense
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = torch.get_rng_state()
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    units = list(range(0, 512, 2))
    what = recycle_units(links, units=units, init=model_init(wrapper, links.producer))
    assert torch.equal(torch.get_rng_state(), state) and reseeded == []
    assert what["init"] == f"{owner}'s own"
    rows = dense.weight.detach()[units]
    assert abs(float(rows.std()) / std - 1) < 0.05 and abs(float(rows.mean())) < std / 10
    if dense.bias is not None:
        assert torch.equal(dense.bias.detach()[units], torch.zeros(len(units)))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{n}.weight" for n, m in model.named_modules()
                       if m is dense or any(m is c.module for c in links.consumers)}
    kept = [u for u in range(dense.weight.shape[0]) if u not in units]
    name = next(n for n, m in model.named_modules() if m is dense)
    assert torch.equal(dense.weight.detach()[kept], before[f"{name}.weight"][kept])
    # the default, where the model has no initialisation of its own: Kaiming-uniform
    default = recycle_units(links, units=units)
    assert default["init"] == "PyTorch's default"
    bound = 1 / math.sqrt(dense.weight.shape[1])
    assert abs(float(dense.weight.detach()[units].std()) / (bound / math.sqrt(3)) - 1) < 0.05


class _FrozenBackbone(nn.Module):
    """A frozen backbone whose units are dead (a strongly negative bias), a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
        with torch.no_grad():
            self.backbone[0].bias[:16] = -50.0
            self.backbone[2].bias[:20] = -50.0
        self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@pytest.mark.parametrize("remedy", ["recycle", "swap", "plan"])
def test_remedies_leave_what_the_user_froze_alone_until_it_trains(remedy: str) -> None:
    """ReDo recycled a frozen backbone's dead units: it rewrote its frozen weights, zeroed
    outgoing columns that could never grow back (117 of 1024 entries of a frozen weight),
    and called it helped; the swap changed a frozen feature extractor it could not revive.
    Then they declined such a site for good, so that after the user unfroze the backbone
    (Lightning's BackboneFinetuning) its dead units were never treated, and the findings
    kept advising a lower learning rate for weights no rate moves. Now a site fed by a
    frozen layer and block is no remedy's while it stays frozen (its findings say so, as
    info, with nothing to do but unfreeze it), and is treated once it trains; the trainable
    head is treated throughout, and the frozen parameters and their optimizer state stay
    bit-identical while frozen."""
    from relu_doctor.remedies import ActivationSwapper, TreatmentPlan

    torch.manual_seed(0)
    net = _FrozenBackbone()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)  # (the frozen ones included)
    frozen = {n: p.detach().clone() for n, p in net.backbone.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(net, optimizer=opt, log_every_n_steps=2,
                               overhead_budget=None) as doc:
            fix = (DormantRecycler(net, optimizers=opt, every=1) if remedy == "recycle"
                   else ActivationSwapper(net, patience=1, threshold=0.3) if remedy == "swap"
                   else TreatmentPlan(net, optimizer=opt, steps=["swap"], patience=1))
            fix.bind(doc)
            for i in range(12):
                if i == 6:  # (the frozen phase's checks, then the backbone unfrozen)
                    assert all(torch.equal(p, frozen[n])
                               for n, p in net.backbone.named_parameters())
                    assert all(not opt.state.get(p) for p in net.backbone.parameters())
                    assert all(isinstance(m, (nn.ReLU, nn.Linear)) for m in net.backbone)
                    on_frozen = [f for f in doc.findings() if f.site.startswith("backbone")]
                    assert {f.kind for f in on_frozen} >= {"dead", "lifetime_dead"}
                    assert all(f.severity == "info" and "does not train" in f.message
                               and f.remedy.startswith("Nothing to do while it stays frozen")
                               and f.evidence["frozen_layer"] in ("backbone.0", "backbone.2")
                               for f in on_frozen if f.kind in ("dead", "lifetime_dead"))
                    assert not any(str(e["site"]).startswith("backbone")
                                   for e in doc.to_run().interventions())
                    net.backbone.requires_grad_(True)
                net(torch.randn(16, 8)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                doc.step()
    # nothing declined for being frozen (said by the findings instead), and once it trains
    # the backbone is treated
    assert not [w for w in caught if "requires_grad=False" in str(w.message)]
    assert not doc.to_run().declined()
    acted = {str(e["site"]) for e in doc.to_run().interventions() if e["step"] > 6}
    assert any(s.startswith("backbone") for s in acted)
    assert not any("does not train" in f.message and f.site.startswith("backbone")
                   for f in doc.findings() if f.kind == "dead")


def test_recycling_declines_a_site_whose_consumer_is_frozen() -> None:
    """A trainable layer whose units feed a frozen one: recycling would zero the frozen
    layer's columns (never to grow back), so it declines the site, said once; and the frozen
    layer's own site too (its producer), in a block that trains. Neither is a frozen site
    to the findings: what feeds the first trains, and the second's block does."""
    torch.manual_seed(0)
    net = _FrozenBackbone()
    net.backbone.requires_grad_(True)
    net.head[0].requires_grad_(False)  # (what backbone.3 feeds)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    head_w = net.head[0].weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(net, optimizer=opt, log_every_n_steps=2,
                               overhead_budget=None) as doc:
            DormantRecycler(net, optimizers=opt, every=1).bind(doc)
            for _ in range(6):
                net(torch.randn(16, 8)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                doc.step()
    assert torch.equal(net.head[0].weight, head_w)
    said = [str(w.message) for w in caught if "requires_grad=False" in str(w.message)]
    assert len(said) == 2
    assert any("site 'backbone.3'" in s and "the consumer 'head.0'" in s for s in said)
    assert any("site 'head.1'" in s and "the producer 'head.0'" in s for s in said)
    assert set(doc.to_run().declined()) == {"backbone.3", "head.1"}
    assert not any("frozen_layer" in f.evidence for f in doc.findings())


class _Headed(nn.Module):
    def __init__(self, dead: int) -> None:
        super().__init__()
        self.head = self.make(dead)

    @staticmethod
    def make(dead: int) -> nn.Sequential:
        h = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        with torch.no_grad():
            h[0].bias[:dead] = -50.0
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def test_a_module_replaced_under_the_same_path_is_recycled_not_the_old_one() -> None:
    """The links of a site were read once: after the user replaced the head (a new module of
    the same shapes under the same path), ReDo re-initialised and zeroed the old, detached
    head, recorded it, and left the new one's dead units as they were. A module the links
    name that left the model has them read again, from the first pass's inputs."""
    torch.manual_seed(0)
    net = _Headed(4)  # (recycled at the first log: its links read from this head)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    old = net.head
    before = {n: p.detach().clone() for n, p in old.named_parameters()}
    with relu_doctor.watch(net, optimizer=opt, log_every_n_steps=2,
                           overhead_budget=None) as doc:
        recycler = DormantRecycler(net, every=1).bind(doc)
        for step in range(8):
            if step == 3:
                net.head = _Headed.make(12)  # (the optimizer is the user's to update)
                before = {n: p.detach().clone() for n, p in old.named_parameters()}
            net(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
    assert all(torch.equal(p, before[n]) for n, p in old.named_parameters())
    assert recycler.recycled.get("head.1", 0) >= 4 + 12
    assert int((net.head[0].bias.detach()[:12] == -50.0).sum()) == 0  # re-initialised


class _Adapted(nn.Module):
    """A frozen base layer with a trainable low-rank adapter beside it (LoRA)."""

    def __init__(self) -> None:
        super().__init__()
        self.base_layer = nn.Linear(8, 16)
        self.lora_a, self.lora_b = nn.Linear(8, 2, bias=False), nn.Linear(2, 16, bias=False)
        self.base_layer.requires_grad_(False)
        with torch.no_grad():
            self.base_layer.bias[:12] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


def test_a_frozen_base_layer_beside_a_trainable_adapter_is_no_frozen_part() -> None:
    """The swap's frozen check read the base layer alone and refused a site whose adapter
    trains, saying its units could never revive. The block holding the layer trains."""
    from relu_doctor.remedies import ActivationSwapper

    torch.manual_seed(0)
    net = nn.Sequential(_Adapted(), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01)
    with relu_doctor.watch(net, optimizer=opt, log_every_n_steps=2,
                           overhead_budget=None) as doc:
        ActivationSwapper(net, patience=1, threshold=0.3).bind(doc)
        for _ in range(4):
            net(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
    assert isinstance(net[1], nn.LeakyReLU)


class _Branchy(nn.Module):
    """fc -> F.relu -> fc2 on a residual branch taken on the steps ``take`` says."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 2)
        self.take = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.take:
            h = h + self.fc2(F.relu(self.fc(h)))
        return self.head(h)



@contextlib.contextmanager
def _watched_every_4(net: nn.Module, opt: torch.optim.Optimizer) -> Iterator[
        tuple[relu_doctor.Doctor, list[dict[str, Any]], list[warnings.WarningMessage]]]:
    """A watch of ``net`` logging every 4 steps, collecting every step: ``(the Doctor, its
    events as recorded, every warning caught)``."""
    with warnings.catch_warnings(record=True) as caught, \
            relu_doctor.watch(net, log_every_n_steps=4, overhead_budget=None,
                              optimizer=opt) as doc:
        warnings.simplefilter("always")
        yield doc, events_of(doc), caught


@pytest.mark.parametrize(("make", "taken", "at"), [
    ("recycler", {1, 2, 9, 11}, 12), ("plan", {1, 2, 9, 11}, 12), ("cbp", {1, 2, 9, 11}, 12),
    # taken every 4th step, never at a log, chosen by the model's state (a flag): replaying
    # the inputs of the pass that took it does not take it, so it is refused, saying why
    ("recycler", {0, 4, 8}, None),
])
def test_a_branch_the_recorded_pass_did_not_take_is_recycled_once_a_pass_takes_it(
    make, taken, at,
):
    """A trial's branch ran every third step: where the pass that links are read from (the
    logging step's) did not take it, ReDo left the site alone for good ("made 0 relu
    call(s) ... Exclude this site"), declined it in the record, and the advice dropped
    ReDo; its dead units stayed dead. Now it is skipped, said once, and read again from a
    later pass: recycled at the first log whose pass took the branch."""
    from relu_doctor.remedies import PlanStep, TreatmentPlan

    torch.manual_seed(0)
    net = _Branchy()
    with torch.no_grad():
        net.fc.bias[:4] = -50.0  # four dead units on the branch
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    # logs at steps 3, 7 and 11; the first decision reads a pass that did not take it
    with _watched_every_4(net, opt) as (doc, events, caught):
        if make == "recycler":
            remedy: Any = DormantRecycler(net, optimizers=opt).bind(doc)
        elif make == "cbp":
            from relu_doctor.remedies.continual_backprop import ContinualBackprop

            remedy = ContinualBackprop(net, optimizers=opt, maturity=1,
                                       replacement_rate=0.5).bind(doc)
        else:
            TreatmentPlan(net, optimizer=opt, patience=1, steps=[
                PlanStep("recycle", options={"threshold": 0.2})]).bind(doc)
        for step in range(12):
            net.take = step in taken
            net(torch.randn(16, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
    said = [str(w.message) for w in caught if "skipping site '(root):relu#0' for now" in
            str(w.message)]
    assert len(said) == 1 and "did not take" in said[0], said
    declined = [e for e in events if e["type"] == "declined"]
    acted = [(e["step"], e["site"]) for e in events if e["type"] == "intervention"]
    if at is None:
        assert not acted and len(declined) == 1, (acted, declined)
        assert "chosen by the model's state" in declined[0]["reason"]
        return
    assert not declined
    assert acted[0] == (at, "(root):relu#0"), acted
    assert bool((net.fc.bias[:4] > -1.0).all())  # re-initialised
    if make != "plan":  # found: nothing kept for it (no hook, no inputs)
        assert not remedy._finder._watches and not remedy._finder._pinned


class _TwoParts(nn.Module):
    """An encoder and a projector the loop calls one after the other (SimCLR written as
    ``model.projector(model.encoder(v))``), four of the projector's units dead."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.projector = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        with torch.no_grad():
            self.projector[0].bias[:4] = -50.0


@pytest.mark.parametrize("evaluate", [False, True])
def test_a_part_the_loop_calls_on_its_own_is_recycled(evaluate: bool) -> None:
    """A trial's projector, called apart from its encoder, was never recycled: links are
    read from a pass of the first module called (the encoder), and the hook that looks for
    a missing site again sat on that module alone, so the projector's passes were never
    seen; with the encoder also run alone under no_grad() for an evaluation, its inputs
    were kept for the projector (the latest recorded pass had run it), replayed without
    running it, and the projector refused for good, its branch said to be chosen by a flag.
    Now the hooks sit where recorded passes begin, and keep a call's inputs only where the
    call was such a pass: recycled at the second decision, the reference hook's dead units
    among those re-initialised, their outgoing weights zeroed."""
    torch.manual_seed(0)
    net = _TwoParts()
    fired = torch.zeros(16, dtype=torch.bool)

    def seen(m: nn.Module, a: Any, out: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            fired.logical_or_(out.detach().gt(0).any(0))

    net.projector[1].register_forward_hook(seen)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with _watched_every_4(net, opt) as (doc, events, caught):
        DormantRecycler(net, optimizers=opt).bind(doc)
        for step in range(8):
            net.projector(net.encoder(torch.randn(16, 8))).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if step == 7:  # (the decision's: the window of steps 4-7)
                dead = (~fired).nonzero().flatten().tolist()
                bias = net.projector[0].bias.detach().clone()
            if evaluate:
                with torch.no_grad():
                    net.encoder(torch.randn(16, 8))  # (the encoder alone: no training pass)
            doc.step()
    acted = [(e["step"], e["site"]) for e in events if e["type"] == "intervention"]
    assert not [e for e in events if e["type"] == "declined"]
    assert acted == [(8, "projector.1")], acted
    assert dead == [0, 1, 2, 3]
    changed = (net.projector[0].bias.detach() != bias).nonzero().flatten().tolist()
    assert set(dead) <= set(changed) and len(changed) < 16  # (the dormant ones too: ReDo's)
    assert not net.projector[2].weight.detach()[:, changed].any()  # (outgoing: zeroed)
    said = [str(w.message) for w in caught if "projector.1" in str(w.message)
            and "skipping" in str(w.message)]
    assert len(said) == 1 and "did not run it" in said[0], said


def test_a_branch_that_never_runs_again_leaves_nothing_kept_after_training():
    """A review: the inputs kept to look for a site again outlived the watch block (a hook
    left on the model holding a later batch). Training's last log lets them go."""
    import gc
    import weakref

    torch.manual_seed(0)
    net = _Branchy()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with relu_doctor.watch(net, log_every_n_steps=4, overhead_budget=None) as doc:
        recycler = DormantRecycler(net, optimizers=opt).bind(doc)
        with torch.no_grad():
            net.fc.bias[:4] = -50.0
        for step in range(8):
            net.take = step == 5  # a state-chosen branch: looked for, then refused
            net(torch.randn(16, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
        net.take = True
        batch = torch.randn(16, 4)
        net(batch).square().mean().backward()  # (after the last step: kept by nothing)
        seen = weakref.ref(batch)
    del batch
    gc.collect()
    finder = recycler._finder
    assert not finder._watches and not finder._pinned and finder._retry is None
    assert seen() is None and not net._forward_hooks


def test_a_branch_only_the_later_samples_of_a_batch_take_is_found_on_the_whole_batch():
    """A review: the pass a missing site was looked for in was recorded on the batch's
    first two samples, which a branch for the batch's later samples never takes."""
    class Routed(_Branchy):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            if x.shape[0] > 8:  # a second task's samples, the batch's second half
                h = torch.cat([h[:8], h[8:] + self.fc2(F.relu(self.fc(h[8:])))])
            return self.head(h)

    torch.manual_seed(0)
    net = Routed()
    with torch.no_grad():
        net.fc.bias[:4] = -50.0
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with relu_doctor.watch(net, log_every_n_steps=4, overhead_budget=None) as doc:
        events = events_of(doc)
        DormantRecycler(net, optimizers=opt).bind(doc)
        for _ in range(8):
            net(torch.randn(16, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
    acted = [(e["step"], e["site"]) for e in events if e["type"] == "intervention"]
    assert acted and acted[0][1] == "(root):relu#0", acted
    assert bool((net.fc.bias[:4] > -1.0).all())


def test_continual_backprop_ages_a_site_first_seen_late_from_then_on():
    """A review: a site first read late (a branch first taken at step 40, or first found
    then) was aged from step 0: every unit mature at once, and replacements owed for every
    step since, so a trained layer's units were replaced wholesale (16 of 16)."""
    from relu_doctor.remedies.continual_backprop import ContinualBackprop

    class Late(_Branchy):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            if x.shape[0] > 8:  # from step 40 on: a batch of 16
                h = h + self.fc2(F.relu(self.fc(h)))
            return self.head(h)

    torch.manual_seed(0)
    net = Late()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReluDoctorWarning)
        with relu_doctor.watch(net, log_every_n_steps=4, overhead_budget=None) as doc:
            events = events_of(doc)
            cbp = ContinualBackprop(net, optimizers=opt, maturity=20,
                                    replacement_rate=0.05).bind(doc)
            for step in range(48):
                net(torch.randn(16 if step >= 40 else 8, 4)).square().mean().backward()
                opt.step()
                opt.zero_grad()
                doc.step()
    # first read at the last log (found in a pass of its window): aged that window's 4 steps
    assert int(cbp.age["(root):relu#0"].max()) == 4
    assert not [e for e in events if e["type"] == "intervention" and e["site"] == "(root):relu#0"]


class _CalledTwice(nn.Module):
    """One projection head called on two inputs (a text tower on two captions)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.out = nn.Linear(8, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(a)) + self.out(self.proj(b))


def _dead_findings_under_a_recycler(net: nn.Module, *, functional: bool = False
                                    ) -> tuple[list[Any], list[warnings.WarningMessage]]:
    """Two steps of ``net`` on two inputs (no update: lr 0), logged at each, a recycler
    bound: the first log's dead findings, and the warnings."""
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with relu_doctor.watch(net, optimizer=opt, log_every_n_steps=1, overhead_budget=None,
                               functional=functional) as doc:
            DormantRecycler(net, optimizers=opt).bind(doc)
            for _ in range(2):
                net(torch.randn(16, 6), torch.randn(16, 6)).sum().backward()
                opt.step()
                opt.zero_grad()
                doc.step()
    return [f for f in doc.records[0].findings if f.kind == "dead"], seen


def test_a_layer_run_twice_a_pass_is_advised_no_recycling_the_recycler_refuses() -> None:
    """A head called twice a pass (sites proj.1#0 and #1, one Linear feeding both): the
    findings advised recycling, which the recycler then refused at every call (a CLIP
    trial). The findings now say why it cannot, as the recycler does."""
    torch.manual_seed(0)
    net = _CalledTwice()
    with torch.no_grad():
        net.proj[0].bias[:4] = -50.0  # four units dead in both calls
    first, seen = _dead_findings_under_a_recycler(net)
    assert {f.site for f in first} == {"proj.1#0", "proj.1#1"}
    for f in first:
        other = "proj.1#1" if f.site == "proj.1#0" else "proj.1#0"
        assert (f"Recycling cannot treat this site: the layer feeding it, 'proj.0', also "
                f"feeds {other!r} (run more than once a pass") in f.remedy
        assert "DormantRecycler" not in f.remedy
    refused = [str(w.message) for w in seen if "leaving site 'proj.1#" in str(w.message)]
    assert refused and all("is used 2 times per" in m for m in refused)


class _OneLayerTwoActivations(nn.Module):
    """One Linear run on two inputs, each call into an activation of its own, or (``op``)
    into F.relu."""

    def __init__(self, op: bool) -> None:
        super().__init__()
        self.op = op
        self.lin = nn.Linear(6, 8)
        self.a, self.b = nn.ReLU(), nn.ReLU()
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.op:
            return self.out(F.relu(self.lin(x)) + F.relu(self.lin(y)))
        return self.out(self.a(self.lin(x)) + self.b(self.lin(y)))


@pytest.mark.parametrize("op", [True, False], ids=["functional", "modules"])
def test_a_layer_feeding_two_sites_is_advised_no_recycling_the_recycler_refuses(op: bool) -> None:
    """One layer run twice into F.relu (two calls of one op: sites #0 and #1), or into two
    activation modules of their own: the findings said the bound recycler would recycle,
    which refused every time (a review). Two activations fed by one layer in a chain (relu
    then a LeakyReLU: the golden loop) are not this: the second takes the first's output,
    and the first the recycler treats."""
    torch.manual_seed(0)
    net = _OneLayerTwoActivations(op)
    with torch.no_grad():
        net.lin.bias[:4] = -50.0
    first, seen = _dead_findings_under_a_recycler(net, functional=op)
    assert len(first) == 2
    for f in first:
        assert "Recycling cannot treat this site: the layer feeding it, 'lin', also feeds" in f.remedy
        assert "is bound to recycle" not in f.remedy
    refused = [str(w.message) for w in seen if "ReDo recycling: leaving site" in str(w.message)]
    assert len(refused) == 2


@pytest.mark.parametrize("with_loss", [False, True])
def test_a_recycling_with_no_training_loss_says_once_that_its_loss_guard_is_off(with_loss):
    """Surgery is judged on the training loss too (a change after which it doubles did not
    help), but only where a loss reaches relu_doctor: a LightningModule in manual
    optimisation that returned nothing had the guard off unsaid (a review). Said once per
    Doctor, however many recyclings; not said where the steps give their loss."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 1))
    with torch.no_grad():  # 6 units of each site dead from the start: two recyclings
        net[0].bias[:6] = -20.0
        net[2].bias[:6] = -20.0
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(net, optimizer=opt, log_every_n_steps=2,
                               overhead_budget=None) as doc:
            rec = DormantRecycler(net, optimizers=opt).bind(doc)
            for _ in range(8):
                loss = net(torch.randn(32, 6)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                doc.step(loss=loss.detach() if with_loss else None)
    recycled = [e for e in doc.to_run().events if e.get("type") == "intervention"
                and e.get("remedy") == rec.name]
    assert len(recycled) >= 2
    said = [str(w.message) for w in caught if "its loss guard" in str(w.message)]
    assert len(said) == (0 if with_loss else 1), said
    if said:
        assert "doc.step(loss=loss)" in said[0] and "return it from training_step" in said[0]
