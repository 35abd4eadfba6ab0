"""ReluDoctorTreatment in a real Trainer on CPU: the plan treats born-dead units, the
monitor's run-level numbers reach trainer.callback_metrics (EarlyStopping can watch them),
the init check runs on the first batch, a hopeless run stops the Trainer."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping

from relu_doctor.callbacks import ReluDoctor, ReluDoctorTreatment
from relu_doctor.diagnosis import run_health
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.remedies import PlanStep
from tests.callbacks.remedy_models import FILTERS, Net, interventions, loader, make, trainer

pytestmark = pytest.mark.filterwarnings(*FILTERS, "ignore:.*init check.*")


class Last(Callback):
    """Keeps the Doctor's last record and the callback metrics seen right after it."""

    def __init__(self, mon: ReluDoctor) -> None:
        self.mon = mon
        self.seen: list[tuple[dict, dict]] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        recs = self.mon.doctor.records if self.mon.doctor is not None else []
        if recs and recs[-1].step == trainer.global_step:
            self.seen.append((run_health(recs[-1].site_rows, recs[-1].findings),
                              {k: float(v) for k, v in trainer.callback_metrics.items()}))


def test_plan_treats_born_dead_units_and_publishes_metrics(tmp_path):
    model = make(dead=8, lr=0.05, opt="adam")
    mon = ReluDoctor(log_every_n_steps=5)
    treat = ReluDoctorTreatment(cooldown=1)
    last = Last(mon)
    t = trainer(tmp_path, [mon, treat, last], max_steps=40)
    t.fit(model, loader())
    assert treat.plan is not None and treat.init_report is not None
    # the init check saw the 8 units whose bias is -5 as born dead
    row = next(s for s in treat.init_report.sites if s["site"] == "net.1")
    assert row["born_dead"] >= 8
    evs = interventions(mon)
    assert any(e["remedy"] == "dormant_reset" for e in evs)
    assert all("verdict" in e for e in evs if e.get("after") is not None and e["site"] != "model")
    assert last.seen
    for health, metrics in last.seen:
        for k, v in health.items():
            assert metrics[f"relu_doctor/{k}"] == pytest.approx(v, nan_ok=True)


def test_early_stopping_on_a_diagnosis_metric(tmp_path):
    model = make(dead=0, lr=0.05)
    mon = ReluDoctor(log_every_n_steps=2)
    stop = EarlyStopping(monitor="relu_doctor/health", mode="max", patience=0,
                         check_on_train_epoch_end=True, stopping_threshold=0.0)
    t = trainer(tmp_path, [mon, stop], max_epochs=3)
    t.fit(model, loader())
    # health >= 0 reaches the threshold at the first epoch end: EarlyStopping read it
    assert t.current_epoch == 1 and "relu_doctor/health" in t.callback_metrics


def test_hopeless_run_stops_the_trainer(tmp_path):
    # every unit of net.1 born dead, and a tiny lr: no surge, but the swap's threshold is
    # passed, and a LeakyReLU cannot revive units whose bias is -5
    model = make(dead=16, lr=1e-4)
    mon = ReluDoctor(log_every_n_steps=2)
    treat = ReluDoctorTreatment(stop_when_hopeless=True, cooldown=1, steps=[PlanStep("swap")])
    t = trainer(tmp_path, [mon, treat], max_steps=200)
    t.fit(model, loader())
    assert treat.plan is not None and treat.plan.should_stop
    assert t.global_step < 200
    stops = [e for e in interventions(mon) if e["details"].get("action") == "stop"]
    assert len(stops) == 1


def test_arguments_are_validated():
    with pytest.raises(ReluDoctorError, match="cooldown"):
        ReluDoctorTreatment(cooldown=0)


