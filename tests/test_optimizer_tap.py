"""The optimizer tap's checkpointed window is restored layer by layer (by name)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from relu_doctor.errors import ReluDoctorWarning
from relu_doctor.optimizer_tap import OptimizerTap


def _tap(model: nn.Module) -> OptimizerTap:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return OptimizerTap(model, [opt], is_log_step=lambda: False, collecting=lambda: True).attach()


def _step(model: nn.Module, tap: OptimizerTap) -> None:
    model(torch.randn(4, 3)).sum().backward()
    tap.optimizers[0].step()
    tap.optimizers[0].zero_grad()


def test_a_layer_added_since_the_checkpoint_starts_at_zero_and_the_others_keep_theirs():
    torch.manual_seed(0)
    before = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    tap = _tap(before)
    _step(before, tap)
    state = tap.state_dict()
    expected = dict(zip(tap.layers, state["grad_sq"].tolist(), strict=True))
    # The same model with a PReLU (parameters of its own) in place of the ReLU.
    after = nn.Sequential(before[0], nn.PReLU(), before[2])
    fresh = _tap(after)
    fresh.load_state_dict(state)
    got = dict(zip(fresh.layers, fresh.grad_sq.tolist(), strict=True))
    assert fresh.layers == ["0", "1", "2"] and got == {**expected, "1": 0.0}
    assert fresh.steps == state["steps"] == 1


def test_a_checkpointed_layer_the_model_lacks_is_dropped_with_a_warning():
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2))
    tap = _tap(model)
    _step(model, tap)
    state = tap.state_dict()
    smaller = nn.Sequential(model[0], nn.ReLU(), model[2])
    fresh = _tap(smaller)
    with pytest.warns(ReluDoctorWarning, match=r"lacks \(\['1'\]\)"):
        fresh.load_state_dict(state)
    assert fresh.grad_sq.tolist() == [state["grad_sq"][0].item(), state["grad_sq"][2].item()]
