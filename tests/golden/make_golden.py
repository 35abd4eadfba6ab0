"""Writes ``tests/golden/golden.json``: the numbers of two fixed-seed runs, for the golden test.

The fixture was made once, from the code before the redesign (issue 11), and is compared by
``tests/test_golden.py`` with what the current code writes. Re-make it only when a change is
meant to change the numbers, and say so in the commit::

    .venv/bin/python -m tests.golden.make_golden

Two runs: the embedded demo (``--quick``, untreated and treated, so every remedy's
interventions are in it) and a plain loop with a reused module, a functional call, the
optimizer tap and the plain-loop remedies.

History of the fixture:

1. Made on the code before the redesign (issue 11); the redesign changed no number.
2. Re-made after issues 12 and 15, for three intended changes: evaluation passes inside
   ``watch`` are no longer counted as training (the demo's accuracy passes: the untreated
   demo's element counts and rates change); ReDo reaches sites the torch.fx walker refused
   (the plain loop's functional site ``(root):relu#0`` is now recycled, so the plain loop
   diverges after its first recycling at step 30, identical before it); and the treated
   demo follows the treatment plan instead of every remedy at once.
3. Re-made for issue 15's one vocabulary: the recorded ``dormant`` (unit column, site
   ``dormant`` / ``dormant_fraction``, the interventions' snapshots) now means active but
   below tau, dead units excluded; ReDo's criterion (score <= tau, dead units included) is
   the new ``below_tau`` / ``below_tau_fraction``, recorded here too. Checked before
   re-making: every other number is unchanged, ``below_tau`` equals the old ``dormant``
   everywhere and the new ``dormant`` is the old one without the dead units (so the remedies
   chose the same units: same weights, same runs). Made with the default overhead budget
   pinned to every step, as the test suite runs (:func:`make` does it).
4. Re-made in float64 (:func:`make` sets the default dtype). In float32 the runs depend on
   the CPU: PyTorch and MKL pick their kernels by the vector instructions a CPU has, and a
   Sapphire Rapids machine's first step already differed from the fixture's machine in the
   7th digit, which grew into other dead counts and an 11th intervention. In float64 the
   same runs under ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2`` (another
   machine's code path) gave every count, finding and intervention alike and floats within
   2.3e-9 of each other; the test compares floats to 1e-7 relative.
5. Re-made when clipping came to be judged on the gradient norm before clipping: the
   model-wide snapshots of AutoClip's events carry ``unclipped_grad_norm`` (the treated
   demo's plan switching AutoClip on at step 20), and a stand-alone clipper's reports of its
   windows are not judged. Checked before re-making: with that key (and, for the reports, the
   judgement) taken out, every event, row and finding is as before.
6. Re-made when a plan's AutoClip, once switched on, came to report each window's clipping
   as a stand-alone clipper does: the treated demo gains one event, AutoClip's report of
   steps 21-30 (10 of 10 steps clipped). Checked before re-making: without that event every
   event, row and finding is as before.
7. Re-made when a chain's second site (the plain loop's LeakyReLU, which takes
   ``(root):relu#0``'s output) came to say why recycling cannot treat it (the recycler
   refuses it): its dead finding's evidence gains ``not_recyclable``. Checked before
   re-making: that key is the one difference (floats to 1e-7).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

import relu_doctor

HERE = Path(__file__).parent
GOLDEN = HERE / "golden.json"
# Site-level, per-unit and per-layer columns compared (those present before the redesign).
HISTORY = [
    "step", "site", "family", "order", "window_steps", "units", "units_seen", "elements",
    "dead", "dead_fraction", "lifetime_dead", "lifetime_dead_fraction", "dormant",
    "dormant_fraction", "below_tau", "below_tau_fraction", "sparsity", "activation_rate", "mean_abs", "rms",
    "saturated_fraction", "fully_saturated", "grad_rms", "grad_zero_fraction", "nonfinite",
    "grad_nonfinite",
]
UNITS = [
    "step", "site", "unit", "activation_rate", "mean_abs", "dormant_score", "saturation_rate",
    "grad_rms", "grad_zero_rate", "dead", "dormant", "below_tau", "lifetime_dead",
]
LAYERS = ["step", "layer", "grad_norm", "update_ratio"]
INTERVENTION = ["remedy", "site", "step", "what", "before", "after"]


def _plain(value: Any) -> Any:
    """JSON-exact plain data: NaN as the string 'nan', numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _table(frame: Any, columns: list[str]) -> list[list[Any]]:
    if frame.empty:
        return []
    return [_plain(list(row)) for row in frame[columns].itertuples(index=False)]


