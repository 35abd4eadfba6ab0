"""Parking the hooks on steps that collect nothing (relu_doctor._hooks.HookSet, Probe).

Parked hooks are out of torch's hook dicts; put back, each is under its handle's id and in its
place among the hooks of others, so call order and ``handle.remove()`` are what they were.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor._hooks import HookSet


def _calls(module: nn.Module, log: list[str], x: torch.Tensor) -> list[str]:
    log.clear()
    module(x)
    return list(log)


def _hook(log: list[str], name: str):
    def fn(*args, **kwargs):
        log.append(name)

    return fn


def test_unparked_hooks_run_in_their_old_order_among_the_users():
    m = nn.ReLU()
    log: list[str] = []
    x = torch.randn(3)
    hs = HookSet()
    user_before = m.register_forward_hook(_hook(log, "user-before"))
    hs.add(m.register_forward_pre_hook(_hook(log, "ours-pre")))
    hs.add(m.register_forward_hook(_hook(log, "ours-always"), always_call=True))
    gone = m.register_forward_hook(_hook(log, "user-removed-while-parked"))
    hs.add(m.register_forward_hook(_hook(log, "ours-kwargs"), with_kwargs=True))
    m.register_forward_hook(_hook(log, "user-after"))
    before = _calls(m, log, x)
    assert before == [
        "ours-pre", "user-before", "ours-always", "user-removed-while-parked", "ours-kwargs",
        "user-after",
    ]

    hs.park()
    assert hs.parked
    assert _calls(m, log, x) == ["user-before", "user-removed-while-parked", "user-after"]
    # what torch's fast path tests is empty; the flags beside (read only for hooks found in
    # these) are left
    assert not m._forward_pre_hooks and len(m._forward_hooks) == 3  # the three users'
    gone.remove()
    m.register_forward_hook(_hook(log, "user-prepended-while-parked"), prepend=True)
    m.register_forward_hook(_hook(log, "user-added-while-parked"))
    hs.park()  # idempotent
    hs.unpark()
    assert not hs.parked
    assert _calls(m, log, x) == [
        "ours-pre", "user-prepended-while-parked", "user-before", "ours-always", "ours-kwargs",
        "user-after", "user-added-while-parked",
    ]
    hs.unpark()  # idempotent
    user_before.remove()
    assert "user-before" not in _calls(m, log, x)


def test_handles_removed_or_added_while_parked():
    m = nn.ReLU()
    log: list[str] = []
    x = torch.randn(3)
    hs = HookSet()
    a = hs.add(m.register_forward_hook(_hook(log, "a")))
    hs.add(m.register_forward_hook(_hook(log, "b")))
    hs.park()
    hs.remove([a])  # removed for good: never comes back
    hs.add(m.register_forward_hook(_hook(log, "c")))  # parked at once
    assert _calls(m, log, x) == []
    assert len(hs) == 2
    hs.unpark()
    assert _calls(m, log, x) == ["b", "c"]
    hs.park()
    hs.clear()
    hs.unpark()
    assert _calls(m, log, x) == [] and len(hs) == 0 and not m._forward_hooks


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8))
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(nn.functional.relu(self.act(self.body(x))))


def _hook_counts(model: nn.Module) -> list[tuple[int, int]]:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


def _train(model, doc, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 5, generator=g)).square().mean().backward()
        opt.step()
        doc.step()


def test_a_run_that_parks_records_what_one_that_never_parks_does(monkeypatch):
    """every_n_steps=3 with parking against the same run with the hooks left in place (the
    hooks returning at once on the steps between): the same passes, the same statistics."""
    results = []
    for park in (True, False):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with relu_doctor.watch(
            model, optimizer=opt, every_n_steps=3, overhead_budget=None, log_every_n_steps=6
        ) as doc:
            doc.probe._compiled = not park  # what keeps a compiled model's hooks in place
            counts = _hook_counts(model)
            _train(model, doc, opt, 4)
            assert doc.probe.collecting is False
            parked = all(n == (0, 0) for n in _hook_counts(model))
            assert parked is park
            _train(model, doc, opt, 8)
            assert _hook_counts(model) == (counts if not parked else _hook_counts(model))
            results.append(
                (doc.probe.passes, doc.to_pandas().drop(columns=["wall_time"], errors="ignore"))
            )
        assert all(n == (0, 0) for n in _hook_counts(model)), "detach removes parked hooks"
    (p1, f1), (p2, f2) = results
    assert p1 == p2 == 4
    assert f1.equals(f2)


def test_a_module_swapped_in_while_parked_is_watched_at_the_next_collecting_step():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with relu_doctor.watch(model, optimizer=opt, every_n_steps=2, overhead_budget=None) as doc:
        _train(model, doc, opt, 1)
        assert not doc.probe.collecting
        old = model.act
        model.act = nn.LeakyReLU(0.1)  # a remedy's swap, while the hooks are parked
        doc.probe.refresh()  # ... and its refresh: the new hooks are parked too
        assert all(n == (0, 0) for n in _hook_counts(model))
        _train(model, doc, opt, 1)
        assert doc.probe.collecting
        assert model.act._forward_hooks and model.act._forward_pre_hooks
        _train(model, doc, opt, 1)
        assert not old._forward_hooks and not old._forward_pre_hooks
        site = {s.name: s for s in doc.probe.sites()}["act"]
        assert site.family.name == "leaky_relu"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_compiled_model_keeps_its_hooks_and_is_not_retraced():
    """Under torch.compile the hooks are part of the graph: parking them would change what
    Dynamo guards on, so they stay, and steps alternating collecting and not compile once."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net()
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relu_doctor.watch(
            model, optimizer=opt, every_n_steps=2, overhead_budget=None
        ) as doc:
            counts = _hook_counts(model)
            torch._dynamo.utils.counters.clear()
            _train(compiled, doc, opt, 5)
            assert doc.probe._compiled
            assert _hook_counts(model) == counts
            frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            _train(compiled, doc, opt, 4)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    torch._dynamo.reset()
