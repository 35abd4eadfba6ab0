"""Learning-rate rescue (relu_doctor.remedies.lr): scale_lr continued by every kind of
scheduler, the rescuer's triggers, cooldown and checkpoints, and an LR that kills units
stopped, against the same seed untreated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relu_doctor
from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies import LRRescuer, scale_lr
from tests.remedies.helpers import (
    EXPLODING,
    dead_fraction,
    events_of,
    half_dead,
    hidden,
    mlp,
    rec,
    regression,
    site_row,
)
from tests.zoo import odd_name_net

SCHEDULERS = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [4, 7], gamma=0.3),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "CosineWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=4),
    # a floor the schedule goes to: the cut kept as a factor, not drifting to it
    "CosineAnnealingLR-eta_min": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(
        o, T_max=10, eta_min=0.02),
    "CosineWarmRestarts-eta_min": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        o, T_0=4, eta_min=0.02),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=1.0, total_steps=20, cycle_momentum=False
    ),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(
        o, base_lr=0.01, max_lr=0.1, step_size_up=3, cycle_momentum=False
    ),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=5),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [
            torch.optim.lr_scheduler.LinearLR(o, 0.5, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.8),
        ],
        milestones=[3],
    ),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=2),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
        ]
    ),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scale_lr_survives_the_scheduler(name):
    """After a rescue at step 4, every later lr is factor x the unrescued schedule."""
    runs = []
    for rescue in (False, True):
        w = nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD(
            [{"params": [w]}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.3}],
            lr=0.1,
            momentum=0.9,
        )
        sched = SCHEDULERS[name](opt)
        lrs = []
        for step in range(12):
            if rescue and step == 4:
                changes = scale_lr(opt, factor=0.25, schedulers=[sched])
                assert [c["factor"] for c in changes] == [0.25, 0.25]
            opt.step()
            if name == "ReduceLROnPlateau":
                sched.step(1.0)
            else:
                sched.step()
            lrs.append([g["lr"] for g in opt.param_groups])
        runs.append(np.array(lrs))
    plain, rescued = runs
    np.testing.assert_allclose(rescued[:4], plain[:4])
    np.testing.assert_allclose(rescued[4:], 0.25 * plain[4:], rtol=1e-9)


def test_scale_lr_floor_and_errors():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    changes = scale_lr(opt, factor=0.1, min_lr=5e-4, schedulers=[sched])
    assert changes[0]["lr_after"] == 5e-4 and changes[0]["factor"] == 0.5
    assert sched.base_lrs == [5e-4]
    assert scale_lr(opt, factor=0.1, min_lr=5e-4)[0]["factor"] == 1.0  # at the floor: unchanged
    with pytest.raises(ReluDoctorError, match="factor"):
        scale_lr(opt, factor=1.5)
    with pytest.raises(ReluDoctorError, match="optimizer"):
        scale_lr("sgd", factor=0.5)  # type: ignore[arg-type]
    with pytest.raises(ReluDoctorError, match="optimizer"):
        scale_lr([opt], factor=0.5)  # type: ignore[arg-type]
    with pytest.raises(ReluDoctorError, match="min_lr"):
        scale_lr(opt, factor=0.5, min_lr=-1.0)


def test_rescuer_arguments_are_validated():
    with pytest.raises(ReluDoctorError, match="factor"):
        LRRescuer(factor=1.0)
    with pytest.raises(ReluDoctorError, match="dead_jump"):
        LRRescuer(dead_jump=0.0)
    with pytest.raises(ReluDoctorError, match="cooldown"):
        LRRescuer(cooldown=-1)
    with pytest.raises(ReluDoctorError, match="triggers"):
        LRRescuer(triggers=["loss"])
    with pytest.raises(ReluDoctorError, match="optimizer"):
        LRRescuer().rescue()


def test_a_spike_read_once_on_few_steps_triggers_no_remedy():
    """A gradient spike read once on fewer than MIN_SPIKE_STEPS collected steps is a
    warning (a DQN's transient right after its target sync, see the diagnosis): the learning
    rate rescuer and the plan do not act on it, and a change is not judged against it; the
    same spike read as critical triggers both."""
    from dataclasses import replace as with_

    from relu_doctor.remedies import TreatmentPlan
    from relu_doctor.remedies.evidence import model_snapshot

    transient = with_(EXPLODING, severity="warning")
    quiet = [site_row("a", 0.0)]
    for finding, acts in ((transient, False), (EXPLODING, True)):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.8)
        r = LRRescuer(opt, factor=0.5)
        r(rec(10, quiet))
        assert bool(r(rec(20, quiet, findings=[finding]))) == acts
        assert (opt.param_groups[0]["lr"] == 0.4) == acts
        assert model_snapshot(rec(20, quiet, findings=[finding]))["exploding_gradient"] == acts
        net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        plan = TreatmentPlan(net, optimizer=torch.optim.SGD(net.parameters(), lr=0.8))
        trigger = plan._model_trigger(rec(20, quiet, findings=[finding]))
        assert (trigger is not None and trigger[0] == "exploding_gradient") == acts


def test_rescuer_triggers_cooldown_and_state():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.8)
    r = LRRescuer(opt, factor=0.5, cooldown=2, min_lr=0.09)
    quiet = [site_row("a", 0.0)]
    assert r(rec(10, quiet)) == []
    ev = r(rec(20, quiet, findings=[EXPLODING]))
    assert len(ev) == 1 and ev[0].details["trigger"] == "exploding_gradient"
    assert opt.param_groups[0]["lr"] == 0.4 and "0.8 -> 0.4" in ev[0].what
    assert ev[0].before["exploding_gradient"] is True
    # Two intervals of cooldown: the explosion persists, nothing happens.
    out = r(rec(30, quiet, findings=[EXPLODING]))
    assert [e.type for e in out] == ["intervention_result"] and out[0].ref == ev[0].id
    state = r.state_dict()
    r2 = LRRescuer(opt, factor=0.5, cooldown=2, min_lr=0.09)
    r2.load_state_dict(state)
    for rr in (r, r2):
        assert rr(rec(40, quiet, findings=[EXPLODING])) == []
    assert opt.param_groups[0]["lr"] == 0.4
    # A surge of dead units (0 -> 0.5) fires after the cooldown.
    ev = r(rec(50, [site_row("a", 0.5)]))
    assert ev[0].details["trigger"] == "dead_surge" and ev[0].details["evidence"]["site"] == "a"
    assert opt.param_groups[0]["lr"] == 0.2
    r(rec(60, quiet)), r(rec(70, quiet))
    ev = r(rec(80, quiet, findings=[EXPLODING]))
    assert opt.param_groups[0]["lr"] == 0.1 and len(ev) == 1
    r(rec(90, quiet)), r(rec(100, quiet))
    ev = r(rec(110, quiet, findings=[EXPLODING]))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.09) and "floor" in ev[0].what
    r(rec(120, quiet)), r(rec(130, quiet))
    assert r(rec(140, quiet, findings=[EXPLODING])) == []  # at the floor: no event
    assert not r.pending  # and nothing awaits a result


@pytest.mark.parametrize("name", ["enc:act", "a#1"])
def test_rescue_on_a_surge_at_a_site_whose_name_looks_like_a_site(name):
    torch.manual_seed(0)
    net = odd_name_net(name)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(32, 4)
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        seen = events_of(doc)
        LRRescuer(opt, factor=0.5, dead_jump=0.3).bind(doc)
        net(x).sum().backward()
        doc.step()  # healthy
        half_dead(net)
        net(x).sum().backward()
        doc.step()  # half the units of `name` die at once
    (iv,) = [e for e in seen if e["type"] == "intervention"]
    assert iv["details"]["trigger"] == "dead_surge"
    assert iv["details"]["evidence"]["site"] == name
    assert iv["details"]["evidence"]["dead_fraction"] == 0.5
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("remedy", ["rescuer", "plan"])
def test_units_dead_from_the_start_are_no_surge_and_those_that_die_later_are(remedy):
    """A site's first reading is compared with its dead fraction on its first call (the
    record's first_dead, checked against the test's own forward): units born dead set off
    no rescue (a lower learning rate or clipping cannot revive them), units that die later
    do, from that baseline."""
    from relu_doctor.remedies import PlanStep, TreatmentPlan

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        net[0].bias[:6] = -100.0  # 6 of 16 born dead
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(32, 4, generator=g) for _ in range(6)]
    with torch.no_grad():  # the test's own first call: which units never fire on it
        born = float((net[1](net[0](xs[0])) <= 0).all(0).float().mean())
    assert born == pytest.approx(6 / 16)
    with relu_doctor.watch(net, log_every_n_steps=2, every_n_steps=1, optimizer=opt) as doc:
        seen = events_of(doc)
        if remedy == "rescuer":
            LRRescuer(opt, factor=0.5, dead_jump=0.2).bind(doc)
        else:
            TreatmentPlan(net, optimizer=opt, steps=[PlanStep("lr")], dead_jump=0.2).bind(doc)
        records = []
        for i, x in enumerate(xs):
            if i == 4:  # after the second log, 6 more units die
                with torch.no_grad():
                    net[0].bias[6:12] = -100.0
            opt.zero_grad()
            net(x).sum().backward()
            opt.step()
            records.append(doc.step())
    logged = [r for r in records if r is not None]
    assert logged[0].first_dead == {"1": pytest.approx(born)} and logged[1].first_dead == {}
    ivs = [e for e in seen if e["type"] == "intervention"]
    assert [(e["step"], e["details"]["trigger"]) for e in ivs] == [(6, "dead_surge")]
    evidence = ivs[0]["details"]["evidence"]
    assert evidence["dead_fraction_before"] == pytest.approx(born)  # the first log's reading
    assert evidence["dead_fraction"] == pytest.approx(12 / 16)


def test_lr_rescue_stops_an_lr_that_kills_units():
    """lr 0.2 with momentum (after a warmup) kills most units; the rescue cuts it on the first
    surge of dead units and the warmup schedule keeps the cut."""
    x, y = regression(1)
    xt, yt = regression(2)

    def run(treat: bool) -> tuple[float, float, float, list[dict]]:
        torch.manual_seed(0)
        net = mlp(d_out=1)
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: min(1.0, (e + 1) / 50))
        with relu_doctor.watch(net, log_every_n_steps=10, optimizer=opt) as doc:
            seen = events_of(doc)
            if treat:
                LRRescuer(opt, schedulers=[sched], factor=0.3, cooldown=1).bind(doc)
            for _ in range(300):
                i = torch.randint(0, len(x), (32,))
                opt.zero_grad()
                F.mse_loss(net(x[i]), y[i]).backward()
                opt.step()
                sched.step()
                doc.step()
        with torch.no_grad():
            loss = float(F.mse_loss(net(xt), yt))
        evs = [e for e in seen if e.get("type") == "intervention"]
        return dead_fraction(hidden(net, xt)[1]), loss, opt.param_groups[0]["lr"], evs

    dead_u, loss_u, lr_u, _ = run(False)
    dead_t, loss_t, lr_t, events = run(True)
    print(f"dead fraction {dead_u:.3f} -> {dead_t:.3f}, loss {loss_u:.3f} -> {loss_t:.3f}")
    assert events and events[0]["details"]["trigger"] == "dead_surge"
    assert lr_u == pytest.approx(0.2) and lr_t == pytest.approx(0.2 * 0.3 ** len(events))
    assert dead_u > 0.8 and dead_t < dead_u - 0.2, (dead_u, dead_t)
    assert loss_t < loss_u / 2, (loss_u, loss_t)


@pytest.mark.parametrize("writer", [True, False])
def test_a_remedys_first_change_at_a_site_is_said_once_on_the_writing_process(writer: bool) -> None:
    """A remedy changing the training is never silent: its first change at a site is one
    ReluDoctorWarning naming the step, the remedy, the site and what changed; later ones
    are in the record only. A process that does not write (another DDP rank) says nothing."""
    import warnings

    from relu_doctor.errors import ReluDoctorWarning

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with relu_doctor.watch(net, optimizer=opt, is_writer=writer) as doc:
        rescuer = LRRescuer(opt).bind(doc)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            rescuer.rescue(step=3, reason="test")
            rescuer.rescue(step=4, reason="test")
    said = [str(w.message) for w in seen if issubclass(w.category, ReluDoctorWarning)
            and "changed the training" in str(w.message)]
    events = [e for e in doc.to_run().events if e.get("type") == "intervention"]
    assert len(events) == 2
    if writer:
        assert len(said) == 1
        assert said[0].startswith(f"relu_doctor: step {events[0]['step']}: lr_rescue changed "
                                  "the training at model: ")
        assert events[0]["what"].rstrip(".") in said[0]
    else:
        assert said == []


def test_a_cosine_floor_is_scaled_only_when_every_group_was_cut_and_never_below_min_lr():
    """eta_min is one for all groups: a group the cut left alone (at min_lr already) keeps
    it, and a floor scaled below the rescuer's min_lr would take the schedule there."""
    def cosine(lrs, eta_min):
        opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=eta_min)

    opt, sched = cosine([0.1, 1e-4], 5e-5)
    changes = scale_lr(opt, factor=0.5, min_lr=1e-4, schedulers=[sched])
    assert [c["factor"] for c in changes] == [0.5, 1.0] and sched.eta_min == 5e-5
    opt, sched = cosine([0.3, 0.2], 0.01)  # (0.03/0.3 and 0.02/0.2 differ in the last bit)
    scale_lr(opt, factor=0.1, schedulers=[sched])
    assert sched.eta_min == pytest.approx(0.001)
    opt, sched = cosine([1e-3], 1.5e-4)
    scale_lr(opt, factor=0.5, min_lr=1e-4, schedulers=[sched])
    assert sched.eta_min == 1e-4
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] >= 1e-4 - 1e-12


