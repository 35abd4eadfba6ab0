"""Activation surgery: :func:`swap_activation` replaces a ReLU module by LeakyReLU or
PReLU, :func:`restore_activation` undoes it.

Outputs for positive inputs are unchanged; a module registered under several paths is
replaced everywhere; PReLU's slopes get their own param group in the optimizer and its
schedulers, removed again on restore. :class:`~relu_doctor.remedies.swap.ActivationSwapper`
decides when.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from relu_doctor._validate import number_in, positive_int
from relu_doctor._validate import optimizers as check_optimizers
from relu_doctor.errors import ReluDoctorError
from relu_doctor.families import family_of
from relu_doctor.remedies._optim_state import add_param_group, remove_param_group
from relu_doctor.remedies.base import Optimizers, get_module, refuse_several, site_key_of
from relu_doctor.sites import SiteKey, module_label

__all__ = ["KIND_NAMES", "PRELU_ALONE", "SWAPPED", "SWAP_KINDS", "SwapRecord", "restore_activation", "swap_activation"]

SWAP_KINDS = ("leaky_relu", "prelu")
#: The attribute of a module :func:`swap_activation` put in place: its swap's description
#: (:meth:`SwapRecord.describe`), so that a swapper new to the model (a new Trainer's
#: callback) knows it for a swap, which a checkpoint saved before it undoes.
SWAPPED = "_relu_doctor_swap"
#: What each kind puts in place, in words.
KIND_NAMES = {"leaky_relu": "LeakyReLU", "prelu": "PReLU"}
#: Why a PReLU swap needs one process (the other processes would not share its slopes).
PRELU_ALONE = "'prelu' adds parameters in training, which DDP or sharding would not share"


@dataclass
class SwapRecord:
    """One activation swap (what :func:`restore_activation` needs to undo it).

    Attributes:
        path: the module path given to :func:`swap_activation`.
        paths: every path the module object was registered under (all replaced).
        old: the original module.
        new: the replacement.
        kind: ``"leaky_relu"`` or ``"prelu"``.
        slope: LeakyReLU's negative slope, or PReLU's initial slope.
        num_parameters: PReLU's number of slopes (1, or one per unit).
        param_groups: ``(optimizer, group)`` pairs added for PReLU's weight.
    """

    path: str
    paths: list[str]
    old: nn.Module
    new: nn.Module
    kind: str
    slope: float
    num_parameters: int = 1
    param_groups: list[tuple[torch.optim.Optimizer, dict[str, Any]]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "paths": list(self.paths),
            "kind": self.kind,
            "slope": self.slope,
            "num_parameters": self.num_parameters,
            "from": type(self.old).__name__,
            "inplace": bool(getattr(self.old, "inplace", False)),
        }


def _check_kind(kind: object, hint: str = "") -> str:
    if kind not in SWAP_KINDS:
        raise ReluDoctorError(f"kind: expected one of {list(SWAP_KINDS)}, got {kind!r}.{hint}")
    return str(kind)


def _check_swappable(module: nn.Module, path: str) -> None:
    fam = family_of(module)
    label = module_label(path)
    if fam is None:
        raise ReluDoctorError(
            f"path: module {label!r} is a {type(module).__name__}, not a ReLU-family "
            "activation; pass the path of a ReLU module."
        )
    if fam.leaky:
        raise ReluDoctorError(
            f"path: module {label!r} is already a leaky activation ({fam.name}); its "
            "negative regime passes gradient. Recycle its stuck units instead (ReDo)."
        )
    if fam.cap_of(module) is not None or not fam.nonnegative:
        raise ReluDoctorError(
            f"path: module {label!r} is a {type(module).__name__} ({fam.name}) whose "
            "positive outputs differ from LeakyReLU's (a cap, or negative outputs): only plain "
            "ReLU modules can be swapped without changing outputs for positive inputs."
        )


def _module_path(site: str | SiteKey, arg: str) -> str:
    """The module path of a site that names an activation module (not a functional call)."""
    key = site_key_of(site, arg)
    if key.op is not None:
        raise ReluDoctorError(
            f"{arg}: {key.name(True)!r} is a functional call ({key.op}) inside "
            f"{module_label(key.module_path)!r}; only activation modules can be swapped. "
            "Replace the call with an nn.ReLU module, or exclude this site."
        )
    return key.module_path


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _paths_of(model: nn.Module, module: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules(remove_duplicate=False) if m is module and p]


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in model.parameters():
        return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def swap_activation(
    model: nn.Module,
    *,
    path: str | SiteKey,
    kind: str = "leaky_relu",
    slope: float = 0.01,
    num_parameters: int = 1,
    optimizer: Optimizers = None,
    schedulers: Sequence[Any] = (),
    new: nn.Module | None = None,
) -> SwapRecord:
    """Replace the ReLU module at ``path`` by a LeakyReLU or PReLU.

    Outputs for positive inputs are unchanged. A module object registered under several
    paths (or called several times per forward) is replaced everywhere it appears; the
    record lists every path. For PReLU, the new slopes go to the optimizer(s) as a new param
    group (hyperparameters copied from group 0, no weight decay), and the schedulers attached
    to that optimizer are extended to the new group.

    Hooks live on module objects: after a swap, call ``probe.refresh()`` (``doctor.probe``)
    so that relu_doctor watches the new module. :class:`ActivationSwapper` does this.

    Args:
        model: the model (``path`` is relative to it).
        path: module path of a plain ReLU, exactly as registered (``"enc:act"`` is a module
            name), or the :class:`~relu_doctor.sites.SiteKey` of one of its sites.
        kind: ``"leaky_relu"`` or ``"prelu"``.
        slope: the negative slope (PReLU's initial value), in (0, 1].
        num_parameters: PReLU slopes: 1, or the number of channels on dim 1.
        optimizer: optimizer(s) that train the model (PReLU only).
        schedulers: LR schedulers of those optimizers (PReLU only).
        new: use this module instead of building one (it must match ``kind``).

    Returns:
        A :class:`SwapRecord` for :func:`restore_activation`.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> rec = swap_activation(net, path="1", slope=0.1)
        >>> net[1]
        LeakyReLU(negative_slope=0.1)
        >>> restore_activation(net, record=rec); net[1]
        ReLU()
    """
    _check_kind(kind)
    refuse_several(model, PRELU_ALONE if kind == "prelu" else None, arg="kind")
    number_in("slope", slope, 0.0, 1.0)
    positive_int("num_parameters", num_parameters)
    where = _module_path(path, "path")
    old = get_module(model, where, "path")
    _check_swappable(old, where)
    opts = check_optimizers("optimizer", optimizer)
    if new is None:
        if kind == "leaky_relu":
            new = nn.LeakyReLU(slope, inplace=bool(getattr(old, "inplace", False)))
        else:
            device, dtype = _device_dtype(model)
            new = nn.PReLU(num_parameters, init=slope).to(device=device, dtype=dtype)
    expected = nn.LeakyReLU if kind == "leaky_relu" else nn.PReLU
    if not isinstance(new, expected):
        raise ReluDoctorError(
            f"new: expected an nn.{expected.__name__} for kind={kind!r}, got {new!r}."
        )
    paths = _paths_of(model, old) or [where]
    for p in paths:
        _set_module(model, p, new)
    groups = []
    params = list(new.parameters())
    if params:
        for opt in opts:
            groups.append((opt, add_param_group(opt, params, schedulers=schedulers)))
    rec = SwapRecord(where, paths, old, new, kind, float(slope), num_parameters, groups)
    new.__dict__[SWAPPED] = rec.describe()  # (a swapper that did not make it finds it by this)
    return rec


def restore_activation(
    model: nn.Module, *, record: SwapRecord, schedulers: Sequence[Any] = ()
) -> None:
    """Undo :func:`swap_activation`: put the original module back at every path, and remove
    the PReLU param group from the optimizer (and its schedulers) again."""
    for p in record.paths:
        current = get_module(model, p, "record")
        if current is not record.new:
            raise ReluDoctorError(
                f"record: the module at {module_label(p)!r} is a {type(current).__name__}, not "
                "the swapped-in module: it was replaced since; restore in reverse order."
            )
    for p in record.paths:
        _set_module(model, p, record.old)
    for opt, group in record.param_groups:
        remove_param_group(opt, group, schedulers=schedulers)
    record.param_groups = []
