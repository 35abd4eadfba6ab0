"""Unit links: which layer produces a site's units and which layers consume them, read from
the dataflow of one forward pass.

Recycling a unit (ReDo) re-initialises its incoming weights and cuts its outgoing ones, so
it needs both ends, found in a :class:`~relu_doctor.remedies.dataflow.Dataflow`:

* the **producer**: the Linear/ConvNd whose output features are the site's units, reached
  backwards from the activation's input through dropout, reshapes/permutes and per-channel
  norms (BatchNorm, GroupNorm with one channel per group; reset with the units). Its output
  must go nowhere but to the activation, or a fresh unit would change that other path;
* the **consumers**: every path from the activation's output is followed forwards, each
  tensor's elements labelled with the unit they carry, through what keeps a dead unit's zeros
  zero and its units apart: dropout, pooling, spatial means, reshape/flatten/permute/
  transpose, slicing, channel concatenation (a unit maps to a slice of the consumer's
  inputs), products with other tensors (a gate, a layer scale), what gathers one unit into
  each element (a graph's scatters into zeros, ``adj @ h``, GIN's ``h + agg(h)``). Each path must end in a
  Linear/ConvNd input (those columns are zeroed) or an affine per-channel norm (that
  channel's scale is zeroed and its shift kept, so it still outputs what a dead unit gave).

Refused, with the blocking path named: a sum with another branch (a residual or skip
connection: the unit's new value would pass through it), a norm that mixes units (LayerNorm,
GroupNorm), the model's output reached directly, any other op, and layers shared with
another input. The site is a :class:`~relu_doctor.sites.SiteKey`, so any module name works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies._unit_labels import (
    FOLLOWED,
    PAD,
    Refuse,
    broadcast,
    channel_map,
    pool_labels,
    reduce_labels,
    replay,
    spatial_dims,
    sum_labels,
)
from relu_doctor.remedies.base import get_module, key_label, site_key_of
from relu_doctor.remedies.dataflow import (
    Dataflow,
    ModuleCall,
    Node,
    Param,
    Value,
    record_dataflow,
)
from relu_doctor.sites import SiteKey, module_label

__all__ = ["Consumer", "NormReset", "NotInPass", "UnitLinks", "find_unit_links"]


class NotInPass(ReluDoctorError):
    """The site made no call in the recorded pass (a branch that pass did not take): its
    links may be found in a pass that takes it, not refused for good."""


class _NotRun(Refuse):
    pass

#: Transposed convolutions (a DCGAN generator's, a U-Net decoder's): their weight is
#: stored (in, out/groups, *kernel), their output channels on its dim 1.
_CONV_T = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_PRODUCERS = {"linear", "conv1d", "conv2d", "conv3d", "addmm", *_CONV_T}
#: Producers whose weight is stored (in, out), features last: Hugging Face's ``Conv1D``
#: (GPT-2's MLP), ``torch.addmm(bias, x, weight)``.
_TRANSPOSED = {"addmm"}


def _unit_dim(producer: str) -> int:
    """The dim of a producer's weight that holds its output features (the units)."""
    return 1 if producer in _TRANSPOSED or producer in _CONV_T else 0
_MOVE = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "contiguous",
    "clone", "unsqueeze", "squeeze", "expand", "cat", "concat", "concatenate", "stack",
    "__getitem__", "chunk", "split", "tensor_split", "unbind", "narrow", "movedim", "moveaxis",
    "swapaxes", "swapdims", "pad", "view_as", "reshape_as", "expand_as", "select", "flip",
    "roll", "repeat", "tile",
}  # fmt: skip
_CASTS = {"to", "type", "float", "half", "double", "bfloat16", "cuda", "cpu", "type_as", "detach"}
_DROPOUT = {"dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout"}
# f(0) == 0 elementwise, one input: a dead unit's zeros stay zeros.
_ZERO_UNARY = _DROPOUT | {
    "relu", "relu6", "leaky_relu", "prelu", "rrelu", "gelu", "silu", "mish", "hardswish",
    "elu", "celu", "selu", "hardtanh", "tanh", "softsign", "neg", "__neg__", "abs", "square",
}  # fmt: skip
_MUL = {"mul", "__mul__", "__rmul__", "__imul__", "multiply"}
_DIV = {"div", "__truediv__", "__itruediv__", "true_divide", "divide"}
_SUM = {"add", "__add__", "__radd__", "__iadd__", "sub", "__sub__", "__rsub__", "__isub__"}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "nanmean", "nansum"}
_NORMS = {"batch_norm", "group_norm", "layer_norm", "instance_norm", "rms_norm"}


