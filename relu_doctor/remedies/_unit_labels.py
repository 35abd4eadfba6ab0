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


def _extremes(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lab`` with a pad's zeros (:data:`PAD`) as -inf and as +inf: the operands of an amax
    and an amin that leave them out."""
    real = lab != PAD
    return torch.where(real, lab, -math.inf), torch.where(real, lab, math.inf)


def _pure(node: Node, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The labels of an output whose elements each gathered the labels between ``lo`` and
    ``hi`` (-inf and +inf: only a pad's zeros): refuse where one gathered two."""
    none = torch.isinf(hi) & (hi < 0)
    if bool((~none & (hi != lo)).any()):
        raise Refuse(f"{node.describe()} adds the units to each other or to values from "
                     "elsewhere (a target that held other values, a residual)")
    return torch.where(none, PAD, hi)


def sum_labels(node: Node, labels: dict[Value, torch.Tensor]) -> torch.Tensor:
    """An elementwise sum (``a + b``, ``a - b``) whose operands carry the same unit at every
    element (a GIN layer's ``(1 + eps) * x + aggregate(x)``): each element still holds one
    unit. Refused where a unit meets another, or a value from elsewhere (a residual)."""
    a, b = node.arg(0, "input"), node.arg(1, "other")
    shape = node.outputs[0].shape if node.outputs else ()
    if not (isinstance(a, Value) and isinstance(b, Value)):
        raise Refuse(
            f"its units also reach {node.describe()}, which adds a constant or a parameter to "
            "them: a dead unit's zeros would not stay zero")
    la, lb = (broadcast(labels_for(labels, v), shape) for v in (a, b))
    (ha, la_), (hb, lb_) = _extremes(la), _extremes(lb)
    try:
        return _pure(node, torch.maximum(ha, hb), torch.minimum(la_, lb_))
    except Refuse:
        raise Refuse(
            f"its units also reach {node.describe()}, a sum with another branch (a residual or "
            "skip connection): a recycled unit's new value would pass through it unweighted"
        ) from None


#: Calls that make a tensor of zeros: a scatter into one adds nothing else to the units.
ZEROS = frozenset({"zeros", "zeros_like", "new_zeros"})
#: Scatters and index reductions (a GNN's message aggregation): each element of the output
#: gathers the source's elements that the index sends there (and its own, ``include_self``).
SCATTERS = frozenset({"index_add", "index_reduce", "scatter_add", "scatter_reduce", "scatter"})


def scatter_labels(node: Node, labels: dict[Value, torch.Tensor]) -> torch.Tensor:
    """The labels of a scatter's output, replayed with amax and amin on the labels: each
    element must gather one unit (a pad's zeros and a target made of zeros gather none).
    Refused where it gathers two, or a unit and a value from elsewhere (a target that holds
    other values: a residual)."""
    name = node.name
    target, dim, index = node.arg(0, "input"), node.arg(1, "dim"), node.arg(2, "index")
    src = node.arg(3, "source" if name.startswith("index") else "src")
    if not (isinstance(dim, int) and isinstance(index, Value) and index.data is not None
            and isinstance(src, Value)):
        raise Refuse(f"cannot follow the units through {node.describe()}")
    overwrite = name == "scatter" and node.arg(4, "reduce") is None
    keep = bool(node.kwargs.get("include_self", True)) and not overwrite
    if isinstance(target, Value) and target not in labels and target.node is not None and (
            target.node.name in ZEROS):
        t = torch.full(target.shape, PAD)  # (its zeros add nothing to a unit)
    else:
        t = labels_for(labels, target)
    (th, tl), (sh, sl) = _extremes(t), _extremes(labels_for(labels, src))
    idx = index.data.cpu()
    if name.startswith("index"):  # (as a scatter: source element i of dim goes to idx[i])
        along = [1] * sh.dim()
        along[dim] = -1
        idx = idx.reshape(along).expand(sh.shape)
    hi = th.scatter_reduce(dim, idx, sh, "amax", include_self=keep)
    lo = tl.scatter_reduce(dim, idx, sl, "amin", include_self=keep)
    return _pure(node, hi, lo)


#: Matrix products: ``a @ h`` sums h's rows, weighted by a matrix that carries no unit (a
#: graph's adjacency, sparse or dense; attention weights), and keeps its columns apart.
MATMULS = frozenset({"matmul", "__matmul__", "mm", "bmm", "_sparse_mm", "spmm"})


def matmul_labels(node: Node, labels: dict[Value, torch.Tensor]) -> torch.Tensor:
    """The labels of ``a @ h`` where the units are in ``h`` alone and each column of ``h``
    carries one unit: its output's columns carry them. Refused where ``a`` carries units or
    a column of ``h`` holds two (the product would sum them)."""
    a, h = node.arg(0, "input"), node.arg(1, "other", node.kwargs.get("mat2"))
    lh = labels.get(h) if isinstance(h, Value) else None
    if lh is None or lh.dim() < 2 or (isinstance(a, Value) and a in labels):
        raise Refuse(f"{node.describe()} sums the units with each other or with other values")
    hi, lo = _extremes(lh)
    out = _pure(node, hi.amax(-2, keepdim=True), lo.amin(-2, keepdim=True))
    return broadcast(out, node.outputs[0].shape)