def test_lightning_plan_acts_as_the_plain_loop_plan(tmp_path):
    """One process: ReluDoctorTreatment in a Trainer takes the plan's decisions and ends with
    the weights of the same plan in a plain loop. Its AutoClip clips the step's own gradients
    (under Lightning the backward runs inside ``optimizer.step(closure)``: a clip in the
    step's pre-hook would see the previous step's gradients and the weights would differ)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from tests.callbacks.test_remedies_ddp import LOG_EVERY, STEPS, Capture, Net, batches, run
    from tests.callbacks.test_remedies_ddp import intervention as as_tuple

    data = batches()
    one = run("plan", None, data)
    model = Net()
    loader = DataLoader(TensorDataset(torch.cat([x for x, _ in data]),
                                      torch.cat([y for _, y in data])),
                        batch_size=len(data[0][0]), shuffle=False)
    capture = Capture()
    L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[ReluDoctor(LOG_EVERY, every_n_steps=1, warn=None),
                   ReluDoctorTreatment(cooldown=1, check_init=False), capture],
    ).fit(model, loader)
    events = [as_tuple(e) for e in capture.events if e.get("type") == "intervention"]
    assert events == one["events"]
    assert {e[0] for e in events} >= {"adaptive_grad_clip", "dormant_reset"}
    for k, v in one["state"].items():
        torch.testing.assert_close(model.net.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_a_second_fit_acts_through_the_optimizers_it_made(tmp_path):
    """Lightning makes the optimizers anew for each ``fit`` (``configure_optimizers``): the
    plan kept for the same model acts through the new ones, its steps' controllers too: a
    learning-rate cut shows in the optimizer the second fit trains with (it scaled the
    first fit's, which nothing used any more, before)."""
    mon = ReluDoctor(log_every_n_steps=4, every_n_steps=1, overhead_budget=None)
    treat = ReluDoctorTreatment(cooldown=1, steps=[PlanStep("clip"), PlanStep("lr")])
    model = make(dead=10, lr=0.1, spike_every=3, spike=30.0)
    first = trainer(tmp_path / "a", [mon, treat], max_steps=8)
    first.fit(model, loader())
    plan = treat.plan
    assert plan is not None and plan.held is not None and plan.held.step == 8
    second = trainer(tmp_path / "b", [mon, treat], max_steps=16)
    second.fit(model, loader())
    opt = second.optimizers[0]
    assert treat.plan is plan and opt is not first.optimizers[0]
    assert plan.optimizers == [opt] and plan.remedy("lr").optimizers == [opt]
    cuts = [e for e in interventions(mon, "lr_rescue") if e["step"] > 8]
    assert cuts, interventions(mon)
    assert opt.param_groups[0]["lr"] == pytest.approx(
        cuts[-1]["details"]["changes"][0]["lr_after"])


def test_the_callback_pickles_as_ddp_spawn_sends_it_to_each_process():
    """``DDPStrategy(start_method="spawn")`` pickles the callbacks: the template plan that
    validates the options hooks its stand-in module, and the launch failed ("InputTap ...
    can't be pickled"). The unpickled callback has the same steps and options."""
    import pickle

    steps = (PlanStep("lr"), PlanStep("recycle", options={"threshold": 0.2}))
    cb = ReluDoctorTreatment(steps=steps, cooldown=3)
    back = pickle.loads(pickle.dumps(cb))
    assert back.options == cb.options
    assert [n for n, _ in back._named_remedies()] == [n for n, _ in cb._named_remedies()] == [
        "ReluDoctorTreatment step 'lr'", "ReluDoctorTreatment step 'recycle'"]


class NormNet(Net):
    """A healthy net with BatchNorm and dropout (running statistics and random draws that
    any extra pass in train mode would change), validated every 8 steps."""

    def __init__(self) -> None:
        super().__init__(lr=0.01)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Dropout(0.3), nn.Linear(16, 1))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)


