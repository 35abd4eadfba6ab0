"""Remedies under DDP, 2 processes on CPU (gloo): every remedy acts identically on every rank.

Each rank trains on its own half of every batch (rank 0 the samples with the smaller first
feature, rank 1 the larger), so the ranks' local statistics differ; the remedies must decide
from the records, which hold the statistics summed across ranks. Each rank's global RNG is
seeded differently after the model is built, so a remedy drawing from it would make the
ranks' weights differ. Checked, for every remedy (the treatment plan's AutoClip, LR cut, ReDo
recycling and LeakyReLU swap, and Continual Backprop): the interventions are the same on both
ranks and the same as one process's over the union of the samples; afterwards the weights
and the optimizer state are bit-identical across ranks and equal one process's up to
rounding. The same for ``ReluDoctorTreatment`` under Lightning's ``DDPStrategy`` (joining the
process group, as under torchrun), whose AutoClip must clip the step's own gradients. A PReLU
swap, whose new slopes DDP would not share, is refused with more than one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import relu_doctor
from relu_doctor.callbacks import ReluDoctor, ReluDoctorTreatment
from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies import ActivationSwapper, ContinualBackprop, PlanStep, TreatmentPlan
from tests.callbacks.spawned import SPAWNED, WORLD, all_reduce, member, spawn

pytestmark = SPAWNED

BATCH, STEPS, LOG_EVERY = 8, 12, 2
SCENARIOS = ("plan", "lr_swap", "continual_backprop")


def make_net() -> nn.Sequential:
    """A small MLP (see :func:`push`)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 1))


def push(net: nn.Module, step: int) -> None:
    """At training step ``LOG_EVERY``, after the first log, push half of each hidden layer's
    units dead by their bias: a surge at the second log (units dead from the start are
    none)."""
    if step == LOG_EVERY:
        with torch.no_grad():
            net[0].bias[:8] -= 2.5  # type: ignore[index,operator]
            net[2].bias[:8] -= 2.5  # type: ignore[index,operator]


class Wrap(nn.Module):
    """The MLP as ``net`` (the sites are ``net.1`` and ``net.3``, as in the LightningModule,
    so that the re-initialisations, seeded by site, draw the same)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()
        self.steps = 0  # training passes, as the Trainer's global_step counts them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():  # (not the remedies' own passes)
            push(self.net, self.steps)
            self.steps += 1
        return self.net(x)  # type: ignore[no-any-return]


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every step's batch for both ranks, sorted by the first feature (rank 0 takes the
    first half)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(WORLD * BATCH, 6, generator=g)
        x = x[torch.argsort(x[:, 0])]
        out.append((x, x[:, :1] - x[:, 1:2]))
    return out


def scenario(name: str, model: nn.Module) -> tuple[torch.optim.Optimizer, Callable[[Any], Any]]:
    """The optimizer and the remedy (bound later) of one scenario."""
    if name == "plan":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        return opt, lambda doc: TreatmentPlan(model, optimizer=opt, cooldown=1).bind(doc)
    if name == "lr_swap":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        steps = (PlanStep("lr"), PlanStep("swap", options={"threshold": 0.3}))
        return opt, lambda doc: TreatmentPlan(model, optimizer=opt, steps=steps,
                                              cooldown=1).bind(doc)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return opt, lambda doc: ContinualBackprop(model, optimizers=opt, replacement_rate=0.05,
                                              maturity=2).bind(doc)


def run(name: str, rank: int | None, data: list[tuple[torch.Tensor, torch.Tensor]]
        ) -> dict[str, Any]:
    """Train one scenario (``rank`` None: one process over the whole batches); return its
    interventions, weights and optimizer state."""
    model = Wrap()
    torch.manual_seed(100 + (rank or 0))  # the ranks' global RNGs differ from here on
    opt, remedy = scenario(name, model)
    ddp = rank is not None
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    kw: dict[str, Any] = {}
    if ddp:
        kw = {"all_reduce": all_reduce, "world_size": WORLD, "is_writer": rank == 0}
    events: list[dict[str, Any]] = []
    with relu_doctor.watch(model, log_every_n_steps=LOG_EVERY, every_n_steps=1,
                           optimizer=opt, **kw) as doc:
        doc.add_event_listener(events.append)
        remedy(doc)
        for x, y in data:
            if ddp:
                x, y = x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            doc.step()
    return {
        "events": [intervention(e) for e in events if e.get("type") == "intervention"],
        "state": {k: v.detach().clone() for k, v in model.net.state_dict().items()},
        "opt": opt.state_dict()["state"],
        "modules": [type(m).__name__ for m in model.net],
    }


def intervention(e: dict[str, Any]) -> tuple[Any, ...]:
    units = e["details"].get("units")
    return (e["remedy"], e["site"], e["step"], tuple(units) if units else None)


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        push(self.net, self.global_step)
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.02)


class Capture(L.Callback):
    """The monitor's events (after the monitor made its Doctor)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        monitor = next(c for c in trainer.callbacks if isinstance(c, ReluDoctor))
        monitor.doctor.add_event_listener(self.events.append)