@dataclass
class Consumer:
    """A layer reading a site's units.

    Attributes:
        path, module: the layer (a Linear/ConvNd, or an affine per-channel norm: ``kind``).
        span: input features per unit (H*W after a conv-to-linear flatten, else 1).
        offset: index of the first input feature fed by the site (a concatenation's offset).
        inputs: per input feature (Linear) or channel (conv, norm): the unit it carries,
            -1 for none.
        kind: ``"weight"`` (zero the inputs' columns) or ``"norm"`` (zero the channels' scale,
            keep the shift a dead unit gave).
        param: the attribute name of the weight read (``"weight"``).
        in_dim: the weight's dim of its input features (1; 0 for a weight stored
            ``(in, out)``, Hugging Face's ``Conv1D``).
    """

    path: str
    module: nn.Module
    span: int = 1
    offset: int = 0
    inputs: torch.Tensor | None = None
    kind: str = "weight"
    param: str = "weight"
    in_dim: int = 1

    def columns(self, units: torch.Tensor) -> torch.Tensor:
        """The input features (channels) carrying ``units``."""
        if self.inputs is None:
            cols = units[:, None] * self.span + torch.arange(self.span)[None, :]
            return (cols.reshape(-1) + self.offset).sort().values
        return torch.nonzero(torch.isin(self.inputs, units)).flatten()

    def per_unit(self, values: torch.Tensor, units: int) -> torch.Tensor:
        """Sum ``values`` (one per input feature/channel of this consumer) per unit: e.g. a
        unit's outgoing weight magnitude, whatever the flatten span or concat offset."""
        m = self.unit_of_inputs(values.shape[0])
        keep = (m >= 0) & (m < units)  # (another branch's features after a concatenation)
        out = torch.zeros(units, dtype=values.dtype, device=values.device)
        return out.index_add_(0, m[keep].to(values.device), values[keep.to(values.device)])

    def unit_of_inputs(self, n: int) -> torch.Tensor:
        """Per input feature/channel (``n`` of them): the unit it carries, -1 for none."""
        if self.inputs is not None:
            return self.inputs
        m = torch.full((n,), -1, dtype=torch.long)
        idx = torch.arange(n - self.offset)
        m[self.offset :] = idx // self.span
        return m

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "span": self.span}
        if self.offset:
            out["offset"] = self.offset
        if self.kind != "weight":
            out["kind"] = self.kind
        return out


@dataclass
class NormReset:
    """A per-channel norm between producer and activation: its ``channels`` (per channel,
    the unit it normalises, -1 for none) are reset with the units."""

    path: str
    module: nn.Module
    channels: torch.Tensor


@dataclass
class UnitLinks:
    """Where a site's units come from and go to.

    Attributes:
        site: the site name.
        units: number of units (the producer's output features).
        producer_path, producer: the Linear/Conv whose output features are the units.
        norm_path, norm: the first norm between them, or None (``norms`` lists all).
        consumers: the layers reading the activation's output.
        norms: every per-channel norm between producer and activation.
        producer_param: the attribute name of the producer's weight.
        producer_dim: the producer weight's dim of the units (0; 1 for a weight stored
            ``(in, out)``, Hugging Face's ``Conv1D``).
    """

    site: str
    units: int
    producer_path: str
    producer: nn.Module
    norm_path: str | None
    norm: nn.Module | None
    consumers: list[Consumer]
    norms: list[NormReset] = field(default_factory=list)
    producer_param: str = "weight"
    producer_dim: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "units": self.units,
            "producer": self.producer_path,
            "norm": self.norm_path,
            "consumers": [c.describe() for c in self.consumers],
        }