@pytest.mark.parametrize("kind", ["lambda", "onecycle", "plateau", "none", "loaded"])
@pytest.mark.parametrize("passed", [False, True])
def test_a_scheduler_not_given_to_the_rescue_is_said_once(kind: str, passed: bool) -> None:
    """A LambdaLR warmup not passed to LRRescuer(schedulers=) undid each cut at its next
    step, silently, while the record said the rate was halved (a schedulers trial). Where
    the optimizer has a scheduler (its groups hold "initial_lr") that was not passed, one
    warning says so (OneCycleLR, whose values the rescue scales in the groups, keeps the
    cut, but is not told apart); a ReduceLROnPlateau, which keeps it, or none (an optimizer
    whose state was saved beside one included): no warning."""
    import warnings

    from relu_doctor.errors import ReluDoctorWarning

    net = nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.4)
    sched = {"lambda": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
             "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, 0.4, total_steps=100),
             "plateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
             "none": lambda: None, "loaded": lambda: None}[kind]()
    if kind == "loaded":  # a state saved beside a scheduler keeps its 'initial_lr' (a review)
        had = torch.optim.SGD(net.parameters(), lr=0.4)
        torch.optim.lr_scheduler.LambdaLR(had, lambda s: 1.0)
        opt.load_state_dict(had.state_dict())
        assert "initial_lr" in opt.param_groups[0]
    rescuer = LRRescuer(opt, schedulers=[sched] if passed and sched is not None else ())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            before = opt.param_groups[0]["lr"]
            rescuer.rescue(step=1)
            assert opt.param_groups[0]["lr"] == pytest.approx(before * 0.5)
            opt.step()
            if kind == "lambda":
                sched.step()
                undone = opt.param_groups[0]["lr"] >= before * 0.9  # (the phenomenon itself)
                assert undone != passed
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    expected = kind in ("lambda", "onecycle") and not passed
    assert len(said) == expected, said
    if expected:
        assert "was not given to the rescue" in said[0] and "schedulers=[sched]" in said[0]


