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


@pytest.mark.parametrize("max_steps", [20, 24])
def test_no_reset_after_the_last_step(tmp_path, max_steps):
    """The monitor logs the last, partial window when training ends, after the last
    optimizer step (steps 17-20 with ``max_steps=20``): DormantReset reset units there, so
    the model ``fit`` returned (and the one a user saves next) held units no step trained.
    That record is ``final`` now: nothing is reset on it, and the model after ``fit`` is the
    model of the last step; resets inside training still happen. With ``max_steps=24`` the
    last window closes on the last step itself: the monitor passes ``last=True`` there
    (Lightning's ``max_steps``), with the same result."""
    from lightning.pytorch.callbacks import Callback

    class AtTrainEnd(Callback):  # listed first: runs before the monitor's train-end log
        def on_train_end(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    end = AtTrainEnd()
    mon = ReluDoctor(log_every_n_steps=8, every_n_steps=1, overhead_budget=None)
    model = make(dead=10)
    t = trainer(tmp_path, [end, mon, DormantReset(tau=0.5)], max_steps=max_steps)
    t.fit(model, loader())
    steps = [e["step"] for e in interventions(mon)]
    assert steps and max(steps) < max_steps and set(steps) <= {8, 16}, steps
    assert 16 in steps  # the same reset acts inside training
    assert mon.doctor is not None and mon.doctor.global_step == max_steps
    finals = [r.step for r in mon.doctor.records if r.final]
    assert finals == [max_steps]
    assert all(torch.equal(end.state[k], v) for k, v in model.state_dict().items())


def test_a_second_fit_starts_a_new_window(tmp_path):
    """The end-of-training log closes its window: a second ``fit`` with the same callbacks
    (25 steps, then 40 more, logging every 10; the monitor's steps go on from 25) logs steps
    26-30 in its first window, not 21-30 again, and the run directory keeps the step-25
    record and its final flag's neighbours."""
    import relu_doctor

    mon = ReluDoctor(log_every_n_steps=10, every_n_steps=1, overhead_budget=None,
                     run_dir=tmp_path / "run")
    model = make()
    seen = []
    for steps in (25, 40):
        trainer(tmp_path, [mon], max_steps=steps).fit(model, loader())
        assert mon.doctor is not None
        seen += [(r.step, r.site_rows[0]["window_steps"], r.final) for r in mon.doctor.records]
    rows = sorted(set(seen))
    assert rows == [(10, 10, False), (20, 10, False), (25, 5, True), (30, 5, False),
                    (40, 10, False), (50, 10, False), (60, 10, False), (65, 5, True)], rows
    history = relu_doctor.load_run(tmp_path / "run").history
    assert sorted(set(history["step"])) == [10, 20, 25, 30, 40, 50, 60, 65]


def test_manual_optimization_with_two_optimizers_marks_no_early_last_step(tmp_path):
    """Under manual optimization Lightning's global step counts every optimizer's steps:
    with two optimizers it reaches ``estimated_stepping_batches`` (20 batches here) half way
    through, so a last step read from it marked the log at batch 16 final and DormantReset
    skipped it. The monitor reads Lightning's stopping rules at each step instead: the log
    at batch 16 is an ordinary one; only the end-of-training log is final."""

    class TwoOptimizers(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
            with torch.no_grad():
                self.net[0].bias[:8] = -5.0

        def training_step(self, batch, i):
            first, second = self.optimizers()
            loss = F.mse_loss(self.net(batch[0]), batch[1])
            first.zero_grad()
            second.zero_grad()
            self.manual_backward(loss)
            first.step()
            second.step()

        def configure_optimizers(self):
            return (torch.optim.SGD(self.net[0].parameters(), lr=0.01),
                    torch.optim.SGD(self.net[2].parameters(), lr=0.01))

    mon = ReluDoctor(log_every_n_steps=8, every_n_steps=1, overhead_budget=None)
    t = trainer(tmp_path, [mon, DormantReset(tau=0.5)], max_epochs=1)
    t.fit(TwoOptimizers(), loader(n=256 + 64))  # 20 batches: logs at 8 and 16, then 20
    assert t.global_step == 40 and mon.doctor is not None and mon.doctor.global_step == 20
    assert [(r.step, r.final) for r in mon.doctor.records] == [
        (8, False), (16, False), (20, True)]
    assert {e["step"] for e in interventions(mon)} == {8, 16}


def _fit_to(root, steps, ckpt=None, every=2):
    """Fit the 10-dead-unit model with DormantReset(every=``every``), logging every 8 steps
    (16 batches an epoch), for ``steps // 16`` epochs, checkpointed at each epoch's end (Lightning's
    ModelCheckpoint, after the epoch's last log); from ``ckpt`` if given."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    mon = ReluDoctor(log_every_n_steps=8, every_n_steps=1, overhead_budget=None)
    model = make(dead=10, seed=0 if ckpt is None else 5)
    saver = ModelCheckpoint(dirpath=root / "ck", filename="{step}", every_n_epochs=1,
                            save_top_k=-1)
    t = trainer(root, [mon, DormantReset(tau=0.5, every=every), saver],
                max_epochs=steps // 16, enable_checkpointing=True)
    t.fit(model, loader(), ckpt_path=ckpt)
    steps_acted = [(e["step"], tuple(e["details"]["units"])) for e in interventions(mon)]
    return mon, steps_acted, model


def test_a_run_resumed_after_its_last_step_makes_the_change_it_held(tmp_path):
    """A fit of 2 epochs (32 steps) ends on a log (steps 25-32): that record is final, so
    DormantReset (every 2nd log) does not reset units the fit's model would carry untrained,
    and holds the record; the checkpoint saved at that epoch's end keeps it. Resumed, it
    decides on it at the end of the first new step: the resumed run makes the reset the
    uninterrupted run made at step 32 (the same units), one step later. (Before, the reset
    due at 32 was made on the fit's returned model, or, with the record skipped, never.)"""
    _, plain, _ = _fit_to(tmp_path / "plain", 48)
    assert 32 in [s for s, _ in plain]
    mon, first, _ = _fit_to(tmp_path / "a", 32)
    assert 32 not in [s for s, _ in first] and mon.doctor.records[-1].final
    assert mon.doctor.records[-1].step == 32
    _, resumed, _ = _fit_to(tmp_path / "b", 48, ckpt=tmp_path / "a" / "ck" / "step=32.ckpt")
    upto = [a for a in first + resumed if a[0] <= 32]
    assert upto == [a for a in plain if a[0] <= 32]


def test_an_iterable_of_unknown_length_marks_only_the_last_step(tmp_path):
    """With an IterableDataset without ``__len__`` and ``max_epochs``, Lightning's
    ``estimated_stepping_batches`` is -1: a last step read from it marked every record final
    and no remedy ever acted. The monitor reads the fetcher's look-ahead instead: only the
    log at the very last batch (20 batches, 2 epochs, logging every 5) is final."""
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(1)
            for _ in range(20):
                x = torch.randn(16, 8, generator=g)
                yield x, torch.sin(2 * x[:, :1])

    mon = ReluDoctor(log_every_n_steps=5, every_n_steps=1, overhead_budget=None)
    trainer(tmp_path, [mon, DormantReset(tau=0.5)], max_epochs=2).fit(
        make(dead=10), DataLoader(Stream(), batch_size=None))
    assert mon.doctor is not None
    assert [(r.step, r.final) for r in mon.doctor.records] == [
        (s, s == 40) for s in range(5, 41, 5)]
    assert {e["step"] for e in interventions(mon)} == set(range(5, 40, 5))
