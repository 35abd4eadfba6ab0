"""The reading of forwards (relu_doctor._forward_reading): functional capture leaves its mode off
in a module whose ``forward`` provably calls no functional activation.

Every way of calling an activation that the reading cannot follow must leave it unproved, and
a model watched with the reading trusted must give the same sites and the same statistics as
with the mode on wherever a call may come from (the behaviour before the reading), which the
functional tests check against their own reference.
"""

from __future__ import annotations

import copy
import functools
import operator

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.functional import relu as aliased_relu
from torch.nn.modules.transformer import _get_activation_fn

import relu_doctor
from relu_doctor._forward_reading import ForwardReader
from relu_doctor.functional import functional_ops
from tests import zoo
from tests.reference import expected_stats
from tests.reference_functional import assert_matches, reference_calls, site_fields

ACTS = {"relu": F.relu}


def helper(x):  # a function of the user's: it may call anything
    return F.relu(x)


class Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 12)
        self.out = nn.Linear(12, 2)
        self.relu = nn.ReLU()


# ---------------------------------------------------------------------- proved free


class Plain(Base):
    def forward(self, x):
        return self.out(self.relu(self.fc(x)))  # self.relu: a module of the model


class ViaMethod(Base):
    """torchvision's shape: forward calls a method of self, torch.flatten, a comprehension."""

    def forward(self, x):
        return self._forward_impl(x)

    def _forward_impl(self, x):
        h = self.relu(self.fc(torch.flatten(x, 1)))
        parts = [h[:, i::2] for i in range(2)]
        return self.out(torch.cat(parts, 1) * self.scale(len(parts)))

    @staticmethod
    def scale(n):
        return 1.0 / n


class WithList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)])
        self.gain = 2.0

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x * self.gain if self.training else x


PROVED = [Plain, ViaMethod, WithList]


# ---------------------------------------------------------------------- not proved


class Functional(Base):
    def forward(self, x):
        return self.out(F.relu(self.fc(x)))


class TorchRelu(Base):
    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


class TensorMethod(Base):
    def forward(self, x):
        return self.out(self.fc(x).relu())


class Aliased(Base):
    def forward(self, x):
        return self.out(aliased_relu(self.fc(x)))


class FunctionAttribute(Base):
    def __init__(self) -> None:
        super().__init__()
        self.act = F.relu

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


class GlobalDict(Base):
    def forward(self, x):
        return self.out(ACTS["relu"](self.fc(x)))


class DictAttribute(Base):
    def __init__(self) -> None:
        super().__init__()
        self.acts = {"r": F.relu}

    def forward(self, x):
        return self.out(self.acts["r"](self.fc(x)))


class Helper(Base):
    def forward(self, x):
        return self.out(helper(self.fc(x)))


class GetAttr(Base):
    def forward(self, x):
        return self.out(getattr(F, "re" + "lu")(self.fc(x)))


class Super(Plain):
    def forward(self, x):
        return F.relu(super().forward(x))


class Imports(Base):
    def forward(self, x):
        import torch.nn.functional as G

        return self.out(G.relu(self.fc(x)))


class HeldOutside(Base):
    """A module held in a plain attribute (not registered, not part of the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["teacher"] = nn.Sequential(nn.Linear(12, 12), nn.ReLU())

    def forward(self, x):
        return self.out(self.teacher(self.fc(x)))


class ForwardOfChild(Base):
    def forward(self, x):
        return self.out(self.relu.forward(self.fc(x)))  # runs nn.ReLU without its hooks


class ModuleMadeInForward(Base):
    def forward(self, x):
        return self.out(nn.ReLU()(self.fc(x)))


class MethodCalls(Base):
    def forward(self, x):
        return self.out(self.act(self.fc(x)))

    def act(self, h):
        return F.gelu(h)


class StaticShadow(Base):
    """A static method's ``x.relu()``: ``x`` is not ``self``, though self has a ``relu``."""

    def forward(self, x):
        return self.out(self.apply_act(self.fc(x)))

    @staticmethod
    def apply_act(x):
        return x.relu()


class PropertyAct(Base):
    @property
    def act(self):
        return F.relu

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


def _decorate(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        return fn(*a, **k)

    return wrapper


class Decorated(Base):
    @_decorate
    def forward(self, x):
        return self.out(self.relu(self.fc(x)))


class Closure(Base):
    pass


def _closure_forward():
    act = F.relu

    def forward(self, x):
        return self.out(act(self.fc(x)))

    return forward


Closure.forward = _closure_forward()


class Eval(Base):
    def forward(self, x):
        return self.out(eval("F.relu")(self.fc(x)))


class ClassAttribute(Base):
    act = torch.relu  # a torch builtin at class level, not a method of torch's

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


class StaticAttribute(Base):
    act = staticmethod(F.relu)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 12)
        self.act_fn = F.gelu

    def helper(self, h):
        return F.relu(h)


