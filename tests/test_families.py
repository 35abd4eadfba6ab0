"""The ReLU family: membership, and that each member's traits (active, leaky, nonnegative,
cap) hold for the real PyTorch module, checked numerically rather than taken on trust."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.errors import ReluDoctorError
from relu_doctor.families import FAMILIES, family_by_name, family_of, register_family
from relu_doctor.stats import FIELDS
from tests import reference as ref
from tests import zoo

MEMBERS = sorted(zoo.FAMILY_MODULES)


def fresh(name: str) -> nn.Module:
    return copy.deepcopy(zoo.FAMILY_MODULES[name])


@pytest.mark.parametrize("name", MEMBERS)
def test_each_member_is_recognised_by_its_own_name(name):
    assert family_of(fresh(name)).name == name
    assert family_by_name(name) is family_of(fresh(name))


def test_non_members_are_not_recognised():
    for module in (nn.Linear(2, 2), nn.Tanh(), nn.Sigmoid(), nn.Softplus(), nn.Sequential()):
        assert family_of(module) is None


def test_the_most_specific_class_wins():
    class MyReLU6(nn.ReLU6):
        pass

    assert isinstance(nn.ReLU6(), nn.Hardtanh)
    assert family_of(nn.ReLU6()).name == "relu6"
    assert family_of(MyReLU6()).name == "relu6"


@pytest.mark.parametrize("name", MEMBERS)
def test_active_means_positive_output_and_positive_preactivation(name):
    """README, Definitions: active is output > 0, which for every member equals pre-activation > 0."""
    act = fresh(name)
    x = torch.cat([torch.linspace(-30, 30, 2001), torch.tensor([-1e-6, 1e-6, 0.0])])
    y = act(x)
    np.testing.assert_array_equal((y > 0).numpy(), (x > 0).numpy())


@pytest.mark.parametrize("name", MEMBERS)
def test_leaky_members_pass_gradient_in_the_negative_regime(name):
    act = fresh(name)
    fam = family_of(act)
    # Below every member's lower knee (Hardtanh(-1, 1) passes gradient on (-1, 0), where
    # its output is negative: only below min_val is it "no gradient").
    x = torch.linspace(-5, -1.5, 50, requires_grad=True)
    (grad,) = torch.autograd.grad(act(x).sum(), x)
    assert bool((grad != 0).any()) == fam.leaky
    assert fam.negative_regime


@pytest.mark.parametrize("name", MEMBERS)
def test_nonnegative_and_cap_hold_for_the_real_module(name):
    act = fresh(name)
    fam = family_of(act)
    y = act(50 * torch.randn(10_000))
    if fam.nonnegative:
        assert bool((y >= 0).all())
    else:
        assert bool((y < 0).any())
    cap = fam.cap_of(act)
    assert cap == ref.expected_cap(act)
    if cap is not None:
        assert float(y.max()) == cap  # reached exactly, never exceeded


def test_hardtanh_cap_follows_the_module():
    assert family_of(nn.Hardtanh(-2.0, 3.5)).cap_of(nn.Hardtanh(-2.0, 3.5)) == 3.5


@pytest.fixture
def registry():
    """Restore the family registry after a test registers its own members."""
    saved = dict(FAMILIES)
    yield FAMILIES
    FAMILIES.clear()
    FAMILIES.update(saved)


def test_a_registered_class_is_watched_and_counted(registry, run_watched):
    class Squareplus(nn.Module):
        """Not a subclass of any member: unknown until registered."""

        def forward(self, x):
            return 0.5 * (x + torch.sqrt(x * x + 4.0)) - 1.0

    def model():
        return nn.Sequential(nn.Linear(6, 8), Squareplus(), nn.Linear(8, 2))

    unknown = model()
    with relu_doctor.watch(unknown) as doc:  # not an error at attach: at the first step
        unknown(torch.randn(2, 6))
        with pytest.raises(ReluDoctorError, match="no ReLU-family"):
            doc.step()
    fam = register_family("squareplus", Squareplus, leaky=True)
    assert family_of(Squareplus()) is fam
    case = zoo.Case("squareplus", model, lambda n: 3 * torch.randn(n, 6))
    run = run_watched(case, steps=3)
    (site,) = run.doc.probe.sites()
    assert site.family is fam and site.name == "1"
    total = (site.stats.window + site.stats.lifetime).numpy()
    got = {name: total[i] for i, name in enumerate(FIELDS)}
    expected = ref.expected_stats(run.recorder.calls[("1", 0)], 1)
    assert 0 < expected["active"].sum() < expected["elements"].sum()
    ref.assert_stats_match(got, expected, "registered family")


def test_register_family_rejects_non_modules(registry):
    with pytest.raises(ReluDoctorError, match="module_types"):
        register_family("bad", torch.relu, leaky=False)  # type: ignore[arg-type]


def test_unknown_family_name_lists_the_known_ones():
    with pytest.raises(ReluDoctorError, match="known families") as info:
        family_by_name("swish")
    for name in MEMBERS:
        assert repr(name) in str(info.value)


def test_classes_known_by_name_are_found_without_their_package(registry):
    # A class of that dotted name, as transformers defines it (tests/test_real_models.py
    # runs the real ones): found by name, through subclasses too.
    known = type("NewGELUActivation", (nn.Module,), {"forward": lambda self, x: x})
    known.__module__ = "transformers.activations"
    assert family_of(known()).name == "gelu"

    class Sub(known):
        pass

    assert family_of(Sub()).name == "gelu"
    # the same class name in another module is not known
    assert family_of(type("NewGELUActivation", (nn.Module,), {})()) is None

    # a registered class more specific than the known one wins; a less specific one does not
    class Mine(known):
        pass

    register_family("mine", Mine, leaky=True)
    register_family("any_module", nn.Module, leaky=True)
    assert family_of(Mine()).name == "mine"
    assert family_of(Sub()).name == "gelu"
    assert family_of(nn.Identity()).name == "any_module"
