"""LeakyReluSwap in a real Trainer on CPU: the swap and its before/after event, argument
checks, and checkpoint resume (LeakyReLU and PReLU with its slopes and optimizer state)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.callbacks import LeakyReluSwap, ReluDoctor
from relu_doctor.errors import ReluDoctorError
from tests.callbacks.remedy_models import (
    FILTERS,
    AtTrainStart,
    Net,
    interventions,
    loader,
    make,
    resume,
    trainer,
)

pytestmark = pytest.mark.filterwarnings(*FILTERS)


def test_leaky_relu_swap_in_a_trainer_records_before_and_after(tmp_path):
    model = make(dead=10)
    mon = ReluDoctor(log_every_n_steps=4, run_dir=tmp_path / "run")
    swap = LeakyReluSwap(threshold=0.5, patience=2, slope=0.1)
    trainer(tmp_path, [mon, swap], max_steps=16).fit(model, loader())
    assert isinstance(model.net[1], nn.LeakyReLU) and model.net[1].negative_slope == 0.1
    assert type(model.net[3]) is nn.ReLU
    assert list(swap.swaps) == ["net.1"]
    events = mon.doctor.to_run().interventions()
    assert len(events) == 1
    ev = events[0]
    assert (ev["remedy"], ev["site"], ev["step"]) == ("leaky_relu_swap", "net.1", 8)  # 2nd log
    assert ev["before"]["dead_fraction"] == pytest.approx(10 / 16)
    assert ev["after_step"] == 12 and ev["after"]["grad_rms"] > 0
    # The run directory has both halves; after the swap gradient flows through net.1's
    # dead units (ReLU passed none: 10 of 16 units dead gave >= 10/16 zero entries).
    run = relu_doctor.load_run(tmp_path / "run")
    assert run.interventions()[0]["after"] == ev["after"]
    hist = run.history[run.history["site"] == "net.1"].set_index("step")
    assert hist.loc[8, "grad_zero_fraction"] >= 10 / 16 and hist.loc[8, "family"] == "relu"
    assert hist.loc[12, "grad_zero_fraction"] < 0.05 and hist.loc[12, "family"] == "leaky_relu"


def test_arguments_are_validated():
    with pytest.raises(ReluDoctorError, match="kind: expected one of"):
        LeakyReluSwap(kind="elu")
    with pytest.raises(ReluDoctorError, match="threshold"):
        LeakyReluSwap(threshold=1.0)
    with pytest.raises(ReluDoctorError, match="patience"):
        LeakyReluSwap(patience=0)
    with pytest.raises(TypeError):
        LeakyReluSwap(0.5, 2)  # type: ignore[misc]  # keyword-only after the first


def test_swaps_round_trip_through_a_checkpoint(tmp_path):
    def cbs():
        return [ReluDoctor(log_every_n_steps=4), LeakyReluSwap(threshold=0.5, patience=1)]

    first, saved, second, probe = resume(tmp_path, cbs, steps=8, resume_steps=12, dead=10)
    assert list(first[1].swaps) == ["net.1"]
    # The fresh model has the swap when training restarts, and the same remedy state.
    assert probe.modules["1"] == "LeakyReLU" and probe.modules["3"] == "ReLU"
    assert probe.remedies["LeakyReluSwap"] == saved["LeakyReluSwap"]
    assert list(second[1].swaps) == ["net.1"]
    assert interventions(second[0], "leaky_relu_swap") == []  # not swapped a second time


def test_prelu_swap_resumes_with_its_slopes_and_optimizer_state(tmp_path):
    first = [
        ReluDoctor(log_every_n_steps=4),
        LeakyReluSwap(threshold=0.5, patience=1, kind="prelu", slope=0.25),
    ]
    model = make(dead=10, opt="adam", lr=0.01, sched=True)
    t1 = trainer(tmp_path / "a", first, max_steps=12)
    t1.fit(model, loader())
    assert isinstance(model.net[1], nn.PReLU)
    assert model.net[1].weight.item() != 0.25  # trained
    assert len(t1.optimizers[0].param_groups) == 2
    ckpt = tmp_path / "a.ckpt"
    t1.save_checkpoint(ckpt)

    probe = AtTrainStart()
    model2 = make(seed=3, opt="adam", lr=0.01, sched=True)
    second = [
        ReluDoctor(log_every_n_steps=4),
        LeakyReluSwap(threshold=0.5, patience=1, kind="prelu", slope=0.25),
    ]
    t2 = trainer(tmp_path / "b", [*second, probe], max_steps=16)
    t2.fit(model2, loader(), ckpt_path=ckpt)
    assert probe.modules["1"] == "PReLU" and probe.groups == 2
    for k, v in model.state_dict().items():
        assert torch.equal(probe.state[k], v), k
    opt2 = t2.optimizers[0]
    assert len(opt2.state[model2.net[1].weight]) > 0  # Adam moments of the slopes restored
    assert model2.net[1].weight.item() != probe.state["net.1.weight"].item()  # and it trains on


@pytest.mark.parametrize("name", ["enc:act", "a#1"])
def test_a_module_named_like_a_site_is_swapped(tmp_path, name):
    """Site names are made from keys, never parsed back: ':' and '#' in a module's own name
    are ordinary characters."""

    class Odd(Net):
        def __init__(self):
            super().__init__(dead=10)
            self.net = nn.Sequential(self.net[0])
            self.net.add_module(name, nn.ReLU())
            self.net.add_module("out", nn.Linear(16, 1))

    torch.manual_seed(0)
    model = Odd()  # 10 of the 16 units before the odd-named ReLU start dead
    mon = ReluDoctor(log_every_n_steps=4)
    swap = LeakyReluSwap(threshold=0.5, patience=1, slope=0.1)
    trainer(tmp_path, [mon, swap], max_steps=8).fit(model, loader())
    assert isinstance(getattr(model.net, name), nn.LeakyReLU)
    assert list(swap.swaps) == [f"net.{name}"]
    (ev,) = interventions(mon, "leaky_relu_swap")
    assert ev["site"] == f"net.{name}" and ev["step"] == 4


@pytest.mark.parametrize(("callback", "kind", "tester"), [
    ("LeakyReluSwap", "leaky_relu", "same"), ("LeakyReluSwap", "prelu", "same"),
    ("ReluDoctorTreatment", "leaky_relu", "same"),  # (the plan's swap step is LeakyReLU's)
    ("LeakyReluSwap", "leaky_relu", "new")])  # a new Trainer and callback test it
def test_a_checkpoint_saved_before_a_swap_loads_without_it(tmp_path, callback, kind, tester):
    """trainer.test(ckpt_path="best") loaded a checkpoint saved before a swap into the model
    training left: its ReLU-trained weights read through a LeakyReLU, silently (as the HF
    Trainer's load_best_model_at_end did). The swaps the checkpoint does not hold are undone,
    said once: the model computes what the checkpoint's weights compute with ReLU. A review
    found the treatment plan's swaps left in place, a PReLU swap's missing slopes raising in
    the strict load before the callbacks' state came, and the undo written nowhere (the run
    closed at the end of fit)."""
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from relu_doctor.callbacks import ReluDoctorTreatment
    from relu_doctor.errors import ReluDoctorWarning
    from relu_doctor.remedies import PlanStep

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))

        def training_step(self, batch, i):
            if self.global_step == 4:  # 12 of 16 units die: swapped at a later log
                with torch.no_grad():  # (their outputs unread: the swap leaves the loss
                    self.net[0].bias[:12] = -50.0  # as it was, which the loss guard reads)
                    self.net[2].weight[:, :12] = 0.0
            x, y = batch
            return (self.net(x) - y).pow(2).mean()

        def validation_step(self, batch, i):
            self.log("score", -float(self.global_step))  # the best: the earliest

        def test_step(self, batch, i):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))

    def loader():
        return torch.utils.data.DataLoader(data, batch_size=8)

    model = Net()
    remedy = (LeakyReluSwap(threshold=0.5, patience=1, kind=kind) if callback == "LeakyReluSwap"
              else ReluDoctorTreatment(steps=[PlanStep("swap")], check_init=False))
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="score", mode="max", save_top_k=1)
    trainer = L.Trainer(max_steps=16, val_check_interval=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[
                            ReluDoctor(log_every_n_steps=2, run_dir=tmp_path / "run"), remedy, ck])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(), loader())
    swapped = nn.LeakyReLU if kind == "leaky_relu" else nn.PReLU
    assert isinstance(model.net[1], swapped) and ck.best_model_path.endswith("step=2.ckpt")
    if tester == "new":  # (its swapper knows the swap by the module's mark: a review)
        trainer = L.Trainer(logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path,
                            callbacks=[LeakyReluSwap(threshold=0.5, patience=1, kind=kind)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.test(model, loader(), ckpt_path=ck.best_model_path)
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)
            and "saved before the" in str(w.message)]
    assert isinstance(model.net[1], nn.ReLU) and len(said) == 1, said
    if tester == "new":
        return
    assert len(trainer.optimizers[0].param_groups) == 1  # a PReLU's slopes gone with it
    plain = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    weights = torch.load(ck.best_model_path, weights_only=False)["state_dict"]
    plain.load_state_dict({k.removeprefix("net."): v for k, v in weights.items()})
    x = torch.randn(8, 4)
    assert torch.equal(model.net(x), plain(x))
    # the run directory says so: swapped, then restored
    done = [e["what"].split(" ")[0] for e in relu_doctor.load_run(tmp_path / "run").events
            if e.get("type") == "intervention" and e.get("site") == "net.1"]
    assert done == ["replaced", "restored"], done


def test_a_checkpoint_without_the_callbacks_state_leaves_the_swaps_said(tmp_path):
    """A checkpoint saved with save_weights_only=True (or by a run without the callback)
    holds no swap state: the swaps stay, and Lightning never calls the callback's
    load_state_dict. Said once, as the HF callback says it (a review: nothing was said)."""
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from relu_doctor.errors import ReluDoctorWarning

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))

        def training_step(self, batch, i):
            if self.global_step == 4:
                with torch.no_grad():
                    self.net[0].bias[:12] = -50.0
            x, y = batch
            return (self.net(x) - y).pow(2).mean()

        def validation_step(self, batch, i):
            self.log("score", -float(self.global_step))

        def test_step(self, batch, i):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model = Net()
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="score", mode="max", save_top_k=1,
                         save_weights_only=True)
    trainer = L.Trainer(max_steps=16, val_check_interval=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[
                            ReluDoctor(log_every_n_steps=2, run_dir=tmp_path / "run"),
                            LeakyReluSwap(threshold=0.5, patience=1), ck])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader, loader)
    assert "callbacks" not in torch.load(ck.best_model_path, weights_only=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.test(model, loader, ckpt_path="best")
        trainer.test(model, loader)  # no checkpoint loaded: nothing to say
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    assert len(said) == 1 and "holds no state of this callback" in said[0], said
    assert "'net.1'" in said[0] and isinstance(model.net[1], nn.LeakyReLU)
