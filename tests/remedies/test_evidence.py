"""Dead readings a remedy acts on rest on enough collected steps: sampled windows are pooled
(:class:`relu_doctor.remedies.base.DeadEvidence`), checked against dead units counted by hand
on the outputs of the collected steps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.remedies import LRRescuer, TreatmentPlan
from relu_doctor.remedies.base import MIN_EVIDENCE_STEPS, DeadEvidence
from tests.remedies.helpers import rec


def _rarely_active() -> nn.Sequential:
    """A layer whose units fire on a few inputs in a hundred: a 2-step window often reads them
    dead where 8 steps do not."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 2))
    with torch.no_grad():
        net[0].bias.copy_(torch.linspace(-3.5, 0.0, 24))
    return net


def test_pooled_dead_fractions_equal_a_count_over_the_collected_steps() -> None:
    net = _rarely_active()
    outs: list[torch.Tensor] = []
    with relu_doctor.watch(net, log_every_n_steps=8, every_n_steps=4) as doc:
        grab = net[1].register_forward_hook(
            lambda m, a, o: outs.append(o.detach().clone()) if doc.probe.collecting else None
        )
        evidence = DeadEvidence()
        single: list[float] = []
        answers: list[tuple[int, dict[str, float] | None]] = []
        for step in range(64):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
            net(x).sum().backward()
            record = doc.step()
            if record is not None:
                row = record.site_row("1")
                assert row is not None and row["steps_collected"] < row["steps_run"]
                single.append(row["dead_fraction"])
                answers.append((len(outs), evidence.add(record)))
        grab.remove()
    # 2 collected steps per window: an answer every 4th window, on the 8 steps since the last.
    assert [a is None for _, a in answers] == [True, True, True, False] * 2
    start = 0
    for taken, answer in answers:
        if answer is None:
            continue
        assert taken - start == MIN_EVIDENCE_STEPS and evidence.last_steps == MIN_EVIDENCE_STEPS
        h = torch.cat(outs[start:taken])
        want = float(((h > 0).sum(0) == 0).float().mean())  # never active on a collected input
        assert answer["1"] == want
        start = taken
    assert "sampled windows pooled" in evidence.basis()
    # The point of pooling: the single 2-step windows read more units dead.
    pooled = [a["1"] for _, a in answers if a is not None]
    assert max(single) > max(pooled)


def test_a_window_that_collected_every_step_answers_at_once() -> None:
    net = _rarely_active()
    with relu_doctor.watch(net, log_every_n_steps=3, every_n_steps=1) as doc:
        evidence = DeadEvidence()
        for step in range(6):
            net(torch.randn(4, 6, generator=torch.Generator().manual_seed(step))).sum().backward()
            record = doc.step()
            if record is not None:
                row = record.site_row("1")
                assert row is not None
                assert evidence.add(record) == {"1": row["dead_fraction"]}
                assert evidence.basis() == ""


def _sampled(step: int, dead_units: list[int], *, got: int = 2, ran: int = 10) -> Any:
    """A record of site ``a`` (10 units) whose window collected ``got`` of ``ran`` steps and
    found ``dead_units`` never active."""
    rate = np.full(10, 0.3)
    rate[dead_units] = 0.0
    row = {"site": "a", "units": 10, "units_seen": 10, "dead": len(dead_units),
           "dead_fraction": len(dead_units) / 10, "dormant": 0, "leaky": False,
           "steps_collected": got, "steps_run": ran, "activation_rate": 0.3, "mean_abs": 1.0,
           "sparsity": 0.7, "grad_rms": 0.1}
    units = pd.DataFrame({"step": step, "site": "a", "unit": np.arange(10),
                          "activation_rate": rate, "dead": rate == 0,
                          "below_tau": rate == 0, "dormant_score": rate})
    return rec(step, [row], units=units)


# Per window, the units a 2-step sample read dead: noise that moves around, then a real death.
NOISE = [[], [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], []]
DEATH = [[0, 1, 2, 3, 4]] * 4


def _lr_cuts(make: Any, got: int, ran: int) -> tuple[list[int], list[Any]]:
    """The steps at which the remedy cut the learning rate, and the events it returned."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.8)
    remedy = make(opt)
    cuts, events = [], []
    for i, dead in enumerate(NOISE + DEATH):
        lr = opt.param_groups[0]["lr"]
        events += [e for e in remedy(_sampled(10 * (i + 1), dead, got=got, ran=ran))
                   if e.type == "intervention"]
        if opt.param_groups[0]["lr"] < lr:
            cuts.append(10 * (i + 1))
    return cuts, events


@pytest.mark.filterwarnings("ignore:TreatmentPlan")  # its surgery steps: no such model
@pytest.mark.parametrize("make", [
    lambda opt: LRRescuer(opt, cooldown=0),
    lambda opt: TreatmentPlan(nn.Linear(1, 1), optimizer=opt, cooldown=1),
], ids=["LRRescuer", "TreatmentPlan"])
def test_a_surge_is_judged_on_pooled_sampled_windows(make: Any) -> None:
    # Sampled: the noise pools to no dead unit; the real death (4 windows, 8 steps) surges.
    cuts, events = _lr_cuts(make, got=2, ran=10)
    assert cuts == [80]
    for ev in events:  # the plan's go out through its Doctor; the rescuer returns them
        assert ev.details["trigger"] == "dead_surge"
        assert ev.details["evidence"]["dead_fraction"] == 0.5
        assert ev.details["evidence"]["steps_collected"] == 8
    # The same windows, each having collected every step it ran: the noise already surges.
    cuts, events = _lr_cuts(make, got=2, ran=2)
    assert cuts[0] == 20
    assert all(ev.details["evidence"]["steps_collected"] == 2 for ev in events[:1])


def test_records_without_a_unit_table_or_sampling_answer_as_logged() -> None:
    row = {"site": "a", "units_seen": 4, "dead": 1}
    assert DeadEvidence().add(rec(1, [row])) == {"a": 0.25}
    # sampled, but no unit table to pool: answered as logged, never held back forever
    assert DeadEvidence().add(rec(1, [{**row, "steps_collected": 1, "steps_run": 9}])) == {"a": 0.25}
    e = DeadEvidence()
    assert e.add(rec(1, [{"site": "a", "units_seen": 0, "dead": 0}])) == {}
    assert e.model_fraction is None
