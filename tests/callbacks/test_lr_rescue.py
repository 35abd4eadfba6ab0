"""LRRescue in a real Trainer on CPU: a dead surge rescued under an LR scheduler, argument
checks, and the cooldown round-tripping through a checkpoint."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from relu_doctor.callbacks import LRRescue, ReluDoctor
from relu_doctor.errors import ReluDoctorError
from tests.callbacks.remedy_models import FILTERS, interventions, loader, make, resume, trainer

pytestmark = pytest.mark.filterwarnings(*FILTERS)


class Kill(Callback):
    """Kills 8 units of net.1 right after the first interval (step 5): a surge at step 10."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == 5:
            with torch.no_grad():
                pl_module.net[0].bias[:8] = -50.0


def test_lr_rescue_with_a_scheduler_in_a_trainer(tmp_path):
    model = make(dead=0, lr=0.1, sched=True)
    mon = ReluDoctor(log_every_n_steps=5)
    rescue = LRRescue(factor=0.5, cooldown=1, dead_jump=0.05)
    t = trainer(tmp_path, [mon, rescue, Kill()], max_steps=30)
    t.fit(model, loader())
    evs = interventions(mon)
    assert [(e["step"], e["details"]["trigger"]) for e in evs] == [(10, "dead_surge")]
    assert evs[0]["details"]["changes"][0]["lr_before"] == pytest.approx(0.1 / (1 + 0.01 * 10))
    # The scheduler keeps the halving: lr(30) = 0.5 * 0.1 * lambda(30).
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 * 0.1 / (1 + 0.01 * 30))


def test_arguments_are_validated():
    with pytest.raises(ReluDoctorError, match="triggers"):
        LRRescue(triggers=["loss"])
    with pytest.raises(ReluDoctorError, match="factor"):
        LRRescue(factor=1.5)
    with pytest.raises(ReluDoctorError, match="cooldown"):
        LRRescue(cooldown=-1)
    with pytest.raises(TypeError):
        LRRescue(0.5, 1e-6)  # type: ignore[misc]  # keyword-only after the first


def test_cooldown_round_trips_through_a_checkpoint(tmp_path):
    def cbs():
        return [ReluDoctor(log_every_n_steps=4), LRRescue(factor=0.5, cooldown=3)]

    # 10 of net.1's 16 units die at step 4: a surge at the second log (step 8).
    first, saved, second, probe = resume(tmp_path, cbs, steps=12, resume_steps=20, dead=10,
                                         kill_at=4)
    assert [e["step"] for e in interventions(first[0])] == [8]
    # step 12 ends the fit: its record is held (decided at the resumed fit's first step), so
    # the cooldown has counted no interval yet
    assert first[1].rescuer.cooldown_left == 3 and first[1].rescuer.held.step == 12
    assert probe.remedies["LRRescue"] == saved["LRRescue"]
    assert probe.lr == pytest.approx(0.05)  # the optimizer's checkpoint keeps the halving
    # Cooldown and dead-fraction baseline continue: no rescue at step 16 (a fresh rescuer
    # would see net.1's 10 dead units as a surge from 0 and rescue there: restored sites
    # have no first reading).
    assert not [e for e in interventions(second[0]) if e["step"] <= 16]
