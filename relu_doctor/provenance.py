"""Which layer made a tensor, and where that layer put its features (units from the producer).

An activation's units are the features of the layer that made its input: a Linear's output
features (the last dim, whatever the rank: ``(N, F)``, ``(N, L, F)``, ``(N, H, W, F)``), a
convolution's channels (dim 1 in PyTorch; wherever a later permute moved them, as Keras'
channels-last ``Conv2D`` and ConvNeXt's ``(N, H, W, C)`` MLP do). The shape of the activation
alone cannot say this: ``(N, C, L)`` from a Conv1d and ``(N, L, F)`` from a Linear look alike.

:class:`ProvenanceTracker` follows the tensors of one forward pass through a
:class:`~torch.overrides.TorchFunctionMode` and gives each an :class:`Origin` (the producer,
the dim holding its features, how many): producers are ``F.linear``, a ``matmul`` with a
weight (a parameter, or a permute/cast of one; on the left, ``W @ x``, its rows),
``F.conv*``, ``F.embedding``; norms, dropout, elementwise ops (an add of a same-shape
residual, a scalar mul, the activations themselves), pooling and slicing keep the feature axis; ``permute``/``transpose``/``movedim`` move it;
``reshape``/``view``/``flatten``/``squeeze``/``unsqueeze`` keep it where the axis stays whole;
``torch.cat`` along the feature axis makes a new one (DenseNet). A norm with no producer
before it (BatchNorm on the input) is the producer itself.

Cost: the mode sends every torch call through Python, so the probe starts it only for passes
where some site is still unresolved (the first recorded pass, or the pass after a site first
appeared untracked), from the pass's start to its end; once every site is resolved ordinary
steps run none of this (no hook, no mode). Never under ``torch.compile`` or during backward. Best effort: an op it does not understand leaves its
output without an origin (the probe then falls back to the shape rule); it never raises.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from relu_doctor._observing_mode import ObservingMode

__all__ = ["Origin", "ProvenanceTracker", "registered_producer"]

_CONV = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "conv_tbc",
}
_MATMUL = {"matmul", "mm", "__matmul__", "addmm", "bmm", "baddbmm"}
_NORM_CHANNELS = {"batch_norm", "instance_norm", "group_norm"}
_NORM_LAST = {"layer_norm", "rms_norm"}
_RESHAPE = {
    "reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
    "ravel", "_unsafe_view", "squeeze_", "unsqueeze_",
}
_TRANSPOSE = {"transpose", "swapaxes", "swapdims", "transpose_"}
_MOVEDIM = {"movedim", "moveaxis"}
_CAT = {"cat", "concat", "concatenate"}
#: Grouped matmuls: ``x @ W[e]`` for the rows of each expert ``e`` of a stacked weight
#: ``(experts, in, out)`` (torch's, and transformers' fallback op).
_GROUPED_MM = {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}
#: Ops that add rows together: after them, features made by several experts' weights are
#: one neuron's (an R-GCN's relations summed over a node's edges), not pooled experts'.
_ROW_SUMS = {"index_add", "scatter_add", "scatter_reduce", "index_reduce", "index_put",
             "segment_reduce"}
# Ops that mix or regroup axes: their output keeps no input's feature axis.
_MIXING = _MATMUL | {
    "einsum", "tensordot", "kron", "outer", "pixel_shuffle", "pixel_unshuffle", "unfold",
    "fold", "scaled_dot_product_attention", "stack", "bilinear", "multi_head_attention_forward",
}
# Ops that make a weight-like tensor from a weight (Keras permutes and casts its kernels).
_WEIGHT_VIEWS = (
    {"permute", "contiguous", "to", "float", "half", "bfloat16", "double", "type", "t",
     "detach", "clone", "_cast_Float"}
    | _RESHAPE | _TRANSPOSE
)


@dataclass(frozen=True)
class Origin:
    """Where a tensor's features are, and which layer made them.

    Attributes:
        dim: the (non-negative) dim holding the features.
        producer: the layer that made them (``"Linear `fc1`"``, ``"Conv2d `features.0`"``).
        kind: ``"features"`` (Linear-like: the last dim where made) or ``"channels"``.
        moved: True when a permute/transpose moved the axis after it was made.
        layer: the module path of the layer that made them (``""``: the model itself), where
            a module of the model holds the weight; else None.
        summed: the features went through a sum with another input of their shape since
            (a residual add): a unit there is not its producer's alone, so ReDo cannot
            recycle it (see :mod:`relu_doctor.remedies.unit_links`).
        mixed: the norm, in words, the features went through since that normalises the
            units together (a GroupNorm of several channels a group, a LayerNorm or RMSNorm
            over them; ``""``: none): ReDo cannot recycle them either, a fresh unit shifting
            the others.
        norm: the norm of each unit on its own (BatchNorm, InstanceNorm, a GroupNorm of
            one channel a group) the features went through last since they were made, in
            words (``"BatchNorm2d `down1.bn`"``; ``"F.batch_norm"`` where no module holds
            its weight, or it has none; ``""``: none, or a norm of the units together came
            after it): it takes each unit's mean away, so a unit dead behind it is its
            shift's and scale's, not the layer's bias (a Conv-BN-ReLU's conv has none).
        after_site: the features went through a watched activation since they were made
            (:meth:`ProvenanceTracker.after_site`): a site of them is the second of a chain
            (``F.relu`` then a LeakyReLU), not a second consumer of the layer beside the
            first.
        experts: the number of experts whose features these are, pooled (0: none): made by
            one grouped call of a mixture of experts' stacked weight (``(experts, in, out)``:
            transformers' ``grouped_mm`` and ``batched_mm`` experts), each row by the expert
            it was routed to, so feature ``j`` is feature ``j`` of every expert.
    """

    dim: int
    producer: str
    kind: str
    moved: bool = False
    layer: str | None = None
    summed: bool = False
    mixed: str = ""
    norm: str = ""
    after_site: bool = False
    experts: int = 0

    def rule(self, ndim: int) -> str:
        """The rule in words, e.g. ``"Linear `fc1` -> last dim"``."""
        where = "last dim" if self.dim == ndim - 1 and ndim > 1 else f"dim {self.dim}"
        if self.moved:
            where = f"{self.kind} moved to {where}"
        pooled = f" (its {self.experts} experts' units pooled)" if self.experts else ""
        return f"{self.producer} -> {where}{pooled}"


def _remove_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off the torch-function mode stack wherever it is (modes entered above
    it, such as functional capture's, stay on in their order)."""
    above: list[Any] = []
    while torch._C._len_torch_function_stack() > 0:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)


