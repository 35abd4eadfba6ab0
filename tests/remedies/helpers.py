"""What the remedy tests share: data that needs the hidden units, independent measurements
of dead and dormant units on held-out data, hand-made interval records, a host-sync counter."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from relu_doctor.diagnosis import Finding
from relu_doctor.history import IntervalRecord
from relu_doctor.sites import SiteKey
from tests import zoo


def mlp(d_in: int = 8, hidden: int = 64, d_out: int = 4) -> nn.Sequential:
    """Linear-ReLU-Linear-ReLU-Linear: sites ``1`` and ``3``."""
    return zoo.mlp(d_in, hidden, d_out)


def classification(seed: int, n: int = 1024, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes from an XOR-like rule: needs the hidden units."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long() * 2 + (x[:, 2] + x[:, 3] > 0).long()
    return x, y


def regression(seed: int, n: int = 1024, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]


def hidden(net: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the two activation sites on ``x``."""
    with torch.no_grad():
        h1 = net[1](net[0](x))
        return [h1, net[3](net[2](h1))]


def dead_fraction(h: torch.Tensor) -> float:
    """Units never active (output > 0) on any held-out sample (the README's "dead")."""
    return float(((h > 0).sum(0) == 0).float().mean())


def dormant_fraction(h: torch.Tensor, tau: float = 0.1) -> float:
    """ReDo: score_i = mean|h_i| / mean_k mean|h_k| <= tau."""
    m = h.abs().mean(0)
    return float((m / m.mean() <= tau).float().mean())


def rec(
    step: int,
    rows: list[dict[str, Any]],
    *,
    findings: Iterable[Finding] = (),
    units: pd.DataFrame | None = None,
    keys: dict[str, SiteKey] | None = None,
) -> IntervalRecord:
    """A hand-made interval record. Unless ``keys`` says otherwise, each site is the module
    at the path its row names."""
    keys = {**{str(r["site"]): SiteKey(str(r["site"])) for r in rows}, **(keys or {})}
    return IntervalRecord(
        step=step,
        site_rows=rows,
        unit_table=units if units is not None else pd.DataFrame(),
        layer_table=pd.DataFrame(),
        findings=list(findings),
        keys=keys,
    )


def site_row(
    site: str, dead_fraction: float, units: int = 10, leaky: bool = False
) -> dict[str, Any]:
    return {
        "site": site,
        "dead_fraction": dead_fraction,
        "units": units,
        "units_seen": units,
        "dead": round(dead_fraction * units),
        "dormant": 0,
        "leaky": leaky,
        "sparsity": 0.5,
        "activation_rate": 0.5,
        "mean_abs": 1.0,
        "grad_rms": 0.1,
    }


EXPLODING = Finding(
    "exploding_gradient", "model", "critical", "grad norm 100x its median", {"factor": 100.0}
)


class SyncCounter(TorchDispatchMode):
    """Counts host synchronisations (``.item()``, ``bool(t)``, ``float(t)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def half_dead(net: nn.Sequential, dead: int = 4) -> nn.Sequential:
    """Kill the first ``dead`` units of ``net.fc`` (bias -100: never active on any input)."""
    with torch.no_grad():
        net.fc.bias[:dead] = -100.0
    return net


def events_of(doc: Any) -> list[dict[str, Any]]:
    """The dict form of every event ``doc`` records from now on (a live list)."""
    out: list[dict[str, Any]] = []
    doc.add_event_listener(out.append)
    return out