# ---------------------------------------------------------------------- the site in the flow


def _site_values(
    flow: Dataflow, model: nn.Module, key: SiteKey
) -> tuple[Value, Node | None, ModuleCall | None]:
    """The site's input value, the first call the site made on it, and the module call of a
    module site (None for a functional one)."""
    if key.op is None:
        mod = get_module(model, key.module_path, "site")
        calls = flow.module_calls.get(mod, [])
        if len(calls) <= key.call_index or not calls[key.call_index].inputs:
            raise _NotRun(
                f"the recorded forward pass called {module_label(key.module_path)!r} "
                f"{len(calls)} time(s), not {key.call_index + 1}"
            )
        call = calls[key.call_index]
        inner = [n for n in call.inputs[0].users if call.start <= n.index < call.end]
        return call.inputs[0], inner[0] if inner else None, call
    nodes = flow.functional.get((key.module_path, key.op), [])
    if len(nodes) <= key.call_index or not nodes[key.call_index].inputs:
        raise _NotRun(
            f"the recorded forward pass made {len(nodes)} {key.op} call(s) in "
            f"{module_label(key.module_path)}.forward, not {key.call_index + 1}"
        )
    node = nodes[key.call_index]
    return node.inputs[0], node, None


def _weight(node: Node) -> Param | None:
    w = node.weight_arg()
    return w if isinstance(w, Param) else None


def _norm_weight(node: Node) -> Any:
    i = {"batch_norm": 3, "group_norm": 2, "instance_norm": 3, "layer_norm": 2}.get(node.name, 2)
    return node.arg(i, "weight")


def _norm_owner(node: Node) -> Param | None:
    for a in (_norm_weight(node), node.arg(1, "running_mean")):
        if isinstance(a, Param):
            return a
    return None


def _per_channel(node: Node, shape: tuple[int, ...]) -> bool:
    if node.name in ("batch_norm", "instance_norm"):
        return True
    if node.name == "group_norm":
        return len(shape) > 1 and node.arg(1, "num_groups") == shape[1]
    return False


def _mixing_norm(node: Node) -> str:
    what = {"layer_norm": "LayerNorm", "group_norm": "GroupNorm", "rms_norm": "RMSNorm"}
    return (f"{what.get(node.name, node.name)} ({node.describe()}), which normalises the "
            "units together")


# ---------------------------------------------------------------------- the walk


def _producer(start: Value) -> tuple[Node, list[Node]]:
    """Backwards from the site's input: the producing Linear/Conv call and the calls between."""
    chain: list[Node] = []
    v = start
    while True:
        n = v.node
        if n is None:
            raise Refuse("its input is an input of the model, not the output of a layer")
        if n.name in _PRODUCERS and n.outputs[0] is v:
            if n.name in _CONV_T and n.arg(6, "groups") not in (None, 1):
                raise Refuse(
                    f"its input comes from {n.describe()}, a grouped transposed convolution: "
                    "its output channels lie across the groups of its weight's dim 1, which "
                    "recycling does not follow"
                )
            if _weight(n) is not None:
                return n, chain[::-1]
            if n.name not in _TRANSPOSED:  # (addmm's "weight" may be an activation)
                raise Refuse(  # (a trial's weight-normed TCN read "not from a Conv layer")
                    f"its input comes from {n.describe()}, whose weight is not a parameter "
                    "but made from one in the forward (a slice of a stacked experts' weight, a "
                    "cast, or a parametrization: weight_norm, spectral_norm): recycling "
                    "re-initialises a parameter's rows, which it cannot do through that"
                )
        if n.name in _NORMS and not _per_channel(n, v.shape):
            raise Refuse(
                f"its input passes a {_mixing_norm(n)}: a fresh unit would shift the others"
            )
        passes = (
            n.name in _MOVE | _CASTS | _DROPOUT
            or bool(spatial_dims(n, len(v.shape)))
            or (n.name in _NORMS and _per_channel(n, v.shape))
        )
        tracked = [i for i in n.inputs if i.data is None]
        if not passes or len(tracked) != 1:
            kind = f"a sum ({n.describe()})" if n.name in _SUM else n.describe()
            raise Refuse(
                f"its input comes from {kind}, not from a Linear or Conv layer (through "
                "dropout, pooling, reshapes or a per-channel norm); recycling needs the one "
                "layer that produces the units"
            )
        chain.append(n)
        v = tracked[0]


