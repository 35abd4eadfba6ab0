"""Labels: how unit links follow a site's units through a recorded pass. Each tensor on the
way gets a label tensor of its shape, unit ``u`` as ``u + 1`` and 0 for no unit, computed by
replaying each op on the labels; a consumer's input channel must carry one unit only.
Used by :mod:`relu_doctor.remedies.unit_links`."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from relu_doctor.remedies.dataflow import Node, Param, Value


class Refuse(Exception):
    pass


def labels_for(flow_labels: dict[Value, torch.Tensor], x: Any) -> Any:
    if isinstance(x, Value):
        got = flow_labels.get(x)
        if got is not None:
            return got
        if x.data is not None:
            return x.data.cpu()
        return torch.zeros(x.shape)
    if isinstance(x, Param):
        return torch.zeros(tuple(x.tensor.shape))
    if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
        return type(x)(labels_for(flow_labels, y) for y in x)
    if isinstance(x, torch.Tensor):
        return x.cpu()
    return x


#: The label of a zero that a constant pad put in (TensorFlow-style "same" padding before a
#: convolution, as in Hugging Face's MobileNetV2 and EfficientNet): it carries no unit and
#: mixes with none, since a cut unit's zeroed weights meet zeros there anyway.
PAD = -1.0


def replay(node: Node, labels: dict[Value, torch.Tensor]) -> list[torch.Tensor]:
    args = tuple(labels_for(labels, a) for a in node.args)
    kwargs = {k: labels_for(labels, v) for k, v in node.kwargs.items()}
    out = node.func(*args, **kwargs)
    outs = (
        [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
    )
    if len(outs) != len(node.outputs) or any(
        tuple(t.shape) != v.shape for t, v in zip(outs, node.outputs, strict=False)
    ):
        raise Refuse(f"cannot follow the units through {node.describe()}")
    if node.name == "pad" and node.arg(2, "mode", "constant") == "constant":
        if node.arg(3, "value", None):
            raise Refuse(f"{node.describe()} pads with a constant other than 0")
        ones = node.func(torch.ones_like(args[0]), *args[1:], **kwargs)
        outs[0] = outs[0].masked_fill(ones == 0, PAD)  # where the pad put its zeros
    return outs


def channel_map(lab: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    """Per index of ``dim``: the unit it carries (-1: none), or refuse when mixed (a pad's
    zeros, :data:`PAD`, mix with nothing)."""
    moved = lab.movedim(dim, 0).reshape(lab.shape[dim], -1)
    real = moved != PAD
    hi = torch.where(real, moved, -math.inf).amax(1)
    lo = torch.where(real, moved, math.inf).amin(1)
    has = real.any(1)
    if bool((has & (hi != lo)).any()):
        raise Refuse(f"{what} reads the units mixed with other values on one input")
    return torch.where(has, hi, 0.0).long() - 1


def broadcast(lab: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.broadcast_to(lab, shape).clone()


def _fold(lab: torch.Tensor, dim: Any, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest and smallest labels over ``dim`` (None: all), a pad's zeros (:data:`PAD`)
    left out: they add nothing to a sum, a mean or a pool of one unit. All pad: PAD."""
    real = lab != PAD
    kw: dict[str, Any] = {} if dim is None else {"dim": dim, "keepdim": keep}
    hi = torch.where(real, lab, -math.inf).amax(**kw)
    lo = torch.where(real, lab, math.inf).amin(**kw)
    none = torch.isinf(hi)
    return torch.where(none, PAD, hi), torch.where(none, PAD, lo)


def reduce_labels(node: Node, lab: torch.Tensor) -> torch.Tensor:
    dim = node.arg(1, "dim", node.kwargs.get("axis"))
    keep = bool(node.arg(2, "keepdim", False))
    if isinstance(dim, Value | Param | str):
        raise Refuse(f"cannot follow the units through {node.describe()}")
    hi, lo = _fold(lab, dim, keep)
    if not torch.equal(hi, lo):
        raise Refuse(f"{node.describe()} sums the units with each other or with other values")
    return hi


def pool_labels(node: Node, lab: torch.Tensor, k: int) -> torch.Tensor:
    dims = tuple(range(lab.dim() - k, lab.dim()))
    hi, lo = _fold(lab, dims, True)
    if not torch.equal(hi, lo):
        raise Refuse(f"{node.describe()} pools the units with other values")
    return broadcast(hi, node.outputs[0].shape)


_POOL = re.compile(r"^(adaptive_)?(max|avg|lp)_pool([123])d$")


def spatial_dims(n: Node, rank: int) -> int:
    """The trailing dims ``n`` pools or resizes per channel of a ``rank``-dim input (0: none);
    interpolation (``nn.Upsample``) is linear per channel and keeps zeros."""
    pool = _POOL.match(n.name)
    if pool:
        return int(pool.group(3))
    return rank - 2 if n.name == "interpolate" and rank > 2 else 0
