"""Run directories the report tests share: a model with chosen units killed on purpose, and
one whose module name and run-directory name carry HTML."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relu_doctor
from relu_doctor.events import Intervention, InterventionResult
from relu_doctor.history import Run
from relu_doctor.reports.html import write_report

#: Units killed by a large negative bias: no input makes them fire, and no gradient reaches
#: their bias, so they stay dead for the whole run.
KILLED = {"act1": [2, 5, 11], "act2": [0, 7]}
XSS_SITE = "<script>alert(1)</script>"
XSS_DIR = "run <img src=x onerror=alert(2)>"


@dataclass
class TrainedRun:
    run_dir: Path
    report: Path
    history: pd.DataFrame  # doc.history(): what was logged during training
    in_memory: Run  # doc.to_run()
    findings: list[relu_doctor.Finding]


def dead_unit_model() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(8, 16), act1=nn.ReLU(),
            fc2=nn.Linear(16, 16), act2=nn.ReLU(),
            head=nn.Linear(16, 3),
        )
    )
    with torch.no_grad():
        net.fc1.bias[KILLED["act1"]] = -1e3
        net.fc2.bias[KILLED["act2"]] = -1e3
    return net


def long_named_run(run_dir: Path, blocks: int = 3) -> relu_doctor.Doctor:
    """Two steps of ``blocks`` Linear+ReLU6 blocks nested as a deep model nests them, so the
    sites' names run past 80 characters and differ only near their end
    (``...inverted_residual_layers.expanded_convolution_block_0.1``)."""
    inner = nn.ModuleDict({f"expanded_convolution_block_{i}": nn.Sequential(
        nn.Linear(6, 6), nn.ReLU6()) for i in range(blocks)})
    net = nn.ModuleDict({"mobilenet_backbone_with_a_long_name": nn.ModuleDict(
        {"inverted_residual_layers": inner})})
    with relu_doctor.watch(net, log_every_n_steps=2, run_dir=run_dir) as doc:
        for _ in range(2):
            x = torch.randn(8, 6)
            for block in inner.values():
                x = block(x)
            x.sum().backward()
            doc.step()
    assert all(len(s.name) > 80 for s in doc.sites)
    return doc


def train(
    net: nn.Module, run_dir: Path, steps: int = 12, log_every: int = 3, report: bool = True,
    lower_lr_at: int | None = None,
) -> TrainedRun:
    """Train ``steps`` SGD steps, passing the loss to ``doc.step``; with ``lower_lr_at``,
    halve the learning rate after that step and record it as an intervention (as a remedy
    does), with its result one interval later."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    pending = None
    with relu_doctor.watch(net, log_every_n_steps=log_every, optimizer=opt, run_dir=run_dir) as doc:
        for step in range(1, steps + 1):
            x = torch.randn(32, 8, generator=g)
            y = torch.randint(0, 3, (32,), generator=g)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            record = doc.step(loss=loss)
            if record is not None and pending is not None:
                row = record.site_row("act1")
                assert row is not None
                doc.record_event(InterventionResult(pending.id, pending.remedy, "model",
                                                    record.step, {"dead_fraction": row["dead_fraction"]}))
                pending = None
            if step == lower_lr_at and record is not None:
                row = record.site_row("act1")
                assert row is not None
                for group in opt.param_groups:
                    group["lr"] *= 0.5
                pending = Intervention("lr_rescue", "model", step, "scaled the learning rate by 0.5",
                                       before={"dead_fraction": row["dead_fraction"]},
                                       id=f"lr_rescue:{step}")
                doc.record_event(pending)
    path = write_report(run_dir, run_dir / "report.html") if report else run_dir / "report.html"
    return TrainedRun(run_dir, path, doc.history(), doc.to_run(), doc.findings())


@pytest.fixture(scope="session")
def dead_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """A 2-site MLP with the units of :data:`KILLED` dead, trained 12 steps, logged every 3."""
    return train(dead_unit_model(), tmp_path_factory.mktemp("reports") / "dead-run")


@pytest.fixture(scope="session")
def treated_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """:func:`dead_run`'s model trained 24 steps with its loss logged and the learning rate
    halved at step 12 (an intervention, judged one interval later)."""
    return train(dead_unit_model(), tmp_path_factory.mktemp("reports") / "treated-run",
                 steps=24, lower_lr_at=12)


@pytest.fixture(scope="session")
def xss_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """A model with a site named ``<script>alert(1)</script>`` (one unit killed so that it
    shows up in the findings, the table and the figures), in a directory whose name holds
    an ``<img onerror>``."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("fc", nn.Linear(4, 6))
    net.add_module(XSS_SITE, nn.ReLU())
    net.add_module("a$b$_{x}&\"'", nn.ReLU())  # mathtext and quote characters
    net.add_module("head", nn.Linear(6, 2))
    with torch.no_grad():
        net.fc.bias[1] = -1e3
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    run_dir = tmp_path_factory.mktemp("xss") / XSS_DIR
    with relu_doctor.watch(net, log_every_n_steps=2, optimizer=opt, run_dir=run_dir) as doc:
        for _ in range(4):
            F.mse_loss(net(torch.randn(16, 4)), torch.randn(16, 2)).backward()
            opt.step()
            opt.zero_grad()
            doc.step()
    report = write_report(run_dir)
    return TrainedRun(run_dir, report, doc.history(), doc.to_run(), doc.findings())