class ChildsFunction(Base):
    """An activation stored on a child module, reached through it."""

    def __init__(self) -> None:
        super().__init__()
        self.holder = Holder()

    def forward(self, x):
        return self.out(self.holder.act_fn(self.fc(x)))


class ChildsMethod(Base):
    """A method of a child in a ModuleList, reached through a subscript."""

    def __init__(self) -> None:
        super().__init__()
        self.holders = nn.ModuleList([Holder()])

    def forward(self, x):
        return self.out(self.holders[0].helper(self.fc(x)))


class TransformerPart(nn.Module):
    """A method of torch's own that calls an activation (the feed-forward block of a
    transformer layer: F.relu), reached through a child."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.layer._ff_block(self.fc(x)))


class TransformerSubclass(nn.TransformerEncoderLayer):
    def __init__(self) -> None:
        super().__init__(6, 2, dim_feedforward=12, dropout=0.0)

    def forward(self, x):
        return self._ff_block(x)


# Found by a review that tried to break the reading (each was proved before it was mended).


class MethodCaller(Base):
    def forward(self, x):
        return self.out(operator.methodcaller("relu")(self.fc(x)))  # a call by name


class TorchHelper(Base):
    def forward(self, x):
        return self.out(_get_activation_fn("relu")(self.fc(x)))  # a private torch helper


class TypeOfChild(Base):
    def forward(self, x):
        return self.out(type(self.relu)()(self.fc(x)))  # a ReLU made in forward


class ShadowedMethod(Base):
    """A method and a child of one name: Python finds the method first."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Identity()  # stored in _modules, behind the class's method

    def act(self, h):  # type: ignore[no-redef]
        return F.relu(h)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


class ShadowedProperty(Base):
    """A property and an instance attribute of one name: the property wins."""

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["act"] = "identity"

    @property
    def act(self):
        return F.relu

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


class NestedSelf(Base):
    """A nested function whose own parameter is named self."""

    def __init__(self) -> None:
        super().__init__()
        self.holder = Holder()
        self.act_fn = nn.Identity()

    def forward(self, x):
        def apply(self, h):
            return self.act_fn(h)

        return self.out(apply(self.holder, self.fc(x)))


class MadeUp(nn.Module):
    """A module whose own __getattr__ makes an activation up."""

    def __getattr__(self, name):
        return F.relu if name == "act" else super().__getattr__(name)


class ChildMakesUp(Base):
    def __init__(self) -> None:
        super().__init__()
        self.acts = MadeUp()

    def forward(self, x):
        return self.out(self.acts.act(self.fc(x)))


class SlowForward(Base):
    """A child's forward run without its hooks, through nn.Module's own method."""

    def __init__(self) -> None:
        super().__init__()
        self.blk = Functional()

    def forward(self, x):
        return self.blk._slow_forward(x)


NOT_PROVED = [MethodCaller, TorchHelper, TypeOfChild, ShadowedMethod, ShadowedProperty,
              NestedSelf, ChildMakesUp, SlowForward, TransformerPart, TransformerSubclass, ClassAttribute, StaticAttribute, ChildsFunction, ChildsMethod, Functional, TorchRelu, TensorMethod, Aliased, FunctionAttribute, GlobalDict,
              DictAttribute, Helper, GetAttr, Super, Imports, HeldOutside, ForwardOfChild,
              ModuleMadeInForward, MethodCalls, StaticShadow, PropertyAct, Decorated, Closure,
              Eval]


def _proved(module: nn.Module, root: nn.Module | None = None) -> bool:
    return ForwardReader((root or module).modules(), functional_ops()).proves(module)


@pytest.mark.parametrize("cls", PROVED, ids=lambda c: c.__name__)
def test_forwards_that_call_no_activation_are_proved(cls):
    assert _proved(cls())


@pytest.mark.parametrize("cls", NOT_PROVED, ids=lambda c: c.__name__)
def test_every_way_of_calling_an_activation_is_left_unproved(cls):
    assert not _proved(cls())


def test_a_forward_set_on_the_instance_is_not_proved():
    net = Plain()
    net.forward = lambda x: F.relu(x)
    assert not _proved(net)


def test_a_child_that_is_not_part_of_the_model_is_not_proved():
    block = Plain()
    assert _proved(block)
    assert not ForwardReader([], functional_ops()).proves(block)


def test_the_benchmark_and_zoo_residual_blocks_are_proved():
    for model in (zoo.ResNetish(), zoo.Bottleneck(), zoo.SmallCNN()):
        for m in model.modules():
            if not type(m).__module__.startswith("torch.nn"):
                assert _proved(m, model), type(m).__name__
    assert not _proved(zoo.DenseLayer())


# ---------------------------------------------------------------------- end to end


class Never:
    """A ``_called_from`` that holds every path: the reading is never trusted (the mode is on
    wherever a call may come from, as before the reading)."""

    def __contains__(self, path: object) -> bool:
        return True

    def add(self, path: object) -> None:
        pass


