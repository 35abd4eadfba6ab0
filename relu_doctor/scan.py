"""scan(): one pass over a dataset in eval mode, without gradients: which units never fire.

A thin layer over :class:`~relu_doctor.doctor.Doctor`: the same hooks, sums and metrics, read
once at the end of the pass. The model's training flags, parameters and buffers are left as
they were.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn as nn

from relu_doctor._state import kept_state
from relu_doctor._validate import positive_int, watch_options
from relu_doctor.doctor import Doctor
from relu_doctor.errors import ReluDoctorError
from relu_doctor.probes import private_passes

__all__ = ["ScanResult", "scan"]

@dataclass
class ScanResult:
    """Which units never fire on a dataset.

    Attributes:
        site_table: one row per site (``site``, ``family``, ``units``, ``dead``,
            ``dead_fraction``, ``sparsity``, ``batches``, ``samples``).
        unit_table: one row per (site, unit): ``activation_rate``, ``mean_abs``, ``dead``.
        dead_units: dead unit indices by site.
    """

    site_table: pd.DataFrame
    unit_table: pd.DataFrame
    dead_units: dict[str, list[int]]

    @property
    def sites(self) -> pd.DataFrame:  # the name before 0.2
        return self.site_table

    @property
    def units(self) -> pd.DataFrame:  # the name before 0.2
        return self.unit_table

    def __str__(self) -> str:
        lines = []
        for row in self.site_table.itertuples():
            lines.append(
                f"{row.site:30s} {row.family:10s} {row.dead:5d}/{row.units:<5d} dead "
                f"({row.dead_fraction:.1%}), sparsity {row.sparsity:.1%}"
            )
        return "\n".join(lines)


def _first_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _fed(model: nn.Module, what: str, *args: Any, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)``; a TypeError where its forward does not take them is
    refused with the way out (a GNN's ``forward(x, edge_index, batch)`` fed ``batch[0]``
    raised a bare TypeError: a trial). Called first, the signature read only when it raised:
    a pre-hook supplying an argument, or a decorated forward, runs as it would (a review)."""
    try:
        return model(*args, **kwargs)
    except TypeError as e:
        if _ran_forward(model, e):  # raised inside it: the model's own error (a review)
            raise
        try:
            inspect.signature(model.forward).bind(*args, **kwargs)
        except TypeError as unbound:
            raise ReluDoctorError(
                f"dataloader: scan feeds the model {what}, which {type(model).__name__}.forward "
                f"does not take ({unbound}); pass forward=lambda model, batch: model(...) to say "
                "how a batch goes in (e.g. model(*batch[:3]))."
            ) from e
        except ValueError:  # (no signature to read)
            pass
        raise


def _ran_forward(model: nn.Module, error: BaseException) -> bool:
    """Whether ``error`` was raised from inside ``model``'s forward (a frame of its code in
    the traceback), not by the call binding its arguments."""
    code = getattr(inspect.unwrap(type(model).forward), "__code__", None)
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return _fed(model, "the batch", batch)
    if isinstance(batch, (list, tuple)) and batch:
        return _fed(model, "the batch's first element", batch[0])
    if isinstance(batch, Mapping):
        return _fed(model, "the batch's keys as keyword arguments", **batch)
    raise ReluDoctorError(
        f"dataloader: cannot feed a batch of type {type(batch).__name__} to the model; yield "
        "tensors, (input, target) tuples or keyword dicts, or pass forward=lambda model, "
        "batch: ...."
    )


def scan(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    max_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> ScanResult:
    """One pass over a dataset in eval mode, without gradients: which units never fire.

    The model's training flags (every submodule's), parameters and buffers are left as they
    were: eval mode means BatchNorm running statistics are not updated.

    Args:
        model: the model.
        dataloader: an iterable of batches (tensors, ``(input, target)`` tuples or dicts),
            or one tensor, taken as a single batch.
        max_batches: stop after this many batches.
        forward: ``forward(model, batch)`` when batches need custom handling.
        progress: print progress to stderr.
        **kwargs: ``include``, ``exclude``, ``unit_dims``, ``functional`` as for :func:`watch`.

    Returns:
        A :class:`ScanResult`.

    Example:
        >>> import torch, torch.nn as nn, relu_doctor
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        >>> res = relu_doctor.scan(net, [torch.randn(32, 4) for _ in range(3)])
        >>> list(res.site_table.columns)[:3]
        ['site', 'family', 'units']
    """
    if max_batches is not None:
        positive_int("max_batches", max_batches)
    if not isinstance(model, nn.Module):
        raise ReluDoctorError(f"model: expected a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(dataloader, torch.Tensor):
        dataloader = [dataloader]  # a bare tensor is one batch, not a batch per row
    elif dataloader is None or isinstance(dataloader, (str, bytes)) or not isinstance(
        dataloader, Iterable
    ):
        raise ReluDoctorError(
            f"dataloader: expected an iterable of batches (a DataLoader, a list of tensors) "
            f"or one batch tensor, got {type(dataloader).__name__}."
        )
    kwargs = watch_options("scan", kwargs)
    fwd = forward or _default_forward
    modes = {m: m.training for m in model.modules()}
    device = _first_device(model)
    # stream="all": the scan's own passes run in eval mode without gradients.
    doc = Doctor(model, gradients=False, log_every_n_steps=1, stream="all", **kwargs)
    batches = samples = 0
    try:
        model.eval()
        # The passes are ours: no other watcher on the model records them, and its buffers
        # and the RNGs are as they were after them.
        with doc, private_passes(doc.probe), kept_state(model), torch.no_grad():
            for batch in dataloader:
                if max_batches is not None and batches >= max_batches:
                    break
                b = _to_device(batch, device)
                fwd(model, b)
                batches += 1
                first = b if isinstance(b, torch.Tensor) else (b[0] if isinstance(b, (list, tuple)) and b else None)
                samples += int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 0
                if progress and batches % 10 == 0:
                    print(f"relu-doctor scan: {batches} batches", file=sys.stderr)
            rec = doc.current()
    finally:
        for m, mode in modes.items():
            m.training = mode
    if batches == 0:
        raise ReluDoctorError("dataloader: yielded no batch; scan needs at least one.")
    if rec is None:
        raise ReluDoctorError(
            doc.missing_activations()
            or "model: no ReLU-family activation ran during the scan."
        )
    site_rows, dead = [], {}
    for row in rec.site_rows:
        u = rec.unit_table[rec.unit_table["site"] == row["site"]]
        dead[row["site"]] = [int(i) for i in u.loc[u["dead"], "unit"]]
        site_rows.append(
            {
                "site": row["site"],
                "family": row["family"],
                "units": row["units"],
                "dead": row["dead"],
                "dead_fraction": row["dead_fraction"],
                "sparsity": row["sparsity"],
                "batches": batches,
                "samples": samples,
            }
        )
    units = rec.unit_table[["site", "unit", "activation_rate", "mean_abs", "dead"]].reset_index(
        drop=True
    )
    return ScanResult(pd.DataFrame(site_rows), units, dead)

