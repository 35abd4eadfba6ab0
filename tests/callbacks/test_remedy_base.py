"""What every remedy callback does through the base (``callbacks/_remedy.py``): refuse to run
without the monitor, keyword-only arguments, a checkpoint state kept pending until the
controller exists; and the four together: one resume, and identical interventions on both
ranks of a 2-process DDP run."""

from __future__ import annotations

import json

import pytest

from relu_doctor.callbacks import (
    AdaptiveGradClip,
    DormantReset,
    LeakyReluSwap,
    LRRescue,
    ReluDoctor,
    ReluDoctorTreatment,
)
from relu_doctor.errors import ReluDoctorError
from tests.callbacks.remedy_models import (
    FILTERS,
    REMEDY_CALLBACKS,
    AtTrainStart,
    Dump,
    interventions,
    loader,
    make,
    state_json,
    trainer,
)

pytestmark = pytest.mark.filterwarnings(*FILTERS)


def test_remedies_need_the_monitor(tmp_path):
    with pytest.raises(
        ReluDoctorError, match=r"no ReluDoctor callback.*callbacks=\[ReluDoctor\(\), LRRescue"
    ):
        trainer(tmp_path, [LRRescue()], max_steps=2).fit(make(), loader())


@pytest.mark.parametrize("cls", [ReluDoctor, *REMEDY_CALLBACKS], ids=lambda c: c.__name__)
def test_arguments_after_the_first_are_keyword_only(cls):
    import inspect

    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), params


@pytest.mark.parametrize("cls", REMEDY_CALLBACKS, ids=lambda c: c.__name__)
def test_a_state_before_setup_waits_in_the_callback(tmp_path, cls):
    """Loaded before the controller is built (as Lightning restores callbacks before the
    optimizers exist), a state is kept as it came, then applied when the controller is."""
    cb = cls()
    if cls is LRRescue:  # needs nothing of the Trainer: its controller exists from the start
        state = {**cb.state_dict(), "cooldown_left": 1}
        cb.load_state_dict(state)
        assert cb.rescuer.cooldown_left == 1
    else:
        state = {"mode": "autoclip", "clippers": {}} if cls is AdaptiveGradClip else {"x": 1}
        cb.load_state_dict(state)
        assert cb.state_dict() == state
    cb.load_state_dict({})  # an empty state (a callback that had not started) changes nothing
    assert cb.state_dict() == state


@pytest.mark.parametrize("cls", [*REMEDY_CALLBACKS, ReluDoctorTreatment],
                         ids=lambda c: c.__name__)
def test_a_callback_passed_to_another_model_s_fit_starts_over(tmp_path, cls):
    """A hyper-parameter loop passes the same callbacks to each model's ``fit``: each model
    gets the run fresh callbacks give it (the same interventions, the same state at the
    end), nothing of the model before (an LR rescue's held record, cooldown and baseline; a
    clipper's history; a swap's streaks)."""

    def fit(callbacks: list, name: str) -> tuple[list, str]:
        t = trainer(tmp_path / name, callbacks, max_steps=12)
        t.fit(make(dead=10, spike_every=3, spike=30.0), loader())
        acted = [(e["remedy"], e["site"], e["step"]) for e in interventions(callbacks[0])]
        return acted, state_json(callbacks[1])

    def cbs() -> list:
        return [ReluDoctor(log_every_n_steps=4, every_n_steps=1, overhead_budget=None),
                cls(dead_jump=0.05) if cls is LRRescue else cls()]

    shared = cbs()
    first = fit(shared, "a")
    assert first[0] or cls is AdaptiveGradClip, first  # a clipper's events are its reports
    assert fit(shared, "b") == fit(cbs(), "fresh") == first


# ======================================================================= the four together


def test_resume_keeps_swaps_clip_history_cooldown_and_recycling_state(tmp_path):
    cbs = lambda: [  # noqa: E731
        ReluDoctor(log_every_n_steps=4),
        LeakyReluSwap(threshold=0.5, patience=1, slope=0.2),
        AdaptiveGradClip("autoclip", percentile=20, history=50),
        LRRescue(factor=0.5, cooldown=3),
        DormantReset(tau=0.5, include="net.3"),
    ]
    first = cbs()
    t1 = trainer(tmp_path / "a", first, max_steps=12)
    t1.fit(make(dead=10, kill_at=4), loader())  # 10 of net.1's units die at step 4
    ckpt = tmp_path / "a.ckpt"
    t1.save_checkpoint(ckpt)
    swap, _clip, rescue, reset = first[1:]
    # The log at step 12, the fit's last step, is final: held, so the cooldown counted only
    # the rescue at step 8 (the surge); the held record goes into the checkpoint and is
    # decided at the end of the resumed fit's first step.
    assert list(swap.swaps) == ["net.1"] and rescue.rescuer.cooldown_left == 3
    assert [e["step"] for e in interventions(first[0], "lr_rescue")] == [8]
    assert rescue.rescuer.held is not None and rescue.rescuer.held.step == 12
    assert reset.recycler.recycled  # something was recycled
    saved = {type(c).__name__: c.state_dict() for c in first[1:]}

    second = cbs()
    probe = AtTrainStart()
    model = make(seed=5)  # a fresh model: plain ReLUs, other weights
    t2 = trainer(tmp_path / "b", [*second, probe], max_steps=13)
    t2.fit(model, loader(), ckpt_path=ckpt)
    assert probe.modules["1"] == "LeakyReLU" and probe.modules["3"] == "ReLU"
    assert model.net[1].negative_slope == 0.2
    for name, state in saved.items():
        assert probe.remedies[name] == json.dumps(state, default=str, sort_keys=True), name
    assert len(second[2].clippers[0].norm_history) == 13  # 12 restored + the step after resume
    # The monitor of the resumed fit watches the swapped module (and saw it run).
    families = {s.name: s.family.name for s in second[0].doctor.sites}
    assert families == {"net.1": "leaky_relu", "net.3": "relu"}

    # Training on from the checkpoint: the cooldown continues (no rescue within 2 intervals).
    third = cbs()
    t3 = trainer(tmp_path / "c", third, max_steps=20)
    t3.fit(make(seed=6), loader(), ckpt_path=ckpt)
    assert not [e for e in interventions(third[0], "lr_rescue") if e["step"] <= 16]
    assert list(third[1].swaps) == ["net.1"]
    assert not interventions(third[0], "leaky_relu_swap")  # no second swap


@pytest.mark.slow
def test_ddp_two_ranks_take_identical_interventions(tmp_path):
    cbs = [
        ReluDoctor(log_every_n_steps=3),
        LeakyReluSwap(threshold=0.3, patience=1),
        AdaptiveGradClip("autoclip", percentile=10),
        LRRescue(factor=0.5, cooldown=1),
        DormantReset(tau=0.5, include="net.3"),
        Dump(str(tmp_path)),
    ]
    trainer(tmp_path, cbs, max_steps=9, strategy="ddp_spawn", devices=2).fit(
        make(dead=6, kill_at=3), loader(n=128, batch_size=8)  # a surge at step 6
    )
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    remedies = {e["remedy"] for e in r0["events"] if e["type"] == "intervention"}
    assert remedies == {"leaky_relu_swap", "adaptive_grad_clip", "lr_rescue", "dormant_reset"}
    assert r0["events"] == r1["events"]
    assert r0["params"] == r1["params"] and r0["lr"] == r1["lr"] < 0.1
    assert r0["modules"][1] == "LeakyReLU" == r1["modules"][1]