def _walk(
    flow: Dataflow, prod: Node, chain: list[Node], site_in: Value, site: Node | None,
    call: ModuleCall | None = None,
) -> tuple[list[NormReset], list[Consumer]]:
    p_out = prod.outputs[0]
    w = _weight(prod)
    assert w is not None
    units = int(w.tensor.shape[_unit_dim(prod.name)])
    if prod.name == "linear" or prod.name in _TRANSPOSED:
        fdim = len(p_out.shape) - 1
    else:
        fdim = 1 if len(p_out.shape) == w.tensor.dim() else 0
    shape = [1] * len(p_out.shape)
    shape[fdim] = units
    labels: dict[Value, torch.Tensor] = {
        p_out: broadcast(
            torch.arange(1, units + 1, dtype=torch.float32).reshape(shape), p_out.shape
        )
    }
    # --- producer side: a single path, nothing else may read it
    norms: list[NormReset] = []
    on_chain = [p_out] + [n.outputs[0] for n in chain]
    # An activation module is one elementwise map with f(0) = 0 (every family member), however
    # many ops its forward makes (Hugging Face's NewGELU: pow, mul, add, tanh): its calls
    # read the units as the site, and its output carries them as its input did.
    inside = range(call.start, call.end) if call is not None and call.outputs else range(0)
    for v, nxt in zip(on_chain, [*chain, site], strict=True):
        others = [u for u in v.users if u is not nxt and u.index not in inside]
        if others:
            raise Refuse(
                f"the output of {prod.describe()} also goes to {others[0].describe()}, not only "
                "to this activation: a fresh unit would change that path too"
            )
    for n in chain:
        lab = labels[n.inputs[0]]
        if n.name in _NORMS:
            owner = _norm_owner(n)
            if owner is not None:
                norms.append(
                    NormReset(owner.path, owner.module, channel_map(lab, 1, n.describe()))
                )
        elif n.name in _MOVE:
            lab = replay(n, labels)[0]
        elif k := spatial_dims(n, lab.dim()):
            lab = pool_labels(n, lab, k)
        labels[n.outputs[0]] = lab
    # --- consumer side: every path, in execution order
    consumers: list[Consumer] = []
    route: dict[Value, str] = {site_in: ""}
    first = site.index if site is not None else len(flow.nodes)
    if inside:
        assert call is not None
        out = call.outputs[0]
        labels[out] = broadcast(labels[site_in], out.shape)
        one = site is not None and call.end - call.start == 1
        route[out] = site.name if one and site is not None else type(call.module).__name__
        first = call.end
        if out.output:
            raise Refuse(
                f"its units reach the model's output through {route[out]} without passing a "
                "parameterised layer whose inputs could be zeroed"
            )
    for n in flow.nodes[first:]:
        if n.index in inside:
            continue
        tracked = [v for v in n.inputs if v in labels]
        if not tracked:
            continue
        via = route.get(tracked[0], "")
        here = f"{via} -> {n.name}" if via else n.name
        try:
            outs = _consume(n, tracked, labels, consumers)
        except Refuse as e:
            raise Refuse(f"{e} (path: {here})") from None
        for v, lab in zip(n.outputs, outs, strict=False):
            labels[v] = lab
            route[v] = here
            if v.output and bool((lab > 0).any()):
                raise Refuse(
                    f"its units reach the model's output through {here} without passing a "
                    "parameterised layer whose inputs could be zeroed"
                )
    if site_in.output:
        raise Refuse("its units are the model's output")
    if not consumers:
        raise Refuse("its units reach no Linear, Conv or norm layer")
    return norms, consumers


