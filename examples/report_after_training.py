"""Make the HTML report of a run after training, from its run directory alone.

A plain PyTorch loop trains a small ReLU MLP with a learning rate that is too high while
``relu_doctor.watch(..., run_dir=...)`` writes the run directory as training goes (so even a
run killed half-way leaves everything up to its last logging interval). Afterwards, on this
machine or any other that has the directory, the report is made from the files alone: the
report never needs the model.

Run it::

    python examples/report_after_training.py --out runs/report_example
    # the same from a shell, for any run directory:
    relu-doctor report runs/report_example/run -o runs/report_example/report.html

In a Jupyter notebook, ``Report("runs/report_example/run")`` as the last expression of a
cell shows the report inline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import relu_doctor
from relu_doctor.reports import Report, summary, write_report


def train(run_dir: Path, steps: int = 120, lr: float = 0.05) -> None:
    """Train with Adam at a too-high learning rate, watched by relu_doctor."""
    torch.manual_seed(0)
    x = torch.randn(2048, 20)
    y = (x[:, :10].sum(1) > x[:, 10:].sum(1)).long() + 2 * (x[:, 0] > 0).long()
    model = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(),
        nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 4),
    )
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with relu_doctor.watch(model, log_every_n_steps=10, optimizer=opt, run_dir=run_dir) as doc:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            doc.step()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/report_example"))
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args(argv)

    run_dir = args.out / "run"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists; pass a new --out")
    train(run_dir, steps=args.steps)

    # After training: everything below reads the run directory only.
    run = relu_doctor.load_run(run_dir)
    print(summary(run))
    report = write_report(run, args.out / "report.html")
    print(f"Report: {report}")
    Report(run)  # in a notebook, this object displays the report inline
    return report


if __name__ == "__main__":
    main()