class _Branched(nn.Module):
    """A layer ``a``, then a ``branch`` taken on the passes told so (an expert the router
    picks, a branch taken sometimes), then the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.branch = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor, taken: bool) -> torch.Tensor:
        h = self.a(x)
        return self.out(self.branch(h) if taken else h)


@pytest.mark.parametrize("by", ["LRRescuer", "TreatmentPlan"])
@pytest.mark.parametrize("every_pass", [True, False])
def test_a_site_run_in_few_passes_of_a_window_sets_off_no_surge(every_pass, by):
    """An expert the router starved ran in 1 of a window's 10 passes, its units dead on
    that batch: a 'dead surge' cut the whole model's learning rate, judged 'helped' once it
    got tokens again (an MoE trial). A site run in fewer than half of the window's passes
    is read as not run there; run in every pass, the same death is a surge."""
    import relu_doctor

    torch.manual_seed(0)

    net = _Branched()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with relu_doctor.watch(net, log_every_n_steps=10, overhead_budget=None) as doc:
        if by == "LRRescuer":
            LRRescuer(opt).bind(doc)
        else:  # its model-wide triggers: a surge, the model's dead fraction rising
            from relu_doctor.remedies import PlanStep, TreatmentPlan
            TreatmentPlan(net, optimizer=opt, steps=[PlanStep("lr")]).bind(doc)
        for step in range(30):
            if step == 10:
                with torch.no_grad():
                    net.branch[0].bias.fill_(-50.0)  # its units die from here
            routed = step < 10 or every_pass or step % 10 == 9
            net(torch.randn(32, 4), routed).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
    cut = [e for e in doc.to_run().interventions() if e["remedy"] == "lr_rescue"
           and not e.get("details", {}).get("undo")]
    assert bool(cut) == every_pass, cut
    assert (opt.param_groups[0]["lr"] < 0.1) == every_pass


def test_a_branch_run_rarely_every_other_window_is_no_model_dying():
    """A branch, half its units dead for good, ran in 2 of 10 passes every other window:
    left out of the model's dead fraction there, the fraction rose at each window it came
    back, and the plan read it as 'dying' (a review of the rule above). The model's fraction
    is compared only over the same sites."""
    import relu_doctor
    from relu_doctor.remedies import PlanStep, TreatmentPlan

    torch.manual_seed(0)

    net = _Branched()
    with torch.no_grad():
        net.a[0].bias.fill_(5.0)  # every unit of a alive
        net.branch[0].weight.zero_()
        net.branch[0].bias[:8] = -1.0  # half of the branch's dead, for good
        net.branch[0].bias[8:] = 1.0
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    with relu_doctor.watch(net, log_every_n_steps=10, overhead_budget=None) as doc:
        TreatmentPlan(net, optimizer=opt, steps=[PlanStep("lr")]).bind(doc)
        for step in range(60):
            taken = (step // 10) % 2 == 0 or step % 10 < 2
            net(torch.randn(32, 4), taken).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
    assert not [e for e in doc.to_run().interventions() if e["remedy"] == "lr_rescue"]
    assert opt.param_groups[0]["lr"] == 1e-4
