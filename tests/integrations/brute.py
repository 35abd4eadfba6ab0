"""A brute-force reference for the integration tests: plain torch forward hooks that keep
every training-pass output of the watched layers, and window statistics counted from them in
float64 numpy, independently of relu_doctor."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch


class Outputs:
    """Every output of ``layers`` (``{name: torch module}``) in passes where ``keep()`` holds,
    grouped by pass; ``unit_dims[name]`` is the dim holding the units."""

    def __init__(self, layers: dict[str, Any], unit_dims: dict[str, int], keep: Any) -> None:
        self.passes: list[dict[str, np.ndarray]] = []
        self.unit_dims = unit_dims
        self._handles = []
        self._current: dict[str, np.ndarray] | None = None
        for name, layer in layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name, keep)))

    def _hook(self, name: str, keep: Any) -> Any:
        def hook(mod: Any, args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or out.device.type == "meta" or not keep():
                return
            x = out.detach().to(torch.float64).cpu().numpy()
            x = np.moveaxis(x, self.unit_dims[name], -1).reshape(-1, x.shape[self.unit_dims[name]])
            if self._current is None or name in self._current:
                self._current = {}
                self.passes.append(self._current)
            self._current[name] = x

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def window_stats(rows: list[np.ndarray]) -> dict[str, float]:
    """Dead units, activation rate and element count of one site over one window."""
    x = np.concatenate(rows, axis=0)
    active = x > 0
    ever = active.any(axis=0)
    return {
        "units": x.shape[1],
        "dead": int((~ever).sum()),
        "dead_fraction": float((~ever).mean()),
        "activation_rate": float(active.mean()),
        "elements": int(active.size),
        "mean_abs": float(np.abs(x).mean()),
    }


def windows(passes: list[dict[str, np.ndarray]], per_window: int) -> list[dict[str, dict[str, float]]]:
    """Statistics per site for consecutive windows of ``per_window`` passes."""
    out = []
    for start in range(0, len(passes) - per_window + 1, per_window):
        group: dict[str, list[np.ndarray]] = defaultdict(list)
        for p in passes[start : start + per_window]:
            for name, x in p.items():
                group[name].append(x)
        out.append({name: window_stats(rows) for name, rows in group.items()})
    return out
