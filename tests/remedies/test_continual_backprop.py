"""ContinualBackprop against a hand computation: contribution utility = running average of
mean |h| x outgoing |w|, maturity, the accumulated replacement count, the lowest-utility mature
units recycled with ReDo's surgery."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies import ContinualBackprop


def _net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _contribution(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(net[0](x)).detach().double()
    return h.abs().mean(0) * net[2].weight.detach().double().abs().sum(0)


def test_replaces_the_lowest_utility_units_like_the_reference() -> None:
    net = _net()
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    w1, w2 = net[0].weight.detach().clone(), net[2].weight.detach().clone()
    with torch.no_grad():
        expected = _contribution(net, x)
    with relu_doctor.watch(net, log_every_n_steps=1, every_n_steps=1) as doc:
        cbp = ContinualBackprop(net, replacement_rate=0.25, maturity=0, decay=0.0).bind(doc)
        net(x).sum().backward()
        doc.step()
        events = doc.to_run().interventions()
    lowest = sorted(torch.argsort(expected)[:2].tolist())  # floor(0.25 * 8 mature * 1 step)
    assert len(events) == 1 and events[0]["details"]["units"] == lowest
    for u in range(8):
        if u in lowest:
            assert not torch.equal(net[0].weight[u], w1[u])
            assert torch.count_nonzero(net[2].weight[:, u]) == 0
        else:
            assert torch.equal(net[0].weight[u], w1[u]) and torch.equal(net[2].weight[:, u], w2[:, u])
    util = cbp.utility["1"]
    keep = [u for u in range(8) if u not in lowest]
    assert torch.allclose(util[keep], expected[keep], rtol=1e-6)
    assert util[lowest].abs().sum() == 0 and cbp.age["1"][lowest].sum() == 0


def test_running_average_and_maturity() -> None:
    net = _net()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(16, 4, generator=g) for _ in range(3)]
    decay = 0.5
    with relu_doctor.watch(net, log_every_n_steps=1, every_n_steps=1) as doc:
        cbp = ContinualBackprop(net, replacement_rate=0.1, maturity=3, decay=decay).bind(doc)
        ref = torch.zeros(8, dtype=torch.float64)
        for i, x in enumerate(xs):
            net(x).sum().backward()
            doc.step()
            c = _contribution(net, x)  # weights unchanged: nothing replaced yet
            ref = decay * ref + (1 - decay) * c
            if i < 2:  # no unit is 3 steps old yet: nothing owed, nothing replaced
                assert torch.allclose(cbp.utility["1"], ref, rtol=1e-6)
                assert not doc.to_run().interventions()
    # at step 3 all 8 units are mature: 0.1 * 8 = 0.8 owed, still no whole unit
    assert not doc.to_run().interventions()
    assert cbp._owed["1"] == pytest.approx(0.8)
    assert torch.allclose(cbp.utility["1"], ref, rtol=1e-6)


def test_arguments_are_checked() -> None:
    with pytest.raises(ReluDoctorError, match="replacement_rate"):
        ContinualBackprop(_net(), replacement_rate=2.0)
    with pytest.raises(ReluDoctorError, match="decay"):
        ContinualBackprop(_net(), decay=1.0)
    assert math.isclose(ContinualBackprop(_net()).replacement_rate, 1e-4)


def test_state_dict_round_trip() -> None:
    net = _net()
    a = ContinualBackprop(net, replacement_rate=0.01)
    a.utility["1"] = torch.arange(8, dtype=torch.float64)
    a.age["1"] = torch.arange(8)
    a._links_failed.add("3")  # a site it declined: a resumed run does not decline it again
    b = ContinualBackprop(net)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.utility["1"], a.utility["1"]) and torch.equal(b.age["1"], a.age["1"])
    assert b._links_failed == {"3"}


class _TwoBranches(nn.Module):
    """Two ReLU branches concatenated into one Linear: each site owns its own columns."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.ra = nn.Linear(6, 5), nn.ReLU()
        self.b, self.rb = nn.Linear(6, 7), nn.ReLU()
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.ra(self.a(x)), self.rb(self.b(x))], dim=1))


def test_outgoing_magnitude_reads_each_sites_own_columns_and_a_norms_scale() -> None:
    """After a concatenation, a site's outgoing weights are its own columns (the utility
    raised "shape '[5, 1]' is invalid for input of size 12" and the remedy stopped for
    every site); a norm reading the units gives each its own scale (each got the sum of
    all of them)."""
    from relu_doctor.remedies import find_unit_links
    from relu_doctor.remedies.continual_backprop import outgoing_magnitude

    torch.manual_seed(0)
    net = _TwoBranches()
    x = torch.randn(4, 6)
    col = net.out.weight.detach().abs().sum(0).double()
    for site, want in (("ra", col[:5]), ("rb", col[5:])):
        got = outgoing_magnitude(find_unit_links(net, site=site, example_inputs=x))
        assert torch.allclose(got, want), site
    bn = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 3))
    with torch.no_grad():
        bn[2].weight.copy_(torch.linspace(-1.5, 1.0, 6))
    got = outgoing_magnitude(find_unit_links(bn, site="1", example_inputs=torch.randn(5, 4)))
    assert torch.allclose(got, bn[2].weight.detach().abs().double())
    # In training, both sites of the concatenation are treated, with nothing said failed.
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with relu_doctor.watch(net, log_every_n_steps=5, overhead_budget=None, optimizer=opt) as doc:
        ContinualBackprop(net, optimizers=opt, replacement_rate=0.05, maturity=5).bind(doc)
        for _ in range(10):
            net(torch.randn(16, 6)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
        events = doc.to_run().interventions()
    assert {e["site"] for e in events} == {"ra", "rb"}


def test_units_are_ranked_by_utility_corrected_for_their_age() -> None:
    """A unit replaced ``age`` steps ago has a running average that started at 0: ranked
    by it raw, it is the lowest again as soon as it is mature, and is replaced again and
    again; the paper's code divides by ``1 - decay**age``."""
    decay = 0.9
    cbp = ContinualBackprop(_net(), replacement_rate=1 / 3, maturity=5, decay=decay)
    contribution = torch.tensor([0.5, 0.5, 0.4], dtype=torch.float64)
    age = torch.tensor([100, 5, 100])
    cbp.age["1"] = age
    cbp.utility["1"] = contribution * (1 - decay ** age.double())  # a steady contribution
    assert cbp.choose("1", steps=1) == [2]  # the lowest contribution, not the youngest
    assert torch.allclose(cbp.corrected("1"), contribution)
