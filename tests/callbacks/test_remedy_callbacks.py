"""The remedy callbacks (LeakyReluSwap, AdaptiveGradClip, LRRescue, DormantReset) driven by a
real Trainer on CPU: wiring to the ReluDoctor monitor, events in the run directory, checkpoint
resume, and identical interventions on both ranks of a 2-process DDP run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import relu_doctor
from relu_doctor.callbacks.adaptive_grad_clip import AdaptiveGradClip
from relu_doctor.callbacks.dormant_reset import DormantReset
from relu_doctor.callbacks.leaky_relu_swap import LeakyReluSwap
from relu_doctor.callbacks.lr_rescue import LRRescue
from relu_doctor.callbacks.monitor import ReluDoctor
from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies import merge_interventions

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*is smaller than the logging interval.*",
    "ignore:.*LeafSpec.*",
    "ignore::relu_doctor.callbacks.monitor.ReluDoctorWarning",
    "ignore:.*ddp_spawn.*",
    "ignore:.*callbacks used to create the checkpoint.*",
    "ignore:.*leaving site.*",
    "ignore:.*resuming from a checkpoint that ended before the epoch ended.*",
)


class Net(L.LightningModule):
    """Linear-ReLU-Linear-ReLU-Linear regression; ``dead`` units of ``net.1`` start dead
    (bias -5); every ``spike_every``-th batch has its targets scaled by ``spike``."""

    def __init__(
        self,
        hidden: int = 16,
        lr: float = 0.1,
        dead: int = 0,
        opt: str = "sgd",
        spike_every: int = 0,
        spike: float = 1.0,
        sched: bool = False,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        if dead:
            with torch.no_grad():
                self.net[0].bias[:dead] = -5.0
        self.lr, self.opt, self.sched = lr, opt, sched
        self.spike_every, self.spike = spike_every, spike

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.spike_every and self.global_step % self.spike_every == self.spike_every - 1:
            y = y * self.spike
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        if self.opt == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if not self.sched:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + 0.01 * e))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make(seed: int = 0, **kw: Any) -> Net:
    torch.manual_seed(seed)
    return Net(**kw)


def loader(n: int = 256, batch_size: int = 16, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(root: Path, callbacks: list, **kw: Any) -> L.Trainer:
    args: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1000,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return L.Trainer(callbacks=callbacks, **args)


def interventions(doc: relu_doctor.Doctor) -> list[dict[str, Any]]:
    return [e for e in doc._events if e.get("type", "").startswith("intervention")]


class AtTrainStart(Callback):
    """Remembers what the model looks like when training (re)starts."""

    def on_train_start(self, trainer, pl_module):
        self.modules = {n: type(m).__name__ for n, m in pl_module.net.named_children()}
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.groups = len(trainer.optimizers[0].param_groups)
        self.remedies = {
            type(c).__name__: json.dumps(c.state_dict(), default=str, sort_keys=True)
            for c in trainer.callbacks
            if hasattr(c, "remedy_name")
        }


# ======================================================================= wiring and events


def test_leaky_relu_swap_in_a_trainer_records_before_and_after(tmp_path):
    model = make(dead=10)
    mon = ReluDoctor(log_every_n_steps=4, run_dir=tmp_path / "run")
    swap = LeakyReluSwap(threshold=0.5, patience=2, slope=0.1)
    trainer(tmp_path, [mon, swap], max_steps=16).fit(model, loader())
    assert isinstance(model.net[1], nn.LeakyReLU) and model.net[1].negative_slope == 0.1
    assert type(model.net[3]) is nn.ReLU
    assert list(swap.swaps) == ["net.1"]
    events = merge_interventions(mon.doctor._events)
    assert len(events) == 1
    ev = events[0]
    assert (ev["remedy"], ev["site"], ev["step"]) == ("leaky_relu_swap", "net.1", 8)  # 2nd log
    assert ev["before"]["dead_fraction"] == pytest.approx(10 / 16)
    assert ev["after_step"] == 12 and ev["after"]["grad_rms"] > 0
    # The run directory has both halves; after the swap gradient flows through net.1's
    # dead units (ReLU passed none: 10 of 16 units dead gave >= 10/16 zero entries).
    run = relu_doctor.load_run(tmp_path / "run")
    assert merge_interventions(run.events)[0]["after"] == ev["after"]
    hist = run.history[run.history["site"] == "net.1"].set_index("step")
    assert hist.loc[8, "grad_zero_fraction"] >= 10 / 16 and hist.loc[8, "family"] == "relu"
    assert hist.loc[12, "grad_zero_fraction"] < 0.05 and hist.loc[12, "family"] == "leaky_relu"


def test_remedies_need_the_monitor(tmp_path):
    with pytest.raises(
        ReluDoctorError, match=r"no ReluDoctor callback.*callbacks=\[ReluDoctor\(\), LRRescue"
    ):
        trainer(tmp_path, [LRRescue()], max_steps=2).fit(make(), loader())


def test_callback_arguments_are_validated():
    with pytest.raises(ReluDoctorError, match="kind: expected one of"):
        LeakyReluSwap(kind="elu")
    with pytest.raises(ReluDoctorError, match="mode: expected one of"):
        AdaptiveGradClip("norm")
    with pytest.raises(ReluDoctorError, match="percentile"):
        AdaptiveGradClip(percentile=200)
    with pytest.raises(ReluDoctorError, match="triggers"):
        LRRescue(triggers=["loss"])
    with pytest.raises(ReluDoctorError, match="on_unlinkable"):
        DormantReset(on_unlinkable="ignore")


def test_adaptive_grad_clip_contains_spikes_and_logs_threshold(tmp_path):
    """Every 10th batch has targets x50: untreated, the spikes kill most units of net.3."""

    def run(clip: bool) -> tuple[float, ReluDoctor, AdaptiveGradClip | None]:
        model = make(spike_every=10, spike=50.0, lr=0.05, hidden=32)
        mon = ReluDoctor(log_every_n_steps=10)
        cb = AdaptiveGradClip("autoclip", percentile=10) if clip else None
        root = tmp_path / str(clip)
        trainer(
            root,
            [mon] + ([cb] if cb else []),
            max_steps=120,
            logger=CSVLogger(root, name="csv", version=0),
        ).fit(model, loader())
        return (
            float(mon.doctor.history().query("site == 'net.3'")["dead_fraction"].iloc[-1]),
            mon,
            cb,
        )

    dead_u, _, _ = run(False)
    dead_t, mon, cb = run(True)
    print(f"dead fraction of net.3 at the last log: {dead_u:.3f} -> {dead_t:.3f}")
    assert not dead_u < 0.5 and dead_t < 0.1, (dead_u, dead_t)  # NaN: diverged, counts
    evs = [e for e in mon.doctor._events if e.get("type") == "intervention"]
    assert evs and all(
        e["remedy"] == "adaptive_grad_clip" and e["clip"]["clipped"] > 0 for e in evs
    )
    csv = (tmp_path / "True" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "relu_doctor/clip/threshold" in csv and "relu_doctor/clip/fraction" in csv
    assert len(cb.clippers[0].norm_history) == 120


def test_lr_rescue_with_a_scheduler_in_a_trainer(tmp_path):
    model = make(dead=0, lr=0.1, sched=True)
    mon = ReluDoctor(log_every_n_steps=5)
    rescue = LRRescue(factor=0.5, cooldown=1, dead_jump=0.05)
    t = trainer(tmp_path, [mon, rescue], max_steps=30)

    # Kill units of net.1 after the first interval: a surge at step 10.
    class Kill(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 5:  # right after the first log
                with torch.no_grad():
                    pl_module.net[0].bias[:8] = -50.0

    t.callbacks.append(Kill())
    t.fit(model, loader())
    evs = [e for e in mon.doctor._events if e.get("type") == "intervention"]
    assert [(e["step"], e["trigger"]) for e in evs] == [(10, "dead_surge")]
    assert evs[0]["changes"][0]["lr_before"] == pytest.approx(0.1 / (1 + 0.01 * 10))
    # The scheduler keeps the halving: lr(30) = 0.5 * 0.1 * lambda(30).
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 * 0.1 / (1 + 0.01 * 30))


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

    with pytest.warns(UserWarning, match=r"leaving site 'act' alone.*goes to function add") as rec:
        trainer(
            tmp_path, [ReluDoctor(log_every_n_steps=2, tau=0.9), DormantReset()], max_steps=8
        ).fit(Residual(), loader())
    assert sum("leaving site" in str(w.message) for w in rec) == 1


# ======================================================================= checkpoints


def test_resume_keeps_swaps_clip_history_cooldown_and_recycling_state(tmp_path):
    cbs = lambda: [  # noqa: E731
        ReluDoctor(log_every_n_steps=4),
        LeakyReluSwap(threshold=0.5, patience=1, slope=0.2),
        AdaptiveGradClip("autoclip", percentile=20, history=50),
        LRRescue(factor=0.5, cooldown=3),
        DormantReset(tau=0.5, include="net.3"),
    ]
    first = cbs()
    t1 = trainer(tmp_path / "a", first, max_steps=8)
    t1.fit(make(dead=10), loader())
    ckpt = tmp_path / "a.ckpt"
    t1.save_checkpoint(ckpt)
    swap, _clip, rescue, reset = first[1:]
    assert list(swap.swaps) == ["net.1"] and rescue.rescuer.cooldown_left == 2
    assert reset.recycler.recycled  # something was recycled
    saved = {type(c).__name__: c.state_dict() for c in first[1:]}

    second = cbs()
    probe = AtTrainStart()
    model = make(seed=5)  # a fresh model: plain ReLUs, other weights
    t2 = trainer(tmp_path / "b", [*second, probe], max_steps=9)
    t2.fit(model, loader(), ckpt_path=ckpt)
    assert probe.modules["1"] == "LeakyReLU" and probe.modules["3"] == "ReLU"
    assert model.net[1].negative_slope == 0.2
    for name, state in saved.items():
        assert probe.remedies[name] == json.dumps(state, default=str, sort_keys=True), name
    assert len(second[2].clippers[0].norm_history) == 9  # 8 restored + the step after resume
    # The monitor of the resumed fit watches the swapped module.
    assert second[0].doctor.probe._targets and any(
        isinstance(m, nn.LeakyReLU) for m in second[0].doctor.probe._targets
    )

    # Training on from the checkpoint: the cooldown continues (no rescue within 2 intervals).
    third = cbs()
    t3 = trainer(tmp_path / "c", third, max_steps=16)
    t3.fit(make(seed=6), loader(), ckpt_path=ckpt)
    assert not [
        e
        for e in third[0].doctor._events
        if e.get("remedy") == "lr_rescue" and e.get("type") == "intervention" and e["step"] <= 12
    ]
    assert list(third[1].swaps) == ["net.1"]
    assert not [
        e
        for e in third[0].doctor._events
        if e.get("remedy") == "leaky_relu_swap" and e.get("type") == "intervention"
    ]  # no second swap


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


# ======================================================================= DDP


class Dump(Callback):
    """Each rank writes its interventions and a hash of its parameters at the end."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        mon = next(c for c in trainer.callbacks if isinstance(c, ReluDoctor))
        h = hashlib.sha256()
        for _, p in sorted(pl_module.state_dict().items()):
            h.update(p.detach().cpu().numpy().tobytes())
        evs = [e for e in mon.doctor._events if e.get("type", "").startswith("intervention")]
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        rank = dist.get_rank() if dist.is_initialized() else 0
        Path(self.out, f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "events": evs,
                    "params": h.hexdigest(),
                    "lr": lr,
                    "modules": [type(m).__name__ for m in pl_module.net],
                },
                default=str,
            )
        )


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
        make(dead=6), loader(n=128, batch_size=8)
    )
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    remedies = {e["remedy"] for e in r0["events"] if e["type"] == "intervention"}
    assert remedies == {"leaky_relu_swap", "adaptive_grad_clip", "lr_rescue", "dormant_reset"}
    assert r0["events"] == r1["events"]
    assert r0["params"] == r1["params"] and r0["lr"] == r1["lr"] < 0.1
    assert r0["modules"][1] == "LeakyReLU" == r1["modules"][1]