def _consume(
    n: Node, tracked: list[Value], labels: dict[Value, torch.Tensor], consumers: list[Consumer]
) -> list[torch.Tensor]:
    """One call reading units: a cut (recorded in ``consumers``; returns nothing) or the labels
    of its outputs."""
    name = n.name
    first = n.arg(1, "mat1") if name in _TRANSPOSED else n.arg(0, "input")
    x: Value | None = first if isinstance(first, Value) else None
    lx = labels.get(x) if x is not None else None
    alone = lx is not None and len(tracked) == 1  # reads the units as its input only
    if name in _PRODUCERS:
        w = _weight(n)
        if w is None or x is None or lx is None or not alone:
            raise Refuse(f"{n.describe()} reads the units with a computed weight")
        flat = name == "linear" or name in _TRANSPOSED
        dim = -1 if flat else (1 if len(x.shape) == w.tensor.dim() else 0)
        m = channel_map(lx, dim, n.describe())
        consumers.append(_consumer(w, m, "weight", in_dim=1 - _unit_dim(name)))
        return []
    if name in _NORMS:
        if not _per_channel(n, x.shape if x is not None else ()):
            raise Refuse(f"its units pass a {_mixing_norm(n)}")
        owner = _norm_weight(n)
        if not isinstance(owner, Param) or lx is None or not alone:
            raise Refuse(f"{n.describe()} has no learned scale to zero")
        m = channel_map(lx, 1, n.describe())
        consumers.append(_consumer(owner, m, "norm"))
        return []
    if name in _SUM:
        return [sum_labels(n, labels)]
    if name in FOLLOWED:  # (scatters, matrix products, writes into a slice)
        return [FOLLOWED[name](n, labels)]
    if name in _MOVE:
        return replay(n, labels)
    if name in _CASTS:
        return [lx] if lx is not None else []
    out_shape = n.outputs[0].shape if n.outputs else ()
    if name in _ZERO_UNARY and lx is not None and alone:
        return [broadcast(lx, out_shape)]
    if name in _MUL or (name in _DIV and alone):
        a, b = (
            labels.get(v) if isinstance(v, Value) else None
            for v in (n.arg(0, "input"), n.arg(1, "other"))
        )
        la = broadcast(a, out_shape) if a is not None else torch.zeros(out_shape)
        lb = broadcast(b, out_shape) if b is not None else torch.zeros(out_shape)
        if bool(((la > 0) & (lb > 0) & (la != lb)).any()):
            raise Refuse(f"{n.describe()} multiplies two units together")
        # a pad's zeros stay zeros whatever they are multiplied by
        return [torch.where((la == PAD) | (lb == PAD), PAD, torch.maximum(la, lb))]
    if name in _REDUCE and lx is not None and alone:
        return [reduce_labels(n, lx)]
    if lx is not None and alone and (k := spatial_dims(n, lx.dim())):
        return [pool_labels(n, lx, k)]
    raise Refuse(
        f"its units reach {n.describe()}, which is not a Linear, Conv or per-channel norm and "
        "may mix them or change their zeros (recycling zeroes the recycled units' outgoing "
        "weights and follows dropout, pooling, upsampling, means, reshapes, concatenation "
        "and products to them)"
    )


def _consumer(w: Param, m: torch.Tensor, kind: str, in_dim: int = 1) -> Consumer:
    fed = torch.nonzero(m >= 0).flatten()
    offset = int(fed.min()) if fed.numel() else 0
    counts = torch.bincount(m[fed]) if fed.numel() else torch.zeros(1, dtype=torch.long)
    span = int(counts.max()) if counts.numel() else 1
    return Consumer(w.path, w.module, span, offset, m, kind, w.name, in_dim)


