"""Watch a Lightning model's ReLUs with the ``ReluDoctor`` callback.

A small MLP learns a synthetic regression task with a learning rate that is too high: a
large first update pushes many first-layer units into the negative regime, where a ReLU
passes no gradient, and they never recover ("dying ReLU"). ``ReluDoctor`` watches every
ReLU, logs per-site metrics to TensorBoard at each interval, warns once per finding with
the suggested remedy, and writes a run directory as training goes.

Run it::

    python examples/lightning_monitor.py --out runs/lightning_monitor
    tensorboard --logdir runs/lightning_monitor     # relu_doctor/<metric>/<site>, CUSTOM SCALARS
    relu-doctor report runs/lightning_monitor/lightning_logs/version_0/relu_doctor -o report.html

``--lr 0.01`` trains the same model with no dead units, for comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from relu_doctor.callbacks import ReluDoctor


class Regressor(L.LightningModule):
    def __init__(self, d_in: int = 16, hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def synthetic(n: int, d_in: int = 16, seed: int = 0) -> TensorDataset:
    """y = a smooth function of x, with targets of scale ~10 (large first gradients)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, 1, generator=g)
    y = 10 * torch.tanh(x @ w / 4) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def main(argv: list[str] | None = None) -> ReluDoctor:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lightning_monitor"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    train = DataLoader(synthetic(1024), batch_size=32, shuffle=True)
    val = DataLoader(synthetic(256, seed=1), batch_size=64)

    monitor = ReluDoctor(
        log_every_n_steps=16,      # one window = 16 optimizer steps ("dead" over the window)
        monitor_validation=True,   # validation batches as a separate stream (relu_doctor_val/)
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        default_root_dir=args.out,  # TensorBoardLogger: <out>/lightning_logs/version_N
        callbacks=[monitor],
        log_every_n_steps=16,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Findings are raised as ReluDoctorWarning, once per (kind, site), while training runs.
    trainer.fit(Regressor(lr=args.lr), train, val)

    doctor = monitor.doctor  # the relu_doctor.Doctor that did the work: query it after fit
    assert doctor is not None
    print(doctor.to_pandas()[["site", "dead_fraction", "dormant_fraction", "sparsity", "grad_rms"]])
    print("\nFindings at the last step:")
    for finding in doctor.findings():
        print(f"  {finding}")
    print(f"\nTensorBoard: tensorboard --logdir {trainer.log_dir}")
    print(f"Run directory: {doctor.run_dir}")
    return monitor


if __name__ == "__main__":
    main()
