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
    hi, lo = _extremes(moved)
    hi, lo = hi.amax(1), lo.amin(1)
    has = (moved != PAD).any(1)
    if bool((has & (hi != lo)).any()):
        raise Refuse(f"{what} reads the units mixed with other values on one input")
    return torch.where(has, hi, 0.0).long() - 1


def broadcast(lab: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.broadcast_to(lab, shape).clone()


def _fold(lab: torch.Tensor, dim: Any, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest and smallest labels over ``dim`` (None: all), a pad's zeros (:data:`PAD`)
    left out: they add nothing to a sum, a mean or a pool of one unit. All pad: PAD."""
    kw: dict[str, Any] = {} if dim is None else {"dim": dim, "keepdim": keep}
    hi, lo = _extremes(lab)
    hi, lo = hi.amax(**kw), lo.amin(**kw)
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


def _pure(node: Node, hi: torch.Tensor, lo: torch.Tensor, why: str | None = None) -> torch.Tensor:
    """The labels of an output whose elements each gathered the labels between ``lo`` and
    ``hi`` (-inf and +inf: only a pad's zeros): refuse where one gathered two (``why``: the
    refusal's words, else a gathering op's)."""
    none = torch.isinf(hi) & (hi < 0)
    if bool((~none & (hi != lo)).any()):
        raise Refuse(why or f"{node.describe()} adds the units to each other or to values "
                     "from elsewhere (a target that held other values, a residual)")
    return torch.where(none, PAD, hi)


def _carried(labels: dict[Value, torch.Tensor], v: Value, shape: tuple[int, ...]) -> torch.Tensor:
    """The units ``v`` carries, in ``shape``: 0 (none) for a tensor that carries none, whatever
    its values (an integer tensor's are data, not labels)."""
    got = labels.get(v)
    return broadcast(got if got is not None else torch.zeros(v.shape), shape)


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
    (ha, la), (hb, lb) = _extremes(_carried(labels, a, shape)), _extremes(_carried(labels, b, shape))
    return _pure(node, torch.maximum(ha, hb), torch.minimum(la, lb), why=(
        f"its units also reach {node.describe()}, a sum with another branch (a residual or "
        "skip connection): a recycled unit's new value would pass through it unweighted"))


def setitem_labels(node: Node, labels: dict[Value, torch.Tensor]) -> torch.Tensor:
    """``t[index] = value``: the elements written carry what ``value`` carries (none where it
    is a number or a tensor of no unit: the zeros of ``h[pad] = 0`` are a pad's, which mix
    with nothing), the others what ``t`` did."""
    target, index, value = node.arg(0, "self"), node.arg(1, "key"), node.arg(2, "value")
    if not isinstance(target, Value):
        raise Refuse(f"cannot follow the units through {node.describe()}")
    out = _carried(labels, target, target.shape).clone()
    key = labels_for(labels, index)  # (index tensors: their data)
    if isinstance(value, Value):
        out[key] = labels[value] if value in labels else torch.zeros(value.shape)
    elif isinstance(value, int | float | bool):
        out[key] = PAD if value == 0 else 0.0
    else:
        raise Refuse(f"cannot follow the units through {node.describe()}")
    return out


#: Calls that make a tensor of zeros: a scatter into one adds nothing else to the units.
ZEROS = frozenset({"zeros", "zeros_like", "new_zeros"})
#: Scatters and index reductions (a GNN's message aggregation): each element of the output
#: gathers the source's elements that the index sends there (and its own, ``include_self``).
SCATTERS = frozenset({"index_add", "index_reduce", "scatter_add", "scatter_reduce", "scatter"})


def _zeros_only(target: Any, node: Node) -> bool:
    """Whether ``target`` holds the zeros it was made with when ``node`` reads it: made by
    :data:`ZEROS` and read by nothing before (a slice or view of it written, ``buf[:, :4] = x``,
    ``buf.view(-1).add_(1)``, reads it first; a write to it makes a new version)."""
    return (isinstance(target, Value) and target.node is not None
            and target.node.name in ZEROS and target.users == [node])


def scatter_labels(node: Node, labels: dict[Value, torch.Tensor]) -> torch.Tensor:
    """The labels of a scatter's output, replayed with amax and amin on the labels: each
    element must gather one unit (a pad's zeros and a target of zeros alone gather none).
    Refused where it gathers two, or a unit and a value from elsewhere (a target that holds
    other values: a residual, features written into it first)."""
    name = node.name
    target, dim, index = node.arg(0, "input"), node.arg(1, "dim"), node.arg(2, "index")
    src = node.arg(3, "source" if name.startswith("index") else "src")
    if not (isinstance(dim, int) and isinstance(index, Value) and index.data is not None
            and isinstance(src, Value) and isinstance(target, Value)):
        raise Refuse(f"cannot follow the units through {node.describe()}")
    overwrite = name == "scatter" and node.arg(4, "reduce") is None
    keep = bool(node.arg(5, "include_self", True)) and not overwrite
    t = (torch.full(target.shape, PAD) if _zeros_only(target, node)  # (adds nothing to a unit)
         else _carried(labels, target, target.shape))
    (th, tl), (sh, sl) = _extremes(t), _extremes(_carried(labels, src, src.shape))
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
    carries one unit: its output's columns carry them (``a`` 1-D, attention pooling over a
    graph's nodes: one row). Refused where ``a`` carries units (``h @ W``, a product with a
    parameter, which recycling does not follow: an ``nn.Linear`` it does) or a column of
    ``h`` holds two (the product would sum them)."""
    a, h = node.arg(0, "input"), node.arg(1, "other", node.kwargs.get("mat2"))
    if isinstance(a, Value) and a in labels:
        w = "a parameter" if isinstance(h, Param) else "another tensor"
        raise Refuse(f"its units reach {node.describe()}, a product with {w} that sums them "
                     "(recycling zeroes the inputs of an nn.Linear, not of a matmul)")
    lh = labels.get(h) if isinstance(h, Value) else None
    out_shape = node.outputs[0].shape if node.outputs else ()
    if lh is None or lh.dim() < 2 or not out_shape:
        raise Refuse(f"{node.describe()} sums the units with each other or with other values")
    hi, lo = _extremes(lh)
    out = _pure(node, hi.amax(-2, keepdim=True), lo.amin(-2, keepdim=True))
    if len(out_shape) == lh.dim() - 1:  # (a 1-D a: the row dim gone)
        out = out.squeeze(-2)
    return broadcast(out, out_shape)


#: The calls whose output's labels a function of their own works out (see each), by name.
FOLLOWED: dict[str, Any] = {
    **dict.fromkeys(SCATTERS, scatter_labels), **dict.fromkeys(MATMULS, matmul_labels),
    "__setitem__": setitem_labels,
}
