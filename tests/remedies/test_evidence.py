"""Dead readings a remedy acts on rest on enough collected steps: sampled windows are pooled
(:class:`relu_doctor.remedies.evidence.DeadEvidence`), checked against dead units counted by hand
on the outputs of the collected steps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.remedies import ActivationSwapper, DormantRecycler, LRRescuer, TreatmentPlan
from relu_doctor.remedies.evidence import MIN_EVIDENCE_STEPS, DeadEvidence
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
                # (silent in the window: dead, or too briefly silent to tell)
                single.append((row["dead"] + row["inconclusive"]) / row["units_seen"])
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
    assert "pooled" in evidence.basis()
    # The point of pooling: more units are silent on the single 2-step windows.
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


@pytest.mark.parametrize(("make", "asks"), [
    (lambda m, o: LRRescuer(o), True),
    (lambda m, o: LRRescuer(o, triggers=("exploding_gradient",)), False),
    (lambda m, o: TreatmentPlan(m, optimizer=o), True),
    (lambda m, o: ActivationSwapper(m), True),
    # its units below tau on one batch: ReDo's score is as noisy (an RL trial's recycler
    # acted on 1 collected step a window while the others waited for 8)
    (lambda m, o: DormantRecycler(m, optimizers=o), True),
], ids=["rescuer", "rescuer-no-surge", "plan", "swapper", "recycler"])
@pytest.mark.real_overhead_budget
@pytest.mark.filterwarnings("ignore:relu_doctor. the watch block ended")
def test_a_remedy_reading_dead_units_asks_for_enough_steps_per_window(make: Any, asks: bool) -> None:
    net = _rarely_active()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with relu_doctor.watch(net, optimizer=opt, log_every_n_steps=50) as doc:
        assert doc.sampler.max_every == 50
        make(net, opt).bind(doc)
        assert doc.sampler.max_every == (50 // MIN_EVIDENCE_STEPS if asks else 50)
    with relu_doctor.watch(net, log_every_n_steps=50, every_n_steps=25) as doc:
        make(net, opt).bind(doc)
        assert [doc.sampler.collect(s) for s in range(50)].count(True) == 2  # as the user set


@pytest.mark.real_overhead_budget
def test_under_the_default_budget_a_real_surge_is_caught_as_with_every_step() -> None:
    """A review's case: the learning rate jumps to 3.0 at step 150 and a layer dies. Sampled at
    one step per window (the budget on a tiny model) the pooled reading took until step 650;
    every step caught it at 250. A bound rescuer now has 8 collected steps in every window."""

    def first_rescue(**rate: Any) -> int:
        torch.manual_seed(0)
        x = torch.randn(2048, 16)
        y = (x @ torch.randn(16, 4)).argmax(1)
        net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                            nn.Linear(64, 4))
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(0)
        with relu_doctor.watch(net, optimizer=opt, **rate) as doc:
            LRRescuer(opt, triggers=("dead_surge",)).bind(doc)
            for step in range(1, 401):
                if step == 151:
                    opt.param_groups[0]["lr"] = 3.0
                i = torch.randint(0, 2048, (64,), generator=g)
                loss = nn.functional.cross_entropy(net(x[i]), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
                doc.step()
                if opt.param_groups[0]["lr"] < 3.0 and step > 150:
                    return step  # the rescue cut it
        return 10**9

    every = first_rescue(every_n_steps=1)
    default = first_rescue()
    assert every <= 300 and default <= every + 50, (every, default)


def test_a_resumed_remedy_goes_on_with_the_pool_it_had() -> None:
    def cuts(split: int | None) -> list[int]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.8)
        remedy = LRRescuer(opt, cooldown=0)
        out = []
        for i, dead in enumerate(NOISE + DEATH):
            if i == split:  # a checkpoint half-way through a pool, loaded into a new remedy
                state = remedy.state_dict()
                remedy = LRRescuer(opt, cooldown=0)
                remedy.load_state_dict(state)
            lr = opt.param_groups[0]["lr"]
            remedy(_sampled(10 * (i + 1), dead))
            if opt.param_groups[0]["lr"] < lr:
                out.append(10 * (i + 1))
        return out

    assert cuts(None) == [80]
    assert cuts(6) == cuts(2) == [80]


def test_the_reason_says_pooled_only_when_windows_were_pooled() -> None:
    e = DeadEvidence()
    e.add(_sampled(10, [0], got=9, ran=10))  # one window of 9 collected steps: enough alone
    assert e.pooled is False and e.basis() == "" and e.last_steps == 9
    e.add(_sampled(20, [0]))
    e.add(_sampled(30, [0], got=6))
    assert e.pooled and e.last_steps == 8 and "pooled" in e.basis()


def test_a_site_with_no_reading_at_first_sight_takes_its_first_window_as_the_baseline() -> None:
    """Under a compiled forward no dead fraction is taken at first sight: a site's first
    window was compared with 0, so units dead from initialisation read as a surge and the
    learning rate was cut at the first log (eager: no change). The first window is the
    baseline now; a later rise from it is a surge as before."""
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    rescuer = LRRescuer(opt, triggers=("dead_surge",), dead_jump=0.2, cooldown=0)
    born_dead = [0, 1, 2, 3, 4]
    assert rescuer.decide(_sampled(10, born_dead, got=10)) == []  # (no first_dead: compiled)
    assert opt.param_groups[0]["lr"] == 0.1
    (ev,) = rescuer.decide(_sampled(20, [*born_dead, 5, 6, 7], got=10))
    assert ev.details["trigger"] == "dead_surge" and opt.param_groups[0]["lr"] == 0.05


class _Towers(nn.Module):
    """Two towers side by side, their outputs summed: a NaN in one reaches no site of the
    other."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_a_site_with_non_finite_outputs_gives_no_dead_reading_and_is_not_swapped() -> None:
    """A sweep trial's diverging run: NaN outputs are not > 0, so a NaN-filled site read
    98% dead, the swap replaced its ReLU and LRRescuer cut the learning rate for a dead
    surge. A site with non-finite outputs in the window gives no dead reading (its NaN
    finding stands, its count checked against the test's own hook); a finite site beside
    it still does, and is swapped."""
    torch.manual_seed(0)
    net = _Towers()
    nans: list[int] = []
    net.a[1].register_forward_hook(  # (units with a NaN output, per recorded pass)
        lambda m, a, out: nans.append(int(out.isnan().any(0).sum()))
        if torch.is_grad_enabled() else None)
    events: list[dict[str, Any]] = []
    with relu_doctor.watch(net, log_every_n_steps=2, every_n_steps=1) as doc:
        doc.add_event_listener(events.append)
        ActivationSwapper(net, threshold=0.3, patience=1).bind(doc)
        evidence = DeadEvidence()
        for step in range(4):
            if step == 2:  # tower a diverges (its first layer's weights go NaN), tower b's
                with torch.no_grad():  # units die
                    net.a[0].weight[:6] = float("nan")
                    net.b[0].bias[:6] = -50.0
            net(torch.randn(16, 4)).sum().backward()
            net.zero_grad()
            doc.step()
            if (step + 1) % 2 == 0:
                dead = evidence.add(doc.records[-1])
    row = doc.records[-1].site_row("a.1")
    assert row["nonfinite"] == sum(nans[2:]) == 12  # (unit-steps: 6 units, 2 steps)
    assert any(f.kind == "nonfinite" and f.site == "a.1" for f in doc.records[-1].findings)
    assert dead is not None and "a.1" not in dead and dead["b.1"] == 6 / 8
    swapped = [e["site"] for e in events if e["type"] == "intervention"]
    assert swapped == ["b.1"] and isinstance(net.a[1], nn.ReLU)


