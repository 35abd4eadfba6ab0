"""Activation checkpointing: recomputed forwards are never counted twice.

The same model (a stem, a BasicBlock with its reused inplace ReLU, a DenseLayer calling F.relu)
runs plain, with reentrant and with non-reentrant ``torch.utils.checkpoint`` around the blocks;
every field of every site must come out the same, gradients included.
"""

from __future__ import annotations

import copy

import pytest
import torch

import relu_doctor
from tests import zoo
from tests.reference_functional import site_fields

SITES = ["stem.1", "block.relu#0", "block.relu#1", "dense:relu#0", "dense:relu#1"]


def _run(mode: str | None, steps: int = 2) -> dict[str, dict]:
    torch.manual_seed(0)
    net = zoo.CheckpointedNet(checkpoint=mode)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with relu_doctor.watch(net, functional=True, optimizer=opt, log_every_n_steps=100) as doc:
        for _ in range(steps):
            x = torch.randn(4, 3, 6, 6, generator=g)
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
            doc.step()
    assert sorted(s.name for s in doc.sites) == sorted(SITES)
    return {s.name: site_fields(s) for s in doc.sites}


@pytest.fixture(scope="module")
def plain() -> dict[str, dict]:
    return _run(None)


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_checkpointed_counts_equal_plain(plain, mode) -> None:
    got = _run(mode)
    for name in SITES:
        for field, want in plain[name].items():
            if field in ("elements", "active", "saturated", "grad_elements", "grad_in_elements", "grad_zero", "nonfinite", "grad_nonfinite"):
                assert (got[name][field] == want).all(), (mode, name, field)
            else:
                torch.testing.assert_close(
                    torch.from_numpy(got[name][field]), torch.from_numpy(want), rtol=1e-5, atol=1e-6,
                    msg=f"{mode} {name} {field}",
                )
    # Two steps, batch 4, 6x6 positions: every unit saw 2 * 4 * 36 forward elements once.
    assert got["block.relu#0"]["elements"].tolist() == [288.0] * 8
    assert got["dense:relu#1"]["grad_elements"].tolist() == [288.0] * 16


def test_recomputation_outside_a_training_step_records_nothing() -> None:
    # torch.autograd.grad through a checkpointed model (a gradient penalty, say) recomputes
    # during backward: forward statistics must not move.
    torch.manual_seed(0)
    net = zoo.CheckpointedNet(checkpoint="non_reentrant")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with relu_doctor.watch(net, functional=True) as doc:
        y = net(x).sum()
        before = {s.name: site_fields(s)["elements"].copy() for s in doc.sites}
        torch.autograd.grad(y, x)
        after = {s.name: site_fields(s)["elements"] for s in doc.sites}
    assert before.keys() == after.keys()
    for name in before:
        assert (before[name] == after[name]).all(), name


def test_plain_and_checkpointed_outputs_are_unchanged_by_watching() -> None:
    torch.manual_seed(0)
    net = zoo.CheckpointedNet(checkpoint="reentrant")
    twin = copy.deepcopy(net)
    x = torch.randn(2, 3, 6, 6)
    with relu_doctor.watch(net, functional=True):
        watched = net(x)
    torch.testing.assert_close(watched, twin(x), rtol=0, atol=0)


