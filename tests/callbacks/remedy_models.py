"""What the remedy-callback tests share: a tiny regression LightningModule, its data, a CPU
Trainer, and readers of the monitor's events and of the state at training start."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from relu_doctor.callbacks import (
    AdaptiveGradClip,
    DormantReset,
    LeakyReluSwap,
    LRRescue,
    ReluDoctor,
)

REMEDY_CALLBACKS = (AdaptiveGradClip, DormantReset, LeakyReluSwap, LRRescue)

FILTERS = (
    "ignore:.*does not have many workers.*",
    "ignore:.*is smaller than the logging interval.*",
    "ignore:.*LeafSpec.*",
    "ignore::relu_doctor.callbacks.ReluDoctorWarning",
    "ignore:.*ddp_spawn.*",
    "ignore:.*callbacks used to create the checkpoint.*",
    "ignore:.*leaving site.*",
    "ignore:.*resuming from a checkpoint that ended before the epoch ended.*",
)


class Net(L.LightningModule):
    """Linear-ReLU-Linear-ReLU-Linear regression; ``dead`` units of ``net.1`` start dead
    (bias -5), or die at step ``kill_at`` when it is given (a surge one log later: units
    dead from the start are none); every ``spike_every``-th batch has its targets scaled by
    ``spike``."""

    def __init__(
        self,
        hidden: int = 16,
        lr: float = 0.1,
        dead: int = 0,
        opt: str = "sgd",
        spike_every: int = 0,
        spike: float = 1.0,
        sched: bool = False,
        kill_at: int = 0,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        self.dead, self.kill_at = dead, kill_at
        if dead and not kill_at:
            with torch.no_grad():
                self.net[0].bias[:dead] = -5.0
        self.lr, self.opt, self.sched = lr, opt, sched
        self.spike_every, self.spike = spike_every, spike

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.kill_at and self.global_step == self.kill_at:
            with torch.no_grad():
                self.net[0].bias[: self.dead] = -5.0
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


def events(mon: ReluDoctor) -> list[dict[str, Any]]:
    """Every event the monitor's Doctor recorded, as written to ``events.jsonl``."""
    assert mon.doctor is not None
    return list(mon.doctor.to_run().events)


def interventions(mon: ReluDoctor, remedy: str | None = None) -> list[dict[str, Any]]:
    """The ``intervention`` events (of ``remedy``), as recorded (``after`` not merged)."""
    return [
        e
        for e in events(mon)
        if e.get("type") == "intervention" and remedy in (None, e.get("remedy"))
    ]


def state_json(callback: Callback) -> str:
    """A callback's checkpoint state, comparable across instances."""
    return json.dumps(callback.state_dict(), default=str, sort_keys=True)


class AtTrainStart(Callback):
    """Remembers what the model looks like when training (re)starts."""

    def on_train_start(self, trainer, pl_module):
        self.modules = {n: type(m).__name__ for n, m in pl_module.net.named_children()}
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.groups = len(trainer.optimizers[0].param_groups)
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.remedies = {
            type(c).__name__: state_json(c)
            for c in trainer.callbacks
            if isinstance(c, REMEDY_CALLBACKS)
        }


def resume(root: Path, make_callbacks: Any, steps: int, resume_steps: int, **model: Any):
    """Fit ``steps`` with fresh callbacks, checkpoint, then resume a fresh model with fresh
    callbacks to ``resume_steps``. Returns (first callbacks, their states at the checkpoint,
    second callbacks, the :class:`AtTrainStart` probe of the resumed fit)."""
    first = make_callbacks()
    t1 = trainer(root / "a", first, max_steps=steps)
    t1.fit(make(**model), loader())
    ckpt = root / "a.ckpt"
    t1.save_checkpoint(ckpt)
    saved = {type(c).__name__: state_json(c) for c in first if isinstance(c, REMEDY_CALLBACKS)}
    second = make_callbacks()
    probe = AtTrainStart()
    fresh = {**model, "seed": 5}
    trainer(root / "b", [*second, probe], max_steps=resume_steps).fit(
        make(**fresh), loader(), ckpt_path=ckpt
    )
    return first, saved, second, probe


class Dump(Callback):
    """Each rank writes its interventions and a hash of its parameters at the end."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        mon = next(c for c in trainer.callbacks if isinstance(c, ReluDoctor))
        h = hashlib.sha256()
        for _, p in sorted(pl_module.state_dict().items()):
            h.update(p.detach().cpu().numpy().tobytes())
        evs = [e for e in events(mon) if e.get("type", "").startswith("intervention")]
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
