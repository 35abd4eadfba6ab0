"""What one hook call costs, next to the activation it watches and to its cheapest parts.

For the activation shapes of the benchmark models, times (median over repeats, data hot in
cache as it is right after the activation wrote it, CPU):

* ``relu_``: the activation itself;
* ``sum``, ``sum sq``, ``count``: the cheapest eager formulation of each forward statistic
  alone (one pass each: ``x.sum``, ``vector_norm`` or ``(x*x).sum``, the packed count);
* ``floor``: their sum, the least any eager code that makes one pass per statistic can cost;
* ``forward_rows`` and ``grad_rows``: the eager path (the reference and the fallback);
* ``fused fwd`` and ``fused grad``: the fused CPU kernel (``relu_doctor._kernels``) that the
  hooks run where it is built: every field in one read of the tensor, no dispatched op.

So it shows how far the per-call cost is from the floor of one pass per statistic, and how
that floor compares with the step time of the model (the overhead budget).

Run::

    .venv/bin/python -m benchmarks.floor
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from relu_doctor import _kernels
from relu_doctor.stats import (
    SiteStats,
    _count,
    _sum_sq,
    _unit_sum,
    forward_rows,
    grad_rows,
    unit_view,
)

# (model, activation shape, calls per forward)
SITES: list[tuple[str, tuple[int, ...], int]] = [
    ("CNN", (64, 32, 32, 32), 1),
    ("CNN", (64, 64, 16, 16), 1),
    ("CNN", (64, 128, 8, 8), 1),
    ("MLP", (256, 1024), 3),
    ("ResNet", (32, 16, 32, 32), 5),
    ("ResNet", (32, 32, 16, 16), 4),
    ("ResNet", (32, 64, 8, 8), 4),
    ("ResNet", (32, 128, 4, 4), 4),
]


def _time(fn: Callable[[torch.Tensor], object], src: torch.Tensor, reps: int, flush: torch.Tensor) -> float:
    """Median microseconds of ``fn(y)`` with ``y`` a fresh copy of ``src`` written just before
    (hot in cache, as an activation output is when its hook runs)."""
    times = []
    for _ in range(reps + 3):
        flush.add_(1.0)  # evict the previous repeat's data
        y = src * 1.0
        t0 = time.perf_counter()
        fn(y)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:]) * 1e6


def measure(reps: int = 30) -> list[dict[str, object]]:
    flush = torch.empty(16 << 20)
    rows = []
    for model, shape, calls in SITES:
        src = torch.relu(torch.randn(shape))
        grad = torch.randn(shape)
        gi = torch.ops.aten.threshold_backward(grad, src, 0.0)

        def view(y: torch.Tensor) -> torch.Tensor:
            return unit_view(y, 1)

        t = {
            "relu_": _time(torch.relu_, src, reps, flush),
            "sum": _time(lambda y: _unit_sum(view(y), view(y)), src, reps, flush),
            "sum sq": _time(lambda y: _sum_sq(view(y)), src, reps, flush),
            "count": _time(lambda y: _count(view(y), view(y).bool, view(y).sign), src, reps, flush),
            "forward_rows": _time(lambda y: forward_rows(y, 1, nonnegative=True, cap=None), src, reps, flush),
            "grad_rows": _time(lambda g, gi=gi: grad_rows(g, gi, 1), grad, reps, flush),
        }
        st = SiteStats(shape[1], "cpu")
        if _kernels.available():
            t["fused fwd"] = _time(
                lambda y, st=st: _kernels.forward_into(st.window, y, 1, cap=None), src, reps, flush
            )
            t["fused grad"] = _time(
                lambda g, st=st, gi=gi: _kernels.grad_into(st.window, g, gi, 1, None, 7),
                grad, reps, flush,
            )
        else:
            t["fused fwd"] = t["fused grad"] = float("nan")
        t["floor"] = t["sum"] + t["sum sq"] + t["count"]
        rows.append({"model": model, "shape": shape, "calls": calls, **t})
    return rows


def format_rows(rows: Sequence[dict[str, object]]) -> str:
    cols = ["relu_", "sum", "sum sq", "count", "floor", "forward_rows", "grad_rows", "fused fwd",
            "fused grad"]
    head = f"{'model':7s} {'shape':18s} {'calls':>5s} " + " ".join(f"{c:>12s}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']!s:7s} {r['shape']!s:18s} {r['calls']!s:>5s} "
            + " ".join(f"{r[c]:12.0f}" for c in cols)  # type: ignore[str-format]
        )
    lines.append("")
    lines.append(
        "per forward+backward, all calls (ms): model: relu_ / forward_rows + grad_rows "
        "/ floor (forward) / fused fwd + fused grad"
    )
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]

        def total(key: str, mine: list[dict[str, object]] = mine) -> float:
            return sum(float(r[key]) * int(r["calls"]) for r in mine) / 1e3  # type: ignore[arg-type]

        lines.append(
            f"  {model}: {total('relu_'):.2f} / {total('forward_rows') + total('grad_rows'):.2f} "
            f"/ {total('floor'):.2f} / {total('fused fwd') + total('fused grad'):.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"microseconds per call, torch {torch.__version__}, {args.threads} threads, CPU, hot cache")
    print(format_rows(measure(args.reps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