def test_a_window_whose_sites_are_all_left_out_answers_no_filling_pool() -> None:
    """A review: a sampled window whose every site was mostly NaN (left out) read as a
    whole window and answered the pool filling from 2 of its 8 steps, a dead reading of
    sampling noise. It answers nothing; a rare Inf (one unit-step of a site's 20) keeps a
    site's reading."""
    units = pd.DataFrame({"site": ["b"] * 4, "unit": range(4),
                          "activation_rate": [0.0, 0.0, 0.5, 0.5]})

    def row(site: str, nonfinite: int) -> dict[str, Any]:
        return {"site": site, "units": 4, "units_seen": 4, "dead": 2, "nonfinite": nonfinite,
                "steps_collected": 2, "steps_run": 10}

    evidence = DeadEvidence()
    assert evidence.add(rec(10, [row("b", 0)], units=units)) is None  # (2 of 8 steps pooled)
    assert evidence.add(rec(20, [row("b", 8)], units=units)) is None  # (all NaN: left out)
    whole = {"steps_collected": 10, "steps_run": 10}
    rare = DeadEvidence().add(rec(30, [{**row("b", 1), **whole}]))
    assert rare == {"b": 0.5}
    mostly = DeadEvidence().add(rec(40, [{**row("b", 20), **whole}]))
    assert mostly == {}


@pytest.mark.parametrize(("act", "stuck_units", "bias"), [
    (nn.GELU, 12, -1.0), (nn.GELU, 12, -30.0), (nn.GELU, 24, -1.0), (nn.SiLU, 32, -30.0)],
    ids=["some-working", "some-silent", "most-working", "all-silent"])