def _run(net, xs, *, trusted: bool, **kw):
    with relu_doctor.watch(net, functional=True, log_every_n_steps=100, **kw) as doc:
        if not trusted:
            doc._capture._called_from = Never()
        for x in xs:
            net(x).float().pow(2).mean().backward()
            doc.step()
        doc.trusted = doc._capture._trust_reading
    return doc


def _assert_same(a, b):
    assert [s.name for s in a.sites] == [s.name for s in b.sites]
    for sa, sb in zip(a.sites, b.sites, strict=True):
        fa, fb = site_fields(sa), site_fields(sb)
        for name in fa:
            np.testing.assert_array_equal(fa[name], fb[name], err_msg=f"{sa.name} {name}")


class Mixed(nn.Module):
    """Proved blocks beside unproved ones, and a block handed its activation as an argument
    (which no reading sees: the first pass does)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Plain()
        self.b = Functional()
        self.c = ArgAct()
        self.head = nn.Linear(2, 6)

    def forward(self, x):
        h = self.head(self.a(x) + self.b(x))
        return self.c(h, F.silu)


class ArgAct(Base):
    def forward(self, x, act):
        return self.out(act(self.fc(x)))


MODELS = {
    "mixed": (Mixed, (8, 6)),
    "resnetish": (zoo.ResNetish, (2, 3, 8, 8)),
    "checkpointed": (zoo.CheckpointedNet, (2, 3, 6, 6)),
    **{c.__name__: (c, (8, 6)) for c in NOT_PROVED if c is not Eval},
}


@pytest.mark.parametrize("name", MODELS)
def test_trusting_the_reading_changes_no_statistic(name):
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    net = cls()
    twin = copy.deepcopy(net)
    xs = [torch.randn(*shape) for _ in range(3)]
    trusted = _run(net, xs, trusted=True)
    assert trusted.trusted
    _assert_same(trusted, _run(twin, xs, trusted=False))


def test_an_activation_passed_as_an_argument_is_counted_at_every_pass():
    torch.manual_seed(0)
    net = Mixed()
    xs = [torch.randn(8, 6) for _ in range(3)]
    ref = reference_calls(net, [(F, "silu", "silu"), (F, "relu", "relu")],
                          lambda m: [m(x).float().pow(2).mean().backward() for x in xs],
                          skip=(nn.ReLU,))
    doc = _run(net, xs, trusted=True)
    assert [s.name for s in doc.sites] == ["a.relu", "b:relu#0", "c:silu#0"]
    for (path, op, idx), cap in ref.items():
        assert_matches(doc.probe.site(f"{path}:{op}#{idx}"), expected_stats(cap, 1))
    assert site_fields(doc.probe.site("c:silu#0"))["elements"].tolist() == [24.0] * 12


def test_after_the_first_pass_a_proved_model_runs_without_the_mode():
    torch.manual_seed(0)
    net = zoo.ResNetish()
    on: list[bool] = []

    def mode_on(*args):
        stack = [torch._C._get_function_stack_at(i)
                 for i in range(torch._C._len_torch_function_stack())]
        on.append(doc._capture._mode in stack)

    block_on: list[bool] = []

    def block_mode_on(*args):
        mode_on()
        block_on.append(on.pop())

    net.stem[0].register_forward_hook(mode_on)
    net.layer1[0].conv1.register_forward_hook(block_mode_on)
    with relu_doctor.watch(net, functional=True, log_every_n_steps=100) as doc:
        for _ in range(3):
            net(torch.randn(2, 3, 8, 8)).pow(2).mean().backward()
            doc.step()
        hooked = list(doc._capture._hooked)
    assert on == [False, False, False]  # the stem: a Sequential, no mode there
    assert block_on == [True, False, False]  # the first pass checks with the mode on
    assert hooked == [net]  # only the root: passes start and end there


class PreNormLayer(nn.TransformerEncoderLayer):
    """Reuses torch's own blocks, which call the layer's activation (F.relu)."""

    def forward(self, x):
        x = x + self._sa_block(self.norm1(x), None, None)
        return x + self._ff_block(self.norm2(x))


class LayerDrop(nn.Module):
    """Layers 1 and 2 are dropped on the first pass (the one that checks the reading with
    the mode on), run on the later ones: only the reading can keep their calls."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            PreNormLayer(8, 2, 16, dropout=0.0, batch_first=True) for _ in range(3)
        )
        self.head = nn.Linear(8, 1)
        self.passes = 0

    def forward(self, x):
        self.passes += 1
        for i, layer in enumerate(self.layers):
            if self.passes > 1 or i == 0:
                x = layer(x)
        return self.head(x)


def test_calls_missing_from_the_first_pass_are_still_counted():
    torch.manual_seed(0)
    net = LayerDrop()
    twin = copy.deepcopy(net)
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    trusted = _run(net, xs, trusted=True, overhead_budget=None)
    assert trusted.trusted
    assert [s.name for s in trusted.sites] == [f"layers.{i}:relu#0" for i in range(3)]
    _assert_same(trusted, _run(twin, xs, trusted=False, overhead_budget=None))