def canonical(run_dir: Path) -> dict[str, Any]:
    """The numbers of one run directory, as plain data."""
    run = relu_doctor.load_run(run_dir)
    findings = sorted(
        (f.kind, f.site, f.severity, f.step, f.began, _plain(f.evidence)) for f in run.findings()
    )
    interventions = [
        {k: _plain(e.get(k)) for k in INTERVENTION} for e in run.interventions()
    ]
    return {
        "history": _table(run.history, HISTORY),
        "units": _table(run.units, UNITS),
        "layers": _table(run.layers, LAYERS),
        "findings": [list(_plain(list(f))) for f in findings],
        "interventions": interventions,
    }


class PlainNet(nn.Module):
    """A reused ReLU module, a functional call and a LeakyReLU, as real code has them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 24)
        self.fc4 = nn.Linear(24, 4)
        self.act = nn.ReLU()
        self.leaky = nn.LeakyReLU(0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        h = self.act(self.fc2(h))
        h = F.relu(self.fc3(h))
        return self.fc4(self.leaky(h))


def plain_loop(run_dir: Path) -> list[list[Any]]:
    """A plain loop at too high a learning rate; returns the findings of every log."""
    from relu_doctor.remedies import DormantRecycler, LRRescuer

    torch.manual_seed(7)
    g = torch.Generator().manual_seed(70)
    x = torch.randn(1024, 12, generator=g)
    y = (x[:, :6].sum(1) > 0).long() + 2 * (x[:, 6] > 0).long()
    model = PlainNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    per_log: list[list[Any]] = []
    with relu_doctor.watch(model, log_every_n_steps=10, optimizer=opt, run_dir=run_dir) as doc:
        LRRescuer(opt, factor=0.5, cooldown=2).bind(doc)
        DormantRecycler(model, optimizers=opt, every=3, max_fraction=0.25, seed=0).bind(doc)
        doc.add_listener(
            lambda rec: per_log.append(
                [rec.step, sorted([f.kind, f.site, f.severity] for f in rec.findings)]
            )
        )
        for _ in range(60):
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            doc.step()
    return per_log


def make() -> dict[str, Any]:
    """Both runs in float64, canonical, on the eager statistics path (the reference: the fused kernel
    sums in another order, so its sums differ in the last float32 bits; tests/test_fused.py
    holds it to the eager path), collecting every step (the default overhead budget pinned
    as tests/conftest.py pins it: with a budget, which steps collect depends on timing)."""
    from relu_doctor import _kernels
    from relu_doctor.demo import run_demo
    from relu_doctor.sampling import ENV

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the same numbers on any CPU (see above)
    try:
        with (tempfile.TemporaryDirectory() as tmp, _kernels.disabled(),
              mock.patch.dict(os.environ, {ENV: "none"})):
            res = run_demo(Path(tmp) / "demo", quick=True, seed=0, stream=open(  # noqa: SIM115
                "/dev/null", "w"))
            for name in ("untreated", "treated"):
                out[f"demo/{name}"] = canonical(res.out / name)
            per_log = plain_loop(Path(tmp) / "plain")
            out["plain"] = {**canonical(Path(tmp) / "plain"), "per_log_findings": per_log}
    finally:
        torch.set_default_dtype(dtype)
    return out


if __name__ == "__main__":
    data = make()
    GOLDEN.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)", file=sys.stderr)
