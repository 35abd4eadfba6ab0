"""Step-time overhead of relu_doctor against plain training, a hand-written hook baseline and
peers (Cockpit, wandb.watch), with the persistent memory each keeps per unit.

Every configuration trains its own copy of the same model (same seed, same initial weights,
same batches in the same order). Configurations are interleaved: each round runs one block of
``--steps`` steps of every configuration, in a shuffled order, so that slow drifts of the
machine (other processes, thermal state) hit all of them alike. The first round is warm-up.
Reported per configuration:

* ``ms/step``: the median over rounds of the block's mean step time (a 16-step block holds
  exactly one collecting step of the every-16th configuration, so this is its amortised cost);
* ``x plain``: the median over rounds of (block time / plain's block time in the same round),
  with the interquartile range of those paired ratios as the noise band.

The peers run in a second phase against their own plain reference: wandb's offline writer
works in a background process, which would otherwise slow whichever configuration runs next.
On a CUDA device step times come from CUDA events and the GPU peak memory is reported too.

Run (CPU, 2 threads; 5-8 minutes with the peers installed)::

    .venv/bin/python -m benchmarks.overhead
    .venv/bin/python -m benchmarks.overhead --models cnn mlp --rounds 20
    .venv/bin/python -m benchmarks.overhead --quick        # tiny sizes: checks the harness only
    python -m benchmarks.overhead --device cuda --models resnet --autocast bf16 --no-peers

``--autocast bf16`` (or ``fp16``) runs every configuration's forward pass under
``torch.autocast``, so the activations relu_doctor reads are bfloat16 (float16) as in mixed
precision training; ``fp16`` also scales the loss with a ``GradScaler``, which relu_doctor is
given.

Peers are measured when importable (``cockpit-for-pytorch`` + ``backpack-for-pytorch``,
``wandb``); missing ones are reported as "not installed".
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

SEED = 0
NEVER = 10**12  # log_every_n_steps while timing: logging steps are measured apart
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
EVERY_N = 16
POOL = 8  # distinct batches, cycled in the same order by every configuration
PEER_STEPS = 4  # steps per block for the peers' phase: they cost many times a step
PEER_BLOCK_S = 2.0  # a peer's block ends after this long (Cockpit takes ~30 s a step on the MLP)
BUDGET = {"every": 1.03, "every16": 1.005}  # the design budget (README), CNN and MLP on CPU


# ---------------------------------------------------------------------------- models


class BenchCNN(nn.Module):
    """The benchmark CNN: 3 x (conv + BatchNorm + inplace ReLU), pooling, a linear head."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(c3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def bench_mlp(d_in: int = 784, hidden: int = 1024, depth: int = 3, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    """The 1x1 convolution + BatchNorm shortcut of a residual block that changes shape."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one inplace ReLU module called twice per forward."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class SmallResNet(nn.Module):
    """ResNet-18's shape (stem, 4 stages of 2 BasicBlocks, pooled head) at small width."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, c = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            c_out = width * mult
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1, 3x3, 1x1 convolutions, one inplace ReLU called 3 times."""

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * width
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class SmallResNet50(nn.Module):
    """ResNet-50's shape (stem, stages of 3/4/6/3 Bottlenecks: 49 ReLU calls) at small width."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width * 2, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * 2)
        self.relu = nn.ReLU(inplace=True)
        blocks: list[nn.Module] = []
        c = width * 2
        for i, (n, mult) in enumerate(zip((3, 4, 6, 3), (1, 2, 4, 8), strict=True)):
            for j in range(n):
                blocks.append(Bottleneck(c, width * mult, 2 if (j == 0 and i > 0) else 1))
                c = 4 * width * mult
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    batch: int
    classes: int = 10
    budgeted: bool = False  # the design budget applies (CNN and MLP)


def _channels_last(model: nn.Module) -> nn.Module:
    """``model`` with its parameters in channels-last memory: its convolutions then output
    NHWC maps, the units (channels) last in memory, as a Keras model's are."""
    return model.to(memory_format=torch.channels_last)