def run_lightning(rank: int, root: Path) -> dict[str, Any]:
    """The "plan" scenario through the treatment callback, under Lightning's DDPStrategy."""
    model = Net()
    torch.manual_seed(100 + rank)
    data = [(x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH])
            for x, y in batches()]
    loader = DataLoader(TensorDataset(torch.cat([x for x, _ in data]),
                                      torch.cat([y for _, y in data])),
                        batch_size=len(data[0][0]), shuffle=False)
    capture = Capture()
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy="ddp", max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, use_distributed_sampler=False,
        callbacks=[ReluDoctor(LOG_EVERY, every_n_steps=1, warn=None),
                   ReluDoctorTreatment(cooldown=1, check_init=False), capture],
    )
    trainer.fit(model, loader)
    return {
        "events": [intervention(e) for e in capture.events if e.get("type") == "intervention"],
        "state": {k: v.detach().clone() for k, v in model.net.state_dict().items()},
        "opt": trainer.optimizers[0].state_dict()["state"],
        "modules": [type(m).__name__ for m in model.net],
    }


def _worker(rank: int, store: str, out: str) -> None:
    with member(rank, store):
        torch.set_num_threads(1)
        result = {name: run(name, rank, batches()) for name in SCENARIOS}
        # Lightning's DDPStrategy joins the process group made here (as under torchrun)
        os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(WORLD))
        result["lightning"] = run_lightning(rank, Path(out) / f"lightning{rank}")
        try:  # a PReLU's new slopes would be each process's own
            ActivationSwapper(Wrap(), kind="prelu")
            result["prelu"] = "accepted"
        except ReluDoctorError as e:
            result["prelu"] = str(e)
        torch.save(result, Path(out) / f"rank{rank}.pt")


def flat(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in flat(tree[k])]
    return []


def test_every_remedy_acts_identically_on_every_rank_and_as_one_process(tmp_path):
    spawn(_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    fired: set[str] = set()
    ones = {name: run(name, None, batches()) for name in SCENARIOS}
    ones["lightning"] = ones["plan"]  # the callbacks act as the plan in a plain loop
    for name in (*SCENARIOS, "lightning"):
        r0, r1, one = ranks[0][name], ranks[1][name], ones[name]
        # the same decisions everywhere, from the summed statistics
        assert r0["events"] == r1["events"] == one["events"], name
        assert r0["modules"] == r1["modules"] == one["modules"], name
        fired |= {e[0] for e in r0["events"]}
        # the same weights and optimizer state on both ranks, bit for bit
        for a, b in zip(flat(r0["state"]) + flat(r0["opt"]), flat(r1["state"]) + flat(r1["opt"]),
                        strict=True):
            assert torch.equal(a, b), name
        # and those of one process over the same samples, up to rounding
        for k, v in one["state"].items():
            torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5, msg=name)
    assert {e[0] for e in ranks[0]["lightning"]["events"]} >= {"adaptive_grad_clip",
                                                             "dormant_reset"}
    assert fired >= {"adaptive_grad_clip", "lr_rescue", "dormant_reset", "leaky_relu_swap",
                     "continual_backprop"}, fired

    for r in ranks:
        assert r["prelu"].startswith("kind: expected one process ('prelu' adds parameters")
        assert r["prelu"].endswith(f"got torch.distributed with {WORLD} processes.")
    ActivationSwapper(Wrap(), kind="prelu")  # one process: accepted

    # The test can tell: one rank's own samples call for other changes than the union's.
    local = run("plan", None, [(x[:BATCH], y[:BATCH]) for x, y in batches()])
    assert local["events"] != ranks[0]["plan"]["events"]
