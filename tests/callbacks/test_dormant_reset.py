"""DormantReset in a real Trainer on CPU: an unlinkable site warned about once, argument
checks, and the recycling state round-tripping through a checkpoint."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from relu_doctor.callbacks import DormantReset, ReluDoctor
from relu_doctor.errors import ReluDoctorError
from tests.callbacks.remedy_models import FILTERS, interventions, loader, make, resume, trainer

pytestmark = pytest.mark.filterwarnings(*FILTERS)


def test_dormant_reset_warns_once_for_an_unlinkable_site(tmp_path):
    class Residual(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.act = nn.ReLU()
            self.out = nn.Linear(8, 1)

        def forward(self, x):
            return self.out(self.act(self.fc(x)) + x)  # the activation's output is summed

        def training_step(self, batch, i):
            return F.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.warns(UserWarning, match=r"leaving site 'act' alone.*reach add in \(root\)\.forward") as rec:
        trainer(
            tmp_path, [ReluDoctor(log_every_n_steps=2, tau=0.9), DormantReset()], max_steps=8
        ).fit(Residual(), loader())
    assert sum("leaving site" in str(w.message) for w in rec) == 1


def test_arguments_are_validated():
    with pytest.raises(ReluDoctorError, match="on_unlinkable"):
        DormantReset(on_unlinkable="ignore")
    with pytest.raises(ReluDoctorError, match="tau"):
        DormantReset(tau=1.0)
    with pytest.raises(ReluDoctorError, match="every"):
        DormantReset(every=0)
    with pytest.raises(ReluDoctorError, match="include"):
        DormantReset(include=[""])
    with pytest.raises(TypeError):
        DormantReset(0.1, 2)  # type: ignore[misc]  # keyword-only after the first


def test_recycling_state_round_trips_through_a_checkpoint(tmp_path):
    def cbs():
        return [ReluDoctor(log_every_n_steps=4), DormantReset(tau=0.5, include="net.3")]

    first, saved, _, probe = resume(tmp_path, cbs, steps=8, resume_steps=9, dead=10)
    assert first[1].recycler.recycled  # something was recycled
    # At the restart the recycler holds exactly the checkpoint's state (counts included).
    assert probe.remedies["DormantReset"] == saved["DormantReset"]
    assert '"recycled": {"net.3": ' in saved["DormantReset"]


def test_no_reset_after_the_last_step(tmp_path):
    """The monitor logs the last, partial window when training ends, after the last
    optimizer step: DormantReset reset units there, so the model ``fit`` returned (and the
    one a user saves next) held units no step trained. That record is ``final`` now:
    nothing is reset on it, and the model after ``fit`` is the model of the last step;
    resets inside training still happen."""
    from lightning.pytorch.callbacks import Callback

    class AtTrainEnd(Callback):  # listed first: runs before the monitor's train-end log
        def on_train_end(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    end = AtTrainEnd()
    mon = ReluDoctor(log_every_n_steps=8, every_n_steps=1, overhead_budget=None)
    model = make(dead=10)
    trainer(tmp_path, [end, mon, DormantReset(tau=0.5)], max_steps=20).fit(model, loader())
    steps = [e["step"] for e in interventions(mon)]
    assert steps and set(steps) <= {8, 16}, steps  # it acts inside training
    assert mon.doctor is not None and mon.doctor.global_step == 20
    assert all(torch.equal(end.state[k], v) for k, v in model.state_dict().items())