def model_specs(quick: bool = False) -> dict[str, ModelSpec]:
    """The benchmark models; ``quick`` gives tiny versions of the same shapes."""
    if quick:
        return {
            "cnn": ModelSpec("cnn", "CNN (tiny)", lambda: BenchCNN((4, 8, 8)), (3, 16, 16), 8, budgeted=True),
            "mlp": ModelSpec("mlp", "MLP (tiny)", lambda: bench_mlp(784, 32), (784,), 16, budgeted=True),
            "resnet": ModelSpec("resnet", "ResNet (tiny)", lambda: SmallResNet(4), (3, 16, 16), 4),
            "resnet50": ModelSpec("resnet50", "ResNet-50 (tiny)", lambda: SmallResNet50(2),
                                  (3, 16, 16), 4),
            "mlp256": ModelSpec("mlp256", "256-site MLP (tiny)", lambda: bench_mlp(16, 8, 256),
                                (16,), 8),
            "cnn_cl": ModelSpec("cnn_cl", "CNN channels-last (tiny)",
                                lambda: _channels_last(BenchCNN((4, 8, 8))), (3, 16, 16), 8),
        }
    return {
        "cnn": ModelSpec(
            "cnn", "CNN 3x(conv+BN+ReLU) 32/64/128 ch, 32x32, batch 64",
            lambda: BenchCNN((32, 64, 128)), (3, 32, 32), 64, budgeted=True,
        ),
        "mlp": ModelSpec(
            "mlp", "MLP 784-1024-1024-1024-10, batch 256",
            lambda: bench_mlp(784, 1024), (784,), 256, budgeted=True,
        ),
        "resnet": ModelSpec(
            "resnet", "ResNet-18 shape, widths 16-128, 32x32, batch 32",
            lambda: SmallResNet(16), (3, 32, 32), 32,
        ),
        "resnet50": ModelSpec(
            "resnet50", "ResNet-50 shape (49 ReLU calls), widths 8-64 (x4 out), 32x32, batch 16",
            lambda: SmallResNet50(8), (3, 32, 32), 16,
        ),
        "mlp256": ModelSpec(
            "mlp256", "deep MLP, 256 ReLU sites of 128 units, batch 128",
            lambda: bench_mlp(128, 128, 256), (128,), 128,
        ),
        "cnn_cl": ModelSpec(
            "cnn_cl", "the CNN in channels-last memory (NHWC, Keras' layout): units last",
            lambda: _channels_last(BenchCNN((32, 64, 128))), (3, 32, 32), 64,
        ),
    }


# ---------------------------------------------------------------------------- configurations


class NotInstalled(Exception):
    pass