def test_the_init_check_changes_nothing_in_a_healthy_run(tmp_path):
    """Default treatment (the init check on the first batch included) on a healthy run: the
    weights, BatchNorm buffers and the RNG's stream equal an unwatched run's, bit for bit;
    the check's pass is not a validation window of the monitor."""

    def fit(callbacks):
        torch.manual_seed(0)
        model = NormNet()
        trainer(tmp_path / str(len(callbacks)), callbacks, max_steps=16,
                val_check_interval=8, limit_val_batches=2).fit(model, loader(), loader(32))
        return model.state_dict(), torch.rand(3)

    plain, plain_draw = fit([])
    mon = ReluDoctor(log_every_n_steps=4, monitor_validation=True, overhead_budget=None)
    treat = ReluDoctorTreatment()
    treated, treated_draw = fit([mon, treat])
    assert treat.init_report is not None and treat.init_report.sites  # the check ran
    assert not interventions(mon)
    assert plain.keys() == treated.keys()
    for k in plain:
        assert torch.equal(plain[k], treated[k]), k
    assert torch.equal(plain_draw, treated_draw)
    assert mon.doctor is not None and mon.doctor.eval is not None
    steps = [(r.step, r.site_rows[0]["window_steps"]) for r in mon.doctor.eval.records]
    assert steps == [(8, 2), (16, 2)]  # the two validation runs of 2 batches, nothing else


def test_steps_by_name_are_the_default_plans_and_a_string_is_refused():
    """steps=["swap"]: the default plan's swap step (its 30% threshold, not the remedy's
    bare default); a string is refused whole, not split into letters."""
    from relu_doctor.remedies import DEFAULT_STEPS

    cb = ReluDoctorTreatment(steps=["swap", "lr"])
    defaults = {s.remedy: s for s in DEFAULT_STEPS}
    assert cb.options["steps"] == (defaults["swap"], defaults["lr"])
    with pytest.raises(ReluDoctorError, match=r"^steps: expected a non-empty sequence of "
                       r"PlanStep or remedy names .*, got 'lr'\.$"):
        ReluDoctorTreatment(steps="lr")


class _NoForward(Net):
    """A LightningModule that defines no forward(): training_step calls its network."""

    forward = L.LightningModule.forward  # (Net's own is taken away)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)


def test_a_module_without_forward_is_told_why_the_init_check_is_skipped(tmp_path):
    """The check runs the model on the first batch: a module with no forward() said only
    PyTorch's 'missing the required forward function'; it is told what to do now, and the
    plan still runs."""
    torch.manual_seed(0)
    model = _NoForward()
    treat = ReluDoctorTreatment()
    with pytest.warns(ReluDoctorWarning, match=r"init check skipped: _NoForward defines no "
                      r"forward\(\).*relu_doctor\.check_init\(network, x\)") as caught:
        trainer(tmp_path, [ReluDoctor(log_every_n_steps=5), treat], max_steps=10).fit(
            model, loader())
    assert sum("init check" in str(w.message) for w in caught) == 1
    assert treat.init_report is None and treat.plan is not None


def test_the_plans_clip_step_stays_idle_beside_the_trainers_own_clipping(tmp_path):
    """``Trainer(gradient_clip_val=...)`` clips already: the plan switched AutoClip on beside
    it, and both clipped, without a word (a trial). Its clip step now stays idle, said once;
    its other steps act (the run that switches clipping on without the Trainer's)."""
    from torch.utils.data import DataLoader, TensorDataset

    from tests.callbacks.test_remedies_ddp import LOG_EVERY, STEPS, Capture, Net, batches

    data = batches()
    loader = DataLoader(TensorDataset(torch.cat([x for x, _ in data]),
                                      torch.cat([y for _, y in data])),
                        batch_size=len(data[0][0]), shuffle=False)
    capture = Capture()
    with pytest.warns(ReluDoctorWarning, match=r"the Trainer clips gradients itself "
                      r"\(gradient_clip_val=1000.0\), so the plan's clip step stays idle") \
            as caught:
        L.Trainer(
            accelerator="cpu", devices=1, max_steps=STEPS, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path, gradient_clip_val=1000.0,
            callbacks=[monitor := ReluDoctor(LOG_EVERY, every_n_steps=1, warn=None),
                       ReluDoctorTreatment(cooldown=1, check_init=False), capture],
        ).fit(Net(), loader)
    assert sum("clip step stays idle" in str(w.message) for w in caught) == 1
    remedies = {e["remedy"] for e in capture.events if e.get("type") == "intervention"}
    assert "adaptive_grad_clip" not in remedies and "dormant_reset" in remedies
    # the gradient findings advise no clipping there either: they say the Trainer clips
    assert monitor.doctor.config.clipped_by == "the Trainer's gradient_clip_val=1000.0"
