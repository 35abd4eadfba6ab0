"""Sharded parameters: which a model has (FSDP, FSDP2 ``fully_shard``, DTensor, DeepSpeed
ZeRO-3), and the refusal, before training, of a remedy that cannot act on shards
(:attr:`~relu_doctor.remedies.base.Remedy.on_shards` says why)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
import torch.nn as nn

from relu_doctor.errors import ReluDoctorError
from relu_doctor.stats import group_size

__all__ = ["DTENSOR", "SHARD_SAFE", "refuse_several", "refuse_sharded", "sharding_of"]

#: What acts the same on shards, said by every refusal of a remedy that does not.
SHARD_SAFE = (
    "With sharded parameters use the remedies that act the same on every shard: LRRescuer, "
    "the LeakyReLU swap and, on DTensor parameters (FSDP2), AutoClip (in a TreatmentPlan: "
    "steps=(PlanStep('lr'), PlanStep('swap')), and PlanStep('clip') on FSDP2); or train with "
    "DDP, where every remedy acts identically on every process"
)

#: What :func:`sharding_of` says of DTensor parameters.
DTENSOR = "DTensor parameters (FSDP2 fully_shard or tensor parallelism)"


def sharding_of(
    model: nn.Module | None = None, *, params: Iterable[torch.Tensor] = ()
) -> str | None:
    """How the parameters of ``model`` (and ``params``) are sharded across processes, in
    words, or None when every process holds them whole (one process, DDP). Recognised:
    FSDP (``FullyShardedDataParallel`` modules, flat parameters), FSDP2 ``fully_shard``
    modules, DTensor parameters (FSDP2, tensor parallelism) and DeepSpeed ZeRO-3's
    partitioned parameters. Nothing is imported to tell (no DTensor exists unless its module
    was imported).

    Example:
        >>> sharding_of(nn.Linear(2, 2)) is None
        True
    """
    if model is not None:
        for m in model.modules():
            bases = {c.__name__ for c in type(m).__mro__}
            if "FullyShardedDataParallel" in bases:
                return "FSDP (FullyShardedDataParallel modules)"
            if "FSDPModule" in bases:
                return "FSDP2 (fully_shard modules, DTensor parameters)"
        params = [*model.parameters(), *params]
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    for p in params:
        if dtensor is not None and isinstance(p, dtensor):
            return DTENSOR
        if type(p).__name__ == "FlatParameter":
            return "FSDP (flat parameters)"
        if hasattr(p, "ds_id"):
            return "DeepSpeed ZeRO-3 (partitioned parameters)"
    return None


def refuse_sharded(
    who: str, problem: str | None, sharding: str | None, *, arg: str = "model"
) -> None:
    """Raise :class:`~relu_doctor.errors.ReluDoctorError` when parameters are sharded
    (``sharding``: what :func:`sharding_of` found, or a sharding strategy's name) and ``who``
    cannot act on shards (``problem``: why, a remedy's :attr:`~relu_doctor.remedies.base.Remedy.on_shards`)."""
    if sharding is None or problem is None:
        return
    raise ReluDoctorError(
        f"{arg}: {who} needs parameters that every process holds whole (one process or DDP), "
        f"got {sharding}: {problem}. {SHARD_SAFE}."
    )


def refuse_several(model: nn.Module, problem: str | None, *, arg: str) -> None:
    """Raise :class:`~relu_doctor.errors.ReluDoctorError` when a change needs one process
    (``problem``: why) and ``model`` is sharded or ``torch.distributed`` runs several."""
    if problem is None:
        return
    where = sharding_of(model)
    if where is None and (n := group_size()) > 1:
        where = f"torch.distributed with {n} processes"
    if where is not None:
        raise ReluDoctorError(f"{arg}: expected one process ({problem}), got {where}.")