class Runner:
    """One configuration: its own model, optimizer and step counter."""

    key = "plain"
    label = "plain"

    def __init__(
        self, spec: ModelSpec, data: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device, autocast: torch.dtype | None = None,
    ) -> None:
        torch.manual_seed(SEED)
        self.spec = spec
        self.device = device
        self.autocast = autocast
        self.scaler = (
            torch.amp.GradScaler(device.type) if autocast == torch.float16 else None
        )
        self.model = spec.build().to(device)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.data = data
        self.steps = 0

    def attach(self) -> None:
        """Install the monitoring (raise NotInstalled when its package is missing)."""

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)

    def train_step(self) -> None:
        x, y = self.data[self.steps % len(self.data)]
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            loss = self.loss(x, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.after_step(loss)
        self.steps += 1

    def after_step(self, loss: torch.Tensor) -> None:
        pass

    def state_bytes(self) -> tuple[int, int] | None:
        """(bytes of persistent accumulator state, units watched), if that applies."""
        return None

    def close(self) -> None:
        pass


class ControlRunner(Runner):
    """A second, identical plain run: its ratio to plain is the harness's noise floor (two
    copies of one model can differ by several percent through memory placement alone)."""

    key = "control"
    label = "plain, second copy (A/A control)"


class DoctorRunner(Runner):
    def __init__(
        self, *a: Any, every_n: int | None = 1, layers: bool = True, **kw: Any
    ) -> None:
        super().__init__(*a, **kw)
        self.every_n = every_n  # None: the default, overhead_budget=0.03
        self.layers = layers  # per-layer gradient norms (the optimizer tap) too
        if every_n is None:
            self.key, self.label = "rd_default", "relu_doctor, default settings (budget 3%)"
            return
        self.key = ("rd_every" if every_n == 1 else f"rd_{every_n}") + ("" if layers else "_act")
        self.label = (
            "relu_doctor, every step" if every_n == 1 else f"relu_doctor, every {every_n}th step"
        ) + ("" if layers else ", activation sites only")

    def attach(self) -> None:
        import relu_doctor

        rate: dict[str, Any] = (
            {"overhead_budget": 0.03} if self.every_n is None
            else {"every_n_steps": self.every_n, "overhead_budget": None}
        )
        self.doc = relu_doctor.watch(
            self.model, optimizer=self.opt if self.layers else None,
            log_every_n_steps=NEVER, grad_scaler=self.scaler, **rate,
        )

    def after_step(self, loss: torch.Tensor) -> None:
        self.doc.step()

    def state_bytes(self) -> tuple[int, int]:
        sites = self.doc.sites
        nbytes = sum(s.stats.window.nbytes + s.stats.lifetime.nbytes for s in sites)
        return nbytes, sum(s.units for s in sites)

    def close(self) -> None:
        self.doc.detach()


class NaiveRunner(Runner):
    """The baseline people write by hand: (out > 0).sum(dims) and a tensor gradient hook."""

    key = "naive"
    label = "naive hooks ((out>0).sum, grad hook)"

    def attach(self) -> None:
        self.active: dict[str, torch.Tensor] = {}
        self.grad_sq: dict[str, torch.Tensor] = {}
        self.handles = [
            m.register_forward_hook(self._hook(name))
            for name, m in self.model.named_modules()
            if isinstance(m, nn.ReLU)
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            dims = [d for d in range(out.dim()) if d != 1]
            key = f"{name}/{out.shape[1]}"
            act = (out > 0).sum(dims)
            self.active[key] = self.active[key] + act if key in self.active else act
            if out.requires_grad:

                def grad_hook(g: torch.Tensor) -> None:
                    if g.dtype in (torch.float16, torch.bfloat16):  # no fp16 overflow, no
                        g = g.float()  # bf16 sums of 3 digits: what a careful hand writes
                    sq = (g * g).sum(dims)
                    if self.scaler is not None:  # fp16: the loss scale divided out, as rd does
                        sq = sq / self.scaler._scale.float().square()  # type: ignore[union-attr]
                    self.grad_sq[key] = self.grad_sq[key] + sq if key in self.grad_sq else sq

                out.register_hook(grad_hook)

        return hook

    def state_bytes(self) -> tuple[int, int]:
        acc = list(self.active.values()) + list(self.grad_sq.values())
        return sum(t.nbytes for t in acc), sum(t.numel() for t in self.active.values())

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class CockpitRunner(Runner):
    """Cockpit's "economy" configuration, computed at every step."""

    key = "cockpit"
    label = "Cockpit economy"

    def attach(self) -> None:
        if importlib.util.find_spec("cockpit") is None or importlib.util.find_spec("backpack") is None:
            raise NotInstalled("pip install cockpit-for-pytorch")
        from backpack import extend
        from cockpit import Cockpit
        from cockpit.utils.configuration import configuration

        # BackPACK's module backward hooks reject an inplace op on a hooked module's output
        # (pytorch#61519), so inplace ReLUs run out of place here (same values).
        for m in self.model.modules():
            if isinstance(m, nn.ReLU) and m.inplace:
                m.inplace = False
        self.model = extend(self.model)
        self.loss_fn = extend(nn.CrossEntropyLoss())
        self.per_sample = nn.CrossEntropyLoss(reduction="none")
        self.cockpit = Cockpit(self.model.parameters(), quantities=configuration("economy"))

    def train_step(self) -> None:
        x, y = self.data[self.steps % len(self.data)]
        self.opt.zero_grad(set_to_none=True)
        out = self.model(x)
        loss = self.loss_fn(out, y)
        info = {
            "batch_size": x.shape[0],
            "individual_losses": self.per_sample(out, y),
            "loss": loss,
            "optimizer": self.opt,
        }
        with self.cockpit(self.steps, info=info):
            loss.backward(create_graph=self.cockpit.create_graph(self.steps))
        self.opt.step()
        self.steps += 1


class WandbRunner(Runner):
    """wandb.watch(log="all", log_freq=1), offline, with a wandb.log of the loss per step."""

    key = "wandb"
    label = "wandb.watch(log='all', log_freq=1)"

    def attach(self) -> None:
        if importlib.util.find_spec("wandb") is None:
            raise NotInstalled("pip install wandb")
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_SILENT"] = "true"
        import wandb

        self.dir = tempfile.mkdtemp(prefix="relu_doctor_bench_wandb_")
        self.run = wandb.init(
            mode="offline", dir=self.dir, project="relu_doctor-overhead", name=self.spec.key
        )
        self.run.watch(self.model, log="all", log_freq=1)

    def after_step(self, loss: torch.Tensor) -> None:
        self.run.log({"loss": float(loss)})

    def close(self) -> None:
        try:
            self.run.unwatch(self.model)
            self.run.finish()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


CORE: list[tuple[type[Runner], dict[str, Any]]] = [
    (Runner, {}),
    (ControlRunner, {}),
    (DoctorRunner, {"every_n": 1}),
    (DoctorRunner, {"every_n": EVERY_N}),
    (DoctorRunner, {"every_n": 1, "layers": False}),
    (DoctorRunner, {"every_n": None}),
    (NaiveRunner, {}),
]
PEERS: list[tuple[type[Runner], dict[str, Any]]] = [(CockpitRunner, {}), (WandbRunner, {})]
ROW_ORDER = ["plain", "control", "rd_default", "rd_every", f"rd_{EVERY_N}", "rd_every_act", "naive",
             "cockpit", "wandb"]


# ---------------------------------------------------------------------------- timing


def _time_block(
    runner: Runner, steps: int, device: torch.device, clock: str = "wall",
    max_s: float | None = None,
) -> tuple[list[float], int]:
    """Seconds per step of up to ``steps`` consecutive steps, and the peak device memory.

    ``clock="cpu"`` (CPU only) counts the process's CPU time instead of wall time: on a
    machine shared with other work it measures the work done, not the waiting. ``max_s``
    ends the block early (after at least one step) once it has run that long.
    """
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        ev[0].record()
        done = 0
        for k in range(steps):
            runner.train_step()
            ev[k + 1].record()
            done += 1
            if max_s is not None and time.perf_counter() - start > max_s:
                break
        torch.cuda.synchronize(device)
        times = [ev[k].elapsed_time(ev[k + 1]) / 1e3 for k in range(done)]
        return times, torch.cuda.max_memory_allocated(device)
    times = []
    now_fn = time.process_time if clock == "cpu" else time.perf_counter
    prev = now_fn()
    for _ in range(steps):
        runner.train_step()
        now = now_fn()
        times.append(now - prev)
        prev = now
        if max_s is not None and time.perf_counter() - start > max_s:
            break
    return times, 0


@dataclass
class Timing:
    key: str
    label: str
    blocks: list[list[float]] = field(default_factory=list)  # seconds per step, per round
    peak_bytes: int = 0
    status: str = "ok"  # or "not installed" / "failed: ..."
    state_bytes: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.blocks)

    def block_means(self) -> list[float]:
        return [statistics.fmean(b) for b in self.blocks]

    def ms_step(self) -> float:
        """Median over rounds of the block's mean step time (amortised), in ms."""
        return statistics.median(self.block_means()) * 1e3

    def ms_median_step(self) -> float:
        """Median of all individual step times, in ms."""
        return statistics.median(t for b in self.blocks for t in b) * 1e3


def _paired(t: Timing, ref: Timing) -> list[float]:
    return [a / b for a, b in zip(t.block_means(), ref.block_means(), strict=True)]


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def _measure(
    runners: list[Runner], timings: dict[str, Timing], *, rounds: int, warmup: int,
    steps: int, device: torch.device, rng: random.Random, progress: Callable[[str], None],
    clock: str = "wall", max_block_s: float | None = None,
) -> None:
    for rnd in range(warmup + rounds):
        order = list(runners)
        rng.shuffle(order)
        for r in order:
            t = timings[r.key]
            if t.status != "ok":
                continue
            gc.collect()
            try:
                # plain always runs whole blocks; a slow peer stops early
                cap = None if r.key == "plain" else max_block_s
                times, peak = _time_block(r, steps, device, clock, cap)
            except Exception as e:  # a peer that cannot handle this model
                t.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                t.blocks.clear()
                continue
            if rnd >= warmup:
                t.blocks.append(times)
                t.peak_bytes = max(t.peak_bytes, peak)
        progress(f"  round {rnd + 1}/{warmup + rounds}" + (" (warm-up)" if rnd < warmup else ""))


def _make_data(spec: ModelSpec, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED + 1)
    return [
        (
            torch.randn((spec.batch, *spec.sample_shape), generator=g).to(device),
            torch.randint(0, spec.classes, (spec.batch,), generator=g).to(device),
        )
        for _ in range(POOL)
    ]


# ---------------------------------------------------------------------------- checks


def _checks(runners: dict[str, Runner], device: torch.device) -> dict[str, bool]:
    """Harness correctness: same trajectory everywhere, exact counts, naive == relu_doctor."""
    from relu_doctor.stats import ROW

    out: dict[str, bool] = {}
    if "plain" not in runners:
        return out
    plain = runners["plain"]
    ref = [p.detach() for p in plain.model.parameters()]
    for key in ("control", "rd_default", "rd_every", f"rd_{EVERY_N}", "rd_every_act", "naive"):
        if key in runners:
            params = [p.detach() for p in runners[key].model.parameters()]
            out[f"same_trajectory[{key}]"] = runners[key].steps == plain.steps and all(
                torch.equal(a, b) for a, b in zip(ref, params, strict=True)
            )
    for key in ("rd_default", "rd_every", f"rd_{EVERY_N}", "rd_every_act"):
        r = runners.get(key)
        if not isinstance(r, DoctorRunner):
            continue
        collected = (
            r.doc.window_steps if r.every_n is None else math.ceil(r.steps / r.every_n)
        )
        good = bool(r.doc.sites) and r.doc.global_step == r.steps
        for s in r.doc.sites:
            w = (s.stats.window + s.stats.lifetime).cpu()
            per_unit = math.prod(s.shape) // s.units
            good &= bool((w[ROW["elements"]] == collected * per_unit).all())
            good &= bool((w[ROW["grad_elements"]] == collected * per_unit).all())
            good &= bool((w[ROW["active"]] <= w[ROW["elements"]]).all())
        out[f"exact_counts[{key}]"] = good
    rd, naive = runners.get("rd_every"), runners.get("naive")
    if isinstance(rd, DoctorRunner) and isinstance(naive, NaiveRunner):
        rd_active = sum(float((s.stats.window + s.stats.lifetime)[ROW["active"]].sum()) for s in rd.doc.sites)
        nv_active = sum(float(t.sum()) for t in naive.active.values())
        rd_gsq = sum(float((s.stats.window + s.stats.lifetime)[ROW["grad_sq"]].sum()) for s in rd.doc.sites)
        nv_gsq = sum(float(t.double().sum()) for t in naive.grad_sq.values())
        out["naive_active==relu_doctor"] = rd_active == nv_active
        out["naive_grad_sq~relu_doctor"] = math.isclose(rd_gsq, nv_gsq, rel_tol=1e-3)
    return out


def _log_step_cost(r: DoctorRunner, reps: int = 7) -> float:
    """Median seconds of a training step whose doc.step() logs (read, diagnose, record), in
    steady state: after one logging step left untimed (the run's first, which makes the
    record's tables and buffers)."""
    doc = r.doc
    times = []
    for _ in range(reps + 1):
        doc.log_every_n_steps = doc.global_step + 1
        t0 = time.perf_counter()
        r.train_step()
        if next(r.model.parameters()).is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    doc.log_every_n_steps = NEVER
    return statistics.median(times[1:])


# ---------------------------------------------------------------------------- driver


@dataclass
class ModelResult:
    spec: ModelSpec
    core: dict[str, Timing]
    peers: dict[str, Timing]
    checks: dict[str, bool]
    log_step_s: float | None
    log_every_default: int = 50

    def ratio(self, key: str) -> tuple[float, float, float] | None:
        """(q25, median, q75) of the paired ratios of ``key`` to its phase's plain."""
        for phase in (self.core, self.peers):
            if key in phase and phase[key].ok and phase["plain"].ok:
                return _quartiles(_paired(phase[key], phase["plain"]))
        return None

    def timing(self, key: str) -> Timing | None:
        return self.core.get(key) or self.peers.get(key)


def run_model(
    spec: ModelSpec, *, device: torch.device, steps: int, rounds: int, peer_rounds: int,
    peer_steps: int = PEER_STEPS,
    warmup: int = 1, peers: bool = True, progress: Callable[[str], None] = lambda s: None,
    clock: str = "wall", autocast: torch.dtype | None = None,
) -> ModelResult:
    data = _make_data(spec, device)
    rng = random.Random(SEED)
    result_phases = []
    all_runners: dict[str, Runner] = {}
    checks: dict[str, bool] = {}
    log_step = None
    phases = ((CORE, rounds, steps), ([(Runner, {}), *PEERS] if peers else [], peer_rounds, peer_steps))
    for phase, n_rounds, n_steps in phases:
        runners, timings = [], {}
        for cls, kw in phase:
            r = cls(spec, data, device, autocast, **kw)
            t = Timing(r.key, r.label)
            timings[r.key] = t
            try:
                r.attach()
            except NotInstalled:
                t.status = "not installed"
                continue
            except Exception as e:
                t.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                continue
            runners.append(r)
        if len(runners) < 2:  # no peer installed: nothing to compare with plain
            for r in runners:
                r.close()
            result_phases.append(timings)
            continue
        progress(f"{spec.key}: " + ", ".join(r.key for r in runners))
        try:
            _measure(runners, timings, rounds=n_rounds, warmup=warmup, steps=n_steps,
                     device=device, rng=rng, progress=progress, clock=clock,
                     max_block_s=None if phase is CORE else PEER_BLOCK_S)
            for r in runners:
                timings[r.key].state_bytes = r.state_bytes()
            if phase is CORE:
                all_runners = {r.key: r for r in runners}
        finally:
            if phase is CORE:
                checks = _checks(all_runners, device)
                rd = all_runners.get("rd_every")
                if isinstance(rd, DoctorRunner):
                    log_step = _log_step_cost(rd)
            for r in runners:
                r.close()
        result_phases.append(timings)
    return ModelResult(spec, result_phases[0], result_phases[1], checks, log_step)


def _cell(res: ModelResult, key: str) -> str:
    t = res.timing(key)
    if t is None:
        return "-"
    if not t.ok:
        return "failed (note)" if t.status.startswith("failed") else t.status
    if key == "plain":
        return f"{t.ms_step():.2f} ms"
    q = res.ratio(key)
    assert q is not None
    lo, mid, hi = q
    return f"{mid:.3f}x [{lo:.3f}-{hi:.3f}]"


def format_table(results: list[ModelResult], device: torch.device) -> str:
    labels = {
        "plain": "plain (ms/step)", "control": "plain, second copy (A/A control)",
        "rd_default": "relu_doctor, default settings (budget 3%)",
        "rd_every": "relu_doctor, every step",
        f"rd_{EVERY_N}": f"relu_doctor, every {EVERY_N}th step",
        "rd_every_act": "  every step, activation sites only",
        "naive": "naive hooks ((out>0).sum + grad hook)",
        "cockpit": "Cockpit 'economy'", "wandb": "wandb.watch(log='all', log_freq=1)",
    }
    head = ["configuration"] + [r.spec.key.upper() if r.spec.key != "resnet" else "ResNet" for r in results]
    head.append("state B/unit")
    rows = [head]
    for key in ROW_ORDER:
        row = [labels[key]] + [_cell(r, key) for r in results]
        per_unit = "-"
        for r in results:
            t = r.timing(key)
            if t is not None and t.state_bytes and t.state_bytes[1]:
                per_unit = f"{t.state_bytes[0] / t.state_bytes[1]:.0f}"
                break
        row.append(per_unit)
        rows.append(row)
    if device.type == "cuda":
        rows.append(["GPU peak MiB (plain / every step)"] + [
            f"{r.core['plain'].peak_bytes / 2**20:.0f} / {r.core['rd_every'].peak_bytes / 2**20:.0f}"
            for r in results
        ] + [""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def format_report(
    results: list[ModelResult], device: torch.device, clock: str = "wall", threads: int | None = None
) -> str:
    """The ratio table and the notes under it, as text."""
    plain = results[0].core["plain"] if results else None
    rounds = len(plain.blocks) if plain is not None else 0
    steps = len(plain.blocks[0]) if plain is not None and plain.blocks else 0
    peer = [t for r in results for t in r.peers.values() if t.blocks]
    peer_rounds = max((len(t.blocks) for t in peer), default=0)
    peer_steps = len(peer[0].blocks[0]) if peer else 0
    out = [
        f"relu_doctor overhead benchmark: torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
           f", {threads or torch.get_num_threads()} threads, {clock} clock")
        + f", {rounds} rounds x {steps} steps (+1 warm-up round)"
        + (f"; peers {peer_rounds} rounds x {peer_steps} steps (a peer's block stops after "
           f"{PEER_BLOCK_S:g} s)" if peer_rounds else "; no peer installed"),
        "ratio = median over rounds of (block time / plain's block time in the same round) "
        "[interquartile range]; plain in ms per step (block means, median over rounds)",
        "",
    ]
    for r in results:
        out.append(f"  {r.spec.key.upper() if r.spec.key != 'resnet' else 'ResNet'}: {r.spec.title}")
    out += ["", format_table(results, device), ""]
    for r in results:
        name = r.spec.key.upper() if r.spec.key != "resnet" else "ResNet"
        plain = r.core["plain"].ms_step() if r.core["plain"].ok else float("nan")
        rd = r.timing("rd_every")
        if r.log_step_s is not None and rd is not None and rd.ok:
            extra = r.log_step_s * 1e3 - rd.ms_step()
            out.append(
                f"{name}: a logging step costs {r.log_step_s * 1e3:.1f} ms ({extra:+.1f} ms; "
                f"{100 * extra / r.log_every_default / plain:+.2f}% of a plain step at "
                f"log_every_n_steps={r.log_every_default}); median single step: "
                + ", ".join(
                    f"{k} {r.core[k].ms_median_step():.2f} ms" for k in ("plain", "rd_every", f"rd_{EVERY_N}")
                    if k in r.core and r.core[k].ok
                )
            )
        if r.spec.budgeted and device.type == "cpu":
            verdicts = []
            for key, limit in (("rd_every", BUDGET["every"]), (f"rd_{EVERY_N}", BUDGET["every16"])):
                q = r.ratio(key)
                if q is not None:
                    verdicts.append(f"{key} {q[1]:.3f}x vs {limit}x: {'ok' if q[1] <= limit else 'OVER'}")
            control = r.ratio("control")
            if control is not None:
                verdicts.append(f"A/A control {control[1]:.3f}x (the noise floor of these ratios)")
            out.append(f"{name} budget: " + "; ".join(verdicts))
        for t in [*r.core.values(), *r.peers.values()]:
            if t.status.startswith("failed"):
                out.append(f"{name}: {t.label} {t.status}")
        bad = [k for k, v in r.checks.items() if not v]
        out.append(f"{name} harness checks: " + ("all passed" if not bad else "FAILED " + ", ".join(bad)))
    return "\n".join(out)


def run_benchmark(
    models: Sequence[str] = ("cnn", "mlp", "resnet"), *, quick: bool = False,
    steps: int = EVERY_N, rounds: int = 8, peer_rounds: int = 2, peers: bool = True,
    peer_steps: int | None = None,
    device: str | torch.device | None = None, threads: int | None = None,
    progress: Callable[[str], None] = lambda s: None, clock: str = "wall",
    autocast: torch.dtype | None = None,
) -> list[ModelResult]:
    """Run the benchmark and return its results (see :func:`format_report`).

    ``threads`` defaults to 2 (1 in quick mode, which checks the harness rather than timing
    it, and on a busy CI machine runs many times faster with one thread).
    """
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    specs = model_specs(quick)
    unknown = [m for m in models if m not in specs]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(specs)}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or (1 if quick else 2))
    if dev.type == "cuda":  # every configuration must follow the same trajectory (_checks)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        return [
            run_model(specs[m], device=dev, steps=steps, rounds=rounds, peer_rounds=peer_rounds,
                      peer_steps=peer_steps or (EVERY_N if quick else PEER_STEPS),
                      peers=peers, progress=progress, clock=clock, autocast=autocast)
            for m in models
        ]
    finally:
        torch.set_num_threads(before)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cnn", "mlp", "resnet"],
                   help="subset of: cnn mlp resnet resnet50 mlp256 cnn_cl")
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per configuration per round (default {EVERY_N}; keep a multiple of "
                   f"{EVERY_N} so each block holds one collecting step of the every-{EVERY_N}th run)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 8; quick 2)")
    p.add_argument("--peer-rounds", type=int, default=None, help="timed rounds of the peers (default 2)")
    p.add_argument("--no-peers", action="store_true", help="skip Cockpit and wandb")
    p.add_argument("--quick", action="store_true", help="tiny models, few steps: checks the harness")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default 2; quick mode 1)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: step time (default); cpu: process CPU time per step, for a "
                   "machine shared with other work (run with OMP_WAIT_POLICY=PASSIVE so that "
                   "idle OpenMP threads do not spin)")
    p.add_argument("--autocast", choices=sorted(AUTOCAST), default=None,
                   help="run the forward passes under torch.autocast in this dtype (fp16 "
                   "with a GradScaler)")
    p.add_argument("--json", default=None, help="also write the raw timings here")
    args = p.parse_args(argv)
    args.steps = args.steps or EVERY_N
    args.rounds = args.rounds or (2 if args.quick else 8)
    args.peer_rounds = args.peer_rounds or (1 if args.quick else 2)
    t0 = time.perf_counter()
    results = run_benchmark(
        args.models, quick=args.quick, steps=args.steps, rounds=args.rounds,
        peer_rounds=args.peer_rounds, peers=not args.no_peers, device=args.device,
        threads=args.threads, progress=lambda s: print(s, file=sys.stderr, flush=True),
        clock=args.clock, autocast=AUTOCAST.get(args.autocast),
    )
    dev = torch.device(args.device) if args.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if args.autocast:
        print(f"forward passes under torch.autocast({dev.type!r}, dtype={AUTOCAST[args.autocast]})")
    print(format_report(results, dev, args.clock, args.threads or (1 if args.quick else 2)))
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([
                {
                    "model": r.spec.key,
                    "checks": r.checks,
                    "log_step_s": r.log_step_s,
                    "timings": {
                        k: {"status": t.status, "blocks": t.blocks, "peak_bytes": t.peak_bytes,
                            "state_bytes": t.state_bytes}
                        for k, t in {**r.core, **r.peers}.items()
                    },
                }
                for r in results
            ], f, indent=1)
    return 0 if all(all(r.checks.values()) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
