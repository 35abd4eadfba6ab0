"""Treat dying ReLUs during training: the same seed, untreated and treated, side by side.

A small MLP classifies a synthetic 4-class task (an XOR of two features plus a linear rule,
so it needs its hidden units). Training is made to go wrong on purpose, as it does in real
runs: SGD with momentum at a learning rate too high for this model, and every 25th batch
with corrupted, exploding targets (a data glitch). Untreated, the glitches blow the
gradients up and most units of the second layer die: they never fire again and pass no
gradient.

The treated run adds relu_doctor's remedies to the Trainer, next to the ``ReluDoctor``
monitor whose log records they decide from:

* ``AdaptiveGradClip`` (AutoClip) clips each step's gradient norm to the 10th percentile of
  its history, so a glitch cannot throw the weights far;
* ``LRRescue`` halves the learning rate when a site's dead fraction jumps;
* ``LeakyReluSwap`` swaps a site that stays mostly dead for LeakyReLU, so gradient flows again;
* ``DormantReset`` recycles dormant units (ReDo): fresh incoming weights, zero outgoing weights,
  optimizer state of those slices reset.

Every intervention is an event in the run directory (``events.jsonl``) and in TensorBoard,
with the site's metrics before and at the next logging interval after.

Run it::

    python examples/remedies_treated_vs_untreated.py --out runs/remedies
    relu-doctor report runs/remedies/treated/relu_doctor -o treated.html
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import relu_doctor
from relu_doctor.callbacks import (
    AdaptiveGradClip,
    DormantReset,
    LeakyReluSwap,
    LRRescue,
    ReluDoctor,
)


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 0.5, glitch_every: int = 25, glitch: float = 40.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(8, 64),
            nn.ReLU(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.global_step % self.hparams.glitch_every == self.hparams.glitch_every - 1:
            loss = loss * self.hparams.glitch  # a corrupted batch: exploding gradients
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def synthetic(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long() * 2 + (x[:, 2] + x[:, 3] > 0).long()
    return TensorDataset(x, y)


def evaluate(model: Classifier, data: TensorDataset) -> dict[str, Any]:
    """Held-out numbers: accuracy, loss, and per site the fraction of units that never fire
    on any held-out sample (dead) or have a ReDo score at or below tau (mean |h| <= 0.1 of the
    layer's mean, dead units included: what ReDo recycles)."""
    x, y = data.tensors
    out: dict[str, Any] = {}
    model.eval()
    with torch.no_grad():
        h1 = model.net[1](model.net[0](x))
        h2 = model.net[3](model.net[2](h1))
        logits = model.net[4](h2)
    for name, h in (("net.1", h1), ("net.3", h2)):
        m = h.abs().mean(0)
        out[f"dead {name}"] = float(((h > 0).sum(0) == 0).float().mean())
        out[f"below tau {name}"] = (
            float((m / m.mean() <= 0.1).float().mean()) if m.mean() > 0 else 1.0
        )
    out["accuracy"] = float((logits.argmax(1) == y).float().mean())
    out["loss"] = float(F.cross_entropy(logits, y))
    return out


def train(out: Path, treated: bool, steps: int, seed: int = 0) -> tuple[Classifier, ReluDoctor]:
    L.seed_everything(seed, verbose=False)
    model = Classifier()
    monitor = ReluDoctor(log_every_n_steps=10, run_dir=out / "relu_doctor", warn=None)
    callbacks: list[Any] = [monitor]
    if treated:
        callbacks += [
            AdaptiveGradClip("autoclip", percentile=10),
            LRRescue(factor=0.5, cooldown=2, dead_jump=0.2),
            LeakyReluSwap(threshold=0.3, patience=2, slope=0.1),
            DormantReset(every=2),
        ]
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    data = DataLoader(synthetic(2048, seed=1), batch_size=64, shuffle=True)
    trainer.fit(model, data)
    return model, monitor


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/remedies"))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)

    held_out = synthetic(2048, seed=2)
    results: dict[str, dict[str, Any]] = {}
    for name in ("untreated", "treated"):
        model, _monitor = train(args.out / name, treated=name == "treated", steps=args.steps)
        results[name] = evaluate(model, held_out)
        # Each intervention with its metrics after, from the run directory.
        results[name]["interventions"] = relu_doctor.load_run(
            args.out / name / "relu_doctor"
        ).interventions()

    print(f"Same seed, {args.steps} steps, held-out data:\n")
    print(f"{'':22s}{'untreated':>12s}{'treated':>12s}")
    for key in ("accuracy", "loss", "dead net.1", "dead net.3", "below tau net.1",
                "below tau net.3"):
        u, t = results["untreated"][key], results["treated"][key]
        pct = key.startswith(("dead", "below", "accuracy"))
        fmt = (lambda v: f"{v:12.1%}") if pct else (lambda v: f"{v:12.3f}")
        print(f"{key:22s}{fmt(u)}{fmt(t)}")
    evs = results["treated"]["interventions"]
    counts: dict[str, int] = {}
    for e in evs:
        counts[e["remedy"]] = counts.get(e["remedy"], 0) + 1
    print(
        f"\nInterventions in the treated run ({len(evs)}): "
        + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    )
    for e in [e for e in evs if e["remedy"] != "adaptive_grad_clip"][:8]:
        metric = "below_tau_fraction" if e["remedy"] == "dormant_reset" else "dead_fraction"
        before = (e.get("before") or {}).get(metric)
        after = (e.get("after") or {}).get(metric)
        change = (
            f" ({metric.replace('_', ' ')} {before:.0%} -> {after:.0%} at the next log)"
            if before is not None and after is not None
            else ""
        )
        print(f"  step {e['step']:4d} {e['site']:6s} {e['remedy']}: {e['what']}{change}")
    return results


if __name__ == "__main__":
    main()