class _SegmentOfCalls(torch.nn.Module):
    """A checkpointed segment that is a function (not a module) calling the same ReLU
    module twice, and a module whose forward calls F.relu, twice, through two layers."""

    def __init__(self, mode: str | None) -> None:
        super().__init__()
        self.mode = mode
        self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6)
        self.act = torch.nn.ReLU()
        self.fn = _FRelu()
        self.out = torch.nn.Linear(6, 1)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.b(self.fn(self.act(self.b(self.act(self.a(x)))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return self.out(self.segment(x))
        return self.out(torch.utils.checkpoint.checkpoint(
            self.segment, x, use_reentrant=self.mode == "reentrant"))


class _FRelu(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.relu(x)


@pytest.mark.filterwarnings("error:.*more than one reentrant checkpoint segment")
@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_a_module_called_twice_in_one_segment_gets_each_calls_gradients(mode) -> None:
    """The segment's recomputed calls were counted from 0 at each module called at its top,
    so under reentrant checkpointing ``act#1``'s gradients went to ``act#0`` (pooled) and
    ``act#1`` had none (NaN), silently; module and functional calls alike."""
    fields = {}
    for m in (None, mode):
        torch.manual_seed(0)
        net = _SegmentOfCalls(m)
        with relu_doctor.watch(net, functional=True, log_every_n_steps=100) as doc:
            for i in range(2):
                x = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))
                net(x.requires_grad_()).sum().backward()  # (reentrant: an input with grad)
                doc.step()
        fields[m] = {s.name: site_fields(s) for s in doc.sites}
    assert sorted(fields[None]) == sorted(fields[mode]) == ["act#0", "act#1", "fn:relu#0", "fn:relu#1"]
    for name, want in fields[None].items():
        for field in ("grad_elements", "grad_sq", "grad_zero", "elements", "sum"):
            torch.testing.assert_close(torch.from_numpy(fields[mode][name][field]),
                                       torch.from_numpy(want[field]), msg=f"{name} {field}")


@pytest.mark.filterwarnings("error:.*more than one reentrant checkpoint segment")
def test_a_second_backward_through_a_checkpointed_segment_counts_its_calls_from_0_again() -> None:
    """Two backward passes through one graph in a step (``retain_graph=True``, a gradient
    penalty): reentrant checkpointing recomputes the segment in each, on the same autograd
    node. Numbered by the node alone, the second pass's calls went on from the first's
    (``act#1``, ``act#2``: gradients dropped or counted into another site)."""
    fields = {}
    for m in (None, "reentrant"):
        torch.manual_seed(0)
        net = _SegmentOfCalls(m)
        with relu_doctor.watch(net, functional=True, log_every_n_steps=100) as doc:
            for i in range(2):
                x = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))
                y = net(x.requires_grad_())
                y.sum().backward(retain_graph=True)
                y.pow(2).sum().backward()
                doc.step()
        fields[m] = {s.name: site_fields(s) for s in doc.sites}
    assert sorted(fields[None]) == sorted(fields["reentrant"])
    for name, want in fields[None].items():
        for field in ("grad_elements", "grad_sq", "grad_zero"):
            torch.testing.assert_close(torch.from_numpy(fields["reentrant"][name][field]),
                                       torch.from_numpy(want[field]), msg=f"{name} {field}")


class _SharedActTwoSegments(torch.nn.Module):
    """One activation module called in each of two checkpointed blocks (one ``self.act``)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.a, self.b, self.out = (torch.nn.Linear(4, 6), torch.nn.Linear(6, 6),
                                    torch.nn.Linear(6, 1))
        self.act = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reentrant
        h = torch.utils.checkpoint.checkpoint(lambda t: self.act(self.a(t)), x, use_reentrant=r)
        return self.out(torch.utils.checkpoint.checkpoint(lambda t: self.act(self.b(t)), h,
                                                          use_reentrant=r))


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_module_in_two_reentrant_segments_is_said_to_have_its_gradients_pooled(reentrant):
    """Each reentrant segment numbers its recomputed calls from 0, so the two calls' gradient
    statistics went to act#0 (pooled) and act#1 had none, silently: one warning says so
    (non-reentrant checkpointing taps the original calls: right, and nothing said)."""
    import warnings

    from relu_doctor.errors import ReluDoctorWarning

    torch.manual_seed(0)
    net = _SharedActTwoSegments(reentrant)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with relu_doctor.watch(net, log_every_n_steps=100) as doc:
            for _ in range(2):
                net(torch.randn(8, 4).requires_grad_()).sum().backward()
                doc.step()
    said = [str(w.message) for w in seen if issubclass(w.category, ReluDoctorWarning)
            and "more than one reentrant checkpoint segment" in str(w.message)]
    assert len(said) == (1 if reentrant else 0), said
    if reentrant:
        assert "'act'" in said[0]
    grads = {s.name: site_fields(s)["grad_elements"].sum() for s in doc.sites}
    assert (grads["act#1"] == 0) == reentrant  # what the warning is about