@pytest.mark.parametrize("every", [1, 5], ids=["every-step", "sampled"])
def test_a_leaky_unit_stuck_negative_is_dead_evidence_only_where_it_scores_at_most_tau(
        act: type[nn.Module], stuck_units: int, bias: float, every: int) -> None:
    """A U-Net trial: a healthy GELU feed-forward had a quarter of its units stuck negative
    (GELU at about -1: outputs a sizable share of the layer's, a gradient passed), read as a
    dead surge, and the plan halved the learning rate. Such a unit is working: the dead
    reading a remedy acts on counts a leaky family's dead units only where their ReDo score
    is at most tau (their outputs near 0: GELU at -30), as recycling takes them, where fewer
    than half the units are stuck: with more, the score, relative to the layer's mean, is
    mostly theirs and says nothing (an HF trial's GPT-2 MLP, 127 of 128 units at GELU(-1),
    scored 1.0; every unit at SiLU(-30) scores 1), and all count. Checked against this
    test's own hook: never > 0 over the collected steps, and score (mean |h| over the
    layer's mean of those) at most tau where fewer than half were never > 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), act(), nn.Linear(32, 1))
    opt = torch.optim.SGD(net.parameters(), lr=1e-9)  # (the weights stay where the test puts them)
    outs: list[torch.Tensor] = []
    answers: list[dict[str, float]] = []
    evidence = DeadEvidence()
    with relu_doctor.watch(net, optimizer=opt, log_every_n_steps=10, every_n_steps=every) as doc:
        LRRescuer(opt, triggers=("dead_surge",), cooldown=0, min_lr=0.0).bind(doc)
        tau = doc.config.tau
        grab = net[1].register_forward_hook(
            lambda m, a, o: outs.append(o.detach().double()) if doc.probe.collecting else None)
        for step in range(1, 91):  # (sampled: 2 steps a window, answers pooled over 4)
            if step == 41:  # half the units stuck negative from the fifth window on
                with torch.no_grad():
                    net[0].weight[:stuck_units] *= 0.01
                    net[0].bias[:stuck_units] = bias
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
            record = doc.step()
            if record is not None:
                answer = evidence.add(record)
                if answer is not None:
                    h = torch.cat(outs)
                    outs.clear()
                    mean_abs = h.abs().mean(0)
                    dead = (h > 0).sum(0) == 0
                    few = int(dead.sum()) < 0.5 * len(dead)
                    quiet = dead & (mean_abs / mean_abs.mean() <= tau) if few else dead
                    assert answer["1"] == pytest.approx(float(quiet.double().mean()))
                    answers.append(answer)
        grab.remove()
    reading = answers[-1]["1"]
    cut = opt.param_groups[0]["lr"] < 1e-9
    if bias == -1.0 and stuck_units < 16:
        assert reading == 0.0 and not cut
    else:
        assert reading >= 12 / 32 and cut


def test_leaky_units_silent_too_briefly_to_call_dead_are_not_read_as_working() -> None:
    """A review: sampled windows (2 collected steps each, pooled over 4) of a GELU layer
    whose units 0-15 fire rarely, then from step 41 never (GELU(-30): outputs 0). Silent
    units too briefly silent to call dead in one window have no below_tau flag, and were
    read as working for the whole pool: the pool after they stopped read 0 dead. Each
    answer is checked against this test's own hook over the pooled collected steps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))
    with torch.no_grad():
        net[0].weight[:16] = 0.0
        net[0].weight[:16, 0] = 1.0
        net[0].bias[:16] = -1.9  # (fires where x0 > 1.9: about 3% of inputs)
    outs: list[torch.Tensor] = []
    answers = []
    evidence = DeadEvidence()
    with relu_doctor.watch(net, log_every_n_steps=10, every_n_steps=5) as doc:
        tau = doc.config.tau
        net[1].register_forward_hook(
            lambda m, a, o: outs.append(o.detach().double()) if doc.probe.collecting else None)
        for step in range(1, 121):
            if step == 41:
                with torch.no_grad():
                    net[0].bias[:16] = -30.0
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
            net(x).pow(2).mean().backward()
            record = doc.step()
            if record is not None and (answer := evidence.add(record)) is not None:
                h = torch.cat(outs)
                outs.clear()
                dead = (h > 0).sum(0) == 0
                quiet = dead & (h.abs().mean(0) / h.abs().mean(0).mean() <= tau)
                assert answer["1"] == pytest.approx(float(quiet.double().mean()))
                answers.append((record.step, answer["1"]))
    assert [s for s, _ in answers] == [40, 80, 120] and answers[1][1] == answers[2][1] == 0.5