def _check_shared(
    flow: Dataflow, prod: Node, consumers: list[Consumer], norms: list[NormReset]
) -> None:
    w = _weight(prod)
    assert w is not None
    n_uses = len(flow.uses_of(w.tensor))
    if n_uses > 1:
        raise Refuse(
            f"the weight of {type(w.module).__name__} {w.path!r} is used {n_uses} times per "
            "pass (the layer called again, or its weight tied to another use); "
            "re-initialising its rows would change its other outputs too"
        )
    seen: dict[int, list[Consumer]] = {}
    for c in consumers:
        seen.setdefault(id(getattr(c.module, c.param)), []).append(c)
    for group in seen.values():
        c = group[0]
        uses = len(flow.uses_of(getattr(c.module, c.param)))
        if uses > len(group):
            raise Refuse(
                f"{type(c.module).__name__} {c.path!r} is also called on other inputs (or its "
                "weight used elsewhere); zeroing its input columns would change those outputs"
            )


# ---------------------------------------------------------------------- the API


def find_unit_links(
    model: nn.Module,
    *,
    site: str | SiteKey,
    example_inputs: Any = None,
    dataflow: Dataflow | None = None,
    name: str | None = None,
) -> UnitLinks:
    """Find the layer producing ``site``'s units and the layers consuming them.

    Read from what one forward pass did (:func:`~relu_doctor.remedies.dataflow.
    record_dataflow`), so any architecture works: residual blocks, concatenation, norm-act
    modules, transformer MLPs, functional activations.

    Args:
        model: the model (site paths are relative to it).
        site: the site's :class:`~relu_doctor.sites.SiteKey` (``doctor.site_key(name)``,
            ``record.key(name)``), or the module path of an activation module called once,
            exactly as registered (``"features.2"``, ``"enc:act"``).
        example_inputs: input(s) for one forward pass (a tensor or a tuple of arguments),
            when no ``dataflow`` is given.
        dataflow: a recorded pass of ``model`` to reuse across sites.
        name: the site's display name, for messages and :attr:`UnitLinks.site` (default:
            made from the key).

    Raises:
        ReluDoctorError: naming the site and the blocking path, when recycling its units
            could change the model's output (a skip connection, a non-parameterised
            consumer, a norm mixing units...), or neither input nor dataflow is given.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> links = find_unit_links(net, site="1", example_inputs=torch.randn(3, 2))
        >>> links.producer_path, links.consumers[0].path
        ('0', '2')
    """
    key = site_key_of(site)
    label = (
        name
        if name is not None
        else (module_label(site) if isinstance(site, str) else key_label(key))
    )
    get_module(model, key.module_path, "site")
    if key.op is None and not key.module_path:
        raise ReluDoctorError(
            f"site {label!r}: the model itself is the activation; nothing feeds it."
        )
    if dataflow is None:
        if example_inputs is None:
            raise ReluDoctorError(
                "example_inputs: expected the input(s) of one forward pass (a tensor or a tuple) "
                "to read the site's producer and consumers from, or a recorded dataflow=; got "
                "neither."
            )
        try:
            dataflow = record_dataflow(model, example_inputs)
        except Exception as e:
            raise ReluDoctorError(
                f"site {label!r}: the forward pass on example_inputs failed "
                f"({type(e).__name__}: {e})."
            ) from None
    try:
        site_in, site_node, call = _site_values(dataflow, model, key)
        prod, chain = _producer(site_in)
        norms, consumers = _walk(dataflow, prod, chain, site_in, site_node, call)
        _check_shared(dataflow, prod, consumers, norms)
    except _NotRun as e:
        raise NotInPass(f"site {label!r}: {e} (a branch that pass did not take)") from None
    except Refuse as e:
        raise ReluDoctorError(f"site {label!r}: {e}. Exclude this site.") from None
    except ReluDoctorError:
        raise
    except Exception as e:  # an op we cannot follow in a way not foreseen: refuse, never crash
        raise ReluDoctorError(
            f"site {label!r}: could not follow its units through the recorded pass "
            f"({type(e).__name__}: {e}). Exclude this site."
        ) from None
    w = _weight(prod)
    assert w is not None
    first = norms[0] if norms else None
    dim = _unit_dim(prod.name)
    return UnitLinks(
        label,
        int(w.tensor.shape[dim]),
        w.path,
        w.module,
        first.path if first else None,
        first.module if first else None,
        consumers,
        norms,
        w.name,
        dim,
    )
