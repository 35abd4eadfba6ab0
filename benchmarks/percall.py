"""What a watched activation costs per collecting step beyond its kernels' reads.

A stack of ``sites`` blocks ``Linear(8, 8) + ReLU`` on a (4, 8) batch: the tensors are so
small that the statistics kernels read almost nothing, so what a watched copy adds to a
forward and backward is the fixed cost of each activation call: torch's hook machinery,
relu_doctor's Python and the call into the kernels. Copies of one model, each timed in turn
(blocks of steps, interleaved, the median block), against the plain copy:

* ``forward hook, empty``: a forward hook that returns at once (torch's slow call path);
* ``+ node hook, empty``: that hook registering a gradient hook on the output's autograd
  node that does nothing (the machinery relu_doctor's gradient statistics use);
* ``relu_doctor``: ``watch(model, every_n_steps=1, overhead_budget=None)``, module sites only;
* ``relu_doctor, ctypes``: the same, with the kernels called through ctypes instead of the
  CPython front (where the front is built; see ``relu_doctor/_kernels/cpu.py``).

It prints microseconds per site and step over plain. Inside a real training step the same
Python runs slower than in this tight loop (2-3x on the benchmark ResNet: colder caches), so
read the numbers as a comparison between versions, not as a model's overhead (for that, see
``benchmarks.paired``).

``--in-step MODEL`` measures the same split inside real training steps of a benchmark model
(:func:`benchmarks.overhead.model_specs`), watched at every step: the host seconds a step
spends in relu_doctor's hooks (its own stopwatch: the activation hooks, the gradient hooks
and the optimizer tap's gradient read) with the kernels as built and with their front
replaced by one that returns at once (the optimizer tap's squared norms too), in alternating
blocks. The difference is what the kernels cost; what is left, what the hooks' Python costs
where caches are cold.

Run::

    .venv/bin/python -m benchmarks.percall
    .venv/bin/python -m benchmarks.percall --in-step cnn --threads 2
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

import relu_doctor
from benchmarks.overhead import _make_data, model_specs
from relu_doctor import _kernels
from relu_doctor._kernels import cpu


def _model(sites: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(sites) for m in (nn.Linear(8, 8), nn.ReLU())])


def _empty_node_hook(grad_inputs: Any, grad_outputs: Any) -> None:
    pass


def _node_hook_on_output(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    output.grad_fn.register_hook(_empty_node_hook)  # type: ignore[union-attr]


def _hook_each_relu(model: nn.Module, hook: Callable[..., None]) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(hook)
    return model


def measure(sites: int = 16, blocks: int = 40, steps: int = 20) -> dict[str, float]:
    """Microseconds per site and step that each copy adds over the plain one (median of
    ``blocks`` interleaved blocks of ``steps`` steps)."""
    x = torch.randn(4, 8)
    cpu._load()
    front = getattr(cpu, "_front", None)  # (getattr: also runs on versions before the front)
    ctypes_front = (
        cpu._CtypesFront(cpu._lib)
        if cpu._lib is not None and hasattr(cpu, "_CtypesFront") else None
    )
    kw: dict[str, Any] = dict(
        every_n_steps=1, overhead_budget=None, log_every_n_steps=10**9, functional=False
    )
    copies: dict[str, tuple[nn.Module, Any, Any]] = {
        "plain": (_model(sites), None, None),
        "forward hook, empty": (_hook_each_relu(_model(sites), lambda m, a, o: None), None, None),
        "+ node hook, empty": (_hook_each_relu(_model(sites), _node_hook_on_output), None, None),
    }
    m = _model(sites)
    copies["relu_doctor"] = (m, relu_doctor.watch(m, **kw), front)
    if ctypes_front is not None and not isinstance(front, cpu._CtypesFront):
        m = _model(sites)
        copies["relu_doctor, ctypes"] = (m, relu_doctor.watch(m, **kw), ctypes_front)

    def run(model: nn.Module, doc: Any, use: Any, n: int) -> float:
        if use is not None:
            cpu._front = use
        t0 = time.perf_counter()
        for _ in range(n):
            model(x).sum().backward()
            if doc is not None:
                doc.step()
        took = (time.perf_counter() - t0) / n
        cpu._front = front
        return took

    for _ in range(10):  # warm up: sites made, kernels loaded
        for model, doc, use in copies.values():
            run(model, doc, use, 1)
    times: dict[str, list[float]] = {k: [] for k in copies}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(blocks):
            for k, (model, doc, use) in copies.items():
                times[k].append(run(model, doc, use, steps))
    finally:
        if gc_was:
            gc.enable()
        for _, doc, _ in copies.values():
            if doc is not None:
                doc.detach()
    base = statistics.median(times["plain"])
    return {k: (statistics.median(v) - base) / sites * 1e6 for k, v in times.items()}


class _NoKernels:
    """A kernel front whose calls return at once, as if done: the hooks run their Python,
    the kernels read nothing."""

    def forward(self, *args: Any) -> int:
        return 0

    def grad(self, *args: Any) -> int:
        return 0


def _no_squares(*args: Any) -> bool:
    return True  # the optimizer tap's squared norms, done without reading anything


def in_step(
    model: str = "cnn", blocks: int = 6, steps: int = 30, *, quick: bool = False
) -> dict[str, float]:
    """Milliseconds per training step of the benchmark model ``model``, watched at every
    step: ``step`` (the whole step, kernels as built), ``hooks`` (relu_doctor's stopwatch:
    its hooks' host time, kernels included) and ``hooks, no kernels`` (the same with the
    kernels doing nothing); medians of ``blocks`` alternating blocks of ``steps``.
    ``quick``: the model's tiny version (a harness check)."""
    spec = model_specs(quick)[model]
    torch.manual_seed(0)
    net = spec.build()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    data = _make_data(spec, torch.device("cpu"))
    cpu._load()
    front, squares = cpu._front, _kernels.sum_squares_into
    doc = relu_doctor.watch(
        net, optimizer=opt, every_n_steps=1, overhead_budget=None, log_every_n_steps=10**9
    )
    got: dict[str, list[float]] = {"step": [], "hooks": [], "hooks, no kernels": []}

    def run(n: int) -> tuple[float, float]:
        spent, t0 = doc.stopwatch.read(), time.perf_counter()
        for i in range(n):
            x, y = data[i % len(data)]
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            doc.step()
        return (time.perf_counter() - t0) / n, (doc.stopwatch.read() - spent) / n

    try:
        run(10)  # warm up: sites made, kernels loaded and prepared
        for _ in range(blocks):
            step, hooks = run(steps)
            got["step"].append(step)
            got["hooks"].append(hooks)
            if front is not None:
                cpu._front = _NoKernels()
                _kernels.sum_squares_into = _no_squares
                try:
                    got["hooks, no kernels"].append(run(steps)[1])
                finally:
                    cpu._front = front
                    _kernels.sum_squares_into = squares
    finally:
        doc.detach()
    return {k: statistics.median(v) * 1e3 for k, v in got.items() if v}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=16)
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--in-step", metavar="MODEL", default=None, choices=sorted(model_specs()),
                   help="measure inside training steps of this benchmark model")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.in_step is not None:
        for name, ms in in_step(a.in_step).items():
            print(f"{name:24s} {ms:7.3f} ms per step")
        return 0
    for name, us in measure(a.sites, a.blocks).items():
        print(f"{name:24s} {us:+7.1f} us per site and step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