class ProvenanceTracker:
    """Follows one forward pass's tensors to the layers that made them (see module docs).

    The probe calls :meth:`start` and :meth:`stop` at the boundaries of the passes it wants
    tracked and reads :meth:`origin` of an activation's output when it makes a site.

    Args:
        model: the watched model (its parameters and buffers name the producers).

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv1d(2, 5, 3), nn.ReLU())
        >>> tracker = ProvenanceTracker(net)
        >>> tracker.start()
        >>> out = net(torch.randn(4, 2, 9))
        >>> tracker.origin(out).rule(out.dim())
        'Conv1d `0` -> dim 1'
        >>> tracker.stop()
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._mode = ObservingMode(self._observe)
        self._active = False
        self._origins: dict[int, tuple[weakref.ref[torch.Tensor], Origin]] = {}
        #: id -> (ref, label, class, module path)
        self._weights: dict[int, tuple[Any, str, str | None, str | None]] = {}
        #: the ids among them of parameters and their views and casts (not buffers)
        self._params: set[int] = set()
        #: of those, a stacked experts' weight gathered by each row's expert (``W[ids]``):
        #: id -> the number of experts
        self._gathered: dict[int, int] = {}

    # ------------------------------------------------------------------ passes
    @property
    def tracking(self) -> bool:
        """Whether the current forward pass is being tracked."""
        return self._active

    def start(self) -> None:
        """A forward pass starts: follow its tensors (enter the mode). Called by the probe at
        the pass start, before functional capture enters its own mode, so that functional
        capture sees each activation's output after this mode gave it its origin."""
        if self._active or torch.compiler.is_compiling():
            return
        self._weights = self._weight_labels()
        self._params = {id(p) for p in self.model.parameters()}
        self._gathered = {}
        self._origins.clear()
        self._mode.__enter__()  # type: ignore[no-untyped-call]
        self._active = True

    def pause(self) -> bool:
        """Leave the mode for a while, keeping what was followed (a part of the model
        compiled apart runs: see Probe._compiled_enter); returns whether it was on, for
        :meth:`resume`."""
        if not self._active:
            return False
        _remove_mode(self._mode)
        self._active = False
        return True

    def resume(self, was: bool) -> None:
        """Enter the mode again where :meth:`pause` left it."""
        if was and not self._active:
            self._mode.__enter__()  # type: ignore[no-untyped-call]
            self._active = True

    def stop(self) -> None:
        """The pass ended (or was abandoned): leave the mode, forget the pass's tensors."""
        if self._active:
            _remove_mode(self._mode)
            self._active = False
        self._origins.clear()
        self._weights = {}
        self._gathered = {}
        self._params = set()

    def _weight_labels(self) -> dict[int, tuple[Any, str, str | None, str | None]]:
        """``id(parameter or buffer) -> (ref, module path or key, module class or None, module
        path or None)``."""
        out: dict[int, tuple[Any, str, str | None, str | None]] = {}
        for path, mod in self.model.named_modules():
            holder = isinstance(mod, (nn.ParameterDict, nn.ParameterList))
            tensors: Iterable[tuple[str, Any]] = list(mod.named_parameters(recurse=False)) + list(
                mod.named_buffers(recurse=False)
            )
            for pname, t in tensors:
                if t is None or id(t) in out:
                    continue
                if holder:  # Keras keeps its variables in a ParameterDict keyed by layer path
                    out[id(t)] = (weakref.ref(t), pname, None, None)
                else:
                    out[id(t)] = (weakref.ref(t), path or "(root)", type(mod).__name__, path)
        return out

    # ------------------------------------------------------------------ lookup
    def origin(self, t: Any) -> Origin | None:
        """The origin of ``t`` in the pass being tracked, or None."""
        if not isinstance(t, torch.Tensor):
            return None
        got = self._origins.get(id(t))
        if got is None or got[0]() is not t:
            return None
        return got[1]

    def after_site(self, t: Any) -> None:
        """``t`` is the output of a watched activation (the probe calls this after reading
        its origin): what is made from it carries :attr:`Origin.after_site`."""
        origin = self.origin(t)
        if origin is not None and not origin.after_site:
            self._set(t, replace(origin, after_site=True))

    def _set(self, t: Any, origin: Origin | None) -> None:
        if origin is not None and isinstance(t, torch.Tensor) and 0 <= origin.dim < t.dim():
            self._origins[id(t)] = (weakref.ref(t), origin)

    def _weight(self, t: Any) -> tuple[str, str | None, str | None] | None:
        if not isinstance(t, torch.Tensor):
            return None
        got = self._weights.get(id(t))
        if got is None or got[0]() is not t:
            return None
        return got[1], got[2], got[3]

    def _contracts_features(self, right: Any) -> bool:
        """Whether ``W @ right`` sums over ``right``'s features, or ``right`` holds none
        known (its origin unknown): what makes ``W``'s rows the features of the product."""
        if not isinstance(right, torch.Tensor) or right.dim() < 2:
            return False
        got = self.origin(right)
        return got is None or got.dim == right.dim() - 2

    def _made(self, dim: int, op: str, weight: Any, default: str, kind: str) -> Origin:
        """The origin of what ``op`` made from ``weight`` (its producer in words: the layer
        holding the weight, else ``default`` or the op)."""
        w = self._weight(weight)
        if w is None:
            return Origin(dim, f"{default} (F.{op})" if default else f"F.{op}", kind)
        label, cls, path = w
        return Origin(dim, f"{op} with weight `{label}`" if cls is None else f"{cls} `{label}`",
                      kind, layer=path)

    # ------------------------------------------------------------------ rules
    def _observe(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        """The mode shows every torch call here."""
        name = getattr(func, "__name__", "")
        if name and name != "__get__":
            # Best effort: an op it cannot follow leaves its output without an origin.
            with contextlib.suppress(Exception):
                self._see(name, args, kwargs, out)

    def _pooled(self, made: Origin, weight: Any) -> Origin:
        """``made`` by a call of ``weight``: where it is a stacked experts' weight, gathered
        by each row's expert (``batched_mm``) or whole (a grouped matmul), with the
        experts pooled."""
        n = self._gathered.get(id(weight), 0)
        return replace(made, experts=n) if n else made

    def _see(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        first = args[0] if args else kwargs.get("input")
        if (name == "__getitem__" and isinstance(out, torch.Tensor) and out.dim() == 3
                and isinstance(first, torch.Tensor) and first.dim() == 3
                and id(first) in self._params and (w := self._weight(first)) is not None
                and len(args) > 1 and isinstance(args[1], torch.Tensor)
                and not args[1].is_floating_point() and args[1].dim() == 1):
            # a stacked experts' weight gathered by each row's expert: W[expert_ids]
            self._weights[id(out)] = (weakref.ref(out), *w)
            self._params.add(id(out))
            self._gathered[id(out)] = int(first.shape[0])
            return
        if name in _GROUPED_MM and isinstance(out, torch.Tensor):
            weight = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("mat_b"))
            if isinstance(weight, torch.Tensor) and weight.dim() == 3 and (
                    self._weight(weight) is not None):
                made = self._made(out.dim() - 1, name, weight, "", "features")
                self._set(out, replace(made, experts=int(weight.shape[0])))
            return
        if name in _WEIGHT_VIEWS and isinstance(out, torch.Tensor):
            w = self._weight(first)
            if w is not None:
                self._weights[id(out)] = (weakref.ref(out), *w)
                if id(first) in self._gathered:  # (its rows still each row's expert's)
                    self._gathered[id(out)] = self._gathered[id(first)]
                else:
                    self._gathered.pop(id(out), None)
                if id(first) in self._params:  # (W.t(), W.bfloat16(): still a parameter's)
                    self._params.add(id(out))
                else:
                    self._params.discard(id(out))
                return
        if not isinstance(out, (torch.Tensor, tuple, list)):
            return
        if name == "linear":
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(out, torch.Tensor):
                self._set(out, self._made(out.dim() - 1, name, weight, "Linear", "features"))
            return
        if name in _MATMUL:
            i = 1 if name in ("addmm", "baddbmm") else 0  # (their first argument: the bias)
            left = args[i] if len(args) > i else kwargs.get("mat1", kwargs.get("batch1"))
            weight = args[i + 1] if len(args) > i + 1 else kwargs.get(
                "other", kwargs.get("mat2", kwargs.get("batch2")))
            if not isinstance(out, torch.Tensor):
                return
            if self._weight(weight) is not None:  # x @ W: the last dim
                self._set(out, self._pooled(
                    self._made(out.dim() - 1, name, weight, "", "features"), weight))
            elif self._weight(left) is not None and id(left) in self._params and (
                    out.dim() >= 2 and self._contracts_features(weight)):  # W @ x: the rows (a
                # trial: a GNN's relu(W @ x.T) of N nodes read as N units, calls dropped as N
                # varied). Not where x holds features elsewhere: A_hat @ (x @ W), an adjacency
                # or a learned mixing of the nodes, keeps x's (a review)
                self._set(out, self._pooled(
                    self._made(out.dim() - 2, name, left, "", "features"), left))
            return
        if name in _CONV:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(out, torch.Tensor) and isinstance(weight, torch.Tensor):
                spatial = weight.dim() - 2
                dim = 1 if out.dim() == spatial + 2 else 0
                cls = f"Conv{spatial}d" if "transpose" not in name else f"ConvTranspose{spatial}d"
                self._set(out, self._made(dim, name, weight, cls, "channels"))
            return
        if name == "embedding":
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(out, torch.Tensor):
                self._set(out, self._made(out.dim() - 1, name, weight, "Embedding", "features"))
            return
        if name in _NORM_CHANNELS or name in _NORM_LAST:
            if isinstance(out, torch.Tensor):
                kept = self.origin(first)
                owner = next((a for a in list(args[1:]) + list(kwargs.values())
                              if self._weight(a) is not None), None)
                held = self._weight(owner)
                norm = f"F.{name}" if held is None or held[1] is None else f"{held[1]} `{held[0]}`"
                if kept is not None and isinstance(first, torch.Tensor) and first.shape == out.shape:
                    mixing = _mixing(name, args, kwargs, first, kept.dim)
                    self._set(out, replace(kept, mixed=kept.mixed or mixing,
                                           norm="" if mixing or name in _NORM_LAST else norm))
                else:
                    dim = out.dim() - 1 if name in _NORM_LAST else min(1, out.dim() - 1)
                    kind = "features" if name in _NORM_LAST else "channels"
                    own = (isinstance(first, torch.Tensor) and name in _NORM_CHANNELS
                           and not _mixing(name, args, kwargs, first, dim))
                    self._set(out, replace(self._made(dim, name, owner, "", kind),
                                           norm=norm if own else ""))
            return
        if name in _CAT:
            self._see_cat(args, kwargs, out)
            return
        if name in _MIXING:
            return
        src = self.origin(first)
        if isinstance(out, torch.Tensor) and src is not None and isinstance(first, torch.Tensor):
            moved = _moved_dim(name, args, kwargs, first, out, src.dim)
            if moved is not _NOT_LAYOUT:
                if moved is not None:
                    permuted = moved != src.dim and name not in _RESHAPE
                    self._set(out, replace(src, dim=moved, moved=src.moved or permuted))
                return
        self._see_elementwise(name, args, kwargs, out)

    def _see_cat(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        tensors = args[0] if args else kwargs.get("tensors", ())
        dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
        if not isinstance(out, torch.Tensor) or not isinstance(dim, int) or out.dim() == 0:
            return
        dim %= out.dim()
        known = [o for o in (self.origin(t) for t in tensors) if o is not None]
        if not known or any(o.dim != known[0].dim for o in known):
            return
        if known[0].dim != dim:
            self._set(out, known[0])
            return
        producers = sorted({o.producer for o in known})
        what = producers[0] if len(producers) == 1 else f"{producers[0]} and {len(producers) - 1} more"
        self._set(out, Origin(dim, f"torch.cat along dim {dim} of {what}", known[0].kind))

    def _see_elementwise(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        """Any other op: an output keeps the feature axis of an input of its rank (the first
        of the same shape, else the first of the same rank): activations, norms, dropout,
        residual adds, scalar maths, casts, pooling, padding, slicing, chunks. A sum of two
        inputs of the output's shape (a residual add, not a bias's) is marked
        :attr:`Origin.summed`."""
        tensors = _flat(args) + _flat(list(kwargs.values()))
        inputs = [a for a in tensors if self.origin(a) is not None]
        if not inputs:
            return
        summed = name in _SUMS and isinstance(out, torch.Tensor) and sum(
            a.shape == out.shape for a in tensors) > 1
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(o, torch.Tensor):
                continue
            if (had := self.origin(o)) is not None:  # (an in-place op: out += x)
                if summed and not had.summed:
                    self._set(o, replace(had, summed=True))
                continue
            same = [a for a in inputs if a.dim() == o.dim()]
            if not same:
                continue
            exact = [a for a in same if a.shape == o.shape]
            origin = self.origin((exact or same)[0])
            if origin is not None and origin.experts and name.rstrip("_") in _ROW_SUMS:
                origin = replace(origin, experts=0)  # (rows of several experts summed)
            self._set(o, replace(origin, summed=True) if summed and origin else origin)


def _mixing(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor,
            dim: int) -> str:
    """The norm ``name`` of ``x`` in words where it normalises the units on ``dim`` together
    (a GroupNorm of several channels a group, a LayerNorm or RMSNorm over that dim), else
    ``""`` (BatchNorm, InstanceNorm, a GroupNorm of one channel a group: each unit its own)."""
    if name == "group_norm":
        groups = args[1] if len(args) > 1 else kwargs.get("num_groups")
        if dim == 1 and x.dim() > 1 and isinstance(groups, int) and groups != x.shape[1]:
            return f"GroupNorm ({x.shape[1]} channels in {groups} groups)"
        return ""
    if name in _NORM_LAST:
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        over = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
        if dim >= x.dim() - over and x.shape[dim] > 1:
            what = "LayerNorm" if name == "layer_norm" else "RMSNorm"
            return f"{what} (over the last {over} dim{'s' if over > 1 else ''})"
    return ""


_NOT_LAYOUT: Any = object()
# sums of two branches (a residual add): Tensor.__add__ and torch.add, in place or not
_SUMS = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__",
         "__rsub__", "__isub__"}


def _flat(xs: Sequence[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for x in xs:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out.extend(t for t in x if isinstance(t, torch.Tensor))
    return out


def _ints(xs: Sequence[Any]) -> list[int]:
    if len(xs) == 1 and isinstance(xs[0], (list, tuple, torch.Size)):
        xs = xs[0]
    return [int(x) for x in xs]


def _moved_dim(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor,
    out: torch.Tensor, dim: int,
) -> Any:
    """Where a layout op put feature dim ``dim`` of ``x``: a dim of ``out``, None when the
    axis did not survive whole, or ``_NOT_LAYOUT`` when ``name`` is not a layout op."""
    nd = x.dim()
    if name == "permute":
        dims = [d % nd for d in _ints(args[1:] or (kwargs.get("dims", ()),))]
        return dims.index(dim) if dim in dims else None
    if name in _TRANSPOSE or name == "t":
        if name == "t":
            a, b = (0, 1) if nd == 2 else (0, 0)
        else:
            a = int(args[1] if len(args) > 1 else kwargs["dim0"]) % nd
            b = int(args[2] if len(args) > 2 else kwargs["dim1"]) % nd
        return b if dim == a else a if dim == b else dim
    if name in _MOVEDIM:
        src: Any = args[1] if len(args) > 1 else kwargs["source"]
        dst: Any = args[2] if len(args) > 2 else kwargs["destination"]
        srcs = [int(s) % nd for s in (src if isinstance(src, (list, tuple)) else [src])]
        dsts = [int(d) % nd for d in (dst if isinstance(dst, (list, tuple)) else [dst])]
        order: list[int | None] = [None] * nd
        for s, d in zip(srcs, dsts, strict=True):
            order[d] = s
        rest = iter(i for i in range(nd) if i not in srcs)
        full = [o if o is not None else next(rest) for o in order]
        return full.index(dim)
    if name in _RESHAPE:
        return _reshaped_dim(tuple(x.shape), tuple(out.shape), dim)
    return _NOT_LAYOUT


def _reshaped_dim(old: tuple[int, ...], new: tuple[int, ...], dim: int) -> int | None:
    """The dim of ``new`` that holds axis ``dim`` of ``old`` whole (same size, same number
    of elements before it), or None when the reshape split or merged it."""
    before = 1
    for s in old[:dim]:
        before *= s
    acc = 1
    for k, s in enumerate(new):
        if acc == before and s == old[dim]:
            return k
        acc *= s
        if acc > before and before > 0:
            return None
    return None


def _width(layer: nn.Module, *, made: bool) -> int | None:
    """The features ``layer`` makes (``made``) or takes: a Linear's, a convolution's, a
    norm's; None for a layer of another kind."""
    if isinstance(layer, nn.Linear):
        return layer.out_features if made else layer.in_features
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.out_channels if made else layer.in_channels
    if isinstance(layer, nn.modules.batchnorm._NormBase):
        return layer.num_features
    if isinstance(layer, nn.GroupNorm):
        return layer.num_channels
    if isinstance(layer, nn.LayerNorm) and len(layer.normalized_shape) == 1:
        return layer.normalized_shape[0]
    return None


def _neighbour(children: list[tuple[str, nn.Module | None]], *, made: bool) -> tuple[str, int] | None:
    """The first of ``children`` that has a width, past those holding no parameter
    (dropout, padding, pooling): ``(name, width)``; None where a layer of another kind with
    parameters comes first, or none does."""
    for name, layer in children:
        if layer is None:
            continue
        width = _width(layer, made=made)
        if width is not None:
            return name, width
        if any(True for _ in layer.parameters()):
            return None
    return None


def registered_producer(model: nn.Module, path: str, shape: Sequence[int]) -> tuple[int, str] | None:
    """Where the activation module at ``path`` finds its units on an output of ``shape``
    when no pass can be followed (a site first seen while torch.compile traces): from the
    layer with a width registered just before it in its parent (past layers holding no
    parameter), a Linear, convolution or norm, where exactly one of ``shape``'s dim 1 and
    last dim has that width (ConvNeXt's ``pwconv1`` Linear before its GELU, on ``(N, H, W,
    4C)``), and the layer registered after it, if it has a width, takes as many. ``(dim,
    rule)``, or None: the shape rule stands. Static: it never runs the model. (For a
    module's first call only: a module called several times in a pass runs on what other
    layers made too.)"""
    if len(shape) < 3 or not path:
        return None
    parent_path, _, name = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path)
    except (AttributeError, TypeError):
        return None
    children = list(parent._modules.items())
    at = next((i for i, (n, _) in enumerate(children) if n == name), None)
    if at is None:
        return None
    before = _neighbour(children[:at][::-1], made=True)
    if before is None:
        return None
    label, width = before
    dims = [d for d in (1, len(shape) - 1) if shape[d] == width]
    after = _neighbour(children[at + 1:], made=False)
    if len(dims) != 1 or (after is not None and after[1] != width):
        return None
    layer = parent._modules[label]
    where = f"{parent_path}.{label}" if parent_path else label
    return dims[0], (f"{type(layer).__name__} `{where}` -> dim {dims[0]} (registered before "
                     f"it, {width} wide: the pass that ran it was compiled, which traces no "
                     "layer)")
